"""The fid stage: Frechet distance against independent math, determinism across workers, cached references,
scoring a sweep's milestones into MLflow, and clear errors."""

import json
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from scipy import linalg

from pipeline import tracking
from pipeline.config import ConfigError, FidConfig
from pipeline.experiment_files import load_experiment
from pipeline.fid import reference, sampling, score
from pipeline.fid.classifier import held_out_accuracy, train_classifier
from pipeline.fid.reference import FeatureSpace, extractor_weights, real_images, reference_statistics, statistics
from pipeline.fid.sampling import SamplerPool, SliceSampler, generate, sample_labels, slice_labels
from pipeline.fid.score import frechet_distance, score_checkpoint
from pipeline.fid.study import run_fid
from pipeline.layout import Workspace
from pipeline.manifest import Manifest
from tests.helpers import FAST_FID as FAST


def scipy_fid(a: np.ndarray, b: np.ndarray) -> float:
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_frechet_distance_matches_an_independent_computation():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 16))
    b = rng.normal(size=(400, 16)) @ rng.normal(size=(16, 16)) * 0.3 + 0.5
    ours = frechet_distance(statistics(torch.from_numpy(a)), statistics(torch.from_numpy(b)))
    assert ours == pytest.approx(scipy_fid(a, b), rel=1e-6)
    assert frechet_distance(statistics(torch.from_numpy(a)), statistics(torch.from_numpy(a))) == pytest.approx(
        0, abs=1e-6
    )


def test_known_gaussian_shift_gives_the_analytic_distance():
    d = 8
    shift = np.full(d, 0.5)
    same_cov = frechet_distance({"mu": np.zeros(d), "sigma": np.eye(d)}, {"mu": shift, "sigma": np.eye(d)})
    assert same_cov == pytest.approx(float(shift @ shift), rel=1e-9)  # |d|^2
    scaled = frechet_distance({"mu": np.zeros(d), "sigma": np.eye(d)}, {"mu": shift, "sigma": 4 * np.eye(d)})
    assert scaled == pytest.approx(float(shift @ shift) + d * (1 + 4 - 2 * 2), rel=1e-9)


@pytest.fixture(scope="module")
def fast_smoke(smoke_sweep, smoke_workdir):
    experiment, outcomes = smoke_sweep
    return load_experiment("smoke", FAST), outcomes


def milestone(smoke_workdir, outcome, step):
    return Workspace(smoke_workdir).trial("smoke", outcome.trial.run_name).milestones()[step]


def test_same_samples_whatever_the_number_of_workers(fast_smoke, smoke_workdir):
    experiment, outcomes = fast_smoke
    manifest = Manifest.load(f"{smoke_workdir}/shards/smoke")
    path = milestone(smoke_workdir, outcomes[0], 30)
    fid = replace(experiment.fid, num_samples=120, slice_size=40)
    one = generate(path, manifest.codec, fid, workers=1, progress=False)
    two = generate(path, manifest.codec, fid, workers=2, progress=False)
    assert one.shape == (120, 16, 16, 3) and one.dtype == np.uint8
    np.testing.assert_array_equal(one, two)
    # slice 1 drawn on its own, in this process, is the same as in the pool
    alone = SliceSampler(manifest.codec).sample(path, fid, 1, 40)
    np.testing.assert_array_equal(alone, one[40:80])
    m1, _, _ = score_checkpoint(path, manifest, experiment.fid, smoke_workdir, workers=1, progress=False)
    m2, _, _ = score_checkpoint(path, manifest, experiment.fid, smoke_workdir, workers=2, progress=False)
    assert m1["fid"] == m2["fid"] and m1["fid"] > 0


def test_the_pool_reads_each_checkpoint_once_per_actor(fast_smoke, smoke_workdir):
    experiment, outcomes = fast_smoke
    manifest = Manifest.load(f"{smoke_workdir}/shards/smoke")
    fid = replace(experiment.fid, num_samples=60, slice_size=10)  # 6 slices per checkpoint
    paths = [milestone(smoke_workdir, outcomes[0], 15), milestone(smoke_workdir, outcomes[0], 30)]
    with SamplerPool(manifest.codec, fid, workers=2) as pool:
        first = [generate(p, manifest.codec, fid, progress=False, pool=pool) for p in paths]
        assert sum(pool.loads()) <= 2 * len(paths)  # not once per slice (that would be 12)
        again = generate(paths[0], manifest.codec, fid, progress=False, pool=pool)
    np.testing.assert_array_equal(again, first[0])  # a model reloaded into the same actor gives the same images
    assert not np.array_equal(first[0], first[1])  # the second checkpoint's weights were really loaded


