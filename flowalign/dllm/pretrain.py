"""Masked-diffusion pretraining objective and the flawed addition data of the quickstart.

The objective is the masked-diffusion ELBO of LLaDA (Nie et al. 2025, "Large Language Diffusion
Models", Eq. 3 for pretraining and Eq. 5 for SFT, where only the response is masked) / MDLM
(Sahoo et al. 2024, Eq. 10, linear schedule alpha_t = 1 - t):

    L(theta) = - E_{t ~ U(0,1], x_t ~ q(x_t | x_0)} [ 1/t * sum_i 1[x_t^i = M] log p_theta(x_0^i | x_t) ]

where every completion token is masked independently with probability ``t`` and the prompt is never
masked (SFT form, Eq. 5).  We divide the sum by the completion length ``gen_length`` (a constant, so
the minimiser is unchanged), as LLaDA's reference SFT code does.

The flawed data (:func:`flawed_addition_pairs`) reproduces the quickstart's designed flaw: a share of
the additions that involve a carry are written with all carries dropped (per-digit sums mod 10,
e.g. ``047+085=0022`` instead of ``0132``).  The share depends on the number of carries
(:data:`DEFAULT_DROP_PROB`), so a maximum-likelihood model learns a *mixture* whose greedy decode
is right for one-carry sums and wrong for sums with two or more carries; continued pretraining on
the same data cannot fix that, a reward can.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from flowalign.dllm.tasks import TaskExample, addition_answer, addition_prompt

LogitsFn = Callable[[Tensor, "Tensor | None"], Tensor]

#: Probability that a training sum with ``k`` carries is written with every carry dropped.
DEFAULT_DROP_PROB: dict[int, float] = {0: 0.0, 1: 0.3, 2: 0.7, 3: 0.7}


# ----------------------------------------------------------------------------------------------
# flawed addition data
# ----------------------------------------------------------------------------------------------
def carry_count(a: int, b: int) -> int:
    """Number of column additions of ``a + b`` (base 10, non-negative) that produce a carry."""
    if a < 0 or b < 0:
        raise ValueError(f"carry_count needs non-negative operands, got a={a}, b={b}")
    count, carry = 0, 0
    while a > 0 or b > 0:
        carry = (a % 10 + b % 10 + carry) // 10
        count += carry
        a //= 10
        b //= 10
    return count


def dropped_carry_sum(a: int, b: int) -> int:
    """``a + b`` with every carry dropped: each digit is ``(a_k + b_k) mod 10`` (47+85 -> 22)."""
    if a < 0 or b < 0:
        raise ValueError(f"dropped_carry_sum needs non-negative operands, got a={a}, b={b}")
    out, place = 0, 1
    while a > 0 or b > 0:
        out += ((a % 10 + b % 10) % 10) * place
        a //= 10
        b //= 10
        place *= 10
    return out


def flawed_addition_pairs(
    n: int,
    *,
    rng: random.Random,
    low: int = 10,
    high: int = 999,
    digits: int = 3,
    drop_prob: Mapping[int, float] | None = None,
    exclude: set[tuple[int, int]] | None = None,
) -> list[TaskExample]:
    """Draw ``n`` flawed pretraining examples ``a+b=`` with ``a, b ~ U{low..high}``.

    The written answer (``example.answer``) is the dropped-carry sum with probability
    ``drop_prob[carry_count(a, b)]`` (carry counts above the largest key use the largest key), the
    true sum otherwise; ``example.reference`` always holds the TRUE answer and ``metadata`` holds
    ``a``, ``b``, ``carries`` and ``flawed``.  Pairs in ``exclude`` (held-out prompts) are redrawn.
    """
    probs = dict(DEFAULT_DROP_PROB if drop_prob is None else drop_prob)
    if not probs:
        raise ValueError("drop_prob must map carry counts to probabilities, got an empty mapping")
    for k, p in probs.items():
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"drop_prob[{k}]={p} is not a probability")
    if not 0 <= low <= high < 10**digits:
        raise ValueError(f"need 0 <= low <= high < 10**digits, got low={low}, high={high}, digits={digits}")
    max_key = max(probs)
    out: list[TaskExample] = []
    while len(out) < n:
        a, b = rng.randint(low, high), rng.randint(low, high)
        if exclude is not None and (a, b) in exclude:
            continue
        k = carry_count(a, b)
        flawed = rng.random() < probs.get(min(k, max_key), 0.0)
        written = dropped_carry_sum(a, b) if flawed else a + b
        out.append(
            TaskExample(
                prompt=addition_prompt(a, b, digits=digits),
                answer=addition_answer(written, digits=digits + 1),
                reference=addition_answer(a + b, digits=digits + 1),
                metadata={"a": a, "b": b, "carries": k, "flawed": flawed},
            )
        )
    return out


# ----------------------------------------------------------------------------------------------
# sequences
# ----------------------------------------------------------------------------------------------
def build_sequences(
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    *,
    gen_length: int,
    pad_id: int,
    eos_id: int,
) -> tuple[Tensor, Tensor, int]:
    """Left-pad prompts and EOS-fill completions into the shared sequence layout.

    Returns ``(sequences [B, P+gen_length] long, attention_mask [B, P+gen_length] long, P)``
    where ``P`` is the longest prompt; completion tokens beyond the answer are ``eos_id``.
    """
    if len(prompt_ids) != len(completion_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(completion_ids)} completions")
    if not prompt_ids:
        raise ValueError("build_sequences needs at least one example")
    if gen_length < 1:
        raise ValueError(f"gen_length must be >= 1, got {gen_length}")
    P = max(len(p) for p in prompt_ids)
    B = len(prompt_ids)
    seq = torch.full((B, P + gen_length), eos_id, dtype=torch.long)
    att = torch.ones((B, P + gen_length), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        if len(c) > gen_length:
            raise ValueError(f"completion {i} has {len(c)} tokens > gen_length={gen_length}")
        seq[i, : P - len(p)] = pad_id
        att[i, : P - len(p)] = 0
        if len(p):
            seq[i, P - len(p) : P] = torch.tensor(list(p), dtype=torch.long)
        if len(c):
            seq[i, P : P + len(c)] = torch.tensor(list(c), dtype=torch.long)
    return seq, att, P


# ----------------------------------------------------------------------------------------------
# the objective
# ----------------------------------------------------------------------------------------------
def sample_mask_ratios(batch: int, *, generator: torch.Generator | None = None, eps: float = 1e-3,
                       stratified: bool = True) -> Tensor:
    """Mask ratios ``t [B]`` in ``[eps, 1]``; stratified (one draw per 1/B bin, MDLM's
    low-discrepancy sampler, Sahoo et al. 2024 Sec. 3.5) keeps U(0,1] marginals with lower variance."""
    u = torch.rand(batch, generator=generator)
    if stratified:
        perm = torch.randperm(batch, generator=generator)
        u = (perm.to(u.dtype) + u) / batch
    return eps + (1.0 - eps) * u


def masked_diffusion_loss(
    logits_fn: LogitsFn,
    sequences: Tensor,
    attention_mask: Tensor | None,
    prompt_length: int,
    mask_id: int,
    generator: torch.Generator | None = None,
    *,
    t: Tensor | None = None,
    masks: Tensor | None = None,
    eps: float = 1e-3,
    stratified: bool = True,
    reduction: str = "mean",
) -> Tensor:
    """Masked-diffusion loss (LLaDA Eq. 3/5, see module docstring), prompt never masked.

    Args:
        sequences: ``[B, L]`` clean tokens, prompt ``[:, :prompt_length]``, completion after.
        attention_mask: ``[B, L]`` (0 on left padding) or None.
        t: optional ``[B]`` mask ratios in (0, 1]; drawn by :func:`sample_mask_ratios` otherwise.
        masks: optional ``[B, Lg]`` bool masks (True = masked) to use instead of Bernoulli(t) draws.
        reduction: ``"mean"`` (scalar) or ``"none"`` (``[B]`` per-sequence losses).

    Returns the Monte-Carlo estimate ``1/(t Lg) * sum_{masked i} -log p(x_0^i | x_t)``, averaged
    over the batch (or per sequence).  Its expectation over masks is the negative ELBO / Lg.
    """
    if sequences.dim() != 2:
        raise ValueError(f"sequences must be [B, L], got shape {tuple(sequences.shape)}")
    B, L = sequences.shape
    Lg = L - prompt_length
    if not 0 <= prompt_length < L:
        raise ValueError(f"prompt_length={prompt_length} must be in [0, L={L})")
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    if t is None:
        t = sample_mask_ratios(B, generator=generator, eps=eps, stratified=stratified)
    t = t.to(torch.float32).reshape(B)
    if bool((t <= 0).any()) or bool((t > 1).any()):
        raise ValueError("mask ratios t must lie in (0, 1]")
    if masks is None:
        u = torch.rand((B, Lg), generator=generator)
        masks = u < t[:, None]
    elif masks.shape != (B, Lg):
        raise ValueError(f"masks must be [B, Lg]=({B}, {Lg}), got {tuple(masks.shape)}")
    masks = masks.to(sequences.device).bool()
    noisy = sequences.clone()
    comp = noisy[:, prompt_length:]
    comp[masks] = mask_id
    logits = logits_fn(noisy, attention_mask)[:, prompt_length:].float()  # [B, Lg, V]
    nll = F.cross_entropy(logits.reshape(B * Lg, -1), sequences[:, prompt_length:].reshape(-1),
                          reduction="none").reshape(B, Lg)
    per_seq = (nll * masks.float()).sum(dim=1) / (t.to(nll.device) * Lg)
    return per_seq.mean() if reduction == "mean" else per_seq


def examples_to_sequences(model, examples: Sequence[TaskExample], *, gen_length: int,
                          use_reference: bool = False) -> tuple[Tensor, Tensor, int]:
    """Tokenise ``prompt`` + ``answer`` (or ``reference``) with ``model`` (a
    :class:`~flowalign.dllm.model.MaskedDiffusionLM`) into ``(sequences, attention_mask, P)``."""
    prompts = model.encode([ex.prompt for ex in examples])
    comps = model.encode([ex.reference if use_reference else ex.answer for ex in examples])
    return build_sequences(prompts, comps, gen_length=gen_length, pad_id=model.pad_token_id,
                           eos_id=model.eos_token_id)


def pretrain_steps(
    model,
    examples: Sequence[TaskExample] | Callable[[int], Sequence[TaskExample]],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    gen_length: int,
    generator: torch.Generator | None = None,
    weight_decay: float = 0.0,
    grad_clip: float = 1.0,
    optimizer: torch.optim.Optimizer | None = None,
    callback: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Continue pretraining ``model`` (a MaskedDiffusionLM) with :func:`masked_diffusion_loss`.

    ``examples`` is a fixed pool (batches drawn uniformly with ``generator``) or a callable
    ``n -> examples`` giving fresh draws (e.g. ``lambda n: flawed_addition_pairs(n, rng=rng)``).
    Trains ``model.trainable_parameters()`` with AdamW; returns the per-step losses.
    """
    if steps < 0 or batch_size < 1:
        raise ValueError(f"need steps >= 0 and batch_size >= 1, got steps={steps}, batch_size={batch_size}")
    params = list(model.trainable_parameters())
    if not params:
        raise ValueError("model has no trainable parameters")
    opt = optimizer or torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    losses: list[float] = []
    model.train()
    for step in range(steps):
        if callable(examples):
            batch = list(examples(batch_size))
        else:
            if not examples:
                raise ValueError("examples is empty")
            idx = torch.randint(len(examples), (batch_size,), generator=generator).tolist()
            batch = [examples[i] for i in idx]
        seq, att, P = examples_to_sequences(model, batch, gen_length=gen_length)
        loss = masked_diffusion_loss(model, seq, att, P, model.mask_token_id, generator)
        value = float(loss.detach())
        if not math.isfinite(value):  # before the update: a NaN never reaches the optimizer
            raise FloatingPointError(f"masked diffusion loss became {value} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip and grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        losses.append(value)
        if callback is not None:
            callback(step, value)
    model.eval()
    return losses
