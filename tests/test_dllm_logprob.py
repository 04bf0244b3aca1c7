"""flowalign.dllm.logprob: every estimator's expectation against brute force on an analytic model.

The model is the pairwise logits table of test_dllm_sampling (``TableLM``) with a small vocabulary
and a 3-token completion, so every mask subset, every unmasking order and every sequence can be
enumerated. Independent quantities computed here, with loops over subsets, not with the library:

* ``f(t) = E_{M ~ Bern(t)^n} [(1/t) sum_{k in M} log p(x_k | x_M)]`` (the ELBO integrand);
* the exact ELBO ``sum_{M != {}} B(|M|, n - |M| + 1) sum_{k in M} log p(x_k | x_M)`` (the t-integral
  of ``t^(m-1) (1-t)^(n-m)`` is the Beta function);
* the any-order likelihood ``p(x) = (1/n!) sum_orders prod_i p(x_o(i) | x_o(<i))``, a normalized
  distribution whose ``E_order log`` equals the ELBO, hence ``ELBO <= log p(x)`` (Jensen).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from flowalign.dllm.logprob import (
    MaskSet,
    average_mask_sets,
    coupled_logprob,
    draw_coupled_masks,
    draw_double_mc_masks,
    draw_one_step_masks,
    draw_prompt_masks,
    draw_semi_deterministic_masks,
    elbo_double_mc,
    elbo_semi_deterministic,
    gauss_legendre_01,
    masked_logprob,
    one_step_logprob,
    trajectory_logprob,
)
from flowalign.dllm.sampling import SamplingSpec, generate
from tests.test_dllm_sampling import TableLM

P, N_TOK, VOCAB = 3, 3, 4  # prompt length, completion length, vocab (3 real tokens + [MASK] = 3)
PROMPT = [0, 2, 1]
COMPLETION = [1, 0, 2]


@pytest.fixture(scope="module")
def model() -> TableLM:
    return TableLM(length=P + N_TOK, vocab=VOCAB, seed=0, interaction=1.2)


def _seq() -> torch.Tensor:
    return torch.tensor([PROMPT + COMPLETION])


def _subset_term(model: TableLM, masked: tuple[int, ...], prompt_masked: tuple[int, ...] = ()) -> float:
    """sum_{k in masked} log p(x_k | sequence with `masked` completion and `prompt_masked` prompt
    positions replaced by [MASK]), by the scalar recomputation of TableLM."""
    ids = list(PROMPT) + list(COMPLETION)
    for k in masked:
        ids[P + k] = model.mask_id
    for j in prompt_masked:
        ids[j] = model.mask_id
    return sum(float(model.log_probs_at(ids, P + k)[COMPLETION[k]]) for k in masked)


def _subsets(n: int):
    for m in range(n + 1):
        yield from itertools.combinations(range(n), m)


def _f(model: TableLM, t: float) -> float:
    """The ELBO integrand at mask rate t, by enumeration of the 2^n Bernoulli masks."""
    total = 0.0
    for M in _subsets(N_TOK):
        if M:
            prob = t ** len(M) * (1 - t) ** (N_TOK - len(M))
            total += prob * _subset_term(model, M) / t
    return total


def _exact_elbo(model: TableLM) -> float:
    return sum(
        math.gamma(len(M)) * math.gamma(N_TOK - len(M) + 1) / math.gamma(N_TOK + 1) * _subset_term(model, M)
        for M in _subsets(N_TOK)
        if M
    )


def _order_log_probs(model: TableLM, completion: list[int]) -> list[float]:
    """log prod_i p(x_o(i) | x_o(<i)) for every unmasking order o of the completion."""
    out = []
    for order in itertools.permutations(range(N_TOK)):
        ids = list(PROMPT) + [model.mask_id] * N_TOK
        total = 0.0
        for k in order:
            total += float(model.log_probs_at(ids, P + k)[completion[k]])
            ids[P + k] = completion[k]
        out.append(total)
    return out


def _assert_mc_mean(samples: torch.Tensor, exact: float, z: float = 5.0) -> None:
    samples = samples.double()
    se = samples.std().item() / math.sqrt(samples.numel())
    assert abs(samples.mean().item() - exact) < z * se + 1e-9, (
        f"MC mean {samples.mean().item():.5f} vs exact {exact:.5f} (se {se:.5f})"
    )


# --------------------------------------------------------------------------------------------
# brute-force references are self-consistent
# --------------------------------------------------------------------------------------------
def test_elbo_is_the_order_average_and_bounds_the_exact_log_likelihood(model):
    # the any-order likelihood is a normalized distribution over the 3^3 completions
    total = sum(
        sum(math.exp(lp) for lp in _order_log_probs(model, list(c))) / math.factorial(N_TOK)
        for c in itertools.product(range(VOCAB - 1), repeat=N_TOK)
    )
    assert total == pytest.approx(1.0, abs=1e-6)
    lps = _order_log_probs(model, COMPLETION)
    log_lik = math.log(sum(math.exp(lp) for lp in lps) / len(lps))
    elbo = _exact_elbo(model)
    assert elbo == pytest.approx(sum(lps) / len(lps), abs=1e-9)  # ELBO = E_order log p_order
    assert elbo <= log_lik + 1e-12
    assert elbo < log_lik - 1e-3  # strictly: the orders disagree on this model
    # f integrates to the ELBO (degree n-1 polynomial: 2 Gauss-Legendre nodes are exact)
    nodes, weights = gauss_legendre_01(2)
    assert sum(float(w) * _f(model, float(t)) for t, w in zip(nodes, weights)) == pytest.approx(elbo, abs=1e-9)


# --------------------------------------------------------------------------------------------
# the core evaluation (*) and the masks
# --------------------------------------------------------------------------------------------
def test_masked_logprob_matches_a_hand_loop(model):
    comp = torch.tensor([[[True, False, True], [False, True, False]]])
    prompt = torch.tensor([[[False, True, False], [True, False, False]]])
    masks = MaskSet(completion=comp, t=torch.tensor([[0.5, 0.25]]), weight=torch.tensor([[0.3, 0.7]]), prompt=prompt)
    out = masked_logprob(model, _seq(), None, P, model.mask_id, masks)
    assert out.shape == (1, N_TOK)
    ids0 = [PROMPT[0], model.mask_id, PROMPT[2], model.mask_id, COMPLETION[1], model.mask_id]
    ids1 = [model.mask_id, PROMPT[1], PROMPT[2], COMPLETION[0], model.mask_id, COMPLETION[2]]
    expected = [
        0.3 / 0.5 * float(model.log_probs_at(ids0, P + 0)[COMPLETION[0]]),
        0.7 / 0.25 * float(model.log_probs_at(ids1, P + 1)[COMPLETION[1]]),
        0.3 / 0.5 * float(model.log_probs_at(ids0, P + 2)[COMPLETION[2]]),
    ]
    assert out[0].tolist() == pytest.approx(expected, abs=1e-5)
    # chunked evaluation gives the same numbers
    assert torch.allclose(masked_logprob(model, _seq(), None, P, model.mask_id, masks, batch_size=1), out)


def test_coupled_masks_cover_every_token_exactly_once():
    g = torch.Generator().manual_seed(0)
    masks = draw_coupled_masks(64, 10, g)
    full, m, mc = masks.completion.unbind(dim=1)
    assert full.all()
    assert (m ^ mc).all() and not (m & mc).any()  # M | M^c = all, M & M^c = {}
    t = masks.t[:, 1]
    assert ((t >= 0.2) & (t <= 0.8)).all() and torch.allclose(masks.t[:, 2], 1 - t)
    assert torch.allclose(masks.t[:, 0], torch.ones(64)) and torch.allclose(masks.weight, torch.full((64, 3), 0.5))
    pair = draw_coupled_masks(8, 5, g, include_full_mask=False).completion
    assert pair.shape == (8, 2, 5) and (pair.sum(dim=1) == 1).all()
    with pytest.raises(ValueError, match="t_range"):
        draw_coupled_masks(2, 3, g, t_range=(0.0, 0.5))


def test_mask_drawers_have_the_stated_rates_and_shapes():
    g = torch.Generator().manual_seed(1)
    attn = torch.ones(4000, 6, dtype=torch.long)
    attn[:, :2] = 0  # left padding is never masked
    pm = draw_prompt_masks(attn, 0.15, g)
    assert pm.shape == (4000, 1, 6) and not pm[:, :, :2].any()
    assert pm[:, :, 2:].float().mean().item() == pytest.approx(0.15, abs=0.01)
    one = draw_one_step_masks(torch.ones(3, 8, dtype=torch.long), 5, 3, 0.3, g)
    assert one.completion.all() and one.prompt.shape == (3, 1, 5) and torch.equal(one.t, torch.ones(3, 1))
    dmc = draw_double_mc_masks(20000, 8, num_t=2, masks_per_t=3, generator=g)
    assert dmc.completion.shape == (20000, 6, 8)
    assert torch.equal(dmc.t[:, 0], dmc.t[:, 2]) and torch.equal(dmc.t[:, 3], dmc.t[:, 5])  # 3 masks per t
    assert dmc.t.mean().item() == pytest.approx(0.5, abs=0.01) and (dmc.t > 0).all()
    rate = dmc.completion.float().mean(-1)  # E[rate | t] = t
    assert (rate - dmc.t).mean().abs().item() < 0.005
    sd = draw_semi_deterministic_masks(5, 4, num_nodes=3, masks_per_node=2, generator=g)
    nodes, weights = gauss_legendre_01(3)
    assert torch.allclose(sd.t[0], nodes.float().repeat_interleave(2))
    assert torch.allclose(sd.weight.sum(-1), torch.ones(5), atol=1e-6)
    assert torch.allclose(sd.weight[0], (weights.float() / 2).repeat_interleave(2))


# --------------------------------------------------------------------------------------------
# expectations vs brute force
# --------------------------------------------------------------------------------------------
def test_semi_deterministic_expectation_is_the_exact_elbo(model):
    elbo = _exact_elbo(model)
    # exact expectation over masks: enumerate every mask at every node with its Bernoulli prob
    nodes, weights = gauss_legendre_01(2)
    comps, ts, ws = [], [], []
    for t, w in zip(nodes.tolist(), weights.tolist()):
        for M in _subsets(N_TOK):
            comps.append([k in M for k in range(N_TOK)])
            ts.append(t)
            ws.append(w * t ** len(M) * (1 - t) ** (N_TOK - len(M)))
    enum = MaskSet(completion=torch.tensor([comps]), t=torch.tensor([ts]), weight=torch.tensor([ws], dtype=torch.float32))
    exact = masked_logprob(model, _seq(), None, P, model.mask_id, enum).sum().item()
    assert exact == pytest.approx(elbo, abs=1e-4)
    # the estimator's own random masks: many-sample mean within 5 standard errors
    seqs = _seq().expand(20000, -1).contiguous()
    est = elbo_semi_deterministic(model, seqs, None, P, model.mask_id, num_nodes=2, masks_per_node=1,
                                  generator=torch.Generator().manual_seed(0)).sum(-1)
    _assert_mc_mean(est, elbo)


def test_double_mc_expectation_is_the_exact_elbo(model):
    elbo = _exact_elbo(model)
    seqs = _seq().expand(40000, -1).contiguous()
    est = elbo_double_mc(model, seqs, None, P, model.mask_id, num_t=2, masks_per_t=2,
                         generator=torch.Generator().manual_seed(0)).sum(-1)
    _assert_mc_mean(est, elbo)


def test_coupled_expectation_matches_brute_force(model):
    # E = 1/2 sum_k log p(x_k | all masked) + E_{t~U[.2,.8]} [ (f(t) + f(1-t)) / 2 ]
    full = _subset_term(model, tuple(range(N_TOK)))
    nodes, weights = gauss_legendre_01(4)  # exact for the degree-2 polynomial f on [0.2, 0.8]
    pair = sum(float(wi) * 0.5 * (_f(model, 0.2 + 0.6 * float(ti)) + _f(model, 0.8 - 0.6 * float(ti)))
               for ti, wi in zip(nodes, weights))
    expected = 0.5 * full + pair
    seqs = _seq().expand(20000, -1).contiguous()
    est = coupled_logprob(model, seqs, None, P, model.mask_id, generator=torch.Generator().manual_seed(0)).sum(-1)
    _assert_mc_mean(est, expected)
    # without the full-mask term: an antithetic ELBO estimate, exact ELBO with t ~ U(0, 1)
    est2 = coupled_logprob(model, seqs, None, P, model.mask_id, include_full_mask=False, t_range=(1e-6, 1 - 1e-6),
                           generator=torch.Generator().manual_seed(1)).sum(-1)
    _assert_mc_mean(est2, _exact_elbo(model))


def test_coupled_per_token_value_at_fixed_masks(model):
    # t = 0.25, M = {1}: token 1 from the M forward (1/t), tokens 0, 2 from M^c (1/(1-t))
    comp = torch.tensor([[[True] * 3, [False, True, False], [True, False, True]]])
    masks = MaskSet(completion=comp, t=torch.tensor([[1.0, 0.25, 0.75]]), weight=torch.full((1, 3), 0.5))
    out = coupled_logprob(model, _seq(), None, P, model.mask_id, masks=masks)[0]
    all_masked = PROMPT + [model.mask_id] * 3
    m_ids = PROMPT + [COMPLETION[0], model.mask_id, COMPLETION[2]]
    mc_ids = PROMPT + [model.mask_id, COMPLETION[1], model.mask_id]
    lp = lambda ids, k: float(model.log_probs_at(ids, P + k)[COMPLETION[k]])
    expected = [
        0.5 * (lp(all_masked, 0) + lp(mc_ids, 0) / 0.75),
        0.5 * (lp(all_masked, 1) + lp(m_ids, 1) / 0.25),
        0.5 * (lp(all_masked, 2) + lp(mc_ids, 2) / 0.75),
    ]
    assert out.tolist() == pytest.approx(expected, abs=1e-5)


def test_one_step_expectation_over_prompt_masks(model):
    p = 0.3
    expected = [0.0] * N_TOK
    for S in _subsets(P):
        prob = p ** len(S) * (1 - p) ** (P - len(S))
        ids = [model.mask_id if j in S else PROMPT[j] for j in range(P)] + [model.mask_id] * N_TOK
        for k in range(N_TOK):
            expected[k] += prob * float(model.log_probs_at(ids, P + k)[COMPLETION[k]])
    seqs = _seq().expand(20000, -1).contiguous()
    est = one_step_logprob(model, seqs, None, P, model.mask_id, p_mask=p, generator=torch.Generator().manual_seed(0))
    for k in range(N_TOK):
        _assert_mc_mean(est[:, k], expected[k])
    # p_mask = 0: deterministic, the plain all-masked-completion log-probs
    det = one_step_logprob(model, _seq(), None, P, model.mask_id, p_mask=0.0)[0]
    ids = PROMPT + [model.mask_id] * N_TOK
    assert det.tolist() == pytest.approx([float(model.log_probs_at(ids, P + k)[COMPLETION[k]]) for k in range(N_TOK)],
                                         abs=1e-5)


def test_shared_masks_or_seeds_give_ratio_one(model):
    seqs = torch.tensor([PROMPT + COMPLETION, [2, 2, 0, 0, 1, 1]])
    for fn, kw in [(one_step_logprob, {}), (coupled_logprob, {}), (elbo_double_mc, {"num_t": 3}),
                   (elbo_semi_deterministic, {"num_nodes": 3})]:
        a = fn(model, seqs, None, P, model.mask_id, generator=torch.Generator().manual_seed(5), **kw)
        b = fn(model, seqs, None, P, model.mask_id, generator=torch.Generator().manual_seed(5), **kw)
        assert torch.equal(torch.exp(a - b), torch.ones_like(a))
    masks = draw_double_mc_masks(2, N_TOK, 2, 1, torch.Generator().manual_seed(9))
    a = elbo_double_mc(model, seqs, None, P, model.mask_id, masks=masks)
    b = elbo_double_mc(model, seqs, None, P, model.mask_id, masks=masks)
    assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------
# exact trajectory log-probs
# --------------------------------------------------------------------------------------------
def test_trajectory_logprob_is_the_product_of_the_sampler_step_probabilities(model):
    prompts = torch.tensor([PROMPT, [1, 1, 0]])
    spec = SamplingSpec(gen_length=N_TOK, steps=2, temperature=1.0)  # 2 then 1 tokens
    traj = generate(model, prompts, None, spec, mask_id=model.mask_id, generator=torch.Generator().manual_seed(2))
    per_step = trajectory_logprob(model, traj, model.mask_id)
    assert torch.allclose(per_step, traj.step_log_probs, atol=1e-5)
    for b in range(2):
        ids = prompts[b].tolist() + [model.mask_id] * N_TOK
        comp = traj.completion_ids[b].tolist()
        for s in range(2):
            committed = [k for k in range(N_TOK) if int(traj.commit_step[b, k]) == s]
            step_lp = sum(float(model.log_probs_at(ids, P + k)[comp[k]]) for k in committed)
            assert float(per_step[b, s]) == pytest.approx(step_lp, abs=1e-5)
            for k in committed:
                ids[P + k] = comp[k]
    # a different temperature changes the scores (they are not the recorded ones)
    assert not torch.allclose(trajectory_logprob(model, traj, model.mask_id, temperature=0.5), per_step)
    with pytest.raises(ValueError, match="steps"):
        trajectory_logprob(model, traj, model.mask_id, steps=[2])


def test_estimators_are_differentiable_on_a_tiny_bert(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=16, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=16)
    BertForMaskedLM(cfg).save_pretrained(tmp_path)
    bert = BertForMaskedLM.from_pretrained(tmp_path).eval()

    def logits_fn(ids, attention_mask=None):
        return bert(input_ids=ids, attention_mask=attention_mask).logits

    seqs = torch.tensor([[0, 3, 4, 5, 6, 7, 2], [1, 1, 4, 8, 9, 2, 2]])
    attn = torch.tensor([[0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    g = torch.Generator().manual_seed(0)
    total = (one_step_logprob(logits_fn, seqs, attn, 3, 15, generator=g).sum()
             + coupled_logprob(logits_fn, seqs, attn, 3, 15, generator=g).sum()
             + elbo_semi_deterministic(logits_fn, seqs, attn, 3, 15, num_nodes=2, generator=g, batch_size=3).sum())
    total.backward()
    grads = [p.grad for p in bert.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(gr).all() for gr in grads)
    with pytest.raises(ValueError, match="attention_mask"):
        one_step_logprob(logits_fn, seqs, attn[:, :3], 3, 15)
    with pytest.raises(ValueError, match="prompt_length"):
        one_step_logprob(logits_fn, seqs, attn, 9, 15)


def test_suppressed_tokens_renormalize_and_suppressed_targets_raise(model):
    with pytest.raises(ValueError, match="excluded token"):
        one_step_logprob(model, _seq(), None, P, model.mask_id, suppress_tokens=(COMPLETION[0],))
    seq = torch.tensor([PROMPT + [1, 1, 2]])  # token 0 absent from the completion: suppress it
    out = one_step_logprob(model, seq, None, P, model.mask_id, p_mask=0.0, suppress_tokens=(0,))[0]
    ids = PROMPT + [model.mask_id] * N_TOK
    for k, x in enumerate([1, 1, 2]):
        lp = model.log_probs_at(ids, P + k)
        assert float(out[k]) == pytest.approx(float(lp[x] - torch.logsumexp(lp[1:3], 0)), abs=1e-5)


def test_average_mask_sets_is_the_mean_of_the_estimates(model):
    seqs = torch.tensor([PROMPT + COMPLETION, [2, 2, 0, 0, 1, 1]])
    g = torch.Generator().manual_seed(3)
    sets = [draw_coupled_masks(2, N_TOK, g, include_full_mask=False) for _ in range(3)]
    each = [coupled_logprob(model, seqs, None, P, model.mask_id, masks=m) for m in sets]
    avg = coupled_logprob(model, seqs, None, P, model.mask_id, masks=average_mask_sets(sets))
    assert torch.allclose(avg, sum(each) / 3, atol=1e-6)
    with pytest.raises(ValueError, match="prompt"):
        average_mask_sets([sets[0], draw_one_step_masks(torch.ones(2, 6, dtype=torch.long), P, N_TOK)])
