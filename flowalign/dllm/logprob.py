"""Log-likelihood estimators for masked diffusion LMs (issue 6, docs/ARCHITECTURE.md "dLLM").

A masked diffusion LM has no tractable ``log p(completion | prompt)``; policy-gradient methods use
one of these surrogates. Every Monte Carlo estimator here is one weighted sum over ``N`` model
forwards on masked copies of the sequence,

    est[b, k] = sum_n  weight[b, n] / t[b, n] * 1[k masked in forward n] * log p_theta(x_k | x^(n))   (*)

where ``x^(n)`` is the sequence with forward ``n``'s completion (and optionally prompt) positions
replaced by ``[MASK]``, ``t`` the forward's mask rate and ``weight`` its weight in the average.
A :class:`MaskSet` holds ``(completion masks, prompt masks, t, weight)``; the ``draw_*`` functions
build the mask set of each estimator from an explicit ``generator`` and :func:`masked_logprob`
evaluates (*). Estimators return **per-token** values ``[B, Lg]`` over the completion window; the
sequence estimate is ``.sum(-1)`` (every window token counts, EOS fill included). Passing the same
``masks`` (or a generator in the same state) to the old and new policy gives ratio exactly 1.
Every draw is row by row (dim 0 is the batch): a :class:`~flowalign.training.rng.RowStreams` in
place of the generator draws each block of rows (a prompt group) from its own stream.

* :func:`one_step_logprob` -- diffu-GRPO (Zhao et al. 2025, "d1: Scaling Reasoning in Diffusion
  LLMs via RL", §3.2): completion fully masked, each prompt token masked independently with
  probability ``p_mask`` (0.15), one forward; per-token ``log p(o_k | masked prompt)``. Biased
  (a mean-field approximation), cheapest.
* :func:`coupled_logprob` -- coupled-GRPO (Gong et al. 2025, "DiffuCoder", §4 and App. A.3
  Eq. 12-13): ``t ~ U[0.2, 0.8]``, a completion mask ``M`` at rate ``t`` and its complement (rate
  ``1 - t``) so every token is masked in exactly one of the two forwards; per token
  ``1/2 [log p(o_k | all masked) + (1/t_k) log p(o_k | x_{M_k})]`` with ``t_k`` the rate of the
  forward that masked ``k`` (the paper averages the full-mask term ``L_T`` with the coupled pair;
  ``include_full_mask=False`` keeps only the pair, ``1/2 (1/t_k) log p``, an antithetic ELBO
  estimate).
* :func:`elbo_double_mc` -- the MDLM / LLaDA ELBO (Sahoo et al. 2024, MDLM Eq. 10 with the linear
  schedule; Nie et al. 2025, LLaDA §2.1 Eq. 3-4)
  ``ELBO = E_{t~U(0,1)} E_{M~Bern(t)^Lg} [ (1/t) sum_{k in M} log p(x_k | x_M) ] <= log p(x)``,
  with ``num_t`` random times and ``masks_per_t`` masks per time ("double Monte Carlo").
* :func:`elbo_semi_deterministic` -- GDPO (Rojas et al. 2025, "Improving Reasoning for Diffusion
  LLMs via Group Diffusion Policy Optimization", §3, semi-deterministic Monte Carlo): the
  ``t``-integral by Gauss-Legendre quadrature on ``[0, 1]`` (deterministic nodes and weights),
  the inner expectation by ``masks_per_node`` random masks per node. The integrand
  ``f(t) = E_M[(1/t) sum_{k in M} log p]`` is a polynomial of degree ``Lg - 1`` in ``t``, so
  ``ceil(Lg / 2)`` nodes integrate it exactly; with fewer the bias is the quadrature error.
* :func:`elbo_l_form` -- LLaDA's likelihood estimator (Nie et al. 2025, Eq. 12 / App. B.5;
  ML-GSAI/LLaDA @ b7e6c35 ``get_log_likelihood.py`` L7-26 and L72): the number of masked tokens
  ``l ~ U{1..Lg}``, exactly ``l`` positions masked (a uniform subset), weight ``Lg / l``; the
  ``n`` draws of a sequence are stratified (equally spaced ``l`` with one random offset). The
  weight is at most ``Lg``, where the double-MC ``1/t`` with ``t ~ U(0, 1]`` is unbounded.
* :func:`trajectory_logprob` -- exact per-step log-probs of a recorded decode (CJ-GRPO, MDPO):
  re-runs the model on every state ``Trajectory.state_at(s)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from flowalign.dllm.sampling import LogitsFn, Trajectory, guided_logits_fn, restrict_logits
from flowalign.training.rng import Generator, rand_rows, randint_rows

__all__ = [
    "MaskSet",
    "average_mask_sets",
    "coupled_logprob",
    "draw_coupled_masks",
    "draw_double_mc_masks",
    "draw_l_form_masks",
    "draw_one_step_masks",
    "draw_prompt_masks",
    "draw_semi_deterministic_masks",
    "elbo_double_mc",
    "elbo_l_form",
    "elbo_semi_deterministic",
    "gauss_legendre_01",
    "masked_logprob",
    "masked_step_logprob",
    "one_step_logprob",
    "trajectory_logprob",
    "trajectory_token_logprob",
]


# --------------------------------------------------------------------------------------------
# mask sets
# --------------------------------------------------------------------------------------------
@dataclass
class MaskSet:
    """The ``N`` masked forwards of one estimate, for a batch of ``B`` sequences.

    Attributes:
        completion: ``[B, N, Lg]`` bool, True where completion token ``k`` is masked in forward n.
        t: ``[B, N]`` float, the mask rate of forward n (the ``1/t`` of (*)).
        weight: ``[B, N]`` float, the weight of forward n in the average.
        prompt: ``[B, N, P]`` bool prompt positions masked in forward n, or ``None`` (none).
    """

    completion: Tensor
    t: Tensor
    weight: Tensor
    prompt: Tensor | None = None

    def __post_init__(self) -> None:
        if self.completion.dim() != 3 or self.completion.dtype != torch.bool:
            raise ValueError(f"MaskSet.completion must be a bool [B, N, Lg] tensor, got {self.completion.dtype} "
                             f"{tuple(self.completion.shape)}")
        B, N, _ = self.completion.shape
        for name in ("t", "weight"):
            v = getattr(self, name)
            if tuple(v.shape) != (B, N):
                raise ValueError(f"MaskSet.{name} must have shape [{B}, {N}], got {tuple(v.shape)}")
        if bool((self.t <= 0).any()) or bool((self.t > 1).any()):
            raise ValueError("MaskSet.t must lie in (0, 1]")
        if self.prompt is not None and (self.prompt.dim() != 3 or tuple(self.prompt.shape[:2]) != (B, N)
                                        or self.prompt.dtype != torch.bool):
            raise ValueError(f"MaskSet.prompt must be a bool [{B}, {N}, P] tensor, got {tuple(self.prompt.shape)}")

    @property
    def num_forwards(self) -> int:
        """``N``, the model forwards per sequence."""
        return self.completion.shape[1]

    @property
    def scale(self) -> Tensor:
        """``[B, N]`` the coefficient ``weight / t`` of a masked token's log-prob in (*)."""
        return self.weight / self.t


