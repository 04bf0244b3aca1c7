"""FIND (flowalign/algorithms/find.py, flowalign/losses/find.py) and GDRO (flowalign/algorithms/gdro.py,
flowalign/losses/gdro.py): the math by hand and against independent implementations (torch.distributions for
FIND's log-density), the config checks, two iterations of each quickstart config through ``flowalign.train``,
FIND's noise policy carried by checkpoints and resume, GDRO's frozen reference copy checkpointed."""

from __future__ import annotations

import math
import os

import pytest
import torch

from flowalign.config import load_config
from flowalign.errors import ConfigError
from flowalign.losses.find import NoisePolicy, gaussian_log_prob, prompt_features, reparameterize, value_loss
from flowalign.losses.gdro import gdro_objective, group_cross_entropy_loss, implicit_reward, plackett_luce_loss
from flowalign.types import Conditioning

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/gdro/quickstart.yaml"
FIND_CONFIG = "configs/find/quickstart.yaml"
QUICK = {"train.iterations": 2, "data.prompts_per_iter": 2, "eval.samples_per_prompt": 1, "eval.every": 0,
         "logging.progress": False, "logging.tensorboard": False, "train.checkpoint_every": 0}


# ------------------------------------------------------------------------------------------------
# FIND: the math
# ------------------------------------------------------------------------------------------------
def test_gaussian_log_prob_matches_torch_distributions():
    torch.manual_seed(0)
    z, mean, log_std = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4), 0.3 * torch.randn(3, 2, 4, 4)
    expected = torch.distributions.Normal(mean, log_std.exp()).log_prob(z).flatten(1).sum(dim=1)
    assert torch.allclose(gaussian_log_prob(z, mean, log_std), expected, atol=1e-4)
    # broadcast parameters (one mean / log-std for every sample)
    expected = torch.distributions.Normal(mean[:1], log_std[:1].exp()).log_prob(z).flatten(1).sum(dim=1)
    assert torch.allclose(gaussian_log_prob(z, mean[:1], log_std[:1]), expected, atol=1e-4)


def test_gaussian_log_prob_by_hand():
    # one dim: z = 1, mu = 0, sigma = e: -(1/e)^2/2 - 1 - ln(2 pi)/2; its gradient in mu is (z - mu)/sigma^2 = e^-2
    mean = torch.zeros(1, 1, requires_grad=True)
    log_std = torch.ones(1, 1, requires_grad=True)
    lp = gaussian_log_prob(torch.ones(1, 1), mean, log_std)
    assert lp.item() == pytest.approx(-0.5 * math.exp(-2) - 1 - 0.5 * math.log(2 * math.pi), rel=1e-6)
    lp.sum().backward()
    assert mean.grad.item() == pytest.approx(math.exp(-2), rel=1e-6)
    assert log_std.grad.item() == pytest.approx(math.exp(-2) - 1, rel=1e-6)  # (z-mu)^2/sigma^2 - 1
    assert reparameterize(torch.tensor([2.0]), torch.tensor([1.0]), torch.tensor([math.log(3.0)])).item() == pytest.approx(7.0)
    assert value_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0])).item() == 0.5


def test_noise_policy_starts_at_standard_normal():
    policy = NoisePolicy(feature_dim=5, latent_shape=(1, 2, 2), hidden=8)
    mean, log_std, value = policy(torch.randn(3, 5))
    assert mean.shape == log_std.shape == (3, 1, 2, 2) and value.shape == (3,)
    assert not mean.any() and not log_std.any() and not value.any()
    noise = torch.randn(3, 1, 2, 2)
    assert torch.equal(reparameterize(noise, mean, log_std), noise)  # z_T = epsilon exactly before training
    with torch.no_grad():
        policy.log_std_head.bias.fill_(10.0)
    assert policy(torch.randn(1, 5))[1].max().item() == 1.0  # clamped at log_std_max
    with pytest.raises(ValueError, match="log_std_min < 0 < log_std_max"):
        NoisePolicy(5, (1,), log_std_min=0.5)


