"""Throughput and memory of the real model families' denoisers, with random weights (no download).

    python bench/models.py                              # CUDA: full size; CPU: reduced size (see table)
    python bench/models.py --families wan --batch-sizes 1 2 --steps 10
    python bench/models.py --full                       # force full size on CPU too (slow, ~100 GB RAM for FLUX)

Each family's transformer is built from the dimensions of its public config (written below, no
download) and fed random text embeddings of the right shape (the text encoders are skipped: they run
once per prompt and can be cached with ``model.options.embedding_cache_dir``). Per family and batch
size it prints:

* rollout samples/s: ``--steps`` no-grad denoiser forwards (no CFG, no VAE decode) per sample;
  every timing is the best of ``--repeats`` runs after a warm-up;
* train step s: one forward + backward through the LoRA weights (rank ``--lora-rank`` on the
  attention projections, gradient checkpointing on, as the recipes train);
* peak memory: ``torch.cuda.max_memory_allocated`` for the family/batch on CUDA; on CPU the
  process' peak RSS so far (monotone over the run, so only an upper bound).

On CPU the models run at reduced size -- fewer layers, smaller resolution, shorter text -- and the
table's ``size`` column says exactly what ran; timings then only compare families with each other.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flowalign.training.plots import format_table  # noqa: E402

# -- public configs (transformer/config.json of each hub repo) -----------------------------------
SD35_MEDIUM = dict(  # stabilityai/stable-diffusion-3.5-medium
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)
FLUX1_DEV = dict(  # black-forest-labs/FLUX.1-dev
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)
WAN21_1_3B = dict(  # Wan-AI/Wan2.1-T2V-1.3B-Diffusers
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
    freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
    rope_max_seq_len=1024,
)
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@dataclass
class Case:
    """One family at one size: ``build()`` -> model, ``inputs(batch)`` -> forward kwargs."""

    family: str
    size: str
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[int], dict]


def cases(full: bool, device: torch.device, dtype: torch.dtype) -> dict[str, Case]:
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, WanTransformer3DModel

    rnd = lambda *shape: torch.randn(*shape, device=device, dtype=dtype)  # noqa: E731
    t = lambda b: torch.full((b,), 500.0, device=device)  # noqa: E731
    # SD3.5-medium: 1024 px -> 128 x 128 latents; text = 77 CLIP + 256 T5 tokens
    sd_layers, sd_px, sd_text = (24, 1024, 333) if full else (2, 128, 77)
    sd3 = Case("sd3.5-medium", f"{sd_layers}/24 layers, {sd_px}px, {sd_text} text tok",
               lambda: SD3Transformer2DModel(**{**SD35_MEDIUM, "num_layers": sd_layers,
                                                "dual_attention_layers": tuple(range(min(13, sd_layers)))}),
               lambda b: dict(hidden_states=rnd(b, 16, sd_px // 8, sd_px // 8), encoder_hidden_states=rnd(b, sd_text, 4096),
                              pooled_projections=rnd(b, 2048), timestep=t(b)))
    # FLUX.1-dev: 1024 px -> 64 x 64 packed 2x2 latents = 4096 image tokens; 512 T5 tokens
    fl_double, fl_single, fl_px, fl_text = (19, 38, 1024, 512) if full else (1, 1, 128, 64)
    n_img = (fl_px // 16) ** 2

    def flux_inputs(b: int) -> dict:
        side = fl_px // 16
        img_ids = torch.zeros(side, side, 3, device=device)
        img_ids[..., 1] = torch.arange(side, device=device)[:, None]
        img_ids[..., 2] = torch.arange(side, device=device)[None, :]
        return dict(hidden_states=rnd(b, n_img, 64), encoder_hidden_states=rnd(b, fl_text, 4096), pooled_projections=rnd(b, 768),
                    timestep=t(b) / 1000, img_ids=img_ids.reshape(-1, 3), txt_ids=torch.zeros(fl_text, 3, device=device),
                    guidance=torch.full((b,), 3.5, device=device))

    flux = Case("flux.1-dev", f"{fl_double}+{fl_single}/19+38 blocks, {fl_px}px, {fl_text} text tok",
                lambda: FluxTransformer2DModel(**{**FLUX1_DEV, "num_layers": fl_double, "num_single_layers": fl_single}), flux_inputs)
    # Wan2.1-1.3B at 480p: 81 frames x 480 x 832 -> 21 x 60 x 104 latents; 512 UMT5 tokens
    wan_layers, (f, h, w), wan_text = (30, (81, 480, 832), 512) if full else (2, (9, 128, 128), 64)
    wan = Case("wan2.1-1.3b", f"{wan_layers}/30 layers, {f}x{h}x{w}, {wan_text} text tok",
               lambda: WanTransformer3DModel(**{**WAN21_1_3B, "num_layers": wan_layers}),
               lambda b: dict(hidden_states=rnd(b, 16, (f - 1) // 4 + 1, h // 8, w // 8), encoder_hidden_states=rnd(b, wan_text, 4096),
                              timestep=t(b)))
    return {"sd3": sd3, "flux": flux, "wan": wan}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)


def build_model(case: Case, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Initialise directly on ``device`` in ``dtype`` (no fp32 copy of a 12B model in host memory),
    then upcast the modules diffusers keeps in fp32 (``_keep_in_fp32_modules``), as
    ``from_pretrained(torch_dtype=dtype)`` does."""
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = case.build()
    finally:
        torch.set_default_dtype(previous)
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or [])
    for name, module in model.named_modules():
        if keep.intersection(name.split(".")):
            module.float()
    return model.eval()


