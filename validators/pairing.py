"""Pair original and anonymized samples by key, shard by shard.

Validation compares each anonymized image with its original, so both datasets must be read
side by side. The unit of work stays the original shard (as in ``veil run``): a
:class:`ShardPair` names one original shard and the anonymized shards that hold its keys.

How the anonymized shards of an original shard are found:

* **Same shard ids on both sides** (Veil's own output, or any tool that keeps shard names):
  shard ``x`` pairs with shard ``x``; nothing is read in advance.
* **Otherwise** both sides' keys are listed first. Folder trees list keys from file names
  (free); tar and Parquet shards are read once for their keys (the cost of one extra pass,
  paid only when shard names differ). Each original shard then pairs with exactly the
  anonymized shards holding its keys; folder shards are narrowed to the files needed.

Keys on one side only are never dropped silently: an anonymized key with no original is a
``missing_original`` row (an image released without anything to check it against, a gate
failure by default) and an original with no anonymized copy is ``missing_anonymized``.
A Veil output folder (``run.json`` + ``data/`` + ``manifest/``) may be given as the
anonymized side: its quarantined samples are then ``not_released``, not missing.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from veil.pipelines.sources import FolderSource, Shard, Source, open_source
from veil.transforms.stage import QUARANTINED, Sample

#: Rows of the pairing: status of an input key in the validation table.
PAIRED = "paired"
MISSING_ANONYMIZED = "missing_anonymized"
MISSING_ORIGINAL = "missing_original"
NOT_RELEASED = "not_released"


@dataclass(frozen=True)
class ShardPair:
    """One unit of validation work: an original shard and where its anonymized copies are.

    ``original`` is None for anonymized keys that match no original shard. ``keys`` (when
    set) restricts the anonymized shards to those keys: shards listed for several pairs are
    shared, and each pair takes only its own keys.
    """

    id: str
    original: Shard | None
    anonymized: tuple[Shard, ...]
    keys: frozenset[str] | None = None


@dataclass
class VeilOutput:
    """What a ``veil run`` output folder tells the validator about its own release."""

    root: Path
    data: Path
    #: key -> status for every manifest row (anonymized, clean, quarantined).
    statuses: dict[str, str] = field(default_factory=dict)
    #: key -> regions Veil anonymized (JSON list), for the background-fidelity mask.
    regions: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    method: str | None = None
    run_input: str | None = None
    #: How far (fraction of a face box per side) Veil's anonymization may reach beyond a
    #: region's box: the configured expand, the widening of every re-scan round and the
    #: outward feather. Background fidelity is measured outside that.
    mask_expand: float = 0.25
    #: The run's detect configuration (run.json), to tell whether its detections can stand
    #: in for the validator's own on the originals.
    detect: dict[str, Any] = field(default_factory=dict)


def read_veil_output(path: str | Path) -> VeilOutput | None:
    """The run information of a Veil output folder, or None when ``path`` is not one."""
    root = Path(path)
    if not (root / "run.json").is_file() or not (root / "data").is_dir():
        return None
    from veil.pipelines.manifest import read_manifests
    from veil.transforms.anonymize import STRENGTH_EXPAND_STEP

    info = json.loads((root / "run.json").read_text())
    config = info.get("config") or {}
    anonymize = config.get("anonymize") or {}
    rescan = config.get("rescan") or {}
    expand = float((config.get("detect") or {}).get("expand", 0.2))
    expand += STRENGTH_EXPAND_STEP * int(rescan.get("max_rounds", 2) if rescan.get("enabled", True) else 0)
    feather = float(anonymize.get("feather") or 0.0)
    # The feather is a fraction of the expanded box's shorter side; 0.05 more covers the
    # JPEG blocks that straddle the mask's edge.
    out = VeilOutput(root=root, data=root / "data", method=anonymize.get("method"),
                     run_input=config.get("input"),
                     mask_expand=expand + feather * (1 + 2 * expand) + 0.05,
                     detect=dict(config.get("detect") or {}))
    if (root / "manifest").is_dir():
        for row in read_manifests(root).to_pylist():
            out.statuses[row["key"]] = row["status"]
            regions = json.loads(row.get("regions") or "[]")
            if regions:
                out.regions[row["key"]] = regions
    return out


class Pairing:
    """Plans :class:`ShardPair` units for two sources and reads them side by side."""

    def __init__(self, original: Source, anonymized: Source) -> None:
        self.original = original
        self.anonymized = anonymized

    # ---------------------------------------------------------------------------- plan

    def plan(self) -> list[ShardPair]:
        orig = self.original.list_shards()
        anon = self.anonymized.list_shards()
        if not orig:
            raise FileNotFoundError("the original dataset has no shards")
        orig_ids = {s.id for s in orig}
        anon_ids = {s.id for s in anon}
        if orig_ids == anon_ids and not isinstance(self.anonymized, FolderSource):
            by_id = {s.id: s for s in anon}
            return [ShardPair(s.id, s, (by_id[s.id],)) for s in orig]
        return self._plan_by_keys(orig, anon)

    def _plan_by_keys(self, orig: list[Shard], anon: list[Shard]) -> list[ShardPair]:
        anon_index: dict[str, tuple[Shard, list[str]]] = {}  # key -> (shard, its files)
        for shard in anon:
            for key, files in self._keys(self.anonymized, shard):
                anon_index.setdefault(key, (shard, files))
        pairs: list[ShardPair] = []
        seen: set[str] = set()
        for shard in orig:
            keys = [k for k, _ in self._keys(self.original, shard)]
            seen.update(keys)
            needed = [anon_index[k] for k in keys if k in anon_index]
            pairs.append(ShardPair(shard.id, shard, self._narrow(needed), frozenset(keys)))
        extra = [anon_index[k] for k in sorted(anon_index) if k not in seen]
        if extra:
            extra_keys = frozenset(k for k in anon_index if k not in seen)
            pairs.append(ShardPair("#unmatched", None, self._narrow(extra), extra_keys))
        return pairs

    @staticmethod
    def _keys(source: Source, shard: Shard) -> Iterator[tuple[str, list[str]]]:
        """(key, files) of a shard; files are known without reading only for folders."""
        if isinstance(source, FolderSource):
            for key, files in source._groups(shard):
                yield key, [path for _ext, path in files]
            return
        for sample in source.read_shard(shard):
            yield sample["__key__"], []

    @staticmethod
    def _narrow(entries: list[tuple[Shard, list[str]]]) -> tuple[Shard, ...]:
        """The distinct shards of ``entries``; folder shards cut down to the listed files."""
        members: dict[str, list[str]] = defaultdict(list)
        shards: dict[str, Shard] = {}
        for shard, files in entries:
            shards.setdefault(shard.id, shard)
            members[shard.id].extend(files)
        out = []
        for sid, shard in shards.items():
            if shard.kind == "folder" and members[sid]:
                wanted = set(members[sid])
                shard = Shard(id=shard.id, url=shard.url, kind=shard.kind,
                              members=tuple(m for m in shard.members if m in wanted))
            out.append(shard)
        return tuple(out)

    # ---------------------------------------------------------------------------- read

    def read(self, pair: ShardPair) -> Iterator[tuple[str, Sample | None, Sample | None]]:
        """(key, original sample, anonymized sample) for every key of the pair, originals in
        input order first, then anonymized keys without an original (sorted)."""
        anonymized: dict[str, Sample] = {}
        for shard in pair.anonymized:
            for sample in self.anonymized.read_shard(shard):
                key = sample["__key__"]
                if pair.keys is not None and key not in pair.keys:
                    continue
                anonymized.setdefault(key, sample)
        if pair.original is not None:
            for sample in self.original.read_shard(pair.original):
                key = sample["__key__"]
                yield key, sample, anonymized.pop(key, None)
        for key in sorted(anonymized):
            yield key, None, anonymized[key]


def open_pairing(original: str, anonymized: str, *, image_column: str = "image",
                 folder_shard_size: int = 1000, max_member_bytes: int | None = None
                 ) -> tuple[Pairing, VeilOutput | None]:
    """Open both datasets; a Veil output folder on the anonymized side is read through its
    ``data/`` folder and its manifests."""
    veil_out = read_veil_output(anonymized) if "://" not in anonymized else None
    anon_spec = str(veil_out.data) if veil_out is not None else anonymized
    kwargs = {"image_column": image_column, "folder_shard_size": folder_shard_size,
              "max_member_bytes": max_member_bytes}
    return Pairing(open_source(original, **kwargs), open_source(anon_spec, **kwargs)), veil_out


def is_unreadable(sample: Sample | None) -> bool:
    """A sample the source could not read (truncated tar member, missing shard, ...)."""
    return sample is not None and sample.get("status") == QUARANTINED
