"""prepare: image folder -> latent shards with Ray; exactly-once coverage, resumability, bad inputs, clear errors,
a full disk."""

import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.codecs import CodecConfig, VaeCodec, images_to_tensor
from pipeline.images import list_source, load_image
from pipeline.manifest import Manifest
from pipeline.prepare import PrepareConfig, prepare
from pipeline.toy import ToyDataConfig, write_toy_dataset
from tests import faults
from tests.helpers import save_tiny_vae

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def toy_src(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy") / "src"
    write_toy_dataset(out, ToyDataConfig(num_classes=4, per_class=12, resolution=16), progress=False)
    return out


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    return save_tiny_vae(tmp_path_factory.mktemp("vae") / "tiny-vae")


def read_shards(out: Path) -> dict[str, dict]:
    """All samples of all shards: key -> {member suffix: bytes}."""
    samples: dict[str, dict] = {}
    for tar in sorted(out.glob("train-*.tar")):
        with tarfile.open(tar) as f:
            for member in f.getmembers():
                key, suffix = member.name.split(".", 1)
                samples.setdefault(key, {"__shard__": tar.name})[suffix] = f.extractfile(member).read()
    return samples


def pixel_config(**overrides) -> PrepareConfig:
    defaults = dict(resolution=16, codec=CodecConfig(kind="pixel"), samples_per_shard=10)
    return PrepareConfig(**{**defaults, **overrides})


def test_pixel_prepare_covers_every_input_once_and_mixes_classes(ray_session, toy_src, tmp_path):
    out = tmp_path / "shards"
    manifest = prepare(str(toy_src), str(out), pixel_config(), progress=False)
    listing = list_source(str(toy_src))
    samples = read_shards(out)

    assert manifest.complete and manifest.total == 48 == len(samples) and manifest.skipped == []
    assert sorted(int(k) for k in samples) == list(range(len(listing.files)))  # each input exactly once
    assert manifest.planned_shards == len(manifest.shards) == 5
    assert [s.count for s in manifest.shards] == [10, 10, 10, 9, 9]  # balanced
    for shard in manifest.shards:
        labels = {int(s["cls"]) for s in samples.values() if s["__shard__"] == shard.name}
        assert len(labels) >= 2, f"{shard.name} does not mix classes"
        data = (out / shard.name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == shard.sha256 and len(data) == shard.bytes
    assert list(manifest.class_names) == sorted(p.name for p in toy_src.iterdir() if p.is_dir())
    assert manifest.codec.kind == "pixel" and manifest.latent_shape == (3, 16, 16)

    # Stored latents are the cropped image (and its mirror) in [-1, 1], float16; labels match the folders.
    key = sorted(samples)[0]
    rel, label = listing.files[int(key)]
    latent = np.load(io.BytesIO(samples[key]["latent.npy"]), allow_pickle=False)
    flipped = np.load(io.BytesIO(samples[key]["latent_flip.npy"]), allow_pickle=False)
    crop, _ = load_image((toy_src / rel).read_bytes(), 16, 10**9)
    assert latent.dtype == np.float16 and latent.shape == (3, 16, 16)
    np.testing.assert_allclose(latent, images_to_tensor(crop[None])[0].numpy(), atol=1e-3)
    np.testing.assert_array_equal(flipped, latent[:, :, ::-1])
    assert int(samples[key]["cls"]) == label and json.loads(samples[key]["json"])["source"] == rel


def test_rerun_writes_nothing(ray_session, toy_src, tmp_path):
    out = tmp_path / "shards"
    first = prepare(str(toy_src), str(out), pixel_config(), progress=False)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("train-*.tar")}
    second = prepare(str(toy_src), str(out), pixel_config(num_workers=1), progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("train-*.tar")} == stamps
    assert second.shards == first.shards


def test_partial_and_corrupted_shards_are_redone(ray_session, toy_src, tmp_path):
    out = tmp_path / "shards"
    prepare(str(toy_src), str(out), pixel_config(), progress=False)
    (out / "train-000001.tar").write_bytes(b"half a shard")  # corrupted after the fact
    (out / "train-000003.tar").unlink()  # lost
    (out / ".train-000004.tar.tmp-deadbeef").write_bytes(b"in flight")  # left by a killed run
    (out / ".manifest.json.tmp-cafecafe").write_text('{"format_ver')  # a manifest rewrite killed part-way
    manifest = prepare(str(toy_src), str(out), pixel_config(), progress=False)
    assert manifest.complete and len(read_shards(out)) == 48
    assert not list(out.glob(".*tmp*"))


def test_vae_codec_from_a_local_folder(ray_session, toy_src, tiny_vae, tmp_path):
    out = tmp_path / "vae-shards"
    config = PrepareConfig(resolution=16, codec=CodecConfig(kind="vae", vae=str(tiny_vae)), samples_per_shard=24)
    manifest = prepare(str(toy_src), str(out), config, progress=False)
    assert manifest.codec.kind == "vae" and manifest.codec.vae == str(tiny_vae)
    assert manifest.codec.scale_factor == pytest.approx(0.18215)
    assert manifest.latent_shape == (4, 8, 8) and manifest.stored_shape == (8, 8, 8)
    samples = read_shards(out)
    assert len(samples) == 48
    # The stored moments are the VAE posterior's [mean, logvar] of the crop.
    listing = list_source(str(toy_src))
    key = sorted(samples)[5]
    crop, _ = load_image((toy_src / listing.files[int(key)][0]).read_bytes(), 16, 10**9)
    stored = np.load(io.BytesIO(samples[key]["latent.npy"]), allow_pickle=False)
    codec = VaeCodec(str(tiny_vae))
    with torch.no_grad():
        posterior = codec.vae.encode(images_to_tensor(crop[None])).latent_dist
    expected = torch.cat([posterior.mean, posterior.logvar], dim=1)[0].numpy()
    np.testing.assert_allclose(stored.astype(np.float32), expected, atol=2e-3, rtol=2e-3)


def test_codec_dtype_is_part_of_the_shard_identity(ray_session, toy_src, tiny_vae, tmp_path):
    """Shards record the VAE's precision (and each shard its device); a re-run in another precision is refused, and a
    folder from before the precision was recorded is refused unless told by hand what made it."""
    out = tmp_path / "vae-shards"
    config = PrepareConfig(resolution=16, codec=CodecConfig(kind="vae", vae=str(tiny_vae)), samples_per_shard=24)
    manifest = prepare(str(toy_src), str(out), config, progress=False)
    assert manifest.codec.dtype == "fp32" and manifest.config["codec"]["dtype"] == "fp32"
    assert [s.device for s in manifest.shards] == ["cpu", "cpu"]
    bf16 = replace(config, codec=replace(config.codec, dtype="bf16"))
    with pytest.raises(
        ValueError, match=r"(?s)codec.dtype: existing 'fp32', requested 'bf16'.*use a new output folder"
    ):
        prepare(str(toy_src), str(out), bf16, progress=False)

    raw = json.loads((out / "manifest.json").read_text())
    del raw["config"]["codec"]["dtype"], raw["codec"]["dtype"]  # as written before the precision was recorded
    (out / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"(?s)made before ditscale recorded the VAE's precision.*new output folder"):
        prepare(str(toy_src), str(out), config, progress=False)
    raw["config"]["codec"]["dtype"] = "fp32"  # the user knows they were made on CPUs
    (out / "manifest.json").write_text(json.dumps(raw))
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("train-*.tar")}
    kept = prepare(str(toy_src), str(out), config, progress=False)
    assert kept.shards == manifest.shards and kept.config == config.identity()
    assert kept.codec.dtype is None  # the data identity (run names) of the old folder stays as it was
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("train-*.tar")} == stamps


