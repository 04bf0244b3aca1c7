"""Fidelity of the dLLM submodule to its references (issue 13, items 8 and 10; docs/FIDELITY.md):
CJ-GRPO's defaults, step rule, ascending schedule and EOS factor (yjyddq/EOSER-ASS-RL @ 5affb4e);
d1's / DiffuCoder's token loss normalisation, DiffuCoder's asymmetric clipping, LLaDA's
classifier-free guidance and its stratified l-form likelihood estimator (ML-GSAI/LLaDA @ b7e6c35).
Each reference form is computed independently here (hand values, numpy, enumeration)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

import flowalign
from flowalign.config import ConfigError, load_config
from flowalign.dllm.algorithms import policy_loss, unit_weights
from flowalign.dllm.config import DLLMConfig
from flowalign.dllm.logprob import draw_l_form_masks, masked_logprob, trajectory_logprob
from flowalign.dllm.sampling import SamplingSpec, eos_confidence_factor, generate, guided_logits_fn, transfer_schedule
from tests.conftest import REPO
from tests.test_dllm_recipe import digit_credit, records, tiny_overrides


# ------------------------------------------------------------------------------------------------
# item 8: CJ-GRPO
# ------------------------------------------------------------------------------------------------
def _reference_ass_counts(L: int) -> list[int]:
    """Transcription of the reference's one-block ASS schedule (cj_grpo_trainer_eoser_ass.py
    get_block_sizes / get_num_transfer_tokens_ass): S = int(log2 L), 2^i tokens at step i < S-1,
    the last step block_size - (2^(S-1) - 1)."""
    S = int(np.log2(np.float32(L)))
    return [2**i for i in range(S - 1)] + [L - (2 ** (S - 1) - 1)]


@pytest.mark.parametrize("L", [5, 8, 100, 256])
def test_cj_grpo_defaults_steps_and_ascending_schedule_match_the_reference(L):
    cfg = DLLMConfig()
    cfg.algorithm.name, cfg.sampling.gen_length = "cj_grpo", L
    r = cfg.resolved()
    a, s = r.algorithm, r.sampling
    assert (a.inner_steps, a.kl_beta, a.clip_range, a.estimator) == (12, 0.04, 0.5, "trajectory")
    assert (s.step_schedule, s.eos_early_rejection, s.eos_restart_per_block) == ("ascending", 0.99, True)
    counts = transfer_schedule(r.sampling_spec())
    assert counts == _reference_ass_counts(L)
    if L == 256:  # the example: 8 steps, the last one 2^7 + 1 tokens
        assert len(counts) == 8 and counts[-1] == 129


def test_eos_factor_restarts_per_block_as_the_reference_eoser_generate():
    # gen 8 in 2 blocks, 4 steps (2 per block), gamma_min 0.4: eval/generate.py passes the in-block
    # step i with total_steps = 4, so t = i / 3 in each block: 0, 1/3, 0, 1/3
    block = SamplingSpec(gen_length=8, steps=4, block_length=4, eos_early_rejection=0.6, eos_restart_per_block=True)
    assert [eos_confidence_factor(s, block) for s in range(4)] == pytest.approx([0.4, 0.6, 0.4, 0.6])
    glob = SamplingSpec(gen_length=8, steps=4, block_length=4, eos_early_rejection=0.6)
    assert [eos_confidence_factor(s, glob) for s in range(4)] == pytest.approx([0.4, 0.6, 0.8, 1.0])
    # ascending (ass_sampling): gamma_min + (1 - gamma_min)(2^(i+1) - 1) / 2^S, S = 8, gamma_min 0.01
    asc = SamplingSpec(gen_length=256, steps=8, step_schedule="ascending", eos_early_rejection=0.99)
    assert [eos_confidence_factor(s, asc) for s in range(8)] == pytest.approx(
        [0.01 + 0.99 * (2 ** (i + 1) - 1) / 256 for i in range(8)])


def test_eos_restart_changes_which_token_the_decode_commits():
    """In-loop: positions 0 and 2 predict EOS (p 0.9), 1 and 3 a digit (p 0.6); one token per step.
    At block 2's first step the restarted factor (0.4) leaves EOS behind the digit (0.36 < 0.6);
    the global one (0.8) puts it first (0.72 > 0.6)."""
    V, eos, digit, mask = 4, 1, 2, 3
    P = 1

    def logits_fn(ids, attn):
        B, L = ids.shape
        p = torch.full((B, L, V), 1e-3)
        for pos in range(P, L):
            k = pos - P
            if k % 2 == 0:
                p[:, pos, eos], p[:, pos, digit] = 0.9, 0.1 - 2e-3
            else:
                p[:, pos, digit], p[:, pos, 0] = 0.6, 0.4 - 2e-3
        return p.log()

    prompt = torch.zeros(1, P, dtype=torch.long)
    commits = {}
    for restart in (True, False):
        spec = SamplingSpec(gen_length=4, steps=4, block_length=2, temperature=0.0, eos_early_rejection=0.6,
                            eos_restart_per_block=restart)
        commits[restart] = generate(logits_fn, prompt, None, spec, mask_id=mask, eos_id=eos).commit_step[0].tolist()
    assert commits[True] == [1, 0, 3, 2]
    assert commits[False] == [1, 0, 2, 3]


# ------------------------------------------------------------------------------------------------
# item 10: loss normalisation and asymmetric clipping
# ------------------------------------------------------------------------------------------------
def test_token_and_sequence_normalisation_hand_example():
    # row 0 trains 1 token with advantage 2, row 1 trains 3 tokens with advantage -1; on-policy
    # (ratio 1) the loss is -sum(w A) / sum(w):
    trained = torch.tensor([[True, False, False], [True, True, True]])
    adv = torch.tensor([[2.0] * 3, [-1.0] * 3])
    lp = torch.zeros(2, 3)
    expected = {"sequence": -(2.0 + -1.0) / 2,  # GRPO: the mean of the per-sequence means
                "token": -(2.0 * 1 + -1.0 * 3) / 4}  # d1 L121: token sum / token count
    for form, value in expected.items():
        w = unit_weights("token", trained, normalization=form)
        loss, _, _ = policy_loss(lp, lp, adv, w, clip_range=0.2)
        assert float(loss) == pytest.approx(value)
    with pytest.raises(ValueError, match="normalization"):
        unit_weights("token", trained, normalization="batch")


def test_asymmetric_clipping_matches_an_independent_numpy_form():
    rng = np.random.default_rng(0)
    lp_old = rng.normal(size=40)
    lp = lp_old + rng.normal(scale=0.4, size=40)
    adv = rng.normal(size=40)
    w = rng.uniform(0.1, 1.0, size=40)
    lo, hi = 0.2, 0.28
    r = np.exp(lp - lp_old)
    # DiffuCoder coupled_grpo.py L216-219: -min(r A, clamp(r, 1 - eps_low, 1 + eps_high) A)
    per = -np.minimum(r * adv, np.clip(r, 1 - lo, 1 + hi) * adv)
    t = lambda x: torch.tensor(x, dtype=torch.float32)[None]  # noqa: E731
    loss, m, _ = policy_loss(t(lp), t(lp_old), t(adv), t(w), clip_range=lo, clip_range_high=hi)
    assert float(loss) == pytest.approx((per * w).sum() / w.sum(), rel=1e-5)
    assert float(m["clip_frac"]) == pytest.approx(np.mean((r < 1 - lo) | (r > 1 + hi)))
    sym, _, _ = policy_loss(t(lp), t(lp_old), t(adv), t(w), clip_range=lo)
    per_sym = -np.minimum(r * adv, np.clip(r, 1 - lo, 1 + lo) * adv)
    assert float(sym) == pytest.approx((per_sym * w).sum() / w.sum(), rel=1e-5)
    assert float(loss) != pytest.approx(float(sym))


def test_per_algorithm_defaults_of_the_new_options():
    for name, norm in [("diffu_grpo", "token"), ("coupled_grpo", "token"), ("gdpo", "sequence"), ("mdpo", "sequence"),
                       ("cj_grpo", "sequence"), ("just_grpo", "window")]:  # just_grpo: JustGRPO's constant normaliser
        cfg = DLLMConfig()
        cfg.algorithm.name = name
        a = cfg.resolved().algorithm
        assert a.loss_normalization == norm, name
        assert a.clip_range_high is None and a.likelihood_cfg_scale == 0.0


# ------------------------------------------------------------------------------------------------
# item 10: classifier-free guidance
# ------------------------------------------------------------------------------------------------
def test_guided_logits_are_llada_cfg_with_the_prompt_masked():
    g = torch.Generator().manual_seed(0)
    table = torch.randn(7, 5, generator=g)  # a "model": logits of position i = table[i] + 0.3 * token sum
    mask_id = 6

    def logits_fn(ids, attn):
        return table[: ids.shape[1]].unsqueeze(0) + 0.3 * ids.sum(dim=1, keepdim=True).unsqueeze(-1).float()

    ids = torch.tensor([[1, 2, 3, mask_id, 4]])
    P, s = 2, 1.5
    un_ids = torch.tensor([[mask_id, mask_id, 3, mask_id, 4]])  # the prompt masked (generate.py L80-81)
    cond, un = logits_fn(ids, None), logits_fn(un_ids, None)
    expected = un + (s + 1) * (cond - un)  # generate.py L87
    assert torch.allclose(guided_logits_fn(logits_fn, P, mask_id, s)(ids, None), expected)
    assert guided_logits_fn(logits_fn, P, mask_id, 0.0) is logits_fn


def test_guided_decode_is_scored_on_policy_by_the_trajectory_estimator():
    torch.manual_seed(0)
    V, mask = 6, 5
    net = torch.nn.Embedding(V, V)

    def logits_fn(ids, attn):
        h = net(ids)
        return h + h.mean(dim=1, keepdim=True)

    prompt = torch.tensor([[1, 2], [3, 4]])
    spec = SamplingSpec(gen_length=4, steps=2, temperature=1.0, cfg_scale=2.0)
    traj = generate(logits_fn, prompt, None, spec, mask_id=mask, generator=torch.Generator().manual_seed(1))
    assert traj.cfg_scale == 2.0
    with torch.no_grad():
        assert torch.allclose(trajectory_logprob(logits_fn, traj, mask), traj.step_log_probs, atol=1e-5)
        unguided = trajectory_logprob(logits_fn, dataclasses.replace(traj, cfg_scale=0.0), mask)
    assert not torch.allclose(unguided, traj.step_log_probs, atol=1e-3)


# ------------------------------------------------------------------------------------------------
# item 10: LLaDA's l-form estimator
# ------------------------------------------------------------------------------------------------
def _reference_l(k: int, L: int, b: int) -> list[int]:
    """get_log_likelihood.py L13-14 transcribed with numpy."""
    x = np.round(np.linspace(float(k), k + (b - 1) * (L / b), b)).astype(int)
    return list(((x - 1) % L) + 1)


@pytest.mark.parametrize("L,b", [(5, 2), (7, 3), (8, 8), (16, 4)])
def test_l_form_mask_counts_are_the_reference_stratified_draws(L, b):
    masks = draw_l_form_masks(50, L, b, torch.Generator().manual_seed(L * b))
    counts = masks.completion.sum(-1)  # [B, b]: exactly l positions masked
    assert torch.allclose(masks.t * L, counts.float())
    assert torch.allclose(masks.weight, torch.full_like(masks.weight, 1.0 / b))
    allowed = {tuple(_reference_l(k, L, b)) for k in range(1, L + 1)}
    for row in counts.tolist():
        assert tuple(row) in allowed
    assert float((masks.weight / masks.t).max()) <= L  # bounded weight L / l (times 1/b)


def test_l_form_elbo_is_unbiased_and_bounded_by_enumeration():
    """Context-free logits: log p(x_k) fixed per position. E[(L/l) 1(k in M)] = 1 for every k, so the
    estimator's mean is sum_k log p_k exactly; check by enumerating the reference's draw (k uniform,
    each subset of size l uniform) and by the sample mean."""
    L, b = 4, 2
    logp = torch.tensor([-0.5, -1.0, -2.0, -0.25])
    V, mask_id = 5, 4
    tokens = torch.tensor([[0, 1, 2, 3]])
    probs = torch.full((L, V), 1e-12)
    for k in range(L):  # target token p_k, the next token 1 - p_k: log softmax = log p_k at the target
        probs[k, tokens[0, k]] = math.exp(float(logp[k]))
        probs[k, (tokens[0, k] + 1) % 4] = 1 - math.exp(float(logp[k]))
    logits = probs.log()

    def logits_fn(ids, attn):
        return torch.cat([torch.zeros(ids.shape[0], 1, V), logits.expand(ids.shape[0], L, V)], dim=1)

    seq = torch.cat([torch.zeros(1, 1, dtype=torch.long), tokens], dim=1)
    # exact expectation by enumeration: every position is masked w.p. l/L given l, weight L/l
    exact = 0.0
    for k in range(1, L + 1):
        for l in _reference_l(k, L, b):
            exact += (1 / L) * (1 / b) * (L / l) * (l / L) * float(logp.sum())
    assert exact == pytest.approx(float(logp.sum()))
    masks = draw_l_form_masks(4000, L, b, torch.Generator().manual_seed(0))
    est = masked_logprob(logits_fn, seq.expand(4000, -1), None, 1, mask_id, masks).sum(-1)
    assert float(est.mean()) == pytest.approx(exact, abs=0.05)
    assert float(est.min()) >= L * float(logp.sum())  # |estimate| <= L |sum log p|: no 1/t blow-up


# ------------------------------------------------------------------------------------------------
# the options through the real recipe
# ------------------------------------------------------------------------------------------------
def test_options_run_through_the_recipe_on_policy(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    torch.manual_seed(0)
    over = tiny_overrides(tmp_path, **{"algorithm.estimator": "elbo_l_form", "algorithm.num_mc": 2,
                                       "algorithm.clip_range_high": 0.28, "algorithm.loss_normalization": "sequence",
                                       "sampling.cfg_scale": 0.5, "algorithm.inner_steps": 2})
    summary = flowalign.train("configs/dllm/diffu_grpo_addition.yaml", over, rewards=digit_credit)
    updated = [r for r in records(summary["output_dir"]) if "train/ratio_first_step_dev" in r]
    assert updated and all(r["train/ratio_first_step_dev"] < 1e-5 for r in updated)
    # the guided decode: 2 rows per step forward (cond + uncond), 5 steps x 8 rollouts
    assert all(r["cost/sequence_forwards"] >= 2 * 5 * 8 for r in updated)


def test_cj_grpo_with_guidance_and_block_restart_stays_on_policy(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    torch.manual_seed(0)
    over = tiny_overrides(tmp_path, **{"sampling.cfg_scale": 1.0, "algorithm.inner_steps": 2})
    summary = flowalign.train("configs/dllm/cj_grpo_addition.yaml", over, rewards=digit_credit)
    updated = [r for r in records(summary["output_dir"]) if "train/ratio_first_step_dev" in r]
    assert updated and all(r["train/ratio_first_step_dev"] < 1e-5 for r in updated)


def test_new_option_values_name_their_key(monkeypatch):
    monkeypatch.chdir(REPO)
    for override, key in [("algorithm.loss_normalization=batch", "algorithm.loss_normalization"),
                          ("algorithm.clip_range_high=-0.1", "algorithm.clip_range_high"),
                          ("sampling.cfg_scale=-1", "sampling.cfg_scale"),
                          ("sampling.eos_early_rejection=1.0", "sampling.eos_early_rejection")]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config("configs/dllm/quickstart.yaml", [override])
    with pytest.raises(ConfigError, match=r"algorithm\.likelihood_cfg_scale"):
        load_config("configs/dllm/cj_grpo_addition.yaml", ["algorithm.likelihood_cfg_scale=1.0"])
