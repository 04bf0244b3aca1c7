"""The rollout engine: sample a :class:`~flowalign.types.RolloutTree` from a :class:`BranchSpec`.

One engine builds every tree (flat groups, BranchGRPO prefixes, TempFlow ODE trunks, MixGRPO
windows; see :mod:`flowalign.rollout.spec`). At step ``t`` all distinct nodes at depth ``t`` go
through ONE batched ``adapter.predict`` call; if the step splits with factor ``k``, each node's
latent and velocity are repeated ``k`` times and ``sde_step`` draws ``k`` independent noises, so a
split costs one model evaluation and yields ``k`` edges. ``nfe`` counts evaluated nodes summed over
steps, so shared prefixes show up as fewer NFEs than a flat rollout with the same leaves.

Edge order (the edge id is the row in every per-edge tensor):
    * edges of step ``t`` come after all edges of step ``t - 1`` (ids of a step are contiguous);
    * within a step, the children of node ``i`` come before those of node ``i + 1`` and the ``k``
      children of one node are consecutive;
    * at depth 0 the nodes are prompt-major: the ``G`` initial noises of prompt ``p`` are nodes
      ``p*G .. p*G + G - 1`` (row ``p*G + g`` of ``initial_latents``).
    Consequently the leaves (nodes after the last step) are also prompt-major, and leaf ``l`` is
    the node produced by edge ``leaf_edges[l, T-1]``.

An edge is ``trainable`` when its step has noise level > 0 and is kept by ``spec.train_steps``
(all SDE steps when None) *and* its transition std is > 0: a CPS step into ``sigma_next = 0`` is
deterministic whatever the noise level, has no log-probability to train and is left untrained.
With ``spec.train_subset`` each trajectory of a flat group further keeps only its own random
subset of ``train_steps`` (DanceGRPO), drawn from ``train_generator`` before the first step.

The leaves are the samples after the last step, or with ``spec.final_sample == "predicted_x0"``
the last step's clean-image prediction ``x_{T-1} - sigma_{T-1} v`` (DanceGRPO); the tree's edges
(``x_next`` of the last step included) are the same either way.

Precision: the model runs in ``adapter.dtype``; step math, log-probs and stored latents are fp32.
ODE steps (noise level 0) use ``ode_step`` and draw no noise from the generator, so the random
stream is consumed only by SDE steps (one ``sde_step`` call per SDE step, on all its children).
With ``spec.ode_solver = "dpm_solver++_2m"`` the ODE steps after the last SDE step are DPM-Solver++(2M)
steps instead (MixGRPO-Flash; :mod:`flowalign.samplers.dpm_solver`).
"""

from __future__ import annotations

import torch
from torch import Tensor
from tqdm.auto import tqdm

from flowalign.pipelines.base import PipelineAdapter
from flowalign.rollout.spec import BranchSpec, Shard
from flowalign.samplers.dpm_solver import dpm_solver_pp_2m_step
from flowalign.samplers.steps import ode_step, sde_step
from flowalign.types import Conditioning, RolloutTree


# -- helpers ----------------------------------------------------------------------------------------
def _schedule(adapter: PipelineAdapter, num_steps: int) -> Tensor:
    """``adapter.sigmas(num_steps)`` as a validated ``[T + 1]`` fp32 tensor on the adapter's device."""
    sigmas = adapter.sigmas(num_steps)
    if not isinstance(sigmas, Tensor) or sigmas.shape != (num_steps + 1,):
        shape = tuple(sigmas.shape) if isinstance(sigmas, Tensor) else type(sigmas).__name__
        raise ValueError(f"adapter.sigmas({num_steps}) must return a [{num_steps + 1}] tensor, got {shape}")
    sigmas = sigmas.to(device=adapter.device, dtype=torch.float32)
    if not torch.isfinite(sigmas).all() or (sigmas[1:] > sigmas[:-1]).any():
        raise ValueError(f"adapter.sigmas({num_steps}) must be finite and descending, got {sigmas.tolist()}")
    return sigmas


