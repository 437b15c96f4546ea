"""The ditscale console script."""

import subprocess
import sys

from pipeline.cli import main


def test_presets_lists_every_preset_with_paper_figures(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    xl2 = next(line for line in out.splitlines() if line.startswith("DiT-XL/2"))
    assert "675,129,632" in xl2 and "118.621" in xl2
    assert sum(line.startswith("DiT-") for line in out.splitlines()) == 24


def test_presets_with_small_latent_and_bad_patch(capsys):
    assert main(["presets", "--input-size", "12"]) == 2  # patch 8 does not divide 12
    assert "patch size 8 does not divide the latent size 12" in capsys.readouterr().err


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "--help"], capture_output=True, text=True, check=True)
    assert "presets" in out.stdout and "demo" in out.stdout


def test_toy_data_then_prepare_from_the_command_line(ray_session, tmp_path, capsys):
    assert main(["toy-data", str(tmp_path / "toy"), "--classes", "3", "--per-class", "4", "--resolution", "16"]) == 0
    assert "12 images of 3 classes" in capsys.readouterr().out
    args = ["prepare", str(tmp_path / "toy"), str(tmp_path / "shards"), "--codec", "pixel", "--resolution", "16"]
    assert main([*args, "--samples-per-shard", "5"]) == 0
    out = capsys.readouterr().out
    assert "3/3 shards" in out and "12 images, 0 skipped" in out
    assert main([*args, "--samples-per-shard", "6"]) == 2  # another configuration in the same folder
    assert "different configuration" in capsys.readouterr().err
    assert main(["prepare", str(tmp_path / "missing"), str(tmp_path / "x"), "--codec", "pixel"]) == 2
    assert "does not exist" in capsys.readouterr().err
