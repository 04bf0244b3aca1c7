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
log-prob of the tokens committed at that step, exact); ``step_token`` -- one per (denoising step,
completion position) ``[N, S * Lg]`` (MDPO's reference objective, :class:`MDPOMaskedTokenEstimator`;
CJ-GRPO's, :class:`CJTokenEstimator`, its default ``algorithm.cj_grpo.step_ratio: token``).

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
from flowalign.training.rng import Generator

__all__ = [
    "ESTIMATOR_UNITS",
    "LOSS_NORMALIZATIONS",
    "LogProbEstimator",
    "MDPOMaskedTokenEstimator",
    "MDPO_STEP_OBJECTIVES",
    "RolloutBatch",
    "CJTokenEstimator",
    "all_wrong_groups",
    "cj_step_token_weights",
    "choose_replacements",
    "gspo_log_probs",
    "hint_entropy_keep",
    "hint_lengths",
    "k3_kl",
    "mdpo_masked_token_weights",
    "mdpo_step_advantages",
    "mdpo_step_scores",
    "mdpo_train_steps",
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
    "elbo_l_form": "sequence",
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


#: ``algorithm.loss_normalization`` choices (:func:`unit_weights`).
LOSS_NORMALIZATIONS = ("sequence", "token", "window")


def unit_weights(unit: str, trained: Tensor, trajectory: Any = None, normalization: str = "sequence") -> Tensor:
    """Per-unit loss weights, 0 for units with nothing to train. The loss is ``sum w l / sum w``
    over the batch (:func:`policy_loss`, accumulated over micro-batches by the recipe), so:

    * ``normalization="sequence"``: every sequence weighs 1 in total, its units ``1/|o_i|`` each
      (GRPO, Shao et al. 2024 Eq. 3: ``1/G sum_i 1/|o_i| sum_t``);
    * ``normalization="token"``: every trained unit weighs 1, i.e. the loss is the sum over the
      batch's units divided by their count -- d1's ``(per_token_loss * completion_mask).sum() /
      completion_mask.sum()`` (dllm-reasoning/d1 @ 837888f, ``diffu-grpo/diffu_grpo_trainer.py``
      L121) and DiffuCoder's (apple/ml-diffucoder @ f735e01, ``src/open_r1/coupled_grpo.py`` L224).
      For the ``sequence`` unit both forms coincide.
    * ``normalization="window"``: every unit of the completion window weighs 1 whether trained or not
      (EOS fill included; ``trained`` is ignored), so the loss is the sum over the whole window
      divided by ``U x rows``. JustGRPO (duterscmy/JustGRPO @ 1dfe9fa, ``grpo.py`` L262-303) sums
      the clipped loss of all ``gen_length`` positions of every rollout, scaled by the constant
      ``1 / (gen_length x valid_samples)`` with ``valid_samples`` the rollouts whose advantage is
      nonzero (``train_gsm8k.justgrpo.py`` L177-179); rows with a zero advantage are taken out of the
      count by :meth:`flowalign.algorithms.dllm.DLLMAlgorithm.loss_weights`.

    Args:
        unit: ``token`` | ``sequence`` | ``step``.
        trained: ``[N, Lg]`` bool trained-token mask.
        trajectory: needed for ``step``: its ``commit_step [N, Lg]`` and ``num_steps``.
        normalization: ``sequence`` | ``token`` | ``window`` (:data:`LOSS_NORMALIZATIONS`).

    Returns:
        ``[N, Lg]``, ``[N, 1]`` or ``[N, S]`` float32.
    """
    t = trained.float()
    if normalization == "window":  # every window unit, trained or not (JustGRPO grpo.py L269-303)
        if unit == "token":
            return torch.ones_like(t)
        if unit == "sequence":
            return torch.ones(t.shape[0], 1, dtype=torch.float32, device=t.device)
        if unit == "step":
            if trajectory is None:
                raise ValueError("unit_weights: the 'step' unit needs the rollout trajectory")
            return torch.ones(t.shape[0], int(trajectory.num_steps), dtype=torch.float32, device=t.device)
        raise ValueError(f"unknown unit {unit!r}; use token | sequence | step")
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
    if normalization == "token":
        return w
    if normalization != "sequence":
        raise ValueError(f"unknown loss normalization {normalization!r}; use {' | '.join(LOSS_NORMALIZATIONS)}")
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
    clip_range_high: float | None = None,
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
        clip_range_high: asymmetric clipping: the ratio is clipped to
            ``[1 - clip_range, 1 + clip_range_high]`` (TRL's ``epsilon_low`` / ``epsilon_high``,
            which DiffuCoder's trainer uses: apple/ml-diffucoder @ f735e01,
            ``src/open_r1/coupled_grpo.py`` L216); ``None`` (default) = symmetric ``clip_range``.

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
    if clip_range_high is None or clip_range_high == clip_range:
        loss, metrics = ppo_clip_loss(lp, pick(log_prob_old), pick(advantages), clip_range=clip_range,
                                      weights=w, kl=kl, kl_beta=kl_beta, check=check)
        return loss, metrics, w.sum()
    if not clip_range_high > 0:
        raise ValueError(f"clip_range_high must be > 0 or None, got {clip_range_high!r}")
    # ppo_clip_loss's checks and metrics, then the asymmetric surrogate on the same inputs
    _, metrics = ppo_clip_loss(lp.detach(), pick(log_prob_old), pick(advantages), clip_range=clip_range,
                               weights=w, kl=None if kl is None else kl.detach(), kl_beta=kl_beta, check=check)
    adv = pick(advantages).detach().float()
    ratio = torch.exp(lp.float() - pick(log_prob_old).detach().float())
    # -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A): PPO Eq. 7 with DiffuCoder's/TRL's two bounds (L216-219)
    per_unit = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range_high))
    wf = w.float()
    policy = (per_unit * wf).sum() / wf.sum()
    loss = policy + kl_beta * (kl.float() * wf).sum() / wf.sum() if (kl is not None and kl_beta > 0) else policy
    with torch.no_grad():
        metrics["loss"], metrics["policy_loss"] = loss.detach(), policy.detach()
        metrics["clip_frac"] = ((ratio < 1.0 - clip_range) | (ratio > 1.0 + clip_range_high)).float().mean()
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
                 masks_per_t: int = 1, temperature: float = 1.0, cfg_scale: float = 0.0):
        if name not in ESTIMATOR_UNITS:
            raise ValueError(f"unknown estimator {name!r}; available: {sorted(ESTIMATOR_UNITS)}")
        if not cfg_scale >= 0:
            raise ValueError(f"cfg_scale must be >= 0, got {cfg_scale!r}")
        self.name, self.unit, self.mask_id = name, ESTIMATOR_UNITS[name], mask_id
        self.p_mask_prompt, self.num_mc, self.masks_per_t, self.temperature = p_mask_prompt, num_mc, masks_per_t, temperature
        self.cfg_scale = cfg_scale

    def guided(self, logits_fn: LogitsFn, batch: RolloutBatch) -> LogitsFn:
        """``logits_fn`` with the likelihood's classifier-free guidance (``cfg_scale``; d1 scores
        its log-probs through the same ``get_logits`` as its decode, ``diffu_grpo_trainer.py``
        L269-283). The ``trajectory`` estimator uses the decode's own scale instead
        (``Trajectory.cfg_scale``)."""
        from flowalign.dllm.sampling import guided_logits_fn

        return guided_logits_fn(logits_fn, batch.prompt_length, self.mask_id, self.cfg_scale)

    @property
    def deterministic(self) -> bool:
        """True when the estimate has no random draws (the same old log-probs serve every inner step)."""
        return self.name == "trajectory"

    def draw(self, batch: RolloutBatch, generator: Generator) -> Any:
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
        if self.name == "elbo_l_form":  # num_mc x masks_per_t stratified draws per sequence
            return lp.draw_l_form_masks(N, L - P, self.num_mc * self.masks_per_t, generator, device=dev)
        return None

    def __call__(self, logits_fn: LogitsFn, batch: RolloutBatch, draws: Any) -> Tensor:
        """Log-probs ``[N, U]`` of ``batch`` under ``logits_fn`` with ``draws`` (rows aligned).

        ``token``: the per-token estimates ``[N, Lg]``; ``sequence``: their sum over the trained
        tokens ``[N, 1]`` (the ELBO of the answer up to its EOS); ``step``: exact per-step
        log-probs ``[N, S]`` at the rollout temperature."""
        from flowalign.dllm import logprob as lp

        if self.name == "trajectory":
            return lp.trajectory_logprob(logits_fn, batch.trajectory, self.mask_id, temperature=self.temperature)
        per_token = lp.masked_logprob(self.guided(logits_fn, batch), batch.sequences, batch.attention_mask,
                                      batch.prompt_length, self.mask_id, draws)
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


