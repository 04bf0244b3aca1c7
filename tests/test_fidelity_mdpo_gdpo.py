"""GDPO and MDPO against their authors' code (issue 13, item 12; docs/FIDELITY.md "GDPO", "MDPO"),
each form checked against an independent computation of the reference's formula:

* GDPO (KevinRojas1499/GDPO @ 1918683): quadrature nodes/weights (closed form), exactly
  floor(t_i Lg) masked positions per node, the sequence value as the reference's cross-entropy sum
  over the whole window divided by Lg, advantages r - group mean; a tiny run through the recipe.
* MDPO (autonomousvision/mdpo @ e6ae439): the intermediate answers are the decode's own draws
  (hand-filled at temperature 0), adv-v4 step scores (loops), the unbiased per-(group, step)
  normalisation (numpy), the top-|A| trained steps; a tiny run through the recipe.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import flowalign
from flowalign.algorithms.gdpo import GDPOEstimator
from flowalign.dllm.algorithms import RolloutBatch, mdpo_step_advantages, mdpo_step_scores, mdpo_train_steps
from flowalign.dllm.config import DLLMConfig
from flowalign.dllm.logprob import draw_semi_deterministic_masks
from flowalign.dllm.sampling import SamplingSpec, generate
from tests.conftest import REPO
from tests.test_dllm_recipe import digit_credit, records, tiny_overrides

MASK, EOS, V = 9, 8, 10


def _table_model(seed: int = 0):
    torch.manual_seed(seed)
    table = torch.randn(V, V)

    def logits_fn(ids, attention_mask):  # depends on each token and on how many masks the row has
        return table[ids] + 0.3 * (ids == MASK).sum(dim=1, keepdim=True)[..., None].float()
    return logits_fn


# ------------------------------------------------------------------------------------------------
# GDPO
# ------------------------------------------------------------------------------------------------
def test_gdpo_nodes_weights_and_exact_mask_counts_match_the_reference():
    # gauss-3 of the reference: points 0, +-sqrt(3/5) on [-1, 1], weights 8/9, 5/9, mapped by x/2 + 1/2, w/2
    r = math.sqrt(3 / 5)
    want_t = sorted([0.5 - r / 2, 0.5, 0.5 + r / 2])
    want_w = {round(0.5 - r / 2, 6): 5 / 18, 0.5: 8 / 18, round(0.5 + r / 2, 6): 5 / 18}
    Lg, B = 7, 4000
    m = draw_semi_deterministic_masks(B, Lg, num_nodes=3, masks_per_node=1, generator=torch.Generator().manual_seed(0),
                                      mask_count="exact")
    assert torch.allclose(m.t[0].double().sort().values, torch.tensor(want_t, dtype=torch.float64), atol=1e-6)
    for i in range(3):
        t = float(m.t[0, i])
        assert float(m.weight[0, i]) == pytest.approx(want_w[round(t, 6)], abs=1e-6)
        counts = m.completion[:, i].sum(dim=1)
        assert bool((counts == int(t * Lg)).all())  # the reference's int(p_mask * target_len)
        # a uniform subset: every position masked with frequency k / Lg (binomial 5-sigma band)
        p = int(t * Lg) / Lg
        freq = m.completion[:, i].float().mean(dim=0)
        assert bool(((freq - p).abs() <= 5 * math.sqrt(p * (1 - p) / B) + 1e-9).all())
    bern = draw_semi_deterministic_masks(B, Lg, 3, generator=torch.Generator().manual_seed(0))
    assert not bool((bern.completion.sum(-1) == m.completion.sum(-1)).all())  # the old form differs
    with pytest.raises(ValueError, match="mask_count"):
        draw_semi_deterministic_masks(2, 3, 2, mask_count="poisson")


def _reference_gdpo_logp(logits_fn, seqs, P, masks):
    """The reference's NumericalIntegrationEstimator.get_loss summed over nodes, written out:
    -sum_i w_i * sum_{k masked} CE(logits_k, x_k) / t_i over the whole window."""
    B, L = seqs.shape
    total = torch.zeros(B)
    for i in range(masks.t.shape[1]):
        noisy = seqs.clone()
        noisy[:, P:][masks.completion[:, i]] = MASK
        logits = logits_fn(noisy, None)[:, P:].clone()
        logits[..., MASK] = -float("inf")  # flowalign's policy never emits [MASK] (restrict_logits)
        ce = F.cross_entropy(logits.reshape(-1, V), seqs[:, P:].reshape(-1), reduction="none").reshape(B, L - P)
        loss = (ce * masks.completion[:, i].float()).sum(dim=1) / masks.t[:, i]
        total += masks.weight[:, i] * loss
    return -total


def test_gdpo_sequence_value_is_the_reference_window_elbo_over_the_length():
    logits_fn = _table_model()
    seqs = torch.tensor([[1, 2, 3, 4, EOS, EOS, EOS], [2, 1, 5, 6, 7, 0, EOS]])
    P, Lg = 2, 5
    trained = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    batch = RolloutBatch(seqs, torch.ones_like(seqs), P, trained)
    est = GDPOEstimator("elbo_semi_deterministic", mask_id=MASK, num_mc=3)
    draws = est.draw(batch, torch.Generator().manual_seed(3))
    assert bool((draws.completion.sum(-1) == torch.floor(draws.t.double() * Lg).long()).all())
    got = est(logits_fn, batch, draws)
    want = _reference_gdpo_logp(logits_fn, seqs, P, draws) / Lg
    assert torch.allclose(got.squeeze(1), want, atol=1e-5)
    # the old forms: no length normalisation, only the trained tokens
    old = GDPOEstimator("elbo_semi_deterministic", mask_id=MASK, num_mc=3, elbo_tokens="trained", length_norm=False)
    got_old = old(logits_fn, batch, draws).squeeze(1)
    assert torch.allclose(got_old[1], want[1] * Lg, atol=1e-5)  # row 1 has no EOS fill
    assert not torch.allclose(got_old[0], want[0] * Lg, atol=1e-3)  # row 0's EOS fill is left out


def test_gdpo_advantages_are_mean_centred_only():
    cfg = DLLMConfig()
    cfg.algorithm.name = "gdpo"
    from flowalign.algorithms.gdpo import GDPO

    algo = GDPO(cfg.resolved())
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.5, 0.5, 1.0])
    rollouts = SimpleNamespace(rewards=rewards, group_ids=torch.tensor([0, 0, 0, 1, 1, 1]))
    adv, _ = algo.advantages(None, rollouts)
    assert torch.allclose(adv, torch.tensor([2 / 3, -1 / 3, -1 / 3, -1 / 6, -1 / 6, 1 / 3]), atol=1e-6)
    algo.opts.scale_by_std = True
    adv, _ = algo.advantages(None, rollouts)
    std0 = np.std([1.0, 0.0, 0.0])
    assert float(adv[0]) == pytest.approx((2 / 3) / (std0 + 1e-4), rel=1e-5)


def test_gdpo_reference_forms_run_through_the_recipe(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    import flowalign.dllm.logprob as lp

    seen = []
    real = lp.draw_semi_deterministic_masks

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append((kwargs.get("mask_count"), out))
        return out
    monkeypatch.setattr(lp, "draw_semi_deterministic_masks", spy)
    torch.manual_seed(0)
    summary = flowalign.train("configs/dllm/gdpo_addition.yaml",
                              tiny_overrides(tmp_path, **{"algorithm.inner_steps": 3}), rewards=digit_credit)
    updated = [r for r in records(summary["output_dir"]) if "train/ratio_first_step_dev" in r]
    assert updated and all(r["train/ratio_first_step_dev"] < 1e-5 for r in updated)
    assert seen and all(mode == "exact" for mode, _ in seen)
    for _, m in seen:  # 3 nodes, floor(t * 5) positions each
        assert m.t.shape[1] == 3 and bool((m.completion.sum(-1) == torch.floor(m.t.double() * 5).long()).all())


# ------------------------------------------------------------------------------------------------
# MDPO
# ------------------------------------------------------------------------------------------------
def test_mdpo_intermediate_answers_are_the_decodes_own_draws():
    # the reference's intermediate_results[i] = where(masked before step i, x0_i, x) at the state
    # before step i (src/mdlm_generation_utils.py L101-102); at temperature 0, x0_i is the argmax
    logits_fn = _table_model(1)
    prompt = torch.tensor([[1, 2], [3, 4]])
    spec = SamplingSpec(gen_length=4, steps=4, temperature=0.0)
    traj = generate(logits_fn, prompt, None, spec, mask_id=MASK, eos_id=EOS, record_predictions=True)
    for s in range(4):
        state = traj.state_at(s, MASK)
        logits = logits_fn(state, None)[:, 2:].clone()
        logits[..., MASK] = -float("inf")
        comp = state[:, 2:]
        want = torch.where(comp == MASK, logits.argmax(-1), comp)
        assert torch.equal(traj.predictions[:, s], want), s
    assert torch.equal(traj.predictions[:, -1], traj.sequences[:, 2:])  # the last answer is the completion


def _adv_v4_loops(r: np.ndarray) -> np.ndarray:
    N, S = r.shape
    out = np.zeros_like(r)
    for n in range(N):
        for s in range(S):
            change = r[n, s] - (r[n, s - 1] if s > 0 else 0.0)
            future = r[n, s + 1:].mean() if s < S - 1 else r[n, S - 1]
            out[n, s] = change + 1.0 + future
    return out


def test_mdpo_step_scores_and_advantages_match_the_reference_form():
    rng = np.random.default_rng(0)
    r = rng.integers(0, 3, size=(6, 5)).astype(np.float64) / 2
    scores = mdpo_step_scores(torch.tensor(r, dtype=torch.float32))
    assert np.allclose(scores.numpy(), _adv_v4_loops(r), atol=1e-6)
    groups = np.array([0, 0, 0, 1, 1, 1])
    adv = mdpo_step_advantages(torch.tensor(r, dtype=torch.float32), torch.tensor(groups), form="change_plus_future",
                               unbiased=True)
    a = _adv_v4_loops(r)
    want = np.zeros_like(a)
    for g in (0, 1):
        rows = groups == g
        mean, std = a[rows].mean(axis=0), a[rows].std(axis=0, ddof=1)  # torch.std: unbiased
        want[rows] = np.where(std > 0, (a[rows] - mean) / (std + 1e-4), 0.0)
    assert np.allclose(adv.numpy(), want, atol=1e-5)
    # the old form scores the step's own reward
    assert torch.equal(mdpo_step_scores(torch.tensor(r), "reward"), torch.tensor(r, dtype=torch.float32))


def test_mdpo_trains_the_top_abs_advantage_steps():
    adv = torch.tensor([[0.1, -2.0, 0.5, 1.0, 0.0], [0.3, 0.3, 0.0, 0.0, 0.0]])
    weights = torch.tensor([[1.0, 1.0, 1.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    got = mdpo_train_steps(adv, weights, 2)
    # row 0: step 3 has no trained token -> steps 1 (|-2|) and 2 (0.5); row 1: the tie 0.3/0.3 -> steps 0, 1
    assert got.tolist() == [[False, True, True, False, False], [True, True, False, False, False]]
    assert mdpo_train_steps(adv, weights, 9).tolist() == (weights > 0).tolist()


def test_mdpo_reference_forms_run_through_the_recipe(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    import flowalign.algorithms.mdpo as mdpo_module

    chosen = []
    real = mdpo_module.mdpo_train_steps

    def spy(advantages, weights, k):
        out = real(advantages, weights, k)
        chosen.append((k, out))
        return out
    monkeypatch.setattr(mdpo_module, "mdpo_train_steps", spy)
    called = []
    monkeypatch.setattr(mdpo_module, "predicted_completions", lambda *a: called.append(1))  # must not be used
    torch.manual_seed(0)
    summary = flowalign.train("configs/dllm/mdpo_addition.yaml",
                              tiny_overrides(tmp_path, **{"algorithm.mdpo.train_steps": 2}), rewards=digit_credit)
    recs = [r for r in records(summary["output_dir"]) if "train/step_reward_first" in r]
    assert len(recs) == 2 and not called
    updated = [r for r in recs if "train/ratio_first_step_dev" in r]
    assert updated and all(r["train/ratio_first_step_dev"] < 1e-5 for r in updated)
    assert chosen and all(k == 2 and bool((m.sum(dim=1) <= 2).all()) and bool(m.any()) for k, m in chosen)
