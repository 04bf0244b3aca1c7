"""SAGE-GRPO (flowalign/algorithms/sage_grpo.py, flowalign/samplers/sage.py): the manifold-aware SDE and its
log-prob against torch.distributions, the gradient-norm equalizer by hand, the dual trust region (KL to the moving
anchor vs torch.distributions.kl_divergence, the stepwise KL, the anchor's refresh schedule), the config checks, and
two iterations of configs/sage_grpo/quickstart.yaml (digits) and configs/sage_grpo/wan_jpeg.yaml (tiny Wan)."""

from __future__ import annotations

import math
import os
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.distributions import Normal, kl_divergence

from flowalign.algorithms.sage_grpo import SageGRPO, equalizer_scales, log_prob_grad_norms, stepwise_kl
from flowalign.config import load_config
from flowalign.errors import ConfigError
from flowalign.losses import kl_on_means, ppo_clip_loss
from flowalign.samplers import gaussian_log_prob, ode_step, sde_step
from flowalign.samplers.sage import sage_mean, sage_variance

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/sage_grpo/quickstart.yaml"
WAN_CONFIG = "configs/sage_grpo/wan_jpeg.yaml"


# ------------------------------------------------------------------------------------------------
# the manifold-aware SDE (arXiv:2603.21872 §3.2.1)
# ------------------------------------------------------------------------------------------------
def test_sage_variance_by_hand_and_as_the_integral_of_flow_grpo_diffusion():
    s, sn, eta = torch.tensor([0.75, 0.5, 1.0]), torch.tensor([0.5, 0.25, 0.9]), torch.tensor([0.5, 0.5, 1.0])
    var = sage_variance(s, sn, eta)
    # 0.25 (log(0.5 / 0.25) - 0.25) = 0.110786795; 0.25 (log(0.75 / 0.5) - 0.25) = 0.038866277
    # sigma = 1 is clamped to 1 - 3e-3 inside the log only: log(0.1 / 0.003) - 0.1 = 3.406569826
    assert torch.allclose(var, torch.tensor([0.110786795, 0.038866277, 3.406569826]), rtol=1e-5)
    # an independent computation: the integral of Flow-GRPO's g(s)^2 = eta^2 s / (1 - s) over [sigma_next, sigma]
    for i in range(2):
        grid = torch.linspace(float(sn[i]), float(s[i]), 200001, dtype=torch.float64)
        integral = torch.trapezoid(eta[i].double() ** 2 * grid / (1 - grid), grid)
        assert math.isclose(float(var[i]), float(integral), rel_tol=1e-6)
        euler = float(eta[i]) ** 2 * float(s[i]) / (1 - float(s[i])) * float(s[i] - sn[i])  # Flow-GRPO's step variance
        assert euler > float(var[i])  # 0.1875 > 0.1108, 0.0625 > 0.0389: Euler injects excess noise at high sigma


def test_sage_step_mean_and_log_prob_match_torch_normal():
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    noise = torch.randn(3, 4, 2, 2, generator=g)
    s, sn, eta = torch.tensor([1.0, 0.6, 0.3]), torch.tensor([0.8, 0.45, 0.1]), torch.tensor([0.5, 0.7, 1.0])
    out = sde_step(v, s, sn, x, kind="sage", noise_level=eta, noise=noise)
    for i in range(3):
        si, sni, ei = float(s[i]), float(sn[i]), float(eta[i])
        var = ei**2 * (math.log((1 - sni) / (1 - min(si, 1 - 3e-3))) - (si - sni))
        # the authors' lines (sde_type "sage_grpo", sde_solver=True): x + dt v + 0.5 var score,
        # score = -(x - x0_hat (1 - sigma)) / sigma^2, x0_hat = x - sigma v
        x0_hat = x[i] - si * v[i]
        score = -(x[i] - x0_hat * (1 - si)) / si**2
        mean = x[i] + (sni - si) * v[i] + 0.5 * var * score
        assert torch.allclose(out.mean[i], mean, atol=1e-6)
        assert math.isclose(float(out.std[i]), math.sqrt(var), rel_tol=1e-6)
        assert torch.allclose(out.prev_sample[i], mean + math.sqrt(var) * noise[i], atol=1e-5)
        expected = Normal(mean.double(), math.sqrt(var)).log_prob(out.prev_sample[i].double()).mean()
        assert math.isclose(float(out.log_prob[i]), float(expected), rel_tol=1e-5, abs_tol=1e-6)
    # rescoring the sampled transition gives the same log-prob (ratio exactly 1 on-policy)
    again = sde_step(v, s, sn, x, kind="sage", noise_level=eta, prev_sample=out.prev_sample)
    assert torch.equal(again.log_prob, out.log_prob)