STALL_S = 600  # no slice finished and no actor started for this long: the stage waits on nothing (a slice takes ~1 s)


def test_slices_go_only_to_actors_that_have_started(fast_smoke, smoke_workdir, monkeypatch):
    """With more actors than free CPUs (as when training trials hold the GPUs), the stage finishes on those that
    started instead of waiting on an actor that cannot be placed."""
    experiment, outcomes = fast_smoke
    manifest = Manifest.load(f"{smoke_workdir}/shards/smoke")
    fid = replace(experiment.fid, num_samples=40, slice_size=10)
    path = milestone(smoke_workdir, outcomes[0], 30)

    out, returns = {}, []  # returns: when the stage's ray.wait last came back (a slice done or an actor up)
    wait = ray.wait
    monkeypatch.setattr(ray, "wait", lambda *a, **k: (wait(*a, **k), returns.append(time.monotonic()))[0])
    with SamplerPool(manifest.codec, fid, workers=3) as pool:  # the test session's Ray has 2 CPUs

        def draw():
            out["images"] = generate(path, manifest.codec, fid, progress=False, pool=pool)

        worker = threading.Thread(target=draw, daemon=True)
        started = time.monotonic()
        worker.start()
        while worker.is_alive():  # fails only when nothing progresses: a slice waits on an actor that never starts
            worker.join(5)  # (a stuck ray.wait ignores signals; leaving the pool kills the actors and frees it)
            stalled = time.monotonic() - max(returns, default=started)
            assert stalled < STALL_S, "a slice waited on an actor that never started"
        assert 1 <= len(pool.ready) <= 2  # the third cannot be placed; the second may start after the last slice
    images = out["images"]
    np.testing.assert_array_equal(images, generate(path, manifest.codec, fid, workers=1, progress=False))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_compiled_sampling_matches_eager(fast_smoke, smoke_workdir):
    """fid.compile (the default on a GPU) gives the eager images up to rounding of a few pixel levels."""
    experiment, outcomes = fast_smoke
    manifest = Manifest.load(f"{smoke_workdir}/shards/smoke")
    fid = replace(experiment.fid, sampling_steps=3)
    eager_sampler, compiled_sampler = SliceSampler(manifest.codec), SliceSampler(manifest.codec, compile=True)
    architectures = set()
    for outcome in (outcomes[0], outcomes[-1]):  # two architectures through the same compiled sampler
        path = milestone(smoke_workdir, outcome, 30)
        eager = eager_sampler.sample(path, fid, 0, 16)
        with torch._inductor.config.patch(fallback_random=True):
            compiled = compiled_sampler.sample(path, fid, 0, 16)
        assert compiled_sampler.model._compiled_call_impl is not None
        architectures.add(compiled_sampler.model.config)
        difference = np.abs(compiled.astype(int) - eager.astype(int))
        assert difference.max() <= 2 and difference.mean() < 0.05
    assert len(architectures) == 2


def test_reference_statistics_are_computed_once(fast_smoke, smoke_workdir):
    experiment, _ = fast_smoke
    fid = replace(experiment.fid, reference_images=150)  # a key of its own
    manifest = Manifest.load(f"{smoke_workdir}/shards/smoke")

    space = FeatureSpace(fid.extractor, extractor_weights(fid, manifest, smoke_workdir), ("feat",))
    with SamplerPool(manifest.codec, fid, workers=2) as pool:
        first, feats = reference_statistics(fid, manifest, smoke_workdir, space, pool, keep_features=True)
        assert feats.shape == (150, 128)  # computed now, on the actors
        cache = list(Workspace(smoke_workdir).fid_reference.glob("*.npz"))
        stamps = {p: p.stat().st_mtime_ns for p in cache}
        again, feats = reference_statistics(fid, manifest, smoke_workdir, space, pool, keep_features=True)
    assert feats is None  # from the cache
    np.testing.assert_array_equal(first["mu"], again["mu"])
    assert {p: p.stat().st_mtime_ns for p in cache} == stamps


