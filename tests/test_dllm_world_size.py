"""World-size invariance of the dLLM algorithms (``dllm`` recipe, flowalign/recipes/dllm_rl.py).

One training iteration of every ``dllm`` preset (configs/dllm/<name>_addition.yaml), from the same
seed, with 1 and with 2 processes (gloo on CPU): the two ranks' rollouts, concatenated in rank
order, are exactly the 1-process run's (same tokens: every group decodes from its own stream keyed
by the iteration and the prompt's position, never by the rank), every rollout gets the same
advantage (per sequence or, MDPO, per step), and the update (the estimator's masks also drawn per
group) moves the weights to the same values within float tolerance. The held-out evaluation, sampled
at temperature 1 so that its random streams matter, gives the same metrics with 1 and 2 processes.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch
import torch.multiprocessing as mp

from tests.conftest import REPO, free_port, join_processes

QUICKSTART = os.path.join(REPO, "assets", "dllm_quickstart")
#: run name -> (preset, its own overrides)
CASES = {
    "diffu_grpo": ("diffu_grpo", {}),
    "coupled_grpo": ("coupled_grpo", {}),
    "gdpo": ("gdpo", {}),
    "mdpo": ("mdpo", {}),
    "cj_grpo": ("cj_grpo", {}),
    "igpo": ("igpo", {}),
    "just_grpo": ("just_grpo", {}),
    # the one normalisation that spans groups: the std of the whole iteration's batch, over every rank
    "diffu_grpo_global_std": ("diffu_grpo", {"algorithm.std_mode": "global"}),
    "mdpo_global_std": ("mdpo", {"algorithm.std_mode": "global"}),
}
#: metrics of the rollouts and advantages that are means or counts over every rank's rows
GLOBAL_METRICS = ("train/reward_mean", "train/accuracy", "train/zero_signal_groups", "train/advantage_abs_mean")
#: the run whose evaluation is compared too (sampled held-out decoding and the diversity pass)
EVAL_CASE = "diffu_grpo"


def _overrides(name: str, out_dir: str) -> dict:
    """One iteration of 4 prompts x 4 rollouts (2 prompts per rank with 2 processes), 2 inner steps."""
    _, own = CASES[name]
    return {"output_dir": os.path.join(out_dir, name), "device": "cpu", "num_threads": 1, "seed": 3,
            "model.pretrained": os.path.join(QUICKSTART, "model"), "task.train": os.path.join(QUICKSTART, "train.jsonl"),
            "task.eval": os.path.join(QUICKSTART, "eval.jsonl"), "sampling.prompts_per_iter": 4, "sampling.group_size": 4,
            "algorithm.inner_steps": 2, "train.iterations": 1, "train.resume": "never", "eval.every": 0,
            "eval.max_examples": 12, "eval.batch_size": 4, "eval.temperature": 1.0, "eval.diversity_prompts": 3,
            "eval.diversity_samples": 3, "logging.progress": False, "logging.tensorboard": False, **own}


def digit_credit(completion: str, example) -> float:
    """Partial credit (the share of right answer digits): groups almost always have a reward
    spread, so the tiny iteration updates; a rollout is correct (threshold 1) only when exact."""
    answer = example.answer
    return sum(a == b for a, b in zip(completion, answer)) / len(answer)


def _run_one(name: str, out_dir: str, rank: int) -> None:
    """One iteration of ``name``; saves this rank's rollouts, rewards, advantages, metrics and the updated weights."""
    from flowalign.config import load_config
    from flowalign.recipes.dllm_rl import DLLMRecipe

    preset, _ = CASES[name]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = load_config(os.path.join(REPO, "configs", "dllm", f"{preset}_addition.yaml"), _overrides(name, out_dir),
                      world_size=world)
    recipe = DLLMRecipe(cfg, rewards=digit_credit)
    recipe.setup(for_training=False)
    try:
        seen: dict = {"eval": recipe.evaluate(0) if name == EVAL_CASE else None}
        advantages_fn = recipe.algorithm.advantages

        def spy(recipe_, rollouts):
            adv, metrics = advantages_fn(recipe_, rollouts)
            seen.update(sequences=rollouts.sequences.cpu().clone(), rewards=rollouts.rewards.cpu().clone(),
                        fixed=rollouts.fixed.cpu().clone(), advantages=adv.detach().cpu().clone())
            return adv, metrics

        recipe.algorithm.advantages = spy
        seen["metrics"] = recipe.train_iteration(0)
        seen["weights"] = {n: p.detach().cpu().clone() for n, p in recipe.model.named_parameters() if p.requires_grad}
        torch.save(seen, os.path.join(out_dir, f"{name}.world{world}.rank{rank}.pt"))
    finally:
        recipe.cleanup()


