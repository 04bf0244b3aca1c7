"""IGPO against its reference (facebookresearch/igpo @ e85eaea, trainer_igpo.py; run_igpo.sh):
correct-only replacement with a per-group cap, hint tokens trained under a top-p entropy filter,
GSPO's sequence ratio (Zheng et al. 2025, arXiv:2507.18071), rollout temperature 1.2."""

from __future__ import annotations

import math

import pytest
import torch

import flowalign
from flowalign.config import ConfigError, load_config
from flowalign.dllm.algorithms import choose_replacements, gspo_log_probs, hint_entropy_keep, policy_loss
from flowalign.dllm.logprob import MaskSet, masked_logprob
from tests.conftest import REPO
from tests.test_dllm_recipe import digit_credit, records, tiny_overrides


# ------------------------------------------------------------------------------------------------
# correct-only replacement, at most max_replacements per group
# ------------------------------------------------------------------------------------------------
def test_choose_replacements_is_a_uniform_capped_subset_of_the_correct_ones():
    correct = torch.tensor([False, True, True, True, True, False, True, False])  # 5 correct
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(8)
    trials = 2000
    for _ in range(trials):
        idx = choose_replacements(correct, 4, g)
        assert len(idx) == 4 and len(set(idx.tolist())) == 4 and correct[idx].all()
        counts[idx] += 1
    # a uniform 4-subset of 5 contains each correct index with probability 4/5 (sd 0.009 over 2000)
    assert torch.allclose(counts[correct] / trials, torch.full((5,), 0.8), atol=0.04), counts
    assert counts[~correct].sum() == 0
    assert sorted(choose_replacements(correct, 6, g).tolist()) == [1, 2, 3, 4, 6], "fewer correct than the cap: all"
    assert choose_replacements(torch.zeros(8, dtype=torch.bool), 4, g).numel() == 0, "none correct: no replacement"


# ------------------------------------------------------------------------------------------------
# the entropy filter of hint tokens
# ------------------------------------------------------------------------------------------------
def _reference_keep(entropy: list[float], candidates: list[bool], ratio: float) -> set[int]:
    """trainer_igpo.py L1783-1815 by hand: top max(1, int(n * ratio)) candidates by entropy."""
    cand = [i for i, c in enumerate(candidates) if c]
    if not cand:
        return set()
    k = max(1, int(len(cand) * ratio))
    return set(sorted(cand, key=lambda i: -entropy[i])[:k])


