"""Digit rewards of the quickstart task: a CNN reward the policy trains on and an independent judge.

* :class:`DigitClassifierReward` ("digit_classifier") -- a small CNN (:class:`DigitClassifierNet`,
  shipped in ``assets/quickstart/digit-classifier``); score = its softmax probability of the
  prompted digit.
* :class:`DigitJudge` ("digit_judge") -- a model of another kind (an RBF support-vector machine
  with Platt-scaled probabilities) fitted on scikit-learn's 8x8 digits with their correct labels.
  The policy never trains on it: where reward and judge disagree, the policy hacked the CNN.

* :class:`DigitPairwiseJudge` / :class:`DigitAspectJudge` -- scripted pairwise judges for Pref-GRPO;
  the second also gives verdicts per dimension (correctness, sharpness, centering).

All take media ``[B, 3, H, W]`` in [0, 1] (grey = channel mean) and the target digit from
``metadata[i]["digit"]`` when given, else from the prompt (:func:`flowalign.data.digits.parse_digit`).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import Tensor, nn

from flowalign.data.digits import parse_digit

from .base import RewardOutput


def target_digits(prompts: Sequence[str], metadata: Sequence[dict[str, Any]] | None, batch: int) -> Tensor:
    """``[B]`` long target digits: ``metadata[i]["digit"]`` when present, else parsed from the prompt."""
    if len(prompts) != batch:
        raise ValueError(f"got {batch} media but {len(prompts)} prompts")
    if metadata is not None and len(metadata) != batch:
        raise ValueError(f"got {batch} media but {len(metadata)} metadata entries")
    targets = []
    for i, prompt in enumerate(prompts):
        meta = metadata[i] if metadata is not None else None
        if meta and "digit" in meta:
            digit = meta["digit"]
            if isinstance(digit, bool) or int(digit) != digit or not 0 <= int(digit) <= 9:
                raise ValueError(f"metadata[{i}]['digit'] must be a digit 0-9, got {digit!r}")
            targets.append(int(digit))
        else:
            targets.append(parse_digit(prompt))
    return torch.tensor(targets, dtype=torch.long)


def media_to_grey(media: Tensor, size: int) -> Tensor:
    """``[B, C, H, W]`` media in [0, 1] (C = 1 or 3) -> ``[B, 1, size, size]`` grey in [0, 1].

    Grey is the channel mean; shrinking uses area averaging, enlarging bilinear interpolation.
    """
    if not isinstance(media, Tensor) or media.ndim != 4 or media.shape[1] not in (1, 3):
        raise ValueError(f"media must be a [B, 3, H, W] image tensor, got shape {tuple(getattr(media, 'shape', ()))}")
    if not torch.isfinite(media).all():
        raise ValueError("media contains NaN or inf values")
    grey = media.float().mean(dim=1, keepdim=True)
    height, width = grey.shape[-2:]
    if (height, width) == (size, size):
        return grey
    if height >= size and width >= size:
        return F.interpolate(grey, size=(size, size), mode="area")
    return F.interpolate(grey, size=(size, size), mode="bilinear", align_corners=False)


def _output(probs: Tensor, targets: Tensor) -> RewardOutput:
    """Score = probability of the target ``[B]``; component ``accuracy`` = argmax == target."""
    targets = targets.to(probs.device)
    score = probs.gather(1, targets[:, None]).squeeze(1)
    accuracy = (probs.argmax(dim=1) == targets).float()
    return RewardOutput(scores=score, components={"accuracy": accuracy})


class DigitClassifierNet(ModelMixin, ConfigMixin):
    """A small CNN: ``[B, 1, S, S]`` in [-1, 1] -> ``[B, num_classes]`` logits.

    Two conv blocks (3x3 conv + ReLU, 2x2 max-pool) and an MLP head with dropout.
    """

    @register_to_config
    def __init__(self, image_size: int = 16, channels: tuple[int, int] = (16, 32), hidden: int = 64,
                 num_classes: int = 10, dropout: float = 0.2):
        super().__init__()
        if image_size % 4:
            raise ValueError(f"image_size must be divisible by 4, got {image_size!r}")
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(c2 * (image_size // 4) ** 2, hidden), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class DigitClassifierReward:
    """Reward = the CNN's softmax probability of the prompted digit.

    Args:
        path: a directory written by ``DigitClassifierNet.save_pretrained``.
        device: where the network runs.
    """

    name = "digit_classifier"
    modality = "image"

    def __init__(self, path: str, device: str = "cpu"):
        if not os.path.isfile(os.path.join(str(path), "config.json")):
            raise FileNotFoundError(f"digit classifier not found at {str(path)!r} (expected a save_pretrained "
                                    "directory with config.json)")
        self.device = torch.device(device)
        self.net = DigitClassifierNet.from_pretrained(str(path)).to(self.device).eval().requires_grad_(False)

    @classmethod
    def tiny(cls, directory: str) -> "DigitClassifierReward":
        """A random-weight classifier saved to ``directory`` and loaded through ``__init__`` (tests)."""
        torch.manual_seed(0)
        DigitClassifierNet().save_pretrained(directory)
        return cls(directory)

    @torch.no_grad()
    def embed(self, media: Tensor) -> Tensor:
        """``media [B, 3, H, W]`` in [0, 1] -> ``[B, hidden]`` penultimate-layer features (after the
        hidden ReLU, dropout off): the space in which evaluations measure sample diversity."""
        grey = media_to_grey(media, self.net.config.image_size).to(self.device)
        return self.net.head[:-2](self.net.features(grey * 2.0 - 1.0)).float()

    @torch.no_grad()
    def __call__(self, media: Tensor, prompts: Sequence[str], metadata: Sequence[dict[str, Any]] | None = None
                 ) -> RewardOutput:
        """``media [B, 3, H, W]`` in [0, 1] -> scores ``[B]`` in [0, 1] (on ``media``'s device)."""
        grey = media_to_grey(media, self.net.config.image_size).to(self.device)
        targets = target_digits(prompts, metadata, media.shape[0])
        probs = self.net(grey * 2.0 - 1.0).float().softmax(dim=1)
        out = _output(probs, targets)
        return RewardOutput(out.scores.to(media.device), {k: v.to(media.device) for k, v in out.components.items()})


class DigitJudge:
    """Independent judge: an RBF SVM on 8x8 area-downsampled images scaled to 0-16 (the
    ``load_digits`` format), fitted on all 1797 digits with their correct labels.

    Probabilities are Platt-scaled (Platt 1999, "Probabilistic outputs for support vector
    machines"): a sigmoid fitted on 5-fold (unshuffled, stratified) cross-validated decision values
    by ``CalibratedClassifierCV(SVC(), method="sigmoid", ensemble=False)``, which is deterministic.
    Fitting takes about a second on one core.
    """

    name = "digit_judge"
    modality = "image"

    def __init__(self, C: float = 10.0):
        from sklearn.calibration import CalibratedClassifierCV
        from sklearn.datasets import load_digits
        from sklearn.svm import SVC

        digits = load_digits()
        self.svm = CalibratedClassifierCV(SVC(C=C, kernel="rbf", gamma="scale"), method="sigmoid", cv=5, ensemble=False)
        self.svm.fit(digits.data, digits.target)
        if list(self.svm.classes_) != list(range(10)):
            raise RuntimeError(f"judge classes must be 0-9, got {list(self.svm.classes_)}")

    def features(self, media: Tensor) -> Tensor:
        """``[B, 3, H, W]`` in [0, 1] -> ``[B, 64]`` 8x8 grey features in [0, 16]."""
        return (media_to_grey(media, 8) * 16.0).flatten(1).cpu().double()

    @torch.no_grad()
    def __call__(self, media: Tensor, prompts: Sequence[str], metadata: Sequence[dict[str, Any]] | None = None
                 ) -> RewardOutput:
        """``media [B, 3, H, W]`` in [0, 1] -> scores ``[B]`` in [0, 1] (on ``media``'s device)."""
        features = self.features(media)
        targets = target_digits(prompts, metadata, media.shape[0])
        probs = torch.as_tensor(self.svm.predict_proba(features.numpy()), dtype=torch.float32)
        out = _output(probs, targets)
        return RewardOutput(out.scores.to(media.device), {k: v.to(media.device) for k, v in out.components.items()})


class DigitPairwiseJudge:
    """A pairwise judge for the quickstart (Pref-GRPO's preference model, scripted): which of two
    images shows the prompted digit more clearly, by the reward CNN.

    ``P(a ≻ b) = sigmoid((p_a − p_b) / temperature)`` with ``p`` the CNN's probability of the prompted
    digit -- a Bradley–Terry preference (Bradley & Terry 1952) on the classifier's confidence, so
    two equally good images tie at ½. Wrap it in ``pairwise_winrate`` to train on win rates.

    Args:
        path: the digit classifier directory (as :class:`DigitClassifierReward`).
        temperature: > 0; smaller is closer to a hard comparison.
    """

    name = "digit_pairwise"
    modality = "image"

    def __init__(self, path: str, temperature: float = 0.05, device: str = "cpu"):
        if not temperature > 0:
            raise ValueError(f"DigitPairwiseJudge: temperature must be > 0, got {temperature!r}")
        self.classifier = DigitClassifierReward(path, device=device)
        self.temperature = float(temperature)

    @torch.no_grad()
    def compare(self, media_a: Tensor, media_b: Tensor, prompts: Sequence[str]) -> Tensor:
        """``P(a ≻ b)`` ``[P]`` for image pairs ``media_a, media_b [P, 3, H, W]`` under ``prompts``."""
        p_a = self.classifier(media_a, prompts).scores.float()
        p_b = self.classifier(media_b, prompts).scores.float()
        return torch.sigmoid((p_a - p_b) / self.temperature)


class DigitAspectJudge(DigitPairwiseJudge):
    """:class:`DigitPairwiseJudge` with verdicts per dimension, the toy counterpart of Pref-GRPO's
    UnifiedReward-Flex categories (CodeGoat24/Pref-GRPO @ 3e787f6, ``fastvideo/rewards/unifiedreward_flex.py``;
    protocol: :data:`flowalign.rewards.groupwise.DIMENSIONS_PROTOCOL`).

    The overall verdict is :class:`DigitPairwiseJudge`'s (which image the CNN finds more like the
    prompted digit), so without the dimensions this judge trains exactly as that one. The dimensions,
    each a Bradley-Terry verdict ``sigmoid((s_a − s_b) / temperature)`` on its own score ``s`` in [0, 1]
    (equal scores tie at ½):

    * ``correctness`` -- 1 if the CNN's most likely digit is the prompted one, else 0 (a pass / fail
      verdict: two correct or two wrong images tie, unlike the graded overall verdict);
    * ``sharpness`` -- mean ``|2g − 1|`` over the grey image ``g``: 1 for pure black and white strokes,
      0 for uniform mid-grey blur;
    * ``centering`` -- ``1 − d / d_max``, ``d`` the distance of the ink's centre of mass (grey as mass)
      from the image centre, ``d_max`` the centre-to-corner distance (an image without ink scores 0).
    """

    name = "digit_aspects"
    dimensions = ("correctness", "sharpness", "centering")

    def aspect_scores(self, media: Tensor, prompts: Sequence[str]) -> Tensor:
        """``[B, 3]`` the scores of the three dimensions, in [0, 1]."""
        out = self.classifier(media, prompts)
        correct = out.components["accuracy"].float().cpu()
        grey = media.detach().float().mean(dim=1).cpu()  # [B, H, W]
        sharp = (2 * grey - 1).abs().flatten(1).mean(1)
        height, width = grey.shape[-2:]
        ys = torch.arange(height, dtype=torch.float32)[:, None].expand(height, width)
        xs = torch.arange(width, dtype=torch.float32)[None, :].expand(height, width)
        mass = grey.flatten(1).sum(1)
        cy = (grey * ys).flatten(1).sum(1) / mass.clamp_min(1e-12)
        cx = (grey * xs).flatten(1).sum(1) / mass.clamp_min(1e-12)
        d_max = ((height - 1) ** 2 / 4 + (width - 1) ** 2 / 4) ** 0.5
        dist = ((cy - (height - 1) / 2) ** 2 + (cx - (width - 1) / 2) ** 2).sqrt()
        centred = torch.where(mass > 0, 1 - dist / max(d_max, 1e-12), torch.zeros_like(dist)).clamp(0, 1)
        return torch.stack([correct, sharp, centred], dim=1)

    @torch.no_grad()
    def compare_dimensions(self, media_a: Tensor, media_b: Tensor, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """``(P(a ≻ b) [P], per-dimension P(a ≻ b) [P, 3])`` for image pairs ``[P, 3, H, W]``."""
        overall = self.compare(media_a, media_b, prompts)
        diff = self.aspect_scores(media_a, prompts) - self.aspect_scores(media_b, prompts)
        return overall, torch.sigmoid(diff / self.temperature)
