"""The experiment config: nested owner configs, files, `--set` overrides, moved paths, validation when built."""

import json
from dataclasses import fields

import pytest

from dit_core.config import DiTConfig, DiTOptions
from dit_core.diffusion import DiffusionConfig
from pipeline.codecs import CodecConfig
from pipeline.config import ConfigError, DataConfig, TrainConfig, flatten
from pipeline.experiment_files import MOVED, apply_overrides, available_experiments, load_experiment, nest
from pipeline.prepare import PrepareConfig
from pipeline.toy import ToyDataConfig


def test_shipped_experiments_load():
    assert {"quickstart", "paper_grid", "smoke", "toy_scaling"} <= set(available_experiments())
    for name in available_experiments():  # each named as its file: runs/<name>, the MLflow experiment <name>
        assert load_experiment(name).name == name


def test_the_experiment_nests_its_owners_configs():
    """Overrides of nested fields rebuild the owners' own configs (not dicts or copies), and each field has one home."""
    overrides = ["model.mlp=swiglu", "diffusion.prediction=v", "data.prepare.codec.space_to_depth=2", "data.toy.seed=3"]
    e = load_experiment("smoke", overrides)
    assert e.model.mlp == "swiglu" and e.diffusion.prediction == "v"
    assert e.data.prepare.codec.space_to_depth == 2 and e.data.toy.seed == 3
    assert type(e.model) is DiTOptions and type(e.diffusion) is DiffusionConfig
    assert type(e.data.prepare) is PrepareConfig and type(e.data.prepare.codec) is CodecConfig
    assert type(e.data.toy) is ToyDataConfig
    # a model option is declared once, in dit_core, and every DiTConfig has it
    assert {f.name for f in fields(DiTOptions)} <= {f.name for f in fields(DiTConfig)}
    assert not {f.name for f in fields(TrainConfig)} & {f.name for f in fields(DiffusionConfig)}


def test_paper_grid_is_the_papers_recipe():
    e = load_experiment("paper_grid")
    t, d = e.train, e.diffusion
    assert (t.global_batch_size, t.lr, t.steps, t.ema_decay, t.weight_decay) == (256, 1e-4, 400_000, 0.9999, 0.0)
    assert (d.prediction, d.learn_sigma, d.loss, d.schedule) == ("eps", True, "hybrid", "linear")
    assert (t.grad_clip, t.lr_schedule, e.model.class_dropout_prob) == (0.0, "constant", 0.1)
    assert e.analysis.reference == "dit-table4"


def test_overrides_follow_the_nesting():
    e = load_experiment(
        "smoke",
        [
            "train.lr=3e-4",
            "grid.presets=[DiT-d2w64/4]",
            "train.adam_betas=[0.9, 0.95]",
            "data.prepare.codec.space_to_depth=2",
            "data.toy.style=simple",
            "model.mlp_ratio=2",
        ],
    )
    assert e.train.lr == 3e-4 and e.grid.presets == ("DiT-d2w64/4",) and e.train.adam_betas == (0.9, 0.95)
    assert e.data.prepare.codec.space_to_depth == 2 and e.data.toy.style == "simple" and e.model.mlp_ratio == 2.0
    assert apply_overrides(e, ["data.val_shards=null"]).data.val_shards is None
    decay = apply_overrides(e, ["train.ema_decay=1"]).train.ema_decay
    assert decay == 1.0 and type(decay) is float  # an int is accepted for a float field, and stored as a float


def test_fields_that_must_change_together_can():
    e = load_experiment("smoke", ["diffusion.learn_sigma=false", "diffusion.loss=mse", "diffusion.prediction=v"])
    assert (e.diffusion.learn_sigma, e.diffusion.loss, e.diffusion.prediction) == (False, "mse", "v")