def test_prompt_features_pool_sequences_and_skip_integer_tensors():
    embeds = torch.arange(12.0).view(1, 3, 4)  # mean over the 3 tokens: 4, 5, 6, 7
    cond = Conditioning({"prompt_embeds": embeds, "pooled": torch.ones(1, 2), "mask": torch.ones(1, 3, dtype=torch.long)})
    assert prompt_features(cond).tolist() == [[1.0, 1.0, 4.0, 5.0, 6.0, 7.0]]  # "pooled" < "prompt_embeds"
    with pytest.raises(ValueError, match="no floating tensor"):
        prompt_features(Conditioning({"ids": torch.ones(1, 3, dtype=torch.long)}))


@pytest.mark.parametrize("overrides, key", [
    (["model.lora_rank=4"], "model.lora_rank"),
    (["algorithm.kl_beta=0.1"], "algorithm.kl_beta"),
    (["sampling.init_same_noise=true"], "sampling.init_same_noise"),
    (["algorithm.find.baseline=value"], "algorithm.find.baseline"),
])
def test_find_config_errors_name_the_key(monkeypatch, overrides, key):
    monkeypatch.chdir(REPO)
    with pytest.raises(ConfigError, match=f"^{key}"):
        load_config(FIND_CONFIG, overrides)


# ------------------------------------------------------------------------------------------------
# FIND: training, checkpoint and resume
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def find_run(tmp_path_factory):
    """Two iterations of the FIND quickstart (2 prompts x 8 noises, 10 ODE steps), checkpointed at the end."""
    import flowalign

    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        out = str(tmp_path_factory.mktemp("find") / "run")
        summary = flowalign.train(FIND_CONFIG, {**QUICK, "output_dir": out})
    finally:
        os.chdir(cwd)
    return summary


@pytest.mark.slow
def test_find_quickstart_runs_two_iterations_with_a_frozen_generator(find_run):
    from safetensors.torch import load_file

    from flowalign.training.metrics import read_metrics

    records = [r for r in read_metrics(os.path.join(find_run["output_dir"], "metrics.jsonl")) if "train/loss" in r]
    assert len(records) == 2 and find_run["after"]["eval/reward"] >= 0
    for r in records:
        assert r["train/ratio_first_step_dev"] == 0.0  # old log-probs computed in the update's own micro-batches
        assert all(math.isfinite(r[k]) for k in ("train/loss", "train/policy_loss", "train/value_loss", "train/grad_norm"))
        assert r["rollout/nfe"] == 2 * 8 * 10 and r["rollout/trained_edges"] == 16  # ODE rollout; one action per sample
    # the first iteration starts at N(0, I): the policy's mean is 0 in its first micro-batch, and moves after
    assert records[1]["train/noise_mean_abs"] > 0
    model = load_file(os.path.join(find_run["output_dir"], "checkpoints", "step-000002", "model.safetensors"))
    assert model and all(n.startswith("find_noise_policy.") for n in model)  # only the noise policy is trained
    assert model["find_noise_policy.mean_head.weight"].abs().sum() > 0


