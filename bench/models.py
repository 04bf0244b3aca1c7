"""Throughput and memory of the real model families' denoisers, with random weights (no download).

    python bench/models.py                              # CUDA: full size; CPU: reduced size (see table)
    python bench/models.py --families wan --batch-sizes 1 2 --steps 10
    python bench/models.py --full                       # force full size on CPU too (slow, ~100 GB RAM for FLUX)
    python bench/models.py --fsdp                       # FSDP2 train step, full + LoRA, 1 and 2 processes, per-rank memory

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

``--fsdp`` instead measures one training step (forward + backward + AdamW step, batch 1 per rank,
gradient checkpointing on) of each family sharded with FSDP2 (``flowalign.training.fsdp.shard_module``,
as ``train.fsdp.enabled`` does), full fine-tuning and LoRA, at 1 and 2 processes. The script starts
the processes itself (``torch.multiprocessing``, gloo on CPU / NCCL on CUDA; fresh processes per
row, so memory readings do not carry over) and prints one table, per rank:

* per-rank params: elements of this rank's parameter shards (frozen ones included);
* state MiB: bytes this rank holds in parameter shards + gradient shards + optimizer state, summed
  over the local tensors (exact; what sharding divides);
* peak MiB: on CPU the process' peak RSS during the steps (Linux ``VmHWM``, reset through
  ``/proc/self/clear_refs`` after the model is built and sharded; includes activations, gathered
  blocks, buffers, the Python runtime and libraries, and memory the allocator freed but kept, e.g.
  of the unsharded model); on CUDA ``torch.cuda.max_memory_allocated`` over the steps;
* step s: the slowest rank's best-of-``--repeats`` step after one warm-up step.

On CPU the families run at the reduced size; on CUDA at full size, and with one GPU at 1 process
only (``--fsdp-processes`` sets the counts; a CUDA run needs one GPU per process).
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

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


# -- --fsdp: one sharded training step per family / process count / mode --------------------------
FSDP_HEADER = ["family", "size", "processes", "mode", "per-rank params", "state MiB (params+grads+optim)", "peak MiB", "step s"]


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t``: the local shard of a DTensor, ``t`` itself otherwise."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def _nbytes(tensors) -> int:
    return sum(_local(t).numel() * _local(t).element_size() for t in tensors if isinstance(t, torch.Tensor))


def held_state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes this rank holds in parameter shards, gradient shards and optimizer state (local tensors)."""
    params = list(model.parameters())
    return {"params": _nbytes(params),
            "grads": _nbytes(p.grad for p in params if p.grad is not None),
            "optim": _nbytes(v for state in optimizer.state.values() for v in state.values())}


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mib() -> float:
    """``VmHWM`` (peak resident set size since the last reset) in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass(frozen=True)
class FSDPJob:
    """One row of the ``--fsdp`` table: a family, a mode and a process count."""

    family: str
    mode: str  # "full" or "lora"
    processes: int
    full_size: bool
    lora_rank: int
    repeats: int
    port: int


def _fsdp_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, kwargs: dict) -> None:
    """Forward + backward + optimizer step; gradients stay allocated until the next step."""
    optimizer.zero_grad(set_to_none=True)
    model(**kwargs, return_dict=False)[0].float().square().mean().backward()
    optimizer.step()


def fsdp_rank_result(job: FSDPJob, rank: int, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Build, shard and train ``job``'s model on this rank (the process group is up); this rank's numbers."""
    from peft import LoraConfig

    from flowalign.training.fsdp import shard_module

    case = cases(job.full_size, device, dtype)[job.family]
    model = build_model(case, device, dtype)  # same seed on every rank: identical weights before sharding
    if job.mode == "lora":
        model.requires_grad_(False)
        model.add_adapter(LoraConfig(r=job.lora_rank, lora_alpha=job.lora_rank, target_modules=LORA_TARGETS,
                                     init_lora_weights="gaussian"))
    model.enable_gradient_checkpointing()
    model.train()
    model = shard_module(model, device_type=device.type, reshard_after_forward=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    torch.manual_seed(1000 + rank)  # each rank trains on its own batch
    kwargs = case.inputs(1)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    rss_reset = device.type == "cpu" and _reset_peak_rss()
    _fsdp_step(model, optimizer, kwargs)  # warm-up (creates the optimizer state)
    step_s = min(_timed(lambda: _fsdp_step(model, optimizer, kwargs), device) for _ in range(job.repeats))
    held = held_state_bytes(model, optimizer)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else _peak_rss_mib()
    return {"rank": rank, "size": case.size, "params": sum(_local(p).numel() for p in model.parameters()),
            "state_mib": sum(held.values()) / 2**20, "peak_mib": peak, "peak_reset": device.type == "cuda" or rss_reset,
            "step_s": step_s}


def _fsdp_worker(rank: int, job: FSDPJob, results) -> None:
    """One process of ``job``: join the group, run :func:`fsdp_rank_result`, put the result (or the error)."""
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // job.processes))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(job.port))
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=job.processes)
    try:
        results.put(fsdp_rank_result(job, rank, device, torch.bfloat16 if cuda else torch.float32))
    except torch.cuda.OutOfMemoryError:
        results.put({"rank": rank, "error": "OOM"})
    except Exception as exc:  # reported in the table; the other rows still run
        traceback.print_exc()
        results.put({"rank": rank, "error": f"{type(exc).__name__}: {exc}"[:120]})
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_fsdp_job(job: FSDPJob, timeout_s: float) -> list:
    """Start ``job.processes`` fresh processes for one row and reduce their results to the row:
    per-rank values are rank 0's params and the largest state / peak / step time over ranks."""
    import queue

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_fsdp_worker, args=(rank, job, results)) for rank in range(job.processes)]
    for p in procs:
        p.start()
    got, deadline = [], time.monotonic() + timeout_s
    while len(got) < job.processes:
        try:
            got.append(results.get(timeout=max(1.0, deadline - time.monotonic())))
        except queue.Empty:
            got.append({"rank": -1, "error": f"no result within {timeout_s:.0f} s"})
            break
        if time.monotonic() > deadline:
            break
    for p in procs:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()
    print(f"  {job.family} {job.mode} x{job.processes}: done", file=sys.stderr, flush=True)
    errors = [r["error"] for r in got if "error" in r]
    if errors or len(got) < job.processes:
        return [job.family, "-", job.processes, job.mode, None, None, errors[0] if errors else "missing rank", None]
    by_rank = sorted(got, key=lambda r: r["rank"])
    peak = max(r["peak_mib"] for r in by_rank)
    return [job.family, by_rank[0]["size"], job.processes, job.mode, f"{by_rank[0]['params'] / 1e6:.1f}M",
            max(r["state_mib"] for r in by_rank), peak if all(r["peak_reset"] for r in by_rank) else f"{peak:.0f} (not reset)",
            max(r["step_s"] for r in by_rank)]