def test_sage_noise_level_zero_is_the_ode_step_and_mean_matches_flow_grpo_form():
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(2, 8, generator=g), torch.randn(2, 8, generator=g)
    out = sde_step(v, 0.7, 0.5, x, kind="sage", noise_level=0.0, generator=g)
    assert torch.equal(out.prev_sample, ode_step(v, 0.7, 0.5, x)) and torch.equal(out.log_prob, torch.zeros(2))
    # with var = Flow-GRPO's g^2 delta the SAGE mean is Flow-GRPO's mean: same drift, only the variance differs
    s, sn, a = torch.full((2,), 0.7), torch.full((2,), 0.5), 0.7
    euler_var = torch.full((2,), a**2 * 0.7 / 0.3 * 0.2)
    flow = sde_step(v, s, sn, x, kind="flow_grpo", noise_level=a, prev_sample=x)
    assert torch.allclose(sage_mean(x, v, s, sn, euler_var), flow.mean, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# the gradient-norm equalizer
# ------------------------------------------------------------------------------------------------
def _authors_grad_norm(kind: str, s: float, sn: float, eta: float) -> float:
    """An independent transcription of the authors' ``compute_log_prob_grad_norms`` (sde_solver=True)."""
    dt = sn - s
    if kind == "sage":
        var = eta**2 * (-(s - sn) + math.log((1 - sn) / (1 - min(s, 1 - 3e-3))))
        return abs(dt - 0.5 * var * (1 - s) / s) / math.sqrt(var)
    if kind == "flow_grpo":  # sigma_max = sigmas[1] replaces sigma = 1 in the denominator
        std_t = math.sqrt(s / (1 - (sn if s == 1 else s))) * eta
        return abs(dt * (1 + std_t**2 * (1 - s) / (2 * s))) / (std_t * math.sqrt(-dt))
    std = sn * math.sin(eta * math.pi / 2)  # cps
    return abs(-s * (1 - sn) + (1 - s) * math.sqrt(sn**2 - std**2)) / std


@pytest.mark.parametrize("kind, eta", [("sage", 0.5), ("flow_grpo", 0.7), ("cps", 0.5)])
def test_grad_norms_match_the_authors_formulas(kind, eta):
    # ends at 0.02, not 0: cps's last step to 0 is deterministic (std 0; the authors divide by max(std, 1e-12))
    sigmas = torch.tensor([1.0, 0.8, 0.55, 0.3, 0.1, 0.02])
    got = log_prob_grad_norms(kind, sigmas, torch.full((5,), eta))
    want = [_authors_grad_norm(kind, float(sigmas[t]), float(sigmas[t + 1]), eta) for t in range(5)]
    assert torch.allclose(got, torch.tensor(want), rtol=1e-5)


def test_equalizer_by_hand():
    # sage, eta 0.5, sigmas 1, 0.75, 0.5, 0.25, 0 (worked out in docs/FIDELITY.md's SAGE-GRPO section):
    #   step 0: var = 0.25 (log(0.25 / 0.003) - 0.25) = 1.0432122, |dmean/dv| = 0.25 (+ 0: 1 - sigma = 0), g = 0.2447675
    #   step 1: var = 0.1107868, |dmean/dv| = 0.25 + 0.1107868 * 0.25 / 1.5 = 0.2684645, g = 0.8065714
    #   step 2: var = 0.0388663, |dmean/dv| = 0.25 + 0.0388663 * 0.5 / 1.0 = 0.2694331, g = 1.3666728
    #   step 3: var = 0.0094205, |dmean/dv| = 0.25 + 0.0094205 * 0.75 / 0.5 = 0.2641308, g = 2.7213325
    # torch.median of 4 values is the lower middle one, 0.8065714: scales = 0.8065714 / g
    g = log_prob_grad_norms("sage", torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]), torch.full((4,), 0.5))
    assert torch.allclose(g, torch.tensor([0.2447675, 0.8065714, 1.3666728, 2.7213325]), rtol=1e-5)
    scales = equalizer_scales(g)
    assert torch.allclose(scales, torch.tensor([3.2952553, 1.0, 0.5901715, 0.2963884]), rtol=1e-5)
    # a deterministic step (noise 0) has no gradient norm: scale 1, left out of the median
    g2 = log_prob_grad_norms("sage", torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]), torch.tensor([0.5, 0.5, 0.0, 0.5]))
    assert math.isnan(float(g2[2]))
    assert torch.allclose(equalizer_scales(g2), torch.tensor([0.8065714 / 0.2447675, 1.0, 1.0, 0.8065714 / 2.7213325]),
                          rtol=1e-5)