def test_find_rollout_starts_from_the_policy_noise_with_the_ode(tmp_path, monkeypatch):
    """The rollout's initial latents are mu(c) + sigma(c) x the ("init_noise", iteration) stream's draws, the
    sampler is deterministic, and the update reads each sample's drawn noise back from the tree."""
    from flowalign.recipes.awm import AWMRecipe
    from flowalign.rollout import rollout
    from flowalign.training.rng import stream_generator

    monkeypatch.chdir(REPO)
    cfg = load_config(FIND_CONFIG, {**QUICK, "sampling.num_steps": 2, "output_dir": str(tmp_path / "find")})
    recipe = AWMRecipe(cfg)
    recipe.setup()
    try:
        with torch.no_grad():
            recipe.algorithm.noise_policy.mean_head.bias.fill_(0.5)
            recipe.algorithm.noise_policy.log_std_head.bias.fill_(math.log(2.0))
        prompts = recipe.train_prompts[:2]
        cond = recipe._encode(prompts, recipe.train_records[:2], "")
        spec = recipe.algorithm.rollout_spec(0, 1)
        assert spec.noise_levels == (0.0, 0.0)
        init = recipe._policy_initial_latents(cond, spec, 0)
        eps = recipe.adapter.init_latents(16, stream_generator(cfg.seed, "init_noise", 0))
        assert torch.allclose(init, 0.5 + 2.0 * eps)
        tree = rollout(recipe.adapter, cond, spec, prompts=prompts, generator=stream_generator(cfg.seed, "rollout", 0, 0),
                       initial_latents=init, shard=recipe.shard)
        assert torch.equal(tree.x_t[tree.leaf_edges[:, 0].long()], init) and tree.nfe == 16 * 2
    finally:
        recipe.cleanup()


@pytest.mark.slow
def test_find_resume_restores_the_noise_policy(find_run, tmp_path):
    """A resumed run loads the noise policy's weights (and the optimizer's state for them) from the checkpoint."""
    import shutil

    from safetensors.torch import load_file

    from flowalign.recipes.awm import AWMRecipe

    run = str(tmp_path / "resumed")
    shutil.copytree(find_run["output_dir"], run)
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        recipe = AWMRecipe(load_config(FIND_CONFIG, {**QUICK, "train.iterations": 3, "output_dir": run}))
        recipe.setup()
        try:
            saved = load_file(os.path.join(run, "checkpoints", "step-000002", "model.safetensors"))
            assert recipe.start_iteration == 2
            policy = recipe.algorithm.noise_policy
            for name, value in policy.state_dict().items():
                assert torch.equal(value, saved[f"find_noise_policy.{name}"]), name
            assert all(recipe.optimizer.state[p] for p in policy.parameters())  # Adam moments restored
            noise = torch.randn(2, *recipe.adapter.latent_shape)
            cond = recipe.adapter.encode(["a handwritten three", "a handwritten seven"])
            assert not torch.equal(recipe.algorithm.initial_latents(noise, cond), noise)  # the trained policy shapes it
        finally:
            recipe.cleanup()
    finally:
        os.chdir(cwd)


# ------------------------------------------------------------------------------------------------
# the math
# ------------------------------------------------------------------------------------------------
def test_implicit_reward_by_hand():
    # row 0: v - u = (1, 1) -> mse 1; v_ref - u = (0, 2) -> mse 2; r = -beta (1 - 2) = 2 with beta 2
    # row 1: v - u = (0, 0) -> mse 0; v_ref - u = (1, -1) -> mse 1; r = -2 (0 - 1) = 2 ... shifted: u = 1
    u = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    v = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    v_ref = torch.tensor([[0.0, 2.0], [2.0, 0.0]])
    assert implicit_reward(v, v_ref, u, beta=2.0).tolist() == pytest.approx([2.0, 2.0])
    assert implicit_reward(v_ref, v, u, beta=0.5).tolist() == pytest.approx([-0.5, -0.5])
    assert implicit_reward(v, v, u, beta=3.0).tolist() == [0.0, 0.0]  # the reference itself: r = 0
    with pytest.raises(ValueError, match="beta"):
        implicit_reward(v, v, u, beta=0.0)


def test_implicit_reward_gradient_flows_only_through_the_policy():
    u = torch.zeros(1, 2)
    v = torch.tensor([[1.0, 2.0]], requires_grad=True)
    v_ref = torch.tensor([[3.0, 0.0]], requires_grad=True)
    implicit_reward(v, v_ref, u, beta=1.0).sum().backward()
    assert v.grad.tolist() == [[-1.0, -2.0]]  # d/dv of -mean(v^2) = -2 v / 2
    assert v_ref.grad is None


