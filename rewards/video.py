"""Video rewards: any image reward over sampled frames, and CLIP temporal consistency.

* :class:`FrameAggregatedReward` ("video_frames") -- builds an image reward by name / spec, scores
  ``num_frames`` uniformly spaced frames of each video and reduces them per video by the mean or
  the minimum (the per-frame image rewards of DanceGRPO / Flow-GRPO video runs use the mean).
* :class:`TemporalConsistencyReward` ("temporal_consistency") -- EvalCrafter's CLIP-Temp
  (Liu et al. 2024, "EvalCrafter: Benchmarking and Evaluating Large Video Generation Models",
  Sec. 3.4 "Temporal Consistency"): the mean cosine similarity of the CLIP image embeddings of
  adjacent frames, ``(1 / (F - 1)) Σ_f cos(e_f, e_{f+1})``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from ._media import check_media, to_pil_images, video_to_frames
from .base import RewardOutput, as_reward_output

__all__ = ["frame_indices", "adjacent_cosine", "FrameAggregatedReward", "TemporalConsistencyReward"]

REDUCTIONS = ("mean", "min")


def frame_indices(total: int, num_frames: int | None) -> Tensor:
    """Indices of ``num_frames`` uniformly spaced frames of ``total``: ``round(linspace(0, total - 1, n))``
    (first and last frame always included); all frames when ``num_frames`` is ``None`` or ``>= total``."""
    if num_frames is None or num_frames >= total:
        return torch.arange(total)
    if num_frames == 1:
        return torch.tensor([(total - 1) // 2])  # the middle frame
    return torch.linspace(0, total - 1, num_frames, dtype=torch.float64).round().long()


def adjacent_cosine(embeddings: Tensor) -> Tensor:
    """``[B, F, D]`` frame embeddings -> ``[B, F - 1]`` cosine similarities of frames ``f`` and ``f + 1``."""
    if embeddings.ndim != 3 or embeddings.shape[1] < 2:
        raise ValueError(f"adjacent_cosine: embeddings must be [B, F >= 2, D], got shape {tuple(embeddings.shape)}")
    unit = torch.nn.functional.normalize(embeddings.float(), dim=-1)
    return (unit[:, :-1] * unit[:, 1:]).sum(dim=-1)


def _check_batch(name: str, batch: int, prompts: Sequence[str], metadata: Sequence[dict] | None) -> None:
    if len(prompts) != batch:
        raise ValueError(f"{name}: got {len(prompts)} prompts for a media batch of {batch}")
    if metadata is not None and len(metadata) != batch:
        raise ValueError(f"{name}: got {len(metadata)} metadata entries for a media batch of {batch}")


class FrameAggregatedReward:
    """A video reward from an image reward: score sampled frames, reduce per video.

    Every sampled frame of video ``b`` is scored with prompt ``prompts[b]`` (and ``metadata[b]``) in
    one call of the image reward over ``B * K`` frames; ``score_b = mean_k s_bk`` or ``min_k s_bk``.
    The image reward's components are reduced the same way; ``frame_min`` / ``frame_max`` are added.
    A video is valid when all its scored frames are.

    Args:
        reward: an image reward spec: a name (``"pickscore"``), a dict ``{"_component_": ..., **kwargs}``,
            a Reward object or a callable (anything :func:`flowalign.rewards.registry.build_reward` takes).
        reduce: ``"mean"`` or ``"min"`` over frames.
        num_frames: number of uniformly spaced frames to score (:func:`frame_indices`); ``None`` = all.
    """

    name = "video_frames"
    modality = "video"

    def __init__(self, reward: Any, reduce: str = "mean", num_frames: int | None = None) -> None:
        from .registry import build_reward

        if reduce not in REDUCTIONS:
            raise ValueError(f"FrameAggregatedReward: reduce must be one of {list(REDUCTIONS)}, got {reduce!r}")
        if num_frames is not None and (isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1):
            raise ValueError(f"FrameAggregatedReward: num_frames must be a positive int or None, got {num_frames!r}")
        self.reward = build_reward(reward)
        if self.reward.modality != "image":
            raise ValueError(f"FrameAggregatedReward: reward {self.reward.name!r} has modality {self.reward.modality!r}; "
                             "it needs an image reward")
        self.reduce, self.num_frames = reduce, num_frames

    @classmethod
    def tiny(cls, tmp_dir: str) -> "FrameAggregatedReward":
        """Tests only: DDPO JPEG compressibility (no weights) over 3 frames."""
        return cls("jpeg_compressibility", reduce="mean", num_frames=3)

    def _reduce(self, values: Tensor) -> Tensor:
        return values.mean(dim=1) if self.reduce == "mean" else values.amin(dim=1)

    @torch.no_grad()
    def __call__(self, media: Tensor, prompts: Sequence[str], metadata: Sequence[dict[str, Any]] | None = None
                 ) -> RewardOutput:
        """``media [B, F, 3, H, W]`` in [0, 1] -> scores ``[B]`` (on ``media``'s device)."""
        media = check_media(media, "video")
        batch, total = media.shape[:2]
        _check_batch(f"reward {self.name!r}", batch, prompts, metadata)
        idx = frame_indices(total, self.num_frames).to(media.device)
        frames, k = video_to_frames(media.index_select(1, idx))  # [B * K, 3, H, W], video b = rows b*K:(b+1)*K
        frame_prompts = [p for p in prompts for _ in range(k)]
        frame_meta = None if metadata is None else [m for m in metadata for _ in range(k)]
        out = as_reward_output(self.reward(frames, frame_prompts, frame_meta))
        if out.scores.shape[0] != batch * k:
            raise ValueError(f"image reward {self.reward.name!r} returned {out.scores.shape[0]} scores for {batch * k} frames")
        per_frame = out.scores.to(media.device).view(batch, k)
        components = {c: self._reduce(v.to(media.device).float().view(batch, k)) for c, v in out.components.items()}
        components.update(frame_min=per_frame.amin(dim=1), frame_max=per_frame.amax(dim=1))
        valid = None if out.valid is None else out.valid.to(media.device).view(batch, k).all(dim=1)
        return RewardOutput(scores=self._reduce(per_frame), components=components, valid=valid)

    def __repr__(self) -> str:
        return f"FrameAggregatedReward({self.reward!r}, reduce={self.reduce!r}, num_frames={self.num_frames})"


class TemporalConsistencyReward:
    """EvalCrafter CLIP-Temp: mean cosine similarity of adjacent frames' CLIP image embeddings.

    Loads a transformers ``CLIPVisionModelWithProjection`` and its ``CLIPImageProcessor`` from
    ``path`` (a full CLIP checkpoint such as ``openai/clip-vit-base-patch32`` -- EvalCrafter's model
    -- or a vision-only one). Preprocessing is the checkpoint's ``preprocessor_config.json`` through
    transformers' PIL image processor: resize the shortest side to 224 (PIL bicubic), centre-crop 224,
    scale to [0, 1], normalize with the OpenAI CLIP mean / std -- the ``_transform`` of openai/CLIP
    ``clip/clip.py`` that EvalCrafter applies (checked against a hand computation in the tests).

    ``__call__(media [B, F >= 2, 3, H, W], prompts, metadata) -> RewardOutput``: ``scores [B]`` in
    [-1, 1]; component ``min_adjacent`` is the least similar adjacent pair. Prompts are unused.

    Args:
        path: local directory or hub id of the CLIP checkpoint.
        device: where the model runs.
        batch_size: frames per forward pass.
    """

    name = "temporal_consistency"
    modality = "video"

    def __init__(self, path: str = "openai/clip-vit-base-patch32", device: str = "cpu", batch_size: int = 64) -> None:
        from transformers import AutoConfig, CLIPConfig, CLIPVisionModelWithProjection

        try:  # transformers >= 5: the PIL backend by name, so results do not depend on torchvision being installed
            from transformers import CLIPImageProcessorPil as CLIPImageProcessor
        except ImportError:  # transformers 4: CLIPImageProcessor is the PIL implementation
            from transformers import CLIPImageProcessor

        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"TemporalConsistencyReward: batch_size must be a positive int, got {batch_size!r}")
        try:
            self.processor = CLIPImageProcessor.from_pretrained(path)
            config = AutoConfig.from_pretrained(path)
            if isinstance(config, CLIPConfig):  # a full CLIP checkpoint: its projection size is top-level
                vision = config.vision_config
                vision.projection_dim = config.projection_dim
                config = vision
            self.model = CLIPVisionModelWithProjection.from_pretrained(path, config=config)
        except OSError as err:
            raise OSError(f"TemporalConsistencyReward: cannot load a CLIP checkpoint from path={path!r}: {err}") from err
        self.device = torch.device(device)
        self.model = self.model.to(self.device).eval().requires_grad_(False)
        self.path, self.batch_size = str(path), batch_size

    @classmethod
    def tiny(cls, tmp_dir: str) -> "TemporalConsistencyReward":
        """Tests only: a random tiny CLIP (text + vision, the layout of ``openai/clip-vit-*``) and a
        16-px processor saved to ``tmp_dir``, loaded back through ``__init__``."""
        from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

        torch.manual_seed(0)
        config = CLIPConfig(
            text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                             num_attention_heads=4, max_position_embeddings=32),
            vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                               image_size=16, patch_size=4),
            projection_dim=16,
        )
        CLIPModel(config).eval().save_pretrained(tmp_dir)
        CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(tmp_dir)
        return cls(tmp_dir)

    def pixel_values(self, frames: Tensor) -> Tensor:
        """``[N, 3, H, W]`` frames in [0, 1] -> ``[N, 3, S, S]`` CLIP inputs (the checkpoint's processor)."""
        return self.processor(images=to_pil_images(frames), return_tensors="pt")["pixel_values"]

    @torch.no_grad()
    def embed(self, frames: Tensor) -> Tensor:
        """``[N, 3, H, W]`` frames in [0, 1] -> ``[N, D]`` CLIP image embeddings (projected, not normalized)."""
        chunks = []
        for start in range(0, frames.shape[0], self.batch_size):
            pixels = self.pixel_values(frames[start:start + self.batch_size]).to(self.device, self.model.dtype)
            chunks.append(self.model(pixel_values=pixels).image_embeds.float())
        return torch.cat(chunks)

    @torch.no_grad()
    def __call__(self, media: Tensor, prompts: Sequence[str], metadata: Sequence[dict[str, Any]] | None = None
                 ) -> RewardOutput:
        """``media [B, F, 3, H, W]`` in [0, 1], ``F >= 2`` -> scores ``[B]`` (on ``media``'s device)."""
        frames, total = video_to_frames(media)
        batch = media.shape[0]
        _check_batch(f"reward {self.name!r}", batch, prompts, metadata)
        if total < 2:
            raise ValueError(f"reward {self.name!r} needs videos of at least 2 frames, got F={total}")
        sims = adjacent_cosine(self.embed(frames).view(batch, total, -1)).to(media.device)  # [B, F - 1]
        # EvalCrafter CLIP-Temp: average over the F - 1 adjacent pairs.
        return RewardOutput(scores=sims.mean(dim=1), components={"min_adjacent": sims.amin(dim=1)})

    def __repr__(self) -> str:
        return f"TemporalConsistencyReward(path={self.path!r}, device={str(self.device)!r})"