def test_scaling_advantages_scales_each_edges_ppo_term():
    # PPO-clip's per-edge term is positively homogeneous in A: scaling A by c scales the edge's loss by c
    lp, lp_old = torch.tensor([-1.0, -1.2, -0.7]), torch.tensor([-1.0005, -1.1, -0.7002])
    adv, c = torch.tensor([1.5, -0.5, 2.0]), torch.tensor([3.0, 0.25, 1.0])
    for i in range(3):
        one = ppo_clip_loss(lp[i:i + 1], lp_old[i:i + 1], adv[i:i + 1], clip_range=1e-4)[0]
        scaled = ppo_clip_loss(lp[i:i + 1], lp_old[i:i + 1], c[i:i + 1] * adv[i:i + 1], clip_range=1e-4)[0]
        assert math.isclose(float(scaled), float(c[i] * one), rel_tol=1e-6)


# ------------------------------------------------------------------------------------------------
# the dual trust region (arXiv:2603.21872 §3.2.2)
# ------------------------------------------------------------------------------------------------
def test_anchor_kl_matches_torch_kl_divergence():
    g = torch.Generator().manual_seed(2)
    mean, mean_anchor = torch.randn(3, 4, 5, generator=g), torch.randn(3, 4, 5, generator=g)
    std = torch.tensor([0.3, 0.05, 1.2])
    got = kl_on_means(mean, mean_anchor, std)
    for i in range(3):
        want = kl_divergence(Normal(mean[i].double(), float(std[i])), Normal(mean_anchor[i].double(), float(std[i]))).mean()
        assert math.isclose(float(got[i]), float(want), rel_tol=1e-5)


def test_stepwise_kl_by_hand_and_as_a_monte_carlo_kl():
    lp, lp_old = torch.tensor([-1.5, -1.0]), torch.tensor([-1.0, -2.0])
    assert math.isclose(float(stepwise_kl(lp, lp_old)), (0.5 - 1.0) / 2)
    assert math.isclose(float(stepwise_kl(lp, lp_old, torch.tensor([3.0, 1.0]))), (3 * 0.5 - 1.0) / 4)
    # on transitions sampled from the old policy it estimates KL(old || new): one 10^6-element latent,
    # per-element mean log-densities; the estimate's std is (d / s) / sqrt(D) = 4e-4
    g = torch.Generator().manual_seed(3)
    mu_old, mu_new, s = torch.zeros(1, 10**6), torch.full((1, 10**6), 0.4), 1.0
    x = mu_old + s * torch.randn(1, 10**6, generator=g)
    est = stepwise_kl(gaussian_log_prob(x, mu_new, s), gaussian_log_prob(x, mu_old, s))
    exact = kl_divergence(Normal(0.0, s), Normal(0.4, s))  # 0.08
    assert abs(float(est) - float(exact)) < 5 * 0.4 / 1000


def _algorithm(monkeypatch, overrides: list[str]) -> SageGRPO:
    monkeypatch.chdir(REPO)
    return SageGRPO(load_config(CONFIG, overrides))


