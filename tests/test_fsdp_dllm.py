"""FSDP2 (``train.fsdp``) on the dLLM recipe (flowalign/recipes/dllm_rl.py), 2 CPU processes with gloo.

Every forward of a sharded model all-gathers weights, so the ranks must run the same forwards even
where the data decide how many (IGPO's hinted re-decodes, rows without signal left out of the
update, held-out batches dealt round-robin); the recipe pads them (``DLLMRecipe._lockstep`` /
``_lockstep_rows``) and sums the gradients over the ranks as its unsharded path does
(``flowalign.training.fsdp.sum_gradients``). Here, one iteration with the quickstart model sharded
over 2 processes against one unsharded process:

* diffu-GRPO, full fine-tuning (its k3 KL reference is a frozen copy, sharded too);
* diffu-GRPO with LoRA (the reference is the adapter disabled) and ZeRO-2-like resharding;
* IGPO without KL where the reward makes every rollout of rank 1's prompts wrong: rank 1 re-decodes
  its groups with hints and then has no row with signal, rank 0 none to re-decode and rows to train;

the same rollouts, rewards and advantages, the same update within float tolerance, and ``final/``
gathered from the shards in the usual layout. A sharded run stopped by a SIGTERM after one iteration
and continued, from a gathered or a per-rank sharded checkpoint, is bit-identical to an uninterrupted
one (its held-out batches are uneven over the ranks: 3 batches on 2 processes).
"""

from __future__ import annotations

import functools
import glob
import json
import os

import pytest
import torch
import torch.multiprocessing as mp

from tests.conftest import REPO, free_port, join_processes, train_preempted

QUICKSTART = os.path.join(REPO, "assets", "dllm_quickstart")
SEED = 3
#: run name -> (preset in configs/dllm/<preset>_addition.yaml, its own overrides)
CASES = {
    "full": ("diffu_grpo", {}),
    "lora": ("diffu_grpo", {"model.lora_rank": 4, "train.fsdp.reshard_after_forward": False}),
    "igpo_uneven": ("igpo", {"algorithm.kl_beta": 0.0}),
}


def _overrides(name: str, out_dir: str, fsdp: bool) -> dict:
    """One iteration of 4 prompts x 4 rollouts (2 prompts per rank with 2 processes), 2 inner steps,
    micro-batches of 4 rows (several passes per optimizer step)."""
    preset, own = CASES[name]
    return {"output_dir": os.path.join(out_dir, name), "device": "cpu", "num_threads": 1, "seed": SEED,
            "model.pretrained": os.path.join(QUICKSTART, "model"), "task.train": os.path.join(QUICKSTART, "train.jsonl"),
            "task.eval": os.path.join(QUICKSTART, "eval.jsonl"), "sampling.prompts_per_iter": 4, "sampling.group_size": 4,
            "algorithm.inner_steps": 2, "train.micro_batch_size": 4, "train.iterations": 1, "train.resume": "never",
            "eval.every": 0, "eval.max_examples": 12, "eval.batch_size": 4, "logging.progress": False,
            "logging.tensorboard": False, "train.fsdp.enabled": fsdp, **own}


def digit_credit(completion: str, example) -> float:
    """Partial credit (the share of right answer digits): groups almost always have a reward spread."""
    answer = example.answer
    return sum(a == b for a, b in zip(completion, answer)) / len(answer)


@functools.cache
def _rank1_prompts() -> frozenset[str]:
    """The prompts of iteration 0's positions 2 and 3 (rank 1's share with 2 processes)."""
    from flowalign.dllm.tasks import get_task
    from flowalign.training.rng import prompt_indices

    examples = get_task("addition").load(os.path.join(QUICKSTART, "train.jsonl"))
    return frozenset(examples[i].prompt for i in prompt_indices(len(examples), 4, 0, SEED)[2:])


def credit_but_rank1_wrong(completion: str, example) -> float:
    """:func:`digit_credit`, but 0 for rank 1's prompts: their groups are all wrong, IGPO re-decodes
    them with hints (which stay wrong) and the update leaves them out (no reward spread)."""
    return 0.0 if example.prompt in _rank1_prompts() else digit_credit(completion, example)


REWARDS = {"full": digit_credit, "lora": digit_credit, "igpo_uneven": credit_but_rank1_wrong}


