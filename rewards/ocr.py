"""OCR reward: does the image spell the text quoted in the prompt? (Flow-GRPO's text-rendering task).

Liu et al. 2025, "Flow-GRPO", Sec. 4 (visual text rendering) and the reference code
``flow_grpo/ocr.py`` (``OcrScorer``, github.com/yifan123/flow_grpo): the target is the text between
the first pair of double quotes of the prompt (``'a sign that says "hello world"'`` -> ``hello world``);
recognized text and target are lowercased with spaces removed; the distance is 0 when the target
occurs inside the recognized text, else their Levenshtein distance, capped at ``len(target)``; and

    reward = 1 - distance / len(target)            (in [0, 1]; 1 = the text is rendered exactly).

Recognizers (``OcrReward(backend=...)``; the scoring rule is the same for both):

* ``"rapidocr"`` (default): PaddleOCR's PP-OCRv4 text detector (DB) and recognizer (SVTR-LCNet, CTC) --
  the model family Flow-GRPO scores with (``PaddleOCR(use_angle_cls=False)``) -- as the ONNX files
  ``ch_PP-OCRv4_det_infer.onnx`` / ``ch_PP-OCRv4_rec_infer.onnx`` that ship inside the
  ``rapidocr-onnxruntime`` wheel (``pip install flowalign[ocr]``; the recognizer's character set is
  stored in its ONNX metadata). Nothing is downloaded at run time and nothing comes from apt. The
  models run on onnxruntime (CPU); pre- and post-processing (resize, DB box extraction, crop, CTC
  decoding) are implemented here with numpy / PIL / scipy, following PaddleOCR's and RapidOCR's
  defaults, so OpenCV -- which rapidocr itself imports and whose ``opencv-python`` wheel needs the
  system's ``libGL.so.1`` -- is never imported. No angle classifier (Flow-GRPO passes ``cls=False``).
  Boxes are read top-to-bottom, left-to-right; lines whose recognition confidence is under 0.5 are
  dropped (PaddleOCR's ``drop_score``). Flow-GRPO runs the English (``lang="en"``) models; these are
  the Chinese+English ones, so scores can differ from Flow-GRPO's on hard images.
* ``"tesseract"``: tesseract through pytesseract (``apt-get install -y tesseract-ocr`` and
  ``pip install pytesseract``); no weights download, but a system binary.
"""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
import warnings
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from ._media import check_media, to_pil_images, to_uint8
from .base import RewardOutput

__all__ = ["levenshtein", "quoted_target", "normalize_text", "ocr_text_reward", "rapidocr_model_dir", "PPOCRv4",
           "OcrReward"]

BACKENDS = ("rapidocr", "tesseract")
_TESSERACT_HINT = "install it with `apt-get install -y tesseract-ocr` and `pip install pytesseract`"
_RAPIDOCR_HINT = ("install it with `pip install flowalign[ocr]` (rapidocr-onnxruntime, whose wheel ships the models, "
                  "and onnxruntime)")
