"""Seeing reward hacking coming: sample diversity and the reward-judge gap of an evaluation.

Pure functions, plus one small stateful monitor:

* :func:`pairwise_cosine_distance` / :func:`group_diversity` -- diversity of a prompt's samples in a
  feature space: the mean over pairs of ``1 - cos(f_i, f_j)`` (0 for identical samples), averaged
  over held-out prompts. Features come from a reward or judge that exposes
  ``embed(media) -> [B, D]`` (the digit classifier's penultimate layer, CLIP image embeddings), else
  from the final latents.
* :func:`distinct_fraction` -- the text analogue for language models: ``(#distinct - 1) / (n - 1)``
  of one prompt's completions (0 when all are the same, 1 when all differ).
* :func:`relative_improvement` and :class:`HackingMonitor` -- the gap between the training reward's
  and each judge's improvement since the base model, and a one-time warning when the reward keeps
  rising while a judge falls (the classic hacking signature: Skalse et al. 2022, "Defining and
  Characterizing Reward Hacking"; for diffusion RL, Pref-GRPO, Wang et al. 2025, arXiv:2508.20751).

The exact definitions (cosine distance, the 0.01 floor of the relative improvement, three
evaluations in a row for the warning) are our choices; they are documented here and in the README.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Hashable, Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["cosine_distances", "pairwise_cosine_distance", "distance_to_group", "group_diversity", "distinct_fraction", "relative_improvement",
           "HackingMonitor", "embedding_source"]


def cosine_distances(features: Tensor) -> Tensor:
    """``[G, G]`` matrix of ``1 - cos(f_i, f_j)`` for ``features [G, D]`` (float32, clamped at 0).

    Identical rows are at distance 0, also when they are zero vectors (where the cosine is undefined);
    a zero row and a non-zero row are at distance 1.
    """
    if features.dim() != 2:
        raise ValueError(f"features must be [G, D], got shape {tuple(features.shape)}")
    f = features.float()
    unit = torch.nn.functional.normalize(f, dim=1)
    distance = (1.0 - unit @ unit.T).clamp_min(0.0)
    return distance.masked_fill(torch.cdist(f, f) == 0, 0.0)  # identical rows, zero vectors included


def pairwise_cosine_distance(features: Tensor) -> Tensor:
    """Mean of :func:`cosine_distances` over the pairs ``i < j`` of ``features [G, D]``; a 0-d
    float32 tensor (0 when G < 2)."""
    n = features.shape[0]
    if n < 2:
        return torch.zeros((), dtype=torch.float32, device=features.device)
    i, j = torch.triu_indices(n, n, offset=1, device=features.device)
    return cosine_distances(features)[i, j].mean()


def distance_to_group(features: Tensor, groups: Tensor) -> Tensor:
    """``[N]``: each sample's mean :func:`cosine_distances` to the other members of its group (0 for a
    sample alone). Averaged over a group it equals :func:`pairwise_cosine_distance` of the group."""
    if groups.shape != features.shape[:1]:
        raise ValueError(f"groups must be [N] = [{features.shape[0]}], got shape {tuple(groups.shape)}")
    same = groups[:, None] == groups[None, :]
    others = same.sum(dim=1) - 1
    total = (cosine_distances(features) * same).sum(dim=1)
    return torch.where(others > 0, total / others.clamp_min(1), torch.zeros_like(total))


def group_diversity(features: Tensor, groups: Tensor) -> Tensor:
    """Mean over groups (held-out prompts) of :func:`pairwise_cosine_distance` of the group's rows.

    Args:
        features: ``[N, D]`` one feature vector per sample.
        groups: ``[N]`` integer group id of each sample; groups with one sample are skipped.

    Returns:
        0-d float32 tensor (0 when no group has two samples).
    """
    if groups.shape != features.shape[:1]:
        raise ValueError(f"groups must be [N] = [{features.shape[0]}], got shape {tuple(groups.shape)}")
    values = [pairwise_cosine_distance(features[groups == g]) for g in groups.unique() if int((groups == g).sum()) >= 2]
    return torch.stack(values).mean() if values else torch.zeros((), dtype=torch.float32)


def distinct_fraction(items: Sequence[Hashable]) -> float:
    """``(#distinct - 1) / (n - 1)`` of one prompt's ``n`` samples (texts, token tuples): 0 when all
    are equal, 1 when all differ; 0 for ``n < 2``."""
    n = len(items)
    return (len(set(items)) - 1) / (n - 1) if n >= 2 else 0.0


def relative_improvement(before: float, now: float, floor: float = 0.01) -> float:
    """``(now - before) / max(|before|, floor)``: how far a metric moved since the base model, in
    units of its starting size (the floor keeps a metric that starts near 0 from exploding)."""
    return (now - before) / max(abs(before), floor)


def embedding_source(scorers: Mapping[str, Any]) -> tuple[str, Any] | None:
    """The first ``(name, scorer)`` of ``scorers`` (judges first, then rewards) whose scorer has an
    ``embed(media) -> [B, D]`` method, or ``None`` (diversity is then measured on the latents)."""
    for name, scorer in scorers.items():
        if callable(getattr(scorer, "embed", None)):
            return name, scorer
    return None


class HackingMonitor:
    """Tracks the held-out reward and judges over evaluations; adds ``eval/gap/<judge>`` metrics and
    warns once per judge when the reward rose over the last ``window`` evaluations while that judge fell.

    ``gap = relative_improvement(reward) - relative_improvement(judge)`` since the first evaluation
    (the base model): near 0 while the judge agrees with the reward, growing when it does not.

    Args:
        reward_key: the metric of the training reward, e.g. ``"eval/reward"``.
        judge_keys: the judges' metrics, e.g. ``["eval/judge/digit_judge"]``.
        window: evaluations in a row over which the reward must rise and the judge fall.
    """

    def __init__(self, reward_key: str, judge_keys: Sequence[str], window: int = 3):
        if window < 2:
            raise ValueError(f"window must be >= 2 evaluations, got {window}")
        self.reward_key, self.judge_keys, self.window = reward_key, list(judge_keys), window
        self.history: list[dict[str, float]] = []
        self.warned: set[str] = set()

    def replay(self, run_dir: str, until: int) -> None:
        """Rebuild the history of a resumed run from its ``metrics.jsonl`` (evaluations at steps
        ``<= until``), without printing the warnings it already gave."""
        from flowalign.training.metrics import read_metrics

        if os.path.isfile(os.path.join(run_dir, "metrics.jsonl")):
            for record in read_metrics(run_dir):
                if record["step"] <= until:
                    self.update(record["step"], record, announce=False)

    def update(self, step: int, scalars: Mapping[str, float], announce: bool = True) -> tuple[dict[str, float], list[str]]:
        """Record one evaluation. Returns ``(gap metrics, warnings issued now)``; each warning is also
        printed to stderr (unless ``announce`` is false), once per judge."""
        keys = [self.reward_key, *self.judge_keys]
        if any(k not in scalars for k in keys):
            return {}, []
        self.history.append({k: float(scalars[k]) for k in keys})
        first, r = self.history[0], [h[self.reward_key] for h in self.history[-self.window:]]
        gaps, warnings = {}, []
        for key in self.judge_keys:
            name = key.removeprefix("eval/judge/")
            gaps[f"eval/gap/{name}"] = (relative_improvement(first[self.reward_key], self.history[-1][self.reward_key])
                                        - relative_improvement(first[key], self.history[-1][key]))
            j = [h[key] for h in self.history[-self.window:]]
            rising = len(r) == self.window and all(b > a for a, b in zip(r, r[1:]))
            falling = len(j) == self.window and all(b < a for a, b in zip(j, j[1:]))
            if rising and falling and key not in self.warned:
                self.warned.add(key)
                message = (f"possible reward hacking at step {step}: the training reward rose over the last {self.window} "
                           f"evaluations ({r[0]:.4g} -> {r[-1]:.4g}) while the judge {name} fell ({j[0]:.4g} -> {j[-1]:.4g}); "
                           f"look at the samples, and consider algorithm.kl_beta (see README, reward hacking)")
                if announce:
                    print(f"[flowalign] WARNING: {message}", file=sys.stderr, flush=True)
                warnings.append(message)
        return gaps, warnings
