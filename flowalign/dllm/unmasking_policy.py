"""A learned, stochastic token-commitment (unmasking) policy with an exact log-probability
(issue 16: Co-GRPO, arXiv:2512.22288, and the learned token-commitment policy, "The Path Matters",
arXiv:2605.24697; the architecture follows Olausson et al. 2025, "Learning Unmasking Policies for
Diffusion Language Models", arXiv:2512.09106, whose policy maps the dLLM's token confidences to
unmasking decisions).

At every decoding step of :func:`flowalign.dllm.sampling.generate` the masked diffusion LM proposes
a distribution at every masked position; the low-confidence heuristic (LLaDA, Nie et al. 2025,
Alg. 5) commits the ``k_s`` candidates of the current block with the highest confidence. Here a small
head scores every candidate position from *x0-independent* features of the model's logits at that
step (:func:`commitment_features`) and the ``k_s`` committed positions are drawn from the
Plackett-Luce distribution of those scores, in order:

    P(o_1, ..., o_k | u, C) = prod_j exp(u_{o_j}) / sum_{i in C \\ {o_1..o_{j-1}}} exp(u_i)

(Plackett 1975; Luce 1959), drawn exactly with the Gumbel-top-k trick (Kool et al. 2019, "Stochastic
Beams and Where to Find Them", §3: the top-k of ``u + Gumbel`` is a Plackett-Luce sample without
replacement, in order). Because the features do not depend on the tokens drawn at the positions that
stay masked, one step's transition factorises exactly as

    p(x_{s+1} | x_s) = PL(o | u(x_s)) * prod_{i in o} p_theta(x0_i | x_s)

(ours: the joint MDP of Co-GRPO's "model + schedule" written for the choice of positions), so the
GRPO ratio of a step may use the commitment log-prob alone (frozen dLLM) or the sum of both
(joint training). The features are recorded during the decode and treated as the observed state
(stop-gradient): recomputing the commitment log-probs needs no model forward.

Choices the papers leave open (ours): the five features, the score
``u = a * log p_max + MLP(features)`` with the MLP's output layer zero-initialised, so that the
untrained policy is the low-confidence heuristic softened to a Plackett-Luce draw of temperature
``1 / a`` (``a -> inf``: LLaDA's top-k; ``a = 0``: uniformly random remasking); the number ``k_s``
of tokens per step stays the decode's step schedule.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from flowalign.training.rng import Generator, rand_rows

__all__ = [
    "NUM_FEATURES",
    "CommitmentPolicy",
    "UnmaskingPolicy",
    "commitment_features",
    "gumbel_top_k",
    "plackett_luce_log_prob",
]

#: features per position: log p_max, entropy, p_max - p_second, relative position, step progress.
NUM_FEATURES = 5
WEIGHTS_FILE = "unmasking_policy.pt"
CONFIG_FILE = "unmasking_policy.json"


def commitment_features(logits: Tensor, step: int, num_steps: int) -> Tensor:
    """Per-position features of one decoding step (ours; all independent of the drawn ``x0``).

    Args:
        logits: ``[B, Lg, V]`` float, the step's completion logits with ``[MASK]`` and suppressed
            tokens at ``-inf`` (:func:`flowalign.dllm.sampling.restrict_logits`).
        step: the global step ``s`` in ``0 .. num_steps - 1``.
        num_steps: ``S``.
    Returns:
        ``[B, Lg, NUM_FEATURES]`` float32: ``log p_max`` (the confidence of the argmax, LLaDA's
        low-confidence score at temperature 0), the entropy ``-sum p log p`` (nats), the margin
        ``p_1 - p_2`` of the two most likely tokens, the relative position ``i / Lg`` and the step
        progress ``s / S``.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)  # [B, Lg, V]
    p = logp.exp()
    top2 = p.topk(min(2, p.shape[-1]), dim=-1).values  # [B, Lg, 2]
    log_pmax = logp.max(dim=-1).values
    entropy = -(p * logp.masked_fill(p == 0, 0.0)).sum(dim=-1)
    margin = top2[..., 0] - (top2[..., 1] if top2.shape[-1] > 1 else 0.0)
    B, Lg = logits.shape[:2]
    pos = (torch.arange(Lg, device=logits.device, dtype=torch.float32) / Lg).expand(B, Lg)
    progress = torch.full((B, Lg), step / num_steps, device=logits.device, dtype=torch.float32)
    return torch.stack([log_pmax, entropy, margin, pos, progress], dim=-1)