MDPO_STEP_SCORES = ("change_plus_future", "reward")


def mdpo_step_scores(step_rewards: Tensor, form: str = "change_plus_future") -> Tensor:
    """The per-step scores ``[N, S]`` MDPO normalises into advantages, from the rewards ``r_s`` of
    the intermediate answers ``[N, S]``.

    ``"change_plus_future"`` -- the MDPO reference's "adv-v4" (autonomousvision/mdpo @ e6ae439,
    ``src/open_r1/mdpo/mdpo_trainer.py`` L849-851): the reward change the step made plus the mean
    reward of the answers after it, ``(r_s - r_{s-1}) + 1 + mean_{k > s} r_k`` with ``r_{-1} = 0``
    and ``mean_{k > S-1} := r_{S-1}`` (the ``+ 1`` cancels in the group normalisation);
    ``"reward"`` -- the step's own reward ``r_s``."""
    if form == "reward":
        return step_rewards.float()
    if form != "change_plus_future":
        raise ValueError(f"unknown MDPO step score {form!r}; use {' | '.join(MDPO_STEP_SCORES)}")
    r = step_rewards.float()
    N, S = r.shape
    change = r - torch.cat([torch.zeros_like(r[:, :1]), r[:, :-1]], dim=1)
    tail = r.flip(1).cumsum(1).flip(1)  # tail[:, s] = sum_{k >= s} r_k
    counts = torch.arange(S - 1, 0, -1, device=r.device, dtype=r.dtype)  # S-1-s for s < S-1
    future = torch.cat([tail[:, 1:] / counts, r[:, -1:]], dim=1)
    return change + 1.0 + future


