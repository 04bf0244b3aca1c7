"""Pictures of a run: sample grids, reward curves, and a plain-text summary table.

Grids are composed with PIL; curves use matplotlib's Agg canvas directly (no pyplot global state,
safe in headless and threaded code).
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

__all__ = ["save_image_grid", "save_reward_curve", "format_table", "grid_layout"]

SEPARATOR_PX = 2
LABEL_PAD_PX = 4
_SEPARATOR_RGB = (96, 96, 96)
_BACKGROUND_RGB = (255, 255, 255)
_TEXT_RGB = (0, 0, 0)
_RANGE_TOL = 1e-2  # decoders may overshoot [0, 1] by rounding; more than this is a wrong range


def _ensure_parent(path: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    """(width, height) of ``text`` drawn at the origin, including the font's top bearing."""
    if not text:
        return 0, 0
    left, top, right, bottom = draw.multiline_textbbox((0, 0), text, font=font)
    return int(math.ceil(right)), int(math.ceil(bottom))


def grid_layout(
    n_rows: int,
    n_cols: int,
    height: int,
    width: int,
    *,
    scale: int,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    title: str | None = None,
) -> dict[str, int]:
    """Pixel geometry of :func:`save_image_grid`'s canvas.

    Cells are ``height·scale × width·scale``, with ``SEPARATOR_PX`` separators between and around
    them: ``grid_w = n_cols·width·scale + (n_cols + 1)·SEPARATOR_PX`` (likewise ``grid_h``). The
    left margin fits the widest row label plus ``2·LABEL_PAD_PX`` (0 without labels); the top
    margin stacks the title line and the column-label line, each text height + ``2·LABEL_PAD_PX``.

    Returns:
        dict with ``cell_w, cell_h, left, top, title_h, grid_w, grid_h, canvas_w, canvas_h``.
    """
    font = ImageFont.load_default()
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    cell_w, cell_h = width * scale, height * scale
    left = 0
    if row_labels:
        left = max(_text_size(draw, s, font)[0] for s in row_labels) + 2 * LABEL_PAD_PX
    title_h = title_w = 0
    if title:
        title_w, th = _text_size(draw, title, font)
        title_h = th + 2 * LABEL_PAD_PX
    col_h = 0
    if col_labels:
        col_h = max(_text_size(draw, s, font)[1] for s in col_labels) + 2 * LABEL_PAD_PX
    grid_w = n_cols * cell_w + (n_cols + 1) * SEPARATOR_PX
    grid_h = n_rows * cell_h + (n_rows + 1) * SEPARATOR_PX
    top = title_h + col_h
    canvas_w = max(left + grid_w, title_w + 2 * LABEL_PAD_PX if title else 0)
    return {
        "cell_w": cell_w,
        "cell_h": cell_h,
        "left": left,
        "top": top,
        "title_h": title_h,
        "grid_w": grid_w,
        "grid_h": grid_h,
        "canvas_w": canvas_w,
        "canvas_h": top + grid_h,
    }


def _fit(draw: ImageDraw.ImageDraw, text: str, font, max_w: int) -> str:
    """Shorten ``text`` with a trailing '...' until it is at most ``max_w`` pixels wide."""
    if _text_size(draw, text, font)[0] <= max_w:
        return text
    while text and _text_size(draw, text + "...", font)[0] > max_w:
        text = text[:-1]
    return text + "..." if text else ""


