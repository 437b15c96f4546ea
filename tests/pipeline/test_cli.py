"""The ditscale console script."""

import subprocess
import sys

import pytest

from pipeline.cli import main


def test_presets_lists_every_preset_with_paper_figures(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    xl2 = next(line for line in out.splitlines() if line.startswith("DiT-XL/2"))
    assert "675,129,632" in xl2 and "118.621" in xl2
    assert sum(line.startswith("DiT-") for line in out.splitlines()) == 30  # 10 sizes x 3 patch sizes


def test_presets_show_every_block_option_combination(capsys):
    from dit_core.config import DiTOptions, dit_config
    from dit_core.flops import param_count

    assert main(["presets", "--preset", "DiT-XL/2", "DiT-S/2", "--all-options"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("DiT-")]
    assert len(rows) == 2 * 16 and len({tuple(r[1:5]) for r in rows}) == 16
    rope = next(r for r in rows if r[:5] == ["DiT-XL/2", "rope", "swiglu", "rmsnorm", "true"])
    modern = DiTOptions(positions="rope", mlp="swiglu", norm="rmsnorm", qk_norm=True)
    assert rope[-2] == f"{param_count(dit_config('DiT-XL/2', modern)):,}" and rope[-1] == "118.621"
    assert main(["presets", "--preset", "DiT-XL/2", "--set", "mlp=geglu"]) == 2
    assert "unknown mlp 'geglu'" in capsys.readouterr().err


def test_presets_with_small_latent_and_bad_patch(capsys):
    assert main(["presets", "--input-size", "12"]) == 2  # patch 8 does not divide 12
    assert "patch size 8 does not divide the latent size 12" in capsys.readouterr().err


def test_dry_run_plans_the_paper_grid_before_any_data_exists(tmp_path, capsys):
    """The cost of a study is known before ImageNet is sharded: 12 trials, Gflops of Table 4, GPU-hours."""
    assert main(["sweep", "paper_grid", "--dry-run", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if " DiT-" in line]
    assert len(rows) == 12
    xl2 = next(row for row in rows if row[1] == "DiT-XL/2")
    assert xl2[2] == "674,834,720" and xl2[3] == "118.6"
    # train GPU-hours = 6 x MACs x batch x steps / (30% of an H200's 989.5 TFLOP/s), as the table's columns say
    assert float(xl2[-2]) == pytest.approx(6 * 118.62e9 * 256 * 400_000 / (0.3 * 989.5e12) / 3600, rel=1e-3)
    # what each fid.schedule costs in trial slots on the 8-GPU nodes the experiment is written for
    assert "on one 8-GPU node (8 GPU, 96 CPU)" in out and "spare: refused, no trial fits beside 1 CPU, 1 GPU" in out
    assert "*between: 2 at a time" in out and "spare: 1 at a time beside 1 CPU, 1 GPU held for sampling (1 slot" in out
    assert "GPU-hours of training" in out and "latents 4x32x32 (assumed: an SD-style VAE" in out
    assert "1000 classes (assumed: ImageNet's 1000 classes)" in out and "run names are provisional" in out
    assert not (tmp_path / "runs").exists()  # planning writes nothing


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "--help"], capture_output=True, text=True, check=True)
    assert "presets" in out.stdout and "demo" in out.stdout


def test_toy_data_then_prepare_from_the_command_line(ray_session, tmp_path, capsys):
    assert main(["toy-data", str(tmp_path / "toy"), "--classes", "3", "--per-class", "4", "--resolution", "16"]) == 0
    assert "12 images of 3 classes" in capsys.readouterr().out
    args = ["prepare", str(tmp_path / "toy"), str(tmp_path / "shards"), "--set", "codec.kind=pixel", "resolution=16"]
    assert main([*args, "samples_per_shard=5"]) == 0
    out = capsys.readouterr().out
    assert "3/3 shards" in out and "12 images, 0 skipped" in out
    assert main([*args, "samples_per_shard=6"]) == 2  # another configuration in the same folder
    assert "different configuration" in capsys.readouterr().err
    assert main(["prepare", str(tmp_path / "missing"), str(tmp_path / "x"), "--set", "codec.kind=pixel"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main([*args, "codec.kind=png"]) == 2
    assert "unknown codec 'png'" in capsys.readouterr().err
    assert main([*args, "resolutoin=16"]) == 2
    assert "unknown field 'resolutoin'" in capsys.readouterr().err


def test_set_takes_several_overrides_at_once():
    from pipeline.cli import build_parser

    args = build_parser().parse_args(["run", "toy_scaling", "--set", "name=b", "train.seed=1", "--set", "fid.seed=2"])
    assert args.experiment == "toy_scaling" and args.set == ["name=b", "train.seed=1", "fid.seed=2"]


def test_presets_keep_every_value_of_a_repeated_flag(capsys):
    """`--set a --set b` applies both (it kept only b), and `--preset A --preset B` lists both."""
    argv = ["presets", "--preset", "DiT-XL/2", "--preset", "DiT-S/2", "--set", "mlp=swiglu", "--set", "norm=rmsnorm"]
    assert main(argv) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("DiT-")]
    assert [r[0] for r in rows] == ["DiT-S/2", "DiT-XL/2"]  # in the presets' order
    assert all(r[2:4] == ["swiglu", "rmsnorm"] for r in rows)


@pytest.mark.parametrize("command", ["sweep", "fid", "analyze", "run", "status"])
def test_every_study_subcommand_takes_a_workdir(command):
    from pipeline.cli import build_parser

    args = build_parser().parse_args([command, "smoke", "--workdir", "/shared/w", "--set", "train.seed=1"])
    assert args.workdir == "/shared/w" and args.set == ["train.seed=1"]
    assert build_parser().parse_args([command, "smoke"]).workdir is None  # then $DITSCALE_WORKDIR or ./ditscale-work
