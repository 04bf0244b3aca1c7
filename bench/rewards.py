"""Throughput of the reward zoo: images (or video frames) per second per reward and batch size.

    python bench/rewards.py                                   # every registered reward, tiny models
    python bench/rewards.py --rewards ocr jpeg_compressibility --batch-sizes 1 8 32 --size 256
    python bench/rewards.py --rewards pickscore --path pickscore=yuvalkirstain/PickScore_v1 --device cuda
    python bench/rewards.py --remote                          # also through a loopback reward server

Each reward is built with ``--path NAME=PATH`` when given (real weights; ``device`` is passed when the
reward takes one), else with its test builder ``tiny(tmp_dir)`` (a random tiny model of the same
architecture: the numbers then measure the pipeline around the model -- preprocessing, batching,
transport -- not the real model's cost), else with no arguments (rewards without weights). Rewards
that cannot be built are listed with the reason. Media are random: ``[B, 3, S, S]`` images, or
``[B, F, 3, S, S]`` videos for video rewards (throughput then counts frames). Times are medians
over ``--repeats`` calls after ``--warmup`` calls; CUDA is synchronized around each call.
"""

from __future__ import annotations

import argparse
import inspect
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flowalign.rewards.registry import BUILTIN_REWARDS, build_reward, resolve_reward_class  # noqa: E402
from flowalign.training.plots import format_table  # noqa: E402

PROMPT = 'a handwritten seven on a sign that says "hello world"'  # digit word + quoted text: most rewards parse it
# Per-sample metadata for rewards that read it, and wrappers benchmarked around a cheap inner reward.
METADATA = {
    "geneval": {"tag": "single_object", "include": [{"class": "dog", "count": 1}]},
    "groupwise_rank": {"group": 0},
}
WRAPPER_KWARGS = {"groupwise_rank": {"reward": "jpeg_compressibility"}}
NOT_BENCHED = {"pairwise_winrate": "wraps a pairwise judge (e.g. VLMJudge): bench that judge's compare()"}


def build(name: str, path: str | None, device: str, tmp_dir: str) -> tuple[Any, str]:
    """Build reward ``name``; returns ``(reward, how)`` with ``how`` in {"path", "tiny", "no weights"}."""
    cls = resolve_reward_class(name)
    accepts = inspect.signature(cls).parameters if callable(cls) else {}
    if path is not None:
        kwargs: dict[str, Any] = {"path": path}
        if "device" in accepts:
            kwargs["device"] = device
        return build_reward(name, **kwargs), "path"
    if hasattr(cls, "tiny"):
        return cls.tiny(tmp_dir), "tiny"
    if name in WRAPPER_KWARGS:
        return build_reward(name, **WRAPPER_KWARGS[name]), f"wraps {WRAPPER_KWARGS[name]['reward']}"
    return build_reward(name), "no weights"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_calls(reward: Any, media: torch.Tensor, prompts: list[str], metadata: list[dict] | None, warmup: int,
               repeats: int, device: str) -> float:
    """Median seconds of one ``reward(media, prompts, metadata)`` call."""
    for _ in range(warmup):
        reward(media, prompts, metadata)
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        reward(media, prompts, metadata)
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_reward(name: str, args: argparse.Namespace, tmp_dir: str) -> list[list[Any]]:
    info = BUILTIN_REWARDS.get(name)
    if name in NOT_BENCHED:
        return [[name, info.modality, "-", "-", "-", "-", f"not timed: {NOT_BENCHED[name]}"]]
    try:
        reward, how = build(name, args.paths.get(name), args.device, os.path.join(tmp_dir, name))
    except Exception as err:  # a missing extra, a reward that needs weights: report, keep going
        return [[name, info.modality if info else "?", "-", "-", "-", "-", f"not built: {type(err).__name__}: {str(err)[:70]}"]]
    server = None
    remote = None
    if args.remote:
        from flowalign.rewards.remote import RemoteReward, serve_reward

        server = serve_reward(reward, max_batch=max(args.batch_sizes))
        remote = RemoteReward(server.url, token=server.token)
    rows = []
    try:
        for batch in args.batch_sizes:
            gen = torch.Generator().manual_seed(0)
            if reward.modality == "video":
                media = torch.rand(batch, args.frames, 3, args.size, args.size, generator=gen)
                per_call = batch * args.frames
            else:
                media = torch.rand(batch, 3, args.size, args.size, generator=gen)
                per_call = batch
            media = media.to(args.device)
            prompts = [PROMPT] * batch
            metadata = [METADATA[name]] * batch if name in METADATA else None
            try:
                seconds = time_calls(reward, media, prompts, metadata, args.warmup, args.repeats, args.device)
                remote_rate = "-"
                if remote is not None:
                    remote_seconds = time_calls(remote, media, prompts, metadata, args.warmup, args.repeats, args.device)
                    remote_rate = f"{per_call / remote_seconds:.1f}"
                rows.append([name, reward.modality, how, batch, f"{per_call / seconds:.1f}", remote_rate, f"{seconds * 1000:.1f} ms"])
            except Exception as err:
                rows.append([name, reward.modality, how, batch, "-", "-", f"failed: {type(err).__name__}: {str(err)[:70]}"])
    finally:
        if server is not None:
            server.shutdown()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rewards", nargs="+", default=sorted(BUILTIN_REWARDS), help="registered names (default: all)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--size", type=int, default=64, help="image / frame side in pixels")
    p.add_argument("--frames", type=int, default=8, help="frames per video for video rewards")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--path", action="append", default=[], metavar="NAME=PATH", help="real weights for a reward")
    p.add_argument("--remote", action="store_true", help="also time each reward through a loopback reward server")
    args = p.parse_args()
    args.paths = {}
    for item in args.path:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            p.error(f"--path must be NAME=PATH, got {item!r}")
        args.paths[name] = path
    unknown = sorted(set(args.paths) - set(args.rewards))
    if unknown:
        p.error(f"--path given for rewards not benchmarked: {unknown}")
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device} ({device_name}), "
          f"{args.size}x{args.size} px, {args.frames} frames per video")
    rows = []
    with tempfile.TemporaryDirectory(prefix="flowalign-bench-rewards-") as tmp_dir:
        for name in args.rewards:
            rows += bench_reward(name, args, tmp_dir)
    print(format_table(["reward", "modality", "weights", "batch", "images/s", "remote images/s", "time / call"], rows))
    print("images/s counts frames for video rewards; 'tiny' rows time random tiny models (pipeline cost, not the real model's)")


if __name__ == "__main__":
    main()
