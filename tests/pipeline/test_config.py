"""Experiment configuration: loading, overrides, files, validation errors, stable run names."""

import json

import pytest

from pipeline.config import (
    ConfigError,
    apply_overrides,
    available_experiments,
    expand_trials,
    load_experiment,
    validate_against_data,
    validate_experiment,
)

MANIFEST = {
    "latent_shape": [3, 16, 16],
    "num_classes": 4,
    "resolution": 16,
    "total": 200,
    "codec": {"kind": "pixel", "space_to_depth": 1, "latent_channels": 3, "scale_factor": 1.0, "stores_moments": False},
    "source": {"listing_sha256": "abc", "num_files": 200, "root": "x"},
}


def test_shipped_experiments_are_valid():
    assert {"quickstart", "paper_grid", "smoke"} <= set(available_experiments())
    for name in available_experiments():
        validate_experiment(load_experiment(name))


def test_paper_grid_is_the_papers_recipe():
    e = load_experiment("paper_grid")
    t = e.train
    assert (t.global_batch_size, t.lr, t.steps, t.ema_decay, t.weight_decay) == (256, 1e-4, 400_000, 0.9999, 0.0)
    assert (t.prediction, t.learn_sigma, t.loss, t.grad_clip, t.lr_schedule) == ("eps", True, "hybrid", 0.0, "constant")
    paper_manifest = {**MANIFEST, "latent_shape": [4, 32, 32], "num_classes": 1000, "resolution": 256,
                      "codec": {"kind": "vae"}}  # fmt: skip
    trials = expand_trials(e, paper_manifest)
    assert [t.preset for t in trials] == [f"DiT-{s}/{p}" for s in ("S", "B", "L", "XL") for p in (2, 4, 8)]
    assert round(trials[-3].gflops, 2) == 118.62 and trials[-3].params == 674_834_720


def test_toy_scaling_is_a_six_point_study_with_the_x0_objective():
    e = load_experiment("toy_scaling")
    assert (e.train.prediction, e.train.learn_sigma, e.train.loss) == ("x0", False, "mse")
    assert (e.data.toy_style, e.data.toy_classes) == ("simple", 5) and len(e.train.milestone_steps) >= 2
    trials = sorted(expand_trials(e, {**MANIFEST, "num_classes": 5}), key=lambda t: t.gflops)
    assert len(trials) == 6 and len({t.size for t in trials}) == 3 and len({t.patch for t in trials}) == 2
    # size-major order: every preset of a larger size costs more than every preset of a smaller one
    assert [t.preset for t in trials] == [f"DiT-{s}/{p}" for s in ("Femto", "Mini", "Nano") for p in (4, 2)]
    assert trials[-1].gflops / trials[0].gflops > 100


def test_overrides():
    e = load_experiment("smoke", ["train.lr=3e-4", "grid.presets=[DiT-Ti/4]", "train.adam_betas=[0.9, 0.95]"])
    assert e.train.lr == 3e-4 and e.grid.presets == ("DiT-Ti/4",) and e.train.adam_betas == (0.9, 0.95)
    assert apply_overrides(e, ["data.val_shards=null"]).data.val_shards is None
    assert apply_overrides(e, ["train.ema_decay=1"]).train.ema_decay == 1.0  # int accepted for a float field


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lr=abc", "train.lr: expected float"),
        ("train.nope=1", "unknown field 'train.nope'"),
        ("trainlr=1", "unknown field 'trainlr'"),
        ("train.lr", "not of the form section.field=value"),
        ("train.compile=3", "expected true/false"),
        ("fid.compile=auto", "fid.compile: expected true/false"),
        ("train.adam_betas=[1, 2, 3]", "expected 2 values"),
        ("grid=3", "must be a mapping"),
    ],
)
def test_malformed_overrides(override, message):
    with pytest.raises(ConfigError, match=message):
        load_experiment("smoke", [override])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["grid.presets=[DiT-XXL/2]"], "unknown preset 'DiT-XXL/2'"),
        (["train.global_batch_size=15", "resources.workers_per_trial=2"], "not divisible by resources.workers_per"),
        (["train.milestone_steps=[10, 99]"], r"milestone_steps \[99\] lie outside"),
        (["train.steps=0"], "train.steps must be positive"),
        (["train.prediction=score"], "unknown prediction"),
        (["train.learn_sigma=false"], "hybrid"),
        (["train.precision=fp8"], "train.precision"),
        (["grid.presets=[DiT-Ti/4, DiT-Ti/4]"], "twice"),
        (["train.compile_mode=fastest"], "train.compile_mode must be one of default, reduce-overhead"),
    ],
)
def test_invalid_values_fail_before_any_trial(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate_experiment(load_experiment("smoke", overrides))


def test_data_mismatches():
    e = load_experiment("smoke")
    with pytest.raises(ConfigError, match="made with the 'pixel' codec but the experiment expects 'vae'"):
        validate_against_data(load_experiment("smoke", ["data.codec=vae"]), MANIFEST, "shards/x")
    with pytest.raises(ConfigError, match="are at 16 px but the experiment expects 32 px"):
        validate_against_data(load_experiment("smoke", ["data.resolution=32"]), MANIFEST, "shards/x")
    odd = {**MANIFEST, "latent_shape": [3, 12, 12]}
    with pytest.raises(ConfigError, match="patch size 8 does not divide the 12x12 latents"):
        validate_against_data(e, odd, "shards/x")
    with pytest.raises(ConfigError, match="fewer than one global batch"):
        validate_against_data(load_experiment("smoke", ["train.global_batch_size=256"]), MANIFEST, "shards/x")


def test_experiment_files(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("extends: smoke\ntrain:\n  lr: 0.002\n  steps: 40\ngrid:\n  presets: [DiT-Ti/4]\n")
    e = load_experiment(str(path))
    assert e.name == "smoke" and e.train.lr == 0.002 and e.train.steps == 40 and e.grid.presets == ("DiT-Ti/4",)
    (tmp_path / "plain.json").write_text(json.dumps({"name": "plain", "train": {"steps": 7}}))
    assert load_experiment(str(tmp_path / "plain.json")).train.steps == 7
    (tmp_path / "bad.yaml").write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="cannot parse experiment file"):
        load_experiment(str(tmp_path / "bad.yaml"))
    (tmp_path / "typo.yaml").write_text("trian:\n  lr: 1\n")
    with pytest.raises(ConfigError, match="unknown field 'trian'"):
        load_experiment(str(tmp_path / "typo.yaml"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_experiment(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="unknown experiment 'nope'"):
        load_experiment("nope")


def test_run_names_are_stable_and_follow_the_trajectory():
    base = expand_trials(load_experiment("smoke"), MANIFEST)
    again = expand_trials(load_experiment("smoke"), MANIFEST)
    assert [t.run_name for t in base] == [t.run_name for t in again]
    assert len({t.run_name for t in base}) == 4 and base[0].run_name.startswith("Ti_4-")
    longer = expand_trials(load_experiment("smoke", ["train.steps=60", "train.milestone_steps=[60]"]), MANIFEST)
    assert [t.run_name for t in longer] == [t.run_name for t in base]  # more steps continue the same runs
    other_lr = expand_trials(load_experiment("smoke", ["train.lr=0.01"]), MANIFEST)
    assert not {t.run_name for t in other_lr} & {t.run_name for t in base}
