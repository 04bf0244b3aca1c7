"""Tests of the rollout engine (flowalign/rollout) on the real ToyAdapter (random-weight diffusers UNet)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from flowalign.pipelines.toy import build_toy_adapter
from flowalign.rollout import BranchSpec, rollout, sample_ode
from flowalign.samplers.steps import sde_step
from flowalign.types import RolloutTree

PROMPTS = ["the digit one", "a handwritten seven"]
SHIFT = 3.0  # a non-uniform schedule, so a step/sigma mix-up cannot go unnoticed


@pytest.fixture(scope="module")
def adapter():
    torch.set_num_threads(1)  # shared 2-core machine; also keeps CPU kernels deterministic
    return build_toy_adapter(seed=0, shift=SHIFT)


@pytest.fixture(scope="module")
def cond(adapter):
    return adapter.encode(PROMPTS)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def check_tree_structure(tree: RolloutTree, spec: BranchSpec, P: int) -> None:
    """Invariants every tree satisfies, whatever its shape."""
    T, E, L = spec.num_steps, tree.num_edges, tree.num_leaves
    assert L == P * spec.leaves_per_prompt
    assert tree.leaf_edges.shape == (L, T)
    assert tree.sigmas.shape == (T + 1,)
    # Edge order: steps non-decreasing; edges of one step contiguous.
    assert bool((tree.step[1:] >= tree.step[:-1]).all())
    # Roots are exactly the step-0 edges; every other parent is an edge of the previous step.
    is_root = tree.parent == -1
    assert torch.equal(is_root, tree.step == 0)
    child = (~is_root).nonzero().squeeze(1)
    par = tree.parent[child]
    assert bool((par < child).all())
    assert torch.equal(tree.step[par], tree.step[child] - 1)
    assert torch.equal(tree.prompt_idx[par], tree.prompt_idx[child])
    # The chain is consistent bit for bit: the parent's x_next is the child's x_t.
    assert torch.equal(tree.x_next[par], tree.x_t[child])
    # leaf_edges: column t holds a step-t edge; consecutive columns are parent -> child.
    assert torch.equal(tree.step[tree.leaf_edges], torch.arange(T).expand(L, T))
    assert torch.equal(tree.parent[tree.leaf_edges[:, 1:]], tree.leaf_edges[:, :-1])
    assert torch.equal(tree.leaf_latents, tree.x_next[tree.leaf_edges[:, -1]])
    assert torch.equal(tree.prompt_idx[tree.leaf_edges], tree.leaf_prompt_idx[:, None].expand(L, T))
    # Every edge lies on some leaf's path (no dangling edges).
    assert torch.equal(tree.leaf_edges.flatten().unique(), torch.arange(E))
    # Latents and log-probs are fp32.
    for name in ("x_t", "x_next", "leaf_latents", "log_prob_old", "noise_std"):
        assert getattr(tree, name).dtype == torch.float32, name
    assert tree.log_prob_old.shape == tree.noise_std.shape == tree.trainable.shape == (E,)
    assert torch.isfinite(tree.x_next).all() and torch.isfinite(tree.log_prob_old).all()


# -- 1. flat group ------------------------------------------------------------------------------------
def test_flat_group(adapter, cond):
    P, G, T = 2, 4, 5
    spec = BranchSpec.flat(T, G, 0.7)
    tree = rollout(adapter, cond, spec, prompts=PROMPTS, generator=gen(0), group_ids=torch.tensor([10, 11]))

    check_tree_structure(tree, spec, P)
    assert tree.num_edges == P * G * T and tree.num_leaves == P * G
    assert tree.nfe == P * G * T == spec.expected_nfe(P)
    # Flat tree: step-t edges are in leaf order (leaf l's edge at step t has id t*P*G + l).
    assert torch.equal(tree.leaf_edges, torch.arange(T)[None] * P * G + torch.arange(P * G)[:, None])
    assert tree.leaf_prompt_idx.tolist() == [0] * G + [1] * G
    assert tree.leaf_group.tolist() == [10] * G + [11] * G
    assert tree.prompts == PROMPTS
    assert torch.equal(tree.sigmas, adapter.sigmas(T))
    # Default initial noise: adapter.init_latents(P*G, generator), drawn first from the generator.
    assert torch.equal(tree.x_t[tree.step == 0], adapter.init_latents(P * G, gen(0)))
    # Every step is an SDE step: positive std, all trainable, distinct noises.
    assert bool((tree.noise_std > 0).all()) and bool(tree.trainable.all())
    assert tree.mean_old is None
    # Media is the decoded leaves.
    assert tree.media.shape == (P * G, 3, 16, 16)
    assert torch.equal(tree.media, adapter.decode(tree.leaf_latents))


# -- 2. branching (BranchGRPO-style shared prefixes) ---------------------------------------------------
def test_branching_shares_prefixes_and_saves_nfe(adapter, cond, monkeypatch):
    P, T = 2, 5
    spec = BranchSpec(num_steps=T, noise_levels=(0.7,) * T, samples_per_prompt=1, splits=((1, 2), (3, 2)))
    assert spec.leaves_per_prompt == 4

    calls: list[int] = []
    real_predict = adapter.predict

    def counting_predict(x_t, sigma, c, guidance_scale=1.0):
        calls.append(x_t.shape[0])
        assert sigma.shape == (x_t.shape[0],) and len(c) == x_t.shape[0]
        return real_predict(x_t, sigma, c, guidance_scale)

    monkeypatch.setattr(adapter, "predict", counting_predict)
    tree = rollout(adapter, cond, spec, prompts=PROMPTS, generator=gen(1))
    monkeypatch.undo()

    check_tree_structure(tree, spec, P)
    # Exactly one batched model call per step, on the distinct nodes of that depth (per prompt 1,1,2,2,4).
    assert calls == [2, 2, 4, 4, 8]
    # Hand count: P * (1 + 1 + 2 + 2 + 4) = 20, half of a flat group with the same 4 leaves (P*4*T = 40).
    assert tree.nfe == 20 == spec.expected_nfe(P)
    assert tree.nfe < BranchSpec.flat(T, spec.leaves_per_prompt, 0.7).expected_nfe(P) == 40
    # Edge ids worked out by hand from the documented order (step-major, children of node i before
    # node i+1): step 0: 0,1; step 1 (split): 2,3 | 4,5; step 2: 6..9; step 3 (split): 10..17; step 4: 18..25.
    expected = torch.tensor([
        [0, 2, 6, 10, 18], [0, 2, 6, 11, 19], [0, 3, 7, 12, 20], [0, 3, 7, 13, 21],
        [1, 4, 8, 14, 22], [1, 4, 8, 15, 23], [1, 5, 9, 16, 24], [1, 5, 9, 17, 25],
    ])
    assert torch.equal(tree.leaf_edges, expected)
    assert tree.num_edges == 26
    assert tree.leaf_prompt_idx.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    # Children of one split share x_t but got independent noise.
    siblings = torch.tensor([[2, 3], [10, 11], [12, 13]])
    assert torch.equal(tree.x_t[siblings[:, 0]], tree.x_t[siblings[:, 1]])
    assert not torch.isclose(tree.x_next[siblings[:, 0]], tree.x_next[siblings[:, 1]]).all()
    assert len({tuple(r.flatten().tolist()) for r in tree.leaf_latents}) == tree.num_leaves


def test_expected_nfe_hand_example():
    # G=3, split 2 at step 0 and 3 at step 2, T=4: nodes per depth 3, 6, 6, 18 (+18 leaves).
    spec = BranchSpec(num_steps=4, noise_levels=(0.5, 0.0, 0.5, 0.0), samples_per_prompt=3, splits=((2, 3), (0, 2)))
    assert spec.splits == ((0, 2), (2, 3))
    assert spec.leaves_per_prompt == 18
    assert spec.nodes_per_prompt() == (3, 6, 6, 18, 18)
    assert spec.expected_nfe(5) == 5 * (3 + 6 + 6 + 18)


# -- 3. on-policy ratio == 1 ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind, level, guidance", [("flow_grpo", 0.7, 1.0), ("dance", 0.3, 1.0), ("cps", 0.6, 2.5)])
def test_recomputed_log_prob_gives_ratio_one(adapter, cond, kind, level, guidance):
    T = 4
    # A mixed tree: ODE step 0, split at step 1, SDE elsewhere; CFG on for cps.
    spec = BranchSpec(num_steps=T, noise_levels=(0.0, level, level, level), samples_per_prompt=2,
                      splits=((1, 2),), sampler=kind, guidance_scale=guidance)
    tree = rollout(adapter, cond, spec, prompts=PROMPTS, generator=gen(2), keep_means=True, decode=False)
    check_tree_structure(tree, spec, len(PROMPTS))
    assert tree.media is None and tree.mean_old.shape == tree.x_t.shape

    sde = tree.noise_std > 0
    # CPS: std = sigma_next * sin(a pi/2) is 0 on the last step (sigma_next = 0): deterministic, untrained.
    expected_sde = (tree.step > 0) & ~((tree.step == T - 1) if kind == "cps" else torch.zeros_like(sde))
    assert torch.equal(sde, expected_sde) and torch.equal(tree.trainable, sde)
    assert bool((tree.log_prob_old[~sde] == 0).all())
    # Stored (mean, std, log_prob) agree with an independent Gaussian density (mean over latent dims).
    normal = torch.distributions.Normal(tree.mean_old[sde], tree.noise_std[sde].view(-1, 1, 1, 1))
    torch.testing.assert_close(normal.log_prob(tree.x_next[sde]).mean(dim=(1, 2, 3)), tree.log_prob_old[sde],
                               rtol=1e-5, atol=1e-5)

    # Recompute every SDE edge like the trainer does: one predict on all edges of a step (a different
    # batch than the rollout's node batch), then sde_step evaluated at the stored x_next.
    with torch.no_grad():
        for t in range(1, T):
            e = (tree.step == t).nonzero().squeeze(1)
            sigma = tree.sigmas[t].expand(len(e))
            sigma_next = tree.sigmas[t + 1].expand(len(e))
            v = adapter.predict(tree.x_t[e], sigma, cond[tree.prompt_idx[e]], guidance).float()
            out = sde_step(v, sigma, sigma_next, tree.x_t[e], kind=kind, noise_level=level, prev_sample=tree.x_next[e])
            ratio = torch.exp(out.log_prob - tree.log_prob_old[e])
            torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=0, atol=1e-6)
            torch.testing.assert_close(out.std, tree.noise_std[e], rtol=1e-6, atol=0)
            torch.testing.assert_close(out.mean, tree.mean_old[e], rtol=1e-5, atol=1e-5)


# -- 4. zero noise == deterministic ODE ----------------------------------------------------------------
def test_zero_noise_equals_sample_ode(adapter, cond):
    P, G, T, guidance = 2, 2, 4, 2.0
    spec = BranchSpec(num_steps=T, noise_levels=(0.0,) * T, samples_per_prompt=G, guidance_scale=guidance)
    init = adapter.init_latents(P * G, gen(3))
    tree = rollout(adapter, cond, spec, prompts=PROMPTS, generator=gen(4), initial_latents=init, keep_means=True,
                   progress=True)
    check_tree_structure(tree, spec, P)
    rows = cond[torch.arange(P).repeat_interleave(G)]
    ode = sample_ode(adapter, rows, T, latents=init, guidance_scale=guidance)
    assert torch.equal(tree.leaf_latents, ode)
    assert bool((tree.log_prob_old == 0).all()) and bool((tree.noise_std == 0).all())
    assert not tree.trainable.any()
    assert torch.equal(tree.mean_old, tree.x_next)  # a deterministic transition's mean is its result
    # The generator does not matter when nothing is stochastic.
    other = rollout(adapter, cond, spec, prompts=PROMPTS, generator=gen(5), initial_latents=init, decode=False)
    assert torch.equal(other.leaf_latents, tree.leaf_latents)

    # Independent computation: the diffusers Euler scheduler with the same shift, on unshifted sigmas.
    scheduler = FlowMatchEulerDiscreteScheduler(shift=SHIFT)
    scheduler.set_timesteps(sigmas=torch.linspace(1.0, 0.0, T + 1)[:-1].tolist())
    scheduler.set_begin_index(0)
    torch.testing.assert_close(scheduler.sigmas, tree.sigmas, rtol=1e-6, atol=1e-7)
    x = init.clone()
    with torch.no_grad():
        for i, timestep in enumerate(scheduler.timesteps):
            v = adapter.predict(x, scheduler.sigmas[i].expand(len(x)), rows, guidance)
            x = scheduler.step(v, timestep, x).prev_sample
    torch.testing.assert_close(ode, x, rtol=1e-5, atol=1e-5)


# -- 5. reproducibility ----------------------------------------------------------------------------------
def test_same_seed_same_tree_different_seed_different(adapter, cond):
    spec = BranchSpec(num_steps=3, noise_levels=(0.8, 0.8, 0.0), samples_per_prompt=2, splits=((1, 2),))
    a = rollout(adapter, cond, spec, prompts=PROMPTS, generator=gen(7), decode=False)
    b = rollout(adapter, cond, spec, prompts=PROMPTS, generator=gen(7), decode=False)
    for name in ("prompt_idx", "parent", "step", "x_t", "x_next", "log_prob_old", "noise_std", "trainable",
                 "leaf_prompt_idx", "leaf_group", "leaf_edges", "leaf_latents", "sigmas"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.nfe == b.nfe

    c = rollout(adapter, cond, spec, prompts=PROMPTS, generator=gen(8), decode=False)
    assert not torch.equal(a.x_t[a.step == 0], c.x_t[c.step == 0])  # different initial noise
    assert not torch.equal(a.leaf_latents, c.leaf_latents)
    # Same initial latents, different generator: the SDE noise alone differs.
    init = a.x_t[a.step == 0]
    d = rollout(adapter, cond, spec, prompts=PROMPTS, generator=gen(9), initial_latents=init, decode=False)
    assert torch.equal(d.x_t[d.step == 0], init)
    assert not torch.isclose(d.x_next[d.step == 0], a.x_next[a.step == 0]).all()


# -- 6. train_steps / sde_steps masks --------------------------------------------------------------------
def test_mixgrpo_window_and_train_steps(adapter, cond):
    T = 6
    window = BranchSpec.flat(T, 2, 0.7, sde_steps=range(2, 4))
    assert window.noise_levels == (0.0, 0.0, 0.7, 0.7, 0.0, 0.0) and window.train_steps is None
    pruned = BranchSpec.flat(T, 2, 0.7, sde_steps=[2, 3], train_steps=[3, 0])  # step 0 is ODE: never trainable
    assert pruned.train_steps == (0, 3)

    full = rollout(adapter, cond, window, prompts=PROMPTS, generator=gen(11), decode=False)
    part = rollout(adapter, cond, pruned, prompts=PROMPTS, generator=gen(11), decode=False)
    in_window = (full.step == 2) | (full.step == 3)
    assert torch.equal(full.noise_std > 0, in_window)
    assert torch.equal(full.log_prob_old != 0, in_window)
    assert torch.equal(full.trainable, in_window)
    assert torch.equal(part.trainable, part.step == 3)
    # Pruning which edges are trained never changes what is sampled.
    assert torch.equal(part.x_next, full.x_next) and torch.equal(part.log_prob_old, full.log_prob_old)

    # TempFlow-style: ODE trunk, SDE only at the branch point, finished by ODE.
    tempflow = BranchSpec(num_steps=T, noise_levels=(0, 0, 0.9, 0, 0, 0), samples_per_prompt=1, splits=((2, 3),))
    tree = rollout(adapter, cond, tempflow, prompts=PROMPTS, generator=gen(12), decode=False)
    check_tree_structure(tree, tempflow, len(PROMPTS))
    assert torch.equal(tree.trainable, tree.step == 2)
    assert tree.nfe == 2 * (1 + 1 + 1 + 3 + 3 + 3)


# -- 7. validation ---------------------------------------------------------------------------------------
BASE = dict(num_steps=4, noise_levels=(0.5, 0.5, 0.0, 0.5))


@pytest.mark.parametrize("override, match", [
    (dict(num_steps=0, noise_levels=()), "num_steps"),
    (dict(num_steps=2.0), "num_steps"),
    (dict(noise_levels=(0.5, 0.5)), r"noise_levels has length 2, expected num_steps=4"),
    (dict(noise_levels=(0.5, -0.1, 0.0, 0.5)), r"noise_levels\[1\]"),
    (dict(noise_levels=(0.5, math.nan, 0.0, 0.5)), r"noise_levels\[1\]"),
    (dict(noise_levels="0.5"), "noise_levels"),
    (dict(samples_per_prompt=0), "samples_per_prompt"),
    (dict(splits=((2, 2),)), r"splits\[0\].*noise_levels\[2\] is 0"),
    (dict(splits=((1, 0),)), r"splits\[0\].*k=0"),
    (dict(splits=((4, 2),)), r"splits\[0\].*step 4"),
    (dict(splits=((-1, 2),)), r"splits\[0\].*step -1"),
    (dict(splits=((1, 2), (1, 3))), "splits lists step 1 more than once"),
    (dict(splits=((1,),)), r"splits\[0\]"),
    (dict(train_steps=(0, 4)), "train_steps has step 4"),
    (dict(sampler="ddim"), "sampler"),
    (dict(sampler="cps", noise_levels=(0.5, 1.5, 0.0, 0.5)), r"noise_levels\[1\].*cps"),
    (dict(guidance_scale=math.inf), "guidance_scale"),
])
def test_spec_validation_names_the_field(override, match):
    with pytest.raises((ValueError, TypeError), match=match):
        BranchSpec(**{**BASE, **override})


def test_spec_accepts_lists_and_flat_validates():
    spec = BranchSpec(num_steps=2, noise_levels=[1, 0.5], splits=[[0, 2]], train_steps=[1, 1])
    assert spec.noise_levels == (1.0, 0.5) and spec.splits == ((0, 2),) and spec.train_steps == (1,)
    hash(spec)  # frozen and hashable
    with pytest.raises(ValueError, match="sde_steps has step 7"):
        BranchSpec.flat(5, 2, 0.7, sde_steps=[7])
    with pytest.raises(ValueError, match="samples_per_prompt"):
        BranchSpec.flat(5, 0, 0.7)
    with pytest.raises(ValueError, match="num_prompts"):
        BranchSpec.flat(5, 2, 0.7).expected_nfe(-1)


def test_rollout_input_errors(adapter, cond):
    spec = BranchSpec.flat(2, 2, 0.5)
    kw = dict(prompts=PROMPTS, generator=gen(0), decode=False)
    with pytest.raises(ValueError, match="cond has 2 rows but there are 3 prompts"):
        rollout(adapter, cond, spec, **{**kw, "prompts": PROMPTS + ["x"]})
    with pytest.raises(ValueError, match=r"initial_latents has shape \(3, 1, 16, 16\), expected \(4, 1, 16, 16\)"):
        rollout(adapter, cond, spec, initial_latents=torch.randn(3, 1, 16, 16), **kw)
    with pytest.raises(ValueError, match="group_ids"):
        rollout(adapter, cond, spec, group_ids=torch.tensor([0, 1, 2]), **kw)
    with pytest.raises(TypeError, match="generator"):
        rollout(adapter, cond, spec, **{**kw, "generator": 0})
    with pytest.raises(TypeError, match="spec"):
        rollout(adapter, cond, {"num_steps": 2}, **kw)
    with pytest.raises(ValueError, match="cond has 2 rows but there are 3 latents"):
        sample_ode(adapter, cond, 2, latents=torch.randn(3, 1, 16, 16))
    with pytest.raises(ValueError, match="num_steps"):
        sample_ode(adapter, cond, 0, latents=torch.randn(2, 1, 16, 16))


def test_split_into_deterministic_transition_is_refused(adapter, cond):
    # CPS into sigma_next = 0 has std = 0 whatever the noise level: a split there would give twins.
    spec = BranchSpec(num_steps=2, noise_levels=(0.5, 0.5), splits=((1, 2),), sampler="cps")
    with pytest.raises(ValueError, match="splits step 1 into k=2 children, but the transition there is deterministic"):
        rollout(adapter, cond, spec, prompts=PROMPTS, generator=gen(0), decode=False)


# -- precision and devices -------------------------------------------------------------------------------
def test_model_runs_in_adapter_dtype_latents_stay_fp32(cond):
    low = build_toy_adapter(seed=0, shift=SHIFT)
    low.unet.to(torch.bfloat16)  # the text encoder stays fp32: the engine casts the conditioning
    seen: list[tuple[torch.dtype, torch.dtype]] = []
    real_predict = low.predict

    def spy(x_t, sigma, c, guidance_scale=1.0):
        seen.append((x_t.dtype, c.tensors["prompt_embeds"].dtype))
        return real_predict(x_t, sigma, c, guidance_scale)

    low.predict = spy
    spec = BranchSpec.flat(2, 2, 0.7)
    tree = rollout(low, cond, spec, prompts=PROMPTS, generator=gen(0), keep_means=True, decode=False)
    assert seen == [(torch.bfloat16, torch.bfloat16)] * 2
    for name in ("x_t", "x_next", "leaf_latents", "log_prob_old", "noise_std", "mean_old"):
        assert getattr(tree, name).dtype == torch.float32, name
    ode = sample_ode(low, cond, 2, latents=tree.x_t[:2].clone())
    assert ode.dtype == torch.float32 and seen[-1] == (torch.bfloat16, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_rollout_with_cpu_generator(cond):
    cuda = build_toy_adapter(seed=0, shift=SHIFT).to("cuda")
    spec = BranchSpec(num_steps=3, noise_levels=(0.7, 0.7, 0.7), samples_per_prompt=2, splits=((1, 2),))
    tree = rollout(cuda, cond.to("cuda"), spec, prompts=PROMPTS, generator=gen(0), group_ids=torch.tensor([3, 4]))
    check_tree_structure(tree.to("cpu"), spec, len(PROMPTS))
    assert tree.x_t.device.type == "cuda" and tree.leaf_edges.device.type == "cuda"
    # A CPU generator gives the same initial noise whatever device the model lives on.
    assert torch.equal(tree.x_t[tree.step == 0].cpu(), torch.randn(4, 1, 16, 16, generator=gen(0)))
    assert tree.leaf_group.tolist() == [3] * 4 + [4] * 4
