"""Planning: trials and their stable run names, checks against the shards, planning before the shards exist."""

from dataclasses import replace

import pytest

from pipeline.config import ConfigError
from pipeline.experiment_files import load_experiment
from pipeline.manifest import SourceInfo
from pipeline.plan import DataSpec, MissingShardsError, check_data, expand_trials, plan_study, plan_sweep
from tests.helpers import pixel_manifest

MANIFEST = pixel_manifest()
DATA = DataSpec.of(MANIFEST)


def test_paper_grid_trials_are_table_4():
    trials = expand_trials(load_experiment("paper_grid"), DataSpec((4, 32, 32), 1000, {"x": 1}))
    assert [t.preset for t in trials] == [f"DiT-{s}/{p}" for s in ("S", "B", "L", "XL") for p in (2, 4, 8)]
    assert round(trials[-3].gflops, 2) == 118.62 and trials[-3].params == 674_834_720


def test_toy_scaling_is_a_six_point_study_with_the_x0_objective():
    e = load_experiment("toy_scaling")
    assert (e.diffusion.prediction, e.diffusion.learn_sigma, e.diffusion.loss) == ("x0", False, "mse")
    assert (e.data.toy.style, e.data.toy.num_classes) == ("simple", 5) and len(e.train.milestone_steps) >= 2
    trials = sorted(expand_trials(e, replace(DATA, num_classes=5)), key=lambda t: t.gflops)
    assert len(trials) == 6 and len({t.size for t in trials}) == 3 and len({t.patch for t in trials}) == 2
    # size-major order: every preset of a larger size costs more than every preset of a smaller one
    assert [t.preset for t in trials] == [f"DiT-{s}/{p}" for s in ("d1w48", "d3w64", "d6w128") for p in (4, 2)]
    assert trials[-1].gflops / trials[0].gflops > 100
    assert all(not t.model.learn_sigma for t in trials)  # the model's output follows the objective


def test_run_names_are_stable_and_follow_the_trajectory():
    base = expand_trials(load_experiment("smoke"), DATA)
    again = expand_trials(load_experiment("smoke"), DATA)
    assert [t.run_name for t in base] == [t.run_name for t in again]
    assert len({t.run_name for t in base}) == 4 and base[0].run_name.startswith("d2w64_4-")
    longer = expand_trials(load_experiment("smoke", ["train.steps=60", "train.milestone_steps=[60]"]), DATA)
    assert [t.run_name for t in longer] == [t.run_name for t in base]  # more steps continue the same runs
    runtime = ["train.log_every_steps=10", "train.compile=true", "model.grad_checkpointing=true"]
    assert [t.run_name for t in expand_trials(load_experiment("smoke", runtime), DATA)] == [t.run_name for t in base]
    for change in ("train.lr=0.01", "diffusion.schedule=cosine", "model.class_dropout_prob=0.2", "train.seed=1"):
        other = expand_trials(load_experiment("smoke", [change]), DATA)
        assert not {t.run_name for t in other} & {t.run_name for t in base}, change
    changed = DataSpec.of(replace(MANIFEST, source=SourceInfo("x", 200, "another listing")))
    other_data = expand_trials(load_experiment("smoke"), changed)
    assert not {t.run_name for t in other_data} & {t.run_name for t in base}


def test_data_mismatches():
    e = load_experiment("smoke")
    with pytest.raises(ConfigError, match="made with the 'pixel' codec but the experiment expects 'vae'"):
        check_data(load_experiment("smoke", ["data.prepare.codec.kind=vae"]), MANIFEST, "shards/x")
    with pytest.raises(ConfigError, match="are at 16 px but the experiment expects 32 px"):
        check_data(
            load_experiment("smoke", ["data.prepare.resolution=32", "data.toy.resolution=32"]), MANIFEST, "shards/x"
        )
    odd = replace(MANIFEST, latent_shape=(3, 12, 12))
    with pytest.raises(ConfigError, match="patch size 8 does not divide the 12x12 latents"):
        check_data(e, odd, "shards/x")
    with pytest.raises(ConfigError, match="fewer than one global batch"):
        check_data(load_experiment("smoke", ["train.global_batch_size=256"]), MANIFEST, "shards/x")


def test_planning_before_the_shards_exist(tmp_path):
    e = load_experiment("smoke")
    with pytest.raises(MissingShardsError, match="no shards at .* \\(data.shards\\)"):
        plan_sweep(e, str(tmp_path))
    plan = plan_study(e, str(tmp_path))
    assert plan.manifest is None and plan.data.identity is None
    assert plan.data.latent_shape == (3, 16, 16) and plan.data.num_classes == 4  # pixel codec at 16 px, 4 toy classes
    assert "data.toy.num_classes" in plan.data.basis
    assert [t.preset for t in plan.trials] == e.grid.preset_names()
    assert not (tmp_path / "runs").exists()  # planning writes nothing
    folder = tmp_path / "images"
    for name in ("cat", "dog", "eel"):
        (folder / name).mkdir(parents=True)
    plan = plan_study(load_experiment("smoke", [f"data.source={folder}"]), str(tmp_path))
    assert plan.data.num_classes == 3 and "class folders" in plan.data.basis
