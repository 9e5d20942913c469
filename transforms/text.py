"""The ``text`` class: personal data written in images (signs, boards, badges, screens).

Text is read with the shared OCR pass (:mod:`veil.transforms.ocr`) and judged by the Presidio
analyzer (:mod:`veil.transforms.textpii`). ``pii.text_scope`` says what is personal data:

* ``"pii"``: only the characters of PII entities (names, e-mail addresses, phone numbers,
  IBANs...). The lines are grouped into rows (the OCR detector splits widely spaced text such
  as an IBAN's groups into several lines; a row joins them with spaces). All rows of an image
  are analysed as one text, a row per line, so the NER model sees context ("Contact:" above a
  name), and each row is also analysed alone (what precedes a row can change how a pattern or
  the NER reads it). Each entity becomes one region per OCR line it spans:
  the part of the line under its characters, found by interpolating along the line's
  quadrilateral, widened to whole words and by one average character width plus a fifth of
  the line height on every side, because glyph widths vary and no character edge may survive.
  "Tel:" beside a number stays readable; the number does not.
* ``"all"``: every line read, whole.

Regions carry the box, the score, the detector and the entity type, never the text read.
:meth:`TextDetector.residual` reads the released pixels again and reports what is still
personal data anywhere in the image.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from veil.transforms.ocr import (
    DEFAULT_MAX_SIDE,
    DEFAULT_PRESCAN,
    DEFAULT_PRESCAN_PEAK,
    DEFAULT_PRESCAN_PRECISION,
    OCREngine,
    TextLine,
    shared_read,
)
from veil.transforms.regions import RegionDetector
from veil.transforms.stage import Resources, Sample
from veil.transforms.textpii import (
    DEFAULT_ENTITIES,
    DEFAULT_SPACY_MODEL,
    Entity,
    PIIAnalyzer,
    merge_spans,
    words_of,
)

TEXT_SCOPES = ("pii", "all")
DETECTOR_NAME = "rapidocr+presidio"
#: Margin around an entity's characters: average character widths along the line, and
#: fractions of the line height across it.
CHAR_MARGIN = 1.0
HEIGHT_MARGIN = 0.2


def _clip(box: Sequence[float], width: int, height: int) -> list[float] | None:
    x0, y0 = max(float(box[0]), 0.0), max(float(box[1]), 0.0)
    x1, y1 = min(float(box[2]), float(width)), min(float(box[3]), float(height))
    if x1 <= x0 or y1 <= y0:
        return None
    return [x0, y0, x1, y1]


def line_box(line: TextLine, width: int, height: int, *, margin: float = HEIGHT_MARGIN) -> list[float] | None:
    """A whole line's box, grown by ``margin`` line heights, clipped to the image."""
    m = margin * line.height
    x0, y0, x1, y1 = line.box
    return _clip((x0 - m, y0 - m, x1 + m, y1 + m), width, height)


def span_box(line: TextLine, start: int, end: int, width: int, height: int) -> list[float] | None:
    """The box over characters ``[start, end)`` of ``line``: the span widened to whole words,
    located by linear interpolation along the line's quad, then grown by ``CHAR_MARGIN``
    average character widths along the line and ``HEIGHT_MARGIN`` line heights all round."""
    text = line.text
    n = len(text)
    if n == 0 or end <= start:
        return None
    for ws, we in words_of(text):
        if ws < end and we > start:
            start, end = min(start, ws), max(end, we)
    f0 = max((start - CHAR_MARGIN) / n, 0.0)
    f1 = min((end + CHAR_MARGIN) / n, 1.0)
    q = line.quad
    top0, top1 = q[0] + f0 * (q[1] - q[0]), q[0] + f1 * (q[1] - q[0])
    bot0, bot1 = q[3] + f0 * (q[2] - q[3]), q[3] + f1 * (q[2] - q[3])
    pts = np.stack([top0, top1, bot1, bot0])
    m = HEIGHT_MARGIN * line.height
    return _clip((pts[:, 0].min() - m, pts[:, 1].min() - m, pts[:, 0].max() + m, pts[:, 1].max() + m), width, height)


#: A row of text with fewer letters and digits than this names no one on its own: its entities
#: are dropped. OCR reads such scraps out of textures and blurred faces ("PO", which spaCy
#: tags as a place, in a released blur on the speed benchmark); "Mr Li" is one row of four.
MIN_ROW_CHARS = 3