_RAPIDOCR_PACKAGE = "rapidocr_onnxruntime"
DET_MODEL = "ch_PP-OCRv4_det_infer.onnx"
REC_MODEL = "ch_PP-OCRv4_rec_infer.onnx"


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions, each cost 1) between two strings.

    Wagner & Fischer 1974, "The string-to-string correction problem": the dynamic programme
    ``D[i][j] = min(D[i-1][j] + 1, D[i][j-1] + 1, D[i-1][j-1] + [a_i != b_j])`` with
    ``D[i][0] = i``, ``D[0][j] = j``, kept one row at a time (O(len(a) * len(b)) time).
    """
    if not isinstance(a, str) or not isinstance(b, str):
        raise TypeError(f"levenshtein: both arguments must be str, got {type(a).__name__} and {type(b).__name__}")
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))  # D[0][j] = j
    for i, ca in enumerate(a, start=1):
        current = [i]  # D[i][0] = i
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def quoted_target(prompt: str) -> str:
    """The text between the first two double quotes of ``prompt`` (Flow-GRPO: ``prompt.split('"')[1]``).

    Raises:
        ValueError: naming the prompt, when it has no complete ``"..."`` pair or the quotes are empty.
    """
    if not isinstance(prompt, str):
        raise TypeError(f"OCR reward: prompts must be str, got {type(prompt).__name__}")
    parts = prompt.split('"')
    if len(parts) < 3 or not normalize_text(parts[1]):
        raise ValueError(f"OCR reward: prompt {prompt!r} has no non-empty text in double quotes "
                         "(the target text, e.g. 'a sign that says \"hello\"'); or give metadata[i]['text']")
    return parts[1]


def normalize_text(text: str) -> str:
    """Flow-GRPO's normalization: lowercase, spaces removed (``text.replace(' ', '').lower()``).

    Tesseract also emits line breaks and tabs, so all whitespace is removed.
    """
    return "".join(text.split()).lower()


def ocr_text_reward(recognized: str, target: str) -> float:
    """``1 - d / len(target)`` with Flow-GRPO's distance ``d`` (0 if the target is contained in the
    recognized text, else the Levenshtein distance capped at ``len(target)``), both normalized."""
    recognized, target = normalize_text(recognized), normalize_text(target)
    if not target:
        raise ValueError("ocr_text_reward: the target text is empty after removing whitespace")
    distance = 0 if target in recognized else min(levenshtein(recognized, target), len(target))
    return 1.0 - distance / len(target)


# ------------------------------------------------------------------------------ PP-OCRv4 on onnxruntime


def rapidocr_model_dir() -> str:
    """The ``models`` folder of the installed ``rapidocr_onnxruntime`` package, located without
    importing it (its ``__init__`` imports OpenCV).

    Raises:
        ImportError: when the package, its model files or onnxruntime are missing.
    """
    spec = importlib.util.find_spec(_RAPIDOCR_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ImportError(f"OCR reward (backend 'rapidocr') needs the rapidocr-onnxruntime package for its PP-OCRv4 "
                          f"models; {_RAPIDOCR_HINT}")
    model_dir = os.path.join(locations[0], "models")
    missing = [name for name in (DET_MODEL, REC_MODEL) if not os.path.isfile(os.path.join(model_dir, name))]
    if missing:
        raise ImportError(f"OCR reward: {missing} not found in {model_dir} (rapidocr-onnxruntime 1.4 ships them in "
                          f"its wheel; another version may not); {_RAPIDOCR_HINT}")
    if importlib.util.find_spec("onnxruntime") is None:
        raise ImportError(f"OCR reward (backend 'rapidocr') needs onnxruntime; {_RAPIDOCR_HINT}")
    return model_dir


def _convex_hull(points: np.ndarray) -> np.ndarray:
    """Convex hull (counter-clockwise in image coordinates, no collinear points) of integer points
    ``[N, 2]`` by Andrew's monotone chain; fewer than 3 distinct points are returned as they are."""
    pts = np.unique(points, axis=0).tolist()  # sorted by x, then y
    if len(pts) < 3:
        return np.asarray(pts, dtype=np.float64)

    def chain(seq: list) -> list:
        out: list = []
        for p in seq:
            while len(out) >= 2 and ((out[-1][0] - out[-2][0]) * (p[1] - out[-2][1])
                                     - (out[-1][1] - out[-2][1]) * (p[0] - out[-2][0])) <= 0:
                out.pop()
            out.append(p)
        return out

    lower, upper = chain(pts), chain(pts[::-1])
    return np.asarray(lower[:-1] + upper[:-1], dtype=np.float64)