def test_dual_trust_region_loss_by_hand(monkeypatch):
    alg = _algorithm(monkeypatch, ["algorithm.kl_beta=0.5", "algorithm.sage_grpo.anchor_weight=2.0",
                                   "algorithm.sage_grpo.step_kl_weight=0.3", "algorithm.clip_range=0.01"])
    lp = torch.tensor([-1.0, -2.0], requires_grad=True)
    lp_old, adv, kl = torch.tensor([-1.002, -1.9]), torch.tensor([1.0, -2.0]), torch.tensor([0.2, 0.6])
    mean, std, delta = torch.zeros(2, 3), torch.ones(2), torch.ones(2)
    loss, m = alg.edge_loss(lp, lp_old, adv, weights=None, kl=kl, mean=mean, mean_old=None, std=std, delta=delta)
    r = [math.exp(0.002), math.exp(-0.1)]
    policy = (max(-1.0 * r[0], -1.0 * min(r[0], 1.01)) + max(2.0 * r[1], 2.0 * max(r[1], 0.99))) / 2
    step = ((-1.002 + 1.0) + (-1.9 + 2.0)) / 2
    want = policy + 0.5 * (2.0 * 0.4 + 0.3 * step)
    assert math.isclose(loss.item(), want, rel_tol=1e-6) and math.isclose(float(m["loss"]), want, rel_tol=1e-6)
    assert math.isclose(float(m["kl"]), 0.4, rel_tol=1e-6) and math.isclose(float(m["step_kl"]), step, rel_tol=1e-5)
    # without kl_beta (kl None) the loss is plain PPO-clip; step_kl is still logged
    plain, m0 = alg.edge_loss(lp, lp_old, adv, weights=None, kl=None, mean=mean, mean_old=None, std=std, delta=delta)
    assert math.isclose(plain.item(), policy, rel_tol=1e-6) and "step_kl" in m0


class _Adapter:
    def __init__(self, wrapped: nn.Module):
        self.routed = wrapped

    def set_trainable_module(self, module: nn.Module) -> None:
        self.routed = module


def test_anchor_is_refreshed_every_n_iterations_and_routes_predict(monkeypatch):
    alg = _algorithm(monkeypatch, ["algorithm.sage_grpo.anchor_every=3", "train.checkpoint_every=0"])
    module = nn.Linear(2, 2)
    recipe = SimpleNamespace(module=module, wrapped=module, adapter=_Adapter(module))
    anchors, policies = [], []
    for it in range(7):
        alg._iteration = it  # what targets() records for the iteration
        policies.append(module.weight.detach().clone())
        with torch.no_grad():
            for _ in range(2):  # two micro-batches: the anchor is taken once per refresh iteration
                with alg.reference_policy(recipe):
                    assert recipe.adapter.routed is alg._anchor and recipe.adapter.routed is not module
                    anchors.append(alg._anchor.weight.detach().clone())
                assert recipe.adapter.routed is module  # back to the policy
                module.weight.add_(1.0)  # an optimizer step
        assert not any(p.requires_grad for p in alg._anchor.parameters())
    # taken at iterations 0, 3, 6, before that iteration's first update
    taken = [0, 0, 0, 3, 3, 3, 6]
    for it in range(7):
        assert torch.equal(anchors[2 * it], policies[taken[it]]) and torch.equal(anchors[2 * it + 1], policies[taken[it]])


@pytest.mark.parametrize("overrides, key", [
    (["algorithm.sage_grpo.anchor_every=0"], "algorithm.sage_grpo.anchor_every"),
    (["algorithm.sage_grpo.step_kl_weight=-1"], "algorithm.sage_grpo.step_kl_weight"),
    (["train.checkpoint_every=15"], "train.checkpoint_every"),
    (["train.fsdp.enabled=true"], "train.fsdp.enabled"),
    (["sampling.sampler=euler"], "sampling.sampler"),
])
def test_config_errors_name_the_key(monkeypatch, overrides, key):
    monkeypatch.chdir(REPO)
    with pytest.raises(ConfigError, match=f"^{key}"):
        load_config(CONFIG, overrides)


