"""The RL recipe end to end through the real code path: smoke, on-policy ratio, crash + exact
resume, NaN guard, Python-callable rewards, and a 2-process accelerate run whose groups span ranks."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

import flowalign
from flowalign.training.metrics import read_metrics
from tests.conftest import REPO

TIMING = ("time/",)


def _weights(run_dir: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(run_dir, "final", "unet", "diffusion_pytorch_model.safetensors"))


def _records(run_dir: str) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in read_metrics(os.path.join(run_dir, "metrics.jsonl"))]


def test_two_iteration_smoke(tiny_config, tiny_model_dir):
    summary = flowalign.train(tiny_config)
    run = tiny_config["output_dir"]
    before = load_file(os.path.join(tiny_model_dir, "unet", "diffusion_pytorch_model.safetensors"))
    after = _weights(run)
    assert any(not torch.equal(before[k], after[k]) for k in before), "training did not change any parameter"
    records = read_metrics(os.path.join(run, "metrics.jsonl"))
    first = next(r for r in records if "train/ratio_first_step_dev" in r)
    assert first["train/ratio_first_step_dev"] <= 1e-6  # invariant 2: on-policy ratio == 1
    assert [r["step"] for r in records if "train/reward_mean" in r] == [1, 2]
    for name in ("before_after.png", "reward_curve.png", "summary.json", "config.yaml", "final/unet/config.json"):
        assert os.path.exists(os.path.join(run, name)), name
    assert set(summary["before"]) == set(summary["after"]) and "eval/reward" in summary["after"]
    assert summary["seconds_per_iteration"] > 0 and "held-out metric" in summary["table"]


def test_lora_with_kl_trains_only_adapter_weights(tiny_config):
    tiny_config["model"]["lora_rank"] = 4
    tiny_config["algorithm"]["kl_beta"] = 0.04
    summary = flowalign.train(tiny_config)
    records = read_metrics(os.path.join(tiny_config["output_dir"], "metrics.jsonl"))
    assert any(r.get("train/kl", 0) >= 0 for r in records if "train/kl" in r)
    assert summary["after"]["eval/reward"] == summary["after"]["eval/reward"]  # finite
    ckpt_dir = os.path.join(tiny_config["output_dir"], "checkpoints")
    latest = open(os.path.join(ckpt_dir, "latest")).read().strip()
    saved = load_file(os.path.join(ckpt_dir, latest, "model.safetensors"))
    assert saved and all("lora" in k for k in saved), "checkpoint should hold only the LoRA weights"


class _CrashingReward:
    """Mean brightness; raises on the n-th call, like a preempted job."""

    name, modality = "brightness", "image"

    def __init__(self, crash_on_call: int | None):
        self.calls, self.crash_on_call = 0, crash_on_call

    def __call__(self, media, prompts, metadata=None):
        self.calls += 1
        if self.calls == self.crash_on_call:
            raise KeyboardInterrupt("simulated preemption")
        return media.mean(dim=(1, 2, 3))


def test_crash_and_resume_equals_uninterrupted_run(tiny_config, tmp_path):
    tiny_config["train"].update(iterations=4, checkpoint_every=2)
    straight = dict(tiny_config, output_dir=str(tmp_path / "straight"))
    flowalign.train(straight, rewards=_CrashingReward(None))

    resumed = dict(tiny_config, output_dir=str(tmp_path / "resumed"))
    # calls: eval@0, it1, it2, it3 -> crash inside iteration 3, after the checkpoint at 2
    with pytest.raises(KeyboardInterrupt):
        flowalign.train(resumed, rewards=_CrashingReward(crash_on_call=4))
    assert os.path.exists(os.path.join(resumed["output_dir"], "checkpoints", "step-000002"))
    flowalign.train(resumed, rewards=_CrashingReward(None))

    a, b = _weights(straight["output_dir"]), _weights(resumed["output_dir"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _records(straight["output_dir"]) == _records(resumed["output_dir"])


def test_nan_reward_never_reaches_the_optimizer(tiny_config):
    def nan_reward(media, prompts, metadata=None):
        scores = media.mean(dim=(1, 2, 3))
        scores[0] = float("nan")
        return scores

    with pytest.raises(FloatingPointError, match="nan_reward"):
        flowalign.train(tiny_config, rewards=nan_reward)


def test_two_process_accelerate_run_groups_span_ranks(tiny_config, tmp_path):
    """`accelerate launch --cpu --num_processes 2`: each prompt's group is split over both ranks,
    rewards are gathered before advantages, and the ranks end with identical weights."""
    log_dir = tmp_path / "scored"
    log_dir.mkdir()
    (tmp_path / "rank_logging_reward.py").write_text(
        "import json, os\n"
        "class RankLoggingReward:\n"
        "    name, modality = 'rank_logged_brightness', 'image'\n"
        "    def __init__(self, log_dir):\n"
        "        self.log_dir = log_dir\n"
        "    def __call__(self, media, prompts, metadata=None):\n"
        "        rank = os.environ.get('RANK', '0')\n"
        "        with open(os.path.join(self.log_dir, f'rank{rank}.jsonl'), 'a') as f:\n"
        "            f.write(json.dumps(list(prompts)) + '\\n')\n"
        "        return media.mean(dim=(1, 2, 3))\n"
    )
    tiny_config["rewards"] = [{"_component_": "rank_logging_reward:RankLoggingReward", "log_dir": str(log_dir)}]
    tiny_config["eval"]["every"] = 0
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_config))
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{REPO}", OMP_NUM_THREADS="1")
    # `accelerate launch --cpu` always starts ONE process (accelerate 1.15's simple launcher);
    # --multi_gpu goes through torchrun, and on a machine without GPUs the recipe runs gloo on CPU.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "flowalign", "train", str(cfg_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    calls = {r: [json.loads(line) for line in open(log_dir / f"rank{r}.jsonl")] for r in (0, 1)}
    # call 0 is the held-out evaluation; calls 1.. are training iterations
    for it in range(1, tiny_config["train"]["iterations"] + 1):
        p0, p1 = calls[0][it], calls[1][it]
        assert len(p0) == len(p1) == 2 * 4 // 2  # P x G / world
        assert set(p0) == set(p1), "each prompt's group must have members on both ranks"
    assert "num_processes=2" in out.stdout + out.stderr, "the run did not see two processes"
    summary = json.load(open(os.path.join(tiny_config["output_dir"], "summary.json")))
    assert summary["iterations"] == 2
    records = read_metrics(os.path.join(tiny_config["output_dir"], "metrics.jsonl"))
    assert max(r.get("train/ratio_first_step_dev", 0.0) for r in records) <= 1e-6


def test_ema_under_bf16_autocast_saves_the_averaged_weights(tiny_config):
    tiny_config["train"].update(mixed_precision="bf16", ema_decay=0.5)
    flowalign.train(tiny_config)
    run = tiny_config["output_dir"]
    records = read_metrics(os.path.join(run, "metrics.jsonl"))
    assert all(r["train/ratio_first_step_dev"] <= 1e-6 for r in records if "train/ratio_first_step_dev" in r)
    from flowalign.training.checkpoint import latest_checkpoint, load_checkpoint

    ckpt = load_checkpoint(latest_checkpoint(run))
    final = _weights(run)
    assert ckpt.ema_state is not None and ckpt.ema_state.keys() == ckpt.model_state.keys()
    assert all(torch.equal(final[k], ckpt.ema_state[k]) for k in ckpt.ema_state), "final/ must hold the EMA weights"
    assert any(not torch.equal(ckpt.ema_state[k], ckpt.model_state[k]) for k in ckpt.ema_state)


def test_cli_sample_and_eval(tiny_config, tiny_model_dir, tmp_path):
    out_png = tmp_path / "samples.png"
    sample = subprocess.run([sys.executable, "-m", "flowalign", "sample", tiny_model_dir, "--prompt", "a handwritten one",
                             "--prompt", "the digit 7", "--samples-per-prompt", "3", "--num-steps", "2", "--out", str(out_png)],
                            capture_output=True, text=True)
    assert sample.returncode == 0, sample.stderr
    from PIL import Image

    assert Image.open(out_png).size[0] > 3 * 16
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_config))
    ev = subprocess.run([sys.executable, "-m", "flowalign", "eval", str(cfg_path)], capture_output=True, text=True)
    assert ev.returncode == 0, ev.stderr
    scores = json.loads(ev.stdout[ev.stdout.index("{"):])
    assert set(scores) >= {"eval/reward", "eval/reward/jpeg_compressibility"}
    assert scores["eval/reward"] == flowalign.evaluate(tiny_config)["eval/reward"]


def test_unknown_adapter_option_is_a_config_error_naming_the_key(tiny_config):
    from flowalign.config import ConfigError

    tiny_config["model"]["options"] = {"resolutoin": 64}
    with pytest.raises(ConfigError, match=r"^model.options: .*resolutoin"):
        flowalign.train(tiny_config)


def test_cfg_rollouts_use_the_negative_prompt(tiny_config):
    from flowalign.config import load_config
    from flowalign.recipes.rl import RLRecipe

    tiny_config["sampling"].update(guidance_scale=2.0, negative_prompt="blurry")
    recipe = RLRecipe(load_config(tiny_config))
    recipe.setup()
    try:
        cond = recipe._encode(["a handwritten one", "the digit 7"])
        expected = recipe.adapter.encode(["blurry", "blurry"]).tensors["prompt_embeds"]
        assert torch.equal(cond.negative["prompt_embeds"], expected)
        metrics = recipe.train_iteration(0)
        assert metrics["train/ratio_first_step_dev"] <= 1e-6
    finally:
        recipe.cleanup()


def test_jsonl_prompt_metadata_reaches_the_reward(tiny_config, tmp_path):
    records = [{"prompt": "a handwritten one", "target": 0.25}, {"prompt": "the digit 7", "target": 0.75}]
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    tiny_config["data"]["train_prompts"] = tiny_config["eval"]["prompts"] = str(path)
    seen = []

    def target_reward(media, prompts, metadata=None):
        seen.extend(zip(prompts, metadata))
        return torch.tensor([m["target"] for m in metadata])

    summary = flowalign.train(tiny_config, rewards=target_reward)
    by_prompt = {r["prompt"]: {"target": r["target"]} for r in records}
    # each record's fields (minus "prompt") plus "group": the sample's prompt slot in the batch
    assert seen and all({k: v for k, v in meta.items() if k != "group"} == by_prompt[prompt] for prompt, meta in seen)
    assert all(isinstance(meta["group"], int) for _, meta in seen)
    assert summary["after"]["eval/reward"] == pytest.approx(0.5)  # eval: both prompts, equal samples


def test_jsonl_prompt_file_errors_name_the_key_and_line(tiny_config, tmp_path):
    from flowalign.config import ConfigError, load_config

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt key"}\n')
    with pytest.raises(ConfigError, match=r"^data.train_prompts: .*bad.jsonl:2"):
        load_config(tiny_config, {"data.train_prompts": str(bad)})


def test_one_host_sync_per_optimizer_step_on_the_quickstart(tmp_path, monkeypatch):
    """The update of a quickstart iteration (2 optimizer steps, 2 micro-batches each) brings values
    to the host once per optimizer step: the micro-batches' metrics stay tensors, and the loss
    checks its inputs at the boundary, not per micro-batch."""
    from flowalign.config import load_config
    from flowalign.recipes.rl import RLRecipe
    from flowalign.training.host_syncs import count_host_syncs

    monkeypatch.chdir(REPO)
    cfg = load_config("configs/quickstart.yaml", {"output_dir": str(tmp_path / "q"), "train.micro_batch_size": 48,
                                                  "logging.progress": False, "logging.tensorboard": False})
    recipe = RLRecipe(cfg)
    recipe.setup()
    counts = []
    optimize = recipe._optimize

    def counted(*args, **kwargs):
        with count_host_syncs() as syncs:
            out = optimize(*args, **kwargs)
        counts.append(syncs.total)
        return out

    recipe._optimize = counted
    try:
        with count_host_syncs() as iteration:
            metrics = recipe.train_iteration(0)
    finally:
        recipe.cleanup()
    assert metrics["rollout/trained_edges"] == 4 * 8 * 6 and cfg.train.steps_per_iter == 2  # 2 micro-batches per step
    assert counts == [cfg.train.steps_per_iter], counts
    # the whole iteration, rollout and rewards included: 115 (the rollout checks each sampled step's
    # inputs); 258 before the update became one sync per optimizer step (96 of them in the update)
    assert iteration.total <= 120, iteration.summary()


def test_cosine_schedule_with_warmup_steps_every_optimizer_step_and_resumes_exactly(tiny_config, tmp_path):
    """train.lr_scheduler is stepped once per optimizer step (2 per iteration here), logged as
    train/lr, and a crash + resume continues the schedule where it stopped: same weights, same records."""
    lr = 1e-3
    tiny_config["train"]["optimizer"] = {"lr": lr}
    tiny_config["train"].update(iterations=4, checkpoint_every=2,
                                lr_scheduler={"_component_": "cosine", "warmup_steps": 2, "min_lr_ratio": 0.1})
    straight = dict(tiny_config, output_dir=str(tmp_path / "straight"))
    flowalign.train(straight, rewards=_CrashingReward(None))
    logged = [r["train/lr"] for r in read_metrics(os.path.join(straight["output_dir"], "metrics.jsonl")) if "train/lr" in r]
    steps = tiny_config["train"]["steps_per_iter"]
    total = 4 * steps
    # the lr in use after each iteration's last step (Loshchilov & Hutter 2017 with linear warmup, floor 0.1)
    expected = [lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (k * steps - 2) / (total - 2)))) for k in range(1, 5)]
    assert logged == pytest.approx(expected, rel=1e-6)

    resumed = dict(tiny_config, output_dir=str(tmp_path / "resumed"))
    with pytest.raises(KeyboardInterrupt):
        flowalign.train(resumed, rewards=_CrashingReward(crash_on_call=4))
    flowalign.train(resumed, rewards=_CrashingReward(None))
    a, b = _weights(straight["output_dir"]), _weights(resumed["output_dir"])
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _records(straight["output_dir"]) == _records(resumed["output_dir"])


def test_time_budget_stops_the_image_recipe_after_the_iteration_that_spends_it(tiny_config):
    tiny_config["train"].update(iterations=5, time_budget_s=1e-6)
    summary = flowalign.train(tiny_config)
    records = read_metrics(os.path.join(tiny_config["output_dir"], "metrics.jsonl"))
    assert summary["iterations"] == 1 and [r["step"] for r in records if "train/loss" in r] == [1]
    assert summary["train_seconds"] > 1e-6 and os.path.isdir(os.path.join(tiny_config["output_dir"], "checkpoints", "step-000001"))
    again = flowalign.train(tiny_config)  # the budget is spent: nothing more is trained
    assert again["iterations"] == 1


def test_cps_flow_grpo_log_prob_and_kl_form_stay_on_policy(tiny_config):
    """sampling.cps_log_prob reaches both the rollout and the update (ratio exactly 1 before any
    update), and algorithm.kl_form: flow_grpo trains (docs/FIDELITY.md)."""
    tiny_config["model"]["lora_rank"] = 4
    tiny_config["sampling"].update(sampler="cps", cps_log_prob="flow_grpo")
    tiny_config["algorithm"].update(kl_beta=0.04, kl_form="flow_grpo")
    tiny_config["train"]["iterations"] = 2
    flowalign.train(tiny_config)
    records = read_metrics(os.path.join(tiny_config["output_dir"], "metrics.jsonl"))
    devs = [r["train/ratio_first_step_dev"] for r in records if "train/ratio_first_step_dev" in r]
    assert devs and max(devs) <= 1e-6
    assert all(math.isfinite(r["train/kl"]) and r["train/kl"] >= 0 for r in records if "train/kl" in r)


def test_fidelity_options_name_the_key(tiny_config):
    from flowalign.config import ConfigError

    for section, key in (("algorithm", "kl_form"), ("algorithm", "std_estimator"), ("sampling", "cps_log_prob")):
        cfg = {**tiny_config, section: {**tiny_config[section], key: "bogus"}}
        with pytest.raises(ConfigError, match=f"{section}.{key}"):
            flowalign.load_config(cfg)