def _rand(shape: tuple[int, ...], generator: Generator, device) -> Tensor:
    """``U[0, 1)`` of ``shape``, rows (dim 0) from ``generator``'s blocks when it is a
    :class:`~flowalign.training.rng.RowStreams`."""
    return rand_rows(shape, generator, device=device)


def average_mask_sets(sets: Sequence[MaskSet]) -> MaskSet:
    """The average of ``len(sets)`` independent estimates as one :class:`MaskSet`: forwards
    concatenated along ``N``, weights divided by ``len(sets)`` (e.g. ``lambda`` coupled pairs)."""
    if not sets:
        raise ValueError("average_mask_sets needs at least one MaskSet")
    if any((m.prompt is None) != (sets[0].prompt is None) for m in sets):
        raise ValueError("average_mask_sets: either every MaskSet has prompt masks or none has")
    n = float(len(sets))
    return MaskSet(
        completion=torch.cat([m.completion for m in sets], dim=1),
        t=torch.cat([m.t for m in sets], dim=1),
        weight=torch.cat([m.weight for m in sets], dim=1) / n,
        prompt=None if sets[0].prompt is None else torch.cat([m.prompt for m in sets], dim=1),
    )


def draw_prompt_masks(
    attention_mask: Tensor, p_mask: float, generator: Generator = None, num: int = 1
) -> Tensor:
    """diffu-GRPO prompt masking (Zhao et al. 2025, §3.2): every real prompt token (attention 1)
    masked independently with probability ``p_mask``.

    Args:
        attention_mask: ``[B, P]`` (0 on left padding, never masked).
    Returns:
        ``[B, num, P]`` bool.
    """
    if not (0.0 <= p_mask <= 1.0):
        raise ValueError(f"p_mask must lie in [0, 1], got {p_mask!r}")
    B, P = attention_mask.shape
    u = _rand((B, num, P), generator, attention_mask.device)
    return (u < p_mask) & attention_mask.bool().unsqueeze(1)


def draw_one_step_masks(
    attention_mask: Tensor, prompt_length: int, gen_length: int, p_mask: float = 0.15,
    generator: Generator = None,
) -> MaskSet:
    """One forward: completion all masked (``t = 1``, weight 1), prompt masked at rate ``p_mask``.

    Args:
        attention_mask: ``[B, P + Lg]`` or ``[B, P]``.
    """
    B = attention_mask.shape[0]
    dev = attention_mask.device
    return MaskSet(
        completion=torch.ones((B, 1, gen_length), dtype=torch.bool, device=dev),
        t=torch.ones((B, 1), device=dev),
        weight=torch.ones((B, 1), device=dev),
        prompt=draw_prompt_masks(attention_mask[:, :prompt_length], p_mask, generator),
    )


