"""GPU paths without a GPU: logical GPUs in Ray, a driver that says it has CUDA but may not touch it, the slot
arithmetic of each fid.schedule on the node shapes the GPU experiments are written for, and the fid stage's
streaming statistics with memory that does not grow with the number of real images."""

import json
import subprocess
import sys
import tracemalloc
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.codecs import CodecInfo
from pipeline.config import ConfigError
from pipeline.experiment_files import load_experiment
from pipeline.fid.reference import (
    FeatureSpace,
    Moments,
    extractor_weights,
    real_images,
    reference_statistics,
    statistics,
)
from pipeline.fid.sampling import SamplerPool
from pipeline.images import list_source
from pipeline.layout import Workspace
from pipeline.manifest import Manifest, SourceInfo
from pipeline.slots import GPU_NODE, check_fits, describe_schedules, sampling_reservation, slots_that_fit
from tests.helpers import FAST_FID

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def emulated(smoke_sweep, smoke_workdir, tmp_path_factory):
    """What tests/pipeline/emulated_gpus.py found, in a process with 8 logical GPUs and CUDA forbidden."""
    _, outcomes = smoke_sweep
    checkpoint = Workspace(smoke_workdir).trial("smoke", outcomes[0].trial.run_name).milestones()[30]
    out = tmp_path_factory.mktemp("emulated") / "found.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tests.pipeline.emulated_gpus", smoke_workdir, checkpoint, str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(out.read_text())


def test_the_driver_never_touches_a_gpu(emulated):
    """Scoring a checkpoint with sampling actors on (logical) GPUs: the driver, where torch.cuda.is_available() is
    True and any CUDA initialisation raises, completes; the guard is proven to fire before and after."""
    assert emulated["guard"] == emulated["guard_after"] == "the driver tried to initialise CUDA"
    assert emulated["reserved"] == {"CPU": 2.0, "GPU": 2.0}  # two actors, a GPU each
    assert np.isfinite(emulated["fid"]) and emulated["fid"] > 0
    facts = emulated["facts"]
    # the actors were given GPUs Ray has only logically: they sample where they really are, on the CPU, and say so
    assert facts["fid.device"] == "cpu" and facts["fid.precision"] == "fp32" and facts["fid.compile"] == "false"
    assert facts["fid.decode_dtype"] == "fp32" and facts["fid.train_precision"] == "fp32"


def test_paper_grid_plans_and_places_on_one_8_gpu_node(emulated):
    """paper_grid's defaults on one 8-GPU node: a trial of 8 workers fits (1 at a time), its worker group is placed,
    and after it the actors that score between trials are placed on the GPUs it released; a spare sampling GPU beside
    training is refused, with the fix named."""
    assert emulated["paper_slots"] == 1 and emulated["trial_placed"] and emulated["scoring_placed"]
    assert "fid.schedule=between or after" in emulated["spare"] and "has 7 free" in emulated["spare"]


def test_trial_slots_per_schedule_on_8_gpu_nodes():
    """The slot arithmetic `ditscale run` and `--dry-run` share: on two 8-GPU nodes paper_grid trains 2 trials at a
    time when it scores between trials or after the sweep, 1 with a spare sampling GPU held beside them."""
    paper = load_experiment("paper_grid")
    spare = load_experiment("paper_grid", ["fid.schedule=spare"])
    two = {k: 2 * v for k, v in GPU_NODE.items()}
    assert slots_that_fit(paper, GPU_NODE) == 1 and slots_that_fit(paper, two) == 2
    assert slots_that_fit(spare, two, sampling_reservation(spare, two)) == 1
    with pytest.raises(ConfigError, match="has 7 free beside the 1 CPU, 1 GPU held for FID sampling"):
        check_fits(spare, GPU_NODE, sampling_reservation(spare, GPU_NODE))
    lines = describe_schedules(spare, {"two 8-GPU nodes": two})
    assert "*spare: 1 at a time beside 1 CPU, 1 GPU held for sampling (1 slot(s) fewer)" in lines[0]
    assert "between: 2 at a time" in lines[0] and "after: 2 at a time" in lines[0]
    # the toy studies keep their sampling on CPUs even where GPUs are (their documented numbers are CPU numbers)
    quick = load_experiment("quickstart")
    assert quick.fid.gpus_per_worker == 0 and quick.resources.gpus_per_worker == 0
    assert sampling_reservation(quick, {"CPU": 2.0, "GPU": 8.0}) == {"CPU": 0.5, "GPU": 0.0}


def test_streaming_statistics_equal_the_batch_ones():
    """Moments merged slice by slice (uneven slices, a large common offset) give torch-fidelity's mu and sigma."""
    rng = np.random.default_rng(0)
    feats = (rng.normal(size=(1003, 48)) @ rng.normal(size=(48, 48)) + 1e3).astype(np.float32)
    moments = Moments(48)
    for lo, hi in ((0, 1), (1, 250), (250, 251), (251, 700), (700, 1003)):
        moments.add(feats[lo:hi])
    streamed, batch = moments.statistics(), statistics(feats)
    np.testing.assert_allclose(streamed["mu"], batch["mu"], rtol=1e-12)
    np.testing.assert_allclose(streamed["sigma"], batch["sigma"], rtol=1e-9, atol=1e-9 * np.abs(batch["sigma"]).max())
    with pytest.raises(ValueError, match="at least 2"):
        Moments(4).statistics()


def test_reference_statistics_keep_the_driver_memory_flat(ray_session, tmp_path):
    """The driver's peak allocation (tracemalloc: Python and numpy) while computing reference statistics from 200
    and from 1,600 real 64 px images: the images themselves would be 2.5 and 19.7 MB; the growth stays under a tenth
    of that, and the streamed statistics equal those of all the features at once."""
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for c in range(4):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(400):
            pixels = (rng.random((64, 64, 3)) * 60 + c * 60).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i:04d}.png")
    listing = list_source(str(root))
    source = SourceInfo(str(root), len(listing.files), listing.sha256())
    codec = CodecInfo("pixel", latent_channels=3, scale_factor=1.0, stores_moments=False, space_to_depth=1)
    manifest = Manifest(64, ("0", "1", "2", "3"), source, {}, 1, codec=codec)
    fid = replace(load_experiment("smoke", FAST_FID).fid, slice_size=100, batch_size=100)
    images, labels = real_images(manifest, 200)
    weights = extractor_weights(fid, manifest, str(tmp_path / "work"), (images, labels))  # trained on 200, up front
    space = FeatureSpace(fid.extractor, weights, ("feat",))
    peaks = {}
    with SamplerPool(manifest.codec, fid, workers=2) as pool:
        for count in (200, 1600):
            tracemalloc.start()
            stats, feats = reference_statistics(
                replace(fid, reference_images=count), manifest, str(tmp_path / "work"), space, pool
            )
            peaks[count] = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            assert feats is None  # features are not kept unless KID or PRC need them
        all_feats = reference_statistics(
            replace(fid, reference_images=1600), manifest, str(tmp_path / "other"), space, pool, keep_features=True
        )[1]
    batch = statistics(all_feats)
    np.testing.assert_allclose(stats["mu"], batch["mu"], rtol=1e-9)
    np.testing.assert_allclose(stats["sigma"], batch["sigma"], rtol=1e-6, atol=1e-9)
    image_bytes = 1600 * 64 * 64 * 3
    assert peaks[1600] - peaks[200] < 0.1 * image_bytes, peaks
    assert peaks[1600] < 0.5 * image_bytes, peaks
    assert torch.cuda.is_initialized() is False
