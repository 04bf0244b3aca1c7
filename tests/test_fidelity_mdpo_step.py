"""MDPO's per-step objective against the reference (issue 13, item 12 follow-up).

autonomousvision/mdpo @ e6ae439, ``src/open_r1/mdpo/mdpo_trainer.py`` ``compute_loss`` L1487-1545 and
``split_into_micro_batches`` L917-949: at a trained step the model sees the state before the step, and
every position masked there is trained towards the decoder's draw ``x0`` with a per-token clipped ratio,
weighted by the draw's sampling confidence and ``lambda = Lg / (#masked + 1e-4)``, the step's
micro-batch (one rollout) divided by ``#masked + 1e-4``. The reference forms below are written from
that code with ``torch.distributions`` on what the decoder itself saw (a spy on the logits function),
not with flowalign's estimator.
"""

from __future__ import annotations

import pytest
import torch

import flowalign
from flowalign.dllm.algorithms import (
    MDPOMaskedTokenEstimator,
    RolloutBatch,
    mdpo_masked_token_weights,
    policy_loss,
    trained_token_mask,
)
from flowalign.dllm.sampling import SamplingSpec, Trajectory, generate
from tests.conftest import REPO
from tests.test_dllm_recipe import digit_credit, records, tiny_overrides

MASK, EOS, V, P, LG = 9, 8, 10, 2, 4


class _TinyModel(torch.nn.Module):
    """Logits from a token table and a position table (so masked positions differ)."""

    def __init__(self, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = torch.nn.Parameter(torch.randn(V, V, generator=g))
        self.pos = torch.nn.Parameter(0.7 * torch.randn(P + LG, V, generator=g))

    def forward(self, ids, attention_mask=None):
        return self.table[ids] + self.pos[None, : ids.shape[1]]


def _reference_loss(model, inputs, draws, confs, adv, T, eps_clip, old=None):
    """The reference's loss summed over the (row, step) micro-batches it trains (every step here).

    ``inputs[s]``: ``[B, P + Lg]`` what the decoder fed the model at step s; ``draws[s]``: ``[B, Lg]``
    the intermediate answer where(mask, x0, x); ``confs[s]``: ``[B, Lg]`` the sampling confidence.
    Returns the loss and the per-token log-probs (the "old" of a later call)."""
    total, logps = 0.0, []
    for s, (x_in, target, conf) in enumerate(zip(inputs, draws, confs)):
        logits = model(x_in)[:, P:].clone()
        logits[..., MASK] = -float("inf")  # flowalign's policy never emits [MASK] (sampling and log-probs)
        logp = torch.distributions.Categorical(logits=logits / T).log_prob(target)  # _get_per_token_logps
        logps.append(logp.detach())
        for b in range(x_in.shape[0]):  # per_device_train_batch_size = 1: one micro-batch per (rollout, step)
            mask = (x_in[b, P:] == MASK).float()  # completion_mask = input_ids == mask_token_id (L1510)
            lam = LG / (mask.sum() + 1e-4)  # lambda_t (L1512)
            o = logp[b].detach() if old is None else old[s][b]  # num_iterations == 1: old = logp.detach()
            coef_1 = torch.exp(logp[b] - o)
            coef_2 = torch.clamp(coef_1, 1 - eps_clip, 1 + eps_clip)
            per_token = -torch.min(coef_1 * adv[b, s], coef_2 * adv[b, s]) * lam
            total = total + (per_token * mask * conf[b]).sum() / (mask.sum() + 1e-4)  # L1532
    return total, logps


def _decode(model, T):
    seen = []

    def spy(ids, am):
        seen.append(ids.clone())
        return model(ids, am)
    prompt = torch.tensor([[1, 2], [3, 4]])
    spec = SamplingSpec(gen_length=LG, steps=3, temperature=T)
    with torch.no_grad():
        traj = generate(spy, prompt, None, spec, mask_id=MASK, eos_id=EOS, record_predictions=True,
                        generator=torch.Generator().manual_seed(3))
    return traj, seen


def test_mdpo_masked_token_objective_matches_the_reference_loss_and_gradient():
    T, eps_clip = 0.7, 0.2
    model = _TinyModel(0)
    traj, inputs = _decode(model, T)
    S, B = traj.num_steps, 2
    draws = [traj.predictions[:, s] for s in range(S)]
    with torch.no_grad():  # the decoder's confidence: softmax(logits / T)[x0] of its own forward (L75-79)
        confs = []
        for x_in, x0 in zip(inputs, draws):
            logits = model(x_in)[:, P:].clone()
            logits[..., MASK] = -float("inf")
            confs.append(torch.distributions.Categorical(logits=logits / T).probs.gather(-1, x0[..., None])[..., 0])
    adv = torch.tensor([[0.9, -0.4, 1.3], [-1.1, 0.6, -0.2]])

    est = MDPOMaskedTokenEstimator("trajectory", mask_id=MASK, temperature=T)
    assert est.unit == "step_token" and est.deterministic
    batch = RolloutBatch(traj.sequences, traj.attention_mask, P, trained_token_mask(traj.sequences[:, P:], EOS), traj)
    with torch.no_grad():
        old = est(model, batch, None)
    assert old.shape == (B, S * LG)
    weights = mdpo_masked_token_weights(old, traj)
    unit_adv = adv.repeat_interleave(LG, dim=1)

    def ours():
        new = est(model, batch, None)
        loss, metrics, _ = policy_loss(new, old, unit_adv, weights, clip_range=eps_clip)
        return loss * weights.sum(), metrics  # flowalign divides by the batch's total weight

    # on-policy (the reference's num_iterations = 1): ratio exactly 1, same loss and gradient
    loss, metrics = ours()
    assert float(metrics["ratio_max_dev"]) == 0.0
    g_ours = torch.autograd.grad(loss, [model.table, model.pos])
    ref_loss, ref_logps = _reference_loss(model, inputs, draws, confs, adv, T, eps_clip)
    g_ref = torch.autograd.grad(ref_loss, [model.table, model.pos])
    assert torch.allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_ours, g_ref):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    assert float(g_ref[1].abs().sum()) > 0

    # off-policy (a later inner step): one clipped ratio per token, as coef_1 / coef_2 (L1517-1521)
    with torch.no_grad():
        model.table.add_(0.25 * torch.randn(V, V, generator=torch.Generator().manual_seed(7)))
    loss, _ = ours()
    ref_loss, new_logps = _reference_loss(model, inputs, draws, confs, adv, T, eps_clip, old=ref_logps)
    assert torch.allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)
    masked = torch.stack([x[:, P:] == MASK for x in inputs], dim=1)  # [B, S, Lg]
    ratio = torch.exp(torch.stack(new_logps, 1) - torch.stack(ref_logps, 1))[masked]
    assert bool(((ratio < 1 - eps_clip) | (ratio > 1 + eps_clip)).any())  # clipping is exercised
    assert bool(((ratio > 1 - eps_clip) & (ratio < 1 + eps_clip)).any())


