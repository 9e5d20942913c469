"""Personal data in a sample's text fields: the ``metadata`` PII class.

Captions, JSON sidecars and Parquet columns travel with the image into the release copy, and
they name people, hold e-mail addresses and phone numbers as often as the pixels show faces.
This stage finds them with the shared :class:`~veil.transforms.textpii.PIIAnalyzer` and, under
the ``redact`` policy, replaces each entity span with ``<ENTITY_TYPE>`` (overlapping spans
merged, as ``PIIAnalyzer.redact`` does); under ``keep`` it only counts. It never touches the
image (its EXIF is the image writer's business).

Where text lives (see ``veil.pipelines.sources``):

* **WebDataset tars and folders** keep every member/sidecar as bytes under its extension
  (``txt``, ``caption``, ``json``, ``left.txt`` ...; the format is the last extension). Fields
  in :data:`TEXT_FORMATS` claim to be UTF-8 text and ``json`` fields claim to be JSON: every
  string *value* in it is scanned, recursively; keys and structure stay (keys are still checked
  by the residual scan). Any other field except the image is scanned when it decodes as UTF-8
  and holds no control characters (:func:`looks_textual`); a binary field (``npy``, ``pth``)
  cannot be read for names and passes through unscanned.
* **Parquet** rows are ``sample["__row__"]`` (column -> value): string columns are scanned, so
  are strings nested in lists and structs (struct field names are schema, not data) and bytes
  values that look textual. The image column's struct keeps its ``path`` string: scanned too.

Fail closed: a field that claims to be text but is not UTF-8, a ``json`` field that does not
parse, a field named in ``fields`` that is binary, or an analyzer error quarantines the sample
(``metadata_error: ...``). After redaction the written strings, and JSON keys, are analysed
again: an entity found then (outside the ``<TYPE>`` placeholders written) quarantines the
sample (``residual_metadata: ...``). Strings the first pass left unchanged had no entity and
the analyzer is deterministic, so only changed strings are analysed again.

Reasons and counts name entity types and field names, never what was found.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from veil.transforms.stage import (
    ModelStage,
    Resources,
    Sample,
    SampleStage,
    WorkerSetupError,
    quarantine,
)
from veil.transforms.textpii import (
    DEFAULT_ENTITIES,
    DEFAULT_SPACY_MODEL,
    Entity,
    PIIAnalyzer,
    merge_spans,
    replace_spans,
)

#: Field formats (last extension, lower case) that claim to be UTF-8 text.
TEXT_FORMATS: frozenset[str] = frozenset({
    "txt", "text", "caption", "cls", "md", "csv", "tsv", "xml", "html", "htm", "yaml", "yml",
    "url", "id",
})
#: Field formats that claim to be JSON (scanned value by value, written back as JSON).
JSON_FORMATS: frozenset[str] = frozenset({"json"})
POLICIES = ("redact", "keep")
#: The placeholder written for an entity, and the pattern that finds it again.
PLACEHOLDER = "<{type}>"
_PLACEHOLDER = re.compile(r"<[A-Z][A-Z0-9_]*>")
#: Control characters allowed in text (whitespace); any other marks a field as binary.
_WHITESPACE = frozenset("\t\n\r\f\v")


class MetadataError(ValueError):
    """A field that claims to be text cannot be read as such (the sample is quarantined)."""


def field_format(name: str) -> str:
    """``"left.txt"`` -> ``"txt"`` (WebDataset decodes a field by its last extension)."""
    return name.rsplit(".", 1)[-1].lower()


def looks_textual(text: str) -> bool:
    """True when decoded ``text`` holds no control characters other than whitespace."""
    return not any((ch < " " and ch not in _WHITESPACE) or ch == "\x7f" for ch in text)


def _shown(name: str) -> str:
    """A field name as it may appear in a reason (names in the data are untrusted)."""
    return ascii(name)[:82]


class _Pairs(list):
    """A JSON object as its ``(key, value)`` pairs, so order and repeated keys survive."""


def _dump_json(value: Any) -> str:
    if isinstance(value, _Pairs):
        return "{" + ", ".join(f"{json.dumps(k, ensure_ascii=False)}: {_dump_json(v)}"
                               for k, v in value) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_dump_json(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)


def _decode(name: str, raw: Any, *, claims_text: bool) -> str | None:
    """``raw`` bytes as text, None when the field is binary and may pass unscanned."""
    data = bytes(raw)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        if claims_text:
            raise MetadataError(f"field {_shown(name)} is not UTF-8 text (bad byte at offset "
                                f"{exc.start})") from None
        return None
    if not looks_textual(text):
        if claims_text:
            raise MetadataError(f"field {_shown(name)} holds control characters, not text")
        return None
    return text


class MetadataStage(ModelStage, SampleStage):
    """Finds, counts and (``policy="redact"``) redacts PII in a sample's text fields.

    ``entities``, ``score_threshold``, ``language``: the analyzer's (see ``PIIAnalyzer``).
    ``fields``: the field names (tar/folder) or column names (Parquet) to scan, each required
    to be text; None scans every text field. Writes ``sample["redactions"]`` (entity type ->
    count, added to any counts already there).
    """

    name = "metadata"
    resources = Resources(cpus=0.5)
    stateful = True

    def __init__(self, policy: str = "redact", entities: Sequence[str] = DEFAULT_ENTITIES, *,
                 score_threshold: float = 0.35, language: str = "en",
                 spacy_model: str = DEFAULT_SPACY_MODEL,
                 fields: list[str] | None = None, batch_size: int = 16) -> None:
        if policy not in POLICIES:
            raise ValueError(f"metadata policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        if fields is not None and not fields:
            raise ValueError("fields must name at least one field, or be None for every text field")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.policy = policy
        self.fields = None if fields is None else tuple(fields)
        self.batch_size = batch_size
        # Cheap and picklable (its engine loads in setup); building it here validates the
        # entity list and threshold when the run is configured, not on the first worker.
        self.analyzer = PIIAnalyzer(entities, score_threshold=score_threshold, language=language,
                                    spacy_model=spacy_model)

    @classmethod
    def from_config(cls, pii: Any, *, policy: str | None = None, batch_size: int = 16) -> MetadataStage:
        """The stage for a run's ``pii`` configuration (``PIIConfig``); ``policy`` overrides its
        metadata policy (validation always checks as for ``redact``)."""
        return cls(policy=policy or pii.method_of("metadata"), entities=list(pii.entities),
                   score_threshold=pii.score_threshold, language=pii.language,
                   spacy_model=pii.spacy_model, fields=list(pii.metadata_fields) or None,
                   batch_size=batch_size)

    def setup(self) -> None:
        # The analyzer loads on the first text to analyse (``PIIAnalyzer.analyze``): samples
        # without text fields never pay its ~10 s of imports. A load that fails stops the run
        # (``AnalyzerUnavailableError`` is re-raised by ``SampleStage``), never a sample.
        self._ready = True

    def process_batch(self, batch: list[Sample]) -> list[Sample]:
        self.setup()  # an analyzer that cannot load is a configuration error, not bad data
        return SampleStage.process_batch(self, batch)

    # ------------------------------------------------------------------ per sample

    def process_sample(self, sample: Sample) -> Sample:
        counts: Counter[str] = Counter()
        changed: list[tuple[str, str]] = []  # (field, written string) to check again
        keys: dict[str, list[str]] = {}      # field -> its JSON keys, to check
        updates: dict[str, Any] = {}
        row = sample.get("__row__")

        def scan(field: str) -> Callable[[str], str]:
            def one(text: str) -> str:
                new, found = self._scan(text)
                counts.update(found)
                if new != text:
                    changed.append((field, new))
                return new
            return one

        try:
            for name in self._tar_fields(sample):
                updates[name] = self._field(name, sample[name], scan(name), keys)
            if isinstance(row, dict):
                new_row = dict(row)
                for column, value in row.items():
                    if self.fields is None or column in self.fields:
                        new_row[column] = self._value(column, value, scan(column),
                                                      required=self.fields is not None)
                updates["__row__"] = new_row
        except MetadataError as exc:
            return quarantine(sample, f"metadata_error: {exc}")
        except WorkerSetupError:
            raise
        except Exception as exc:  # noqa: BLE001 - the analyzer failing is data for this sample
            return quarantine(sample, f"metadata_error: analyzer failed ({type(exc).__name__})")

        if self.policy == "redact":
            left = self._residual(changed, keys)
            if left:
                n = sum(sum(c.values()) for c in left.values())
                types = sorted({t for c in left.values() for t in c})
                return quarantine(sample, f"residual_metadata: {n} entities ({', '.join(types)}) "
                                          f"left in {', '.join(_shown(f) for f in left)}")
            sample.update(updates)
        merged = Counter(sample.get("redactions") or {})
        merged.update(counts)
        sample["redactions"] = dict(merged)
        return sample

    def _tar_fields(self, sample: Sample) -> list[str]:
        """The data fields (besides the image) this stage reads, in input order."""
        image = sample.get("__image__")
        names = [str(f) for f in sample.get("__fields__") or () if f != image]
        if self.fields is not None:
            names = [f for f in names if f in self.fields]
        return [f for f in names if isinstance(sample.get(f), bytes | bytearray | memoryview)]

    def _field(self, name: str, raw: Any, scan: Callable[[str], str],
               keys: dict[str, list[str]]) -> Any:
        """A tar/folder field with its text scanned, as bytes (unchanged bytes when nothing
        changed, so a field is rewritten only when it was redacted)."""
        fmt = field_format(name)
        required = self.fields is not None or fmt in TEXT_FORMATS or fmt in JSON_FORMATS
        text = _decode(name, raw, claims_text=required)
        if text is None:
            return raw
        if fmt in JSON_FORMATS:
            bom = "\ufeff" if text.startswith("\ufeff") else ""
            try:
                doc = json.loads(text[len(bom):], object_pairs_hook=_Pairs)
            except json.JSONDecodeError as exc:
                raise MetadataError(f"field {_shown(name)} is not valid JSON ({exc.msg} at line "
                                    f"{exc.lineno} column {exc.colno})") from None
            redacted = []

            def scan_value(text: str) -> str:
                new = scan(text)
                redacted.append(new != text)
                return new

            new_doc = _walk(doc, scan_value, keys.setdefault(name, []).append)
            return (bom + _dump_json(new_doc)).encode("utf-8") if any(redacted) else raw
        new = scan(text)
        return raw if new == text else new.encode("utf-8")

    def _value(self, column: str, value: Any, scan: Callable[[str], str], *, required: bool) -> Any:
        """A Parquet value with its strings scanned, in its own type."""
        if isinstance(value, str):
            return scan(value)
        if isinstance(value, bytes | bytearray | memoryview):
            text = _decode(column, value, claims_text=required)
            if text is None:
                return value
            new = scan(text)
            return value if new == text else new.encode("utf-8")
        if isinstance(value, list | tuple):
            return type(value)(self._value(column, v, scan, required=False) for v in value)
        if isinstance(value, dict):
            return {k: self._value(column, v, scan, required=False) for k, v in value.items()}
        return value

    def residual_entities(self, sample: Sample) -> Counter[str]:
        """Entity counts (never values) still in a *released* sample's text fields, with the
        ``<TYPE>`` placeholders of a redaction not counted: what validation gates on. A field
        that claims to be text but cannot be read raises :class:`MetadataError`."""
        self.setup()
        counts: Counter[str] = Counter()

        def count(text: str) -> str:
            counts.update(e.type for e in self._left(text))
            return text

        keys: dict[str, list[str]] = {}
        for name in self._tar_fields(sample):
            self._field(name, sample[name], count, keys)
        row = sample.get("__row__")
        if isinstance(row, dict):
            for column, value in row.items():
                if self.fields is None or column in self.fields:
                    self._value(column, value, count, required=self.fields is not None)
        for names in keys.values():
            if names:
                count("\n".join(names))
        return counts

    def _scan(self, text: str) -> tuple[str, Counter[str]]:
        """``text`` with each entity span replaced by its placeholder (``redact``) or as it is
        (``keep``), and the count of (merged) entity spans per type."""
        merged = merge_spans(self.analyzer.analyze(text))
        counts: Counter[str] = Counter(e.type for e in merged)
        if self.policy != "redact" or not merged:
            return text, counts
        return replace_spans(text, merged, PLACEHOLDER), counts

    def _left(self, text: str) -> list[Entity]:
        """Entities in written text, less those inside a redaction's ``<TYPE>`` placeholder."""
        placeholders = [m.span() for m in _PLACEHOLDER.finditer(text)]
        return [e for e in merge_spans(self.analyzer.analyze(text))
                if not any(s <= e.start and e.end <= t for s, t in placeholders)]

    def _residual(self, changed: list[tuple[str, str]],
                  keys: dict[str, list[str]]) -> dict[str, Counter[str]]:
        """Field -> entity counts still found in what would be written. A JSON
        field's keys are analysed together, one per line (one analyzer call per field)."""
        left: dict[str, Counter[str]] = {}
        key_texts = [(field, "\n".join(ks)) for field, ks in keys.items() if ks]
        for field, text in [*changed, *key_texts]:
            found = self._left(text)
            if found:
                left.setdefault(field, Counter()).update(e.type for e in found)
        return left


def _walk(value: Any, scan: Callable[[str], str], on_key: Callable[[str], None]) -> Any:
    """A parsed JSON value with every string value passed through ``scan``; keys are kept
    and reported to ``on_key``."""
    if isinstance(value, _Pairs):
        out = _Pairs()
        for k, v in value:
            on_key(k)
            out.append((k, _walk(v, scan, on_key)))
        return out
    if isinstance(value, list):
        return [_walk(v, scan, on_key) for v in value]
    if isinstance(value, str):
        return scan(value)
    return value


__all__ = ["JSON_FORMATS", "MetadataError", "MetadataStage", "POLICIES", "TEXT_FORMATS",
           "looks_textual"]