def mdpo_step_advantages(step_rewards: Tensor, group_ids: Tensor, *, std_mode: str = "group",
                         clip: float | None = None, form: str = "reward", unbiased: bool = False) -> Tensor:
    """Per-step advantages ``[N, S]`` from per-step rewards ``[N, S]``: each step's score
    (:func:`mdpo_step_scores` of ``form``) is normalised within its (prompt group, step) cell --
    GRPO's group-relative advantage applied at every denoising step (MDPO §3; the reference
    ``mdpo_trainer.py`` L852-858: mean and unbiased ``std`` over the group per step, ``+ 1e-4``),
    by :func:`group_advantages` on :func:`joint_ids`. A cell whose scores coincide gets 0."""
    scores = mdpo_step_scores(step_rewards, form)
    N, S = scores.shape
    g = group_ids.long()[:, None].expand(N, S).reshape(-1)
    s = torch.arange(S, device=scores.device)[None, :].expand(N, S).reshape(-1)
    cells = joint_ids(g, s.to(g.device))
    return group_advantages(scores.reshape(-1), cells, std_mode=std_mode, clip=clip, unbiased=unbiased).reshape(N, S)


def mdpo_train_steps(advantages: Tensor, weights: Tensor, k: int) -> Tensor:
    """``[N, S]`` bool: the ``k`` steps of each row with the largest ``|advantage|`` among its
    steps with positive weight (all of them when it has ``<= k``; ties to the earlier step).

    The MDPO reference trains ``sample_train_steps`` steps per rollout (``mdpo_trainer.py`` L922:
    ``topk(|advantages|.sum(dim=0), k)`` over its per-device batch, which its batch-1 decoder makes
    one rollout)."""
    N, S = advantages.shape
    score = torch.where(weights > 0, advantages.abs().float(), torch.full_like(advantages, -1.0, dtype=torch.float32))
    order = torch.sort(score, dim=1, descending=True, stable=True).indices[:, : min(k, S)]
    chosen = torch.zeros(N, S, dtype=torch.bool, device=advantages.device).scatter_(1, order, True)
    return chosen & (weights > 0)