def _run_one(name: str, out_dir: str, rank: int, world: int) -> None:
    """One iteration of ``name`` (sharded with 2 processes); saves this rank's rollouts, rewards,
    advantages, metrics, the trainable weights before and after (gathered whole) and, sharded,
    ``final/`` written through ``Recipe.full_weights``."""
    from flowalign.config import load_config
    from flowalign.recipes.dllm_rl import DLLMRecipe
    from flowalign.training.fsdp import full_tensor, is_sharded
    from flowalign.training.rundir import write_folder_atomically

    preset, _ = CASES[name]
    cfg = load_config(os.path.join(REPO, "configs", "dllm", f"{preset}_addition.yaml"),
                      _overrides(name, out_dir, fsdp=world > 1), world_size=world)
    recipe = DLLMRecipe(cfg, rewards=REWARDS[name])
    recipe.setup(for_training=False)
    try:
        assert is_sharded(recipe.model) == (world > 1)
        weights = lambda: {n: full_tensor(p.detach()).cpu().clone() for n, p in recipe.model.named_parameters() if p.requires_grad}  # noqa: E731
        seen: dict = {"before": weights()}
        advantages_fn = recipe.algorithm.advantages

        def spy(recipe_, rollouts):
            adv, metrics = advantages_fn(recipe_, rollouts)
            seen.update(sequences=rollouts.sequences.cpu().clone(), rewards=rollouts.rewards.cpu().clone(),
                        advantages=adv.detach().cpu().clone())
            return adv, metrics

        recipe.algorithm.advantages = spy
        seen["metrics"] = recipe.train_iteration(0)
        seen["after"] = weights()
        if world > 1 and name != "igpo_uneven":
            with recipe.full_weights():
                if recipe.is_main:
                    write_folder_atomically(os.path.join(out_dir, f"{name}.final"), recipe.save_pretrained)
        torch.save(seen, os.path.join(out_dir, f"{name}.world{world}.rank{rank}.pt"))
    finally:
        recipe.cleanup()


def _train(out: str, iterations: int, state_dict: str = "full") -> None:
    """Sharded diffu-GRPO (full fine-tuning, KL reference) for ``iterations``, a checkpoint after each
    (``train.fsdp.state_dict``: gathered ``full`` or per-rank ``sharded``); continues a run in ``out``."""
    from flowalign.api import train

    overrides = {**_overrides("full", out, fsdp=True), "output_dir": out, "train.iterations": iterations,
                 "train.checkpoint_every": 1, "train.resume": "auto", "train.fsdp.state_dict": state_dict}
    train(os.path.join(REPO, "configs", "dllm", "diffu_grpo_addition.yaml"), overrides, rewards=digit_credit)


def _train_interrupted(out: str, rank: int, state_dict: str) -> None:
    """:func:`_train` for 2 iterations, stopped by a SIGTERM to rank 1 after the first (conftest.train_preempted)."""
    from flowalign.recipes.dllm_rl import DLLMRecipe

    train_preempted(DLLMRecipe, rank, out, lambda: _train(out, 2, state_dict))


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import faulthandler

    # a collective that no other rank matches hangs (gloo waits 30 min): fail with the stacks instead
    faulthandler.dump_traceback_later(600, exit=True)
    join_processes(rank, world, port)
    torch.set_num_threads(1)
    for name in CASES:
        _run_one(name, out_dir, rank, world)
    if world > 1:
        _train(os.path.join(out_dir, "straight"), 2)
        for state_dict in ("full", "sharded"):  # SIGTERM in iteration 1: checkpoint, stop, continue
            _train_interrupted(os.path.join(out_dir, f"resumed_{state_dict}"), rank, state_dict)
            _train(os.path.join(out_dir, f"resumed_{state_dict}"), 2, state_dict)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("fsdp_dllm"))
    mp.spawn(_worker, args=(1, free_port(), out), nprocs=1, join=True)
    mp.spawn(_worker, args=(2, free_port(), out), nprocs=2, join=True)
    return out


def _load(runs: str, name: str) -> tuple[dict, list[dict]]:
    one = torch.load(os.path.join(runs, f"{name}.world1.rank0.pt"))
    two = [torch.load(os.path.join(runs, f"{name}.world2.rank{r}.pt")) for r in (0, 1)]
    return one, two


