"""Online Diffusion-DPO and D3PO (flowalign/algorithms/diffusion_dpo.py, d3po.py, flowalign/losses/dpo.py): the
preference pairs, both losses by hand and against independent re-implementations of the authors' lines, the
config checks, and two iterations of each quickstart config through ``flowalign.train``."""

from __future__ import annotations

import math
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from flowalign.algorithms.d3po import PairTargets, pair_units, pair_values
from flowalign.algorithms.flow import ScoredRollout
from flowalign.config import load_config
from flowalign.errors import ConfigError
from flowalign.losses.dpo import d3po_loss, diffusion_dpo_loss, preference_pairs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _softplus_neg(x: float) -> float:
    """``−log σ(x) = log(1 + e^{−x})``."""
    return math.log1p(math.exp(-x))


# ------------------------------------------------------------------------------------------------
# pairs
# ------------------------------------------------------------------------------------------------
def test_preference_pairs_best_vs_worst_by_hand():
    # group 7: 0.2 0.9 0.1 0.9 -> best the first 0.9 (index 1), worst index 2
    # group 3: all 0.5 -> a tie, no pair; group 5: best index 8 (index 9 is invalid, 2.0), worst index 7
    # group 4: a single valid sample (index 11 invalid) -> no pair
    values = torch.tensor([0.2, 0.9, 0.1, 0.9, 0.5, 0.5, 0.5, -1.0, 3.0, 9.0, 1.0, 2.0])
    groups = torch.tensor([7, 7, 7, 7, 3, 3, 3, 5, 5, 5, 4, 4])
    valid = torch.ones(12, dtype=torch.bool)
    valid[9] = valid[11] = False
    pairs = preference_pairs(values, groups, valid)
    assert pairs.tolist() == [[1, 2], [8, 7]]
    assert preference_pairs(torch.ones(4), torch.zeros(4, dtype=torch.long)).shape == (0, 2)
    with pytest.raises(ValueError, match="groups"):
        preference_pairs(values, groups[:3])


def _scored(scores, components=None, weights=None):
    scores = torch.tensor(scores)
    valid = torch.ones_like(scores, dtype=torch.bool)
    return ScoredRollout(scores=scores, valid=valid, components=components or {}, weights=weights or {"r": 1.0},
                         all_scores=scores, all_groups=torch.zeros(len(scores), dtype=torch.long), all_valid=valid,
                         rank=0, world=1, gather=lambda t: t)


def test_judge_pairs_rank_by_the_judge_win_rates_not_the_total_reward():
    # a pointwise reward (weight 10) would pick 0 over 2; the judge's win rates pick 2 over 0
    comps = {"aes": torch.tensor([1.0, 0.5, 0.0]), "dig_winrate": torch.tensor([0.0, 0.5, 1.0]),
             "dig_winrate/failed_frac": torch.zeros(3)}
    scored = _scored([10.0, 5.5, 1.0], comps, {"aes": 10.0, "dig_winrate": 1.0})
    groups = torch.zeros(3, dtype=torch.long)
    assert preference_pairs(pair_values(scored, "best_worst"), groups).tolist() == [[0, 2]]
    assert preference_pairs(pair_values(scored, "judge"), groups).tolist() == [[2, 0]]
    with pytest.raises(ValueError, match="pairwise_winrate"):
        pair_values(_scored([1.0, 0.0], {"r": torch.tensor([1.0, 0.0])}), "judge")


def _flat_tree(num_leaves: int, steps: int, trained: int, groups: list[int]):
    """A flat rollout's bookkeeping: leaf ``l``'s edge at step ``t`` is ``l·steps + t``; the first ``trained`` steps train."""
    edges = torch.arange(num_leaves * steps).view(num_leaves, steps)
    return SimpleNamespace(leaf_edges=edges, num_leaves=num_leaves, num_edges=num_leaves * steps,
                           step=torch.arange(steps).repeat(num_leaves), trainable=torch.arange(steps).repeat(num_leaves) < trained,
                           leaf_group=torch.tensor(groups))


