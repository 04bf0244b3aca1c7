"""The ``flowalign`` command line: ``train | sample | eval | validate | ls | serve-reward``.

Every command takes a YAML config followed by ``key.sub=value`` overrides, e.g.
``flowalign train configs/quickstart.yaml train.iterations=20 sampling.noise_level=0.5``.
Known errors (a bad config, a missing model, a run directory holding another run, a broken
checkpoint) print one short line naming the key or file and exit with status 2; ``--debug`` shows
the traceback. A stopped run (Ctrl-C, SIGTERM) saves a checkpoint and exits with 130 / 143.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

from flowalign.errors import FlowalignError, TrainingInterrupted


def _parser() -> argparse.ArgumentParser:
    from flowalign import __version__

    p = argparse.ArgumentParser(prog="flowalign", description="Align diffusion / flow-matching generators with rewards.")
    p.add_argument("--version", action="version", version=f"flowalign {__version__}")
    p.add_argument("--debug", action="store_true", help="show the full traceback of known errors")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(name: str, help: str) -> argparse.ArgumentParser:  # noqa: A002
        sp = sub.add_parser(name, help=help)
        sp.add_argument("config", help="YAML config, e.g. configs/quickstart.yaml")
        sp.add_argument("overrides", nargs="*", help="key.sub=value overrides")
        return sp

    with_config("train", "train a policy (e.g. Flow-GRPO) from a config")
    e = with_config("eval", "score model.pretrained on the held-out prompts (reads and writes no run directory)")
    e.add_argument("--out", default=None, help="also write the scores to this JSON file (default: stdout only)")
    v = with_config("validate", "load and check a config without loading any model")
    v.add_argument("--explain", action="store_true", help="list every key with its default and documentation")

    s = sub.add_parser("sample", help="draw ODE samples from a model and save them as a PNG grid")
    s.add_argument("model", help="model directory (save_pretrained layout), e.g. runs/quickstart/final")
    s.add_argument("--prompt", action="append", required=True, help="prompt (repeatable)")
    s.add_argument("--adapter", default="toy", help="pipeline adapter name or module:Class")
    s.add_argument("--num-steps", type=int, default=10)
    s.add_argument("--guidance-scale", type=float, default=1.0)
    s.add_argument("--samples-per-prompt", type=int, default=8)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", default="samples.png", help="output PNG")

    r = sub.add_parser("serve-reward",
                       help="serve a reward over HTTP (JSON + base64 PNG, bearer token from $FLOWALIGN_REWARD_TOKEN)",
                       description="Serve a reward over HTTP. The bearer token comes from $FLOWALIGN_REWARD_TOKEN (never a "
                                   "flag: flags show in the process list); without it the server refuses to start unless "
                                   "--no-auth is given, which is allowed on a loopback host only.")
    r.add_argument("config", help="YAML reward spec, e.g. {_component_: pickscore, device: cuda}")
    r.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    r.add_argument("--port", type=int, default=8765)
    r.add_argument("--max-batch", type=int, default=64)
    r.add_argument("--no-auth", action="store_true",
                   help="serve without a token (loopback hosts only: 127.0.0.0/8, ::1, localhost)")
    r.add_argument("--max-body-mb", type=float, default=None, help="largest request body in MiB (default 64)")
    r.add_argument("--max-image-pixels", type=int, default=None,
                   help="most pixels of one image / frame (default 16777216 = 4096x4096)")
    r.add_argument("--max-request-pixels", type=int, default=None,
                   help="most pixels of one request, all images / frames together (default 67108864)")
    r.add_argument("--max-connections", type=int, default=None,
                   help="most connections handled at once, one thread each (default 64)")
    r.add_argument("--max-concurrent", type=int, default=None, help="most requests decoding / scoring at once (default 2)")
    r.add_argument("--timeout", type=float, default=None,
                   help="seconds for a request's headers, and the longest stall in its body (default 15)")
    r.add_argument("--queue-timeout", type=float, default=None,
                   help="seconds a request waits for a free slot before a 503 (default 30)")

    ls = sub.add_parser("ls", help="list registered components")
    ls.add_argument("what", choices=["rewards", "adapters", "configs", "algorithms", "advantages", "losses", "samplers"])
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted anywhere on the line, also after the subcommand
    args = _parser().parse_args([a for a in argv if a != "--debug"])
    args.debug = debug
    try:
        return _COMMANDS[args.command](args)
    except TrainingInterrupted as err:
        print(f"flowalign: {err.kind}: {err}", file=sys.stderr)
        return err.exit_code
    except FlowalignError as err:
        if args.debug:
            raise
        print(f"flowalign: {err.kind}: {err}\n(run with --debug for the traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("flowalign: interrupted", file=sys.stderr)
        return 130


def _train(args: argparse.Namespace) -> int:
    from flowalign.api import _world_size, run_training
    from flowalign.config import load_config

    # the CLI trains in the config's output_dir, continuing the run there (flowalign.training.rundir)
    ok = False
    try:
        run_training(load_config(args.config, args.overrides, world_size=_world_size()))
        ok = True
    finally:
        _end_process_group(together=ok)
    return 0


def _end_process_group(together: bool) -> None:
    """Destroy the process group before exit, after a barrier when every rank finished (``together``),
    so that no rank blocks at exit in the collective library's teardown once its peers are gone. A
    failed rank skips the barrier: its peers would wait there for ever."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if together:
            dist.barrier()
        dist.destroy_process_group()


