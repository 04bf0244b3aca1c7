"""Wan 2.1 / 2.2 image-to-video adapter (``WanImageToVideoPipeline`` components).

Each prompt record carries one source image (``{"prompt": ..., "image": "first_frame.png"}``), the
video's first frame. The conditioning follows ``WanImageToVideoPipeline``:

* the source image is converted to an 8-bit PIL image and resized to ``width x height`` by the
  pipeline's own ``VideoProcessor.preprocess`` (PIL Lanczos resize to exactly that size, no crop, no
  aspect preservation; then ``2 x - 1``), so the same image file always gives the same condition;
* ``condition [B, T_vae + z, F_lat, H/8, W/8]`` = the first-frame mask (``T_vae = 4`` channels: 1 on
  the first latent frame, 0 elsewhere) concatenated on channels with the normalised VAE latents of
  the video ``[first frame, zeros x (num_frames - 1)]`` (``prepare_latents``); the transformer sees
  ``cat([x_t, condition], dim=1)`` (``in_channels = z + T_vae + z = 36``) and predicts the velocity
  of the ``z`` video-latent channels, in the same flow convention as Wan text-to-video;
* Wan 2.1 I2V also has a CLIP vision ``image_encoder``: ``image_embeds [B, N, D]`` = its penultimate
  hidden states (``encode_image``) of the ``image_processor``-processed source image, fed as
  ``encoder_hidden_states_image``. Wan 2.2 A14B I2V (two experts, no image encoder) uses the channel
  condition alone; expert routing is as in :class:`WanAdapter`.

Both tensors are per-prompt rows of ``Conditioning.tensors`` and are shared by the negative half
under CFG (the pipeline feeds the same ``condition`` / ``image_embeds`` to both CFG calls).

Not supported (refused in the constructor): Wan 2.2 TI2V-5B's ``expand_timesteps`` image-to-video
(its text-to-video mode is supported by :class:`~flowalign.pipelines.wan.WanAdapter`,
``configs/grpo/wan22_ti2v_jpeg.yaml``). ``WanImageToVideoPipeline`` feeds the transformer
``(1 - first_frame_mask) * condition + first_frame_mask * latents`` (the clean image latent as latent
frame 0, timestep 0 on its tokens, ``1000 sigma`` on the others) and writes the condition back into
frame 0 at the end. A faithful rollout must keep that frame out of the sampled state: in the state,
every SDE step (Flow-GRPO Eq. 9) would add noise to it and the transition log-prob would average over
its tokens, which the policy does not generate. With the state holding only latent frames ``1..``,
``decode`` needs the per-sample condition latent to put frame 0 back before the causal VAE decodes
the video, and ``decode(latents)`` of the adapter protocol gets no conditioning. That protocol change
(the rollout engine, the recipe's evaluation, look-ahead scoring and ``flowalign.sample`` pass the
conditioning rows to decode) is outside this adapter. The last-frame (FLF2V, ``last_image``) variant
is not supported either (``source_images = 1``).
"""

from __future__ import annotations

import torch
from diffusers import WanImageToVideoPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.wan.pipeline_wan_i2v import retrieve_latents
from torch import Tensor, nn

from .common import check_options, on_device, save_options, save_transformer_lora, saved_options
from .wan import WanAdapter, video_latent_shape

OPTIONS = ("height", "width", "num_frames", "shift", "max_sequence_length", "trainable_expert", "attention_backend",
           "offload_idle", "embedding_cache_dir")


def to_pil(image: Tensor):
    """A ``[3, H, W]`` RGB tensor in [0, 1] as an 8-bit PIL image (``round(255 x)``, diffusers'
    ``VaeImageProcessor.numpy_to_pil``): the exact inverse of loading an 8-bit image file as ``x / 255``."""
    array = VaeImageProcessor.pt_to_numpy(image.detach().float().cpu().clamp(0, 1)[None])
    return VaeImageProcessor.numpy_to_pil(array)[0]


def first_frame_mask(temporal: int, latent_frames: int, height: int, width: int) -> Tensor:
    """``[1, temporal, latent_frames, height, width]`` fp32: ones on the first latent frame, zeros after.

    ``WanImageToVideoPipeline.prepare_latents`` builds it from a per-pixel-frame mask (1 on frame 0, 0 on
    frames ``1 .. num_frames - 1``), repeats frame 0 ``temporal`` times and folds each group of
    ``temporal`` pixel frames into channels: the first latent frame's group is all ones, every later
    group all zeros."""
    mask = torch.zeros(1, temporal, latent_frames, height, width)
    mask[:, :, 0] = 1.0
    return mask


