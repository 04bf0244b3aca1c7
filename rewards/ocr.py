"""OCR reward: does the image spell the text quoted in the prompt? (Flow-GRPO's text-rendering task).

Liu et al. 2025, "Flow-GRPO", Sec. 4 (visual text rendering) and the reference code
``flow_grpo/ocr.py`` (``OcrScorer``, github.com/yifan123/flow_grpo): the target is the text between
the first pair of double quotes of the prompt (``'a sign that says "hello world"'`` -> ``hello world``);
recognized text and target are lowercased with spaces removed; the distance is 0 when the target
occurs inside the recognized text, else their Levenshtein distance, capped at ``len(target)``; and

    reward = 1 - distance / len(target)            (in [0, 1]; 1 = the text is rendered exactly).

Flow-GRPO recognizes with PaddleOCR; here the recognizer is tesseract through pytesseract
(``apt-get install -y tesseract-ocr`` and ``pip install flowalign[ocr]``), which needs no weights
download. Scores therefore differ from PaddleOCR's on hard images; the scoring rule is the same.
"""

from __future__ import annotations

import shutil
import warnings
from typing import Any, Sequence

import torch
from torch import Tensor

from ._media import to_pil_images
from .base import RewardOutput

__all__ = ["levenshtein", "quoted_target", "normalize_text", "ocr_text_reward", "OcrReward"]

_INSTALL_HINT = "install it with `apt-get install -y tesseract-ocr` and `pip install flowalign[ocr]` (pytesseract)"


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


def _require_tesseract(cmd: str | None) -> tuple[Any, str]:
    """Import pytesseract and resolve the tesseract binary (``cmd``, else pytesseract's default)."""
    try:
        import pytesseract
    except ImportError as err:
        raise ImportError(f"OCR reward needs the pytesseract package; {_INSTALL_HINT}") from err
    binary = cmd if cmd is not None else pytesseract.pytesseract.tesseract_cmd
    resolved = shutil.which(binary)
    if resolved is None:
        raise RuntimeError(f"OCR reward: the tesseract binary {binary!r} was not found on PATH; {_INSTALL_HINT}")
    return pytesseract, resolved


class OcrReward:
    """Flow-GRPO OCR reward with tesseract.

    ``__call__(media [B, 3, H, W] in [0, 1], prompts, metadata) -> RewardOutput``: ``scores [B]``
    in [0, 1] on ``media``'s device; the target is ``metadata[i]["text"]`` when given, else the
    quoted text of ``prompts[i]``. A sample without a target (no quotes in its prompt) gets score 0
    and ``valid=False`` (with a warning naming the prompt). Component ``exact`` is 1.0 where the
    score is 1.

    Args:
        lang: tesseract language(s), e.g. ``"eng"``.
        psm: tesseract page segmentation mode (11 = sparse text: text anywhere in the image).
        tesseract_cmd: path of the tesseract binary, if it is not on ``PATH``.
        device: accepted for the zoo's common signature; tesseract runs on the CPU.
    """

    name = "ocr"
    modality = "image"

    def __init__(self, lang: str = "eng", psm: int = 11, tesseract_cmd: str | None = None, device: str = "cpu") -> None:
        if isinstance(psm, bool) or not isinstance(psm, int) or not 0 <= psm <= 13:
            raise ValueError(f"OcrReward: psm must be a tesseract page segmentation mode 0..13, got {psm!r}")
        if not isinstance(lang, str) or not lang:
            raise ValueError(f"OcrReward: lang must be a tesseract language code such as 'eng', got {lang!r}")
        self._tess, self.tesseract_cmd = _require_tesseract(tesseract_cmd)
        self._tess.pytesseract.tesseract_cmd = self.tesseract_cmd  # pytesseract keeps the binary in a global
        available = set(self._tess.get_languages(config=""))
        missing = [code for code in lang.split("+") if code not in available]
        if missing:
            raise ValueError(f"OcrReward: tesseract has no language data for {missing} (installed: {sorted(available)}); "
                             f"install e.g. `apt-get install tesseract-ocr-{missing[0]}`")
        self.lang, self.psm = lang, psm

    @classmethod
    def tiny(cls, tmp_dir: str) -> "OcrReward":
        """Tests only: tesseract has no weights to build; returns the default reward."""
        return cls()

    def recognize(self, media: Tensor) -> list[str]:
        """Raw tesseract text of each image of ``media [B, 3, H, W]``."""
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
        return f"OcrReward(lang={self.lang!r}, psm={self.psm})"