def _worker(rank: int, world: int, port: int, out_dir: str, names: list[str]) -> None:
    join_processes(rank, world, port)
    torch.set_num_threads(1)
    for name in names:
        _run_one(name, out_dir, rank)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("dllm_world_size"))
    names = list(CASES)
    mp.spawn(_worker, args=(1, free_port(), out, names), nprocs=1, join=True)
    mp.spawn(_worker, args=(2, free_port(), out, names), nprocs=2, join=True)
    return out


# ------------------------------------------------------------------------------------------------
# per-group random streams (fast)
# ------------------------------------------------------------------------------------------------
def test_row_streams_draw_each_block_from_its_own_stream():
    """A block's rows are the plain draw of its stream, whichever blocks sit beside it; one block
    equals ``stream_generator``'s draw; a draw of the wrong number of rows is refused."""
    from flowalign.training.rng import RowStreams, rand_rows, randint_rows, stream_generator

    both = RowStreams.for_blocks(0, "masks", [5, 6], [2, 3], prefix=(7,), suffix=(1,))
    alone = RowStreams.for_blocks(0, "masks", [6], [3], prefix=(7,), suffix=(1,))
    u, v = rand_rows((5, 4, 3), both, dtype=torch.float64), rand_rows((3, 4, 3), alone, dtype=torch.float64)
    assert torch.equal(u[2:], v)
    assert torch.equal(u[:2], torch.rand((2, 4, 3), generator=stream_generator(0, "masks", 7, 5, 1), dtype=torch.float64))
    # the streams keep their state between draws, as one generator does
    g = stream_generator(0, "masks", 7, 6, 1)
    torch.rand((3, 4, 3), generator=g, dtype=torch.float64)
    assert torch.equal(randint_rows(0, 9, (3, 1), alone), torch.randint(0, 9, (3, 1), generator=g))
    by_rows = RowStreams.for_rows(0, "masks", torch.tensor([5, 5, 6, 6, 6]), prefix=(7,), suffix=(1,))
    assert (by_rows.seeds, by_rows.sizes) == (both.seeds, both.sizes)
    with pytest.raises(ValueError, match="covers 5 rows"):
        rand_rows((4, 2), both)


def test_a_group_decodes_and_draws_masks_alike_alone_or_beside_another():
    """``generate`` at temperature 1 with random remasking, and every estimator's mask draw: a
    group's rows are the same decoded / drawn alone (its rank's share) or after another group."""
    from flowalign.dllm.algorithms import LogProbEstimator, RolloutBatch
    from flowalign.dllm.sampling import SamplingSpec, generate
    from flowalign.training.rng import RowStreams
    from tests.test_dllm_sampling import TableLM

    G, P, Lg = 3, 2, 4
    lm = TableLM(P + Lg, 7, seed=1)
    prompts = torch.tensor([[0, 1], [2, 3]]).repeat_interleave(G, dim=0)
    spec = SamplingSpec(gen_length=Lg, steps=Lg, temperature=1.0, remasking="random")

    def streams(name, groups):
        return RowStreams.for_blocks(4, name, groups, [G] * len(groups), prefix=(0,))

    both = generate(lm, prompts, None, spec, mask_id=lm.mask_id, generator=streams("rollout", [0, 1]))
    second = generate(lm, prompts[G:], None, spec, mask_id=lm.mask_id, generator=streams("rollout", [1]))
    assert torch.equal(both.sequences[G:], second.sequences) and torch.equal(both.commit_step[G:], second.commit_step)
    assert not torch.equal(both.sequences[:G], both.sequences[G:])  # the groups draw from different streams
    batch = RolloutBatch(both.sequences, both.attention_mask, P, torch.ones(2 * G, Lg, dtype=torch.bool))
    for name in ("one_step", "coupled", "elbo_double_mc", "elbo_semi_deterministic", "elbo_l_form"):
        est = LogProbEstimator(name, mask_id=lm.mask_id, p_mask_prompt=0.5)
        whole = est.draw(batch, streams("masks", [0, 1]))
        part = est.draw(batch.select(torch.arange(G, 2 * G)), streams("masks", [1]))
        for field in ("completion", "t", "weight", "prompt"):
            a, b = getattr(whole, field), getattr(part, field)
            assert (a is None and b is None) or torch.equal(a[G:], b), (name, field)


