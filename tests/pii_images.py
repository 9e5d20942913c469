"""Deterministic 640x480 RGB scenes with planted personal data, for the text and plate tests
and the PII benchmark (``from pii_images import ...``, like ``helpers``).

Every generator takes a seed and returns ``(rgb, truth)``: ``truth`` lists each planted string
as ``{"text", "class", "entity", "box"}`` where ``class`` is ``"text"`` (personal data read
from a sign, ``entity`` its Presidio type), ``"plate"`` (a licence plate's characters) or
``"none"`` (text that is not personal data: shop signs, labels such as ``Tel:``), and ``box``
is [x0, y0, x1, y1] around the rendered glyphs in image pixels. Text is drawn with OpenCV's
Hershey fonts at several sizes, weights, colours and small rotations, on boards over a noisy
gradient background.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

WIDTH, HEIGHT = 640, 480

#: Personal data planted on signs: (label, value, Presidio entity of the value).
PII_LINES: tuple[tuple[str, str, str], ...] = (
    ("Contact:", "Maria Garcia", "PERSON"),
    ("", "maria.garcia@example.com", "EMAIL_ADDRESS"),
    ("Tel:", "+49 30 1234567", "PHONE_NUMBER"),
    ("IBAN", "DE89 3704 0044 0532 0130 00", "IBAN_CODE"),
    ("Manager:", "John Smith", "PERSON"),
    ("", "j.smith@mailbox.org", "EMAIL_ADDRESS"),
    ("Call", "(212) 555-0187", "PHONE_NUMBER"),
    ("IBAN", "GB82 WEST 1234 5698 7654 32", "IBAN_CODE"),
)
#: Licence plates (characters as printed).
PLATES: tuple[str, ...] = ("KA 1234 XY", "B MW 4521", "7ABC123")
#: Text that is not personal data.
BENIGN_LINES: tuple[str, ...] = ("SALE 50% OFF", "OPEN 9-5", "EXIT", "FRESH BREAD", "NO PARKING")

FONTS = (cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_DUPLEX, cv2.FONT_HERSHEY_COMPLEX,
         cv2.FONT_HERSHEY_TRIPLEX)


def background(rng: np.random.Generator) -> np.ndarray:
    """A noisy two-colour gradient with a few soft shapes: texture without text."""
    c0, c1 = rng.integers(40, 200, size=3), rng.integers(40, 200, size=3)
    t = np.linspace(0.0, 1.0, HEIGHT)[:, None, None]
    img = (c0 * (1 - t) + c1 * t) * np.ones((HEIGHT, WIDTH, 3))
    img += rng.normal(0, 6, size=img.shape)
    img = np.clip(img, 0, 255).astype(np.uint8)
    for _ in range(4):
        centre = (int(rng.integers(0, WIDTH)), int(rng.integers(0, HEIGHT)))
        axes = (int(rng.integers(20, 90)), int(rng.integers(20, 90)))
        colour = tuple(int(v) for v in rng.integers(30, 220, size=3))
        cv2.ellipse(img, centre, axes, float(rng.uniform(0, 180)), 0, 360, colour, -1, cv2.LINE_AA)
    return cv2.GaussianBlur(img, (5, 5), 0)


def _contrast(rng: np.random.Generator) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """A board colour and a text colour that contrast (light board, dark text or the reverse)."""
    light = tuple(int(v) for v in rng.integers(200, 256, size=3))
    dark = tuple(int(v) for v in rng.integers(0, 70, size=3))
    return (light, dark) if rng.random() < 0.7 else (dark, light)


def _transform(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    return np.hstack([points, np.ones((len(points), 1))]) @ matrix.T


def _box(points: np.ndarray) -> list[float]:
    return [float(points[:, 0].min()), float(points[:, 1].min()), float(points[:, 0].max()), float(points[:, 1].max())]


def draw_text_board(img: np.ndarray, parts: list[tuple[str, dict[str, Any]]], origin: tuple[int, int], *,
                    font: int, scale: float, thickness: int, angle: float,
                    board: tuple[int, int, int] | None, ink: tuple[int, int, int],
                    pad: float = 0.6) -> list[dict[str, Any]]:
    """Draws one line of text made of ``parts`` (string, truth fields) separated by spaces, on
    an optional board, rotated by ``angle`` degrees about the line's centre. Returns one truth
    entry per non-empty part, with the part's glyph box after rotation."""
    text = " ".join(p for p, _ in parts if p)
    (tw, th), base = cv2.getTextSize(text, font, scale, thickness)
    x, y = origin
    centre = (x + tw / 2.0, y - th / 2.0)
    matrix = cv2.getRotationMatrix2D(centre, angle, 1.0)
    if board is not None:
        m = pad * th
        corners = np.array([[x - m, y - th - m], [x + tw + m, y - th - m], [x + tw + m, y + base + m], [x - m, y + base + m]])
        cv2.fillConvexPoly(img, _transform(corners, matrix).round().astype(np.int32), board, cv2.LINE_AA)
    mask = np.zeros(img.shape[:2], np.uint8)
    cv2.putText(mask, text, (x, y), font, scale, 255, thickness, cv2.LINE_AA)
    mask = cv2.warpAffine(mask, matrix, (img.shape[1], img.shape[0]), flags=cv2.INTER_LINEAR)
    alpha = (mask.astype(np.float32) / 255.0)[:, :, None]
    img[:] = (img * (1 - alpha) + np.array(ink, np.float32) * alpha).round().astype(np.uint8)
    truth, cursor = [], ""
    for part, fields in parts:
        if not part:
            continue
        prefix = f"{cursor} " if cursor else ""
        x0 = x + cv2.getTextSize(prefix, font, scale, thickness)[0][0] if prefix else x
        x1 = x + cv2.getTextSize(prefix + part, font, scale, thickness)[0][0]
        corners = np.array([[x0, y - th], [x1, y - th], [x1, y + base], [x0, y + base]], np.float64)
        truth.append({"text": part, **fields, "box": _box(_transform(corners, matrix))})
        cursor = prefix + part
    return truth