def test_targets_and_units_of_two_groups():
    from flowalign.algorithms.d3po import D3PO

    cfg = load_config(os.path.join(REPO, "configs/d3po/quickstart.yaml"))
    algo = D3PO(cfg)
    tree = _flat_tree(6, 3, 2, [0, 0, 0, 1, 1, 1])
    scored = _scored([0.3, 0.1, 0.2, 0.4, 0.4, 0.4])  # group 1 ties: one pair, (0, 1)
    t = algo.targets(tree, scored, None, 0)
    assert isinstance(t, PairTargets) and t.pairs.tolist() == [[0, 1]]
    assert t.advantages.tolist() == [1.0] * 3 + [-1.0] * 3 + [0.0] * 12
    assert t.trainable.nonzero().squeeze(1).tolist() == [0, 1, 3, 4]
    assert t.metrics == {"train/pairs": 1.0, "train/tied_groups": 1.0}
    ew, el = pair_units(tree, t.pairs, t.trainable)
    assert ew.tolist() == [0, 1] and el.tolist() == [3, 4]  # steps 0 and 1 of both trajectories


# ------------------------------------------------------------------------------------------------
# D3PO's loss
# ------------------------------------------------------------------------------------------------
def test_d3po_loss_two_pairs_by_hand():
    # beta 0.1, eps 0.1. Unit 1: log r_w = 0.05 (inside [log 0.9, log 1.1]); log r_l = -0.2 -> clipped to 0.9.
    # Unit 2: log r_w = 0.3 -> clipped to 1.1; log r_l = 0.02.
    lp_w = torch.tensor([-1.0, -2.0], requires_grad=True)
    lp_l = torch.tensor([-3.0, -4.0], requires_grad=True)
    ref_w, ref_l = torch.tensor([-1.05, -2.3]), torch.tensor([-2.8, -4.02])
    x1 = 0.1 * 0.05 - 0.1 * math.log(0.9)  # 0.0155360506
    x2 = 0.1 * math.log(1.1) - 0.1 * 0.02  # 0.0075310180
    loss, m = d3po_loss(lp_w, ref_w, lp_l, ref_l, beta=0.1, ratio_clip=0.1)
    assert math.isclose(loss.item(), (_softplus_neg(x1) + _softplus_neg(x2)) / 2, rel_tol=1e-6)
    assert m["implicit_acc"].item() == 1.0 and math.isclose(m["clip_frac"].item(), 0.5)
    loss.backward()
    # d/dx -log sigma(x) = -(1 - sigma(x)); x = beta log r_w - beta log r_l; a clipped ratio has no gradient
    g1 = -(1 - 1 / (1 + math.exp(-x1))) * 0.1 / 2
    g2 = -(1 - 1 / (1 + math.exp(-x2))) * 0.1 / 2
    torch.testing.assert_close(lp_w.grad, torch.tensor([g1, 0.0]), rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(lp_l.grad, torch.tensor([0.0, -g2]), rtol=1e-5, atol=1e-9)


def test_d3po_loss_equals_the_reference_lines():
    """yk7333/d3po @ 40d3175 scripts/rm/train_d3po.py lines 183-198 and 595-599, re-implemented on the samples
    ``0`` / ``1`` of a pair in either order (``compare`` of their rewards gives the preference)."""
    g = torch.Generator().manual_seed(0)
    lp0, lp1 = torch.randn(5, generator=g) * 0.1, torch.randn(5, generator=g) * 0.1
    ref0, ref1 = lp0 + torch.randn(5, generator=g) * 0.1, lp1 + torch.randn(5, generator=g) * 0.1
    reward0, reward1 = torch.tensor([1.0, 0.0, 2.0, 0.0, 5.0]), torch.tensor([0.0, 1.0, 1.0, 3.0, 4.0])
    a_dom = reward0 < reward1  # 1-D rewards: "a dominates" means a is the worse sample
    c = torch.zeros(5, 2)
    c[a_dom] = torch.tensor([-1.0, 1.0])
    c[~a_dom] = torch.tensor([1.0, -1.0])
    ratio_0 = torch.clamp(torch.exp(lp0 - ref0), 1 - 0.1, 1 + 0.1)
    ratio_1 = torch.clamp(torch.exp(lp1 - ref1), 1 - 0.1, 1 + 0.1)
    expected = -torch.log(torch.sigmoid(0.1 * torch.log(ratio_0) * c[:, 0] + 0.1 * torch.log(ratio_1) * c[:, 1])).mean()
    w0 = ~a_dom  # sample 0 preferred
    lp_w, lp_l = torch.where(w0, lp0, lp1), torch.where(w0, lp1, lp0)
    rf_w, rf_l = torch.where(w0, ref0, ref1), torch.where(w0, ref1, ref0)
    loss, _ = d3po_loss(lp_w, rf_w, lp_l, rf_l, beta=0.1, ratio_clip=0.1)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# Diffusion-DPO's loss
# ------------------------------------------------------------------------------------------------
def test_diffusion_dpo_loss_two_pairs_by_hand():
    # D = 2, targets 0, beta 2: e = mean of squares.
    # pair 1: e_w = (1 + 1)/2 = 1, e_ref,w = (4 + 0)/2 = 2, e_l = 0, e_ref,l = (0 + 1)/2 = 0.5
    #         inner = -1 x [(1 - 2) - (0 - 0.5)] = 0.5
    # pair 2: e_w = 2, e_ref,w = 0, e_l = 0.5, e_ref,l = 0.5 -> inner = -1 x [2 - 0] = -2
    v_w = torch.tensor([[1.0, -1.0], [2.0, 0.0]], requires_grad=True)
    v_ref_w = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    v_l = torch.tensor([[0.0, 0.0], [1.0, 0.0]], requires_grad=True)
    v_ref_l = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    zero = torch.zeros(2, 2)
    loss, m = diffusion_dpo_loss(v_w, v_l, v_ref_w, v_ref_l, zero, zero, beta=2.0)
    assert math.isclose(loss.item(), (_softplus_neg(0.5) + _softplus_neg(-2.0)) / 2, rel_tol=1e-6)
    assert m["implicit_acc"].item() == 0.5
    assert math.isclose(m["model_mse"].item(), 0.5 * ((1 + 2) / 2 + (0 + 0.5) / 2), rel_tol=1e-6)


def test_diffusion_dpo_loss_equals_the_reference_lines():
    """SalesforceAIResearch/DiffusionDPO @ 5233e75 train.py lines 1121-1145, re-implemented on its batch layout
    (preferred half first, ``chunk(2)``), with the flow target in place of the noise."""
    g = torch.Generator().manual_seed(1)
    model_pred, ref_pred, target = (torch.randn(6, 4, 3, 3, generator=g) for _ in range(3))
    model_losses = (model_pred - target).pow(2).mean(dim=[1, 2, 3])
    model_losses_w, model_losses_l = model_losses.chunk(2)
    ref_losses = (ref_pred - target).pow(2).mean(dim=[1, 2, 3])
    ref_losses_w, ref_losses_l = ref_losses.chunk(2)
    inside_term = -0.5 * 0.7 * ((model_losses_w - model_losses_l) - (ref_losses_w - ref_losses_l))
    expected = -1 * F.logsigmoid(inside_term).mean()
    (v_w, v_l), (r_w, r_l), (t_w, t_l) = model_pred.chunk(2), ref_pred.chunk(2), target.chunk(2)
    loss, m = diffusion_dpo_loss(v_w, v_l, r_w, r_l, t_w, t_l, beta=0.7)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(m["implicit_acc"], (inside_term > 0).float().mean())


def test_at_the_reference_both_gradients_are_beta_weighted_preference_differences():
    """At πθ = π_ref the inner terms are 0 and σ'(0) = 1/4: Diffusion-DPO's gradient is β/4 ∇(e_w − e_l) / B and
    D3PO's −β/2 ∇(log π_w − log π_l) / B (lower the preferred error / raise the preferred log-prob)."""
    g = torch.Generator().manual_seed(2)
    v_w, v_l, t_w, t_l = (torch.randn(3, 5, generator=g) for _ in range(4))
    vw, vl = v_w.clone().requires_grad_(True), v_l.clone().requires_grad_(True)
    loss, _ = diffusion_dpo_loss(vw, vl, v_w, v_l, t_w, t_l, beta=8.0)
    loss.backward()
    assert math.isclose(loss.item(), math.log(2.0), rel_tol=1e-6)
    torch.testing.assert_close(vw.grad, 8.0 / 4 * 2 * (v_w - t_w) / 5 / 3)
    torch.testing.assert_close(vl.grad, -8.0 / 4 * 2 * (v_l - t_l) / 5 / 3)
    lp = torch.randn(2, 3, generator=g)
    lw, ll = lp[0].clone().requires_grad_(True), lp[1].clone().requires_grad_(True)
    loss, _ = d3po_loss(lw, lp[0], ll, lp[1], beta=0.4, ratio_clip=0.1)
    loss.backward()
    torch.testing.assert_close(lw.grad, torch.full((3,), -0.4 / 2 / 3))
    torch.testing.assert_close(ll.grad, torch.full((3,), 0.4 / 2 / 3))


def test_loss_arguments_are_checked():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="algorithm.d3po.ratio_clip"):
        d3po_loss(x, x, x, x, beta=0.1, ratio_clip=1.5)
    with pytest.raises(ValueError, match="shape"):
        d3po_loss(x, x, x, torch.zeros(3), beta=0.1, ratio_clip=0.1)
    with pytest.raises(FloatingPointError):
        d3po_loss(torch.tensor([0.0, math.nan]), x, x, x, beta=0.1, ratio_clip=0.1)
    with pytest.raises(ValueError, match="algorithm.diffusion_dpo.beta"):
        diffusion_dpo_loss(*(torch.zeros(2, 2),) * 6, beta=0.0)