def _velocity(adapter: PipelineAdapter, x: Tensor, sigma: Tensor, cond: Conditioning, guidance_scale: float) -> Tensor:
    """One batched model call: ``x [N, *latent]`` fp32, ``sigma [N]`` -> fp32 velocity ``[N, *latent]``.

    The model runs in ``adapter.dtype``; the result is cast back to fp32 for the step math.
    """
    v = adapter.predict(x.to(adapter.dtype), sigma, cond, guidance_scale)
    if v.shape != x.shape:
        raise ValueError(f"adapter.predict returned shape {tuple(v.shape)} for x_t of shape {tuple(x.shape)}")
    return v.float()


def _mixed_schedule(adapter: PipelineAdapter, points: tuple[tuple[int, int], ...]) -> Tensor:
    """``[len(points)]`` sigmas ``adapter.sigmas(K)[i]`` for each ``(K, i)`` (``BranchSpec.schedule``), descending."""
    grids = {k: _schedule(adapter, k) for k in sorted({k for k, _ in points})}
    sigmas = torch.stack([grids[k][i] for k, i in points])
    if not bool((sigmas[1:] < sigmas[:-1]).all()):
        raise ValueError(f"BranchSpec.schedule {points} gives sigmas {sigmas.tolist()}, not strictly descending")
    return sigmas


def _bcast_to(sigma: Tensor, x: Tensor) -> Tensor:
    """``[B]`` sigmas viewed as ``[B, 1, ...]`` against ``x [B, *latent]``."""
    return sigma.reshape((-1,) + (1,) * (x.ndim - 1))


def _check_latents(name: str, latents: Tensor, n: int, latent_shape: tuple[int, ...]) -> None:
    if not isinstance(latents, Tensor) or not latents.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {type(latents).__name__}"
                        + (f" of dtype {latents.dtype}" if isinstance(latents, Tensor) else ""))
    expected = (n, *latent_shape)
    if tuple(latents.shape) != expected:
        raise ValueError(f"{name} has shape {tuple(latents.shape)}, expected {expected}")


def _check_cond(cond: Conditioning, n: int, what: str) -> None:
    if not isinstance(cond, Conditioning):
        raise TypeError(f"cond must be a flowalign.types.Conditioning, got {type(cond).__name__}")
    if len(cond) != n:
        raise ValueError(f"cond has {len(cond)} rows but there are {n} {what}")


def _trained_subsets(spec: BranchSpec, n: int, generator: torch.Generator | None, device: torch.device,
                     shard: Shard | None = None, num_prompts: int = 1) -> Tensor | None:
    """``[n, T]`` bool: the steps each of this rank's ``n`` trajectories of a flat group trains when
    ``spec.train_subset`` is set (else ``None``): a uniformly random ``train_subset``-subset of
    ``spec.train_steps`` per trajectory, independent across trajectories (drawn for every rank's
    trajectories, this rank's rows kept: ``shard``).

    DanceGRPO (XueZeyue/DanceGRPO @ 15cc71d, fastvideo/train_grpo_flux.py l. 551-561 and 570) draws
    one ``torch.randperm`` of the candidate steps per sample and trains its first
    ``int(#steps x timestep_fraction)``; the first ``k`` entries of a uniform random permutation are a
    uniform random ``k``-subset, which is what this draws (the order of training does not matter here:
    the recipe shuffles all trained edges)."""
    if spec.train_subset is None:
        return None
    if not isinstance(generator, torch.Generator):
        raise TypeError("spec.train_subset draws each trajectory's trained steps: pass train_generator (a torch.Generator), "
                        f"got {type(generator).__name__}")
    candidates = torch.tensor(spec.train_steps, dtype=torch.long)
    shard = shard if shard is not None else Shard()
    perm = torch.stack([torch.randperm(len(candidates), generator=generator) for _ in range(n * shard.world)])
    perm = shard.local_rows(perm, num_prompts)
    mask = torch.zeros(n, spec.num_steps, dtype=torch.bool)
    mask.scatter_(1, candidates[perm[:, : spec.train_subset]], True)
    return mask.to(device)


