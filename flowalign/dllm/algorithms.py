"""The pure pieces of the dLLM RL algorithms: log-likelihood estimators with explicit random draws,
the mapping of advantages onto the estimator's units, the clipped loss on units, MDPO's step rewards
and IGPO's hints. The methods themselves (their defaults, hooks and checks) are units of
:mod:`flowalign.algorithms` (``diffu_grpo.py``, ..., ``just_grpo.py``, on the hooks of
:mod:`flowalign.algorithms.dllm`); the loop is :mod:`flowalign.recipes.dllm_rl`.

Every algorithm is the GRPO objective (Shao et al. 2024, DeepSeekMath Eq. 3: group-relative
advantages, PPO's clipped ratio, optional KL to a reference) computed on different *units*:

==============  ===================  ===========  =======================================================
algorithm       estimator            unit         paper
==============  ===================  ===========  =======================================================
diffu_grpo      one_step             token        d1 (Zhao et al. 2025, arXiv:2504.12216, §3.2, Eq. 4-5)
coupled_grpo    coupled              token        DiffuCoder (Gong et al. 2025, arXiv:2506.20639, §4)
gdpo            elbo_semi_determ.    sequence     GDPO (Rojas et al. 2025, arXiv:2510.08554, §4)
mdpo            trajectory           step         MDPO (He et al. 2025, arXiv:2508.13148, §3)
cj_grpo         trajectory           step         CJ-GRPO (Yang et al. 2025, arXiv:2509.23924, §3.2)
igpo            one_step + hints     token        IGPO (Zhao et al. 2025, arXiv:2509.10396, §3)
just_grpo       trajectory (AR)      step (=tok)  JustGRPO (Ni et al. 2026, arXiv:2601.15165)
==============  ===================  ===========  =======================================================

Units: ``token`` -- one log-prob per completion token ``[N, Lg]``; ``sequence`` -- one per
sequence ``[N, 1]``; ``step`` -- one per denoising step of the rollout's trajectory ``[N, S]`` (the
log-prob of the tokens committed at that step, exact).

On-policy invariant (docs/ARCHITECTURE.md, invariant 2): a random estimator's draws (prompt masks, coupled masks, ELBO
times/masks) are drawn once per inner step from a named stream and used for *both* the old and the
new log-probs of that inner step, so the ratio at the first inner step is exactly 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
from torch import Tensor

from flowalign.advantages import group_advantages, joint_ids
from flowalign.losses import ppo_clip_loss

__all__ = [
    "ESTIMATOR_UNITS",
    "LogProbEstimator",
    "RolloutBatch",
    "all_wrong_groups",
    "hint_lengths",
    "k3_kl",
    "mdpo_step_advantages",
    "policy_loss",
    "predicted_completions",
    "select_draws",
    "trained_token_mask",
    "unit_advantages",
    "unit_weights",
]

LogitsFn = Callable[[Tensor, "Tensor | None"], Tensor]

#: estimator name -> the unit its log-probs are given in.
ESTIMATOR_UNITS: dict[str, str] = {
    "one_step": "token",
    "coupled": "token",
    "elbo_double_mc": "sequence",
    "elbo_semi_deterministic": "sequence",
    "trajectory": "step",
}


# ------------------------------------------------------------------------------------------------
# the rollouts of one iteration
# ------------------------------------------------------------------------------------------------
@dataclass
class RolloutBatch:
    """What the update needs about ``N`` rollouts (all tensors share the leading dim ``N``).

    Attributes:
        sequences: ``[N, P+Lg]`` long, prompt then completion.
        attention_mask: ``[N, P+Lg]`` long (0 on left padding).
        prompt_length: ``P``.
        trained: ``[N, Lg]`` bool, the completion tokens the loss trains (up to and including the
            first EOS; IGPO hint tokens excluded).
        trajectory: the :class:`~flowalign.dllm.sampling.Trajectory` of these rows (``step`` unit), or None.
    """

    sequences: Tensor
    attention_mask: Tensor
    prompt_length: int
    trained: Tensor
    trajectory: Any = None

    def __len__(self) -> int:
        return self.sequences.shape[0]

    def select(self, idx: Tensor) -> "RolloutBatch":
        """The rows ``idx`` (a ``[n]`` long tensor)."""
        traj = self.trajectory.select(idx) if self.trajectory is not None else None
        return RolloutBatch(self.sequences[idx], self.attention_mask[idx], self.prompt_length, self.trained[idx], traj)


def trained_token_mask(completion: Tensor, eos_id: int, fixed: Tensor | None = None) -> Tensor:
    """``[N, Lg]`` bool: tokens up to and including the first EOS (the tail of EOS fill is not
    trained, as d1's ``completion_mask``), minus ``fixed`` (IGPO hint) tokens.

    Args:
        completion: ``[N, Lg]`` long completion tokens.
        eos_id: the EOS token id.
        fixed: optional ``[N, Lg]`` bool, tokens that were given, not generated.
    """
    is_eos = completion == eos_id
    after_first_eos = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0  # strictly after the first EOS
    trained = ~after_first_eos
    if fixed is not None:
        trained = trained & ~fixed.bool()
    return trained


def unit_weights(unit: str, trained: Tensor, trajectory: Any = None) -> Tensor:
    """Per-unit loss weights, normalised so every sequence weighs 1 in total (GRPO Eq. 3's
    ``1/|o_i| sum_t``), 0 for units with nothing to train.

    Args:
        unit: ``token`` | ``sequence`` | ``step``.
        trained: ``[N, Lg]`` bool trained-token mask.
        trajectory: needed for ``step``: its ``commit_step [N, Lg]`` and ``num_steps``.

    Returns:
        ``[N, Lg]``, ``[N, 1]`` or ``[N, S]`` float32.
    """
    t = trained.float()
    if unit == "token":
        w = t
    elif unit == "sequence":
        w = (t.sum(dim=1, keepdim=True) > 0).float()
    elif unit == "step":
        if trajectory is None:
            raise ValueError("unit_weights: the 'step' unit needs the rollout trajectory")
        S = int(trajectory.num_steps)
        steps = trajectory.commit_step.long().clamp(min=0)
        # a step is trained when it committed at least one trained token
        w = torch.zeros(t.shape[0], S, dtype=torch.float32, device=t.device).scatter_add_(1, steps, t)
        w = (w > 0).float()
    else:
        raise ValueError(f"unknown unit {unit!r}; use token | sequence | step")
    return w / w.sum(dim=1, keepdim=True).clamp_min(1.0)


def unit_advantages(advantages: Tensor, shape: tuple[int, int]) -> Tensor:
    """Advantages on the units: ``[N]`` sequence advantages broadcast over the ``U`` units, or
    ``[N, U]`` per-unit advantages (MDPO's per-step) passed through. Returns ``[N, U]`` float32."""
    if advantages.dim() == 1:
        return advantages.float()[:, None].expand(shape).contiguous()
    if tuple(advantages.shape) != tuple(shape):
        raise ValueError(f"per-unit advantages have shape {tuple(advantages.shape)}, expected {tuple(shape)}")
    return advantages.float()


def k3_kl(log_prob: Tensor, ref_log_prob: Tensor) -> Tensor:
    """Schulman's k3 estimator of KL(pi_theta || pi_ref) used by GRPO (DeepSeekMath Eq. 4):
    ``exp(ref - logp) - (ref - logp) - 1`` (>= 0, unbiased for samples from pi_theta)."""
    d = ref_log_prob.detach().float() - log_prob.float()
    return torch.exp(d) - d - 1.0


def policy_loss(
    log_prob: Tensor,
    log_prob_old: Tensor,
    advantages: Tensor,
    weights: Tensor,
    *,
    clip_range: float,
    ref_log_prob: Tensor | None = None,
    kl_beta: float = 0.0,
    units: Tensor | None = None,
    check: bool = True,
) -> tuple[Tensor, dict[str, Tensor], Tensor]:
    """The clipped GRPO loss on units: :func:`flowalign.losses.ppo_clip_loss` over the units with
    positive weight (the weights mask hint tokens, post-EOS tokens and idle steps out of it).

    Args:
        log_prob, log_prob_old, advantages, weights: ``[n, U]``.
        ref_log_prob: ``[n, U]`` reference log-probs for the k3 KL (needed when ``kl_beta > 0``).
        units: ``[m]`` long, the flat indices (into the ``n * U`` units, row-major) of the units
            with positive weight; ``None`` finds them from ``weights`` (a data-dependent size: a
            host sync). A training loop that reuses the same weights finds them once and passes them.
        check: ``ppo_clip_loss``'s value checks (host syncs); a training loop that checks its
            inputs once and the loss with the optimizer step passes ``False``.

    Returns:
        ``(loss, metrics, weight_sum)``: ``ppo_clip_loss``'s loss and metrics (0-dim tensors) and
        the 0-dim sum of the selected weights; the loss is the weighted *mean* over units, so a
        caller accumulating micro-batches scales it by ``weight_sum / total weight``.

    Raises:
        ValueError: no unit has a positive weight (nothing to train).
    """
    if units is None:
        units = (weights > 0).reshape(-1).nonzero().squeeze(1)
    if units.shape[0] == 0:
        raise ValueError("policy_loss: no unit has a positive weight (nothing to train)")

    def pick(t: Tensor) -> Tensor:
        return t.reshape(-1)[units]

    lp, w = pick(log_prob), pick(weights)
    kl = k3_kl(lp, pick(ref_log_prob)) if ref_log_prob is not None else None
    loss, metrics = ppo_clip_loss(lp, pick(log_prob_old), pick(advantages), clip_range=clip_range,
                                  weights=w, kl=kl, kl_beta=kl_beta, check=check)
    return loss, metrics, w.sum()


# ------------------------------------------------------------------------------------------------
# estimators with explicit draws
# ------------------------------------------------------------------------------------------------
class LogProbEstimator:
    """One log-likelihood estimator of ``flowalign.dllm.logprob``, split into *draw* (the random
    masks / times, from an explicit generator) and *evaluate* (a deterministic function of the
    weights and the draws), so old and new log-probs share their draws.

    Args:
        name: a key of :data:`ESTIMATOR_UNITS`.
        mask_id: the model's mask token id.
        p_mask_prompt: ``one_step``: prompt-token masking probability.
        num_mc, masks_per_t: ELBO estimators' time points and masks per time point.
        temperature: ``trajectory``: the temperature the rollouts were sampled at.
    """

    def __init__(self, name: str, *, mask_id: int, p_mask_prompt: float = 0.15, num_mc: int = 2,
                 masks_per_t: int = 1, temperature: float = 1.0):
        if name not in ESTIMATOR_UNITS:
            raise ValueError(f"unknown estimator {name!r}; available: {sorted(ESTIMATOR_UNITS)}")
        self.name, self.unit, self.mask_id = name, ESTIMATOR_UNITS[name], mask_id
        self.p_mask_prompt, self.num_mc, self.masks_per_t, self.temperature = p_mask_prompt, num_mc, masks_per_t, temperature

    @property
    def deterministic(self) -> bool:
        """True when the estimate has no random draws (the same old log-probs serve every inner step)."""
        return self.name == "trajectory"

    def draw(self, batch: RolloutBatch, generator: torch.Generator) -> Any:
        """The random draws of every row of ``batch``: a :class:`flowalign.dllm.logprob.MaskSet`
        (rows aligned with the batch), or ``None`` for the deterministic ``trajectory`` estimator."""
        from flowalign.dllm import logprob as lp

        N, L = batch.sequences.shape
        P, dev = batch.prompt_length, batch.sequences.device
        if self.name == "one_step":
            return lp.draw_one_step_masks(batch.attention_mask, P, L - P, self.p_mask_prompt, generator)
        if self.name == "coupled":
            return lp.draw_coupled_masks(N, L - P, generator, device=dev)
        if self.name == "elbo_double_mc":
            return lp.draw_double_mc_masks(N, L - P, self.num_mc, self.masks_per_t, generator, device=dev)
        if self.name == "elbo_semi_deterministic":
            return lp.draw_semi_deterministic_masks(N, L - P, self.num_mc, self.masks_per_t, generator, device=dev)
        return None

    def __call__(self, logits_fn: LogitsFn, batch: RolloutBatch, draws: Any) -> Tensor:
        """Log-probs ``[N, U]`` of ``batch`` under ``logits_fn`` with ``draws`` (rows aligned).

        ``token``: the per-token estimates ``[N, Lg]``; ``sequence``: their sum over the trained
        tokens ``[N, 1]`` (the ELBO of the answer up to its EOS); ``step``: exact per-step
        log-probs ``[N, S]`` at the rollout temperature."""
        from flowalign.dllm import logprob as lp

        if self.name == "trajectory":
            return lp.trajectory_logprob(logits_fn, batch.trajectory, self.mask_id, temperature=self.temperature)
        per_token = lp.masked_logprob(logits_fn, batch.sequences, batch.attention_mask, batch.prompt_length,
                                      self.mask_id, draws)
        if self.unit == "sequence":
            return (per_token * batch.trained.to(per_token.dtype)).sum(dim=1, keepdim=True)
        return per_token


def select_draws(draws: Any, idx: Tensor) -> Any:
    """The rows ``idx`` of a MaskSet (``None`` stays ``None``)."""
    if draws is None:
        return None
    return replace(draws, completion=draws.completion[idx], t=draws.t[idx], weight=draws.weight[idx],
                   prompt=None if draws.prompt is None else draws.prompt[idx])


# ------------------------------------------------------------------------------------------------
# MDPO: rewards of the intermediate predictions
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def predicted_completions(logits_fn: LogitsFn, trajectory: Any, mask_id: int) -> Tensor:
    """The greedy clean prediction x0_hat after every denoising step (MDPO §3 scores these).

    After step ``s`` the state is ``trajectory.state_at(s + 1)``; its masked completion positions
    are filled with the model's argmax there (the mask token itself excluded). After the last step
    nothing is masked and the prediction is the final completion.

    Returns:
        ``[N, S, Lg]`` long completion tokens.
    """
    S, P = int(trajectory.num_steps), int(trajectory.prompt_length)
    N, L = trajectory.sequences.shape
    out = torch.empty(N, S, L - P, dtype=torch.long, device=trajectory.sequences.device)
    out[:, S - 1] = trajectory.sequences[:, P:]
    if S > 1:
        states = torch.stack([trajectory.state_at(s + 1, mask_id) for s in range(S - 1)], dim=1)  # [N, S-1, L]
        flat = states.reshape(N * (S - 1), L)
        am = trajectory.attention_mask.repeat_interleave(S - 1, dim=0)
        logits = logits_fn(flat, am)[:, P:].float()
        logits[..., mask_id] = -math.inf
        filled = torch.where(flat[:, P:] == mask_id, logits.argmax(dim=-1), flat[:, P:])
        out[:, : S - 1] = filled.reshape(N, S - 1, L - P)
    return out


def mdpo_step_advantages(step_rewards: Tensor, group_ids: Tensor, *, std_mode: str = "group",
                         clip: float | None = None) -> Tensor:
    """Per-step advantages ``[N, S]`` from per-step rewards ``[N, S]``: each step's reward is
    normalised within its (prompt group, step) cell -- GRPO's group-relative advantage applied at
    every denoising step (MDPO §3, intermediate rewards), by :func:`group_advantages` on
    :func:`joint_ids`. A cell whose rewards coincide gets 0."""
    N, S = step_rewards.shape
    g = group_ids.long()[:, None].expand(N, S).reshape(-1)
    s = torch.arange(S, device=step_rewards.device)[None, :].expand(N, S).reshape(-1)
    cells = joint_ids(g, s.to(g.device))
    return group_advantages(step_rewards.reshape(-1), cells, std_mode=std_mode, clip=clip).reshape(N, S)


# ------------------------------------------------------------------------------------------------
# IGPO: inpainting hints for all-wrong groups
# ------------------------------------------------------------------------------------------------
def all_wrong_groups(rewards: Tensor, group_ids: Tensor, threshold: float) -> Tensor:
    """``[num_groups]`` bool (groups indexed 0..max id): no rollout of the group reaches ``threshold``
    -- the zero-advantage case IGPO (§3) repairs with hints."""
    num_groups = int(group_ids.max()) + 1
    correct = (rewards >= threshold).long()
    any_correct = torch.zeros(num_groups, dtype=torch.long, device=rewards.device).index_add_(0, group_ids.long(), correct)
    present = torch.zeros(num_groups, dtype=torch.long, device=rewards.device).index_add_(0, group_ids.long(), torch.ones_like(correct))
    return (any_correct == 0) & (present > 0)


def hint_lengths(reference_lengths: Tensor, fraction: tuple[float, float], gen_length: int,
                 generator: torch.Generator) -> Tensor:
    """IGPO's partial hints: for each reference of ``n`` tokens, a prefix of
    ``round(u * n)`` tokens with ``u ~ U[fraction]``, kept in ``[1, min(n, gen_length - 1)]`` so that
    at least one token is left to generate. Returns ``[K]`` long (0 where ``n == 0``: no hint)."""
    lo, hi = fraction
    u = lo + (hi - lo) * torch.rand(reference_lengths.shape[0], generator=generator)
    n = reference_lengths.long()
    h = torch.round(u * n.float()).long()
    h = torch.minimum(torch.clamp(h, min=1), torch.clamp(torch.minimum(n, torch.full_like(n, gen_length - 1)), min=0))
    return torch.where(n > 0, h, torch.zeros_like(h))