def draw_coupled_masks(
    batch_size: int, gen_length: int, generator: Generator = None, *,
    t_range: tuple[float, float] = (0.2, 0.8), include_full_mask: bool = True, device="cpu",
) -> MaskSet:
    """coupled-GRPO masks (Gong et al. 2025, App. A.3 Eq. 12-13): per sequence ``t ~ U(t_range)``,
    ``M = {k : u_k < t}`` (rate ``t``) and its complement (rate ``1 - t``), so ``M | M^c`` covers
    every token and ``M & M^c`` is empty; optionally a first all-masked forward (``L_T``).

    Forward order: ``[full (if any), M, M^c]``; weights 1/2 each (the paper's average of ``L_T``
    and the coupled pair; a token appears in exactly one of ``M, M^c``).
    Returns:
        :class:`MaskSet` with ``N = 3`` (or 2).
    """
    lo, hi = t_range
    if not (0.0 < lo <= hi < 1.0):
        raise ValueError(f"t_range must satisfy 0 < low <= high < 1, got {t_range!r}")
    t = lo + (hi - lo) * _rand((batch_size,), generator, device)  # [B]
    u = _rand((batch_size, gen_length), generator, device)
    m = u < t.unsqueeze(1)
    comps, ts = [m, ~m], [t, 1.0 - t]
    if include_full_mask:
        comps.insert(0, torch.ones_like(m))
        ts.insert(0, torch.ones_like(t))
    tt = torch.stack(ts, dim=1)
    return MaskSet(completion=torch.stack(comps, dim=1), t=tt, weight=torch.full_like(tt, 0.5))


def draw_double_mc_masks(
    batch_size: int, gen_length: int, num_t: int, masks_per_t: int = 1,
    generator: Generator = None, *, device="cpu",
) -> MaskSet:
    """Double Monte Carlo ELBO masks: ``num_t`` times ``t ~ U(0, 1]`` per sequence, each with
    ``masks_per_t`` masks ``M ~ Bern(t)^Lg``; ``N = num_t * masks_per_t`` forwards, weight ``1/N``."""
    if num_t < 1 or masks_per_t < 1:
        raise ValueError(f"num_t and masks_per_t must be >= 1, got {num_t}, {masks_per_t}")
    t = 1.0 - _rand((batch_size, num_t), generator, device)  # U(0, 1]: 1/t stays finite
    t = t.repeat_interleave(masks_per_t, dim=1)  # [B, N]
    u = _rand((batch_size, t.shape[1], gen_length), generator, device)
    n = t.shape[1]
    return MaskSet(completion=u < t.unsqueeze(-1), t=t, weight=torch.full_like(t, 1.0 / n))


def draw_l_form_masks(
    batch_size: int, gen_length: int, num: int, generator: Generator = None, *, device="cpu",
) -> MaskSet:
    """LLaDA's stratified l-form masks (ML-GSAI/LLaDA @ b7e6c35, ``get_log_likelihood.py`` L7-26,
    ``forward_process``): per sequence one offset ``k ~ U{1..Lg}`` and ``num`` mask counts
    ``l_j = ((round(k + j Lg / num) - 1) mod Lg) + 1`` (L11-14: each ``l_j`` is marginally
    ``U{1..Lg}``, the ``num`` of them equally spaced), forward ``j`` masking exactly ``l_j``
    positions, a uniform subset (L17-20); its mask rate ``t = l_j / Lg`` (L26), weight ``1/num``
    (L72-73: the loss of a masked token divided by ``p_mask``, summed, averaged over the copies).
    ``N = num`` forwards."""
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    L = gen_length
    k = randint_rows(1, L + 1, (batch_size, 1), generator, device=device).double()
    steps = torch.arange(num, device=device, dtype=torch.float64) * (L / num)
    # torch.round is round-half-to-even, as the reference's torch.round
    l = ((torch.round(k + steps).long() - 1) % L) + 1  # [B, num] in 1..L
    u = _rand((batch_size, num, L), generator, device)
    ranks = u.argsort(dim=-1).argsort(dim=-1)  # a uniform permutation per forward
    t = l.float() / L
    return MaskSet(completion=ranks < l.unsqueeze(-1), t=t, weight=torch.full_like(t, 1.0 / num))