def _sde_noise(shape: tuple[int, ...], generator: torch.Generator, shard: Shard, num_prompts: int, device: torch.device) -> Tensor:
    """Standard-normal fp32 noise ``[N, *latent]`` for this rank's ``N`` nodes: drawn on the
    generator's device for every rank's nodes (``world * N`` rows), this rank's rows kept, moved to
    ``device``. With one process this is exactly what ``sde_step`` would draw."""
    noise = torch.randn((shape[0] * shard.world, *shape[1:]), generator=generator, device=generator.device, dtype=torch.float32)
    return shard.local_rows(noise, num_prompts).to(device)


# -- public API -------------------------------------------------------------------------------------
@torch.no_grad()
def rollout(
    adapter: PipelineAdapter,
    cond: Conditioning,
    spec: BranchSpec,
    *,
    prompts: list[str],
    generator: torch.Generator,
    group_ids: Tensor | None = None,
    initial_latents: Tensor | None = None,
    init_generator: torch.Generator | None = None,
    train_generator: torch.Generator | None = None,
    keep_means: bool = False,
    keep_velocities: bool = False,
    decode: bool = True,
    progress: bool = False,
    shard: Shard | None = None,
) -> RolloutTree:
    """Sample the tree described by ``spec`` for ``P`` prompts.

    Args:
        adapter: a ``PipelineAdapter``.
        cond: conditioning with one row per prompt, ``len(cond) == P``.
        spec: the tree to sample.
        prompts: the ``P`` prompt strings (stored in the tree; ``prompt_idx`` indexes them).
        generator: the source of the initial noises (when neither they nor ``init_generator`` are
            given) and of every SDE noise.
        init_generator: the source of the initial noises when ``initial_latents`` is not given
            (default ``generator``); with ``spec.shared_noise`` the ``P`` drawn noises are each
            repeated ``G`` times. A group spread over ranks needs a generator that is the same on
            every rank here (the recipe's ``("init_noise", iteration)`` stream).
        train_generator: the source of each trajectory's trained steps when ``spec.train_subset``
            is set (required then; unused otherwise).
        group_ids: ``[P]`` global group id per prompt (so groups can span ranks);
            default ``arange(P)``.
        initial_latents: ``[P*G, *latent_shape]`` initial noises, prompt-major (rows
            ``p*G .. p*G+G-1`` belong to prompt ``p``), used as given; default
            ``adapter.init_latents(P*G, init_generator)``, or with ``spec.shared_noise``
            ``adapter.init_latents(P, init_generator)`` with each row repeated ``G`` times.
        keep_means: also store ``mean_old [E, *latent_shape]`` (for a KL term on means).
        keep_velocities: also store ``velocity [E, *latent_shape]``, the model velocity each edge's
            transition used (so an ODE look-ahead from ``x_t`` need not recompute its first step).
        decode: fill ``media = adapter.decode(leaf_latents)``.
        progress: show a tqdm bar over the steps.
        shard: this process's part of a rollout split over processes (default: one process). The
            ``P`` prompts and ``spec`` are this rank's; every random draw is made for all ranks'
            nodes from generators that must be the same on every rank, and this rank keeps its
            rows, so each sample is the same whatever the number of processes.

    Returns:
        A :class:`RolloutTree` with ``E = P * sum_t nodes_t * k_t`` edges and
        ``L = P * spec.leaves_per_prompt`` leaves; see the module docstring for the edge order.
        ``nfe == spec.expected_nfe(P)``.
    """
    if not isinstance(spec, BranchSpec):
        raise TypeError(f"spec must be a BranchSpec, got {type(spec).__name__}")
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be a list of strings")
    P, G, T = len(prompts), spec.samples_per_prompt, spec.num_steps
    if P == 0:
        raise ValueError("prompts is empty: nothing to roll out")
    _check_cond(cond, P, "prompts")
    device = adapter.device
    cond = cond.to(dtype=adapter.dtype)  # floating tensors only; the model runs in adapter.dtype

    if group_ids is None:
        group_ids = torch.arange(P, device=device)
    else:
        group_ids = torch.as_tensor(group_ids, device=device)
        if group_ids.shape != (P,) or group_ids.is_floating_point() or group_ids.is_complex():
            raise ValueError(f"group_ids must be an integer tensor of shape [{P}], got {group_ids.dtype} {tuple(group_ids.shape)}")
        group_ids = group_ids.long()

    if init_generator is not None and not isinstance(init_generator, torch.Generator):
        raise TypeError(f"init_generator must be a torch.Generator or None, got {type(init_generator).__name__}")
    shard = shard if shard is not None else Shard()
    if initial_latents is None:
        source = generator if init_generator is None else init_generator
        if spec.shared_noise:
            # DanceGRPO --init_same_noise (XueZeyue/DanceGRPO @ 15cc71d, fastvideo/train_grpo_flux.py
            # l. 333-338): one initial noise for the whole group (a rank's batch is one prompt x
            # num_generations there), so the group differs only by its SDE noises.
            prompts_drawn = P * shard.world if shard.by == "prompt" else P
            per_prompt = adapter.init_latents(prompts_drawn, source)
            if shard.by == "prompt":
                per_prompt = shard.local_rows(per_prompt, P)
            initial_latents = per_prompt.repeat_interleave(G, dim=0)
        else:
            initial_latents = shard.local_rows(adapter.init_latents(P * G * shard.world, source), P)
    _check_latents("initial_latents", initial_latents, P * G, tuple(adapter.latent_shape))
    step_mask = _trained_subsets(spec, P * G, train_generator, device, shard, P)

    sigmas = _schedule(adapter, T) if spec.schedule is None else _mixed_schedule(adapter, spec.schedule)
    branching = spec.branching
    # steps after the last SDE step run spec.ode_solver (MixGRPO-Flash); x0_prev: the previous step's x0 prediction
    multistep_from = 1 + max((t for t, a in enumerate(spec.noise_levels) if a > 0), default=-1)
    x0_prev: Tensor | None = None

    # State of the nodes at the current depth (prompt-major at depth 0).
    x = initial_latents.to(device=device, dtype=torch.float32)
    node_prompt = torch.arange(P, device=device).repeat_interleave(G)
    node_edge = torch.full((P * G,), -1, dtype=torch.long, device=device)  # edge that produced each node

    parts: dict[str, list[Tensor]] = {k: [] for k in ("prompt_idx", "parent", "step", "x_t", "x_next",
                                                      "log_prob", "std", "trainable", "mean", "velocity")}
    num_edges, nfe = 0, 0

    for t in tqdm(range(T), desc="rollout", disable=not progress, leave=False):
        # One batched model evaluation of every distinct node at depth t.
        n = x.shape[0]
        v = _velocity(adapter, x, sigmas[t].expand(n), cond[node_prompt], spec.guidance_scale)
        nfe += n

        # Split: each node's latent / velocity repeated k times (children of a node are consecutive).
        k = branching[t]
        if k > 1:
            x, v = x.repeat_interleave(k, dim=0), v.repeat_interleave(k, dim=0)
            node_edge, node_prompt = node_edge.repeat_interleave(k), node_prompt.repeat_interleave(k)
        m = x.shape[0]
        sigma, sigma_next = sigmas[t].expand(m), sigmas[t + 1].expand(m)

        a = spec.noise_levels[t]
        if a == 0 and spec.ode_solver != "euler" and t >= max(multistep_from, 1) and float(sigmas[t + 1]) > 0:
            x_next = dpm_solver_pp_2m_step(x, x - _bcast_to(sigma, x) * v, x0_prev, sigmas[t - 1], sigma, sigma_next)
            log_prob, std, mean = torch.zeros(m, device=device), torch.zeros(m, device=device), x_next
        elif a == 0:
            x_next = ode_step(v, sigma, sigma_next, x).float()
            log_prob = torch.zeros(m, device=device)
            std = torch.zeros(m, device=device)
            mean = x_next
        else:
            out = sde_step(v, sigma, sigma_next, x, kind=spec.sampler, noise_level=a,
                           noise=_sde_noise(tuple(x.shape), generator, shard, P, device), cps_log_prob=spec.cps_log_prob)
            x_next, log_prob, std, mean = out.prev_sample.float(), out.log_prob.float(), out.std.float(), out.mean.float()

        std = std.expand(m) if std.ndim == 0 else std.reshape(m)
        if k > 1 and not bool((std > 0).all()):
            raise ValueError(
                f"spec.splits splits step {t} into k={k} children, but the transition there is deterministic "
                f"(noise_std 0 at sigma {float(sigmas[t]):.4g} -> {float(sigmas[t + 1]):.4g}, e.g. CPS into sigma_next=0): "
                "the children would be identical"
            )
        # Trainable: an SDE step kept by spec.train_steps, and a transition that is actually random
        # (CPS has std = sigma_next * sin(a*pi/2) = 0 on the last step even when a > 0).
        trainable = (std > 0) & spec.is_trainable_step(t)
        if step_mask is not None:  # a flat group: node i at every depth is trajectory i
            trainable = trainable & step_mask[:, t]

        ids = torch.arange(num_edges, num_edges + m, device=device)
        parts["prompt_idx"].append(node_prompt)
        parts["parent"].append(node_edge)
        parts["step"].append(torch.full((m,), t, dtype=torch.long, device=device))
        parts["x_t"].append(x)
        parts["x_next"].append(x_next)
        parts["log_prob"].append(log_prob.reshape(m))
        parts["std"].append(std)
        parts["trainable"].append(trainable)
        if keep_means:
            parts["mean"].append(mean)
        if keep_velocities:
            parts["velocity"].append(v.float())

        if t == T - 1 and spec.final_sample == "predicted_x0":
            # DanceGRPO rewards the last step's x̂0 = x_{T-1} - sigma_{T-1} v (flux_step,
            # fastvideo/train_grpo_flux.py l. 145; run_sample_step l. 250-254 `latents = pred_original`),
            # not the SDE sample, which carries the last step's noise (std eta * sqrt(sigma_{T-1})).
            x_next = x - sigmas[t] * v

        if spec.ode_solver != "euler":
            x0_prev = x - _bcast_to(sigma, x) * v.float()
        x, node_edge, num_edges = x_next, ids, num_edges + m

    cat = {k: torch.cat(v) for k, v in parts.items() if v}

    # leaf_edges [L, T]: the last column is the edge producing each leaf; earlier columns follow
    # parent pointers, one vectorised gather per step.
    num_leaves = x.shape[0]
    leaf_edges = torch.empty(num_leaves, T, dtype=torch.long, device=device)
    leaf_edges[:, T - 1] = node_edge
    for t in range(T - 1, 0, -1):
        leaf_edges[:, t - 1] = cat["parent"][leaf_edges[:, t]]

    return RolloutTree(
        prompt_idx=cat["prompt_idx"],
        parent=cat["parent"],
        step=cat["step"],
        x_t=cat["x_t"],
        x_next=cat["x_next"],
        log_prob_old=cat["log_prob"],
        noise_std=cat["std"],
        trainable=cat["trainable"],
        leaf_prompt_idx=node_prompt,
        leaf_group=group_ids[node_prompt],
        leaf_edges=leaf_edges,
        leaf_latents=x,
        prompts=list(prompts),
        sigmas=sigmas,
        nfe=nfe,
        mean_old=cat["mean"] if keep_means else None,
        velocity=cat["velocity"] if keep_velocities else None,
        media=adapter.decode(x) if decode else None,
    )


