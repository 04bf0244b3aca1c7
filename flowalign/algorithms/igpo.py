"""IGPO (Zhao et al. 2025, arXiv:2509.10396, §3): diffu-GRPO, plus inpainting for the groups that
carry no signal. When every rollout of a prompt fails, the first ``ceil(hinted_rollouts x G)`` of
them are re-decoded with a prefix of the reference completion inpainted as fixed hint tokens (its
length a random fraction in ``hint_fraction``), so the group can get a reward spread.

What the reference does with them (facebookresearch/igpo @ e85eaea, ``trainer_igpo.py``; its run
script ``run_igpo.sh`` sets ``max_replacement=4, entropy_clipping_ratio_inpaint=0.2,
use_gspo=true, temperature=1.2``), each an option here with that default:

* ``replacement: correct`` -- only hinted re-decodes that turn out correct replace original
  rollouts, at most ``max_replacements`` per group (L1561-1607); ``all``: every re-decode
  replaces its original whatever its reward;
* ``hint_entropy_top`` -- the hint tokens are trained, but only the top fraction of them by the
  policy's predictive entropy (L1763-1823); 0: never trained;
* ``ratio: sequence`` -- GSPO's sequence-level importance ratio (L651-665); ``token``: GRPO's.

The hint occupies the first ``h`` completion positions: the decoder sees ``[prompt | hint]`` as its
prompt and fills the remaining ``gen_length - h`` positions (steps scaled in proportion), which is
the inpainting of a masked window whose first ``h`` tokens are given. A group's hint length and
choice of replacements draw from its ``("hints", iteration, prompt)`` stream, its re-decode from
``("hint_decode", iteration, prompt)`` and the entropy pass's masks of its rows from
``("hint_entropy", iteration, prompt)`` (``prompt``: the group's position among the iteration's
prompts), so a resumed run replays them and the number of processes does not change them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from flowalign.algorithms.dllm import DLLMAlgorithm, DLLMRollouts
from flowalign.algorithms.registry import register_algorithm
from flowalign.config_checks import _require
from flowalign.config_fields import _f
from flowalign.dllm.algorithms import (
    ESTIMATOR_UNITS,
    RolloutBatch,
    all_wrong_groups,
    choose_replacements,
    gspo_log_probs,
    hint_entropy_keep,
    hint_lengths,
    trained_token_mask,
)
from flowalign.dllm.logprob import masked_logprob
from flowalign.dllm.sampling import generate
from flowalign.training.rng import RowStreams, stream_generator

REPLACEMENTS = ("correct", "all")
RATIOS = ("sequence", "token")


@dataclass
class IGPOConfig:
    hint_fraction: list[float] = _f(factory=lambda: [0.2, 0.6], help="[min, max] fraction of the reference completion inpainted as a hint prefix.",
                                    gt=0, lt=1)
    hinted_rollouts: float = _f(1.0, "Fraction of an all-wrong group's rollouts re-decoded with hints (the IGPO reference re-decodes all G).",
                                gt=0, le=1)
    replacement: str = _f("correct", "Which hinted re-decodes replace original rollouts: correct (only correct ones, at most "
                          "max_replacements per group; the reference) | all (every re-decode, whatever its reward).",
                          choices=REPLACEMENTS)
    max_replacements: int = _f(4, "replacement=correct: most original rollouts of a group replaced by correct hinted ones "
                               "(reference run script: 4).", ge=1)
    hint_entropy_top: float = _f(0.2, "Share of a hinted rollout's hint tokens that are trained: the max(1, floor(share x n)) "
                                 "with the highest policy entropy (reference: 0.2); 0 = hint tokens never trained.", ge=0, le=1)
    ratio: str = _f("sequence", "Importance ratio of the clipped loss: sequence (GSPO's length-normalised sequence ratio, the "
                    "reference's use_gspo) | token (GRPO's per-token ratio).", choices=RATIOS)


@register_algorithm
class IGPO(DLLMAlgorithm):
    name = "igpo"
    summary = "diffu-GRPO plus reference prefixes inpainted as hints into groups whose rollouts all fail"
    paper = "Zhao et al. 2025, IGPO, arXiv:2509.10396"
    Config = IGPOConfig
    config_file = "configs/dllm/igpo_addition.yaml"
    estimator = "one_step"
    # facebookresearch/igpo @ e85eaea: run_igpo.sh line 5 (num_iterations=4) and lines 83-85 (--beta 0.01,
    # --epsilon_low / --epsilon_high 0.2); trainer_igpo.py: advantages r - group mean (the std is only
    # logged, L1906-1920) and the loss summed over the trained tokens / their count (L682-686).
    inner_steps = 4
    kl_beta = 0.01
    std_mode = "none"
    loss_normalization = "token"
    advantage = "group, after correct hinted re-decodes replace rollouts of all-wrong groups; GSPO sequence ratio"

    def augment_rollouts(self, recipe: Any, iteration: int, rollouts: DLLMRollouts) -> tuple[DLLMRollouts, dict[str, float]]:
        """Re-decode part of every all-wrong group (with a reference) with a hint prefix, and let
        the re-decodes replace original rollouts (``replacement``).

        Groups with a correct rollout, or without a reference, are untouched. The replaced rows of
        a group are its first ones (the reference's ``global_replace_idx = group_start + i``, L1594).
        Returns new rollouts (``sequences``, ``rewards`` and ``fixed`` replaced; ``fixed`` marks the
        hint tokens the loss leaves out: all of them, or those outside the entropy filter) and the
        iteration's (every rank's) ``igpo/all_wrong_groups``, ``igpo/hinted_groups``,
        ``igpo/hinted_accuracy`` (the share of hinted re-decodes that are correct),
        ``igpo/replaced_rollouts`` and ``igpo/hint_tokens_trained`` (the share of the replaced
        rows' hint tokens in the loss).
        """
        cfg, s, opts = self.cfg, self.cfg.sampling, self.opts
        threshold = cfg.algorithm.correct_threshold
        examples, prompt_ids, prompt_mask = rollouts.examples, rollouts.prompt_ids, rollouts.prompt_mask
        P, Lg, G = prompt_ids.shape[1], s.gen_length, s.group_size
        sequences, rewards = rollouts.sequences.clone(), rollouts.rewards.clone()
        hint = torch.zeros(sequences.shape[0], Lg, dtype=torch.bool)
        wrong = all_wrong_groups(rewards, rollouts.group_ids, threshold).nonzero().squeeze(1).tolist()
        groups = [g for g in wrong if examples[g * G].reference]
        refs = [recipe.model.encode([examples[g * G].reference])[0][:Lg] for g in groups]
        k = max(1, math.ceil(opts.hinted_rollouts * G))
        hinted_rewards, replaced = [], 0
        for g, ref in zip(groups, refs):
            # the group's own streams, whatever rank holds it: its hint length and replacements (CPU
            # draws), its re-decode (drawn on the model's device)
            generator = stream_generator(cfg.seed, "hints", iteration, rollouts.prompt_of_group(g))
            h = int(hint_lengths(torch.tensor([len(ref)], dtype=torch.long), tuple(opts.hint_fraction), Lg, generator)[0])
            if h == 0:
                continue
            rows = torch.arange(g * G, g * G + k)
            hint_ids = torch.tensor(ref[:h], dtype=torch.long, device=prompt_ids.device)[None].expand(k, h)
            ids = torch.cat([prompt_ids[rows], hint_ids], dim=1)
            am = torch.cat([prompt_mask[rows], torch.ones_like(hint_ids)], dim=1)
            steps = max(1, round(recipe.spec.steps * (Lg - h) / Lg))
            spec = replace(recipe.spec, gen_length=Lg - h, steps=steps, block_length=None)
            decode = RowStreams.for_blocks(cfg.seed, "hint_decode", [rollouts.prompt_of_group(g)], [k], prefix=(iteration,))
            traj = generate(recipe.logits_fn, ids, am, spec, mask_id=recipe.mask_id, eos_id=recipe.eos_id,
                            generator=decode, record_predictions=False)
            r = recipe.score(traj.sequences[:, P:], [examples[i] for i in rows.tolist()])
            hinted_rewards.append(r)
            if opts.replacement == "all":
                take = torch.arange(k)
            else:  # reference L1568-1586: a random subset of min(#correct, max_replacements) correct re-decodes
                take = choose_replacements(r >= threshold, opts.max_replacements, generator)
            dest = torch.arange(g * G, g * G + len(take))
            sequences[dest] = traj.sequences[take.to(traj.sequences.device)]
            rewards[dest] = r[take]
            hint[dest, :h] = True
            replaced += len(take)
        keep = self._trained_hint_tokens(recipe, iteration, sequences, prompt_mask, hint,
                                         rollouts.group_ids + rollouts.first_group)
        hinted = torch.cat(hinted_rewards) if hinted_rewards else torch.zeros(0)
        # the whole iteration's counts (every rank's), one reduction
        n_wrong, n_hinted, n_correct, n_redecoded, n_replaced, n_kept, n_hint = recipe.totals(torch.tensor(
            [len(wrong), len(hinted_rewards), int((hinted >= threshold).sum()), len(hinted), replaced, int(keep.sum()),
             int(hint.sum())], dtype=torch.float64)).tolist()
        metrics = {"igpo/all_wrong_groups": n_wrong, "igpo/hinted_groups": n_hinted,
                   "igpo/hinted_accuracy": n_correct / n_redecoded if n_redecoded else 0.0,
                   "igpo/replaced_rollouts": n_replaced,
                   "igpo/hint_tokens_trained": n_kept / n_hint if n_hint else 0.0}
        return replace(rollouts, sequences=sequences, rewards=rewards, fixed=hint & ~keep), metrics

    def _trained_hint_tokens(self, recipe: Any, iteration: int, sequences: Tensor, prompt_mask: Tensor,
                             hint: Tensor, prompts: Tensor) -> Tensor:
        """``[N, Lg]`` bool (CPU): the hint tokens the loss trains -- per hinted row, the top
        ``hint_entropy_top`` share by the entropy of the current policy's predictive distribution
        at them (reference L1763-1823 on the entropies of its old-policy pass, L1119-1125), among
        the hint tokens the estimator masks (one_step: all). One no-grad pass of the estimator,
        over the hinted rows only, each group's rows masked from its ``("hint_entropy", iteration,
        prompt)`` stream (``prompts [N]``: the iteration-wide prompt position of every row)."""
        top = self.opts.hint_entropy_top
        rows = hint.any(dim=1).nonzero().squeeze(1)
        keep = torch.zeros_like(hint)
        if top == 0.0 or rows.numel() == 0:
            return keep
        P = prompt_mask.shape[1]
        dev = sequences.device
        seqs = sequences[rows.to(dev)]
        attn = torch.cat([prompt_mask[rows.to(prompt_mask.device)].to(dev),
                          torch.ones(len(rows), seqs.shape[1] - P, dtype=prompt_mask.dtype, device=dev)], dim=1)
        batch = RolloutBatch(seqs, attn, P, trained_token_mask(seqs[:, P:], recipe.eos_id))
        streams = RowStreams.for_rows(self.cfg.seed, "hint_entropy", prompts[rows.to(prompts.device)], prefix=(iteration,))
        masks = recipe.estimator.draw(batch, streams)
        with torch.no_grad():
            _, entropy = masked_logprob(recipe.logits_fn, seqs, attn, P, recipe.mask_id, masks, return_entropy=True)
        candidates = hint[rows] & masks.completion.any(dim=1).cpu()
        keep[rows] = hint_entropy_keep(entropy.cpu(), candidates, top)
        return keep

    def ratio_log_probs(self, log_prob: Tensor, log_prob_old: Tensor, ref_log_prob: Tensor | None,
                        weights: Tensor) -> tuple[Tensor, Tensor | None]:
        """``ratio: sequence``: GSPO's sequence ratio in token form (:func:`gspo_log_probs`; reference
        L651-665); ``token``: unchanged."""
        if self.opts.ratio == "sequence":
            return gspo_log_probs(log_prob, log_prob_old, ref_log_prob, weights)
        return log_prob, ref_log_prob

    @classmethod
    def check(cls, cfg: Any, world_size: int) -> None:
        a = cfg.algorithm
        _require(a.estimator != "trajectory", "algorithm.estimator",
                 "igpo's hinted rollouts are decoded with a shorter window; use a mask-based estimator (one_step, coupled, elbo_*)")
        fraction = a.igpo.hint_fraction
        _require(len(fraction) == 2 and fraction[0] <= fraction[1], "algorithm.igpo.hint_fraction",
                 f"must be [min, max] with 0 < min <= max < 1, got {fraction}")
        token_unit = ESTIMATOR_UNITS.get(a.estimator) == "token"
        _require(a.igpo.ratio == "token" or token_unit, "algorithm.igpo.ratio",
                 f"the GSPO sequence ratio averages per-token log-ratios: it needs a per-token estimator "
                 f"(one_step, coupled), got {a.estimator!r}; set algorithm.igpo.ratio=token")
        _require(a.igpo.hint_entropy_top == 0 or token_unit, "algorithm.igpo.hint_entropy_top",
                 f"the entropy filter picks hint tokens: it needs a per-token estimator (one_step, coupled), got "
                 f"{a.estimator!r}; set algorithm.igpo.hint_entropy_top=0")
