"""Planning: trials and their stable run names, checks against the shards, planning before the shards exist."""

from dataclasses import replace

import pytest

from pipeline.config import ConfigError
from pipeline.experiment_files import load_experiment
from pipeline.manifest import SourceInfo
from pipeline.plan import (
    DataSpec,
    MissingShardsError,
    check_data,
    expand_trials,
    plan_study,
    plan_sweep,
    trial_params,
)
from tests.helpers import pixel_manifest

MANIFEST = pixel_manifest()
DATA = DataSpec.of(MANIFEST)


def test_paper_grid_trials_are_table_4():
    trials = expand_trials(load_experiment("paper_grid"), DataSpec((4, 32, 32), 1000, {"x": 1}))
    assert [t.preset for t in trials] == [f"DiT-{s}/{p}" for s in ("S", "B", "L", "XL") for p in (2, 4, 8)]
    assert round(trials[-3].gflops, 2) == 118.62 and trials[-3].params == 674_834_720


def test_toy_scaling_is_a_six_point_study_with_two_seeds_and_the_x0_objective():
    e = load_experiment("toy_scaling")
    assert (e.diffusion.prediction, e.diffusion.learn_sigma, e.diffusion.loss) == ("x0", False, "mse")
    assert (e.data.toy.style, e.data.toy.num_classes) == ("simple", 5) and len(e.train.milestone_steps) >= 2
    assert e.grid.seeds == (0, 1) and e.train.ema_decays == (0.999,)
    both = expand_trials(e, replace(DATA, num_classes=5))
    assert len(both) == 12 and sorted(t.seed for t in both) == [0] * 6 + [1] * 6
    trials = sorted((t for t in both if t.seed == 0), key=lambda t: t.gflops)
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


def test_seeds_replicate_every_grid_point_under_its_own_name():
    trials = expand_trials(load_experiment("smoke", ["grid.seeds=[0, 3]"]), DATA)
    assert len(trials) == 8 and [t.seed for t in trials] == [0] * 4 + [3] * 4
    assert all(t.replicate and f"-s{t.seed}-" in t.run_name for t in trials)
    assert len({t.run_name for t in trials}) == 8  # the seed is in the hash as well as in the name
    assert all(t.experiment.train.seed == t.seed for t in trials)
    plain = expand_trials(load_experiment("smoke"), DATA)  # without grid.seeds: the names of before
    assert [t.run_name for t in plain] == [t.run_name for t in expand_trials(load_experiment("smoke"), DATA)]
    assert not any(t.replicate or "-s0-" in t.run_name for t in plain)
    params = trial_params(plan_study(load_experiment("smoke", ["grid.seeds=[0, 3]"]), "/nonexistent"), trials[5])
    assert params["seed"] == 3 and params["train.seed"] == 3


@pytest.mark.parametrize(
    "override, message",
    [
        (["grid.seeds=[0, 0]"], "distinct non-negative"),
        (["grid.seeds=[-1]"], "distinct non-negative"),
        (["grid.seeds=[0, 1]", "grid.axes={train.seed: [1, 2]}"], "drop train.seed from grid.axes"),
        (["train.ema_decays=[0.9]"], "other than train.ema_decay"),
        (["train.ema_decays=[1.5]"], "in \\[0, 1\\]"),
    ],
)
def test_bad_seeds_and_ema_decays_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_experiment("smoke", override)


def test_ema_decays_keep_old_names_at_their_default_and_cost_their_scoring(tmp_path):
    from pipeline.dry_run import describe_plan

    base = [t.run_name for t in expand_trials(load_experiment("smoke"), DATA)]
    more = [t.run_name for t in expand_trials(load_experiment("smoke", ["train.ema_decays=[0.99]"]), DATA)]
    assert not set(base) & set(more)  # what the milestones hold changed: new runs
    gpu = ["resources.gpus_per_worker=1", "fid.num_samples=1000"]
    one = describe_plan(plan_study(load_experiment("smoke", gpu), str(tmp_path)))
    two = describe_plan(plan_study(load_experiment("smoke", [*gpu, "train.ema_decays=[0.99]"]), str(tmp_path)))
    fid_hours = [float(line.split()[-1]) for text in (one, two) for line in text.splitlines()[2:3]]
    assert fid_hours[1] == pytest.approx(2 * fid_hours[0], rel=0.01)  # each EMA is sampled at every milestone


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


# ---------------------------------------------------------------------------------------------------------------
# Design axes and variants
# ---------------------------------------------------------------------------------------------------------------

MODERN = [
    "grid.variants={dit2023: {}, modern: {model: {positions: rope, mlp: swiglu, norm: rmsnorm, qk_norm: true}, "
    "diffusion: {objective: flow, prediction: v, learn_sigma: false, loss: mse, timestep_sampling: logit_normal}, "
    "fid: {sampler: heun}}}"
]