@torch.no_grad()
def sample_ode(
    adapter: PipelineAdapter,
    cond: Conditioning,
    num_steps: int,
    *,
    latents: Tensor,
    guidance_scale: float = 1.0,
) -> Tensor:
    """Deterministic Euler sampling (the probability-flow ODE), e.g. for evaluation.

    Args:
        cond: conditioning with one row per sample, ``len(cond) == N``.
        num_steps: ``T`` Euler steps on ``adapter.sigmas(T)``.
        latents: ``[N, *latent_shape]`` initial noise.

    Returns:
        ``[N, *latent_shape]`` fp32 final latents; bitwise equal to
        ``rollout(...).leaf_latents`` with all noise levels 0 and the same initial latents.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    if not isinstance(latents, Tensor):
        raise TypeError(f"latents must be a tensor, got {type(latents).__name__}")
    n = latents.shape[0] if latents.ndim else 0
    _check_latents("latents", latents, n, tuple(adapter.latent_shape))
    return integrate_ode(adapter, cond, latents, _schedule(adapter, num_steps), guidance_scale=guidance_scale)


def integrate_ode(adapter: PipelineAdapter, cond: Conditioning, latents: Tensor, sigmas: Tensor, *,
                  guidance_scale: float = 1.0, first_velocity: Tensor | None = None) -> Tensor:
    """Euler steps of the probability-flow ODE along ``sigmas [K + 1]`` (descending), from ``latents``
    at ``sigmas[0]``: ``[N, *latent_shape]`` fp32. ``sigmas = [σ_t, 0]`` is the one-step projection
    ``x̂0 = x_t − σ_t v(x_t, σ_t)``; the rest of a rollout's schedule is DenseGRPO's ODE look-ahead.

    ``first_velocity [N, *latent_shape]``, when given, is ``v(latents, sigmas[0])`` already computed
    (e.g. ``RolloutTree.velocity``) and replaces the first model evaluation: ``K - 1`` evaluations."""
    n = latents.shape[0]
    _check_cond(cond, n, "latents")
    if first_velocity is not None and first_velocity.shape != latents.shape:
        raise ValueError(f"first_velocity has shape {tuple(first_velocity.shape)}, latents {tuple(latents.shape)}")
    cond = cond.to(dtype=adapter.dtype)
    x = latents.to(device=adapter.device, dtype=torch.float32)
    sigmas = sigmas.to(device=adapter.device, dtype=torch.float32)
    for t in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[t].expand(n), sigmas[t + 1].expand(n)
        if t == 0 and first_velocity is not None:
            v = first_velocity.to(device=adapter.device, dtype=torch.float32)
        else:
            v = _velocity(adapter, x, sigma, cond, float(guidance_scale))
        x = ode_step(v, sigma, sigma_next, x).float()
    return x


def lookahead_sigmas(sigmas: Tensor, depth: int, num_steps: int = 0) -> Tensor:
    """The look-ahead schedule from depth ``depth`` of a rollout's ``sigmas [T + 1]`` to 0.

    ``num_steps = 0`` keeps every remaining sigma (DenseGRPO Eq. 8: ``ODE_t`` from ``x_t`` with the
    sampler's own remaining steps); ``num_steps = n`` keeps ``n + 1`` of them, evenly spaced in index
    and always including both ends (``n = 1``: VGPO's one-step projection)."""
    remaining = sigmas[depth:]
    if num_steps <= 0 or num_steps >= len(remaining) - 1:
        return remaining
    index = torch.linspace(0, len(remaining) - 1, num_steps + 1).round().long()
    return remaining[index]