def _eval(args: argparse.Namespace) -> int:
    from flowalign.api import evaluate

    text = json.dumps(evaluate(args.config, args.overrides), indent=2)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0


def _validate(args: argparse.Namespace) -> int:
    from flowalign.api import _world_size
    from flowalign.config import explain, format_explain, load_config, to_yaml

    cfg = load_config(args.config, args.overrides, world_size=_world_size())
    if args.explain:  # the effective value of every key beside its default; * marks the changed ones
        print(format_explain(explain(cfg)))
    else:
        print(to_yaml(cfg))
        print(f"# {args.config}: OK")
    return 0


def _sample(args: argparse.Namespace) -> int:
    from flowalign.api import sample
    from flowalign.training.plots import save_image_grid

    media = sample(args.model, args.prompt, adapter=args.adapter, num_steps=args.num_steps,
                   guidance_scale=args.guidance_scale, seed=args.seed, samples_per_prompt=args.samples_per_prompt)
    rows = list(media.split(args.samples_per_prompt))
    print(save_image_grid(args.out, rows, row_labels=args.prompt))
    return 0


def _serve_reward(args: argparse.Namespace, stop=None) -> int:
    from flowalign.errors import ConfigError
    from flowalign.rewards.remote import serve_from_config

    # The token is read from $FLOWALIGN_REWARD_TOKEN, never a flag: flags show in the process list.
    # Limits left unset keep serve_from_config's defaults; `stop` (a threading.Event) is for tests.
    limits = {key: getattr(args, key) for key in ("max_image_pixels", "max_request_pixels", "max_connections",
                                                  "max_concurrent", "timeout", "queue_timeout")
              if getattr(args, key) is not None}
    if args.max_body_mb is not None:
        if not 0 < args.max_body_mb < float("inf"):
            raise ConfigError(f"serve-reward: --max-body-mb must be a positive number, got {args.max_body_mb:g}")
        limits["max_body_bytes"] = max(1, int(args.max_body_mb * 2**20))
    serve_from_config(args.config, host=args.host, port=args.port, max_batch=args.max_batch, stop=stop,
                      allow_no_auth=args.no_auth, **limits)
    return 0


def _ls(args: argparse.Namespace) -> int:
    from flowalign.training.plots import format_table

    if args.what == "rewards":
        from flowalign.rewards.registry import list_rewards

        entries = list_rewards()
        print(format_table(["name", "modality", "extra", "weights"], [[e["name"], e["modality"], e["extra"] or "-", e["weights"]] for e in entries]))
    elif args.what == "adapters":
        from flowalign.pipelines import ADAPTERS

        print(format_table(["name", "class"], [[k, v] for k, v in ADAPTERS.items()]))
    elif args.what == "configs":
        root = _configs_root()
        launch = os.path.join(root, "accelerate")  # accelerate launch configs, not training configs
        files = sorted(f for f in glob.glob(os.path.join(root, "**", "*.yaml"), recursive=True) if not f.startswith(launch + os.sep))
        if not files:
            print(f"flowalign: no configs under {os.path.abspath(root)}", file=sys.stderr)
            return 1
        print("\n".join(os.path.relpath(f) if not os.path.relpath(f).startswith("..") else f for f in files))
    elif args.what == "algorithms":
        print(format_table(["algorithm.name", "recipe", "what it does", "paper", "config"], _algorithm_rows()))
    elif args.what == "advantages":
        from flowalign.algorithms import ALGORITHMS

        rows = [[name, cls.recipe, getattr(cls, "advantage", None) or f"group, on {cls.estimator} log-probs"]
                for name, cls in _sorted_algorithms(ALGORITHMS)]
        print(format_table(["algorithm.name", "recipe", "advantages"], rows))
    elif args.what == "losses":
        from flowalign.losses import LOSSES

        print(format_table(["loss", "function"], [[k, f"{v.__module__}.{v.__name__}"] for k, v in sorted(LOSSES.items())]))
    elif args.what == "samplers":
        from flowalign.samplers import SDE_KINDS

        rows = [["ode", "deterministic Euler step (evaluation, look-aheads, steps outside the SDE window)"]]
        rows += [[k, "SDE with exact per-step log-probs (sampling.sampler)"] for k in SDE_KINDS]
        rows += [["ddim", "DDIM with eta for epsilon-prediction UNets (DDPO form)"]]
        print(format_table(["sampler", "what"], rows))
    return 0


def _configs_root() -> str:
    """``configs/`` of the current directory, else the one beside the flowalign package."""
    if os.path.isdir("configs"):
        return "configs"
    from flowalign.config import project_root

    root = project_root()
    return os.path.join(root, "configs") if root else "configs"


def _sorted_algorithms(algorithms: dict) -> list:
    """Image / video algorithms first (GRPO leading), then the dLLM ones, by name."""
    return sorted(algorithms.items(), key=lambda item: (item[1].recipe == "dllm", item[0] != "grpo", item[0]))


def _algorithm_rows() -> list[list[str]]:
    """One row per registered algorithm (flowalign.algorithms): name, loop, summary, paper, shipped config."""
    from flowalign.algorithms import ALGORITHMS

    return [[name, cls.recipe, cls.summary, cls.paper, cls.config_file] for name, cls in _sorted_algorithms(ALGORITHMS)]


_COMMANDS = {"train": _train, "eval": _eval, "validate": _validate, "sample": _sample, "ls": _ls,
             "serve-reward": _serve_reward}

if __name__ == "__main__":
    raise SystemExit(main())