def fsdp_main(args: argparse.Namespace) -> str:
    """The ``--fsdp`` table: every family x process count x mode, each in fresh processes."""
    cuda = torch.cuda.is_available()
    full = cuda or args.full
    processes = args.fsdp_processes or ([1] if cuda and torch.cuda.device_count() < 2 else [1, 2])
    if cuda and max(processes) > torch.cuda.device_count():
        raise SystemExit(f"--fsdp-processes {max(processes)} needs as many GPUs; this machine has {torch.cuda.device_count()}")
    name = torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores)"
    peak = "peak MiB = torch.cuda.max_memory_allocated during the steps" if cuda else \
        "peak MiB = the process' peak RSS during the steps (VmHWM, reset after building + sharding)"
    print(f"FSDP2 train step: device {name}, {'bf16' if cuda else 'fp32'}, {'full size' if full else 'REDUCED size (CPU)'}, "
          f"processes {processes}, batch 1 per rank, AdamW, gradient checkpointing, reshard_after_forward=True", flush=True)
    rows = [run_fsdp_job(FSDPJob(family, mode, n, full, args.lora_rank, args.repeats, _free_port()), args.fsdp_timeout)
            for family in args.families for n in processes for mode in ("full", "lora")]
    header = FSDP_HEADER[:6] + ["peak MiB (cuda max allocated)" if cuda else "peak MiB (RSS)"] + FSDP_HEADER[7:]
    text = format_table(header, rows)
    print(text)
    print(f"per rank; state = local parameter + gradient + optimizer-state shards (exact bytes); {peak}; "
          "step s = slowest rank, best of --repeats after a warm-up")
    return text


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=["sd3", "flux", "wan"], choices=["sd3", "flux", "wan"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=None, help="default: 1 2 4 on CUDA, 1 2 on CPU")
    parser.add_argument("--steps", type=int, default=None, help="rollout steps per sample (default 10 on CUDA, 1 on CPU)")
    parser.add_argument("--lora-rank", type=int, default=32)
    parser.add_argument("--full", action="store_true", help="full-size models on CPU too")
    parser.add_argument("--repeats", type=int, default=2, help="timings are the best of this many runs")
    parser.add_argument("--fsdp", action="store_true",
                        help="FSDP2 train-step table (full and LoRA, per-rank memory) instead of the rollout/LoRA table")
    parser.add_argument("--fsdp-processes", nargs="+", type=int, default=None,
                        help="process counts for --fsdp (default: 1 2; on CUDA 1 unless there are 2+ GPUs)")
    parser.add_argument("--fsdp-timeout", type=float, default=1200.0, help="seconds allowed for one --fsdp row")
    args = parser.parse_args(argv)
    if args.fsdp:
        return fsdp_main(args)
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
