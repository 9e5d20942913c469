"""Cost and quality of the image PII classes besides faces: text (OCR + Presidio), plates
(OCR + Haar cascades) and, when present, persons (HOG).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_pii.py --images 20

Data: the deterministic 640x480 scenes of ``tests/pii_images.py`` (seeds from 1000, away from
the tests'): signs with personal data (a name, e-mail, phone number or IBAN after a label such
as "Tel:"), cars with plates (half at the usual size, half with characters 9-14 px high),
shop signs without personal data ("SALE 50% OFF", "OPEN 9-5") and scenes without text.

What it prints (markdown):

* **cost**: CPU milliseconds per image (``time.process_time``; onnxruntime runs on one
  thread) of the shared OCR pass, the analyzer (scope "pii", given the OCR lines), the plate
  check (plate-like lines and the cascades with their crop reads, given the lines) and the
  persons detector.
* **recall**: planted PII strings whose glyph box the text regions cover, and those no longer
  read by OCR once the regions are filled; plates covered and no longer read.
* **false positives**: share of the pixels of non-personal text (shop signs, and labels such
  as "Tel:" beside a number) destroyed in scope "pii"; images without personal data or
  without text that get any text or plate region.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from pii_images import benign_scene, blank_scene, fill_boxes, plate_scene, sign_scene, union_covers  # noqa: E402

SEED0 = 1000


def _norm(text: str) -> str:
    return re.sub(r"[^0-9a-z@]", "", text.lower())


def _cpu_ms(fn, *args):
    t = time.process_time()
    out = fn(*args)
    return out, (time.process_time() - t) * 1000.0


def _mask(boxes: list[list[float]], height: int, width: int) -> np.ndarray:
    m = np.zeros((height, width), bool)
    for x0, y0, x1, y1 in boxes:
        m[max(int(y0), 0):int(np.ceil(y1)), max(int(x0), 0):int(np.ceil(x1))] = True
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=20, help="images per scene kind")
    args = ap.parse_args()

    from veil.transforms.plates import PlateDetector
    from veil.transforms.text import TextDetector

    text = TextDetector(scope="pii")
    plates = PlateDetector()
    setup_ms = {}
    _, setup_ms["text"] = _cpu_ms(text.setup)
    _, setup_ms["plates"] = _cpu_ms(plates.setup)
    try:
        from veil.transforms.persons import PersonDetector

        persons = PersonDetector()
        persons.setup()
    except ImportError:
        persons = None

    n = args.images
    scenes = (
        [("signs", *sign_scene(SEED0 + i)) for i in range(n)]
        + [("plates", *plate_scene(SEED0 + i, scale=None if i % 2 == 0 else 0.35 + 0.15 * ((i // 2) % 2)))
           for i in range(n)]
        + [("benign", *benign_scene(SEED0 + i)) for i in range(n)]
        + [("blank", *blank_scene(SEED0 + i)) for i in range(n)]
    )
    cost: dict[str, list[float]] = {"ocr": [], "analyzer": [], "plates": [], "persons": []}
    pii_total = pii_covered = pii_gone = 0
    plate_total = plate_covered = plate_gone = 0
    benign_px = benign_hit_px = 0
    flagged = {"benign": 0, "blank": 0, "signs_plate": 0, "plates_text": 0}
    for kind, rgb, truth in scenes:
        lines, ms = _cpu_ms(text.engine.read, rgb)
        cost["ocr"].append(ms)
        text_regions, ms = _cpu_ms(text.find, lines, rgb.shape[1], rgb.shape[0])
        cost["analyzer"].append(ms)
        plate_regions, ms = _cpu_ms(plates.find, rgb, lines)
        cost["plates"].append(ms)
        if persons is not None:
            _, ms = _cpu_ms(persons.detect, rgb, {})
            cost["persons"].append(ms)
        text_boxes = [r["box"] for r in text_regions]
        plate_boxes = [r["box"] for r in plate_regions]
        if kind in ("signs", "plates"):
            released = fill_boxes(rgb, text_boxes + plate_boxes)
            after = _norm(" ".join(line.text for line in text.engine.read(released)))
        for t in truth:
            if t["class"] == "text":
                pii_total += 1
                pii_covered += union_covers(text_boxes, t["box"])
                pii_gone += _norm(t["text"]) not in after
            elif t["class"] == "plate":
                plate_total += 1
                plate_covered += union_covers(plate_boxes, t["box"])
                groups = [g for g in t["text"].split() if len(g) > 1]
                plate_gone += not any(_norm(g) in after for g in groups)
            else:
                area = _mask([t["box"]], *rgb.shape[:2])
                benign_px += int(area.sum())
                benign_hit_px += int((area & _mask(text_boxes, *rgb.shape[:2])).sum())
        if kind in ("benign", "blank") and (text_regions or plate_regions):
            flagged[kind] += 1
        if kind == "signs" and plate_regions:
            flagged["signs_plate"] += 1
        if kind == "plates" and text_regions:
            flagged["plates_text"] += 1

    def row(name: str, values: list[float]) -> str:
        if not values:
            return f"| {name} | - | - |"
        return f"| {name} | {statistics.median(values):.0f} | {statistics.mean(values):.0f} |"

    print(f"`OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_pii.py --images {n}` "
          f"({4 * n} images of 640x480: {n} each of signs, plates, shop signs, no text)\n")
    print("| CPU ms per image | median | mean |\n|---|---|---|")
    print(row("OCR pass (shared by text and plates)", cost["ocr"]))
    print(row("text: Presidio analyzer (scope pii)", cost["analyzer"]))
    print(row("plates: plate-like lines + Haar + crop reads", cost["plates"]))
    print(row("persons: HOG" if persons is not None else "persons (transforms/persons.py absent)", cost["persons"]))
    print(f"\nsetup (once per worker): text {setup_ms['text']:.0f} ms CPU (spaCy + OCR models), "
          f"plates {setup_ms['plates']:.0f} ms\n")
    print("| quality | value |\n|---|---|")
    print(f"| planted PII strings covered by text regions | {pii_covered}/{pii_total} |")
    print(f"| planted PII strings unreadable after filling regions | {pii_gone}/{pii_total} |")
    print(f"| plates covered by plate regions | {plate_covered}/{plate_total} |")
    print(f"| plates unreadable after filling regions | {plate_gone}/{plate_total} |")
    share = benign_hit_px / benign_px if benign_px else 0.0
    print(f"| non-PII text pixels destroyed in scope pii (shop signs, labels) | {share:.1%} |")
    print(f"| shop-sign images with any text or plate region | {flagged['benign']}/{n} |")
    print(f"| images without text with any region | {flagged['blank']}/{n} |")
    print(f"| sign images with a plate region | {flagged['signs_plate']}/{n} |")
    print(f"| car images with a text region (scope pii) | {flagged['plates_text']}/{n} |")


if __name__ == "__main__":
    main()