class TextDetector(RegionDetector):
    """Finds personal data in text read from images (see the module docstring).

    ``scope``: ``"pii"`` (entities only) or ``"all"`` (every line). ``entities``,
    ``score_threshold``, ``language``: the Presidio analyzer's settings. ``ocr_max_side``,
    ``ocr_min_score``, ``ocr_prescan``: the OCR engine's. ``models``: keyword arguments of the model registry.
    """

    pii_class = "text"
    kind = "text"
    # One OCR pass is one core's work (onnxruntime runs on one thread).
    resources = Resources(cpus=1.0)

    def __init__(self, scope: str = "pii", *, entities: Sequence[str] = DEFAULT_ENTITIES,
                 score_threshold: float = 0.35, language: str = "en", ocr_max_side: int = DEFAULT_MAX_SIDE,
                 ocr_min_score: float = 0.5, ocr_prescan: float = DEFAULT_PRESCAN,
                 ocr_prescan_precision: str = DEFAULT_PRESCAN_PRECISION,
                 ocr_prescan_peak: float = DEFAULT_PRESCAN_PEAK,
                 spacy_model: str = DEFAULT_SPACY_MODEL, models: dict[str, Any] | None = None) -> None:
        if scope not in TEXT_SCOPES:
            raise ValueError(f"text scope must be one of {', '.join(TEXT_SCOPES)}, got {scope!r}")
        self.scope = scope
        self.engine = OCREngine(max_side=ocr_max_side, min_score=ocr_min_score, prescan=ocr_prescan,
                                prescan_precision=ocr_prescan_precision, prescan_peak=ocr_prescan_peak,
                                registry_kwargs=models)
        self.analyzer = PIIAnalyzer(entities, score_threshold=score_threshold, language=language,
                                    spacy_model=spacy_model)

    def setup(self) -> None:
        # The analyzer (spaCy and Presidio: ~10 s of imports) loads on the first text read, so
        # a worker that never meets text never pays for it; a run checks before any work that
        # its spaCy pipeline is installed (``spacy_pipeline_provenance``), and a load that
        # fails later stops the run (``AnalyzerUnavailableError``), never a sample.
        self.engine.setup()

    def detect(self, rgb: np.ndarray, sample: Sample) -> list[dict[str, Any]]:
        return self.find(shared_read(sample, rgb, self.engine), rgb.shape[1], rgb.shape[0])

    def residual(self, rgb: np.ndarray, sample: Sample, regions: list[dict[str, Any]]) -> list[dict[str, Any]]:
        # Whatever was anonymized before, text still read in the released pixels is exposed.
        return self.find(shared_read(sample, rgb, self.engine), rgb.shape[1], rgb.shape[0])

    def find(self, lines: list[TextLine], width: int, height: int) -> list[dict[str, Any]]:
        """Regions for ``lines`` read in a ``width`` x ``height`` image."""
        if self.scope == "all":
            out = []
            for line in lines:
                box = line_box(line, width, height)
                if box is not None:
                    out.append({"kind": self.kind, "box": box, "score": line.score, "detector": DETECTOR_NAME})
            return out
        out = []
        for i, entities in enumerate(self.line_entities(lines)):
            for e in entities:
                box = span_box(lines[i], e.start, e.end, width, height)
                if box is not None:
                    out.append({"kind": self.kind, "box": box, "score": e.score, "detector": DETECTOR_NAME,
                                "entity": e.type})
        return out

    def line_entities(self, lines: list[TextLine]) -> list[list[Entity]]:
        """Per line, its PII entity spans (line-local offsets, overlaps merged): the union of
        what the analyzer finds in the whole image's text (NER context) and in each row alone.
        Lines on one row are joined with a space: the detector splits widely spaced text
        ("IBAN GB82  WEST  1234") into several lines, and a pattern must see it whole."""
        if not lines:
            return []
        rows = text_rows(lines)
        starts = [0] * len(lines)
        row_texts = []
        offset = 0
        for row in rows:
            row_start = offset
            for i in row:
                starts[i] = offset
                offset += len(lines[i].text) + 1  # the separator: " " inside a row, "\n" after it
            row_texts.append((row, row_start, " ".join(lines[i].text for i in row)))
        found: list[list[Entity]] = [[] for _ in lines]

        def spread(entities: list[Entity], row: list[int], base: int) -> None:
            for e in entities:
                for i in row:
                    s = max(e.start + base - starts[i], 0)
                    t = min(e.end + base - starts[i], len(lines[i].text))
                    if s < t:
                        found[i].append(Entity(e.type, s, t, e.score))

        short = [sum(ch.isalnum() for ch in text) < MIN_ROW_CHARS for _, _, text in row_texts]
        if all(short):
            # Every row's entities are dropped below: the analyzer has nothing to say, and a
            # worker that only meets marks read out of textures ("X", "***") never loads it.
            return [[] for _ in lines]
        every = [i for row in rows for i in row]
        spread(self.analyzer.analyze("\n".join(text for _, _, text in row_texts)), every, 0)
        if len(rows) > 1:
            for (row, row_start, text), too_short in zip(row_texts, short, strict=True):
                if not too_short:
                    spread(self.analyzer.analyze(text), row, row_start)
        for (row, _start, _text), too_short in zip(row_texts, short, strict=True):
            if too_short:
                for i in row:
                    found[i] = []
        return [merge_spans(f) for f in found]


def text_rows(lines: list[TextLine]) -> list[list[int]]:
    """Indices of ``lines`` grouped into rows of text, top to bottom, each left to right: a
    line joins a row when it overlaps the row's last line vertically by half the smaller
    height and starts within three line heights after it."""
    rows: list[list[int]] = []
    for i in sorted(range(len(lines)), key=lambda i: lines[i].box[0]):
        x0, y0, _, y1 = lines[i].box
        placed = False
        for row in rows:
            last = lines[row[-1]]
            overlap = min(y1, last.box[3]) - max(y0, last.box[1])
            if (overlap >= 0.5 * min(y1 - y0, last.box[3] - last.box[1])
                    and -0.5 * last.height <= x0 - last.box[2] <= 3.0 * last.height):
                row.append(i)
                placed = True
                break
        if not placed:
            rows.append([i])
    return sorted(rows, key=lambda row: (lines[row[0]].box[1] + lines[row[0]].box[3]) / 2)

__all__ = ["DETECTOR_NAME", "TEXT_SCOPES", "TextDetector", "line_box", "span_box", "text_rows"]