@functools.cache
def BASE() -> dict[str, torch.Tensor]:
    """The quickstart model's weights before training."""
    from flowalign.dllm.model import MaskedDiffusionLM

    model = MaskedDiffusionLM.from_pretrained(os.path.join(QUICKSTART, "model"))
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _load(runs: str, name: str) -> tuple[dict, list[dict]]:
    one = torch.load(os.path.join(runs, f"{name}.world1.rank0.pt"))
    two = [torch.load(os.path.join(runs, f"{name}.world2.rank{r}.pt")) for r in (0, 1)]
    return one, two


@pytest.mark.slow  # ~1.5 min on the loaded 2-core machine: three interpreters, nine one-iteration runs
@pytest.mark.parametrize("name", list(CASES))
def test_one_and_two_processes_decode_score_and_step_alike(runs, name):
    one, two = _load(runs, name)
    # rank r holds the iteration's prompts 2r, 2r + 1: its rows are the 1-process run's rows in that order
    for key in ("sequences", "rewards", "fixed"):
        assert torch.equal(torch.cat([part[key] for part in two]), one[key]), key
    torch.testing.assert_close(torch.cat([part["advantages"] for part in two]), one["advantages"], rtol=0, atol=1e-6)
    # the iteration's metrics of the rollouts and advantages are the whole iteration's, on every rank
    shared = [k for k in one["metrics"] if k.startswith(("igpo/", "train/step_reward")) or k in GLOBAL_METRICS]
    for key in shared:
        assert two[0]["metrics"][key] == two[1]["metrics"][key] == pytest.approx(one["metrics"][key], abs=1e-6), key
    assert one["metrics"]["train/ratio_first_step_dev"] < 1e-5
    # the same update: the ranks agree exactly with each other, and with one process within 2 % of the
    # largest weight change (Adam's first steps move every weight by about lr; batches of another size
    # sum the same gradients in another order, ~1e-7 here)
    moved = max(float((v - BASE()[k]).abs().max()) for k, v in one["weights"].items())
    for key, value in one["weights"].items():
        assert torch.equal(two[0]["weights"][key], two[1]["weights"][key]), key
        if key.endswith("attention.self.key.bias"):
            # exact gradient 0 (softmax(q.(k + b)) is invariant to the per-query constant q.b): what
            # it gets is rounding noise, which Adam scales to lr-sized steps in either run
            continue
        torch.testing.assert_close(two[0]["weights"][key], value, rtol=0, atol=0.02 * moved, msg=key)


@pytest.mark.slow
def test_the_comparisons_are_not_vacuous(runs):
    """Every run trained rows with non-zero advantages and moved the weights; IGPO re-decoded at
    least one all-wrong group with hints (its per-group hint streams were used)."""
    for name in CASES:
        one, two = _load(runs, name)
        assert one["advantages"].abs().sum() > 0, name
        assert one["metrics"]["train/trained_rows"] == sum(part["metrics"]["train/trained_rows"] for part in two) > 0, name
        moved = [k for k, v in one["weights"].items() if not torch.equal(BASE()[k], v)]
        assert len(moved) > len(one["weights"]) // 2, f"{name}: one iteration changed few weights ({moved})"
    one, _ = _load(runs, "igpo")
    assert one["metrics"]["igpo/hinted_groups"] > 0, "no all-wrong group: IGPO's hint path was not exercised"


@pytest.mark.slow
def test_held_out_evaluation_does_not_depend_on_the_processes(runs):
    """Sampled (temperature 1) held-out decoding and the diversity pass: the same metrics with 1
    and 2 processes (the held-out set is cut into the same batches, each from its own stream)."""
    one, two = _load(runs, EVAL_CASE)
    assert set(one["eval"]) == {"eval/accuracy", "eval/reward", "eval/diversity"}
    for key, value in one["eval"].items():
        assert two[0]["eval"][key] == two[1]["eval"][key] == pytest.approx(value, abs=1e-6), key
