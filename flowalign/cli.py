"""The ``flowalign`` command line: ``train | sample | eval | validate | ls | serve-reward``.

Every command takes a YAML config followed by ``key.sub=value`` overrides, e.g.
``flowalign train configs/quickstart.yaml train.iterations=20 sampling.noise_level=0.5``.
Configuration errors print one line naming the key and exit with status 2.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

from flowalign.config import ConfigError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flowalign", description="Align diffusion / flow-matching generators with rewards.")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(name: str, help: str) -> argparse.ArgumentParser:  # noqa: A002
        sp = sub.add_parser(name, help=help)
        sp.add_argument("config", help="YAML config, e.g. configs/quickstart.yaml")
        sp.add_argument("overrides", nargs="*", help="key.sub=value overrides")
        return sp

    with_config("train", "train a policy (e.g. Flow-GRPO) from a config")
    with_config("eval", "score model.pretrained on the held-out prompts")
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

    r = sub.add_parser("serve-reward", help="serve a reward over HTTP (JSON + base64 PNG, bearer token from $FLOWALIGN_REWARD_TOKEN)")
    r.add_argument("config", help="YAML reward spec, e.g. {_component_: pickscore, device: cuda}")
    r.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    r.add_argument("--port", type=int, default=8765)
    r.add_argument("--max-batch", type=int, default=64)

    ls = sub.add_parser("ls", help="list registered components")
    ls.add_argument("what", choices=["rewards", "adapters", "configs", "advantages", "losses", "samplers"])
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except ConfigError as err:
        print(f"flowalign: config error: {err}", file=sys.stderr)
        return 2


def _train(args: argparse.Namespace) -> int:
    from flowalign.api import train

    train(args.config, args.overrides)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from flowalign.api import evaluate

    print(json.dumps(evaluate(args.config, args.overrides), indent=2))
    return 0


def _validate(args: argparse.Namespace) -> int:
    from flowalign.api import _world_size
    from flowalign.config import explain, load_config, to_yaml

    cfg = load_config(args.config, args.overrides, world_size=_world_size())
    if args.explain:
        rows = explain(type(cfg))
        width = max(len(key) for key, _, _ in rows)
        for key, default, doc in rows:
            print(f"{key:<{width}}  {default:<28}  {doc}")
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


def _serve_reward(args: argparse.Namespace) -> int:
    from flowalign.rewards.remote import serve_from_config

    # The token is read from $FLOWALIGN_REWARD_TOKEN, never a flag: flags show in the process list.
    serve_from_config(args.config, host=args.host, port=args.port, max_batch=args.max_batch)
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
        root = "configs"
        files = sorted(glob.glob(os.path.join(root, "**", "*.yaml"), recursive=True))
        print("\n".join(files) if files else f"no configs under {os.path.abspath(root)}")
    elif args.what == "advantages":
        from flowalign.advantages import ADVANTAGE_ESTIMATORS

        print("\n".join(sorted(ADVANTAGE_ESTIMATORS)))
    elif args.what == "losses":
        from flowalign.losses import LOSSES

        print("\n".join(sorted(LOSSES)))
    elif args.what == "samplers":
        from flowalign.samplers import SDE_KINDS

        print("\n".join(["ode", *SDE_KINDS, "ddim"]))
    return 0


_COMMANDS = {"train": _train, "eval": _eval, "validate": _validate, "sample": _sample, "ls": _ls,
             "serve-reward": _serve_reward}

if __name__ == "__main__":
    raise SystemExit(main())
