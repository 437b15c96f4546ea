"""The shard manifest: what a shard folder holds, as one frozen dataclass with one loader and one writer.

    <shards>/manifest.json   format version, codec (with the VAE's precision), resolution, latent shape, class
                             names, per-shard sample counts, sha256 and encoding device, total, skipped inputs with
                             reasons, the prepare config that produced it

The prepare stage writes it (atomically, after every shard: a write that fails, on a full disk too, leaves the
previous manifest whole and raises an error that says what to do); the training reader, the planner and the fid stage
read it with `Manifest.load`, which checks the format version and the fields, so no stage reads the JSON by string
keys. An unknown format version is refused with what to do.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from typing import Any

from pipeline.codecs import CodecInfo
from pipeline.storage import read_json, write_json

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"


class ManifestError(ValueError):
    """A manifest that cannot be used; the message says what to do."""


@dataclass(frozen=True)
class SkippedInput:
    path: str  # relative to the source folder
    reason: str


@dataclass(frozen=True)
class ShardEntry:
    """One finished shard."""

    index: int
    name: str  # train-000000.tar
    count: int  # samples in the shard
    sha256: str
    bytes: int
    skipped: tuple[SkippedInput, ...] = ()  # inputs of this shard that could not be used
    seconds: float = 0.0  # time it took to write
    device: str | None = None  # where the codec ran: "cuda" or "cpu" (None: written before this was recorded)


@dataclass(frozen=True)
class SourceInfo:
    """The image folder the shards were made from."""

    root: str
    num_files: int
    listing_sha256: str  # of the sorted (path, label) listing: changes when the folder does


@dataclass(frozen=True)
class Manifest:
    resolution: int  # image side of the ADM crop, in pixels
    class_names: tuple[str, ...]  # index = label
    source: SourceInfo
    config: dict[str, Any]  # the identity fields of the PrepareConfig that made the shards
    planned_shards: int
    shards: tuple[ShardEntry, ...] = ()  # finished shards, by index
    complete: bool = False  # every planned shard is written
    codec: CodecInfo | None = None  # known once the first encoder has started
    latent_shape: tuple[int, int, int] | None = None  # (C, h, w) the DiT sees
    stored_shape: tuple[int, int, int] | None = None  # (C', h, w) stored per sample (2C for posterior moments)
    format_version: int = FORMAT_VERSION

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def total(self) -> int:
        """Samples in the finished shards."""
        return sum(s.count for s in self.shards)

    @property
    def skipped(self) -> list[SkippedInput]:
        return [item for s in self.shards for item in s.skipped]

    def identity(self) -> dict[str, Any]:
        """What of the data shapes a training run (hashed into run names): the listing, the codec, the crop."""
        return {
            "listing_sha256": self.source.listing_sha256,
            "codec": self.codec.to_dict() if self.codec else None,
            "resolution": self.resolution,
        }

    def with_shard(self, entry: ShardEntry) -> Manifest:
        """This manifest with `entry` added (or replacing the entry of the same index)."""
        kept = [s for s in self.shards if s.index != entry.index]
        return replace(self, shards=tuple(sorted([*kept, entry], key=lambda s: s.index)))

    # --- JSON -------------------------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        d = {
            "format_version": self.format_version,
            "complete": self.complete,
            "resolution": self.resolution,
            "class_names": list(self.class_names),
            "num_classes": self.num_classes,
            "source": asdict(self.source),
            "planned_shards": self.planned_shards,
            "shards": [{**asdict(s), "skipped": [asdict(k) for k in s.skipped]} for s in self.shards],
            "total": self.total,
            "skipped": [asdict(k) for k in self.skipped],
            "config": self.config,
        }
        if self.codec is not None:
            d.update(
                codec=self.codec.to_dict(), latent_shape=list(self.latent_shape), stored_shape=list(self.stored_shape)
            )
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any], where: str) -> Manifest:
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise ManifestError(
                f"{where} has format version {version!r}; this ditscale reads version {FORMAT_VERSION}: "
                f"re-run `ditscale prepare` into a new folder, or use the ditscale release that wrote it"
            )
        try:
            shards = tuple(
                ShardEntry(
                    s["index"],
                    s["name"],
                    s["count"],
                    s["sha256"],
                    s["bytes"],
                    tuple(SkippedInput(k["path"], k["reason"]) for k in s.get("skipped", ())),
                    s.get("seconds", 0.0),
                    s.get("device"),
                )
                for s in d["shards"]
            )
            manifest = cls(
                resolution=int(d["resolution"]),
                class_names=tuple(d["class_names"]),
                source=SourceInfo(d["source"]["root"], int(d["source"]["num_files"]), d["source"]["listing_sha256"]),
                config=d["config"],
                planned_shards=int(d["planned_shards"]),
                shards=shards,
                complete=bool(d["complete"]),
                codec=CodecInfo.from_dict(d["codec"]) if d.get("codec") else None,
                latent_shape=tuple(d["latent_shape"]) if d.get("latent_shape") else None,
                stored_shape=tuple(d["stored_shape"]) if d.get("stored_shape") else None,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(
                f"{where} is malformed ({type(exc).__name__}: {exc}); delete it and re-run "
                f"`ditscale prepare` to rebuild the shards"
            ) from None
        if manifest.complete and manifest.codec is None:
            raise ManifestError(f"{where} says it is complete but records no codec: re-run `ditscale prepare`")
        return manifest

    # --- files ------------------------------------------------------------------------------------------------------
    @classmethod
    def read(cls, root: str) -> Manifest | None:
        """The manifest of shard folder `root`, or None if it has none (complete or not)."""
        path = f"{root.rstrip('/')}/{MANIFEST_FILE}"
        try:
            raw = read_json(path)
        except json.JSONDecodeError as exc:
            raise ManifestError(f"{path} is not valid JSON ({exc}); delete it to rebuild the shards") from exc
        return None if raw is None else cls.from_json(raw, path)

    @classmethod
    def load(cls, root: str) -> Manifest:
        """The manifest of a finished prepare run, or a clear error (FileNotFoundError if there is none)."""
        manifest = cls.read(root)
        if manifest is None:
            raise FileNotFoundError(f"no {MANIFEST_FILE} in {root}: run `ditscale prepare SRC {root}` first")
        if not manifest.complete:
            raise ManifestError(
                f"shards in {root} are incomplete ({len(manifest.shards)}/{manifest.planned_shards}): re-run the "
                f"same `ditscale prepare`"
            )
        return manifest

    def save(self, root: str) -> None:
        """Replace manifest.json whole (a temporary file, then a rename); OutOfSpaceError if the disk is full."""
        write_json(f"{root.rstrip('/')}/{MANIFEST_FILE}", self.to_json(), indent=1)