def test_without_kl_the_anchor_constraints_do_not_apply(monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = load_config(CONFIG, ["algorithm.kl_beta=0", "train.checkpoint_every=15"])
    assert cfg.algorithm.sage_grpo.anchor_every == 10


# ------------------------------------------------------------------------------------------------
# runs
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_quickstart_runs_two_iterations(tmp_path, monkeypatch):
    import flowalign
    from flowalign.training.metrics import read_metrics

    monkeypatch.chdir(REPO)
    overrides = {"train.iterations": 2, "data.prompts_per_iter": 2, "output_dir": str(tmp_path / "run"),
                 "eval.samples_per_prompt": 1, "eval.every": 0, "logging.progress": False, "logging.tensorboard": False,
                 "train.checkpoint_every": 0}
    summary = flowalign.train(os.path.join(REPO, CONFIG), overrides)
    records = [r for r in read_metrics(os.path.join(summary["output_dir"], "metrics.jsonl")) if "train/loss" in r]
    assert len(records) == 2 and summary["after"]["eval/reward"] >= 0
    for r in records:
        assert r["train/ratio_first_step_dev"] < 1e-5  # on-policy at the first inner step
        assert r["rollout/nfe"] == 2 * 8 * 10 and r["rollout/trained_edges"] == 2 * 8 * 6
        assert all(math.isfinite(r[k]) for k in ("train/loss", "train/grad_norm", "train/kl", "train/step_kl"))
        # the equalizer's scales of the trained steps 0..5 of the digits schedule
        assert 0 < r["train/equalizer_min"] < 1 < r["train/equalizer_max"]
    # iteration 0 starts at the anchor, iteration 1 has moved away from it (anchor_every = 10)
    assert records[1]["train/kl"] > records[0]["train/kl"] > 0


@pytest.mark.slow
def test_crash_and_resume_at_an_anchor_refresh_equals_uninterrupted_run(tiny_config, tmp_path):
    """The anchor is not checkpointed; resuming at a multiple of anchor_every (what check() enforces) re-takes it
    from the resumed weights exactly as the uninterrupted run refreshes it there."""
    import flowalign
    from tests.test_recipe import _CrashingReward, _records, _weights

    tiny_config["sampling"]["sampler"] = "sage"
    tiny_config["algorithm"].update(name="sage_grpo", kl_beta=0.5, sage_grpo={"anchor_every": 2})
    tiny_config["train"].update(iterations=3, checkpoint_every=2)
    straight = dict(tiny_config, output_dir=str(tmp_path / "straight"))
    flowalign.train(straight, rewards=_CrashingReward(None))
    resumed = dict(tiny_config, output_dir=str(tmp_path / "resumed"))
    with pytest.raises(KeyboardInterrupt):  # reward calls: eval@0, it 0, it 1, it 2 -> crash after the checkpoint at 2
        flowalign.train(resumed, rewards=_CrashingReward(crash_on_call=4))
    flowalign.train(resumed, rewards=_CrashingReward(None))
    a, b = _weights(straight["output_dir"]), _weights(resumed["output_dir"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    records = _records(straight["output_dir"])
    assert records == _records(resumed["output_dir"])
    assert all(r["train/kl"] > 0 for r in records if "train/kl" in r)  # the anchor term is active


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory) -> str:
    from tests.test_adapter_wan import tiny_pipeline

    path = str(tmp_path_factory.mktemp("tiny-wan-sage"))
    tiny_pipeline().save_pretrained(path)
    return path


@pytest.mark.slow
def test_wan_config_runs_two_iterations(wan_dir, tmp_path, prompt_files, monkeypatch):
    import flowalign
    from flowalign.training.metrics import read_metrics
    from tests.test_adapter_wan import SIZE
    from tests.tiny_components import VIDEO_GRPO, grpo_overrides

    monkeypatch.chdir(REPO)

    def mean_frame_brightness(media, prompts, metadata=None):
        assert media.ndim == 5 and media.shape[1:] == (SIZE["num_frames"], 3, 16, 16)
        return media.mean(dim=(1, 2, 3, 4))

    train, evaluation = prompt_files
    # kl_beta raised so the trust region's terms are visible at this scale
    overrides = grpo_overrides(wan_dir, str(tmp_path / "run"), train, evaluation, VIDEO_GRPO,
                               **{"model.options": dict(SIZE), "sampling.num_steps": 3, "algorithm.kl_beta": 0.1})
    summary = flowalign.train(os.path.join(REPO, WAN_CONFIG), overrides, rewards=mean_frame_brightness)
    assert summary["iterations"] == 2
    records = [r for r in read_metrics(os.path.join(summary["output_dir"], "metrics.jsonl")) if "train/loss" in r]
    assert len(records) == 2
    for r in records:
        assert r["train/ratio_first_step_dev"] < 1e-2  # bf16 model: the tolerance of docs/ARCHITECTURE.md
        assert all(math.isfinite(r[k]) for k in ("train/loss", "train/grad_norm", "train/kl", "train/step_kl"))
    assert records[1]["train/kl"] > 0  # the LoRA policy has moved away from the anchor taken at iteration 0
    assert os.path.exists(os.path.join(tmp_path, "run", "final", "model_index.json"))