def _fit_scale(text: str, font: int, thickness: int, want_scale: float, max_width: int) -> float:
    width = cv2.getTextSize(text, font, want_scale, thickness)[0][0]
    return want_scale if width <= max_width else want_scale * max_width / width


def sign_scene(seed: int, lines: list[tuple[str, str, str]] | None = None) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Three signs, each one line ``label value`` of personal data (three of :data:`PII_LINES`
    chosen by the seed unless ``lines`` is given)."""
    rng = np.random.default_rng(seed)
    img = background(rng)
    if lines is None:
        picks = rng.choice(len(PII_LINES), size=3, replace=False)
        lines = [PII_LINES[i] for i in picks]
    truth: list[dict[str, Any]] = []
    slot = HEIGHT // len(lines)
    for i, (label, value, entity) in enumerate(lines):
        font = FONTS[int(rng.integers(len(FONTS)))]
        thickness = int(rng.integers(1, 3))
        text = f"{label} {value}".strip()
        scale = _fit_scale(text, font, thickness, float(rng.uniform(0.8, 1.2)), WIDTH - 120)
        tw = cv2.getTextSize(text, font, scale, thickness)[0][0]
        x = int(rng.integers(40, max(41, WIDTH - tw - 40)))
        y = int(slot * i + slot * 0.55 + rng.integers(-10, 10))
        board, ink = _contrast(rng)
        truth += draw_text_board(
            img, [(label, {"class": "none", "entity": None}), (value, {"class": "text", "entity": entity})],
            (x, y), font=font, scale=scale, thickness=thickness, angle=float(rng.uniform(-4, 4)),
            board=board, ink=ink)
    return img, truth


def benign_scene(seed: int) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Three shop signs with text that is not personal data."""
    rng = np.random.default_rng(seed)
    img = background(rng)
    truth: list[dict[str, Any]] = []
    picks = rng.choice(len(BENIGN_LINES), size=3, replace=False)
    slot = HEIGHT // 3
    for i, pick in enumerate(picks):
        text = BENIGN_LINES[int(pick)]
        font = FONTS[int(rng.integers(len(FONTS)))]
        thickness = int(rng.integers(2, 4))
        scale = _fit_scale(text, font, thickness, float(rng.uniform(1.0, 1.6)), WIDTH - 120)
        tw = cv2.getTextSize(text, font, scale, thickness)[0][0]
        x = int(rng.integers(40, max(41, WIDTH - tw - 40)))
        y = int(slot * i + slot * 0.6)
        board, ink = _contrast(rng)
        truth += draw_text_board(img, [(text, {"class": "none", "entity": None})], (x, y), font=font,
                                 scale=scale, thickness=thickness, angle=float(rng.uniform(-4, 4)),
                                 board=board, ink=ink)
    return img, truth


