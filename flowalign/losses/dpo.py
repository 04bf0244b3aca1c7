"""Online preference optimisation of diffusion / flow models: the preference pairs and two DPO losses.

* :func:`preference_pairs` -- the pairs of one rollout: in each prompt's group the sample with the highest
  value is preferred to the one with the lowest (a group whose values all tie gives no pair).
* :func:`d3po_loss` -- D3PO (Yang et al., CVPR 2024, "Using Human Feedback to Fine-tune Diffusion Models
  without Any Reward Model", arXiv:2311.13231, its per-step DPO objective): DPO on the per-step
  log-probs of the preferred and dispreferred trajectories against a frozen reference, with the
  authors' clipped ratio (yk7333/d3po @ 40d3175, ``scripts/rm/train_d3po.py`` lines 595-599).
* :func:`diffusion_dpo_loss` -- Diffusion-DPO (Wallace et al. 2023, "Diffusion Model Alignment Using
  Direct Preference Optimization", arXiv:2311.12908, Eq. 14) on re-noised pairs, in the flow convention
  (velocity error instead of noise error; ours), as the authors' code computes it
  (SalesforceAIResearch/DiffusionDPO @ 5233e75, ``train.py`` lines 1121-1147).

Squared errors and log-probs are means over latent dimensions, as both references compute them
(``.mean(dim=[1, 2, 3])``; DDPO's ``ddim_step_with_logprob`` averages its log-prob the same way).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from flowalign.guards import assert_finite

__all__ = ["d3po_loss", "diffusion_dpo_loss", "preference_pairs"]


def preference_pairs(values: Tensor, groups: Tensor, valid: Tensor | None = None) -> Tensor:
    """``[K, 2]`` long ``(preferred, dispreferred)`` sample indices: per group the best vs the worst.

    For each group (in order of its first sample) the valid sample with the highest value is the
    preferred one, the valid sample with the lowest the dispreferred one. A group with fewer than two
    valid samples or whose valid values are all equal gives no pair (DPO has nothing to learn from a
    tie; D3PO's ``compare`` gives a tie the preference ``[0, 0]``, train_d3po.py lines 183-198). Among
    equal maxima (minima) the first sample is taken (ours: deterministic).

    Args:
        values: ``[N]`` per-sample values (rewards, or a judge's win rates).
        groups: ``[N]`` group id of each sample (any integers).
        valid: ``[N]`` bool, or ``None`` (all valid).

    Returns:
        ``[K, 2]`` long indices into ``values`` (``K`` ≤ number of groups), on the CPU.
    """
    v = values.detach().float().cpu()
    g = groups.detach().cpu()
    if v.dim() != 1 or g.shape != v.shape:
        raise ValueError(f"preference_pairs: values {tuple(v.shape)} and groups {tuple(g.shape)} must be one [N] shape")
    ok = torch.ones_like(v, dtype=torch.bool) if valid is None else valid.detach().cpu().bool()
    if ok.shape != v.shape:
        raise ValueError(f"preference_pairs: valid {tuple(ok.shape)} must be [{v.shape[0]}]")
    ok = ok & torch.isfinite(v)
    pairs = []
    for gid in dict.fromkeys(g.tolist()):  # groups in order of their first sample
        members = ((g == gid) & ok).nonzero().squeeze(1)
        if len(members) < 2:
            continue
        vals = v[members]
        hi, lo = vals.max(), vals.min()
        if not bool(hi > lo):
            continue
        best = members[(vals == hi).nonzero()[0, 0]]
        worst = members[(vals == lo).nonzero()[0, 0]]
        pairs.append((int(best), int(worst)))
    return torch.tensor(pairs, dtype=torch.long).view(-1, 2)


def d3po_loss(log_prob_w: Tensor, ref_log_prob_w: Tensor, log_prob_l: Tensor, ref_log_prob_l: Tensor, *, beta: float,
              ratio_clip: float, check: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
    """The D3PO loss of ``B`` (pair, step) units (Yang et al. 2024, the per-step DPO objective as train_d3po.py lines 595-599 compute it):

        r = clip(exp(log πθ(x_{t-1} | x_t) − log π_ref(x_{t-1} | x_t)), 1 − ε, 1 + ε)
        L = mean_units −log σ(β·log r_w − β·log r_l)

    ``w`` is the preferred trajectory's transition at the step, ``l`` the dispreferred one's at the
    same step. The clip (the authors' ``train.eps``) bounds the implicit Q-values; where a ratio is
    clipped its gradient is 0, as in the reference.

    Args:
        log_prob_w, log_prob_l: ``[B]`` the transitions' log-densities under the trained policy.
        ref_log_prob_w, ref_log_prob_l: ``[B]`` the same under the frozen reference (detached here).
        beta: the DPO temperature β > 0 (the reference's ``train.beta``, 0.1).
        ratio_clip: ε in (0, 1) (the reference's ``train.eps``, 0.1).
        check: refuse non-finite inputs (a host sync); the training path passes ``False``.

    Returns:
        ``(loss, metrics)``: a 0-dim loss; 0-dim detached metrics ``loss``, ``implicit_acc`` (share of
        units with ``β log r_w > β log r_l``), ``log_ratio_w``, ``log_ratio_l`` (unclipped means),
        ``clip_frac`` (share of the ``2B`` ratios clipped).
    """
    if not beta > 0:
        raise ValueError(f"d3po_loss: beta must be > 0 (algorithm.d3po.beta), got {beta}")
    if not 0 < ratio_clip < 1:
        raise ValueError(f"d3po_loss: ratio_clip must be in (0, 1) (algorithm.d3po.ratio_clip), got {ratio_clip}")
    shapes = {tuple(t.shape) for t in (log_prob_w, ref_log_prob_w, log_prob_l, ref_log_prob_l)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"d3po_loss: the four log-probs must share one [B] shape, got {sorted(shapes)}")
    if check:
        for name, t in (("log_prob_w", log_prob_w), ("ref_log_prob_w", ref_log_prob_w), ("log_prob_l", log_prob_l),
                        ("ref_log_prob_l", ref_log_prob_l)):
            assert_finite(t, name)
    lr_w = log_prob_w.float() - ref_log_prob_w.detach().float()
    lr_l = log_prob_l.float() - ref_log_prob_l.detach().float()
    # torch.clamp(torch.exp(·), 1 - eps, 1 + eps), then torch.log (train_d3po.py lines 597-599)
    r_w = lr_w.exp().clamp(1 - ratio_clip, 1 + ratio_clip)
    r_l = lr_l.exp().clamp(1 - ratio_clip, 1 + ratio_clip)
    inside = beta * r_w.log() - beta * r_l.log()
    loss = -F.logsigmoid(inside).mean()
    clipped = torch.cat([(lr_w.exp() - r_w).abs() > 0, (lr_l.exp() - r_l).abs() > 0]).float()
    metrics = {"loss": loss.detach(), "implicit_acc": (inside > 0).float().mean().detach(),
               "log_ratio_w": lr_w.mean().detach(), "log_ratio_l": lr_l.mean().detach(), "clip_frac": clipped.mean().detach()}
    return loss, metrics


def diffusion_dpo_loss(v_w: Tensor, v_l: Tensor, v_ref_w: Tensor, v_ref_l: Tensor, target_w: Tensor, target_l: Tensor, *,
                       beta: float, check: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
    """The Diffusion-DPO loss of ``B`` re-noised pairs (Wallace et al. 2023, Eq. 14; DiffusionDPO train.py
    lines 1121-1147), each pair at one time ``σ`` with one noise ``ε`` (lines 1053-1055):

        e_θ(x) = mean_d (v_θ(x_σ, σ) − (ε − x))²       e_ref(x) = the same with the reference velocity
        L = mean_pairs −log σ(−β/2 · [(e_θ(w) − e_ref(w)) − (e_θ(l) − e_ref(l))])

    The reference matches the noise (ε-prediction, ``target = noise``); in the flow convention the model
    predicts the velocity ``ε − x0``, so the error is the velocity error (ours). ``β`` is the code's
    ``beta_dpo`` (5000 for SD 1.5 / SDXL), the paper's ``β·T`` with the ``ω(λ_t)`` weight taken constant.

    Args:
        v_w, v_l: ``[B, *D]`` trained velocities at the preferred / dispreferred noised sample.
        v_ref_w, v_ref_l: ``[B, *D]`` the reference's velocities there (detached here).
        target_w, target_l: ``[B, *D]`` the flow-matching targets ``ε − x0`` of the two samples.
        beta: ``β > 0``.
        check: refuse non-finite inputs (a host sync); the training path passes ``False``.

    Returns:
        ``(loss, metrics)``: a 0-dim loss; 0-dim detached metrics ``loss``, ``implicit_acc`` (share of
        pairs with a positive inner term, the reference's ``implicit_acc``), ``model_mse`` (mean of
        ``e_θ`` over both samples, its ``raw_model_loss``), ``ref_mse`` (its ``raw_ref_loss``).
    """
    if not beta > 0:
        raise ValueError(f"diffusion_dpo_loss: beta must be > 0 (algorithm.diffusion_dpo.beta), got {beta}")
    shapes = {tuple(t.shape) for t in (v_w, v_l, v_ref_w, v_ref_l, target_w, target_l)}
    if len(shapes) != 1 or len(next(iter(shapes))) < 2:
        raise ValueError(f"diffusion_dpo_loss: velocities and targets must share one [B, *D] shape, got {sorted(shapes)}")
    if check:
        for name, t in (("v_w", v_w), ("v_l", v_l), ("v_ref_w", v_ref_w), ("v_ref_l", v_ref_l)):
            assert_finite(t, name)
    dims = tuple(range(1, v_w.dim()))

    def err(v: Tensor, target: Tensor) -> Tensor:
        return (v.float() - target.float()).pow(2).mean(dim=dims)  # (model_pred - target).pow(2).mean(dim=[1,2,3])

    model_w, model_l = err(v_w, target_w), err(v_l, target_l)
    with torch.no_grad():
        ref_w, ref_l = err(v_ref_w.detach(), target_w), err(v_ref_l.detach(), target_l)
    inside = -0.5 * beta * ((model_w - model_l) - (ref_w - ref_l))  # lines 1130, 1139, 1142-1143
    loss = -F.logsigmoid(inside).mean()  # line 1145
    metrics = {"loss": loss.detach(), "implicit_acc": (inside > 0).float().mean().detach(),
               "model_mse": (0.5 * (model_w.mean() + model_l.mean())).detach(),
               "ref_mse": (0.5 * (ref_w.mean() + ref_l.mean())).detach()}
    return loss, metrics