def gumbel_top_k(scores: Tensor, candidates: Tensor, k: int, generator: Generator, greedy: bool = False) -> Tensor:
    """Ordered Plackett-Luce draw of ``k`` positions without replacement (Gumbel-top-k, Kool et al.
    2019 §3): the positions of the ``k`` largest ``u_i + G_i``, ``G_i ~ Gumbel(0, 1)`` iid, among
    the candidates, largest first; ``greedy``: the ``k`` largest ``u_i`` (the mode's ordering).

    Args:
        scores: ``[B, Lg]`` float scores ``u``.
        candidates: ``[B, Lg]`` bool, the positions that may be chosen (at least ``k`` per row).
        k: positions to choose.
        generator: ``torch.Generator`` or :class:`~flowalign.training.rng.RowStreams` (one uniform per position).
    Returns:
        ``[B, Lg]`` long rank of each position in the draw, ``0 .. k-1``, and ``-1`` where not chosen.
    """
    if int(candidates.sum(dim=1).min()) < k:
        raise ValueError(f"every row needs at least k={k} candidate positions, got {candidates.sum(dim=1).tolist()}")
    keys = scores.double()
    if not greedy:
        u = rand_rows(tuple(scores.shape), generator, device=scores.device, dtype=torch.float64).clamp(1e-300, 1.0 - 1e-16)
        keys = keys - torch.log(-torch.log(u))
    keys = torch.where(candidates, keys, torch.full_like(keys, -float("inf")))
    idx = keys.topk(k, dim=1).indices  # [B, k], sorted descending: the draw's order
    rank = torch.full(scores.shape, -1, dtype=torch.long, device=scores.device)
    order = torch.arange(k, device=scores.device).expand_as(idx)
    return rank.scatter_(1, idx, order)


def plackett_luce_log_prob(scores: Tensor, candidates: Tensor, rank: Tensor, check: bool = False) -> Tensor:
    """Exact log-probability of ordered draws under Plackett-Luce (Plackett 1975, Eq. 1):
    ``sum_j [u_{o_j} - logsumexp_{i in C, rank_i not in [0, j)} u_i]``.

    The set left before draw ``j`` is the candidates never drawn plus the drawn ones of rank
    ``>= j``, so every denominator is ``logaddexp(LSE_{C, undrawn} u, R_j)`` with ``R_j`` the
    reverse cumulative log-sum-exp of the drawn scores in draw order: no loop over ``j`` and no host
    sync. Excluded positions get a large finite negative score, not ``-inf``, so that the gradient
    stays finite where a row draws nothing.

    Args:
        scores: ``[..., Lg]`` float scores ``u``.
        candidates: ``[..., Lg]`` bool candidate set ``C``.
        rank: ``[..., Lg]`` long, ``j`` for the ``j``-th drawn position (``0 .. k-1``), ``-1`` elsewhere.
        check: raise if a drawn position is not a candidate (one host sync).
    Returns:
        ``[...]`` float32 log-probabilities (0 where nothing was drawn).
    """
    chosen = rank >= 0
    if check and bool((chosen & ~candidates).any()):
        raise ValueError("plackett_luce_log_prob: a drawn position is not a candidate")
    u = scores.float()
    Lg = u.shape[-1]
    order = torch.where(chosen, rank, torch.full_like(rank, Lg)).argsort(dim=-1, stable=True)  # drawn first, in order
    u_sorted, drawn = u.gather(-1, order), chosen.gather(-1, order)
    suffix = torch.logcumsumexp(u_sorted.masked_fill(~drawn, _EXCLUDED).flip(-1), dim=-1).flip(-1)  # R_j
    undrawn = torch.logsumexp(u.masked_fill(~(candidates & ~chosen), _EXCLUDED), dim=-1, keepdim=True)
    terms = u_sorted - torch.logaddexp(suffix, undrawn)
    return torch.where(drawn, terms, torch.zeros_like(terms)).sum(dim=-1)


#: the score of a position outside the set (finite: exp underflows to 0 and gradients stay finite).
_EXCLUDED = -1e30


