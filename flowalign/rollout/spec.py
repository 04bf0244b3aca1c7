"""``BranchSpec``: the one description of every rollout tree (docs/ARCHITECTURE.md, "Rollout").

A rollout of ``P`` prompts starts from ``G = samples_per_prompt`` initial noises per prompt and
runs ``T`` transitions down the sigma schedule. At step ``t`` every node at depth ``t`` is
evaluated once by the model; if ``t`` is a split step with factor ``k``, each node then spawns
``k`` children from ``k`` independent SDE noises (one model evaluation, ``k`` edges).

The algorithms of the family are specs, not separate engines:

* Flow-GRPO / DanceGRPO flat group (Liu et al. 2025; Xue et al. 2025): ``G`` noises, no splits,
  SDE at every step -- :meth:`BranchSpec.flat`.
* MixGRPO window (Li et al. 2025): SDE on a sliding window of steps, ODE elsewhere --
  ``BranchSpec.flat(..., sde_steps=window)``.
* BranchGRPO (Li et al. 2025): ``G = 1`` and splits at chosen depths; prefixes are shared, so the
  rollout costs fewer model evaluations than a flat group with the same leaves; ``train_steps``
  prunes which edges are trained without changing what is sampled.
* TempFlow-GRPO (He et al. 2025): an ODE trunk (noise level 0) with SDE children at the branch
  points, finished by ODE -- noise levels non-zero only at the split steps.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Iterable

from torch import Tensor

from flowalign.samplers.dpm_solver import ODE_SOLVERS
from flowalign.samplers.steps import CPS_LOG_PROBS, SDE_KINDS

#: what a rollout's leaves are (:attr:`BranchSpec.final_sample`)
FINAL_SAMPLES = ("sde", "predicted_x0")
#: how an iteration's rollout is split over processes (:attr:`Shard.by`)
SHARD_BY = ("group", "prompt")


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _step_indices(name: str, steps: Iterable[int], num_steps: int) -> tuple[int, ...]:
    """Validate an iterable of step indices in ``[0, num_steps)``; returns a sorted, de-duplicated tuple."""
    if isinstance(steps, (str, bytes)):
        raise TypeError(f"BranchSpec.{name} must be an iterable of step indices, got the string {steps!r}")
    out = []
    for s in steps:
        if not _is_int(s):
            raise TypeError(f"BranchSpec.{name} must hold integer step indices, got {s!r} ({type(s).__name__})")
        if not 0 <= s < num_steps:
            raise ValueError(f"BranchSpec.{name} has step {s}, outside [0, num_steps={num_steps})")
        out.append(int(s))
    return tuple(sorted(set(out)))


@dataclass(frozen=True)
class BranchSpec:
    """What to sample: initial noises, split steps, per-step noise, and which edges are trained.

    Attributes:
        num_steps: ``T``, the number of transitions (the schedule has ``T + 1`` sigmas).
        noise_levels: ``[T]`` per-step noise level ``a`` passed to ``sde_step`` (``eta`` for the
            ``"dance"`` sampler); 0 makes the step a deterministic ODE (Euler) step.
        samples_per_prompt: initial noises per prompt (the group size ``G`` of a flat group).
        splits: ``(step, k)`` pairs: after the model evaluation at ``step`` every node spawns
            ``k`` children from ``k`` independent SDE noises. Each step appears at most once.
        sampler: the ``sde_step`` kind: ``"flow_grpo"``, ``"dance"`` or ``"cps"``.
        train_steps: steps whose SDE edges are trainable; ``None`` means every SDE step. A listed
            step whose noise level is 0 simply has no trainable edges (an ODE edge has no
            log-probability). Pruning never changes what is sampled.
        guidance_scale: classifier-free guidance scale passed to ``adapter.predict``.
        cps_log_prob: the ``sde_step`` log-prob form of the ``"cps"`` sampler: ``"exact"`` or
            ``"flow_grpo"`` (``sampling.cps_log_prob``; the update must rescore with the same).
        shared_noise: the ``G`` initial noises of a prompt are one noise, repeated (DanceGRPO's
            ``--init_same_noise``; ``sampling.init_same_noise``). The group then differs only by
            its SDE noises.
        train_subset: ``None``, or the number of ``train_steps`` each trajectory trains, a uniformly
            random subset drawn per trajectory from the rollout's ``train_generator`` (DanceGRPO's
            per-sample ``randperm`` of the steps; ``sampling.train_steps: random_subset``). Needs
            ``train_steps`` and a flat group (no splits: an edge then belongs to one trajectory).
        final_sample: what the leaves are: ``"sde"``, the sample after the last SDE step, or
            ``"predicted_x0"``, the last step's clean-image prediction ``x_{T-1} - sigma_{T-1} v``
            (DanceGRPO rewards that; ``sampling.final_sample``). The edges are the same either way.
        schedule: ``None`` (the schedule is ``adapter.sigmas(num_steps)``), or ``num_steps + 1`` pairs
            ``(K, i)``: sigma ``i`` is ``adapter.sigmas(K)[i]`` (MixGRPO-Flash's compressed tail, points of a
            finer grid; :func:`flowalign.samplers.dpm_solver.flash_tail_grid`). Must start at ``(K, 0)``, end at
            ``(K, K)`` and descend.
        ode_solver: the solver of the ODE steps after the last SDE step: ``"euler"`` (every ODE step is
            ``ode_step``) or ``"dpm_solver++_2m"`` (:func:`flowalign.samplers.dpm_solver.dpm_solver_pp_2m_step`
            with the previous step's data prediction; first order on step 0 and into ``sigma = 0``).

    Lists (e.g. from an OmegaConf config) are accepted and stored as tuples.
    """

    num_steps: int
    noise_levels: tuple[float, ...]
    samples_per_prompt: int = 1
    splits: tuple[tuple[int, int], ...] = ()
    sampler: str = "flow_grpo"
    train_steps: tuple[int, ...] | None = None
    guidance_scale: float = 1.0
    cps_log_prob: str = "exact"
    shared_noise: bool = False
    train_subset: int | None = None
    final_sample: str = "sde"
    schedule: tuple[tuple[int, int], ...] | None = None
    ode_solver: str = "euler"

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731  (frozen)

        if not _is_int(self.num_steps) or self.num_steps < 1:
            raise ValueError(f"BranchSpec.num_steps must be an integer >= 1, got {self.num_steps!r}")
        set_("num_steps", int(self.num_steps))
        T = self.num_steps

        if isinstance(self.noise_levels, (str, bytes)) or not hasattr(self.noise_levels, "__iter__"):
            raise TypeError(f"BranchSpec.noise_levels must be a sequence of {T} floats, got {self.noise_levels!r}")
        levels = tuple(self.noise_levels)
        if len(levels) != T:
            raise ValueError(f"BranchSpec.noise_levels has length {len(levels)}, expected num_steps={T}")
        for t, a in enumerate(levels):
            if not _is_number(a) or not math.isfinite(a) or a < 0:
                raise ValueError(f"BranchSpec.noise_levels[{t}] must be a finite number >= 0, got {a!r}")
        set_("noise_levels", tuple(float(a) for a in levels))

        if not _is_int(self.samples_per_prompt) or self.samples_per_prompt < 1:
            raise ValueError(f"BranchSpec.samples_per_prompt must be an integer >= 1, got {self.samples_per_prompt!r}")
        set_("samples_per_prompt", int(self.samples_per_prompt))

        if not isinstance(self.sampler, str) or self.sampler not in SDE_KINDS:
            raise ValueError(f"BranchSpec.sampler must be one of {SDE_KINDS}, got {self.sampler!r}")
        if self.sampler == "cps":
            # CPS: std = sigma_next * sin(a*pi/2) (Wang & Yu 2025, "Coefficients-Preserving Sampling
            # for Reinforcement Learning with Flow Matching"); a in [0, 1] spans std from 0 to sigma_next.
            for t, a in enumerate(self.noise_levels):
                if a > 1:
                    raise ValueError(f"BranchSpec.noise_levels[{t}] = {a} > 1 is out of range for sampler 'cps' (a in [0, 1])")

        splits = []
        seen: set[int] = set()
        for i, pair in enumerate(self.splits):
            if isinstance(pair, (str, bytes)) or not hasattr(pair, "__len__") or len(pair) != 2:
                raise ValueError(f"BranchSpec.splits[{i}] must be a (step, k) pair, got {pair!r}")
            step, k = pair
            if not _is_int(step) or not 0 <= step < T:
                raise ValueError(f"BranchSpec.splits[{i}] has step {step!r}, expected an integer in [0, num_steps={T})")
            if not _is_int(k) or k < 1:
                raise ValueError(f"BranchSpec.splits[{i}] has branching factor k={k!r}, expected an integer >= 1")
            if step in seen:
                raise ValueError(f"BranchSpec.splits lists step {step} more than once")
            if k > 1 and self.noise_levels[step] == 0:
                raise ValueError(
                    f"BranchSpec.splits[{i}] splits step {step} into k={k} children but noise_levels[{step}] is 0: "
                    "an ODE step would give identical children"
                )
            seen.add(step)
            splits.append((int(step), int(k)))
        set_("splits", tuple(sorted(splits)))

        if self.train_steps is not None:
            set_("train_steps", _step_indices("train_steps", self.train_steps, T))

        if not _is_number(self.guidance_scale) or not math.isfinite(self.guidance_scale):
            raise ValueError(f"BranchSpec.guidance_scale must be a finite number, got {self.guidance_scale!r}")
        set_("guidance_scale", float(self.guidance_scale))

        if not isinstance(self.cps_log_prob, str) or self.cps_log_prob not in CPS_LOG_PROBS:
            raise ValueError(f"BranchSpec.cps_log_prob must be one of {CPS_LOG_PROBS}, got {self.cps_log_prob!r}")

        if not isinstance(self.shared_noise, bool):
            raise TypeError(f"BranchSpec.shared_noise must be a bool, got {self.shared_noise!r}")
        if self.train_subset is not None:
            if not _is_int(self.train_subset) or self.train_subset < 1:
                raise ValueError(f"BranchSpec.train_subset must be None or an integer >= 1, got {self.train_subset!r}")
            if self.train_steps is None or self.train_subset > len(self.train_steps):
                n = "no train_steps" if self.train_steps is None else f"{len(self.train_steps)} train_steps"
                raise ValueError(f"BranchSpec.train_subset={self.train_subset} draws from the train_steps, but there are {n}")
            if self.splits:
                raise ValueError("BranchSpec.train_subset draws the trained steps per trajectory, which needs a flat group; "
                                 f"this spec splits at {[step for step, _ in self.splits]} (edges shared by several leaves)")
            set_("train_subset", int(self.train_subset))
        if self.final_sample not in FINAL_SAMPLES:
            raise ValueError(f"BranchSpec.final_sample must be one of {FINAL_SAMPLES}, got {self.final_sample!r}")
        if self.ode_solver not in ODE_SOLVERS:
            raise ValueError(f"BranchSpec.ode_solver must be one of {ODE_SOLVERS}, got {self.ode_solver!r}")
        if self.schedule is not None:
            points = tuple(tuple(p) for p in self.schedule)
            if (len(points) != T + 1 or not all(len(p) == 2 and _is_int(p[0]) and _is_int(p[1]) and 0 <= p[1] <= p[0]
                                                for p in points) or points[0][1] != 0 or points[-1][0] != points[-1][1]):
                raise ValueError(f"BranchSpec.schedule must be {T + 1} (K, i) pairs with 0 <= i <= K, from (K, 0) to (K, K), "
                                 f"got {points!r}")
            set_("schedule", tuple((int(k), int(i)) for k, i in points))

    # -- derived quantities ---------------------------------------------------------------------
    @property
    def branching(self) -> tuple[int, ...]:
        """``[T]`` branching factor per step (1 where the step does not split)."""
        k = dict(self.splits)
        return tuple(k.get(t, 1) for t in range(self.num_steps))

    @property
    def leaves_per_prompt(self) -> int:
        """Finished samples per prompt: ``samples_per_prompt * prod(k)``."""
        return self.samples_per_prompt * math.prod(self.branching)

    def nodes_per_prompt(self) -> tuple[int, ...]:
        """``[T + 1]`` number of nodes per prompt at each depth (depth ``t`` = before step ``t``)."""
        nodes = [self.samples_per_prompt]
        for k in self.branching:
            nodes.append(nodes[-1] * k)
        return tuple(nodes)

    def is_trainable_step(self, step: int) -> bool:
        """Whether the edges of ``step`` are trainable: SDE (noise level > 0) and in ``train_steps``
        (with :attr:`train_subset`, each trajectory then trains only its own drawn subset of them)."""
        if self.noise_levels[step] <= 0:
            return False
        return self.train_steps is None or step in self.train_steps

    def expected_nfe(self, num_prompts: int) -> int:
        """Per-sample model evaluations of a rollout of ``num_prompts`` prompts.

        Every node at depth ``t < T`` is evaluated once (a CFG pair counts once), so
        ``NFE = P * sum_{t<T} nodes_per_prompt[t]``; a flat group costs ``P * G * T``.
        """
        if not _is_int(num_prompts) or num_prompts < 0:
            raise ValueError(f"num_prompts must be an integer >= 0, got {num_prompts!r}")
        return num_prompts * sum(self.nodes_per_prompt()[: self.num_steps])

    # -- constructors -----------------------------------------------------------------------------
    @classmethod
    def flat(
        cls,
        num_steps: int,
        group_size: int,
        noise_level: float,
        *,
        sampler: str = "flow_grpo",
        sde_steps: Iterable[int] | None = None,
        train_steps: Iterable[int] | None = None,
        guidance_scale: float = 1.0,
        shared_noise: bool = False,
        train_subset: int | None = None,
        final_sample: str = "sde",
    ) -> "BranchSpec":
        """A flat group (Flow-GRPO / DanceGRPO): ``group_size`` independent trajectories per prompt.

        Args:
            num_steps: ``T``.
            group_size: ``G`` initial noises per prompt.
            noise_level: the noise level ``a`` on SDE steps.
            sde_steps: the steps that use the SDE (others are ODE steps), e.g. a MixGRPO window;
                ``None`` = all steps.
            train_steps: see :class:`BranchSpec`; ``None`` = all SDE steps.
            shared_noise, train_subset, final_sample: see :class:`BranchSpec` (DanceGRPO's options).
        """
        if not _is_int(num_steps) or num_steps < 1:
            raise ValueError(f"BranchSpec.num_steps must be an integer >= 1, got {num_steps!r}")
        if not _is_number(noise_level):
            raise ValueError(f"BranchSpec.flat noise_level must be a number, got {noise_level!r}")
        sde = set(range(num_steps)) if sde_steps is None else set(_step_indices("sde_steps", sde_steps, num_steps))
        levels = tuple(float(noise_level) if t in sde else 0.0 for t in range(num_steps))
        return cls(
            num_steps=num_steps,
            noise_levels=levels,
            samples_per_prompt=group_size,
            sampler=sampler,
            train_steps=None if train_steps is None else tuple(train_steps),
            guidance_scale=guidance_scale,
            shared_noise=shared_noise,
            train_subset=train_subset,
            final_sample=final_sample,
        )


@dataclass(frozen=True)
class Shard:
    """This process's part of an iteration's rollout, such that every sample is the same whatever
    the number of processes (docs/ARCHITECTURE.md, "Several processes").

    The whole rollout of an iteration is ``world`` times what one rank samples; its nodes at every
    depth are prompt-major (:mod:`flowalign.rollout.engine`). Two placements:

    * ``by="group"``: every rank holds every prompt and block ``rank`` of the ``world`` equal blocks
      of each prompt's initial noises, hence of their descendants (a flat group spans ranks; its
      estimator gathers the rewards);
    * ``by="prompt"``: rank ``r`` holds the prompts ``r*P .. r*P + P - 1`` whole (trees, pairwise
      judges: estimators and rewards that need a whole group on one rank).

    Every random draw of a rollout (initial noises, SDE noises, DanceGRPO's step subsets) is made
    for the whole rollout from a stream that all ranks share, and each rank keeps its rows
    (:meth:`local_rows`): ``world`` times the random numbers, not the model evaluations.

    Attributes:
        rank, world: this process and the number of processes.
        by: one of :data:`SHARD_BY`.
    """

    rank: int = 0
    world: int = 1
    by: str = "group"

    def __post_init__(self) -> None:
        if not (_is_int(self.world) and self.world >= 1 and _is_int(self.rank) and 0 <= self.rank < self.world):
            raise ValueError(f"Shard needs 0 <= rank < world, got rank={self.rank!r}, world={self.world!r}")
        if self.by not in SHARD_BY:
            raise ValueError(f"Shard.by must be one of {SHARD_BY}, got {self.by!r}")

    @property
    def group_split(self) -> int:
        """Over how many ranks each prompt's group is split (``world`` by group, else 1)."""
        return self.world if self.by == "group" else 1

    def prompt_slice(self, num_prompts: int) -> slice:
        """This rank's prompts among an iteration's ``num_prompts`` (all of them by group)."""
        if self.by == "group":
            return slice(0, num_prompts)
        if num_prompts % self.world:
            raise ValueError(f"Shard: {num_prompts} prompts cannot be split into {self.world} ranks")
        per_rank = num_prompts // self.world
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)

    def local_rows(self, rows: Tensor, num_prompts: int) -> Tensor:
        """This rank's rows of ``rows [world * N, ...]``, drawn for the whole rollout at one depth
        (prompt-major), where this rank holds ``N`` of them for ``num_prompts`` prompts: ``[N, ...]``."""
        if self.world == 1:
            return rows
        if rows.shape[0] % (self.world * num_prompts):
            raise ValueError(f"Shard.local_rows: {rows.shape[0]} rows cannot be split into {self.world} ranks x {num_prompts} prompts")
        rest = rows.shape[1:]
        if self.by == "prompt":
            return rows.view(self.world, -1, *rest)[self.rank]
        return rows.view(num_prompts, self.world, -1, *rest)[:, self.rank].reshape(-1, *rest)