def gauss_legendre_01(num_nodes: int) -> tuple[Tensor, Tensor]:
    """Gauss-Legendre nodes and weights on ``[0, 1]`` (float64): ``int_0^1 g ~= sum_i w_i g(t_i)``,
    exact for polynomials of degree ``<= 2 num_nodes - 1``."""
    if num_nodes < 1:
        raise ValueError(f"num_nodes must be >= 1, got {num_nodes}")
    x, w = np.polynomial.legendre.leggauss(num_nodes)
    return torch.from_numpy((x + 1.0) / 2.0), torch.from_numpy(w / 2.0)


def draw_semi_deterministic_masks(
    batch_size: int, gen_length: int, num_nodes: int, masks_per_node: int = 1,
    generator: Generator = None, *, device="cpu", mask_count: str = "bernoulli",
) -> MaskSet:
    """GDPO semi-deterministic Monte Carlo masks (Rojas et al. 2025, §3): Gauss-Legendre nodes
    ``t_i`` on ``[0, 1]`` (same for every sequence), ``masks_per_node`` masks per node; weight of a
    forward ``w_i / masks_per_node``, its ``1/t`` the node ``1/t_i``.

    ``mask_count``: ``"bernoulli"`` -- every position masked independently with probability
    ``t_i`` (``Bern(t_i)^Lg``); ``"exact"`` -- exactly ``floor(t_i * Lg)`` positions, a uniform
    subset (the GDPO reference, KevinRojas1499/GDPO@1918683 ``gdpo/likelihood_estimators.py``
    L227-231, ``NumericalIntegrationEstimator.forward_process``: ``int(p_mask * target_len)``
    positions of a ``randperm``; the ``1/t_i`` weight is kept, L297)."""
    if masks_per_node < 1:
        raise ValueError(f"masks_per_node must be >= 1, got {masks_per_node}")
    if mask_count not in ("bernoulli", "exact"):
        raise ValueError(f"mask_count must be 'bernoulli' or 'exact', got {mask_count!r}")
    nodes, weights = gauss_legendre_01(num_nodes)
    t = nodes.float().to(device).repeat_interleave(masks_per_node).unsqueeze(0).expand(batch_size, -1).contiguous()
    w = (weights.float().to(device) / masks_per_node).repeat_interleave(masks_per_node)
    w = w.unsqueeze(0).expand(batch_size, -1).contiguous()
    u = _rand((batch_size, t.shape[1], gen_length), generator, device)
    if mask_count == "bernoulli":
        return MaskSet(completion=u < t.unsqueeze(-1), t=t, weight=w)
    # floor in float64, as the reference's Python int(t * Lg); the ranks of i.i.d. uniforms are a uniform permutation
    k = torch.floor(nodes.to(device) * gen_length).long().repeat_interleave(masks_per_node)  # [N]
    ranks = u.argsort(dim=-1).argsort(dim=-1)  # [B, N, Lg]
    return MaskSet(completion=ranks < k.view(1, -1, 1), t=t, weight=w)


# --------------------------------------------------------------------------------------------
# evaluation of (*)
# --------------------------------------------------------------------------------------------
def _check_sequences(sequences: Tensor, attention_mask: Tensor | None, prompt_length: int) -> Tensor:
    if not isinstance(sequences, Tensor) or sequences.dim() != 2 or sequences.dtype != torch.long:
        raise ValueError(f"sequences must be a torch.long tensor [B, L], got "
                         f"{getattr(sequences, 'dtype', type(sequences))} {tuple(getattr(sequences, 'shape', ()))}")
    if not (0 <= prompt_length < sequences.shape[1]):
        raise ValueError(f"prompt_length={prompt_length} must lie in [0, L={sequences.shape[1]})")
    if attention_mask is None:
        return torch.ones_like(sequences)
    if tuple(attention_mask.shape) != tuple(sequences.shape):
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} must equal sequences shape "
                         f"{tuple(sequences.shape)}")
    return attention_mask