def plate_scene(seed: int, plate: str | None = None, *, scale: float | None = None) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """A car-like body (box, windows, wheels) with a white plate of black characters in a
    black frame; the plate is one of :data:`PLATES` unless given, its font scale drawn from
    [0.9, 1.2] (characters ~25 px high) unless given."""
    rng = np.random.default_rng(seed)
    img = background(rng)
    plate = plate or PLATES[int(rng.integers(len(PLATES)))]
    body = tuple(int(v) for v in rng.integers(30, 230, size=3))
    cx, base_y = int(rng.integers(250, 390)), int(rng.integers(360, 420))
    car_w = int(rng.integers(320, 420))
    x0, x1 = cx - car_w // 2, cx + car_w // 2
    cv2.rectangle(img, (x0, base_y - 150), (x1, base_y), body, -1)
    cv2.rectangle(img, (x0 + 40, base_y - 230), (x1 - 40, base_y - 150), body, -1)
    cv2.rectangle(img, (x0 + 60, base_y - 220), (x1 - 60, base_y - 160), (90, 110, 130), -1)
    for wx in (x0 + 60, x1 - 60):
        cv2.circle(img, (wx, base_y), 38, (20, 20, 20), -1)
    font = FONTS[int(rng.integers(2))]  # plates use plain sans-serif lettering
    drawn = float(rng.uniform(0.9, 1.2))
    scale = drawn if scale is None else scale
    thickness = max(1, round((2 + int(rng.integers(2))) * min(scale, 1.0)))
    (tw, th), _ = cv2.getTextSize(plate, font, scale, thickness)
    x, y = cx - tw // 2, base_y - 55
    truth = draw_text_board(img, [(plate, {"class": "plate", "entity": None})], (x, y), font=font, scale=scale,
                            thickness=thickness, angle=float(rng.uniform(-3, 3)), board=(250, 250, 250),
                            ink=(15, 15, 15), pad=0.45)
    # The board draw_text_board paints is the plate; a dark frame around it, as on real plates.
    m = 0.45 * th
    gx0, gy0, gx1, gy1 = truth[0]["box"]
    cv2.rectangle(img, (int(gx0 - m - 2), int(gy0 - m - 2)), (int(gx1 + m + 2), int(gy1 + m + 2)), (10, 10, 10), 2)
    return img, truth


def blank_scene(seed: int) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Background and shapes only: no text at all."""
    rng = np.random.default_rng(seed)
    img = background(rng)
    for _ in range(3):
        p0 = (int(rng.integers(0, WIDTH - 100)), int(rng.integers(0, HEIGHT - 100)))
        p1 = (p0[0] + int(rng.integers(40, 200)), p0[1] + int(rng.integers(30, 120)))
        cv2.rectangle(img, p0, p1, tuple(int(v) for v in rng.integers(0, 256, size=3)), -1)
    return img, []


def fill_boxes(rgb: np.ndarray, boxes: list[list[float]], colour: tuple[int, int, int] = (128, 128, 128)) -> np.ndarray:
    """A copy of ``rgb`` with each box (float pixels, rounded outward) filled flat."""
    out = rgb.copy()
    height, width = out.shape[:2]
    for x0, y0, x1, y1 in boxes:
        xa, ya = max(int(np.floor(x0)), 0), max(int(np.floor(y0)), 0)
        xb, yb = min(int(np.ceil(x1)), width), min(int(np.ceil(y1)), height)
        out[ya:yb, xa:xb] = colour
    return out


def box_covers(outer: list[float], inner: list[float], tolerance: float = 2.0) -> bool:
    """Whether ``outer`` contains ``inner`` (up to ``tolerance`` pixels)."""
    return (outer[0] <= inner[0] + tolerance and outer[1] <= inner[1] + tolerance
            and outer[2] >= inner[2] - tolerance and outer[3] >= inner[3] - tolerance)


def union_covers(boxes: list[list[float]], inner: list[float], tolerance: float = 2.0) -> bool:
    """Whether the union of ``boxes`` covers ``inner`` (checked on a pixel grid)."""
    x0, y0 = int(np.floor(inner[0] + tolerance)), int(np.floor(inner[1] + tolerance))
    x1, y1 = int(np.ceil(inner[2] - tolerance)), int(np.ceil(inner[3] - tolerance))
    if x1 <= x0 or y1 <= y0:
        return True
    grid = np.zeros((y1 - y0, x1 - x0), bool)
    for bx0, by0, bx1, by1 in boxes:
        xa, ya = max(int(np.floor(bx0)) - x0, 0), max(int(np.floor(by0)) - y0, 0)
        xb, yb = min(int(np.ceil(bx1)) - x0, x1 - x0), min(int(np.ceil(by1)) - y0, y1 - y0)
        if xb > xa and yb > ya:
            grid[ya:yb, xa:xb] = True
    return bool(grid.all())