#: ``algorithm.mdpo.step_objective`` choices (:class:`MDPOMaskedTokenEstimator`).
MDPO_STEP_OBJECTIVES = ("masked_tokens", "committed")


class StepTokenEstimator(LogProbEstimator):
    """An estimator of per-(step, position) log-probs of a recorded decode (unit ``step_token``,
    ``[N, S * Lg]``, unit ``u = s * Lg + k``), computed by the :mod:`flowalign.dllm.logprob` function
    named ``logprob_fn`` (``[N, S, Lg]``); deterministic, on the ``trajectory`` estimator only
    (``option`` names the setting that chose it)."""

    option: str = ""
    logprob_fn: str = ""

    def __init__(self, name: str, **kwargs: Any):
        super().__init__(name, **kwargs)
        if name != "trajectory":
            raise ValueError(f"{self.option} needs algorithm.estimator='trajectory', got {name!r}")
        self.unit = "step_token"

    def __call__(self, logits_fn: LogitsFn, batch: RolloutBatch, draws: Any) -> Tensor:
        from flowalign.dllm import logprob as lp

        out = getattr(lp, self.logprob_fn)(logits_fn, batch.trajectory, self.mask_id, temperature=self.temperature)
        return out.reshape(out.shape[0], -1)


class MDPOMaskedTokenEstimator(StepTokenEstimator):
    """MDPO's per-step objective as the reference trains it (autonomousvision/mdpo @ e6ae439,
    ``src/open_r1/mdpo/mdpo_trainer.py`` ``compute_loss`` L1487-1545): at step ``s`` the log-prob of
    the decoder's draw ``x0`` at **every position masked before the step**, given that state
    (:func:`flowalign.dllm.logprob.masked_step_logprob`), one unit per (step, position): log-probs
    ``[N, S * Lg]``, unit ``u = s * Lg + k``, so the clipped loss forms **one ratio per token**
    (L1517-1521: ``coef_1 = exp(logp - old)``, clipped at ``1 +- epsilon``, ``-min(coef_1 A, coef_2 A)``).
    Its loss weights are :func:`mdpo_masked_token_weights`. Deterministic (no draws): old and new
    log-probs are the same function, the first inner step's ratio is exactly 1. Needs the rollouts'
    recorded predictions (``Trajectory.predictions``)."""

    option = "algorithm.mdpo.step_objective='masked_tokens'"
    logprob_fn = "masked_step_logprob"


def mdpo_masked_token_weights(log_prob_old: Tensor, trajectory: Any, eps: float = 1e-4) -> Tensor:
    """Loss weights ``[N, S * Lg]`` of :class:`MDPOMaskedTokenEstimator`'s units, the MDPO
    reference's: at step ``s`` with ``m_s`` positions masked before it, a masked position ``k`` weighs

        ``w[s, k] = c[s, k] * lambda_s / (m_s + eps)``,  ``lambda_s = Lg / (m_s + eps)``,  ``eps = 1e-4``

    (``compute_loss`` L1510-1512 and L1532: ``lambda_t = max_completion_length / (mask count +
    1e-4)`` multiplies every token's clipped loss, and the step's micro-batch -- one rollout,
    ``per_device_train_batch_size = 1`` -- sums ``loss * mask * conf`` and divides by ``mask count +
    1e-4``), 0 at the positions already committed. ``c[s, k]`` is the sampling confidence of the draw,
    the probability ``softmax(logits / T)[x0]`` it was drawn with (``src/mdlm_generation_utils.py``
    L75-79, recorded without grad, L85), here ``exp`` of the *old* log-prob (computed before any
    update, at the rollout temperature: the same value), detached. Each trained step thus weighs
    ``Lg * mean_k c / m_s`` in total: late steps, with few masked positions, weigh more."""
    S = int(trajectory.num_steps)
    N, Lg = trajectory.commit_step.shape
    steps = torch.arange(S, device=trajectory.commit_step.device).view(1, S, 1)
    masked = trajectory.commit_step.unsqueeze(1) >= steps  # [N, S, Lg]: masked before step s
    m = masked.sum(dim=-1, keepdim=True).to(torch.float32)
    conf = torch.exp(log_prob_old.detach().float()).reshape(N, S, Lg).to(masked.device)
    w = torch.where(masked, conf * (Lg / (m + eps)) / (m + eps), torch.zeros_like(conf))
    return w.reshape(N, S * Lg)


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