@dataclass
class UnmaskingPolicyConfig:
    """What rebuilds an :class:`UnmaskingPolicy` (saved next to its weights)."""

    hidden: int = 32
    confidence_scale: float = 4.0


class UnmaskingPolicy(nn.Module):
    """The commitment head: ``u = a * log p_max + W2 tanh(W1 f + b1) + b2`` per position (ours;
    ``W2, b2`` start at zero and ``a`` at ``confidence_scale``).

    Args:
        hidden: width of the MLP's hidden layer.
        confidence_scale: initial ``a``.
    """

    def __init__(self, hidden: int = 32, confidence_scale: float = 4.0):
        super().__init__()
        self.config = UnmaskingPolicyConfig(hidden=int(hidden), confidence_scale=float(confidence_scale))
        self.confidence_scale = nn.Parameter(torch.tensor(float(confidence_scale)))
        self.mlp = nn.Sequential(nn.Linear(NUM_FEATURES, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, features: Tensor) -> Tensor:
        """``features [..., NUM_FEATURES]`` -> scores ``[...]`` float32."""
        f = features.float()
        return self.confidence_scale * f[..., 0] + self.mlp(f).squeeze(-1)

    def trajectory_log_prob(self, records: dict[str, Tensor]) -> Tensor:
        """Per-step commitment log-probs ``[B, S]`` of a recorded decode (``Trajectory.commit_records``:
        ``features [B, S, Lg, F]``, ``candidates [B, S, Lg]``, ``rank [B, S, Lg]``), differentiable in
        this head's parameters."""
        return plackett_luce_log_prob(self(records["features"]), records["candidates"], records["rank"])

    def save(self, path: str) -> None:
        """Write ``unmasking_policy.pt`` (weights) and ``unmasking_policy.json`` (its config) into ``path``."""
        os.makedirs(path, exist_ok=True)
        torch.save({k: v.detach().cpu() for k, v in self.state_dict().items()}, os.path.join(path, WEIGHTS_FILE))
        with open(os.path.join(path, CONFIG_FILE), "w") as fh:
            json.dump({"hidden": self.config.hidden, "confidence_scale": self.config.confidence_scale}, fh, indent=2)

    @classmethod
    def load(cls, path: str) -> UnmaskingPolicy:
        """The head saved by :meth:`save` in ``path``."""
        for name in (WEIGHTS_FILE, CONFIG_FILE):
            if not os.path.isfile(os.path.join(path, name)):
                raise FileNotFoundError(f"{os.path.join(path, name)} not found: not a folder written by UnmaskingPolicy.save")
        with open(os.path.join(path, CONFIG_FILE)) as fh:
            head = cls(**json.load(fh))
        head.load_state_dict(torch.load(os.path.join(path, WEIGHTS_FILE), weights_only=True))
        return head


class CommitmentPolicy:
    """The ``commit_policy`` of :func:`flowalign.dllm.sampling.generate`: at step ``s`` it scores
    the candidates with ``head`` and draws ``k_s`` of them (:func:`gumbel_top_k`), returning the
    selection and what :meth:`UnmaskingPolicy.trajectory_log_prob` needs to recompute its log-prob.

    Args:
        head: the :class:`UnmaskingPolicy`.
        greedy: commit the ``k_s`` highest-scoring candidates (evaluation) instead of sampling.
    """

    def __init__(self, head: UnmaskingPolicy, greedy: bool = False):
        self.head, self.greedy = head, greedy

    @torch.no_grad()
    def __call__(self, logits: Tensor, candidates: Tensor, k: int, step: int, num_steps: int,
                 generator: Generator) -> tuple[Tensor, dict[str, Tensor]]:
        """``logits [B, Lg, V]`` (restricted), ``candidates [B, Lg]`` bool -> ``(select [B, Lg] bool,
        {"features": [B, Lg, F], "candidates": [B, Lg], "rank": [B, Lg]})``."""
        features = commitment_features(logits, step, num_steps)
        scores = self.head(features.to(next(self.head.parameters()).device)).to(logits.device)
        rank = gumbel_top_k(scores, candidates, k, generator, greedy=self.greedy)
        return rank >= 0, {"features": features, "candidates": candidates.clone(), "rank": rank}