@pytest.mark.slow  # the module's runs: ~1 min on the loaded 2-core machine
@pytest.mark.parametrize("name", list(CASES))
def test_sharded_iteration_equals_one_unsharded_process(runs, name):
    one, two = _load(runs, name)
    # rank r holds the iteration's prompts 2r, 2r + 1: its rows are the 1-process run's rows in that order
    for key in ("sequences", "rewards"):
        assert torch.equal(torch.cat([part[key] for part in two]), one[key]), key
    torch.testing.assert_close(torch.cat([part["advantages"] for part in two]), one["advantages"], rtol=0, atol=1e-6)
    assert one["advantages"].abs().sum() > 0
    assert one["metrics"]["train/trained_rows"] == sum(part["metrics"]["train/trained_rows"] for part in two) > 0
    assert one["metrics"]["train/ratio_first_step_dev"] < 1e-5
    assert (name == "lora") == all("lora" in k for k in one["after"])
    for key in one["after"]:
        assert torch.equal(two[0]["before"][key], one["before"][key]), key  # same start (LoRA init included)
        assert torch.equal(two[0]["after"][key], two[1]["after"][key]), key  # the ranks agree
    step_one = torch.cat([(one["after"][k] - one["before"][k]).flatten() for k in one["after"]])
    step_two = torch.cat([(two[0]["after"][k] - one["before"][k]).flatten() for k in one["after"]])
    assert float(step_one.norm()) > 0
    # float tolerance: the sharded run sums gradients in another order (the same criterion as tests/test_fsdp.py)
    assert float((step_two - step_one).norm() / step_one.norm()) < 1e-3


@pytest.mark.slow
def test_uneven_case_ran_different_forward_counts_on_the_ranks(runs):
    """The IGPO case is not vacuous: rank 1 re-decoded its all-wrong groups with hints and trained
    no row, rank 0 re-decoded nothing and trained rows; so the ranks' own forwards differed (the
    padding forwards are not counted in ``cost/forward_calls``)."""
    _, two = _load(runs, "igpo_uneven")
    m0, m1 = (part["metrics"] for part in two)
    assert m0["igpo/hinted_groups"] == m1["igpo/hinted_groups"] > 0
    assert m0["train/trained_rows"] > 0 and m1["train/trained_rows"] == 0
    assert m0["cost/forward_calls"] != m1["cost/forward_calls"]


def _safetensors(folder: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for path in sorted(glob.glob(os.path.join(folder, "**", "*.safetensors"), recursive=True)):
        out.update({f"{os.path.relpath(path, folder)}:{k}": v for k, v in load_file(path).items()})
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["full", "lora"])
def test_sharded_export_loads_as_the_trained_model(runs, name):
    """``final/`` of a sharded model, gathered by ``Recipe.full_weights``: ``from_pretrained`` loads
    the trained weights (full model, or base + LoRA adapter), in the files an unsharded model writes."""
    from flowalign.dllm.model import MaskedDiffusionLM

    _, two = _load(runs, name)
    folder = os.path.join(runs, f"{name}.final")
    loaded = MaskedDiffusionLM.from_pretrained(folder)
    trained = {n: p.detach() for n, p in loaded.named_parameters() if p.requires_grad}
    assert trained.keys() == two[0]["after"].keys()
    assert all(torch.equal(trained[k], two[0]["after"][k]) for k in trained)
    # the layout of an unsharded model's save_pretrained (tied embeddings written once, same keys)
    plain = MaskedDiffusionLM.from_pretrained(folder)
    reference = os.path.join(runs, f"{name}.plain")
    plain.save_pretrained(reference)
    written, plain_written = _safetensors(folder), _safetensors(reference)
    assert written.keys() == plain_written.keys()
    assert all(torch.equal(written[k], plain_written[k]) for k in written)


@pytest.mark.slow
@pytest.mark.parametrize("state_dict", ["full", "sharded"])
def test_stopped_and_continued_sharded_run_is_bit_identical(runs, state_dict):
    """Checkpoints gathered whole (``full``) or written per rank (``sharded``): the continued run's
    ``final/`` and every logged training and held-out metric equal the uninterrupted run's."""
    straight, resumed = os.path.join(runs, "straight"), os.path.join(runs, f"resumed_{state_dict}")
    a, b = _safetensors(os.path.join(straight, "final")), _safetensors(os.path.join(resumed, "final"))
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[k], b[k]) for k in a)
    metrics: list[dict[int, dict]] = [{}, {}]
    for run, merged in zip((straight, resumed), metrics):
        for record in map(json.loads, open(os.path.join(run, "metrics.jsonl"))):  # training and evaluation lines
            merged.setdefault(record["step"], {}).update({k: v for k, v in record.items() if k.startswith(("train/", "eval/"))})
    assert metrics[0] == metrics[1]
    assert all("train/loss" in metrics[0][step] for step in (1, 2)) and "eval/accuracy" in metrics[0][2]
