"""flowalign.dllm.sampling: LLaDA-style decoding with trajectories, against hand-derived orders, an
analytic logits table (exact distributions) and a tiny real BertForMaskedLM."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from flowalign.dllm.logprob import trajectory_logprob
from flowalign.dllm.sampling import (
    SamplingSpec,
    Trajectory,
    ascending_schedule,
    eos_confidence_factor,
    generate,
    transfer_schedule,
    uniform_schedule,
)


# --------------------------------------------------------------------------------------------
# an analytic "model": a logits table with pairwise interactions (shared with test_dllm_logprob)
# --------------------------------------------------------------------------------------------
class TableLM:
    """``logits[b, i, v] = bias[i, v] + sum_{j != i, j visible} inter[i, j, x_j, v]``.

    Visible = attended and not ``[MASK]``. The mask token (id ``V - 1``) gets logit -1e4 so the
    model's distributions live on the ``V - 1`` real tokens. ``calls`` records every input.
    """

    def __init__(self, length: int, vocab: int, *, seed: int = 0, interaction: float = 1.0, bias: torch.Tensor | None = None):
        g = torch.Generator().manual_seed(seed)
        self.L, self.V, self.mask_id = length, vocab, vocab - 1
        self.bias = torch.randn(length, vocab, generator=g, dtype=torch.float64) if bias is None else bias.double()
        self.inter = interaction * torch.randn(length, length, vocab, vocab, generator=g, dtype=torch.float64)
        self.calls: list[torch.Tensor] = []

    def __call__(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        self.calls.append(ids.clone())
        B, L = ids.shape
        vis = ids != self.mask_id
        if attention_mask is not None:
            vis = vis & attention_mask.bool()
        ii = torch.arange(L).view(1, L, 1)
        jj = torch.arange(L).view(1, 1, L)
        xj = ids.clamp_max(self.V - 1).view(B, 1, L)
        terms = self.inter[ii, jj, xj]  # [B, L(i), L(j), V]
        keep = vis.view(B, 1, L, 1) & (ii != jj).unsqueeze(-1)
        logits = self.bias[:L].unsqueeze(0) + (terms * keep).sum(dim=2)
        logits[..., self.mask_id] = -1e4
        return logits.float()

    def log_probs_at(self, ids: list[int], pos: int) -> torch.Tensor:
        """Independent scalar recomputation: ``log softmax`` at one position of one sequence."""
        logits = self.bias[pos].clone()
        for j, x in enumerate(ids):
            if j != pos and x != self.mask_id:
                logits = logits + self.inter[pos, j, x]
        logits[self.mask_id] = -1e4
        return torch.log_softmax(logits, dim=-1)


def position_table(probs: list[list[float]], vocab: int) -> TableLM:
    """A context-free TableLM whose per-position distributions are exactly ``probs`` (rows over
    the ``vocab - 1`` real tokens)."""
    bias = torch.full((len(probs), vocab), -1e4, dtype=torch.float64)
    bias[:, : vocab - 1] = torch.log(torch.tensor(probs, dtype=torch.float64))
    return TableLM(len(probs), vocab, interaction=0.0, bias=bias)


# --------------------------------------------------------------------------------------------
# schedules and validation
# --------------------------------------------------------------------------------------------
def test_uniform_schedule_matches_llada_rule():
    assert uniform_schedule(10, 4) == [3, 3, 2, 2]
    assert uniform_schedule(8, 4) == [2, 2, 2, 2]
    for n in range(1, 20):
        for m in range(1, n + 1):
            assert sum(uniform_schedule(n, m)) == n


def test_ascending_schedule_powers_of_two_and_general_sizes():
    assert ascending_schedule(15, 4) == [1, 2, 4, 8]  # 2^m - 1 tokens: exactly the paper's 2^s
    assert ascending_schedule(20, 4) == [1, 2, 4, 13]  # remainder at the last step
    assert ascending_schedule(5, 3) == [1, 2, 2]
    for n in range(1, 40):
        for m in range(1, n + 1):
            k = ascending_schedule(n, m)
            assert sum(k) == n and min(k) >= 1 and all(a <= b for a, b in itertools.pairwise(k))
            if n >= 2**m - 1:
                assert k[:-1] == [2**s for s in range(m - 1)]


def test_eos_factor_rises_linearly_to_one():
    spec = SamplingSpec(gen_length=8, steps=5, eos_early_rejection=0.6)
    gammas = [eos_confidence_factor(s, spec) for s in range(5)]
    assert gammas == pytest.approx([0.4, 0.55, 0.7, 0.85, 1.0])
    assert eos_confidence_factor(0, SamplingSpec(gen_length=8, steps=5)) == 1.0
    asc = SamplingSpec(gen_length=7, steps=3, step_schedule="ascending", eos_early_rejection=0.5)
    # the CJ-GRPO reference's ass_sampling: progress (2^(s+1) - 1) / 2^S, S the total steps
    assert [eos_confidence_factor(s, asc) for s in range(3)] == pytest.approx([0.5 + 0.5 / 8, 0.5 + 0.5 * 3 / 8, 0.5 + 0.5 * 7 / 8])


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"gen_length": 8, "steps": 4, "block_length": 3}, "block_length"),
        ({"gen_length": 8, "steps": 3, "block_length": 4}, "steps"),
        ({"gen_length": 8, "steps": 10}, "steps"),
        ({"gen_length": 8, "steps": 4, "order": "ar"}, "steps"),
        ({"gen_length": 8, "steps": 4, "remasking": "sometimes"}, "remasking"),
        ({"gen_length": 8, "steps": 4, "step_schedule": "descending"}, "step_schedule"),
        ({"gen_length": 8, "steps": 4, "eos_early_rejection": 1.0}, "eos_early_rejection"),
        ({"gen_length": 8, "steps": 4, "temperature": -1.0}, "temperature"),
    ],
)
def test_spec_validation_names_the_argument(kwargs, word):
    with pytest.raises(ValueError, match=word):
        SamplingSpec(**kwargs)


# --------------------------------------------------------------------------------------------
# hand-derived greedy orders
# --------------------------------------------------------------------------------------------
# max-probabilities per completion position: 0 -> 0.7, 1 -> 0.5, 2 -> 0.9, 3 -> 0.6
PROBS = [[0.7, 0.2, 0.1], [0.25, 0.5, 0.25], [0.05, 0.05, 0.9], [0.2, 0.6, 0.2]]


def _greedy(model, spec, prompt_len=0, eos_id=None):
    prompt = torch.zeros((1, prompt_len), dtype=torch.long)
    return generate(model, prompt, None, spec, mask_id=model.mask_id, eos_id=eos_id)


def test_greedy_low_confidence_commits_in_confidence_order():
    model = position_table(PROBS, vocab=4)
    traj = _greedy(model, SamplingSpec(gen_length=4, steps=4))
    # most confident first: position 2 (0.9), 0 (0.7), 3 (0.6), 1 (0.5)
    assert traj.commit_step.tolist() == [[1, 3, 0, 2]]
    assert traj.completion_ids.tolist() == [[0, 1, 2, 1]]
    expected = [math.log(0.9), math.log(0.7), math.log(0.6), math.log(0.5)]
    assert traj.step_log_probs[0].tolist() == pytest.approx(expected, abs=1e-6)
    # two tokens per step: {2, 0} then {3, 1}
    assert _greedy(model, SamplingSpec(gen_length=4, steps=2)).commit_step.tolist() == [[0, 1, 0, 1]]


def test_blocks_restrict_commits_to_the_current_block():
    model = position_table(PROBS, vocab=4)
    traj = _greedy(model, SamplingSpec(gen_length=4, steps=4, block_length=2))
    # block [0, 2): 0 (0.7) before 1 (0.5); block [2, 4): 2 (0.9) before 3 (0.6)
    assert traj.commit_step.tolist() == [[0, 1, 2, 3]]


def test_eos_early_rejection_delays_a_confident_eos():
    # position 3 predicts EOS (token 2) with the highest confidence 0.95
    probs = [[0.8, 0.1, 0.1], [0.1, 0.7, 0.2], [0.6, 0.3, 0.1], [0.025, 0.025, 0.95]]
    model = position_table(probs, vocab=4)
    plain = _greedy(model, SamplingSpec(gen_length=4, steps=4), eos_id=2)
    assert plain.commit_step.tolist() == [[1, 2, 3, 0]]  # EOS first without EOSER
    spec = SamplingSpec(gen_length=4, steps=4, eos_early_rejection=0.6)
    # gamma = 0.4, 0.6, 0.8, 1.0: EOS conf 0.38 < 0.8 | 0.57 < 0.7 | 0.76 > 0.6 -> EOS at step 2
    eoser = _greedy(model, spec, eos_id=2)
    assert eoser.commit_step.tolist() == [[0, 1, 3, 2]]
    assert eoser.completion_ids.tolist() == plain.completion_ids.tolist()  # only the order changes
    with pytest.raises(ValueError, match="eos_id"):
        _greedy(model, spec, eos_id=None)


def test_ascending_schedule_commit_counts():
    model = TableLM(length=9, vocab=5, seed=3)
    spec = SamplingSpec(gen_length=7, steps=3, step_schedule="ascending")
    traj = generate(model, torch.tensor([[0, 1]]), None, spec, mask_id=model.mask_id)
    assert torch.bincount(traj.commit_step[0], minlength=3).tolist() == [1, 2, 4]


# --------------------------------------------------------------------------------------------
# schedules, blocks, AR order, state reconstruction on a context-dependent model
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "spec",
    [
        SamplingSpec(gen_length=8, steps=4, block_length=4, temperature=1.0),
        SamplingSpec(gen_length=8, steps=8, block_length=2, temperature=0.7, remasking="random"),
        SamplingSpec(gen_length=8, steps=3, temperature=1.0, step_schedule="ascending", eos_early_rejection=0.5),
        SamplingSpec(gen_length=8, steps=6, block_length=4, temperature=0.0, step_schedule="ascending"),
    ],
)
def test_commit_counts_blocks_and_states(spec):
    P = 3
    model = TableLM(length=P + spec.gen_length, vocab=6, seed=1)
    prompts = torch.randint(0, 5, (5, P), generator=torch.Generator().manual_seed(0))
    traj = generate(model, prompts, None, spec, mask_id=model.mask_id, eos_id=4,
                    generator=torch.Generator().manual_seed(7))
    counts = transfer_schedule(spec)
    for b in range(5):
        assert torch.bincount(traj.commit_step[b], minlength=spec.steps).tolist() == counts
    # block of each position = the block of its commit step
    block_of_pos = torch.arange(spec.gen_length) // spec.block_length
    assert torch.equal(traj.commit_step // spec.steps_per_block, block_of_pos.expand(5, -1))
    # state_at(s) is exactly what the model saw at step s; state_at(S) is the final sequence
    assert len(model.calls) == spec.steps
    for s in range(spec.steps):
        assert torch.equal(traj.state_at(s, model.mask_id), model.calls[s])
    assert torch.equal(traj.state_at(spec.steps, model.mask_id), traj.sequences)
    assert (traj.completion_ids != model.mask_id).all()
    # intermediate decodes keep committed tokens and fill the rest
    for s in range(spec.steps):
        kept = traj.commit_step < s
        assert torch.equal(traj.predictions[:, s][kept], traj.completion_ids[kept])
    with pytest.raises(ValueError, match="step"):
        traj.state_at(spec.steps + 1, model.mask_id)


def test_ar_order_commits_left_to_right_from_the_prefix_distribution():
    P, Lg = 2, 2
    model = TableLM(length=P + Lg, vocab=4, seed=5, interaction=1.5)
    n = 6000
    prompts = torch.tensor([[0, 1]]).expand(n, -1).contiguous()
    spec = SamplingSpec(gen_length=Lg, steps=Lg, order="ar", temperature=1.0)
    traj = generate(model, prompts, None, spec, mask_id=model.mask_id, generator=torch.Generator().manual_seed(0))
    assert torch.equal(traj.commit_step, torch.arange(Lg).expand(n, -1))
    # joint frequencies vs p(x1 | prompt, [MASK]) * p(x2 | prompt, x1)
    m = model.mask_id
    probs, counts = [], []
    comp = traj.completion_ids
    for a in range(3):
        for c in range(3):
            p1 = model.log_probs_at([0, 1, m, m], 2)[a].exp()
            p2 = model.log_probs_at([0, 1, a, m], 3)[c].exp()
            probs.append(float(p1 * p2))
            counts.append(int(((comp[:, 0] == a) & (comp[:, 1] == c)).sum()))
    _assert_chi_square(counts, probs, n)


# --------------------------------------------------------------------------------------------
# sampling distribution, determinism, log-probs
# --------------------------------------------------------------------------------------------
def _assert_chi_square(counts: list[int], probs: list[float], n: int) -> None:
    """Pearson chi-square below the 0.999 quantile (Wilson-Hilferty approximation)."""
    df = len(probs) - 1
    stat = sum((c - n * p) ** 2 / (n * p) for c, p in zip(counts, probs))
    z = 3.09  # 0.999 normal quantile
    crit = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    assert stat < crit, f"chi-square {stat:.1f} >= {crit:.1f}: counts {counts} vs probs {probs}"


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_one_token_sampling_frequencies_match_the_model(temperature):
    model = TableLM(length=3, vocab=6, seed=2, interaction=0.5)
    n = 8000
    prompts = torch.tensor([[1, 3]]).expand(n, -1).contiguous()
    spec = SamplingSpec(gen_length=1, steps=1, temperature=temperature)
    traj = generate(model, prompts, None, spec, mask_id=model.mask_id, generator=torch.Generator().manual_seed(1))
    logits = model(torch.tensor([[1, 3, model.mask_id]]))[0, 2].double()
    probs = torch.softmax(logits[:5] / temperature, dim=-1).tolist()
    counts = torch.bincount(traj.completion_ids[:, 0], minlength=5).tolist()
    _assert_chi_square(counts, probs, n)
    # recorded log-prob = log softmax(logits / T) of the drawn token
    expected = torch.log(torch.tensor(probs, dtype=torch.float64))[traj.completion_ids[:, 0]]
    assert torch.allclose(traj.step_log_probs[:, 0].double(), expected, atol=1e-5)


def test_seeded_generator_is_deterministic():
    model = TableLM(length=9, vocab=6, seed=4)
    prompts = torch.randint(0, 5, (4, 3), generator=torch.Generator().manual_seed(0))
    spec = SamplingSpec(gen_length=6, steps=6, block_length=3, temperature=1.0, remasking="random")
    a = generate(model, prompts, None, spec, mask_id=model.mask_id, generator=torch.Generator().manual_seed(11))
    b = generate(model, prompts, None, spec, mask_id=model.mask_id, generator=torch.Generator().manual_seed(11))
    c = generate(model, prompts, None, spec, mask_id=model.mask_id, generator=torch.Generator().manual_seed(12))
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.commit_step, b.commit_step)
    assert torch.equal(a.step_log_probs, b.step_log_probs)
    assert not (torch.equal(a.sequences, c.sequences) and torch.equal(a.commit_step, c.commit_step))


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_step_log_probs_match_an_independent_recomputation(temperature):
    P, Lg = 2, 4
    model = TableLM(length=P + Lg, vocab=5, seed=6)
    prompts = torch.tensor([[0, 1], [2, 3], [1, 1]])
    spec = SamplingSpec(gen_length=Lg, steps=4, block_length=2, temperature=temperature)
    traj = generate(model, prompts, None, spec, mask_id=model.mask_id, generator=torch.Generator().manual_seed(3))
    tau = temperature if temperature > 0 else 1.0
    for b in range(3):
        for s in range(spec.steps):
            state = traj.state_at(s, model.mask_id)[b].tolist()
            total = 0.0
            for k in range(Lg):
                if int(traj.commit_step[b, k]) == s:
                    logits = model.log_probs_at(state, P + k)  # log softmax of the raw logits
                    total += float(torch.log_softmax(logits / tau, dim=-1)[traj.completion_ids[b, k]])
            assert float(traj.step_log_probs[b, s]) == pytest.approx(total, abs=1e-4)
    assert torch.allclose(trajectory_logprob(model, traj, model.mask_id), traj.step_log_probs, atol=1e-5)


def test_left_padding_is_ignored_through_the_attention_mask():
    P, Lg = 4, 3
    model = TableLM(length=P + Lg, vocab=5, seed=8)
    spec = SamplingSpec(gen_length=Lg, steps=3)
    pad = 0
    prompts = torch.tensor([[pad, pad, 1, 2], [3, 1, 0, 2]])
    attn = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    batch = generate(model, prompts, attn, spec, mask_id=model.mask_id)
    assert batch.attention_mask[:, P:].eq(1).all() and torch.equal(batch.attention_mask[:, :P], attn)
    # the padded row decodes as if its two pad positions held anything else (they are invisible)
    alt = generate(model, torch.tensor([[2, 3, 1, 2]]), attn[:1], spec, mask_id=model.mask_id)
    assert torch.equal(batch.completion_ids[:1], alt.completion_ids)
    with pytest.raises(ValueError, match="attention_mask"):
        generate(model, prompts, attn[:, :3], spec, mask_id=model.mask_id)


# --------------------------------------------------------------------------------------------
# a real tiny transformers model
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=24, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32)
    path = tmp_path_factory.mktemp("tiny-bert")
    BertForMaskedLM(cfg).save_pretrained(path)
    model = BertForMaskedLM.from_pretrained(path).eval()

    def logits_fn(ids, attention_mask=None):
        return model(input_ids=ids, attention_mask=attention_mask).logits

    return model, logits_fn


def test_tiny_bert_trajectory_log_probs_are_reproduced(tiny_bert):
    model, logits_fn = tiny_bert
    mask_id, eos_id = 23, 2
    prompts = torch.tensor([[0, 5, 6, 7], [8, 9, 10, 11], [0, 0, 12, 13]])
    attn = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 1, 1]])
    spec = SamplingSpec(gen_length=8, steps=4, block_length=4, temperature=1.0, eos_early_rejection=0.5)
    traj = generate(logits_fn, prompts, attn, spec, mask_id=mask_id, eos_id=eos_id,
                    generator=torch.Generator().manual_seed(0))
    assert isinstance(traj, Trajectory) and traj.sequences.shape == (3, 12)
    assert torch.equal(traj.sequences[:, :4], prompts)
    recomputed = trajectory_logprob(logits_fn, traj, mask_id, batch_size=5)
    assert torch.allclose(recomputed, traj.step_log_probs, atol=1e-5)
    assert torch.allclose(trajectory_logprob(logits_fn, traj, mask_id, steps=[2, 0]), traj.step_log_probs[:, [2, 0]],
                          atol=1e-5)
    # differentiable: the exact trajectory log-prob has gradients for the policy update
    model.zero_grad()
    trajectory_logprob(logits_fn, traj, mask_id).sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    model.zero_grad()


def test_suppressed_tokens_are_never_drawn_and_scored_consistently():
    model = TableLM(length=6, vocab=5, seed=9, interaction=0.3)
    prompts = torch.tensor([[0, 1]]).expand(300, -1).contiguous()
    spec = SamplingSpec(gen_length=4, steps=2, temperature=1.0, suppress_tokens=(0,))
    traj = generate(model, prompts, None, spec, mask_id=model.mask_id, generator=torch.Generator().manual_seed(0))
    assert not (traj.completion_ids == 0).any() and traj.suppressed_tokens == (0,)
    assert torch.allclose(trajectory_logprob(model, traj, model.mask_id), traj.step_log_probs, atol=1e-5)
    # one token, one step: the recorded log-prob is that of the renormalized distribution over {1, 2, 3}
    one = generate(model, prompts[:5], None, SamplingSpec(gen_length=1, steps=1, temperature=1.0, suppress_tokens=(0,)),
                   mask_id=model.mask_id, generator=torch.Generator().manual_seed(0))
    logits = model(torch.tensor([[0, 1, model.mask_id]]))[0, 2].double()
    renorm = torch.log_softmax(logits[1:4], dim=-1)
    assert torch.allclose(one.step_log_probs[:, 0].double(), renorm[one.completion_ids[:, 0] - 1], atol=1e-5)
    with pytest.raises(ValueError, match="vocabulary"):
        generate(model, prompts[:1], None, SamplingSpec(gen_length=1, steps=1, suppress_tokens=(7,)),
                 mask_id=model.mask_id)
