"""The shard manifest: one dataclass, one loader that checks the format version and the fields; a write refused by a
full disk leaves the previous manifest whole."""

import json
from dataclasses import replace

import pytest

from pipeline.codecs import CodecInfo
from pipeline.manifest import FORMAT_VERSION, Manifest, ManifestError, SkippedInput
from tests import faults
from tests.helpers import pixel_manifest

MANIFEST = pixel_manifest()


def test_save_and_load_round_trip(tmp_path):
    entry = replace(MANIFEST.shards[0], skipped=(SkippedInput("odd/a.jpg", "empty file"),))
    manifest = replace(MANIFEST, shards=(entry,))
    manifest.save(str(tmp_path))
    assert Manifest.load(str(tmp_path)) == manifest
    raw = json.loads((tmp_path / "manifest.json").read_text())
    assert raw["format_version"] == FORMAT_VERSION and raw["total"] == 200 and raw["num_classes"] == 4
    assert raw["skipped"] == [{"path": "odd/a.jpg", "reason": "empty file"}]
    assert raw["codec"] == {
        "kind": "pixel",
        "latent_channels": 3,
        "scale_factor": 1.0,
        "stores_moments": False,
        "space_to_depth": 1,
    }


def test_codec_precision_and_encoding_device_round_trip(tmp_path):
    """A VAE manifest records the precision it encoded in and each shard's device; one from before has neither."""
    codec = CodecInfo("vae", 4, 0.18215, True, vae="some/vae", downsample=8, dtype="bf16")
    manifest = replace(MANIFEST, codec=codec, shards=(replace(MANIFEST.shards[0], device="cuda"),))
    manifest.save(str(tmp_path))
    assert Manifest.load(str(tmp_path)) == manifest
    raw = json.loads((tmp_path / "manifest.json").read_text())
    assert raw["codec"]["dtype"] == "bf16" and raw["shards"][0]["device"] == "cuda"
    del raw["codec"]["dtype"], raw["shards"][0]["device"]  # as written before they were recorded
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    old = Manifest.load(str(tmp_path))
    assert old.codec.dtype is None and old.shards[0].device is None


def test_with_shard_keeps_the_shards_in_order_and_replaces_a_redone_one():
    first = MANIFEST.shards[0]
    grown = replace(MANIFEST, shards=()).with_shard(replace(first, index=2, name="c")).with_shard(first)
    assert [s.index for s in grown.shards] == [0, 2]
    redone = grown.with_shard(replace(first, count=7))
    assert [s.count for s in redone.shards] == [7, 200] and redone.total == 207


def test_bad_manifests_are_refused_with_what_to_do(tmp_path):
    assert Manifest.read(str(tmp_path)) is None
    with pytest.raises(FileNotFoundError, match="ditscale prepare"):
        Manifest.load(str(tmp_path))
    raw = MANIFEST.to_json()
    (tmp_path / "manifest.json").write_text(json.dumps({**raw, "format_version": 99}))
    with pytest.raises(ManifestError, match="format version 99; this ditscale reads version 1"):
        Manifest.load(str(tmp_path))
    (tmp_path / "manifest.json").write_text(json.dumps({k: v for k, v in raw.items() if k != "source"}))
    with pytest.raises(ManifestError, match="malformed .*source.* re-run `ditscale prepare`"):
        Manifest.load(str(tmp_path))
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        Manifest.read(str(tmp_path))
    replace(MANIFEST, complete=False).save(str(tmp_path))
    with pytest.raises(ManifestError, match=r"incomplete \(1/1\): re-run the same `ditscale prepare`"):
        Manifest.load(str(tmp_path))


@pytest.mark.parametrize("method", ["namespace", "rlimit"])
def test_a_full_disk_leaves_the_previous_manifest_whole(method, tmp_path):
    """Rewriting manifest.json on a file system that refuses the write part-way (ENOSPC on a 64 KiB tmpfs, or EFBIG
    past a 64 KiB RLIMIT_FSIZE): an OutOfSpaceError (a ValueError, for the CLI) names the file and the fix, the
    temporary is removed, and the previous manifest is still there, byte for byte."""
    if method == "namespace" and not faults.namespace_available():
        pytest.skip("unprivileged user namespaces are not allowed here (the rlimit case covers this machine)")
    folder = tmp_path / "shards"
    folder.mkdir()
    MANIFEST.save(str(folder))
    before = (folder / "manifest.json").read_bytes()
    # 400 shards with 20 skipped inputs each: about 400 KB of JSON.
    code = f"""
import sys
from dataclasses import replace
from pipeline.codecs import CodecInfo
from pipeline.manifest import SkippedInput
from tests.helpers import pixel_manifest
manifest = pixel_manifest()
skipped = tuple(SkippedInput(f"odd/{{k:04d}}.jpg", "cannot read file: truncated") for k in range(20))
shards = tuple(replace(manifest.shards[0], index=i, name=f"train-{{i:06d}}.tar", skipped=skipped) for i in range(400))
try:
    replace(manifest, shards=shards).save({str(folder)!r})
except Exception as exc:
    print(f"{{type(exc).__name__}} ValueError={{isinstance(exc, ValueError)}}: {{exc}}")
    sys.exit(3)
"""
    run = faults.run_with_space_limit(code, folder, 64 * 1024, timeout_s=900, method=method)
    print(f"fault method: {run.method}")
    assert run.returncode == 3, run.output[-3000:]
    assert f"OutOfSpaceError ValueError=True: {run.reason} while writing {folder}/manifest.json: " in run.output
    assert "run the same command again" in run.output
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json"]  # no temporary left
    assert (folder / "manifest.json").read_bytes() == before and Manifest.load(str(folder)) == MANIFEST