@pytest.mark.parametrize("old, new", sorted(MOVED.items()))
def test_an_old_path_names_the_new_one(old, new):
    with pytest.raises(ConfigError, match=f"{old} is now {new}"):
        load_experiment("smoke", [f"{old}=1"])


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
        ("data.prepare.codec=pixel", "data.prepare.codec must be a mapping"),
    ],
)
def test_malformed_overrides(override, message):
    with pytest.raises(ConfigError, match=message):
        load_experiment("smoke", [override])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["grid.presets=[DiT-XXL/2]"], "unknown DiT preset 'DiT-XXL/2'"),
        (["grid.presets=[DiT-Ti/4]"], "now called 'd2w64'.*'DiT-d2w64/4'"),
        (["train.global_batch_size=15", "resources.workers_per_trial=2"], "not divisible by resources.workers_per"),
        (["train.milestone_steps=[10, 99]"], r"milestone_steps \[99\] lie outside"),
        (["train.steps=0"], "train.steps must be positive"),
        (["diffusion.prediction=score"], "diffusion: unknown prediction"),
        (["diffusion.learn_sigma=false"], "diffusion: .*hybrid"),
        (["train.precision=fp8"], "train.precision"),
        (["grid.presets=[DiT-d2w64/4, DiT-d2w64/4]"], "twice"),
        (["train.compile_mode=fastest"], "train.compile_mode must be one of default, reduce-overhead"),
        (["model.class_dropout_prob=1.5"], r"model: class_dropout_prob must be in \[0, 1\)"),
        (["data.prepare.codec.kind=jpeg"], "data.prepare.codec: unknown codec 'jpeg'"),
        (["data.toy.num_classes=11"], "data.toy: num_classes must be an integer in 1..10"),
        (["data.prepare.resolution=32"], "data.toy.resolution 16 is below data.prepare.resolution 32"),
        (["fid.labels=some"], "fid.labels"),
        (["fid.classifier_steps=-1"], "classifier_steps"),
        (["fid.guidance_interval=[0.5, 0.2]"], r"fid.guidance_interval must be \[lo, hi\]"),
        (["fid.workers=-1"], "fid.guidance_channels, fid.workers and fid.reference_images must be >= 0"),
        (["name=a/b"], "name 'a/b' must be"),
        (["analysis.reference=table9"], "analysis.reference must be one of"),
    ],
)
def test_invalid_values_are_refused_when_the_experiment_is_built(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_experiment("smoke", overrides)


def test_an_override_inside_a_value_another_sets_is_refused():
    with pytest.raises(ConfigError, match=r"--set: train.lr sets a field inside train, which is set to 5: set one"):
        load_experiment("smoke", ["train=5", "train.lr=1e-3"])
    assert load_experiment("smoke", ["train.lr=1", "train.lr=2"]).train.lr == 2.0  # the last value of a path wins


def test_nest_is_the_inverse_of_flatten():
    settings = {"train.lr": 1e-3, "model.mlp": "swiglu", "data.prepare.codec.kind": "pixel"}
    nested = nest(settings.items(), where="test")
    assert nested == {
        "train": {"lr": 1e-3},
        "model": {"mlp": "swiglu"},
        "data": {"prepare": {"codec": {"kind": "pixel"}}},
    }
    assert flatten(nested) == settings
    assert flatten({"model": {"mlp": "swiglu"}, "train.lr": 1e-3}) == {"model.mlp": "swiglu", "train.lr": 1e-3}


@pytest.mark.parametrize("gpus", ["0.5", "2", "0.25", "-1"])
def test_a_training_worker_takes_no_gpu_or_one(gpus):
    """A fraction would put two DDP ranks on one GPU (NCCL: 'Duplicate GPU detected'); 2 would hold a GPU no rank
    uses. Refused through `--set`, with the fix named."""
    with pytest.raises(ConfigError, match=r"resources.gpus_per_worker must be 1 .* or 0 .*workers_per_trial"):
        load_experiment("smoke", [f"resources.gpus_per_worker={gpus}"])


def test_zero_or_one_gpu_per_worker_is_accepted():
    assert load_experiment("smoke", ["resources.gpus_per_worker=1"]).resources.gpus_per_worker == 1
    assert load_experiment("smoke", ["resources.gpus_per_worker=0"]).resources.gpus_per_worker == 0
    assert load_experiment("paper_grid").resources.gpus_per_worker == 1
    with pytest.raises(ConfigError, match="train.peak_tflops must be >= 0"):
        load_experiment("smoke", ["train.peak_tflops=-1"])


def test_a_section_checks_itself_when_constructed():
    with pytest.raises(ConfigError, match="train.lr_schedule"):
        TrainConfig(lr_schedule="linear")
    with pytest.raises(ConfigError, match="data.toy.resolution"):
        DataConfig(source="toy", toy=ToyDataConfig(resolution=16), prepare=PrepareConfig(resolution=32))
    with pytest.raises(ValueError, match="hybrid"):
        DiffusionConfig(learn_sigma=False)


def test_experiment_files(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(
        "extends: smoke\ntrain:\n  lr: 0.002\n  steps: 40\ngrid:\n  presets: [DiT-d2w64/4]\n"
        "diffusion:\n  prediction: x0\n  learn_sigma: false\n  loss: mse\n"
    )
    e = load_experiment(str(path))
    assert e.name == "smoke" and e.train.lr == 0.002 and e.train.steps == 40 and e.grid.presets == ("DiT-d2w64/4",)
    assert e.diffusion.prediction == "x0"
    (tmp_path / "plain.json").write_text(json.dumps({"name": "plain", "train": {"steps": 7, "milestone_steps": []}}))
    assert load_experiment(str(tmp_path / "plain.json")).train.steps == 7
    (tmp_path / "bad.yaml").write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="cannot parse experiment file"):
        load_experiment(str(tmp_path / "bad.yaml"))
    (tmp_path / "typo.yaml").write_text("trian:\n  lr: 1\n")
    with pytest.raises(ConfigError, match="unknown field 'trian'"):
        load_experiment(str(tmp_path / "typo.yaml"))
    (tmp_path / "old.yaml").write_text("extends: smoke\ntrain:\n  prediction: x0\n")
    with pytest.raises(ConfigError, match="old.yaml: train.prediction is now diffusion.prediction"):
        load_experiment(str(tmp_path / "old.yaml"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_experiment(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="unknown experiment 'nope'"):
        load_experiment("nope")