def images_as_samples(images: np.ndarray):
    """A stand-in for score.sample_features that embeds `images` (on the pool's actors) in place of a checkpoint's
    samples, slice by slice as the stage would."""

    def stand_in(checkpoint, fid, spaces, pool, all_images, progress):
        actor = pool.actors[pool.first_ready()]
        for index, count in sampling.slices(fid):
            chunk = images[index * fid.slice_size : index * fid.slice_size + count]
            yield index, ray.get(actor.embed_images.remote(chunk, tuple(spaces))), {}, chunk

    return stand_in


def test_kid_and_prc_embed_the_real_images_once_per_process(fast_smoke, smoke_workdir, monkeypatch):
    experiment, outcomes = fast_smoke
    fid = replace(experiment.fid, metrics=("fid", "kid", "prc"), reference_images=120)  # a reference key of its own
    manifest = Manifest.load(f"{smoke_workdir}/shards/smoke")
    extractor_weights(fid, manifest, smoke_workdir)  # the classifier extractor, trained beforehand
    passes = []
    original = reference.embed_real_images
    monkeypatch.setattr(reference, "embed_real_images", lambda *a, **k: passes.append(1) or original(*a, **k))
    scores = []
    with SamplerPool(manifest.codec, fid, workers=2) as pool:
        for step in (15, 30):
            path = milestone(smoke_workdir, outcomes[0], step)
            scores.append(score_checkpoint(path, manifest, fid, smoke_workdir, progress=False, pool=pool)[0])
        assert len(passes) == 1  # the statistics and the features of the real images come from one pass
        # the real images standing in for the samples: KID near 0, the real manifold covered (recall 1) and nearly
        # every image inside it (the 80 outside the reference too); the 30-step smoke checkpoints are far from it
        real = real_images(manifest)[0]  # all 200 (more than the 128 feature dimensions), the reference's among them
        monkeypatch.setattr(score, "sample_features", images_as_samples(real))
        ideal = score_checkpoint(path, manifest, replace(fid, num_samples=200), smoke_workdir, False, pool=pool)[0]
    assert len(passes) == 1  # a third checkpoint embeds them no more
    assert ideal["recall"] == 1.0 and ideal["precision"] > 0.9, ideal
    for metrics in scores:
        assert metrics["kid"] > 0 and abs(ideal["kid"]) < 0.01 * metrics["kid"], (ideal, metrics)
        assert metrics["precision"] < ideal["precision"] - 0.3, (ideal, metrics)


def test_scoring_a_sweep_logs_fid_at_the_milestones(fast_smoke, smoke_workdir, mlflow_uri):
    experiment, outcomes = fast_smoke
    scored = run_fid(experiment, smoke_workdir, progress=False)  # (tests/analysis may have scored them already)
    expected = {(o.trial.run_name, step) for o in outcomes for step in (15, 30)}
    assert {(s["run_name"], s["step"]) for s in scored} <= expected
    for o in outcomes:
        history = tracking.metric_history(mlflow_uri, o.mlflow_run_id, "fid")
        assert [s for s, _ in history] == [15, 30] and all(v > 0 for _, v in history)
        run = tracking.client(mlflow_uri).get_run(o.mlflow_run_id)
        assert run.data.tags["fid.extractor"] == "ditscale-classifier" and run.data.tags["fid.num_samples"] == "200"
        artifacts = [a.path for a in tracking.client(mlflow_uri).list_artifacts(o.mlflow_run_id, "samples")]
        assert artifacts == ["samples/samples_step0000015.png", "samples/samples_step0000030.png"]
    assert run_fid(experiment, smoke_workdir, progress=False) == []  # idempotent: nothing new
    other = load_experiment("smoke", [*FAST, "fid.extractor=inception-v3-compat"])
    with pytest.raises(ConfigError, match="scored with ditscale-classifier"):
        run_fid(other, smoke_workdir, progress=False)