def test_pixel_shards_from_before_the_codec_dtype_are_kept(ray_session, toy_src, tmp_path):
    """The pixel codec has no precision to be unsure of: an old folder is continued, and fp32 recorded."""
    out = tmp_path / "shards"
    first = prepare(str(toy_src), str(out), pixel_config(), progress=False)
    assert first.codec.dtype is None and "dtype" not in first.codec.to_dict()
    raw = json.loads((out / "manifest.json").read_text())
    del raw["config"]["codec"]["dtype"]
    (out / "manifest.json").write_text(json.dumps(raw))
    again = prepare(str(toy_src), str(out), pixel_config(), progress=False)
    assert again.shards == first.shards and again.config["codec"]["dtype"] == "fp32"
    assert Manifest.load(str(out)).config == pixel_config().identity()


def make_bad_folder(root: Path) -> dict[str, str]:
    """Class folders with every kind of awkward input; returns {relative path: expected outcome}."""
    good, bad = root / "good", root / "odd"
    good.mkdir(parents=True)
    bad.mkdir()
    rgb = (np.random.default_rng(0).random((40, 30, 3)) * 255).astype(np.uint8)
    expected = {}
    Image.fromarray(rgb).save(good / "plain.jpg")
    Image.fromarray(rgb).save(good / "plain.webp")
    Image.fromarray(rgb).save(good / "plain.bmp")
    Image.fromarray(rgb).convert("CMYK").save(good / "cmyk.jpg")
    Image.fromarray(rgb).convert("P").save(good / "palette.png")
    Image.fromarray(np.dstack([rgb, np.full((40, 30), 128, np.uint8)])).save(good / "alpha.png")
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(good / "gray16.png")
    Image.fromarray(rgb[..., 0]).convert("LA").save(good / "gray_alpha.png")
    Image.fromarray(rgb).save(good / "UPPER.JPEG")
    expected.update({f"good/{p.name}": "ok" for p in good.iterdir()})
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "text.jpg").write_text("this is not an image")
    full = io.BytesIO()
    Image.fromarray(rgb).save(full, format="JPEG")
    (bad / "truncated.jpg").write_bytes(full.getvalue()[: len(full.getvalue()) // 2])
    Image.fromarray(np.zeros((400, 400, 3), np.uint8)).save(bad / "huge.png")  # over the test's pixel limit
    (bad / "notes.txt").write_text("ignored: not an image extension")
    expected.update(
        {
            "odd/empty.jpg": "empty",
            "odd/text.jpg": "unreadable",
            "odd/truncated.jpg": "unreadable",
            "odd/huge.png": "too large",
        }
    )
    return expected


def test_bad_inputs_are_converted_or_skipped_never_fatal(ray_session, tmp_path):
    expected = make_bad_folder(tmp_path / "src")
    manifest = prepare(str(tmp_path / "src"), str(tmp_path / "out"), pixel_config(max_image_pixels=100_000), False)
    skipped = {s.path: s.reason for s in manifest.skipped}
    kept = {json.loads(s["json"])["source"] for s in read_shards(tmp_path / "out").values()}
    for path, outcome in expected.items():
        if outcome == "ok":
            assert path in kept, f"{path} should have been converted"
        else:
            assert outcome in skipped[path], f"{path}: {skipped.get(path)}"
    assert manifest.total == len(kept) == 9 and len(skipped) == 4
    assert "odd/notes.txt" not in skipped and "odd/notes.txt" not in kept


def test_errors_before_any_work(ray_session, toy_src, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare(str(tmp_path / "nowhere"), str(tmp_path / "o1"), pixel_config(), False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class subfolders"):
        prepare(str(tmp_path / "empty"), str(tmp_path / "o2"), pixel_config(), False)
    (tmp_path / "noimages" / "cls").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images"):
        prepare(str(tmp_path / "noimages"), str(tmp_path / "o3"), pixel_config(), False)
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ValueError, match="cannot write to the output folder"):
        prepare(str(toy_src), str(tmp_path / "a-file" / "out"), pixel_config(), False)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "thesis.pdf").write_text("precious")
    with pytest.raises(ValueError, match="not empty and has no manifest.json"):
        prepare(str(toy_src), str(tmp_path / "foreign"), pixel_config(), False)
    assert (tmp_path / "foreign" / "thesis.pdf").read_text() == "precious"
    prepare(str(toy_src), str(tmp_path / "made"), pixel_config(), False)
    with pytest.raises(ValueError, match="resolution: existing 16, requested 32"):
        prepare(str(toy_src), str(tmp_path / "made"), pixel_config(resolution=32), False)
    with pytest.raises(ValueError, match="unknown codec"):
        CodecConfig(kind="jpeg")  # refused when the config is made, before prepare could start


def test_killed_run_resumes_without_duplicates(ray_session, toy_src, tiny_vae, tmp_path):
    """SIGKILL a prepare process (and its local Ray) after its first shard; the re-run completes the set."""
    out = tmp_path / "shards"
    script = (
        "from pipeline.ray_utils import start_local_ray\n"
        "start_local_ray(num_cpus=1, include_dashboard=False, log_to_driver=False)\n"
        "from pipeline.codecs import CodecConfig\n"
        "from pipeline.prepare import PrepareConfig, prepare\n"
        f"prepare({str(toy_src)!r}, {str(out)!r}, PrepareConfig(resolution=16, samples_per_shard=2, num_workers=1,"
        f" codec=CodecConfig(kind='vae', vae={str(tiny_vae)!r})), progress=False)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=ROOT,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # generous: under a load of 20 the child's own Ray start alone has taken over two minutes (2026-12-02); the loop
    # ends as soon as the first shard lands, so a quiet machine waits seconds
    deadline = time.time() + 900
    shards_at_kill = 0
    while time.time() < deadline and proc.poll() is None:
        manifest = out / "manifest.json"
        if manifest.exists():
            shards_at_kill = len(json.loads(manifest.read_text())["shards"])
            if shards_at_kill >= 1:
                break
        time.sleep(0.02)
    exited = proc.poll()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert exited is None, f"the prepare process ended by itself (exit code {exited}) before it could be killed"
    assert 1 <= shards_at_kill < 24, f"the run should have been killed mid-way (shards then: {shards_at_kill})"
    config = PrepareConfig(resolution=16, samples_per_shard=2, codec=CodecConfig(kind="vae", vae=str(tiny_vae)))
    manifest = prepare(str(toy_src), str(out), config, progress=False)
    samples = read_shards(out)
    assert manifest.complete and manifest.total == 48
    assert sorted(int(k) for k in samples) == list(range(48))
    assert not list(out.glob(".*tmp*"))


def test_a_full_disk_stops_prepare_with_a_clear_error_and_the_rerun_completes(ray_session, toy_src, tmp_path):
    """`ditscale prepare` into a folder that runs out of space part-way (a real ENOSPC: 160 KiB of tmpfs for six
    60 KiB shards; where namespaces are not allowed, a real EFBIG: each file capped at 40 KiB). The Ray actor's error
    stops the stage (no skipping): `ditscale prepare: error: ...` names the problem, the file and the fix, exit code 2,
    no traceback. The finished shards are kept and verify against the manifest, no temporary is left, and running the
    same command with room again keeps them and builds the rest."""
    out = tmp_path / "shards"
    out.mkdir()
    args = ["prepare", str(toy_src), str(out), "--set", "codec.kind=pixel", "resolution=16", "samples_per_shard=8"]
    code = f"""
import sys
from tests.faults import init_ray
init_ray(num_cpus=1)  # one encoding actor: shards are written one after another
from pipeline.cli import main
sys.exit(main({args!r}))
"""
    limit = 160 * 1024 if faults.space_limit_method() == "namespace" else 40 * 1024
    run = faults.run_with_space_limit(code, out, limit, timeout_s=900)
    print(f"fault method: {run.method}")
    assert run.returncode == 2, run.output[-4000:]
    assert "Traceback" not in run.output and "RayTaskError" not in run.output, run.output[-4000:]
    # Usually the shard being written fills the disk; the driver's manifest rewrite may race it to the last page.
    error = re.search(
        rf"ditscale prepare: error: {run.reason} while writing (shard train-\d{{6}}\.tar to {out}|{out}/manifest\.json)"
        r": .* and run the same command again; finished shards kept: (\d+) of 6\n",
        run.output,
    )
    assert error, run.output[-4000:]
    kept = int(error[2])
    assert not list(out.glob(".*tmp*")), sorted(p.name for p in out.iterdir())  # half-written shards removed
    manifest = Manifest.read(str(out))
    listed = manifest.shards if manifest else ()
    assert len(listed) == kept and (kept >= 1 or run.method == "rlimit") and kept < 6
    assert manifest is None or (not manifest.complete and manifest.skipped == [])  # disk full is not a bad input
    for shard in listed:
        data = (out / shard.name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == shard.sha256 and len(data) == shard.bytes
    stamps = {s.name: (out / s.name).stat().st_mtime_ns for s in listed}

    rebuilt = prepare(str(toy_src), str(out), pixel_config(samples_per_shard=8), progress=False)
    assert rebuilt.complete and rebuilt.total == 48 and len(rebuilt.shards) == 6
    assert sorted(int(k) for k in read_shards(out)) == list(range(48))  # every input exactly once
    for shard in rebuilt.shards:
        data = (out / shard.name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == shard.sha256 and len(data) == shard.bytes
    assert {name: (out / name).stat().st_mtime_ns for name in stamps} == stamps  # the finished ones were kept
    assert not list(out.glob(".*tmp*"))
