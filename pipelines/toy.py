"""The shipped quickstart model: a prompt-conditioned flow-matching model of 16x16 digits.

Components (both real diffusers models, saved / loaded with ``save_pretrained`` /
``from_pretrained``):

* ``unet``: a ``diffusers.UNet2DConditionModel`` in pixel space (1 channel, 16x16, values in
  [-1, 1]) trained with the rectified-flow objective, so its output is the velocity
  ``v = eps - x0`` at ``x_t = (1 - sigma) x0 + sigma eps`` and timestep ``1000 * sigma``.
* ``text_encoder``: :class:`ToyPromptEncoder`, a word-level embedding encoder (a
  ``ModelMixin``/``ConfigMixin`` so it round-trips through ``save_pretrained``).

The quickstart checkpoint in ``assets/quickstart/digits-flow`` is trained by
``assets/make_quickstart.py``; tests build random ones with :func:`build_toy_adapter`.
"""

from __future__ import annotations

import json
import os
import re

import torch
from diffusers import ConfigMixin, ModelMixin, UNet2DConditionModel
from diffusers.configuration_utils import register_to_config
from torch import Tensor, nn

from flowalign.types import Conditioning

from .base import AdapterBase, shift_sigmas
from .common import merged_lora_copy, set_attention_backend

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DIGIT_VOCAB = ["<pad>", "<unk>", "a", "an", "the", "of", "handwritten", "digit", "number", "drawing", "picture",
               "written", "by", "hand", *NUMBER_WORDS, *[str(d) for d in range(10)]]


def toy_unet_config(image_size: int = 16, embed_dim: int = 32) -> dict:
    """The UNet2DConditionModel config of the quickstart model (~1.4M parameters).

    Cross-attention sits only at the 4x4 level: at 16x16, self-attention over 256 tokens made a
    batch-64 forward 6x slower on CPU for no visible quality gain.
    """
    return dict(
        sample_size=image_size,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        cross_attention_dim=embed_dim,
        attention_head_dim=8,
        norm_num_groups=16,
    )