def test_runs_from_before_design_axes_keep_their_names():
    """Provisional names (no shards) of two shipped studies, as the code before the block options, seeds and
    several EMAs computed them (commit 952bb17); toy_scaling as it was then (one seed, 2,400 steps, one EMA)."""
    before = ["grid.seeds=[]", "train.steps=2400", "train.milestone_steps=[800, 1600, 2400]", "train.ema_decays=[]",
              "train.ckpt_every_steps=400", "train.val_every_steps=800"]  # fmt: skip
    toy = [t.run_name for t in plan_study(load_experiment("toy_scaling", before), "/nonexistent-workspace").trials]
    assert toy == ["d6w128_2-b6434e2d", "d6w128_4-aa1227bf", "d3w64_2-580ae117", "d3w64_4-4e6dda63",
                   "d1w48_2-d352a330", "d1w48_4-1773f552"]  # fmt: skip
    paper = [t.run_name for t in plan_study(load_experiment("paper_grid"), "/nonexistent-workspace").trials]
    assert paper[:4] == ["S_2-63d2598e", "S_4-044757f5", "S_8-8c83167f", "B_2-c3fb60e1"]


def test_axes_expand_into_every_combination_with_stable_labelled_names():
    axes = ["grid.axes={model.mlp: [gelu, swiglu], train.lr: [0.001, 0.002]}"]
    trials = expand_trials(load_experiment("smoke", axes), DATA)
    assert len(trials) == 4 * 4
    labels = list(dict.fromkeys(t.variant for t in trials))
    assert labels == ["mlp=gelu+lr=0.001", "mlp=gelu+lr=0.002", "mlp=swiglu+lr=0.001", "mlp=swiglu+lr=0.002"]
    for t in trials:
        assert t.run_name.startswith(f"{t.size}_{t.patch}-{t.variant}-")
        assert t.model.mlp == t.settings["model.mlp"] and t.experiment.train.lr == t.settings["train.lr"]
    assert [t.run_name for t in expand_trials(load_experiment("smoke", axes), DATA)] == [t.run_name for t in trials]
    assert len({t.run_name for t in trials}) == 16
    # the gelu / lr=0.001 point is the base experiment with its field set to its own value: the same hash
    base = {t.preset: t.run_name.rsplit("-", 1)[1] for t in expand_trials(load_experiment("smoke"), DATA)}
    same = [t for t in trials if t.variant == "mlp=gelu+lr=0.001"]
    assert {t.preset: t.run_name.rsplit("-", 1)[1] for t in same} == base


def test_variants_set_several_fields_and_reach_the_trial_params():
    from pipeline.layout import Workspace
    from pipeline.plan import SweepPlan, trial_params

    e = load_experiment("smoke", MODERN)
    trials = expand_trials(e, DATA)
    assert [t.variant for t in trials] == ["dit2023"] * 4 + ["modern"] * 4
    modern = trials[-1]
    assert (modern.model.positions, modern.model.mlp, modern.model.norm, modern.model.qk_norm) == (
        "rope", "swiglu", "rmsnorm", True
    )  # fmt: skip
    assert modern.experiment.diffusion.objective == "flow" and modern.experiment.fid.sampler == "heun"
    assert not modern.model.learn_sigma and trials[0].model.learn_sigma
    plan = SweepPlan(e, Workspace("/tmp/x"), "s", None, DATA, tuple(trials), MANIFEST)
    params = trial_params(plan, modern)
    assert params["variant"] == "modern" and params["axis.model.positions"] == "rope"
    assert params["model.mlp"] == "swiglu" and params["diffusion.objective"] == "flow"
    assert params["objective"] == "flow velocity (logit_normal(0, 1))"
    assert trial_params(plan, trials[0])["variant"] == "dit2023"


@pytest.mark.parametrize(
    "override, message",
    [
        ("grid.axes={model.mlpp: [gelu]}", "unknown field 'model.mlpp'"),
        ("grid.axes={model.mlp: [gelu, geglu]}", "unknown mlp 'geglu'"),
        ("grid.axes={diffusion.objective: [ddpm, flow]}", "objective='flow' trains a velocity"),
        ("grid.axes={data.shards: [a, b]}", "'data.shards' cannot vary between trials"),
        ("grid.axes={model.mlp: []}", "needs a non-empty list"),
        ("grid.axes={model.mlp: [gelu, gelu]}", "lists a value twice"),
        ("grid.variants={rope: {model.positions: rope, model.mlp_ratio: 4.0}}", None),
        ("grid.variants={bad name: {}}", "must be letters"),
        ("grid.variants={a: {fid.sampler: heun}, b: {fid.sampler: ddim}}", "cannot sample"),
        ("grid.variants={a: {fid.sampling_steps: 5}, b: {fid.sampling_steps: 6}}", "trains exactly what"),
        ("grid.variants={a: {fid.extractor: x}}", "'fid.extractor' cannot vary between trials"),
    ],
)
def test_bad_axes_and_variants_are_refused_before_any_trial(override, message):
    if message is None:  # fine as a variant: RoPE with head dim 32
        expand_trials(load_experiment("smoke", [override]), DATA)
        return
    with pytest.raises(ConfigError, match=message):
        expand_trials(load_experiment("smoke", [override]), DATA)


def test_dry_run_lists_the_variants(tmp_path):
    from pipeline.dry_run import describe_plan

    text = describe_plan(plan_study(load_experiment("smoke", MODERN), str(tmp_path)))
    assert "variant modern: model.positions=rope, model.mlp=swiglu" in text
    assert "objective flow velocity (logit_normal(0, 1))" in text and "-modern-" in text and "-dit2023-" in text
