"""The hooks of the masked-diffusion LM loop (``dllm`` recipe) and their diffu-GRPO defaults.

Every dLLM algorithm is the GRPO objective (Shao et al. 2024, DeepSeekMath Eq. 3: group-relative
advantages, PPO's clipped ratio, optional k3 KL to a reference) computed by
:class:`flowalign.recipes.dllm_rl.DLLMRecipe` on the *units* of a log-likelihood estimator
(:data:`flowalign.dllm.algorithms.ESTIMATOR_UNITS`: tokens, sequences or denoising steps). A
method subclasses :class:`DLLMAlgorithm` and declares or overrides what it changes:

* **defaults** -- class attributes ``estimator``, ``inner_steps``, ``clip_range``, ``kl_beta``,
  ``loss_normalization``, ``std_mode``, ``sampling`` (decode settings), ``steps_rule``; :meth:`~DLLMAlgorithm.apply` fills them into the fields a config leaves ``null``
  (a value set in the YAML or on the command line always wins);
* **rollouts** -- :meth:`~DLLMAlgorithm.augment_rollouts`: change the scored rollouts before the
  advantages (IGPO re-decodes all-wrong groups with reference hints);
* **advantages** -- :meth:`~DLLMAlgorithm.advantages`: per sequence ``[N]`` (group-relative) or per
  estimator unit ``[N, U]`` (MDPO: per denoising step, from the intermediate predictions);
* **checks** -- :meth:`~DLLMAlgorithm.check`: validation of the config, naming the key;
* **own modules** -- :meth:`~DLLMAlgorithm.setup`, :meth:`~DLLMAlgorithm.trainable_parameters`,
  :meth:`~DLLMAlgorithm.param_groups`, :meth:`~DLLMAlgorithm.save_pretrained`, and the decode's
  :meth:`~DLLMAlgorithm.commit_policy` (token_commitment / co_grpo: a learned unmasking head).

The hooks reach the model, the decoder settings and the reward through the recipe they are given
(its ``logits_fn``, ``score``, ``mean``, ``gather_rows``, ``model``, ``spec``, ``mask_id``, ``eos_id``,
``rank``, ``world``); data moves only through arguments and return values.

World-size invariance: a hook's random draws come from streams keyed by the iteration and the
prompt's global position (:attr:`DLLMRollouts.first_group` + the local group), never by the rank,
and statistics spanning groups are taken over every rank's rows (:func:`over_ranks`), so 1 and W
processes give the same rollouts, advantages and update.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

from torch import Tensor

from flowalign.advantages import group_advantages
from flowalign.algorithms.registry import Algorithm
from flowalign.config_checks import _require

__all__ = ["DLLMAlgorithm", "DLLMRollouts", "over_ranks", "require_trajectory_estimator"]

#: decode settings every algorithm starts from (``sampling.*`` fields left null).
SAMPLING_DEFAULTS: dict[str, Any] = {"order": "diffusion", "step_schedule": "uniform", "eos_early_rejection": 0.0,
                                     "eos_restart_per_block": False}


@dataclass
class DLLMRollouts:
    """One iteration's scored rollouts on this rank: ``N = B x G`` rows, the ``G`` rollouts of each
    of this rank's ``B`` prompts next to each other.

    Attributes:
        prompt_ids: ``[N, P]`` long, left-padded prompt tokens (the model's device).
        prompt_mask: ``[N, P]`` long, 0 on the padding.
        trajectory: the :class:`~flowalign.dllm.sampling.Trajectory` of the decode, as sampled.
        sequences: ``[N, P + Lg]`` long, prompt then completion: what the update trains on.
        rewards: ``[N]`` float32 task rewards of ``sequences`` (CPU).
        fixed: ``[N, Lg]`` bool, completion tokens left out of the loss (IGPO's hint tokens, but
            those its entropy filter keeps).
        group_ids: ``[N]`` long prompt group of each row, ``0 .. B-1`` (CPU).
        examples: the ``N`` task examples of the rows (:class:`~flowalign.dllm.tasks.TaskExample`).
        first_group: the position among the iteration's prompts (global, over every rank) of this
            rank's group 0; group ``g`` is prompt ``first_group + g``, which names its random
            streams (``("rollout", iteration, prompt)``, ...), so that what a group draws does not
            depend on the number of processes.
    """

    prompt_ids: Tensor
    prompt_mask: Tensor
    trajectory: Any
    sequences: Tensor
    rewards: Tensor
    fixed: Tensor
    group_ids: Tensor
    examples: list
    first_group: int = 0

    def prompt_of_group(self, g: int) -> int:
        """The iteration-wide prompt position of this rank's group ``g``."""
        return self.first_group + int(g)


def over_ranks(recipe: Any, rollouts: DLLMRollouts, values: Tensor, std_mode: str,
               fn: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """``fn(values, group_ids)`` -> ``[N, ...]`` per-row results (``values [N, ...]``, rows of
    ``rollouts``) whose statistics do not depend on how the iteration's groups are spread over the
    ranks. Group statistics (``std_mode`` ``group`` / ``none``) need only a group's own rows, which
    live on one rank: ``fn`` runs on this rank's rows. ``global`` divides by the std of the whole
    iteration's batch: every rank's rows are gathered (``recipe.gather_rows``, rank order, which is
    the prompts' order), ``fn`` runs on all of them and this rank's rows are returned."""
    world = int(getattr(recipe, "world", 1))
    if std_mode != "global" or world == 1:
        return fn(values, rollouts.group_ids)
    n = values.shape[0]
    all_values = recipe.gather_rows(values)
    all_groups = recipe.gather_rows(rollouts.group_ids.long() + rollouts.first_group)
    if all_values.shape[0] != world * n:
        raise RuntimeError(f"ranks hold different numbers of rollouts ({all_values.shape[0]} gathered, {n} here)")
    return fn(all_values, all_groups.to(all_values.device))[recipe.rank * n:(recipe.rank + 1) * n].to(values.device)


def require_trajectory_estimator(cfg: Any) -> None:
    """``algorithm.estimator`` must be ``trajectory``: the method trains the rollout's exact per-step log-probs."""
    a = cfg.algorithm
    _require(a.estimator == "trajectory", "algorithm.estimator",
             f"{a.name} trains exact trajectory log-probs: estimator must be 'trajectory', got {a.estimator!r}")


class DLLMAlgorithm(Algorithm):
    """A masked-diffusion LM algorithm; the defaults are diffu-GRPO's (d1, Zhao et al. 2025,
    arXiv:2504.12216, §3.2): the one-step per-token estimator, the rollouts as decoded, and
    group-relative advantages per sequence.

    Class attributes (besides :class:`~flowalign.algorithms.registry.Algorithm`'s):
        estimator: default ``algorithm.estimator`` (a key of
            :data:`flowalign.dllm.algorithms.ESTIMATOR_UNITS`).
        inner_steps: default ``algorithm.inner_steps`` (mu, optimizer steps per batch of rollouts).
        clip_range: default ``algorithm.clip_range`` (PPO epsilon).
        kl_beta: default ``algorithm.kl_beta`` (weight of the k3 KL to the reference).
        loss_normalization: default ``algorithm.loss_normalization``: ``"sequence"`` (GRPO's
            per-sequence mean, then the mean over sequences) or ``"token"`` (d1's / DiffuCoder's
            sum over the batch's trained units divided by their count;
            :func:`flowalign.dllm.algorithms.unit_weights`), or ``"window"`` (JustGRPO's constant
            ``gen_length x valid rows``).
        std_mode: default ``algorithm.std_mode`` (``"group"``; ``"none"`` = ``r - group mean``, d1's
            and DiffuCoder's advantage).
        sampling: the method's defaults of the ``sampling.*`` fields left null (``order``,
            ``step_schedule``, ``eos_early_rejection``, ``eos_restart_per_block``), over
            :data:`SAMPLING_DEFAULTS`.
        steps_rule: how ``sampling.steps`` follows from ``gen_length`` when null: ``"gen_length"``
            (one token per step) or ``"log2"`` (``floor(log2(gen_length))`` steps, CJ-GRPO's
            reference: ``S = int(log2(gen_length))``, yjyddq/EOSER-ASS-RL @ 5affb4e
            ``cj-grpo/cj_grpo_trainer_eoser_ass.py`` L349-350).
        advantage: how advantages are computed, in words for ``flowalign ls advantages`` (empty:
            group-relative per sequence, on the estimator's log-probs).
    """

    recipe = "dllm"
    estimator: ClassVar[str] = "one_step"
    inner_steps: ClassVar[int] = 1
    clip_range: ClassVar[float] = 0.2
    kl_beta: ClassVar[float] = 0.0
    loss_normalization: ClassVar[str] = "sequence"
    std_mode: ClassVar[str] = "group"
    sampling: ClassVar[dict[str, Any]] = {}
    steps_rule: ClassVar[str] = "gen_length"
    advantage: ClassVar[str] = ""
    #: keep the decode's intermediate predictions (``Trajectory.predictions``; MDPO's step rewards).
    record_predictions: ClassVar[bool] = False

    # ------------------------------------------------------------------------------------------
    # defaults
    # ------------------------------------------------------------------------------------------
    @classmethod
    def default_steps(cls, gen_length: int) -> int:
        """Denoising steps of a ``gen_length``-token completion when ``sampling.steps`` is null."""
        if cls.steps_rule == "log2":  # S = floor(log2 Lg): the last ascending step takes Lg - 2^(S-1) + 1
            return max(1, int(math.floor(math.log2(gen_length))))
        return gen_length

    @classmethod
    def apply(cls, cfg: Any) -> None:
        """Fill this algorithm's defaults into the ``None`` fields of a :class:`~flowalign.dllm.config.DLLMConfig` (in place)."""
        s, a = cfg.sampling, cfg.algorithm
        if a.estimator is None:
            a.estimator = cls.estimator
        for key in ("inner_steps", "clip_range", "kl_beta", "loss_normalization", "std_mode"):
            if getattr(a, key) is None:
                setattr(a, key, getattr(cls, key))
        for key, value in {**SAMPLING_DEFAULTS, **cls.sampling}.items():
            if getattr(s, key) is None:
                setattr(s, key, value)
        if a.likelihood_cfg_scale is None:  # d1 scores its log-probs with its decode's cfg_scale
            a.likelihood_cfg_scale = s.cfg_scale
        if s.steps is None:
            s.steps = cls.default_steps(s.gen_length)

    # ------------------------------------------------------------------------------------------
    # hooks of the loop
    # ------------------------------------------------------------------------------------------
    def setup(self, recipe: Any) -> None:
        """Called by the recipe once the model is loaded, before the optimizer is built: a method
        with modules of its own builds them here (the learned commitment policy of ``co_grpo`` /
        ``token_commitment``). By default nothing."""

    def trainable_parameters(self, recipe: Any) -> list:
        """The parameters the optimizer trains: by default the model's (LoRA factors only with LoRA)."""
        return list(recipe.model.trainable_parameters())

    def param_groups(self, recipe: Any, params: list) -> Any:
        """What the optimizer is built over, from :meth:`trainable_parameters`: by default the list
        itself (one group at ``train.optimizer.lr``); a method may return torch parameter groups."""
        return params

    def commit_policy(self, recipe: Any, greedy: bool) -> Any:
        """The ``commit_policy`` of :func:`flowalign.dllm.sampling.generate` for the rollouts
        (``greedy`` False) and the held-out decode (``greedy`` True): by default ``None``, the
        ``sampling.remasking`` rule."""
        return None

    def save_pretrained(self, path: str) -> None:
        """Write what the method trains besides the model into ``best/`` and ``final/``; by default nothing."""

    def augment_rollouts(self, recipe: Any, iteration: int, rollouts: DLLMRollouts) -> tuple[DLLMRollouts, dict[str, float]]:
        """The rollouts the advantages and the update see, and metrics to log; by default the
        rollouts as decoded (same object), no metrics.

        Args:
            recipe: the running :class:`~flowalign.recipes.dllm_rl.DLLMRecipe` (decoder, reward).
            iteration: 0-based iteration (names the random streams a method draws from).
            rollouts: this rank's scored rollouts.
        """
        return rollouts, {}

    def build_estimator(self, name: str, **kwargs: Any) -> Any:
        """The log-likelihood estimator of the update: by default
        :class:`flowalign.dllm.algorithms.LogProbEstimator` ``(name, **kwargs)``; a method whose
        reference computes it differently returns a subclass (GDPO)."""
        from flowalign.dllm.algorithms import LogProbEstimator

        return LogProbEstimator(name, **kwargs)

    def unit_weights(self, estimator: Any, batch: Any, log_prob_old: Tensor) -> Tensor:
        """The estimator's per-unit loss weights ``[n, U]`` for the rows of ``batch`` (a
        :class:`~flowalign.dllm.algorithms.RolloutBatch`), given the old log-probs ``[n, U]`` of the
        first inner step (computed before any update); by default
        :func:`flowalign.dllm.algorithms.unit_weights` of the estimator's unit and
        ``algorithm.loss_normalization``. MDPO's reference objective weighs every (step, masked
        position) unit by its sampling confidence (:func:`flowalign.dllm.algorithms.mdpo_masked_token_weights`)."""
        from flowalign.dllm.algorithms import unit_weights

        return unit_weights(estimator.unit, batch.trained, batch.trajectory, self.cfg.algorithm.loss_normalization)

    def loss_weights(self, weights: Tensor, advantages: Tensor) -> Tensor:
        """The per-unit loss weights ``[n, U]`` of the update given the estimator's
        (:func:`flowalign.dllm.algorithms.unit_weights`) and the per-unit advantages; units with
        weight 0 are not trained. By default ``weights`` unchanged (MDPO keeps only some steps),
        except with ``algorithm.loss_normalization: window``, where rows whose advantages are all 0
        leave the normaliser (JustGRPO's ``valid_samples = (advantages != 0).sum()``,
        duterscmy/JustGRPO @ 1dfe9fa ``train_gsm8k.justgrpo.py`` L179)."""
        if self.cfg is not None and self.cfg.algorithm.loss_normalization == "window":
            return weights * (advantages != 0).any(dim=1, keepdim=True).to(weights.dtype)
        return weights

    def ratio_log_probs(self, log_prob: Tensor, log_prob_old: Tensor, ref_log_prob: Tensor | None,
                        weights: Tensor) -> tuple[Tensor, Tensor | None]:
        """The new (and reference) log-probs ``[n, U]`` handed to the clipped loss, whose
        difference to ``log_prob_old`` is the importance ratio it clips; by default unchanged
        (GRPO's per-unit ratio). IGPO returns GSPO's sequence ratio in token form
        (:func:`flowalign.dllm.algorithms.gspo_log_probs`)."""
        return log_prob, ref_log_prob

    def advantages(self, recipe: Any, rollouts: DLLMRollouts) -> tuple[Tensor, dict[str, float]]:
        """``(advantages, metrics)``: ``[N]`` float32 per-sequence advantages (broadcast over the
        estimator's units) or ``[N, U]`` per-unit ones; by default GRPO's group-relative advantage
        of each rollout's reward within its prompt group (``algorithm.std_mode``, ``adv_clip``)."""
        a = self.cfg.algorithm
        return over_ranks(recipe, rollouts, rollouts.rewards, a.std_mode, lambda r, g: group_advantages(
            r, g, std_mode=a.std_mode, clip=a.adv_clip or None)), {}