@pytest.fixture(scope="module")
def trained(smoke_workdir, ray_session):
    """A tiny DiT trained on the toy shards in-process (eps + learned sigma, label dropout 0.1): its EMA weights after
    10 and 400 steps, {step: path}."""
    from dit_core import DiffusionConfig, DiT, GaussianDiffusion, create_ema, save_checkpoint, update_ema
    from pipeline.data import make_loader

    torch.manual_seed(0)
    model = DiT.from_preset("DiT-d4w128/4", input_size=16, in_channels=3, num_classes=4)
    ema, diffusion = create_ema(model), GaussianDiffusion(DiffusionConfig())
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0)
    batches = iter(make_loader(f"{smoke_workdir}/shards/smoke", 32, num_workers=0))
    config = {"model": asdict(model.config), "diffusion": asdict(diffusion.config)}
    paths = {}
    for step in range(1, 401):
        z, y = next(batches)
        loss = diffusion.training_losses(model, z, torch.randint(0, 1000, (32,)), y)["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        update_ema(ema, model, 0.95)
        if step in (10, 400):
            path = Path(smoke_workdir) / "own" / f"ema-{step}.pt"
            paths[step] = str(save_checkpoint(path, model=ema, step=step, config=config))
    return paths


def test_a_trained_model_scores_better_later(trained, smoke_workdir):
    """The trained DiT's 400-step EMA beats its 10-step EMA."""
    manifest = Manifest.load(f"{smoke_workdir}/shards/smoke")
    fid = load_experiment("smoke", FAST).fid
    early, _, _ = score_checkpoint(trained[10], manifest, fid, smoke_workdir, progress=False)
    late, _, _ = score_checkpoint(trained[400], manifest, fid, smoke_workdir, progress=False)
    assert late["fid"] < early["fid"], (early, late)


def test_guidance_raises_the_class_accuracy_of_a_trained_model(trained, smoke_workdir):
    """fid.cfg_scale through the stage: guided samples of the trained DiT are classified as their label more often
    (measured: 58% unguided, 83% at scale 2), and the run's facts say how they were drawn."""
    manifest = Manifest.load(f"{smoke_workdir}/shards/smoke")
    fid = load_experiment("smoke", FAST).fid
    with SamplerPool(manifest.codec, fid, workers=2) as pool:
        plain, _, _ = score_checkpoint(trained[400], manifest, fid, smoke_workdir, progress=False, pool=pool)
        guided, _, facts = score_checkpoint(
            trained[400], manifest, replace(fid, cfg_scale=2.0), smoke_workdir, progress=False, pool=pool
        )
    assert guided["class_accuracy"] > plain["class_accuracy"] + 0.1, (plain, guided)
    assert facts["fid.cfg_scale"] == "2.0" and facts["fid.evaluations_per_image"] == "20"


def drawn_by_hand(path: str, manifest: Manifest, fid: FidConfig, index: int, count: int) -> np.ndarray:
    """Slice `index` drawn with dit_core alone, as docs/fid.md describes the stage: the checkpoint's EMA DiT, the
    sampler `fid.sampler` respaced to `fid.sampling_steps`, `make_denoiser` with the guidance settings, the slice's
    labels and seed, the dataset's decoder."""
    from dit_core import DDIMSampler, DDPMSampler, DiffusionConfig, DiT, make_denoiser
    from dit_core.checkpoint import load_checkpoint, model_config_from_checkpoint
    from pipeline.codecs import codec_from_info, tensor_to_images

    ckpt = load_checkpoint(path)
    model = DiT(model_config_from_checkpoint(ckpt)).eval()
    model.load_state_dict(ckpt["model"])
    sampler = {"ddpm": DDPMSampler, "ddim": DDIMSampler}[fid.sampler]
    sampler = sampler(DiffusionConfig(**ckpt["config"]["diffusion"]), respacing=str(fid.sampling_steps))
    denoise = make_denoiser(
        model,
        fid.cfg_scale,
        fid.guidance_channels or None,
        fid.guidance_interval or None,
        num_timesteps=sampler.diffusion.config.num_timesteps,
    )
    c = model.config
    g = torch.Generator().manual_seed(fid.seed * 1_000_003 + index)
    y = slice_labels(fid, index, count, c.num_classes)
    noise = torch.randn(count, c.in_channels, c.input_size, c.input_size, generator=g)  # (N, C, H, W)
    with torch.no_grad():
        return tensor_to_images(codec_from_info(manifest.codec).decode(sampler.sample(denoise, noise, y, generator=g)))


def test_the_papers_ddpm_sampler_with_learned_variance(fast_smoke, smoke_workdir):
    """fid.sampler=ddpm (the default, the paper's protocol) on a smoke checkpoint (eps + learned sigma), over 5
    respaced steps: the same images whatever the number of workers, each slice what DDPMSampler gives, ancestral
    noise that makes them differ from DDIM's, and a finite score."""
    experiment, outcomes = fast_smoke
    manifest = Manifest.load(f"{smoke_workdir}/shards/smoke")
    path = milestone(smoke_workdir, outcomes[0], 30)
    assert torch.load(path, weights_only=True)["config"]["diffusion"]["learn_sigma"]
    ddpm = replace(experiment.fid, sampler=FidConfig().sampler, sampling_steps=5, num_samples=150)
    assert ddpm.sampler == "ddpm"
    one = generate(path, manifest.codec, ddpm, workers=1, progress=False)
    two = generate(path, manifest.codec, ddpm, workers=2, progress=False)
    np.testing.assert_array_equal(one, two)
    np.testing.assert_array_equal(one[50:100], drawn_by_hand(path, manifest, ddpm, 1, 50))
    ddim = generate(path, manifest.codec, replace(ddpm, sampler="ddim"), workers=2, progress=False)
    assert not np.array_equal(one, ddim)  # same noise, labels and steps; DDPM adds fresh noise at every step
    metrics, _, facts = score_checkpoint(path, manifest, ddpm, smoke_workdir, progress=False)
    assert np.isfinite(metrics["fid"]) and metrics["fid"] > 0 and facts["fid.sampler"] == "ddpm-5"


def test_guidance_and_its_interval_reach_the_sampler(fast_smoke, smoke_workdir):
    """fid.cfg_scale and fid.guidance_interval through the stage: a guided slice is what make_denoiser gives with
    them; guiding changes the images, and guiding only inside [0.3, 0.7] gives neither the unguided nor the
    always-guided ones."""
    experiment, outcomes = fast_smoke
    manifest = Manifest.load(f"{smoke_workdir}/shards/smoke")
    path = milestone(smoke_workdir, outcomes[-1], 30)
    plain = replace(experiment.fid, num_samples=60, slice_size=30)
    always = replace(plain, cfg_scale=4.0)
    inside = replace(always, guidance_interval=(0.3, 0.7))
    with SamplerPool(manifest.codec, plain, workers=2) as pool:
        images = {f: generate(path, manifest.codec, f, progress=False, pool=pool) for f in (plain, always, inside)}
    for fid in (always, inside):
        np.testing.assert_array_equal(images[fid][30:], drawn_by_hand(path, manifest, fid, 1, 30))
    assert not np.array_equal(images[plain], images[always]) and not np.array_equal(images[plain], images[inside])
    assert not np.array_equal(images[always], images[inside])


@pytest.mark.parametrize("labels", ["balanced", "uniform"])
def test_class_accuracy_judges_each_sample_by_its_own_label(fast_smoke, smoke_workdir, monkeypatch, labels):
    """Stand real images in for the samples, in the order of the labels the sampler conditions on: the classifier
    must find them right about as often as on its held-out images; with every label off by one, rarely."""
    experiment, outcomes = fast_smoke
    manifest = Manifest.load(f"{smoke_workdir}/shards/smoke")
    fid = replace(experiment.fid, labels=labels, num_samples=240, slice_size=70)  # a ragged last slice
    images, real_labels = real_images(manifest)
    wanted = sample_labels(fid, 4)
    assert len(wanted) == 240 and set(wanted) == {0, 1, 2, 3}
    rng = np.random.default_rng(0)
    for shift, check in ((0, lambda acc, ceiling: acc >= ceiling - 0.15), (1, lambda acc, _: acc < 0.4)):
        picks = [rng.choice(np.flatnonzero(real_labels == (label + shift) % 4)) for label in wanted]
        monkeypatch.setattr(score, "sample_features", images_as_samples(images[picks]))
        path = milestone(smoke_workdir, outcomes[0], 30)
        metrics, _, facts = score_checkpoint(path, manifest, fid, smoke_workdir, progress=False)
        ceiling = float(facts["fid.classifier_real_accuracy"])
        assert ceiling == pytest.approx(held_out_accuracy(extractor_weights(fid, manifest, smoke_workdir)), abs=1e-4)
        assert check(metrics["class_accuracy"], ceiling), (shift, metrics["class_accuracy"], ceiling)


def test_a_step_budget_gives_the_same_extractor_on_every_run(smoke_workdir, tmp_path):
    """A time budget trains as many steps as the machine manages; `classifier_steps` makes the extractor (and so
    every FID) reproducible across machines, under a cache key of its own."""

    manifest = Manifest.load(f"{smoke_workdir}/shards/smoke")
    images, labels = real_images(manifest)
    facts = [train_classifier(images, labels, tmp_path / f"c{i}.pt", steps=12) for i in range(2)]
    assert facts[0]["steps"] == facts[1]["steps"] == 12
    a, b = (torch.load(tmp_path / f"c{i}.pt", weights_only=True)["state_dict"] for i in range(2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    fid = FidConfig(extractor="ditscale-classifier", classifier_steps=12)
    path = extractor_weights(fid, manifest, str(tmp_path / "work"), (images, labels))
    assert path.endswith("-n12.pt")
    c = torch.load(path, weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_bad_inputs_give_clear_errors(fast_smoke, smoke_workdir, tmp_path):
    experiment, outcomes = fast_smoke
    manifest = Manifest.load(f"{smoke_workdir}/shards/smoke")
    path = milestone(smoke_workdir, outcomes[0], 30)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        score_checkpoint(str(tmp_path / "nope.pt"), manifest, experiment.fid, smoke_workdir, progress=False)
    other = replace(manifest, latent_shape=(4, 32, 32))
    with pytest.raises(ValueError, match="latents are 4x32x32"):
        score_checkpoint(path, other, experiment.fid, smoke_workdir, progress=False)
    with pytest.raises(ValueError, match="rank-deficient covariance"):
        score_checkpoint(path, manifest, replace(experiment.fid, num_samples=100), smoke_workdir, progress=False)
    np.savez(tmp_path / "ref.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(ValueError, match="2048-d statistics"):
        score_checkpoint(
            path,
            manifest,
            replace(experiment.fid, reference_npz=str(tmp_path / "ref.npz")),
            smoke_workdir,
            progress=False,
        )
    with pytest.raises(ConfigError, match="classifier_steps"):
        FidConfig(classifier_steps=-1, classifier_seconds=0)


def test_a_reference_npz_replaces_the_dataset_statistics(fast_smoke, smoke_workdir, tmp_path):
    """fid.reference_npz (an ADM reference batch: mu, sigma) is what the samples are scored against: the dataset's
    own cached statistics written to one give the cache's FID; with mu moved by d = mu_r - mu_g (as far again from
    the samples' mean) the mean term |mu_g - mu_r|^2 of the FID becomes 4x, the covariance term stays."""
    experiment, outcomes = fast_smoke
    manifest = Manifest.load(f"{smoke_workdir}/shards/smoke")
    path = milestone(smoke_workdir, outcomes[0], 30)
    fid = experiment.fid
    space = FeatureSpace(fid.extractor, extractor_weights(fid, manifest, smoke_workdir), ("feat",))
    with SamplerPool(manifest.codec, fid, workers=2) as pool:
        ref, _ = reference_statistics(fid, manifest, smoke_workdir, space, pool)
        cached, _, _ = score_checkpoint(path, manifest, fid, smoke_workdir, progress=False, pool=pool)
        samples = generate(path, manifest.codec, fid, progress=False, pool=pool)
        feats = ray.get(pool.actors[pool.first_ready()].embed_images.remote(samples, (space,)))[0]["feat"]
        mu_g = statistics(feats)["mu"]
        mean_term = float((mu_g - ref["mu"]) @ (mu_g - ref["mu"]))
        np.savez(tmp_path / "same.npz", mu=ref["mu"], sigma=ref["sigma"])
        np.savez(tmp_path / "shifted.npz", mu=2 * ref["mu"] - mu_g, sigma=ref["sigma"])
        scores = {}
        for name in ("same", "shifted"):
            npz = replace(fid, reference_npz=str(tmp_path / f"{name}.npz"))
            scores[name], _, facts = score_checkpoint(path, manifest, npz, smoke_workdir, progress=False, pool=pool)
            assert facts["fid.reference"] == npz.reference_npz
    assert scores["same"]["fid"] == pytest.approx(cached["fid"], rel=1e-9)
    assert mean_term > 1 and scores["shifted"]["fid"] == pytest.approx(cached["fid"] + 3 * mean_term, rel=1e-6)


def test_cached_statistics_made_for_another_key_are_refused(fast_smoke, smoke_workdir, tmp_path):
    """A cached reference file whose stored key is not the one asked for (another dataset's, copied or renamed into
    place) is refused, with the fix, instead of being used."""
    experiment, _ = fast_smoke
    manifest = Manifest.load(f"{smoke_workdir}/shards/smoke")
    fid, workdir = experiment.fid, str(tmp_path / "work")
    space = FeatureSpace(fid.extractor, extractor_weights(fid, manifest, workdir, real_images(manifest)), ("feat",))
    with SamplerPool(manifest.codec, fid, workers=1) as pool:
        reference_statistics(fid, manifest, workdir, space, pool)
        (cache,) = Workspace(workdir).fid_reference.glob("*.npz")
        with np.load(cache) as npz:
            stats, key = {k: npz[k] for k in ("mu", "sigma")}, json.loads(str(npz["key"]))
        np.savez(cache, **stats, key=json.dumps({**key, "resolution": 32}, sort_keys=True))
        with pytest.raises(
            ValueError, match=r"reference statistics .* were made for .*'resolution': 32.*: delete the file"
        ):
            reference_statistics(fid, manifest, workdir, space, pool)
        cache.write_bytes(b"")  # a torn cache file is computed again, not fatal
        again, _ = reference_statistics(fid, manifest, workdir, space, pool)
    np.testing.assert_allclose(again["mu"], stats["mu"], rtol=1e-12)


# A stand-in for facebookresearch/dinov2 in a pre-filled torch.hub cache: the entry point torch-fidelity calls
# (dinov2_vits14) builds a small ViT with 384-d outputs, as an air-gapped cluster's cache would hold the real one.
TINY_DINOV2_HUBCONF = """
import torch
from torch import nn

dependencies = ["torch"]


class TinyViT(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.patch = nn.Conv2d(3, 32, 28, 28)  # 224 px -> 8 x 8 tokens
        layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0)
        self.blocks = nn.TransformerEncoder(layer, 1)
        self.head = nn.Linear(32, 384)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        return self.head(self.blocks(tokens).mean(1))


def dinov2_vits14(pretrained=True, **kwargs):
    return TinyViT()
"""


def test_fd_dinov2_through_torch_hub_from_a_prefilled_cache(fast_smoke, smoke_workdir, tmp_path, monkeypatch):
    """fid.metrics with fd_dinov2: torch-fidelity's DINOv2 extractor, loaded by torch.hub from $TORCH_HOME/hub, scores
    the same samples as FID, reproducibly; without the cache the error says how to make one, before any sampling."""
    from pipeline.fid.score import fd_dinov2

    experiment, outcomes = fast_smoke
    manifest = Manifest.load(f"{smoke_workdir}/shards/smoke")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    fid = replace(experiment.fid, metrics=("fid", "fd_dinov2"), dinov2="dinov2-vit-s-14", num_samples=400)
    with pytest.raises(ValueError, match="hub cache"):
        score_checkpoint(milestone(smoke_workdir, outcomes[0], 30), manifest, fid, smoke_workdir, progress=False)
    repo = tmp_path / "torch" / "hub" / "facebookresearch_dinov2_main"
    repo.mkdir(parents=True)
    (repo / "hubconf.py").write_text(TINY_DINOV2_HUBCONF)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    workdir = str(tmp_path / "work")  # its own reference cache
    path = milestone(smoke_workdir, outcomes[0], 30)
    with SamplerPool(manifest.codec, fid, workers=1) as pool:  # made after TORCH_HOME is set: its actors see it
        metrics, _, facts = score_checkpoint(path, manifest, fid, workdir, progress=False, pool=pool)
        assert metrics["fd_dinov2"] > 0 and np.isfinite(metrics["fd_dinov2"]) and metrics["fid"] > 0
        assert facts["fid.fd_dinov2_extractor"] == "dinov2-vit-s-14"
        assert list(Path(workdir, "fid", "reference").glob("dinov2-vit-s-14-*.npz"))  # cached beside FID's
        # the same samples give the same distance again (from the cached reference); pure noise is farther
        samples = generate(path, manifest.codec, fid, progress=False, pool=pool)
        assert fd_dinov2(samples, fid, manifest, workdir, pool) == pytest.approx(metrics["fd_dinov2"], rel=1e-6)
        noise = np.random.default_rng(0).integers(0, 256, samples.shape, dtype=np.uint8)
        assert fd_dinov2(noise, fid, manifest, workdir, pool) > metrics["fd_dinov2"]
        with pytest.raises(ValueError, match="rank-deficient"):
            fd_dinov2(samples[:300], fid, manifest, workdir, pool)