def test_hint_entropy_keep_matches_the_reference_top_k_rule():
    entropy = torch.tensor([[0.5, 2.0, 1.0, 3.0, 0.1, 9.0],
                            [0.3, 0.2, 0.9, 0.8, 0.7, 0.6],
                            [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    candidates = torch.tensor([[1, 1, 1, 1, 0, 0],   # 4 hint tokens; the 9.0 is a generated token
                               [1, 1, 1, 1, 1, 1],
                               [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    for ratio in (0.2, 0.5, 0.75, 1.0):
        keep = hint_entropy_keep(entropy, candidates, ratio)
        for r in range(3):
            expected = _reference_keep(entropy[r].tolist(), candidates[r].tolist(), ratio)
            assert set(keep[r].nonzero().squeeze(1).tolist()) == expected, (ratio, r)
    # hand-worked: 4 candidates at 20 % -> max(1, 0) = 1 token, the entropy-3.0 one; 6 at 50 % -> 3
    assert hint_entropy_keep(entropy, candidates, 0.2)[0].nonzero().squeeze(1).tolist() == [3]
    assert hint_entropy_keep(entropy, candidates, 0.5)[1].nonzero().squeeze(1).tolist() == [2, 3, 4]
    assert not hint_entropy_keep(entropy, candidates, 0.0).any(), "0: hint tokens never trained"
    with pytest.raises(ValueError, match="top must lie in"):
        hint_entropy_keep(entropy, candidates, 1.5)


def test_masked_logprob_entropy_is_the_predictive_entropy_averaged_over_the_masking_forwards():
    torch.manual_seed(0)
    V, mask_id, P, Lg = 7, 6, 2, 3
    table = torch.randn(V, V)
    bias = torch.randn(P + Lg, V)

    def logits_fn(ids, am):
        # position-dependent logits that depend on the (masked) input: the entropy differs per forward
        ctx = table[ids].cumsum(dim=1)
        return ctx + bias[None]

    seqs = torch.tensor([[1, 2, 3, 4, 5], [0, 1, 2, 2, 3]])
    comp = torch.tensor([[[1, 0, 1], [1, 1, 0]], [[0, 0, 1], [0, 0, 0]]], dtype=torch.bool)  # [B, N=2, Lg]
    masks = MaskSet(completion=comp, t=torch.full((2, 2), 0.5), weight=torch.full((2, 2), 0.5))
    est, ent = masked_logprob(logits_fn, seqs, None, P, mask_id, masks, return_entropy=True)
    assert torch.allclose(est, masked_logprob(logits_fn, seqs, None, P, mask_id, masks)), "estimate unchanged"
    keep_vocab = [v for v in range(V) if v != mask_id]
    for b in range(2):
        for k in range(Lg):
            values = []
            for n in range(2):
                if comp[b, n, k]:
                    ids = seqs[b].clone()
                    ids[P:][comp[b, n]] = mask_id
                    logits = logits_fn(ids[None], None)[0, P + k, keep_vocab]
                    values.append(float(torch.distributions.Categorical(logits=logits).entropy()))
            expected = sum(values) / len(values) if values else 0.0
            assert ent[b, k].item() == pytest.approx(expected, abs=1e-5), (b, k)


# ------------------------------------------------------------------------------------------------
# GSPO's sequence ratio
# ------------------------------------------------------------------------------------------------
def test_gspo_log_probs_give_the_sequence_ratio_its_gradient_and_an_unchanged_k3():
    torch.manual_seed(1)
    old = torch.randn(3, 5)
    new = (old + 0.3 * torch.randn(3, 5)).requires_grad_(True)
    ref = old + 0.2 * torch.randn(3, 5)
    trained = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 0, 1, 0]], dtype=torch.bool)
    w = trained.float() / trained.float().sum(dim=1, keepdim=True)  # 1/|y_i| on the trained tokens
    A = torch.tensor([1.0, -0.5, 2.0])
    new_s, ref_s = gspo_log_probs(new, old, ref, w)
    # GSPO Eq. 7 directly: s_i = exp(mean over y_i of (log pi - log pi_old)), objective sum_i A_i s_i
    s = torch.stack([torch.exp((new[i] - old[i])[trained[i]].mean()) for i in range(3)])
    ratio = torch.exp(new_s - old)
    for i in range(3):
        assert torch.allclose(ratio[i][trained[i]], s[i].detach().expand(int(trained[i].sum())))
    (g_seq,) = torch.autograd.grad((A * s).sum(), new, retain_graph=True)
    (g_tok,) = torch.autograd.grad((A[:, None] * w * ratio).sum(), new, retain_graph=True)
    assert torch.allclose(g_seq, g_tok, atol=1e-6)

    def k3(lp, r):
        return torch.exp(r - lp) - (r - lp) - 1

    kl_raw, kl_shift = (k3(new, ref) * w).sum(), (k3(new_s, ref_s) * w).sum()
    assert torch.allclose(kl_raw, kl_shift)
    (g1,) = torch.autograd.grad(kl_raw, new, retain_graph=True)
    (g2,) = torch.autograd.grad(kl_shift, new)
    assert torch.allclose(g1, g2, atol=1e-6)


def test_gspo_clips_the_whole_sequence_where_the_token_ratio_would_not():
    old = torch.zeros(1, 4)
    # mean log-ratio 0.5 -> s = 1.65 > 1.2, although two tokens have ratio < 1
    new = torch.tensor([[1.5, 1.0, -0.25, -0.25]], requires_grad=True)
    w = torch.full((1, 4), 0.25)
    adv = torch.ones(1, 4)
    loss, _, _ = policy_loss(*gspo_log_probs(new, old, None, w)[:1], old, adv, w, clip_range=0.2)
    (g,) = torch.autograd.grad(loss, new)
    assert torch.count_nonzero(g) == 0, "s_i beyond 1 + eps with A > 0: the sequence is clipped, no gradient"
    loss, _, _ = policy_loss(new, old, adv, w, clip_range=0.2)
    (g,) = torch.autograd.grad(loss, new)
    assert torch.count_nonzero(g[0, 2:]) == 2, "token ratio: the tokens with ratio < 1 still get gradient"


# ------------------------------------------------------------------------------------------------
# through the recipe
# ------------------------------------------------------------------------------------------------
def _all_wrong_setup(recipe, G):
    from flowalign.algorithms.dllm import DLLMRollouts

    examples = recipe.train_examples[:2]
    Lg = recipe.cfg.sampling.gen_length
    ids, am = recipe.model.pad_prompts(recipe.model.encode([ex.prompt for ex in examples]))
    ids, am = ids.repeat_interleave(G, 0), am.repeat_interleave(G, 0)
    sequences = torch.cat([ids, torch.full((2 * G, Lg), recipe.eos_id)], dim=1)
    rewards = torch.zeros(2 * G)
    rewards[G + 1] = 1.0  # group 0 all wrong, group 1 has a hit
    rollouts = DLLMRollouts(ids, am, None, sequences, rewards, torch.zeros(2 * G, Lg, dtype=torch.bool),
                            torch.arange(2).repeat_interleave(G), [ex for ex in examples for _ in range(G)])
    return examples, rollouts


def _recipe(tmp_path, igpo: dict, **extra):
    from flowalign.recipes.dllm_rl import DLLMRecipe

    cfg = load_config({"recipe": "dllm", "algorithm": {"name": "igpo", "p_mask_prompt": 0.0, "igpo": igpo}},
                      tiny_overrides(tmp_path, **{"sampling.group_size": 8, **extra}))
    recipe = DLLMRecipe(cfg)
    recipe.setup()
    return recipe


@pytest.mark.parametrize("pattern,replaced", [([1, 0, 1, 1, 1, 1, 0, 1], 4), ([0, 1, 0, 0, 0, 0, 0, 0], 1),
                                              ([0] * 8, 0)])
def test_only_correct_hinted_rollouts_replace_originals_at_most_four(pattern, replaced, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    G = 8
    recipe = _recipe(tmp_path, {})  # the defaults: correct-only, cap 4, all G re-decoded, top 20 % entropy
    try:
        examples, rollouts = _all_wrong_setup(recipe, G)
        P = rollouts.prompt_ids.shape[1]
        decoded = {}
        score = recipe.score

        def fake_score(completions, exs):  # the hinted re-decodes get the pattern's rewards
            if len(exs) == G and exs[0] is examples[0] and completions.shape[1] == recipe.cfg.sampling.gen_length:
                decoded["completions"] = completions.clone()
                return torch.tensor(pattern, dtype=torch.float32)
            return score(completions, exs)

        monkeypatch.setattr(recipe, "score", fake_score)
        out, metrics = recipe.algorithm.augment_rollouts(recipe, 0, rollouts)
        assert metrics["igpo/replaced_rollouts"] == replaced
        assert metrics["igpo/hinted_accuracy"] == pytest.approx(sum(pattern) / G)
        correct_rows = {tuple(decoded["completions"][i].tolist()) for i in range(G) if pattern[i]}
        for row in range(replaced):  # the first rows of the group, each a correct hinted re-decode
            assert out.rewards[row] == 1.0
            assert tuple(out.sequences[row, P:].tolist()) in correct_rows
        assert torch.equal(out.sequences[replaced:], rollouts.sequences[replaced:])
        assert torch.equal(out.rewards[replaced:], rollouts.rewards[replaced:])
        assert not out.fixed[replaced:].any()
    finally:
        recipe.cleanup()


def test_hint_tokens_of_replaced_rows_are_trained_at_their_highest_entropy(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    G = 8
    import flowalign.algorithms.igpo as igpo_module

    lengths = []
    real = igpo_module.hint_lengths
    monkeypatch.setattr(igpo_module, "hint_lengths", lambda *a: lengths.append(real(*a)) or lengths[-1])
    recipe = _recipe(tmp_path, {"replacement": "all", "hinted_rollouts": 0.5, "hint_fraction": [0.9, 0.95]})
    try:
        examples, rollouts = _all_wrong_setup(recipe, G)
        P = rollouts.prompt_ids.shape[1]
        out, metrics = recipe.algorithm.augment_rollouts(recipe, 0, rollouts)
        ref = recipe.model.encode([examples[0].reference])[0]
        am = torch.cat([rollouts.prompt_mask, torch.ones_like(out.sequences[:, P:])], dim=1)
        (h,) = lengths[0].tolist()  # one all-wrong group
        hint = list(range(h))
        assert h >= 2, "a hint of several tokens, so the filter has to choose"
        for row in range(G // 2):
            seq = out.sequences[row]
            assert seq[P:P + h].tolist() == ref[:h]
            # independently: the one_step input (prompt kept, completion all masked), entropy over the
            # vocabulary without [MASK]; 20 % of n <= 4 tokens -> max(1, 0) = 1 token, the top one
            ids = seq.clone()
            ids[P:] = recipe.mask_id
            with torch.no_grad():
                logits = recipe.model(ids[None], am[row:row + 1])[0, P:]
            vocab = [v for v in range(logits.shape[-1]) if v != recipe.mask_id]
            ent = torch.distributions.Categorical(logits=logits[:, vocab]).entropy()
            top = max(hint, key=lambda j: float(ent[j]))
            trained_hint = [j for j in hint if not out.fixed[row, j]]
            assert trained_hint == [top], (row, hint, ent[hint].tolist())
            assert out.fixed[row].sum() == len(hint) - 1
        assert not out.fixed[G // 2:].any()
        assert 0 < metrics["igpo/hint_tokens_trained"] < 1
    finally:
        recipe.cleanup()


@pytest.mark.parametrize("ratio", ["sequence", "token"])
def test_the_gspo_ratio_runs_through_the_loop(ratio, tmp_path, monkeypatch):
    import flowalign.algorithms.igpo as igpo_module

    monkeypatch.chdir(REPO)
    calls = []
    real = igpo_module.gspo_log_probs
    monkeypatch.setattr(igpo_module, "gspo_log_probs", lambda *a: calls.append(1) or real(*a))
    summary = flowalign.train("configs/dllm/igpo_addition.yaml",
                              tiny_overrides(tmp_path, **{"algorithm.igpo.ratio": ratio, "algorithm.inner_steps": 2}),
                              rewards=digit_credit)
    updated = [r for r in records(summary["output_dir"]) if "train/ratio_first_step_dev" in r]
    assert updated and all(r["train/ratio_first_step_dev"] < 1e-5 for r in updated), "on-policy at the first inner step"
    assert all("igpo/replaced_rollouts" in r for r in updated)
    assert (len(calls) > 0) == (ratio == "sequence")


def test_igpo_defaults_and_config_follow_the_reference(monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = load_config("configs/dllm/igpo_addition.yaml")
    o = cfg.algorithm.igpo
    assert (o.replacement, o.max_replacements, o.hint_entropy_top, o.ratio, o.hinted_rollouts) == ("correct", 4, 0.2, "sequence", 1.0)
    assert cfg.sampling.temperature == 1.2
    default = load_config({"recipe": "dllm", "algorithm": {"name": "igpo"}}).algorithm.igpo
    assert (default.replacement, default.max_replacements, default.hint_entropy_top, default.ratio) == ("correct", 4, 0.2, "sequence")
    # run_igpo.sh lines 5, 83-85 and trainer_igpo.py L682-686 / L1906-1920: mu 4, beta 0.01, eps 0.2,
    # advantages r - group mean, the token loss summed over the batch / its token count
    a = cfg.resolved().algorithm
    assert (a.inner_steps, a.kl_beta, a.clip_range, a.std_mode, a.loss_normalization) == (4, 0.01, 0.2, "none", "token")
    with pytest.raises(ConfigError, match=r"^algorithm\.igpo\.ratio: .*per-token estimator"):
        load_config("configs/dllm/igpo_addition.yaml", ["algorithm.estimator=elbo_double_mc", "algorithm.igpo.hint_entropy_top=0"])
    with pytest.raises(ConfigError, match=r"^algorithm\.igpo\.hint_entropy_top: .*per-token estimator"):
        load_config("configs/dllm/igpo_addition.yaml", ["algorithm.estimator=elbo_double_mc", "algorithm.igpo.ratio=token"])
    with pytest.raises(ConfigError, match=r"algorithm\.igpo\.replacement"):
        load_config("configs/dllm/igpo_addition.yaml", ["algorithm.igpo.replacement=some"])
    with pytest.raises(ConfigError, match=r"algorithm\.igpo\.max_replacements"):
        load_config("configs/dllm/igpo_addition.yaml", ["algorithm.igpo.max_replacements=0"])
    assert math.isclose(load_config("configs/dllm/igpo_addition.yaml", ["algorithm.igpo.hint_entropy_top=0"]).algorithm.igpo.hint_entropy_top, 0.0)