def _to_uint8_rows(rows: list[Tensor]) -> list[np.ndarray]:
    """Validate ``rows`` and convert each to ``uint8 [N, H, W, 3]``."""
    if not isinstance(rows, (list, tuple)) or not rows:
        raise ValueError("rows must be a non-empty list of [N, 3, H, W] tensors")
    out = []
    ref = None
    for i, r in enumerate(rows):
        if not isinstance(r, Tensor):
            raise TypeError(f"rows[{i}] must be a Tensor, got {type(r).__name__}")
        if r.ndim != 4 or r.shape[1] not in (1, 3):
            raise ValueError(f"rows[{i}] must have shape [N, 3, H, W] (or [N, 1, H, W]), got {tuple(r.shape)}")
        n, _, h, w = r.shape
        if ref is None:
            ref = (n, h, w)
        elif (n, h, w) != ref:
            raise ValueError(f"rows[{i}] has N, H, W = {(n, h, w)}, but rows[0] has {ref}; all rows must match")
        if n == 0 or h == 0 or w == 0:
            raise ValueError(f"rows[{i}] is empty: shape {tuple(r.shape)}")
        x = r.detach().float().cpu()
        if not torch.isfinite(x).all():
            raise ValueError(f"rows[{i}] contains NaN or inf")
        lo, hi = x.min().item(), x.max().item()
        if lo < -_RANGE_TOL or hi > 1 + _RANGE_TOL:
            raise ValueError(f"rows[{i}] values span [{lo:.3f}, {hi:.3f}]; images must be in [0, 1]")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        out.append((x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return out


def save_image_grid(
    path: str,
    rows: list[Tensor],
    *,
    row_labels: list[str] | None = None,
    col_labels: list[str] | None = None,
    scale: int = 4,
    title: str | None = None,
) -> str:
    """Save a labelled grid of images as a PNG.

    Args:
        path: output file (parent folders are created).
        rows: one ``[N, 3, H, W]`` tensor in [0, 1] per grid row (same N, H, W in every row);
            e.g. one row per prompt or per checkpoint.
        row_labels: one label per row, drawn in a left margin.
        col_labels: one label per column, drawn above the grid (shortened to the cell width).
        scale: integer nearest-neighbour upscaling factor.
        title: a line drawn above everything.

    Returns:
        ``path``. The canvas size is :func:`grid_layout`'s ``(canvas_w, canvas_h)``.
    """
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be a positive int, got {scale!r}")
    arrays = _to_uint8_rows(rows)
    n_rows = len(arrays)
    n_cols, h, w = arrays[0].shape[:3]
    if row_labels is not None and len(row_labels) != n_rows:
        raise ValueError(f"row_labels has {len(row_labels)} entries for {n_rows} rows")
    if col_labels is not None and len(col_labels) != n_cols:
        raise ValueError(f"col_labels has {len(col_labels)} entries for {n_cols} columns")
    row_labels = [str(s) for s in row_labels] if row_labels is not None else None
    col_labels = [str(s) for s in col_labels] if col_labels is not None else None

    geo = grid_layout(n_rows, n_cols, h, w, scale=scale, row_labels=row_labels, col_labels=col_labels, title=title)
    canvas = Image.new("RGB", (geo["canvas_w"], geo["canvas_h"]), _BACKGROUND_RGB)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    x0, y0 = geo["left"], geo["top"]
    draw.rectangle([x0, y0, x0 + geo["grid_w"] - 1, y0 + geo["grid_h"] - 1], fill=_SEPARATOR_RGB)
    cw, ch, sep = geo["cell_w"], geo["cell_h"], SEPARATOR_PX
    for r, arr in enumerate(arrays):
        up = arr.repeat(scale, axis=1).repeat(scale, axis=2)  # nearest-neighbour upscaling
        cy = y0 + sep + r * (ch + sep)
        for c in range(n_cols):
            cx = x0 + sep + c * (cw + sep)
            canvas.paste(Image.fromarray(np.ascontiguousarray(up[c])), (cx, cy))
        if row_labels:
            _, th = _text_size(draw, row_labels[r], font)
            draw.multiline_text((LABEL_PAD_PX, cy + max(0, (ch - th) // 2)), row_labels[r], fill=_TEXT_RGB, font=font)
    if title:
        draw.text((LABEL_PAD_PX, LABEL_PAD_PX), title, fill=_TEXT_RGB, font=font)
    if col_labels:
        for c, label in enumerate(col_labels):
            label = _fit(draw, label.replace("\n", " "), font, cw)
            tw, _ = _text_size(draw, label, font)
            cx = x0 + sep + c * (cw + sep)
            draw.text((cx + max(0, (cw - tw) // 2), geo["title_h"] + LABEL_PAD_PX), label, fill=_TEXT_RGB, font=font)
    _ensure_parent(path)
    canvas.save(path, format="PNG")
    return path


def save_reward_curve(
    path: str,
    records: list[dict],
    *,
    series: dict[str, str],
    title: str = "",
    ylabel: str = "reward",
) -> str:
    """Plot metric curves against ``record["step"]`` and save a PNG.

    Args:
        path: output file (parent folders are created).
        records: metric records (e.g. :func:`flowalign.training.metrics.read_metrics`).
        series: metric key -> legend label. A record lacking a key (eval metrics are logged only
            every few steps) or holding a non-numeric value for it is skipped for that series;
            a series with no points at all is left out of the legend.

    Returns:
        ``path``.
    """
    if not isinstance(series, dict) or not series:
        raise ValueError("series must be a non-empty dict of metric key -> legend label")
    for i, rec in enumerate(records):
        if not isinstance(rec, dict) or "step" not in rec:
            raise ValueError(f"records[{i}] has no 'step' key")
    curves: dict[str, list[tuple[float, float]]] = {}
    for key, label in series.items():
        curves[label] = [
            (rec["step"], float(rec[key]))
            for rec in records
            if isinstance(rec.get(key), numbers.Real) and not isinstance(rec.get(key), bool)
        ]
    return save_curves(path, curves, xlabel="step", ylabel=ylabel, title=title)


def save_curves(
    path: str,
    curves: dict[str, list[tuple[float, float]]],
    *,
    xlabel: str,
    ylabel: str,
    title: str = "",
    reference: tuple[float, str] | None = None,
) -> str:
    """Plot labelled ``(x, y)`` curves (e.g. held-out reward against seconds of training) as a PNG.

    Args:
        curves: legend label -> points (sorted by x here); a label with no points is listed as
            "no data" instead of drawn.
        reference: optional ``(y, label)`` drawn as a dashed horizontal line (e.g. a baseline's final value).

    Returns:
        ``path``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    many = len(curves) > 10  # beyond the 10 colours of the cycle: line styles tell curves apart, legend outside
    fig = Figure(figsize=(8.6 if many else 6.4, 4.6 if many else 4.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    empty = []
    for i, (label, pts) in enumerate(curves.items()):
        if not pts:
            empty.append(label)
            continue
        xs, ys = zip(*sorted(pts, key=lambda p: p[0]))
        ax.plot(xs, ys, label=label, marker="os^"[i // 10 % 3] if len(pts) <= 40 else None, markersize=3, linewidth=1.5,
                linestyle=("-", "--", ":")[i // 10 % 3])
    if reference is not None:
        ax.axhline(reference[0], color="gray", linestyle="--", linewidth=1, label=reference[1])
    if empty:
        ax.text(0.01, 0.01, "no data: " + ", ".join(empty), transform=ax.transAxes, fontsize=7, color="gray")
    if len(empty) < len(curves) or reference is not None:
        if many:
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, borderaxespad=0.0)
        else:
            ax.legend(loc="best", fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    _ensure_parent(path)
    fig.savefig(path, format="png")
    return path


def _cell(value: Any) -> tuple[str, bool]:
    """(text, right-aligned?) for one table cell: floats with 3 decimals, numbers right-aligned."""
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if value is None:
        return "-", True
    if isinstance(value, bool):
        return str(value), False
    if isinstance(value, numbers.Integral):
        return str(int(value)), True
    if isinstance(value, numbers.Real):
        return f"{float(value):.3f}", True
    return str(value), False


def format_table(header: list[str], rows: list[list]) -> str:
    """A fixed-width plain-text table: header, a dashed rule, then one line per row.

    Columns are separated by two spaces and sized to their widest cell (header included). Floats
    are written with 3 decimals and ``None`` as ``-``; a column whose cells are all numbers (or
    ``None``) is right-aligned, any other column left-aligned. Every line has the same length.
    """
    if not header:
        raise ValueError("header must name at least one column")
    cells = []
    for i, row in enumerate(rows):
        if len(row) != len(header):
            raise ValueError(f"rows[{i}] has {len(row)} cells, header has {len(header)}")
        cells.append([_cell(v) for v in row])
    head = [str(h) for h in header]
    widths = [max([len(head[j])] + [len(r[j][0]) for r in cells]) for j in range(len(head))]
    right = [bool(cells) and all(r[j][1] for r in cells) for j in range(len(head))]

    def line(texts: list[str]) -> str:
        return "  ".join(t.rjust(w) if rj else t.ljust(w) for t, w, rj in zip(texts, widths, right))

    out = [line(head), "  ".join("-" * w for w in widths)]
    out += [line([t for t, _ in r]) for r in cells]
    return "\n".join(out)


def before_after_table(before: dict[str, Any] | None, after: dict[str, Any], best: dict[str, Any] | None,
                       seconds_per_iteration: float) -> str:
    """The table a run prints at its end: every held-out ``eval/*`` scalar of ``after`` with its
    value before training, after it, and at the best evaluation (``best["step"]``), then the
    mean seconds per iteration. Missing values print as ``-``."""
    before, best = before or {}, best or {}
    rows: list[list] = [[key.removeprefix("eval/"), before.get(key), after[key], best.get(key)]
                        for key in after if key.startswith("eval/")]
    rows.append(["seconds / iteration", None, seconds_per_iteration, None])
    return format_table(["held-out metric", "before", "after", f"best (it {best.get('step', '-')})"], rows)