def choose_replacements(correct: Tensor, cap: int, generator: torch.Generator) -> Tensor:
    """Which hinted re-decodes of one all-wrong group replace original rollouts: a uniformly random
    subset of ``min(#correct, cap)`` of the correct ones (``[k]`` bool ``correct``), in random order.

    IGPO reference (facebookresearch/igpo @ e85eaea, ``trainer_igpo.py`` L1564-1586): per group the
    correct inpainted samples are found, ``num_to_replace = min(num_correct, max_replacements)``,
    and when there are more, ``randperm(num_correct)[:num_to_replace]`` picks them. Returns ``[m]``
    long indices into the ``k`` re-decodes (empty when none is correct)."""
    if cap < 1:
        raise ValueError(f"cap must be >= 1, got {cap}")
    idx = correct.bool().nonzero().squeeze(1)
    if idx.numel() > cap:
        idx = idx[torch.randperm(idx.numel(), generator=generator)[:cap].to(idx.device)]
    return idx


def hint_entropy_keep(entropy: Tensor, candidates: Tensor, top: float) -> Tensor:
    """``[N, Lg]`` bool: per row, the hint tokens trained under IGPO's entropy filter -- the
    ``max(1, floor(top * n))`` highest-entropy ones among the row's ``n`` candidate hint tokens
    (``candidates [N, Lg]`` bool; none when ``n == 0`` or ``top == 0``; ties to the earlier position).

    IGPO reference (facebookresearch/igpo @ e85eaea, ``trainer_igpo.py`` L1763-1823): for every
    row, the positions both masked and inpainted are the candidates, ``top_k = max(1,
    int(num_candidates * entropy_clipping_ratio_inpaint))`` of them with the largest entropy are
    kept in the loss mask, the other inpainted ones are dropped; generated tokens are untouched.
    """
    if not 0.0 <= top <= 1.0:
        raise ValueError(f"top must lie in [0, 1], got {top!r}")
    candidates = candidates.bool()
    if top == 0.0:
        return torch.zeros_like(candidates)
    n = candidates.sum(dim=1)
    k = torch.where(n > 0, torch.clamp(torch.floor(n.double() * top).long(), min=1), torch.zeros_like(n))
    score = torch.where(candidates, entropy.float(), torch.full_like(entropy, -math.inf, dtype=torch.float32))
    order = torch.sort(score, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return candidates & (rank < k[:, None])


def gspo_log_probs(log_prob: Tensor, log_prob_old: Tensor, ref_log_prob: Tensor | None, weights: Tensor
                   ) -> tuple[Tensor, Tensor | None]:
    """GSPO's sequence-level importance ratio as per-unit log-probs for :func:`policy_loss`.

    GSPO (Zheng et al. 2025, arXiv:2507.18071, Eq. 7 and the token form of Eq. 10):
    ``s_i = exp(mean_t (log pi(y_t) - log pi_old(y_t)))`` over the sequence's units, and
    ``s_{i,t} = sg[s_i] * pi(y_t) / sg[pi(y_t)]``. Returned: ``log_prob' = log_prob +
    sg[log_prob_old + log s_i - log_prob]``, so ``exp(log_prob' - log_prob_old) = s_{i,t}`` in value
    (``s_i`` on every unit, hence clipped per sequence) with the gradient of ``log_prob``; the mean
    runs over the units with positive ``weights`` (``[n, U]``). The reference log-probs are shifted
    by the same constant, so the k3 KL keeps its value and gradient. IGPO reference
    (facebookresearch/igpo @ e85eaea, ``trainer_igpo.py`` L651-665, ``use_gspo``) uses this ratio.
    """
    trained = (weights > 0).to(log_prob.dtype)
    delta = (log_prob.detach() - log_prob_old) * trained
    log_s = delta.sum(dim=1, keepdim=True) / trained.sum(dim=1, keepdim=True).clamp_min(1.0)  # [n, 1]
    shift = (log_prob_old + log_s - log_prob).detach()
    return log_prob + shift, (ref_log_prob + shift if ref_log_prob is not None else None)


# ------------------------------------------------------------------------------------------------
# CJ-GRPO: one ratio per committed token, each step normalised by its token count
# ------------------------------------------------------------------------------------------------
class CJTokenEstimator(StepTokenEstimator):
    """CJ-GRPO's objective as the reference trains it (yjyddq/EOSER-ASS-RL @ 5affb4e,
    ``cj-grpo/cj_grpo_trainer_eoser_ass.py`` ``compute_loss`` L109-138): at every step ``i`` the
    log-prob of each token the step committed, given the state before it
    (:func:`flowalign.dllm.logprob.trajectory_token_logprob`), **one ratio per token** (L125-129:
    ``coef_1 = exp(logp - old)`` clipped at ``1 +- epsilon``, ``-min(coef_1 A, coef_2 A)``, and the k3 KL
    per token, L114-115). Units: (step, position), log-probs ``[N, S * Lg]``, unit ``u = s * Lg + k``,
    0 where ``k`` was not committed at ``s``; the loss weights are :func:`cj_step_token_weights`.
    Deterministic (no draws): the old and new log-probs are one function, so the first inner step's
    ratio is exactly 1."""

    option = "algorithm.cj_grpo.step_ratio='token'"
    logprob_fn = "trajectory_token_logprob"


def cj_step_token_weights(trajectory: Any, trained: Tensor | None = None) -> Tensor:
    """Loss weights ``[N, S * Lg]`` of :class:`CJTokenEstimator`'s units, the CJ-GRPO reference's:

        ``loss = (1/S) sum_s [ sum_{b, k in C_s(b)} l[b, s, k] / sum_b |C_s(b)| ]``

    (``compute_loss`` L138: ``(per_token_loss * unmask_positions).sum() / unmask_positions.sum() /
    steps``, summed over the steps), ``C_s(b)`` the positions of row ``b`` committed at step ``s``
    (``unmask_positions = mask_index & (x != mask_id)``, L487). So a unit committed at ``s`` weighs
    ``1 / n_s`` with ``n_s`` the batch's count of units committed at ``s``, and every step with a
    unit weighs 1 in total: with the loss ``sum w l / sum w`` (:func:`policy_loss`) that is the mean
    over steps of each step's token mean. ``trained`` (``[N, Lg]`` bool, optional) restricts the
    units to those positions (e.g. up to the first EOS); ``None`` trains every committed position,
    the EOS fill included, as the reference (which never applies its ``completion_mask`` in the loss).
    A step with no unit in the batch is left out of the mean (the reference's would be 0/0; its
    ascending schedule commits at least one token per step)."""
    S = int(trajectory.num_steps)
    N, Lg = trajectory.commit_step.shape
    steps = torch.arange(S, device=trajectory.commit_step.device).view(1, S, 1)
    units = trajectory.commit_step.unsqueeze(1) == steps  # [N, S, Lg]
    if trained is not None:
        units = units & trained.bool().to(units.device).unsqueeze(1)
    u = units.to(torch.float32)
    n_s = u.sum(dim=(0, 2), keepdim=True)  # [1, S, 1]: the step's units over the batch
    return (u / n_s.clamp_min(1.0)).reshape(N, S * Lg)
