"""Data helpers of the digits quickstart: images, deliberately flawed labels, and prompts.

Everything here is a pure function of its arguments (and a seed), so the shipped quickstart
model, its reward and the tests all see the same data:

* :func:`load_digit_images` -- scikit-learn's 1797 handwritten 8x8 digits, upsampled to 16x16.
* :func:`corrupt_labels` -- the deliberate flaw of the quickstart base model (docs/ARCHITECTURE.md, "The
  shipped quickstart tasks"): a share of the digit labels is swapped for a wrong digit, so that
  continued pretraining on the same data keeps reproducing the confusion while RL against a
  verifier can remove it.
* :data:`TRAIN_TEMPLATES` / :data:`EVAL_TEMPLATES` and :func:`digit_prompts` -- prompt sets. RL
  trains on the train templates only; the eval templates are held out from RL (pretraining sees
  all of them so the model understands both).
* :func:`parse_digit` -- the digit a prompt asks for.
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from flowalign.pipelines.toy import DIGIT_VOCAB, NUMBER_WORDS

# {w}: the number word ("seven"); {n}: the numeral ("7"). Every word is in DIGIT_VOCAB and every
# prompt has at most 6 words (the ToyPromptEncoder's max_length).
TRAIN_TEMPLATES: tuple[str, ...] = (
    "a handwritten {w}",
    "the digit {w}",
    "a picture of the number {w}",
)
EVAL_TEMPLATES: tuple[str, ...] = (
    "a drawing of the digit {w}",
    "the number {n}",
    "{w} written by hand",
)
ALL_TEMPLATES: tuple[str, ...] = TRAIN_TEMPLATES + EVAL_TEMPLATES

_WORD_TO_DIGIT = {w: d for d, w in enumerate(NUMBER_WORDS)}


def load_digit_images(size: int = 16) -> tuple[Tensor, Tensor]:
    """scikit-learn's ``load_digits`` as model-ready tensors.

    Args:
        size: output side length; the 8x8 originals (values 0-16) are resized bilinearly
            (antialiased when shrinking).

    Returns:
        images: ``[1797, 1, size, size]`` float32 in [-1, 1] (0 -> -1 background, 16 -> 1 ink).
        labels: ``[1797]`` long digits 0-9.
    """
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0 * 2.0 - 1.0
    if size != 8:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=size < 8)
    return images.clamp(-1.0, 1.0).contiguous(), torch.as_tensor(digits.target, dtype=torch.long)


def split_indices(n: int, test_fraction: float = 0.2, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A seeded random train / test split of ``range(n)``: ``(train_idx [n - k], test_idx [k])``
    with ``k = round(test_fraction * n)``, each sorted ascending."""
    if n < 2:
        raise ValueError(f"n must be >= 2 to split, got {n!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    k = max(1, min(n - 1, round(test_fraction * n)))
    return perm[k:].sort().values, perm[:k].sort().values


def digit_derangement(seed: int) -> Tensor:
    """A seeded permutation ``pi [10]`` of the digits with no fixed point (``pi[d] != d``)."""
    gen = torch.Generator().manual_seed(seed)
    while True:  # rejection sampling; about 1/e of the permutations are derangements
        pi = torch.randperm(10, generator=gen)
        if bool((pi != torch.arange(10)).all()):
            return pi


def corrupt_labels(labels: Tensor, fraction: float, seed: int, scheme: str = "derangement") -> Tensor:
    """Replace exactly ``round(fraction * N)`` labels, chosen at random, by a wrong digit.

    Args:
        labels: ``[N]`` integer digits 0-9 (not modified).
        fraction: share of labels to change, in [0, 1].
        seed: seeds both the choice of items and the wrong digits.
        scheme: ``"derangement"`` -- a changed digit ``d`` becomes ``pi[d]`` for one seeded
            derangement ``pi`` (:func:`digit_derangement`), i.e. a fixed confusion per digit that
            classifier-free guidance cannot average away; ``"uniform"`` -- each changed item gets
            a uniformly random wrong digit.

    Returns:
        ``[N]`` long labels; every changed item differs from its true label.
    """
    if not isinstance(labels, Tensor) or labels.ndim != 1 or labels.is_floating_point():
        raise ValueError(f"labels must be a 1-D integer tensor, got {type(labels).__name__} "
                         f"{tuple(getattr(labels, 'shape', ()))}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > 9):
        raise ValueError(f"labels must be digits 0-9, got values in [{int(labels.min())}, {int(labels.max())}]")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction!r}")
    if scheme not in ("derangement", "uniform"):
        raise ValueError(f"scheme must be 'derangement' or 'uniform', got {scheme!r}")
    labels = labels.long()
    gen = torch.Generator().manual_seed(seed)
    changed = torch.randperm(labels.numel(), generator=gen)[: round(fraction * labels.numel())]
    out = labels.clone()
    if scheme == "derangement":
        out[changed] = digit_derangement(seed)[labels[changed]]
    else:  # adding 1..9 modulo 10 never returns the same digit
        out[changed] = (labels[changed] + torch.randint(1, 10, (changed.numel(),), generator=gen)) % 10
    return out


def format_prompt(template: str, digit: int) -> str:
    """Fill ``{w}`` with the number word and ``{n}`` with the numeral of ``digit``."""
    if not isinstance(digit, int) or not 0 <= digit <= 9:
        raise ValueError(f"digit must be an int in 0-9, got {digit!r}")
    if "{w}" not in template and "{n}" not in template:
        raise ValueError(f"template {template!r} has no '{{w}}' or '{{n}}' placeholder")
    return template.replace("{w}", NUMBER_WORDS[digit]).replace("{n}", str(digit))


def digit_prompts(templates: Sequence[str], digits: Iterable[int] = range(10)) -> list[str]:
    """All ``template x digit`` prompts, template-major: ``[t0(d0), t0(d1), ..., t1(d0), ...]``."""
    digits = [int(d) for d in digits]
    return [format_prompt(t, d) for t in templates for d in digits]


def parse_digit(prompt: str) -> int:
    """The single digit a prompt asks for, written as a number word or a one-digit numeral.

    Raises:
        ValueError: naming the prompt when it mentions no digit, a multi-digit number, or
            several different digits.
    """
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a str, got {type(prompt).__name__}: {prompt!r}")
    found = set()
    for token in re.findall(r"[a-z]+|[0-9]+", prompt.lower()):
        if token.isdigit():
            if len(token) != 1:
                raise ValueError(f"prompt {prompt!r} names the multi-digit number {token!r}, not a digit")
            found.add(int(token))
        elif token in _WORD_TO_DIGIT:
            found.add(_WORD_TO_DIGIT[token])
    if not found:
        raise ValueError(f"prompt {prompt!r} names no digit (expected a number word or a numeral 0-9)")
    if len(found) > 1:
        raise ValueError(f"prompt {prompt!r} is ambiguous: it names the digits {sorted(found)}")
    return found.pop()


def _check_vocab(templates: Sequence[str]) -> None:
    """Fail at import if a template uses a word the toy prompt encoder does not know."""
    for prompt in digit_prompts(templates):
        words = re.findall(r"[a-z0-9]+", prompt.lower())
        unknown = [w for w in words if w not in DIGIT_VOCAB]
        if unknown or len(words) > 6:
            raise ValueError(f"template prompt {prompt!r}: unknown words {unknown} or more than 6 words")


_check_vocab(ALL_TEMPLATES)