class ToyPromptEncoder(ModelMixin, ConfigMixin):
    """Word-level prompt encoder: token + position embeddings and a 2-layer MLP.

    ``forward(input_ids [B, L]) -> [B, L, embed_dim]``. The empty prompt encodes to all-padding,
    which is the unconditional input for classifier-free guidance.
    """

    @register_to_config
    def __init__(self, vocab: list[str] = DIGIT_VOCAB, embed_dim: int = 32, max_length: int = 6):
        super().__init__()
        self.token_embedding = nn.Embedding(len(vocab), embed_dim)
        self.position_embedding = nn.Embedding(max_length, embed_dim)
        self.mlp = nn.Sequential(nn.LayerNorm(embed_dim), nn.Linear(embed_dim, embed_dim), nn.SiLU(),
                                 nn.Linear(embed_dim, embed_dim))
        self._index = {w: i for i, w in enumerate(vocab)}

    def tokenize(self, prompts: list[str]) -> Tensor:
        """``[B, max_length]`` token ids: lower-cased words, unknown words -> <unk>, padded with 0."""
        length = self.config.max_length
        ids = torch.zeros(len(prompts), length, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            words = re.findall(r"[a-z0-9]+", prompt.lower())[:length]
            ids[row, : len(words)] = torch.tensor([self._index.get(w, 1) for w in words], dtype=torch.long)
        return ids

    def forward(self, input_ids: Tensor) -> Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        h = self.token_embedding(input_ids) + self.position_embedding(positions)
        return h + self.mlp(h)


class ToyAdapter(AdapterBase):
    """Pipeline adapter for the quickstart digits model (pixel space, no VAE).

    Args:
        unet: the velocity-predicting ``UNet2DConditionModel``.
        text_encoder: the :class:`ToyPromptEncoder`.
        shift: sigma-schedule shift (see :func:`flowalign.pipelines.base.shift_sigmas`).
    """

    lora_target_modules = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]

    def __init__(self, unet: UNet2DConditionModel, text_encoder: ToyPromptEncoder, shift: float = 1.0):
        self.unet = self.denoiser = unet
        self.text_encoder = text_encoder.requires_grad_(False).eval()
        self.shift = float(shift)
        size = unet.config.sample_size
        self.latent_shape = (unet.config.in_channels, size, size)

    # -- loading ----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                        attention_backend: str | None = None) -> "ToyAdapter":
        """Load ``path/unet``, ``path/text_encoder`` and ``path/adapter_config.json``."""
        if not os.path.isdir(path):
            raise FileNotFoundError(f"toy model directory not found: {path!r}")
        for sub in ("unet", "text_encoder"):
            if not os.path.isdir(os.path.join(path, sub)):
                raise FileNotFoundError(f"toy model at {path!r} has no {sub!r} folder (expected save_pretrained layout)")
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype)
        encoder = ToyPromptEncoder.from_pretrained(path, subfolder="text_encoder", torch_dtype=dtype)
        extra = {}
        cfg_file = os.path.join(path, "adapter_config.json")
        if os.path.exists(cfg_file):
            with open(cfg_file) as f:
                extra = json.load(f)
        set_attention_backend(unet, attention_backend)
        return cls(unet.to(device), encoder.to(device), shift=extra.get("shift", 1.0))

    def save_pretrained(self, directory: str) -> None:
        """Save both components (LoRA merged into a copy of the UNet) and the schedule shift."""
        unet = merged_lora_copy(self.unet) if self.has_lora() else self.unet
        os.makedirs(directory, exist_ok=True)
        unet.save_pretrained(os.path.join(directory, "unet"))
        self.text_encoder.save_pretrained(os.path.join(directory, "text_encoder"))
        with open(os.path.join(directory, "adapter_config.json"), "w") as f:
            json.dump({"adapter": "toy", "shift": self.shift}, f, indent=2)

    # -- protocol -----------------------------------------------------------------------------
    def to(self, device: str | torch.device) -> "ToyAdapter":
        self.unet.to(device)
        self.text_encoder.to(device)
        return self

    @torch.no_grad()
    def encode(self, prompts: list[str], negative_prompts: list[str] | None = None) -> Conditioning:
        """``prompt_embeds [B, max_length, D]``; the negative half is always present (the empty
        prompt unless ``negative_prompts`` is given) because it costs nothing here."""
        negative_prompts = negative_prompts if negative_prompts is not None else [""] * len(prompts)
        if len(negative_prompts) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(negative_prompts)} negative_prompts")
        embed = lambda p: self.text_encoder(self.text_encoder.tokenize(p).to(self.device))  # noqa: E731
        return Conditioning({"prompt_embeds": embed(list(prompts))}, {"prompt_embeds": embed(list(negative_prompts))})

    def sigmas(self, num_steps: int) -> Tensor:
        return shift_sigmas(torch.linspace(1.0, 0.0, num_steps + 1), self.shift)

    def _velocity(self, x_t: Tensor, sigma: Tensor, tensors: dict[str, Tensor]) -> Tensor:
        # diffusers' flow-matching convention: timestep = sigma * num_train_timesteps (1000).
        return self._forward_module(x_t, sigma * 1000.0, encoder_hidden_states=tensors["prompt_embeds"]).sample

    def decode(self, latents: Tensor) -> Tensor:
        """Pixel space: map [-1, 1] to [0, 1] and repeat the grey channel -> ``[B, 3, H, W]``."""
        return ((latents.float().clamp(-1, 1) + 1) / 2).repeat(1, 3, 1, 1)


def build_toy_adapter(seed: int = 0, image_size: int = 16, embed_dim: int = 32, shift: float = 1.0) -> ToyAdapter:
    """A randomly initialised toy adapter (for tests and for the quickstart training script)."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**toy_unet_config(image_size, embed_dim))
    encoder = ToyPromptEncoder(vocab=DIGIT_VOCAB, embed_dim=embed_dim)
    return ToyAdapter(unet, encoder, shift=shift)
