"""LAION aesthetic predictor v2 ("improved-aesthetic-predictor", C. Schuhmann 2022): an MLP on
L2-normalised CLIP ViT-L/14 image embeddings, trained on SAC + LOGOS + AVA ratings (1-10 scale).

Reference: ``christophschuhmann/improved-aesthetic-predictor/simple_inference.py`` (``MLP`` class,
``normalized(image_features)`` then ``model(...)``) and DDPO's ``ddpo_pytorch/aesthetic_scorer.py``
(the same head on transformers' ``openai/clip-vit-large-patch14`` + ``CLIPProcessor``)::

    score = MLP(e / ||e||),  e = CLIP ViT-L/14 image embedding
    MLP = Linear(768, 1024) Dropout Linear(1024, 128) Dropout Linear(128, 64) Dropout Linear(64, 16) Linear(16, 1)

(no activations: the released model is affine). The head loads from the released ``.pth``
state dict (``layers.0.weight``, ``layers.0.bias``, ``layers.2.*``, ``layers.4.*``, ``layers.6.*``,
``layers.7.*``): ``sac+logos+ava1-l14-linearMSE.pth``, mirrored on the hub by TRL's DDPO example as
``trl-lib/ddpo-aesthetic-predictor`` / ``aesthetic-model.pth``.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from ._media import check_media
from .base import RewardOutput
from .clip_models import ClipFeatures, resolve_file, write_tiny_clip

__all__ = ["AestheticMLP", "LaionAesthetic"]


class AestheticMLP(nn.Module):
    """The improved-aesthetic-predictor head: ``[B, input_size]`` unit-norm embeddings -> ``[B, 1]``.

    Module names match the released state dict (``layers.{0,2,4,6,7}``).
    """

    def __init__(self, input_size: int = 768) -> None:
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)

    @classmethod
    def from_file(cls, file: str) -> "AestheticMLP":
        """Load a released ``.pth`` state dict (its ``layers.0.weight`` fixes ``input_size``)."""
        state = torch.load(file, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:  # a Lightning checkpoint
            state = state["state_dict"]
        if not isinstance(state, dict) or "layers.0.weight" not in state:
            keys = sorted(state)[:8] if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"{file!r} is not an aesthetic-predictor state dict (no 'layers.0.weight'; got {keys})")
        head = cls(int(state["layers.0.weight"].shape[1]))
        head.load_state_dict(state)  # strict: a wrong layout fails with the offending keys
        return head.eval().requires_grad_(False)


class LaionAesthetic:
    """LAION aesthetic score (about 1-10; higher is prettier).

    Args:
        head_path: the head ``.pth`` file, a directory holding ``head_filename``, or a hub repo id.
        head_filename: file name inside a directory / hub repo.
        clip_path: the CLIP ViT-L/14 ``CLIPModel`` (its image tower only is used).
        processor_path: its processor; default ``clip_path``.
        device, dtype, batch_size: as in :class:`flowalign.rewards.pickscore.PickScore`.
    """

    name = "laion_aesthetic"
    modality = "image"

    def __init__(self, head_path: str = "trl-lib/ddpo-aesthetic-predictor", head_filename: str = "aesthetic-model.pth",
                 clip_path: str = "openai/clip-vit-large-patch14", processor_path: str | None = None,
                 device: str = "cpu", dtype: str = "float32", batch_size: int = 16) -> None:
        self.features = ClipFeatures.from_pretrained(clip_path, processor_path, device, dtype, batch_size)
        self.head = AestheticMLP.from_file(resolve_file(head_path, head_filename)).to(self.features.device)
        dim = self.features.model.config.projection_dim
        if self.head.input_size != dim:
            raise ValueError(f"aesthetic head {head_path!r} takes {self.head.input_size}-d embeddings but CLIP model "
                             f"{clip_path!r} produces {dim}-d ones")
        self.head_path, self.clip_path = head_path, clip_path

    @torch.no_grad()
    def __call__(self, media: Tensor, prompts: Sequence[str] | None = None,
                 metadata: Sequence[dict[str, Any]] | None = None) -> RewardOutput:
        """``media [B, 3, H, W]`` in [0, 1] -> scores ``[B]`` on ``media``'s device (prompts unused)."""
        media = check_media(media, "image")
        score = self.head(self.features.images(media)).squeeze(-1)
        return RewardOutput(scores=score.to(media.device))

    @classmethod
    def tiny(cls, tmp_dir: str, **kwargs: Any) -> "LaionAesthetic":
        """Tests only: a tiny CLIP (hub layout) and a random head saved as a ``.pth`` state dict."""
        directory = os.path.join(str(tmp_dir), "aesthetic-tiny")
        model = write_tiny_clip(directory, seed=3)
        torch.manual_seed(4)
        head_file = os.path.join(directory, "aesthetic-model.pth")
        torch.save(AestheticMLP(model.config.projection_dim).state_dict(), head_file)
        return cls(head_path=head_file, clip_path=directory, **kwargs)

    def __repr__(self) -> str:
        return f"LaionAesthetic(head_path={self.head_path!r}, clip_path={self.clip_path!r})"