def _token_log_probs(
    logits: Tensor, targets: Tensor, temperature: float, mask_id: int, suppress_tokens: Sequence[int],
    *, entropy: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """``log softmax(restrict(logits) / T)[targets]``: logits ``[n, Lg, V]``, targets ``[n, Lg]`` ->
    ``[n, Lg]``; ``[MASK]`` and ``suppress_tokens`` excluded as in sampling (``restrict_logits``).
    ``entropy=True``: also the entropy ``-sum_v p_v log p_v`` of that distribution, ``[n, Lg]``."""
    logits = restrict_logits(logits.float(), mask_id, suppress_tokens)
    log_p = torch.log_softmax(logits / temperature, dim=-1)
    picked = log_p.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if not entropy:
        return picked
    return picked, torch.special.entr(log_p.exp()).sum(dim=-1)  # entr(0) = 0 at the excluded tokens


def _chunked_token_log_probs(
    logits_fn: LogitsFn, ids: Tensor, attn: Tensor, targets: Tensor, prompt_length: int,
    temperature: float, batch_size: int | None, mask_id: int, suppress_tokens: Sequence[int],
    *, entropy: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Completion-token log-probs ``[n, Lg]`` of ``targets`` for inputs ``ids [n, L]``, calling the
    model on chunks of ``batch_size`` rows (one call when ``None``); only ``[n, Lg]`` is kept.
    ``entropy=True``: also the predictive entropies ``[n, Lg]`` (:func:`_token_log_probs`)."""
    n, L = ids.shape
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 or None, got {batch_size!r}")
    excluded = torch.tensor([mask_id, *suppress_tokens], device=targets.device)
    if bool(torch.isin(targets, excluded).any()):
        raise ValueError(f"the completion contains an excluded token (mask_id / suppress_tokens {excluded.tolist()}): "
                         "its log-probability is -inf")
    step = n if batch_size is None else batch_size
    out = []
    for i in range(0, n, step):
        logits = logits_fn(ids[i : i + step], attn[i : i + step])
        if logits.dim() != 3 or tuple(logits.shape[:2]) != (min(step, n - i), L):
            raise ValueError(f"logits_fn returned shape {tuple(logits.shape)}, expected [{min(step, n - i)}, {L}, V]")
        out.append(_token_log_probs(logits[:, prompt_length:], targets[i : i + step], temperature, mask_id,
                                    suppress_tokens, entropy=entropy))
    if entropy:
        return torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out])
    return torch.cat(out)


def masked_logprob(
    logits_fn: LogitsFn, sequences: Tensor, attention_mask: Tensor | None, prompt_length: int,
    mask_id: int, masks: MaskSet, *, temperature: float = 1.0, batch_size: int | None = None,
    suppress_tokens: Sequence[int] = (), return_entropy: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Evaluate (*) for a :class:`MaskSet`: ``sum_n weight/t * 1[k masked in n] * log p(x_k | x^(n))``.

    Differentiable w.r.t. the model (no ``no_grad`` here). ``B * N`` forwards, in chunks of
    ``batch_size`` rows (all at once when ``None``).

    Args:
        sequences: ``[B, P + Lg]`` long (prompt, completion).
        attention_mask: ``[B, P + Lg]`` or ``None``.
        masks: completion masks ``[B, N, Lg]`` (and optional prompt masks ``[B, N, P]``).
        temperature: log-probs of ``softmax(logits / temperature)``.
        suppress_tokens: token ids excluded (besides ``[MASK]``) before the softmax, as in
            ``SamplingSpec.suppress_tokens``.
        return_entropy: also return the entropy of the model's predictive distribution (the one
            the log-probs are taken from) at every completion position, averaged over the forwards
            that mask it (0 where none does); IGPO's entropy filter of hint tokens uses it.
    Returns:
        ``[B, Lg]`` float32 per-token estimates (and ``[B, Lg]`` entropies with ``return_entropy``).
    """
    attn = _check_sequences(sequences, attention_mask, prompt_length)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    B, L = sequences.shape
    P, Lg = prompt_length, L - prompt_length
    if masks.completion.shape[0] != B or masks.completion.shape[2] != Lg:
        raise ValueError(f"masks.completion has shape {tuple(masks.completion.shape)}, expected [{B}, N, {Lg}]")
    if masks.prompt is not None and masks.prompt.shape[2] != P:
        raise ValueError(f"masks.prompt has shape {tuple(masks.prompt.shape)}, expected [{B}, N, {P}]")
    N = masks.num_forwards
    device = sequences.device
    full_mask = torch.zeros((B, N, L), dtype=torch.bool, device=device)
    full_mask[:, :, P:] = masks.completion.to(device)
    if masks.prompt is not None:
        full_mask[:, :, :P] = masks.prompt.to(device)
    ids = torch.where(full_mask, torch.full_like(full_mask, mask_id, dtype=torch.long),
                      sequences.unsqueeze(1).expand(B, N, L)).reshape(B * N, L)
    am = attn.unsqueeze(1).expand(B, N, L).reshape(B * N, L)
    targets = sequences[:, P:].unsqueeze(1).expand(B, N, Lg).reshape(B * N, Lg)
    out = _chunked_token_log_probs(logits_fn, ids, am, targets, P, temperature, batch_size, mask_id,
                                   suppress_tokens, entropy=return_entropy)
    logp = (out[0] if return_entropy else out).reshape(B, N, Lg)
    coef = masks.scale.to(device=device, dtype=logp.dtype).unsqueeze(-1)  # [B, N, 1]
    # where() keeps the log p of unmasked tokens out of the sum and out of the gradient
    estimate = torch.where(masks.completion.to(device), coef * logp, torch.zeros_like(logp)).sum(dim=1)
    if not return_entropy:
        return estimate
    masked = masks.completion.to(device).float()
    ent = (out[1].reshape(B, N, Lg) * masked).sum(dim=1) / masked.sum(dim=1).clamp_min(1.0)
    return estimate, ent


# --------------------------------------------------------------------------------------------
# the estimators
# --------------------------------------------------------------------------------------------
def one_step_logprob(
    logits_fn: LogitsFn, sequences: Tensor, attention_mask: Tensor | None, prompt_length: int,
    mask_id: int, *, p_mask: float = 0.15, generator: Generator = None,
    masks: MaskSet | None = None, temperature: float = 1.0, batch_size: int | None = None,
    suppress_tokens: Sequence[int] = (),
) -> Tensor:
    """diffu-GRPO one-step estimate (Zhao et al. 2025, §3.2): ``[B, Lg]`` per-token
    ``log p(o_k | prompt with each token masked w.p. p_mask, completion all masked)``; 1 forward."""
    attn = _check_sequences(sequences, attention_mask, prompt_length)
    if masks is None:
        masks = draw_one_step_masks(attn, prompt_length, sequences.shape[1] - prompt_length, p_mask, generator)
    return masked_logprob(logits_fn, sequences, attn, prompt_length, mask_id, masks,
                          temperature=temperature, batch_size=batch_size, suppress_tokens=suppress_tokens)


def coupled_logprob(
    logits_fn: LogitsFn, sequences: Tensor, attention_mask: Tensor | None, prompt_length: int,
    mask_id: int, *, t_range: tuple[float, float] = (0.2, 0.8), include_full_mask: bool = True,
    generator: Generator = None, masks: MaskSet | None = None,
    temperature: float = 1.0, batch_size: int | None = None,
    suppress_tokens: Sequence[int] = (),
) -> Tensor:
    """coupled-GRPO estimate (Gong et al. 2025, §4, App. A.3 Eq. 13): ``[B, Lg]`` per-token
    ``1/2 [log p(o_k | all masked) + (1/t_k) log p(o_k | x_{M_k})]``; 3 forwards (2 without the
    full-mask term)."""
    attn = _check_sequences(sequences, attention_mask, prompt_length)
    if masks is None:
        masks = draw_coupled_masks(sequences.shape[0], sequences.shape[1] - prompt_length, generator,
                                   t_range=t_range, include_full_mask=include_full_mask, device=sequences.device)
    return masked_logprob(logits_fn, sequences, attn, prompt_length, mask_id, masks,
                          temperature=temperature, batch_size=batch_size, suppress_tokens=suppress_tokens)


def elbo_double_mc(
    logits_fn: LogitsFn, sequences: Tensor, attention_mask: Tensor | None, prompt_length: int,
    mask_id: int, *, num_t: int = 2, masks_per_t: int = 1, generator: Generator = None,
    masks: MaskSet | None = None, temperature: float = 1.0, batch_size: int | None = None,
    suppress_tokens: Sequence[int] = (),
) -> Tensor:
    """Double Monte Carlo ELBO (MDLM / LLaDA): ``[B, Lg]`` per-token contributions, ``.sum(-1)`` is
    an unbiased estimate of ``ELBO = E_t E_M[(1/t) sum_{k in M} log p(x_k | x_M)]``;
    ``num_t * masks_per_t`` forwards."""
    attn = _check_sequences(sequences, attention_mask, prompt_length)
    if masks is None:
        masks = draw_double_mc_masks(sequences.shape[0], sequences.shape[1] - prompt_length, num_t, masks_per_t,
                                     generator, device=sequences.device)
    return masked_logprob(logits_fn, sequences, attn, prompt_length, mask_id, masks,
                          temperature=temperature, batch_size=batch_size, suppress_tokens=suppress_tokens)


def elbo_l_form(
    logits_fn: LogitsFn, sequences: Tensor, attention_mask: Tensor | None, prompt_length: int,
    mask_id: int, *, num: int = 2, generator: Generator = None, masks: MaskSet | None = None,
    temperature: float = 1.0, batch_size: int | None = None, suppress_tokens: Sequence[int] = (),
) -> Tensor:
    """LLaDA's l-form ELBO (:func:`draw_l_form_masks`): ``[B, Lg]`` per-token contributions,
    ``.sum(-1) = (1/n) sum_j (Lg / l_j) sum_{k in M_j} log p(x_k | x_{M_j})``, unbiased for the same
    ELBO as :func:`elbo_double_mc`; ``num`` forwards."""
    attn = _check_sequences(sequences, attention_mask, prompt_length)
    if masks is None:
        masks = draw_l_form_masks(sequences.shape[0], sequences.shape[1] - prompt_length, num, generator,
                                  device=sequences.device)
    return masked_logprob(logits_fn, sequences, attn, prompt_length, mask_id, masks,
                          temperature=temperature, batch_size=batch_size, suppress_tokens=suppress_tokens)


def elbo_semi_deterministic(
    logits_fn: LogitsFn, sequences: Tensor, attention_mask: Tensor | None, prompt_length: int,
    mask_id: int, *, num_nodes: int = 2, masks_per_node: int = 1, generator: Generator = None,
    masks: MaskSet | None = None, temperature: float = 1.0, batch_size: int | None = None,
    suppress_tokens: Sequence[int] = (), mask_count: str = "bernoulli",
) -> Tensor:
    """GDPO semi-deterministic ELBO (Rojas et al. 2025, §3): ``[B, Lg]`` per-token contributions,
    ``.sum(-1) = sum_i w_i (1/m) sum_j (1/t_i) sum_{k in M_ij} log p(x_k | x_{M_ij})`` over
    Gauss-Legendre nodes ``t_i``; with ``mask_count="bernoulli"`` unbiased for the quadrature
    ``sum_i w_i f(t_i)`` (the exact ELBO once ``num_nodes >= Lg / 2``); ``"exact"`` masks
    ``floor(t_i Lg)`` positions as the GDPO reference does (:func:`draw_semi_deterministic_masks`);
    ``num_nodes * masks_per_node`` forwards."""
    attn = _check_sequences(sequences, attention_mask, prompt_length)
    if masks is None:
        masks = draw_semi_deterministic_masks(sequences.shape[0], sequences.shape[1] - prompt_length, num_nodes,
                                              masks_per_node, generator, device=sequences.device, mask_count=mask_count)
    return masked_logprob(logits_fn, sequences, attn, prompt_length, mask_id, masks,
                          temperature=temperature, batch_size=batch_size, suppress_tokens=suppress_tokens)


def trajectory_logprob(
    logits_fn: LogitsFn, trajectory: Trajectory, mask_id: int, temperature: float | None = None, *,
    steps: Sequence[int] | None = None, batch_size: int | None = None,
) -> Tensor:
    """Exact per-step log-probs of a recorded decode (CJ-GRPO, Yang et al. 2025 §3.3; MDPO).

    ``out[b, j] = sum_{k : commit_step[b,k] = s_j} log softmax(logits(state_at(s_j)) / T)[x_k]``,
    one forward per (sequence, step), batched over ``len(steps) * B`` rows. At the sampling
    temperature (the default, ``trajectory.log_prob_temperature``) and the sampling weights this
    equals ``trajectory.step_log_probs[:, steps]``; a guided decode (``trajectory.cfg_scale``) is
    scored with the same guidance (:func:`~flowalign.dllm.sampling.guided_logits_fn`).
    Differentiable w.r.t. the model.

    Args:
        steps: the steps to score (default all ``0..S-1``).
    Returns:
        ``[B, len(steps)]`` float32.
    """
    T = trajectory.log_prob_temperature if temperature is None else float(temperature)
    if T <= 0:
        raise ValueError(f"temperature must be > 0, got {T!r}")
    S = trajectory.num_steps
    steps = list(range(S)) if steps is None else [int(s) for s in steps]
    for s in steps:
        if not (0 <= s < S):
            raise ValueError(f"steps must lie in [0, {S - 1}], got {s}")
    if not steps:
        raise ValueError("steps must name at least one step")
    B, L = trajectory.sequences.shape
    P = trajectory.prompt_length
    logits_fn = guided_logits_fn(logits_fn, P, mask_id, trajectory.cfg_scale)
    states = torch.cat([trajectory.state_at(s, mask_id) for s in steps], dim=0)  # [n*B, L]
    attn = trajectory.attention_mask.repeat(len(steps), 1)
    targets = trajectory.completion_ids.repeat(len(steps), 1)
    logp = _chunked_token_log_probs(logits_fn, states, attn, targets, P, T, batch_size, mask_id,
                                    trajectory.suppressed_tokens).reshape(len(steps), B, L - P)
    step_ids = torch.tensor(steps, device=logp.device).view(-1, 1, 1)
    committed = trajectory.commit_step.unsqueeze(0) == step_ids  # [n, B, Lg]
    return torch.where(committed, logp, torch.zeros_like(logp)).sum(dim=-1).transpose(0, 1)


def masked_step_logprob(
    logits_fn: LogitsFn, trajectory: Trajectory, mask_id: int, temperature: float | None = None, *,
    batch_size: int | None = None,
) -> Tensor:
    """Per-(step, position) log-probs of a recorded decode's intermediate answers (MDPO's objective).

    ``out[b, s, k] = log softmax(logits(state_at(s)) / T)[predictions[b, s, k]]`` at every position
    ``k`` still masked before step ``s`` (``commit_step[b, k] >= s``), 0 elsewhere: the log-prob,
    given the state the decoder saw at step ``s``, of the draw ``x0`` it made there -- at every masked
    position, not only the committed ones. The MDPO reference trains these (autonomousvision/mdpo @
    e6ae439, ``src/open_r1/mdpo/mdpo_trainer.py`` L925-932: input ``all_steps_input_ids[step]``, the
    state before the step, target ``all_steps_completion_ids[step]`` = ``where(mask, x0, x)``
    of ``src/mdlm_generation_utils.py`` L101-102; ``_get_per_token_logps`` L733-740: log-softmax of
    ``logits / T``; ``compute_loss`` L1510: positions ``input_ids == mask``). Here the logits are
    restricted as in sampling (``[MASK]`` and ``trajectory.suppressed_tokens`` excluded) and guided
    with the decode's ``cfg_scale``, as :func:`trajectory_logprob`. ``exp`` of the value at the
    sampling temperature (the default, ``trajectory.log_prob_temperature``) is the probability the
    decoder drew ``x0`` with, i.e. the reference's sampling confidence (L76-79). One forward per
    (sequence, step); differentiable w.r.t. the model.

    Args:
        trajectory: a decode recorded with ``record_predictions=True``.
        temperature: the log-probs' temperature (default: the decode's).
        batch_size: rows per model call (all ``S * B`` at once when ``None``).
    Returns:
        ``[B, S, Lg]`` float32.
    """
    if trajectory.predictions is None:
        raise ValueError("masked_step_logprob needs the decode's intermediate answers (generate(record_predictions=True))")
    S, B = trajectory.num_steps, trajectory.sequences.shape[0]
    targets = trajectory.predictions.transpose(0, 1).reshape(S * B, -1)  # [S*B, Lg], step-major
    logp = _step_state_token_logprob(logits_fn, trajectory, mask_id, targets, temperature, batch_size)
    steps = torch.arange(S, device=logp.device).view(1, S, 1)
    masked = trajectory.commit_step.unsqueeze(1) >= steps  # [B, S, Lg]: masked before step s
    return torch.where(masked, logp, torch.zeros_like(logp))


def _step_state_token_logprob(logits_fn: LogitsFn, trajectory: Trajectory, mask_id: int, targets: Tensor,
                              temperature: float | None, batch_size: int | None) -> Tensor:
    """``[B, S, Lg]`` log-probs of ``targets`` (``[S*B, Lg]``, step-major) at every completion position,
    given the state before each step of a recorded decode: logits restricted as in sampling, guided
    with the decode's ``cfg_scale``, at ``temperature`` (default: the decode's)."""
    T = trajectory.log_prob_temperature if temperature is None else float(temperature)
    if T <= 0:
        raise ValueError(f"temperature must be > 0, got {T!r}")
    S, P = trajectory.num_steps, trajectory.prompt_length
    B, L = trajectory.sequences.shape
    logits_fn = guided_logits_fn(logits_fn, P, mask_id, trajectory.cfg_scale)
    states = torch.cat([trajectory.state_at(s, mask_id) for s in range(S)], dim=0)  # [S*B, L], step-major
    attn = trajectory.attention_mask.repeat(S, 1)
    return _chunked_token_log_probs(logits_fn, states, attn, targets, P, T, batch_size, mask_id,
                                    trajectory.suppressed_tokens).reshape(S, B, L - P).transpose(0, 1)


def trajectory_token_logprob(
    logits_fn: LogitsFn, trajectory: Trajectory, mask_id: int, temperature: float | None = None, *,
    batch_size: int | None = None,
) -> Tensor:
    """Per-(step, position) log-probs of the tokens a recorded decode committed (CJ-GRPO's reference
    objective): ``out[b, s, k] = log softmax(logits(state_at(s)) / T)[x_k]`` where token ``k`` was
    committed at step ``s`` (``commit_step[b, k] == s``), 0 elsewhere; ``out.sum(-1)`` is
    :func:`trajectory_logprob`'s ``[B, S]``. The CJ-GRPO reference keeps these per token
    (yjyddq/EOSER-ASS-RL @ 5affb4e, ``cj-grpo/cj_grpo_trainer_eoser_ass.py`` ``_get_per_token_logps``
    L560-594: input ``reversed_traj[i]``, the state before step ``i``, target ``reversed_traj[i+1]``,
    ``selective_log_softmax`` of the logits; trained at ``unmask_positions``, the positions committed at
    step ``i``, L487). As :func:`trajectory_logprob`: logits restricted as in sampling, guided with the
    decode's ``cfg_scale``, temperature ``T`` default the decode's; one forward per (sequence, step),
    differentiable w.r.t. the model.

    Returns:
        ``[B, S, Lg]`` float32.
    """
    S = trajectory.num_steps
    logp = _step_state_token_logprob(logits_fn, trajectory, mask_id, trajectory.completion_ids.repeat(S, 1),
                                     temperature, batch_size)
    steps = torch.arange(S, device=logp.device).view(1, S, 1)
    committed = trajectory.commit_step.unsqueeze(1) == steps  # [B, S, Lg]
    return torch.where(committed, logp, torch.zeros_like(logp))