def test_cross_entropy_loss_by_hand():
    # one group of 2: explicit (0, ln 3) at tau 1 -> target (1/4, 3/4); implicit (0, 0) -> log q = ln 1/2 each
    implicit = torch.zeros(1, 2, requires_grad=True)
    explicit = torch.tensor([[0.0, math.log(3.0)]])
    loss = group_cross_entropy_loss(implicit, explicit)
    assert loss.item() == pytest.approx(math.log(2.0))
    loss.backward()  # d/d r_hat_i = softmax(r_hat)_i - target_i = (1/2 - 1/4, 1/2 - 3/4)
    assert implicit.grad.tolist() == [pytest.approx([0.25, -0.25])]
    # tau 2 halves the explicit logits: target softmax(0, ln 3 / 2) = (1/(1+sqrt 3), sqrt 3/(1+sqrt 3))
    r = torch.tensor([[1.0, -1.0]])
    p = [1 / (1 + math.sqrt(3)), math.sqrt(3) / (1 + math.sqrt(3))]
    lse = math.log(math.exp(1.0) + math.exp(-1.0))
    expected = -(p[0] * (1.0 - lse) + p[1] * (-1.0 - lse))
    assert group_cross_entropy_loss(r, explicit, temperature=2.0).item() == pytest.approx(expected, rel=1e-6)


def test_cross_entropy_loss_averages_groups_and_matches_torch():
    torch.manual_seed(0)
    implicit, explicit = torch.randn(3, 5), torch.randn(3, 5)
    per_group = [torch.nn.functional.cross_entropy(implicit[p:p + 1], torch.softmax(explicit[p:p + 1] / 0.5, dim=1))
                 for p in range(3)]
    assert group_cross_entropy_loss(implicit, explicit, 0.5).item() == pytest.approx(sum(per_group).item() / 3, rel=1e-6)


def _plackett_luce_reference(implicit: list[float], explicit: list[float]) -> float:
    """An independent Plackett-Luce negative log-likelihood: pick the best remaining member, one at a time."""
    order = sorted(range(len(explicit)), key=lambda i: -explicit[i])
    nll = 0.0
    for k in range(len(order) - 1):
        rest = order[k:]
        nll -= implicit[order[k]] - math.log(sum(math.exp(implicit[j]) for j in rest))
    return nll


def test_plackett_luce_of_a_pair_is_dpo():
    # G = 2: -log sigmoid(r_w - r_l) (DPO, Rafailov et al. 2023, Eq. 7), the winner being the higher explicit reward
    implicit = torch.tensor([[0.3, 1.1]])
    explicit = torch.tensor([[5.0, 1.0]])  # member 0 wins
    assert plackett_luce_loss(implicit, explicit).item() == pytest.approx(-math.log(1 / (1 + math.exp(-(0.3 - 1.1)))), rel=1e-6)


def test_plackett_luce_matches_an_independent_implementation():
    torch.manual_seed(1)
    implicit, explicit = torch.randn(4, 6), torch.randn(4, 6)
    expected = sum(_plackett_luce_reference(implicit[p].tolist(), explicit[p].tolist()) for p in range(4)) / 4
    assert plackett_luce_loss(implicit, explicit).item() == pytest.approx(expected, rel=1e-5)
    # at r_hat = 0 every ranking is equally likely: -log(1 / G!) per group
    assert plackett_luce_loss(torch.zeros(2, 6), explicit[:2]).item() == pytest.approx(math.log(math.factorial(6)), rel=1e-6)