class WanImageToVideoAdapter(WanAdapter):
    """Pipeline adapter for Wan image-to-video (one source image = the first frame per prompt).

    Args:
        pipe: a ``WanImageToVideoPipeline`` (tokenizer, UMT5, VAE, transformer(s); ``image_encoder`` +
            ``image_processor`` when the transformer has ``image_dim`` (Wan 2.1 I2V)).
        The other arguments are :class:`WanAdapter`'s (video size, shift, expert, backend, offload, cache).
    """

    source_images = 1

    def __init__(self, pipe: WanImageToVideoPipeline, **kwargs):
        if not isinstance(pipe, WanImageToVideoPipeline):
            raise TypeError(f"WanImageToVideoAdapter needs a WanImageToVideoPipeline, got {type(pipe).__name__}")
        if pipe.config.get("expand_timesteps", False):
            raise ValueError("WanImageToVideoAdapter: expand_timesteps=True (Wan 2.2 TI2V-5B first-frame replacement) is not "
                             "supported: the rollout cannot keep the replaced first latent frame clean (see the module docstring); "
                             "for TI2V-5B text-to-video load the folder with the 'wan' adapter")
        super().__init__(pipe, **kwargs)
        self.image_encoder = pipe.image_encoder
        self.image_processor = pipe.image_processor
        self.video_processor = pipe.video_processor
        cfg, vae_cfg = self.transformer.config, self.vae.config
        expected = vae_cfg.z_dim + vae_cfg.scale_factor_temporal + vae_cfg.z_dim
        if cfg.in_channels != expected or cfg.out_channels != vae_cfg.z_dim:
            raise ValueError(f"WanImageToVideoAdapter: transformer in_channels={cfg.in_channels}, out_channels={cfg.out_channels}; "
                             f"image-to-video needs {expected} (latents + mask + condition) and {vae_cfg.z_dim}")
        if cfg.get("pos_embed_seq_len") is not None:  # WanImageEmbedding then expects [first, last] image pairs
            raise ValueError("WanImageToVideoAdapter: the transformer has pos_embed_seq_len (a first-last-frame FLF2V model); "
                             "only first-frame image-to-video is supported")
        if cfg.image_dim is not None and (self.image_encoder is None or self.image_processor is None):
            raise ValueError("WanImageToVideoAdapter: the transformer takes CLIP image embeddings (image_dim="
                             f"{cfg.image_dim}) but the pipeline has no image_encoder / image_processor")
        if self.image_encoder is not None:
            self.image_encoder.requires_grad_(False).eval()
        # the denoised latents are the z video channels, not the transformer's 36 input channels
        self.latent_shape = video_latent_shape(vae_cfg.z_dim, self.num_frames, self.height, self.width,
                                               vae_cfg.scale_factor_temporal, vae_cfg.scale_factor_spatial, tuple(cfg.patch_size))

    @property
    def uses_image_embeds(self) -> bool:
        """Whether the transformer takes CLIP image embeddings (Wan 2.1 I2V; not Wan 2.2 A14B I2V)."""
        return self.transformer.config.image_dim is not None

    # -- loading / saving -----------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                        **options) -> "WanImageToVideoAdapter":
        """Load a ``WanImageToVideoPipeline`` folder / hub id; ``options`` (``model.options``) are the
        constructor's keyword arguments, defaults from ``flowalign_adapter.json`` when a run saved it."""
        check_options(options, OPTIONS, "wan_i2v")
        options = saved_options(path, options, "WanImageToVideoPipeline.save_pretrained")
        pipe = WanImageToVideoPipeline.from_pretrained(path, torch_dtype=dtype)
        return cls(pipe, name=path, **options).to(device)

    def save_pretrained(self, directory: str) -> None:
        """``WanImageToVideoPipeline.save_pretrained`` layout (LoRA merged into a copy of the trained
        expert) plus ``flowalign_adapter.json`` with the video size, shift and expert choice."""
        experts = self._experts_to_save()
        pipe = WanImageToVideoPipeline(tokenizer=self.tokenizer, text_encoder=self.text_encoder, vae=self.vae,
                                       scheduler=self.pipe.scheduler, image_processor=self.image_processor,
                                       image_encoder=self.image_encoder, boundary_ratio=self.boundary_ratio, **experts)
        pipe.save_pretrained(directory)
        save_options(directory, {"height": self.height, "width": self.width, "num_frames": self.num_frames,
                                 "shift": self.shift, "max_sequence_length": self.max_sequence_length,
                                 "trainable_expert": self.trainable_expert})

    def save_lora_weights(self, directory: str) -> None:
        """The trained expert's LoRA in the diffusers format, for ``WanImageToVideoPipeline.load_lora_weights``
        (add ``load_into_transformer_2=True`` when ``trainable_expert == "low"``)."""
        save_transformer_lora(WanImageToVideoPipeline, self.denoiser, directory)

    def to(self, device: str | torch.device) -> "WanImageToVideoAdapter":
        super().to(device)
        if self.image_encoder is not None:
            self.image_encoder.to("cpu" if self.offload_idle else device)
        return self

    # -- source-image condition -----------------------------------------------------------------
    def _pixels(self, image) -> Tensor:
        """``[1, 3, height, width]`` fp32 in [-1, 1]: ``VideoProcessor.preprocess(image, height, width)``,
        the resize + normalisation ``WanImageToVideoPipeline.__call__`` applies to ``image``."""
        return self.video_processor.preprocess(image, height=self.height, width=self.width).to(torch.float32)

    def _latent_condition(self, pixels: Tensor) -> Tensor:
        """``[1, z, F_lat, H/8, W/8]`` fp32: the normalised VAE latents of ``[first frame, zeros...]``
        (``prepare_latents``: ``retrieve_latents(..., sample_mode="argmax")``, i.e. the posterior mode,
        then ``(z - latents_mean) / latents_std``)."""
        cfg = self.vae.config
        video = torch.cat([pixels[:, :, None], pixels.new_zeros(1, 3, self.num_frames - 1, self.height, self.width)], dim=2)
        with on_device(self.vae, self.device, self.offload_idle):
            encoded = self.vae.encode(video.to(self.vae.device, self.vae.dtype))
            latents = retrieve_latents(encoded, sample_mode="argmax").float().to(self.device)
        mean = torch.tensor(cfg.latents_mean, device=self.device).view(1, cfg.z_dim, 1, 1, 1)
        inv_std = 1.0 / torch.tensor(cfg.latents_std, device=self.device).view(1, cfg.z_dim, 1, 1, 1)
        return (latents - mean) * inv_std

    def _clip_embeds(self, image) -> Tensor:
        """``[1, N, D]`` CLIP vision penultimate hidden states of the processed image (``encode_image``)."""
        inputs = self.image_processor(images=image, return_tensors="pt")
        with on_device(self.image_encoder, self.device, self.offload_idle):
            pixel_values = inputs.pixel_values.to(self.device, self.image_encoder.dtype)
            states = self.image_encoder(pixel_values=pixel_values, output_hidden_states=True).hidden_states[-2]
        return states.to(self.device)

    @torch.no_grad()
    def _image_condition(self, images: list[list[Tensor]]) -> dict[str, Tensor]:
        """``{"condition": [B, T_vae + z, F_lat, H/8, W/8]}`` (+ ``"image_embeds": [B, N, D]`` for Wan 2.1),
        one row per prompt, from each prompt's single ``[3, H, W]`` source image in [0, 1]."""
        vae_cfg = self.vae.config
        _, frames, h, w = self.latent_shape
        mask = first_frame_mask(vae_cfg.scale_factor_temporal, frames, h, w).to(self.device)
        conditions, embeds = [], []
        for (image,) in images:
            pil = to_pil(image)
            # prepare_latents: torch.concat([mask_lat_size, latent_condition], dim=1)
            conditions.append(torch.cat([mask, self._latent_condition(self._pixels(pil))], dim=1))
            if self.uses_image_embeds:
                embeds.append(self._clip_embeds(pil))
        out = {"condition": torch.cat(conditions)}
        if embeds:
            out["image_embeds"] = torch.cat(embeds)
        return out

    # -- prediction -----------------------------------------------------------------------------
    def _i2v_call(self, module: nn.Module, x_t: Tensor, timestep: Tensor, tensors: dict[str, Tensor]) -> Tensor:
        """One expert on ``cat([x_t, condition], dim=1)`` (``WanImageToVideoPipeline.__call__``'s
        ``latent_model_input``), with the CLIP image embeddings when the transformer takes them."""
        hidden = torch.cat([x_t.to(self.dtype), tensors["condition"].to(self.dtype)], dim=1)
        image_embeds = tensors.get("image_embeds")
        return module(hidden_states=hidden, timestep=timestep, encoder_hidden_states=tensors["prompt_embeds"].to(self.dtype),
                      encoder_hidden_states_image=None if image_embeds is None else image_embeds.to(self.dtype),
                      return_dict=False)[0]

    def _velocity(self, x_t: Tensor, sigma: Tensor, tensors: dict[str, Tensor]) -> Tensor:
        timestep = sigma.to(torch.float32) * 1000.0  # diffusers' flow convention: t = 1000 sigma
        if self.transformer_2 is None:
            return self._i2v_call(self._forward_module, x_t, timestep, tensors)
        trained = self._forward_module
        high_module = trained if self.trainable_expert == "high" else self.transformer
        low_module = trained if self.trainable_expert == "low" else self.transformer_2
        high = timestep >= self.boundary_ratio * 1000.0  # pipeline: t >= boundary_ratio * num_train_timesteps
        parts, order = [], []
        for module, rows in ((high_module, high.nonzero().squeeze(1)), (low_module, (~high).nonzero().squeeze(1))):
            if len(rows):
                parts.append(self._i2v_call(module, x_t[rows], timestep[rows], {k: v[rows] for k, v in tensors.items()}))
                order.append(rows)
        return torch.cat(parts)[torch.argsort(torch.cat(order))]