def test_mdpo_masked_token_weights_hand_example():
    # Lg = 3, S = 2; position 0 committed at step 0, positions 1, 2 at step 1; every confidence 0.5.
    # step 0: 3 masked, w = 0.5 * (3 / 3) / 3 = 1/6; step 1: 2 masked (positions 1, 2), w = 0.5 * (3 / 2) / 2 = 0.375
    traj = Trajectory(sequences=torch.tensor([[1, 5, 6, 7]]), attention_mask=torch.ones(1, 4, dtype=torch.long),
                      prompt_length=1, commit_step=torch.tensor([[0, 1, 1]]), step_log_probs=torch.zeros(1, 2),
                      num_steps=2)
    old = torch.full((1, 6), 0.5).log()
    w = mdpo_masked_token_weights(old, traj)
    want = torch.tensor([[1 / 6, 1 / 6, 1 / 6, 0.0, 0.375, 0.375]])
    assert torch.allclose(w, want, atol=1e-4)
    # the reference's 1e-4 terms: 0.5 * 3 / (3 + 1e-4)^2
    assert abs(float(w[0, 0]) - 0.5 * 3 / (3 + 1e-4) ** 2) < 1e-7


def test_mdpo_masked_token_objective_runs_through_the_recipe(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    from flowalign.algorithms.mdpo import MDPO

    seen = []
    real = MDPO.loss_weights

    def spy(self, weights, advantages):
        out = real(self, weights, advantages)
        seen.append((weights.clone(), out.clone(), advantages.clone()))
        return out
    monkeypatch.setattr(MDPO, "loss_weights", spy)
    torch.manual_seed(0)
    summary = flowalign.train("configs/dllm/mdpo_addition.yaml",
                              tiny_overrides(tmp_path, **{"algorithm.mdpo.train_steps": 2}), rewards=digit_credit)
    recs = [r for r in records(summary["output_dir"]) if "train/ratio_first_step_dev" in r]
    assert recs and all(r["train/ratio_first_step_dev"] < 1e-5 for r in recs)
    assert seen
    S = Lg = 5  # the toy decode: 5 tokens in 5 steps
    for before, after, adv in seen:
        n = before.shape[0]
        assert before.shape == (n, S * Lg) and adv.shape == (n, S * Lg)
        b3, a3 = before.reshape(n, S, Lg), after.reshape(n, S, Lg)
        # step s (one token per step) has Lg - s masked positions, all weighted
        assert ((b3 > 0).sum(-1) == torch.arange(Lg, 0, -1)).all()
        trained_steps = (a3 > 0).any(-1)
        assert bool((trained_steps.sum(1) <= 2).all()) and bool(trained_steps.any())
        assert torch.equal(a3[trained_steps], b3[trained_steps])  # chosen steps keep their weights
        # a step's units share its advantage
        assert torch.equal(adv.reshape(n, S, Lg), adv.reshape(n, S, Lg)[:, :, :1].expand(n, S, Lg))


def test_mdpo_committed_objective_still_runs_and_bad_normalization_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    torch.manual_seed(0)
    summary = flowalign.train("configs/dllm/mdpo_addition.yaml",
                              tiny_overrides(tmp_path, **{"algorithm.mdpo.step_objective": "committed",
                                                          "algorithm.mdpo.train_steps": 2}), rewards=digit_credit)
    recs = [r for r in records(summary["output_dir"]) if "train/ratio_first_step_dev" in r]
    assert recs and all(r["train/ratio_first_step_dev"] < 1e-5 for r in recs)
    with pytest.raises(Exception, match="algorithm.loss_normalization"):
        flowalign.train("configs/dllm/mdpo_addition.yaml",
                        tiny_overrides(tmp_path / "bad", **{"algorithm.loss_normalization": "token"}), rewards=digit_credit)
    with pytest.raises(Exception, match="algorithm.mdpo.step_objective"):
        flowalign.train("configs/dllm/mdpo_addition.yaml",
                        tiny_overrides(tmp_path / "bad2", **{"algorithm.mdpo.step_objective": "all"}), rewards=digit_credit)