def test_objective_dispatch_and_shape_errors():
    r, a = torch.randn(2, 3), torch.randn(2, 3)
    assert gdro_objective("plackett_luce", r, a, 1.0).item() == plackett_luce_loss(r, a).item()
    assert gdro_objective("cross_entropy", r, a, 1.0).item() == group_cross_entropy_loss(r, a).item()
    with pytest.raises(ValueError, match="algorithm.gdro.objective"):
        gdro_objective("listnet", r, a, 1.0)
    with pytest.raises(ValueError, match=r"\[P, G\] with G >= 2"):
        plackett_luce_loss(torch.zeros(3), torch.zeros(3))


def test_group_leaves():
    from flowalign.algorithms.gdro import group_leaves

    assert group_leaves(torch.tensor([0, 0, 1, 1, 2, 2]), 2).tolist() == [[0, 1], [2, 3], [4, 5]]
    with pytest.raises(ValueError, match="whole group on one rank"):
        group_leaves(torch.tensor([0, 0, 1]), 2)


# ------------------------------------------------------------------------------------------------
# config
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, key", [
    (["train.micro_batch_size=12"], "train.micro_batch_size"),
    (["train.steps_per_iter=3"], "train.steps_per_iter"),
    (["sampling.group_size=1", "train.micro_batch_size=4"], "sampling.group_size"),
    (["algorithm.gdro.objective=listnet"], "algorithm.gdro.objective"),
    (["algorithm.gdro.beta=0"], "algorithm.gdro.beta"),
])
def test_gdro_config_errors_name_the_key(monkeypatch, overrides, key):
    monkeypatch.chdir(REPO)
    with pytest.raises(ConfigError, match=f"^{key}"):
        load_config(CONFIG, overrides)


@pytest.mark.parametrize("name", ["find", "gdro"])
def test_registered_with_a_shipped_config(monkeypatch, name):
    from flowalign.algorithms import ALGORITHMS

    monkeypatch.chdir(REPO)
    cls = ALGORITHMS[name]
    cfg = load_config(cls.config_file)
    assert cfg.algorithm.name == name and cfg.recipe == cls.recipe == "awm"


# ------------------------------------------------------------------------------------------------
# two iterations through flowalign.train
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_gdro_quickstart_runs_two_iterations(tmp_path, monkeypatch):
    """Two iterations of the quickstart; with one optimizer step per iteration every micro-batch of the first
    runs at theta = theta_ref, so r_hat = 0 and the cross-entropy is exactly log G. The reference copy is kept
    frozen and written to the checkpoint beside the moved weights."""
    import flowalign
    from safetensors.torch import load_file

    from flowalign.training.metrics import read_metrics

    monkeypatch.chdir(REPO)
    summary = flowalign.train(CONFIG, {**QUICK, "train.steps_per_iter": 1, "output_dir": str(tmp_path / "gdro")})
    records = [r for r in read_metrics(os.path.join(summary["output_dir"], "metrics.jsonl")) if "train/loss" in r]
    assert len(records) == 2 and summary["after"]["eval/reward"] >= 0
    for r in records:
        assert all(math.isfinite(r[k]) for k in ("train/loss", "train/policy_loss", "train/grad_norm", "train/reward_mean"))
        assert r["rollout/nfe"] == 2 * 8 * 5  # the update spends no rollout evaluation
    assert records[0]["train/policy_loss"] == pytest.approx(math.log(8), abs=1e-6)
    assert records[0]["train/implicit_reward_std"] == 0.0
    assert records[1]["train/implicit_reward_std"] > 0  # the policy moved away from the reference
    ckpt = os.path.join(summary["output_dir"], "checkpoints", "step-000002")
    model, ema = load_file(os.path.join(ckpt, "model.safetensors")), load_file(os.path.join(ckpt, "ema.safetensors"))
    ref = {n.removeprefix("awm_kl_ema/"): t for n, t in ema.items() if n.startswith("awm_kl_ema/")}
    assert ref and set(ref) == set(model)
    assert any(not torch.equal(ref[n], model[n]) for n in model)  # policy moved, reference did not follow
