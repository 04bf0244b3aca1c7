"""IGPO (Zhao et al. 2025, arXiv:2509.10396, §3): diffu-GRPO, plus inpainting for the groups that
carry no signal. When every rollout of a prompt fails, the first ``ceil(hinted_rollouts x G)`` of
them are re-decoded with a prefix of the reference completion inpainted as fixed hint tokens (its
length a random fraction in ``hint_fraction``), so the group gets a reward spread. The hint tokens
are given, not generated: the update never trains them.

The hint occupies the first ``h`` completion positions: the decoder sees ``[prompt | hint]`` as its
prompt and fills the remaining ``gen_length - h`` positions (steps scaled in proportion), which is
the inpainting of a masked window whose first ``h`` tokens are given. Hint lengths and the
re-decodes draw from the ``("hints", iteration, rank)`` stream, so a resumed run replays them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch

from flowalign.algorithms.dllm import DLLMAlgorithm, DLLMRollouts
from flowalign.algorithms.registry import register_algorithm
from flowalign.config_checks import _require
from flowalign.config_fields import _f
from flowalign.dllm.algorithms import all_wrong_groups, hint_lengths
from flowalign.dllm.sampling import generate
from flowalign.training.rng import stream_generator


@dataclass
class IGPOConfig:
    hint_fraction: list[float] = _f(factory=lambda: [0.2, 0.6], help="[min, max] fraction of the reference completion inpainted as a hint prefix.",
                                    gt=0, lt=1)
    hinted_rollouts: float = _f(0.5, "Fraction of an all-wrong group's rollouts regenerated with hints.", gt=0, le=1)


@register_algorithm
class IGPO(DLLMAlgorithm):
    name = "igpo"
    summary = "diffu-GRPO plus reference prefixes inpainted as hints into groups whose rollouts all fail"
    paper = "Zhao et al. 2025, IGPO, arXiv:2509.10396"
    Config = IGPOConfig
    config_file = "configs/dllm/igpo_addition.yaml"
    estimator = "one_step"
    inner_steps = 4
    advantage = "group, after reference hints are inpainted into all-wrong groups"

    def augment_rollouts(self, recipe: Any, iteration: int, rollouts: DLLMRollouts) -> tuple[DLLMRollouts, dict[str, float]]:
        """Re-decode part of every all-wrong group (with a reference) with a hint prefix.

        Groups with a correct rollout, or without a reference, are untouched. Returns new rollouts
        (``sequences``, ``rewards`` and ``fixed`` replaced; the hinted rows' ``fixed`` marks their
        hint tokens) and this rank's ``igpo/all_wrong_groups``, ``igpo/hinted_groups`` and
        ``igpo/hinted_accuracy`` (the share of hinted re-decodes that are correct).
        """
        cfg, s, opts = self.cfg, self.cfg.sampling, self.opts
        threshold = cfg.algorithm.correct_threshold
        examples, prompt_ids, prompt_mask = rollouts.examples, rollouts.prompt_ids, rollouts.prompt_mask
        P, Lg, G = prompt_ids.shape[1], s.gen_length, s.group_size
        sequences, rewards = rollouts.sequences.clone(), rollouts.rewards.clone()
        fixed = torch.zeros(sequences.shape[0], Lg, dtype=torch.bool)
        wrong = all_wrong_groups(rewards, rollouts.group_ids, threshold).nonzero().squeeze(1).tolist()
        groups = [g for g in wrong if examples[g * G].reference]
        generator = stream_generator(cfg.seed, "hints", iteration, recipe.rank)
        refs = [recipe.model.encode([examples[g * G].reference])[0][:Lg] for g in groups]
        lengths = hint_lengths(torch.tensor([len(r) for r in refs], dtype=torch.long), tuple(opts.hint_fraction), Lg, generator)
        k = max(1, math.ceil(opts.hinted_rollouts * G))
        hinted_rewards = []
        for g, ref, h in zip(groups, refs, lengths.tolist()):
            if h == 0:
                continue
            rows = torch.arange(g * G, g * G + k)
            hint = torch.tensor(ref[:h], dtype=torch.long, device=prompt_ids.device)[None].expand(k, h)
            ids = torch.cat([prompt_ids[rows], hint], dim=1)
            am = torch.cat([prompt_mask[rows], torch.ones_like(hint)], dim=1)
            steps = max(1, round(recipe.spec.steps * (Lg - h) / Lg))
            spec = replace(recipe.spec, gen_length=Lg - h, steps=steps, block_length=None)
            traj = generate(recipe.logits_fn, ids, am, spec, mask_id=recipe.mask_id, eos_id=recipe.eos_id,
                            generator=generator, record_predictions=False)
            sequences[rows] = traj.sequences
            fixed[rows, :h] = True
            rewards[rows] = recipe.score(traj.sequences[:, P:], [examples[i] for i in rows.tolist()])
            hinted_rewards.append(rewards[rows])
        hinted = torch.cat(hinted_rewards) if hinted_rewards else torch.zeros(0)
        metrics = {"igpo/all_wrong_groups": float(len(wrong)), "igpo/hinted_groups": float(len(hinted_rewards)),
                   "igpo/hinted_accuracy": float((hinted >= threshold).float().mean()) if len(hinted) else 0.0}
        return replace(rollouts, sequences=sequences, rewards=rewards, fixed=fixed), metrics

    @classmethod
    def check(cls, cfg: Any, world_size: int) -> None:
        a = cfg.algorithm
        _require(a.estimator != "trajectory", "algorithm.estimator",
                 "igpo's hinted rollouts are decoded with a shorter window; use a mask-based estimator (one_step, coupled, elbo_*)")
        fraction = a.igpo.hint_fraction
        _require(len(fraction) == 2 and fraction[0] <= fraction[1], "algorithm.igpo.hint_fraction",
                 f"must be [min, max] with 0 < min <= max < 1, got {fraction}")