def bench_case(case: Case, batch_sizes: list[int], steps: int, lora_rank: int, device: torch.device, dtype: torch.dtype,
               repeats: int = 2) -> list[list]:
    """Rows of the table for one family; each timing is the best of ``repeats`` (shared machines are noisy)."""
    from peft import LoraConfig

    model = build_model(case, device, dtype)
    params = sum(p.numel() for p in model.parameters())
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, target_modules=LORA_TARGETS, init_lora_weights="gaussian"))
    model.enable_gradient_checkpointing()
    rows = []
    for b in batch_sizes:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        kwargs = case.inputs(b)
        try:
            with torch.no_grad():
                model(**kwargs, return_dict=False)  # warm-up
                rollout_s = min(_timed(lambda: [model(**kwargs, return_dict=False) for _ in range(steps)], device)
                                for _ in range(repeats))
            model.train()
            step = lambda: model(**kwargs, return_dict=False)[0].float().square().mean().backward()  # noqa: E731
            step()  # warm-up
            train_s = min(_timed(step, device) for _ in range(repeats))
            model.zero_grad(set_to_none=True)
            model.eval()
            rows.append([case.family, case.size, f"{params / 1e6:.0f}M", b, b / rollout_s, train_s, _peak_gib(device)])
        except torch.cuda.OutOfMemoryError:
            model.zero_grad(set_to_none=True)
            model.eval()
            torch.cuda.empty_cache()
            rows.append([case.family, case.size, f"{params / 1e6:.0f}M", b, None, None, "OOM"])
        kwargs = None  # free this batch size's inputs before building the next
        print(f"  {case.family} batch {b}: done", file=sys.stderr, flush=True)
    model = None  # release the weights before the next family is built
    gc.collect()
    return rows


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=["sd3", "flux", "wan"], choices=["sd3", "flux", "wan"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=None, help="default: 1 2 4 on CUDA, 1 2 on CPU")
    parser.add_argument("--steps", type=int, default=None, help="rollout steps per sample (default 10 on CUDA, 1 on CPU)")
    parser.add_argument("--lora-rank", type=int, default=32)
    parser.add_argument("--full", action="store_true", help="full-size models on CPU too")
    parser.add_argument("--repeats", type=int, default=2, help="timings are the best of this many runs")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    full = cuda or args.full
    batch_sizes = args.batch_sizes or ([1, 2, 4] if cuda else [1, 2])
    steps = args.steps or (10 if cuda else 1)
    name = torch.cuda.get_device_name(device) if cuda else f"CPU ({os.cpu_count()} cores)"
    print(f"device: {name}, dtype {dtype}, {'full size' if full else 'REDUCED size (CPU)'}; rollout = {steps} "
          f"no-grad forwards per sample, train = 1 fwd+bwd (LoRA r={args.lora_rank}, gradient checkpointing)", flush=True)
    table = cases(full, device, dtype)
    rows = []
    for family in args.families:
        rows += bench_case(table[family], batch_sizes, steps, args.lora_rank, device, dtype, args.repeats)
    memory = "peak GiB (cuda max allocated)" if cuda else "peak GiB (process RSS so far)"
    text = format_table(["family", "size", "params", "batch", "rollout samples/s", "train step s", memory], rows)
    print(text)
    return text


if __name__ == "__main__":
    main()