# ------------------------------------------------------------------------------------------------
# configs
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["d3po", "diffusion_dpo"])
@pytest.mark.parametrize("overrides, key", [
    ({"algorithm.kl_beta": 0.1}, "algorithm.kl_beta"),
    ({"algorithm.{name}.pair_source": "judge"}, "rewards"),
    ({"train.steps_per_iter": 11, "data.prompts_per_iter": 1}, "train.steps_per_iter"),  # 1 pair x 10 steps / times
])
def test_config_errors_name_the_key(name, overrides, key, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(f"configs/{name}/quickstart.yaml", {k.format(name=name): v for k, v in overrides.items()})


def test_judge_pair_source_accepts_the_pref_grpo_reward(monkeypatch):
    monkeypatch.chdir(REPO)
    judge = {"_component_": "pairwise_winrate", "weight": 1.0,
             "judge": {"_component_": "flowalign.rewards.digits:DigitPairwiseJudge", "path": "assets/quickstart/digit-classifier"}}
    cfg = load_config("configs/d3po/quickstart.yaml", {"algorithm.d3po.pair_source": "judge", "rewards": [judge]})
    assert cfg.algorithm.d3po.pair_source == "judge"


# ------------------------------------------------------------------------------------------------
# two iterations of each quickstart
# ------------------------------------------------------------------------------------------------
def _train(name: str, tmp_path, extra: dict | None = None):
    import flowalign
    from flowalign.training.metrics import read_metrics

    overrides = {"train.iterations": 2, "data.prompts_per_iter": 2, "output_dir": str(tmp_path / name),
                 "eval.samples_per_prompt": 1, "eval.every": 0, "logging.progress": False, "logging.tensorboard": False,
                 "train.checkpoint_every": 0, **(extra or {})}
    summary = flowalign.train(os.path.join(REPO, "configs", name, "quickstart.yaml"), overrides)
    return summary, [r for r in read_metrics(os.path.join(summary["output_dir"], "metrics.jsonl")) if "train/loss" in r]


def test_d3po_quickstart_runs_two_iterations_on_policy(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    summary, records = _train("d3po", tmp_path)
    assert len(records) == 2 and summary["after"]["eval/reward"] >= 0
    for r in records:
        assert r["train/ratio_first_step_dev"] < 1e-5  # the update recomputes the rollout's log-probs exactly
        assert r["train/pairs"] == 2 and r["train/units"] == 2 * 10  # 2 prompts, every one of the 10 steps
        assert r["rollout/trained_edges"] == 2 * 2 * 10
        assert all(math.isfinite(r[k]) for k in ("train/loss", "train/grad_norm", "train/reward_mean"))


def test_diffusion_dpo_quickstart_runs_two_iterations(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    # one optimizer step per iteration: iteration 0 is computed wholly at the reference
    summary, records = _train("diffusion_dpo", tmp_path, {"train.steps_per_iter": 1})
    assert len(records) == 2 and summary["after"]["eval/reward"] >= 0
    for r in records:
        assert r["train/pairs"] == 2 and r["train/units"] == 2 * 10  # each pair at the 10 grid times
        assert all(math.isfinite(r[k]) for k in ("train/loss", "train/grad_norm", "train/model_mse", "train/ref_mse"))
    # the frozen reference is the initial policy: iteration 0's inner terms are 0 (loss log 2), then they move
    assert records[0]["train/model_mse"] == pytest.approx(records[0]["train/ref_mse"], rel=1e-6)
    assert records[0]["train/loss"] == pytest.approx(math.log(2), rel=1e-6)
    assert records[1]["train/model_mse"] != pytest.approx(records[1]["train/ref_mse"], rel=1e-6)


def test_ls_algorithms_lists_both(capsys):
    from flowalign.cli import main

    assert main(["ls", "algorithms"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert "arXiv:2311.13231" in rows["d3po"] and "configs/d3po/quickstart.yaml" in rows["d3po"]
    assert "arXiv:2311.12908" in rows["diffusion_dpo"] and " awm " in rows["diffusion_dpo"]


# ------------------------------------------------------------------------------------------------
# one and two processes (as tests/test_world_size.py does for the other image algorithms)
# ------------------------------------------------------------------------------------------------
#: algorithm -> (config, overrides): one iteration, one optimizer step over all of a rank's units (each rank holds one
#: prompt's whole group, so both ranks train equally many units and DDP's gradient mean is the one-process mean)
WORLD_CASES = {"d3po": ("configs/d3po/quickstart.yaml", {}),
               "diffusion_dpo": ("configs/diffusion_dpo/quickstart.yaml", {"algorithm.diffusion_dpo.train_timesteps": 6})}
WORLD_TINY = {"data.prompts_per_iter": 2, "sampling.num_steps": 6, "eval.num_steps": 6, "train.steps_per_iter": 1,
              "train.micro_batch_size": 4096, "num_threads": 1, "logging.progress": False}


def _world_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    from flowalign.api import recipe_class
    from tests.conftest import join_processes

    join_processes(rank, world, port)
    for name, (path, own) in WORLD_CASES.items():
        cfg = load_config(os.path.join(REPO, path), {**WORLD_TINY, **own, "output_dir": os.path.join(out_dir, name)},
                          world_size=world)
        recipe = recipe_class(cfg)(cfg)
        recipe.setup(for_training=False)
        seen: dict = {}
        targets_fn = recipe.algorithm.targets

        def spy(tree, scored, ctx, iteration, seen=seen, targets_fn=targets_fn):
            out = targets_fn(tree, scored, ctx, iteration)
            seen.update(leaves=tree.leaf_latents.detach().cpu().clone(), pairs=tree.leaf_latents[out.pairs].detach().cpu().clone())
            return out

        recipe.algorithm.targets = spy
        weights = lambda: {n: p.detach().cpu().clone() for n, p in recipe.module.named_parameters() if p.requires_grad}  # noqa: E731
        seen["before"] = weights()
        recipe.train_iteration(0)
        seen["weights"] = weights()
        torch.save(seen, os.path.join(out_dir, f"{name}.world{world}.rank{rank}.pt"))
        recipe.cleanup()


@pytest.mark.slow  # two spawned interpreters of each size
def test_one_and_two_processes_pair_and_step_alike(tmp_path):
    import torch.multiprocessing as mp

    from tests.conftest import free_port

    out = str(tmp_path)
    mp.spawn(_world_worker, args=(1, free_port(), out), nprocs=1, join=True)
    mp.spawn(_world_worker, args=(2, free_port(), out), nprocs=2, join=True)
    for name in WORLD_CASES:
        one = torch.load(os.path.join(out, f"{name}.world1.rank0.pt"))
        two = [torch.load(os.path.join(out, f"{name}.world2.rank{r}.pt")) for r in (0, 1)]
        # the same samples, and the same pairs (whole groups per rank): [K, 2, *latent] preferred / dispreferred finals
        torch.testing.assert_close(torch.cat([t["leaves"] for t in two]), one["leaves"], rtol=0, atol=1e-4)
        torch.testing.assert_close(torch.cat([t["pairs"] for t in two]), one["pairs"], rtol=0, atol=1e-4)
        assert len(one["pairs"]) == 2
        for key in one["weights"]:
            assert torch.equal(two[0]["weights"][key], two[1]["weights"][key]), key
        step_one = torch.cat([(one["weights"][k] - one["before"][k]).flatten() for k in one["weights"]])
        step_two = torch.cat([(two[0]["weights"][k] - one["before"][k]).flatten() for k in one["weights"]])
        assert float(step_one.norm()) > 0, f"{name}: the iteration changed no weight"
        assert float((step_two - step_one).norm() / step_one.norm()) < 1e-3, name