def min_area_rect(points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Smallest-area enclosing rectangle of points ``[N, 2]`` (x, y).

    One side of the optimal rectangle lies on a convex-hull edge (Freeman & Shapira 1975), so every
    hull edge direction is tried. Returns ``(center [2], axes [2, 2], size [2])``: the rectangle is
    ``center + a * axes[0] + b * axes[1]`` for ``|a| <= size[0] / 2``, ``|b| <= size[1] / 2``.
    """
    hull = _convex_hull(points)
    if len(hull) < 3:  # a point or a segment (collinear points): zero width
        length = float(np.linalg.norm(hull[-1] - hull[0]))
        u = (hull[-1] - hull[0]) / length if length > 0 else np.array([1.0, 0.0])
        return hull.mean(axis=0), np.stack([u, np.array([-u[1], u[0]])]), np.array([length, 0.0])
    edges = np.roll(hull, -1, axis=0) - hull
    u = edges / np.linalg.norm(edges, axis=1, keepdims=True)  # [E, 2] edge directions
    v = np.stack([-u[:, 1], u[:, 0]], axis=1)  # [E, 2] normals
    pu, pv = u @ hull.T, v @ hull.T  # [E, N] coordinates of every hull point in every frame
    extent_u, extent_v = pu.max(1) - pu.min(1), pv.max(1) - pv.min(1)
    best = int(np.argmin(extent_u * extent_v))
    mid_u, mid_v = (pu[best].max() + pu[best].min()) / 2, (pv[best].max() + pv[best].min()) / 2
    center = mid_u * u[best] + mid_v * v[best]
    return center, np.stack([u[best], v[best]]), np.array([extent_u[best], extent_v[best]])


def rect_corners(center: np.ndarray, axes: np.ndarray, size: np.ndarray) -> np.ndarray:
    """The rectangle's corners ordered top-left, top-right, bottom-right, bottom-left ``[4, 2]``:
    of the two corners with the smallest x, the upper is top-left; of the other two, the upper is
    top-right (PaddleOCR's ``get_mini_boxes`` convention)."""
    a, b = axes[0] * size[0] / 2, axes[1] * size[1] / 2
    corners = np.stack([center - a - b, center + a - b, center + a + b, center - a + b])
    by_x = corners[np.argsort(corners[:, 0], kind="stable")]
    left, right = by_x[:2], by_x[2:]
    tl, bl = (left[0], left[1]) if left[0][1] <= left[1][1] else (left[1], left[0])
    tr, br = (right[0], right[1]) if right[0][1] <= right[1][1] else (right[1], right[0])
    return np.stack([tl, tr, br, bl])


def reading_order(boxes: list[np.ndarray]) -> list[int]:
    """Indices of ``boxes`` (``[4, 2]`` corners, top-left first) top-to-bottom, left-to-right.

    Boxes sorted by their top edge join the current line while their vertical centre lies within
    the line's first box's vertical extent; each line is read left to right.
    """
    if not boxes:
        return []
    top = [float(b[:, 1].min()) for b in boxes]
    bottom = [float(b[:, 1].max()) for b in boxes]
    order = sorted(range(len(boxes)), key=lambda i: (top[i], float(boxes[i][:, 0].min())))
    lines: list[list[int]] = []
    for i in order:
        centre = (top[i] + bottom[i]) / 2
        if lines and top[lines[-1][0]] <= centre <= bottom[lines[-1][0]]:
            lines[-1].append(i)
        else:
            lines.append([i])
    return [i for line in lines for i in sorted(line, key=lambda j: float(boxes[j][:, 0].min()))]


class PPOCRv4:
    """PP-OCRv4 detection + recognition on onnxruntime, pre/post-processing in numpy and PIL.

    ``read(rgb uint8 [H, W, 3]) -> [(text, confidence), ...]`` in reading order (empty when no text
    is found). The steps and constants are PaddleOCR's (``DBPostProcess``, ``CTCLabelDecode``) with
    RapidOCR's detector settings for these weights:

    1. detection input: the image resized so that its shorter side is at least ``det_min_side``
       and its longer side at most ``det_max_side`` (both sides then rounded to multiples of 32),
       BGR, ``(x / 255 - 0.5) / 0.5``;
    2. the probability map is thresholded at ``det_thresh`` and dilated by a 2x2 square; each
       8-connected region gives its minimum-area rectangle, kept when its shorter side is >= 3 px
       and the mean probability inside it >= ``box_thresh``; the rectangle is grown by
       ``d = area * unclip_ratio / perimeter`` on every side (DB's unclip) and kept when its shorter
       side is >= 5 px, then mapped back to the image;
    3. each rectangle is cut out upright (turned by 90 degrees when it is 1.5x taller than wide),
       resized to height 48 (width ``ceil(48 * w / h)``, right-padded with zeros to at least 320),
       recognized one at a time (so results never depend on the batch), greedy-CTC decoded;
       lines with mean character confidence < ``text_score`` are dropped.
    """

    def __init__(self, model_dir: str | None = None, num_threads: int | None = None, det_min_side: int = 736,
                 det_max_side: int = 2000, det_thresh: float = 0.3, box_thresh: float = 0.5,
                 unclip_ratio: float = 1.6, text_score: float = 0.5, max_candidates: int = 1000) -> None:
        import onnxruntime as ort

        model_dir = model_dir or rapidocr_model_dir()
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if num_threads is not None:
            options.intra_op_num_threads = int(num_threads)
        providers = ["CPUExecutionProvider"]
        self.det = ort.InferenceSession(os.path.join(model_dir, DET_MODEL), sess_options=options, providers=providers)
        self.rec = ort.InferenceSession(os.path.join(model_dir, REC_MODEL), sess_options=options, providers=providers)
        meta = self.rec.get_modelmeta().custom_metadata_map
        if "character" not in meta:
            raise ValueError(f"OCR reward: {REC_MODEL} in {model_dir} has no 'character' metadata (its character set)")
        # CTC classes: 0 = blank, then the dictionary, then the space (PaddleOCR use_space_char=True)
        self.characters = ["", *meta["character"].splitlines(), " "]
        classes = self.rec.get_outputs()[0].shape[-1]
        if isinstance(classes, int) and classes != len(self.characters):
            raise ValueError(f"OCR reward: {REC_MODEL} predicts {classes} classes but its metadata lists "
                             f"{len(self.characters) - 2} characters (+ blank + space)")
        self.det_input, self.rec_input = self.det.get_inputs()[0].name, self.rec.get_inputs()[0].name
        self.det_min_side, self.det_max_side = det_min_side, det_max_side
        self.det_thresh, self.box_thresh, self.unclip_ratio = det_thresh, box_thresh, unclip_ratio
        self.text_score, self.max_candidates = text_score, max_candidates

    @staticmethod
    def _normalize(rgb: np.ndarray) -> np.ndarray:
        """uint8 RGB ``[H, W, 3]`` -> float32 BGR ``[3, H, W]`` in [-1, 1] (PaddleOCR's models read BGR)."""
        return (rgb[:, :, ::-1].astype(np.float32) / 255.0 - 0.5).transpose(2, 0, 1) / 0.5

    def detect(self, rgb: np.ndarray) -> list[np.ndarray]:
        """Text boxes ``[4, 2]`` (x, y; top-left, top-right, bottom-right, bottom-left) in ``rgb``'s pixels."""
        from scipy import ndimage

        height, width = rgb.shape[:2]
        scale = 1.0
        if min(height, width) * scale < self.det_min_side:
            scale = self.det_min_side / min(height, width)
        if max(height, width) * scale > self.det_max_side:
            scale = self.det_max_side / max(height, width)
        det_h = max(32, int(round(int(height * scale) / 32) * 32))
        det_w = max(32, int(round(int(width * scale) / 32) * 32))
        image = Image.fromarray(rgb)
        if (det_w, det_h) != (width, height):
            image = image.resize((det_w, det_h), Image.Resampling.BILINEAR)
        prob = self.det.run(None, {self.det_input: self._normalize(np.asarray(image))[None]})[0][0, 0]
        mask = prob > self.det_thresh
        grown = mask.copy()  # dilation by a 2x2 square: a pixel is on if it or its up / left / up-left neighbour is
        grown[1:] |= mask[:-1]
        grown[:, 1:] |= mask[:, :-1]
        grown[1:, 1:] |= mask[:-1, :-1]
        labels, _ = ndimage.label(grown, structure=np.ones((3, 3), dtype=bool))
        boxes = []
        for index, region in enumerate(ndimage.find_objects(labels)[: self.max_candidates], start=1):
            inside = labels[region] == index
            rows = np.flatnonzero(inside.any(axis=1))
            left = inside[rows].argmax(axis=1)
            right = inside.shape[1] - 1 - inside[rows, ::-1].argmax(axis=1)
            ys = np.concatenate([rows, rows]) + region[0].start  # the row ends span the region's hull
            xs = np.concatenate([left, right]) + region[1].start
            center, axes, size = min_area_rect(np.stack([xs, ys], axis=1))
            if size.min() < 3:
                continue
            if self._box_score(prob, rect_corners(center, axes, size)) < self.box_thresh:
                continue
            grow = size.prod() * self.unclip_ratio / (2 * size.sum())
            size = size + 2 * grow
            if size.min() < 5:
                continue
            box = rect_corners(center, axes, size)
            box[:, 0] = np.clip(np.round(box[:, 0] / det_w * width), 0, width - 1)
            box[:, 1] = np.clip(np.round(box[:, 1] / det_h * height), 0, height - 1)
            if int(np.linalg.norm(box[0] - box[1])) <= 3 or int(np.linalg.norm(box[0] - box[3])) <= 3:
                continue
            boxes.append(box)
        return boxes

    @staticmethod
    def _box_score(prob: np.ndarray, box: np.ndarray) -> float:
        """Mean of ``prob`` over the pixels of the polygon ``box`` (DB's "fast" score)."""
        height, width = prob.shape
        x0, x1 = (int(np.clip(x, 0, width - 1)) for x in (np.floor(box[:, 0].min()), np.ceil(box[:, 0].max())))
        y0, y1 = (int(np.clip(y, 0, height - 1)) for y in (np.floor(box[:, 1].min()), np.ceil(box[:, 1].max())))
        canvas = Image.new("L", (x1 - x0 + 1, y1 - y0 + 1), 0)
        ImageDraw.Draw(canvas).polygon([(int(x - x0), int(y - y0)) for x, y in box], fill=1)
        inside = np.asarray(canvas, dtype=bool)
        return float(prob[y0:y1 + 1, x0:x1 + 1][inside].mean()) if inside.any() else 0.0

    @staticmethod
    def crop(rgb: np.ndarray, box: np.ndarray) -> np.ndarray:
        """The box's content as an upright image (bicubic), turned 90 degrees when 1.5x taller than wide."""
        crop_w = max(1, int(max(np.linalg.norm(box[0] - box[1]), np.linalg.norm(box[3] - box[2]))))
        crop_h = max(1, int(max(np.linalg.norm(box[0] - box[3]), np.linalg.norm(box[1] - box[2]))))
        quad = [float(c) for corner in (box[0], box[3], box[2], box[1]) for c in corner]  # PIL: tl, bl, br, tr
        out = np.asarray(Image.fromarray(rgb).transform((crop_w, crop_h), Image.Transform.QUAD, quad,
                                                        resample=Image.Resampling.BICUBIC))
        return np.rot90(out) if crop_h >= 1.5 * crop_w else out

    def recognize(self, crop: np.ndarray) -> tuple[str, float]:
        """Greedy CTC reading of one text-line image: ``(text, mean confidence of its characters)``."""
        height, width = crop.shape[:2]
        ratio = width / height
        input_w = int(48 * max(320 / 48, ratio))
        resized_w = min(input_w, math.ceil(48 * ratio))
        line = Image.fromarray(np.ascontiguousarray(crop)).resize((resized_w, 48), Image.Resampling.BILINEAR)
        batch = np.zeros((1, 3, 48, input_w), dtype=np.float32)
        batch[0, :, :, :resized_w] = self._normalize(np.asarray(line))
        probs = self.rec.run(None, {self.rec_input: batch})[0][0]  # [T, classes], softmax output
        best, confidence = probs.argmax(axis=1), probs.max(axis=1)
        keep = best != 0
        keep[1:] &= best[1:] != best[:-1]  # collapse repeats, then drop blanks
        if not keep.any():
            return "", 0.0
        return "".join(self.characters[i] for i in best[keep]), float(confidence[keep].mean())

    def read(self, rgb: np.ndarray) -> list[tuple[str, float]]:
        """``[(text, confidence)]`` of the text lines found in ``rgb`` (uint8 ``[H, W, 3]``), in reading order."""
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"PPOCRv4.read: expected a uint8 [H, W, 3] RGB array, got {rgb.dtype} {rgb.shape}")
        boxes = self.detect(rgb)
        lines = [self.recognize(self.crop(rgb, boxes[i])) for i in reading_order(boxes)]
        return [(text, score) for text, score in lines if text and score >= self.text_score]


# ------------------------------------------------------------------------------ tesseract


def _require_tesseract(cmd: str | None) -> tuple[Any, str]:
    """Import pytesseract and resolve the tesseract binary (``cmd``, else pytesseract's default)."""
    try:
        import pytesseract
    except ImportError as err:
        raise ImportError(f"OCR reward (backend 'tesseract') needs the pytesseract package; {_TESSERACT_HINT}") from err
    binary = cmd if cmd is not None else pytesseract.pytesseract.tesseract_cmd
    resolved = shutil.which(binary)
    if resolved is None:
        raise RuntimeError(f"OCR reward: the tesseract binary {binary!r} was not found on PATH; {_TESSERACT_HINT}")
    return pytesseract, resolved


# ------------------------------------------------------------------------------ the reward


class OcrReward:
    """Flow-GRPO OCR reward.

    ``__call__(media [B, 3, H, W] in [0, 1], prompts, metadata) -> RewardOutput``: ``scores [B]``
    in [0, 1] on ``media``'s device; the target is ``metadata[i]["text"]`` when given, else the
    quoted text of ``prompts[i]``. A sample without a target (no quotes in its prompt) gets score 0
    and ``valid=False`` (with a warning naming the prompt). Component ``exact`` is 1.0 where the
    score is 1. Images are scored one at a time, so scores do not depend on the batch.

    Args:
        backend: ``"rapidocr"`` (default: PP-OCRv4 ONNX models from the rapidocr-onnxruntime wheel,
            see :class:`PPOCRv4`; loaded on first use, once per reward) or ``"tesseract"``.
        lang: tesseract language(s), e.g. ``"eng"`` (tesseract only).
        psm: tesseract page segmentation mode (11 = sparse text: text anywhere in the image; tesseract only).
        tesseract_cmd: path of the tesseract binary, if it is not on ``PATH`` (tesseract only).
        num_threads: onnxruntime intra-op threads (rapidocr only; ``None`` = onnxruntime's default).
        det_min_side: the detector sees the image upscaled to at least this shorter side
            (rapidocr only; RapidOCR's default 736: small renders need it).
        device: accepted for the zoo's common signature; both backends run on the CPU.
    """

    name = "ocr"
    modality = "image"

    def __init__(self, backend: str = "rapidocr", lang: str = "eng", psm: int = 11, tesseract_cmd: str | None = None,
                 num_threads: int | None = None, det_min_side: int = 736, device: str = "cpu") -> None:
        if backend not in BACKENDS:
            raise ValueError(f"OcrReward: backend must be one of {BACKENDS}, got {backend!r}")
        if isinstance(psm, bool) or not isinstance(psm, int) or not 0 <= psm <= 13:
            raise ValueError(f"OcrReward: psm must be a tesseract page segmentation mode 0..13, got {psm!r}")
        if not isinstance(lang, str) or not lang:
            raise ValueError(f"OcrReward: lang must be a tesseract language code such as 'eng', got {lang!r}")
        if num_threads is not None and (isinstance(num_threads, bool) or not isinstance(num_threads, int)
                                        or num_threads < 1):
            raise ValueError(f"OcrReward: num_threads must be a positive int or None, got {num_threads!r}")
        if isinstance(det_min_side, bool) or not isinstance(det_min_side, int) or not 32 <= det_min_side <= 2000:
            raise ValueError(f"OcrReward: det_min_side must be an int in [32, 2000], got {det_min_side!r}")
        self.backend, self.lang, self.psm = backend, lang, psm
        self.num_threads, self.det_min_side = num_threads, det_min_side
        self._engine: PPOCRv4 | None = None
        if backend == "rapidocr":
            self.model_dir = rapidocr_model_dir()  # fail here, not at the first score, when the extra is missing
            return
        self._tess, self.tesseract_cmd = _require_tesseract(tesseract_cmd)
        self._tess.pytesseract.tesseract_cmd = self.tesseract_cmd  # pytesseract keeps the binary in a global
        available = set(self._tess.get_languages(config=""))
        missing = [code for code in lang.split("+") if code not in available]
        if missing:
            raise ValueError(f"OcrReward: tesseract has no language data for {missing} (installed: {sorted(available)}); "
                             f"install e.g. `apt-get install tesseract-ocr-{missing[0]}`")

    @classmethod
    def tiny(cls, tmp_dir: str) -> "OcrReward":
        """Tests only: the default reward (its PP-OCRv4 weights are the 15 MB shipped in the pip wheel)."""
        return cls()

    @property
    def engine(self) -> PPOCRv4:
        """The PP-OCRv4 models (rapidocr backend), loaded on first use."""
        if self.backend != "rapidocr":
            raise AttributeError(f"OcrReward: backend {self.backend!r} has no PP-OCRv4 engine")
        if self._engine is None:
            self._engine = PPOCRv4(self.model_dir, num_threads=self.num_threads, det_min_side=self.det_min_side)
        return self._engine

    def recognize(self, media: Tensor) -> list[str]:
        """Recognized text of each image of ``media [B, 3, H, W]`` (``""`` where none is found)."""
        if self.backend == "rapidocr":
            images = to_uint8(check_media(media, "image"))
            return [" ".join(text for text, _ in self.engine.read(image)) for image in images]
        config = f"--psm {self.psm}"
        self._tess.pytesseract.tesseract_cmd = self.tesseract_cmd  # this instance's binary (the setting is global)
        return [self._tess.image_to_string(image, lang=self.lang, config=config) for image in to_pil_images(media)]

    @torch.no_grad()
    def __call__(self, media: Tensor, prompts: Sequence[str], metadata: Sequence[dict[str, Any]] | None = None
                 ) -> RewardOutput:
        """Score ``B`` images; returns scores ``[B]`` in [0, 1]."""
        batch = len(media)
        if len(prompts) != batch:
            raise ValueError(f"OcrReward: got {len(prompts)} prompts for a media batch of {batch}")
        if metadata is not None and len(metadata) != batch:
            raise ValueError(f"OcrReward: got {len(metadata)} metadata entries for a media batch of {batch}")
        targets: list[str | None] = []
        for i, prompt in enumerate(prompts):
            meta = metadata[i] if metadata is not None else None
            if meta and "text" in meta:
                targets.append(str(meta["text"]))
                continue
            try:
                targets.append(quoted_target(prompt))
            except ValueError as err:  # nothing to read: an unscorable sample (valid=False), not a crash
                warnings.warn(str(err), stacklevel=2)
                targets.append(None)
        recognized = self.recognize(media)
        scores = torch.tensor([0.0 if t is None else ocr_text_reward(r, t) for r, t in zip(recognized, targets)],
                              dtype=torch.float32).to(media.device)
        valid = torch.tensor([t is not None for t in targets], dtype=torch.bool, device=media.device)
        return RewardOutput(scores=scores, components={"exact": (scores == 1.0).float()}, valid=valid)

    def __repr__(self) -> str:
        if self.backend == "tesseract":
            return f"OcrReward(backend='tesseract', lang={self.lang!r}, psm={self.psm})"
        return f"OcrReward(backend='rapidocr', det_min_side={self.det_min_side})"
