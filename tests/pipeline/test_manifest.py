"""The shard manifest: one dataclass, one loader that checks the format version and the fields."""

import json
from dataclasses import replace

import pytest

from pipeline.manifest import FORMAT_VERSION, Manifest, ManifestError, SkippedInput
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
