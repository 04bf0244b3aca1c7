"""AWM (Advantage Weighted Matching): the loss against hand-worked numbers and plain loops, and the
recipe end to end on a tiny saved toy model."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from flowalign.losses.awm import awm_loss, flow_matching_pair
from tests.conftest import REPO


# ------------------------------------------------------------------------------------------------
# flow_matching_pair
# ------------------------------------------------------------------------------------------------
def test_flow_matching_pair_hand_example():
    x0 = torch.tensor([[2.0, -1.0], [0.5, 0.0]])
    eps = torch.tensor([[1.0, 1.0], [-1.0, 3.0]])
    sigma = torch.tensor([0.25, 1.0])
    x_s, target = flow_matching_pair(x0, eps, sigma)
    # row 0: 0.75*[2,-1] + 0.25*[1,1] = [1.75, -0.5]; row 1 (σ=1): pure noise
    assert torch.allclose(x_s, torch.tensor([[1.75, -0.5], [-1.0, 3.0]]))
    assert torch.allclose(target, torch.tensor([[-1.0, 2.0], [-1.5, 3.0]]))
    # the target is the time derivative of the path: d/dσ [(1-σ)x0 + σε] = ε - x0
    h = 1e-3
    x_h, _ = flow_matching_pair(x0.double(), eps.double(), sigma.double() - h)
    assert torch.allclose((x_s.double() - x_h) / h, target.double(), atol=1e-9)


def test_flow_matching_pair_errors():
    x0 = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="noise"):
        flow_matching_pair(x0, torch.zeros(2, 4), torch.zeros(2))
    with pytest.raises(ValueError, match="sigma"):
        flow_matching_pair(x0, torch.zeros(2, 3), torch.zeros(3))
    with pytest.raises(ValueError, match=r"sigma must lie in \[0, 1\]"):
        flow_matching_pair(x0, torch.zeros(2, 3), torch.tensor([0.5, 1.5]))


# ------------------------------------------------------------------------------------------------
# awm_loss
# ------------------------------------------------------------------------------------------------
def test_unit_advantages_give_the_plain_flow_matching_loss():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(5, 2, 3, 3, generator=g, requires_grad=True)
    target = torch.randn(5, 2, 3, 3, generator=g)
    loss, m = awm_loss(v, target, torch.ones(5))
    ref = F.mse_loss(v, target)
    assert torch.allclose(loss, ref, atol=1e-7)
    assert m["fm_loss"] == pytest.approx(ref.item(), rel=1e-6)
    # and the same gradient as the pretraining loss
    (g1,) = torch.autograd.grad(loss, v)
    (g2,) = torch.autograd.grad(F.mse_loss(v, target), v)
    assert torch.allclose(g1, g2, atol=1e-7)


def test_mixed_sign_hand_example():
    # 3 samples, 2 dims; per-sample errors ℓ = mean_d (v - u)^2
    v = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    u = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    adv = torch.tensor([2.0, -1.0, 0.5])
    # ℓ = [(1+0)/2, (0+4)/2, (4+4)/2] = [0.5, 2.0, 4.0]
    # policy = mean(A·ℓ) = (2·0.5 - 1·2.0 + 0.5·4.0) / 3 = 1.0 / 3
    loss, m = awm_loss(v, u, adv)
    assert loss.item() == pytest.approx(1.0 / 3.0, abs=1e-7)
    assert m["fm_loss"] == pytest.approx((0.5 + 2.0 + 4.0) / 3)
    assert m["fm_loss_pos"] == pytest.approx((0.5 + 4.0) / 2)
    assert m["fm_loss_neg"] == pytest.approx(2.0)
    # weights [1, 0, 3]: (1·2·0.5 + 0 + 3·0.5·4.0) / 4 = 7 / 4
    loss_w, _ = awm_loss(v, u, adv, weights=torch.tensor([1.0, 0.0, 3.0]))
    assert loss_w.item() == pytest.approx(7.0 / 4.0, abs=1e-7)


def test_gradient_direction_follows_the_advantage_sign():
    # A > 0 pulls v toward the target, A < 0 pushes it away: dL/dv = 2·A·(v-u)/(N·D)
    v = torch.tensor([[1.0, -1.0], [1.0, -1.0]], requires_grad=True)
    u = torch.zeros(2, 2)
    loss, _ = awm_loss(v, u, torch.tensor([1.0, -3.0]))
    (grad,) = torch.autograd.grad(loss, v)
    expected = torch.tensor([[2 * 1.0 * 1.0, 2 * 1.0 * -1.0], [2 * -3.0 * 1.0, 2 * -3.0 * -1.0]]) / 4
    assert torch.allclose(grad, expected)


def test_against_a_plain_python_loop():
    g = torch.Generator().manual_seed(1)
    n, shape = 6, (3, 4)
    v = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    u = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    vr = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    w = torch.rand(n, generator=g, dtype=torch.float64)
    beta = 0.3
    num_p = num_k = den = 0.0
    for i in range(n):
        fm_i = sum((float(a) - float(b)) ** 2 for a, b in zip(v[i].flatten(), u[i].flatten())) / v[i].numel()
        kl_i = sum((float(a) - float(b)) ** 2 for a, b in zip(v[i].flatten(), vr[i].flatten())) / v[i].numel()
        num_p += float(w[i]) * float(adv[i]) * fm_i
        num_k += float(w[i]) * kl_i
        den += float(w[i])
    loss, m = awm_loss(v, u, adv, v_ref=vr, kl_beta=beta, weights=w)
    assert loss.item() == pytest.approx(num_p / den + beta * num_k / den, rel=1e-5)
    assert m["policy_loss"] == pytest.approx(num_p / den, rel=1e-5)
    assert m["kl"] == pytest.approx(num_k / den, rel=1e-5)


def test_kl_term_hand_example():
    v = torch.tensor([[1.0, 2.0], [0.0, 0.0]], requires_grad=True)
    u = v.detach().clone()  # zero matching error: the loss is the KL term alone
    v_ref = torch.tensor([[0.0, 0.0], [1.0, -3.0]], requires_grad=True)
    # KL_i = mean_d (v - v_ref)^2 = [(1+4)/2, (1+9)/2] = [2.5, 5.0]; mean 3.75; β = 0.2 → 0.75
    loss, m = awm_loss(v, u, torch.tensor([1.0, -1.0]), v_ref=v_ref, kl_beta=0.2)
    assert m["kl"] == pytest.approx(3.75)
    assert m["policy_loss"] == pytest.approx(0.0)
    assert loss.item() == pytest.approx(0.75)
    # reference is a constant: gradient flows only into v, 0.2 · 2 (v - v_ref) / (N·D)
    loss.backward()
    assert torch.allclose(v.grad, 0.2 * 2 * (v.detach() - v_ref.detach()) / 4)
    assert v_ref.grad is None
    # v_ref without kl_beta: KL reported, not added
    loss0, m0 = awm_loss(v, u, torch.tensor([1.0, -1.0]), v_ref=v_ref)
    assert loss0.item() == pytest.approx(0.0) and m0["kl"] == pytest.approx(3.75)


def test_zero_advantages_give_zero_loss_and_no_nan():
    v = torch.randn(4, 3, requires_grad=True)
    loss, m = awm_loss(v, torch.randn(4, 3), torch.zeros(4))
    assert loss.item() == 0.0 and m["fm_loss_pos"] == 0.0 and m["fm_loss_neg"] == 0.0
    (grad,) = torch.autograd.grad(loss, v)
    assert torch.equal(grad, torch.zeros_like(grad))


def test_bf16_inputs_compute_in_float32():
    v = torch.tensor([[1.0, 3.0]], dtype=torch.bfloat16)
    loss, _ = awm_loss(v, torch.zeros(1, 2, dtype=torch.bfloat16), torch.ones(1, dtype=torch.bfloat16))
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(5.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(target=torch.zeros(3, 3)), "target has shape"),
        (dict(advantages=torch.zeros(2)), r"advantages must have shape \[3\]"),
        (dict(v_ref=torch.zeros(3, 5)), "v_ref has shape"),
        (dict(weights=torch.ones(4)), r"weights must have shape \[3\]"),
        (dict(weights=torch.tensor([1.0, -1.0, 1.0])), "weights must be >= 0"),
        (dict(weights=torch.zeros(3)), "positive sum"),
        (dict(kl_beta=-0.1), "kl_beta must be"),
        (dict(kl_beta=float("nan")), "kl_beta must be"),
        (dict(kl_beta=0.1), "needs the reference velocity `v_ref`"),
    ],
)
def test_bad_input_names_the_argument(kwargs, match):
    args = dict(v_pred=torch.zeros(3, 2), target=torch.zeros(3, 2), advantages=torch.zeros(3))
    args.update({k: v for k, v in kwargs.items() if k in args})
    rest = {k: v for k, v in kwargs.items() if k not in args}
    with pytest.raises(ValueError, match=match):
        awm_loss(args["v_pred"], args["target"], args["advantages"], **rest)


def test_non_finite_and_type_errors():
    with pytest.raises(FloatingPointError, match="advantages"):
        awm_loss(torch.zeros(2, 2), torch.zeros(2, 2), torch.tensor([1.0, float("nan")]))
    with pytest.raises(FloatingPointError, match="target"):
        awm_loss(torch.zeros(2, 2), torch.full((2, 2), float("inf")), torch.ones(2))
    with pytest.raises(TypeError, match="advantages"):
        awm_loss(torch.zeros(2, 2), torch.zeros(2, 2), [1.0, 1.0])
    with pytest.raises(ValueError, match="v_pred"):
        awm_loss(torch.zeros(0, 2), torch.zeros(0, 2), torch.zeros(0))


# ------------------------------------------------------------------------------------------------
# recipe helpers
# ------------------------------------------------------------------------------------------------
def test_leaf_advantages_from_edges():
    from flowalign.advantages import edge_advantages
    from flowalign.recipes.awm import leaf_advantages_from_edges

    # a tree with a shared prefix: edges 0 (root, shared), 1, 2 (leaf 0 / leaf 1 tails), 3 -> 4 (leaf 2)
    leaf_edges = torch.tensor([[0, 1], [0, 2], [3, 4]])
    leaf_adv = torch.tensor([1.0, -2.0, 0.5])
    edge_adv = edge_advantages(leaf_adv, leaf_edges, 5)
    assert edge_adv[0].item() == pytest.approx(-0.5)  # shared edge: the mean of leaves 0 and 1
    assert torch.equal(leaf_advantages_from_edges(edge_adv, leaf_edges), leaf_adv)
    with pytest.raises(ValueError, match="padding"):
        leaf_advantages_from_edges(edge_adv, torch.tensor([[0, -1], [0, 2]]))
    with pytest.raises(ValueError, match="same edge"):
        leaf_advantages_from_edges(edge_adv, torch.tensor([[0, 2], [1, 2]]))


def test_awm_draws_are_reproducible():
    from flowalign.recipes.awm import awm_draws
    from flowalign.training.rng import stream_generator

    grid = torch.linspace(1.0, 0.0, 11)  # a 10-step rollout grid
    a = awm_draws(6, (1, 2, 2), stream_generator(0, "awm", 3, 0), grid=grid)
    b = awm_draws(6, (1, 2, 2), stream_generator(0, "awm", 3, 0), grid=grid)
    c = awm_draws(6, (1, 2, 2), stream_generator(0, "awm", 4, 0), grid=grid)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[2], c[2])
    order, sigma, noise = a
    # the reference's defaults: 6 times per leaf on the grid, steps 1 .. int(10 x 0.9) = 9 excluded
    assert sorted(order.tolist()) == list(range(6)) and sigma.shape == (6, 6)
    assert bool(((sigma <= grid[1]) & (sigma > grid[9])).all())
    assert noise.shape == (6, 6, 1, 2, 2)


# ------------------------------------------------------------------------------------------------
# the recipe end to end
# ------------------------------------------------------------------------------------------------
def _run(cfg_dict: dict) -> tuple[dict, dict, dict]:
    from flowalign.config import load_config
    from flowalign.recipes.awm import AWMRecipe

    cfg = load_config(cfg_dict)
    recipe = AWMRecipe(cfg)
    recipe.setup()
    try:
        before = {n: p.detach().clone() for n, p in recipe.module.named_parameters() if p.requires_grad}
        summary = recipe.train()
        after = {n: p.detach().clone() for n, p in recipe.module.named_parameters() if p.requires_grad}
    finally:
        recipe.cleanup()
    return summary, before, after


def _train_records(output_dir: str) -> list[dict]:
    from flowalign.training.metrics import read_metrics

    return [r for r in read_metrics(os.path.join(output_dir, "metrics.jsonl")) if "train/loss" in r]


@pytest.mark.parametrize("lora_rank, kl_beta", [(0, 0.0), (4, 0.1)])
def test_recipe_two_iterations_change_parameters(tiny_config, lora_rank, kl_beta):
    cfg = {**tiny_config}
    cfg["model"] = {**cfg["model"], "lora_rank": lora_rank}
    cfg["algorithm"] = {**cfg["algorithm"], "name": "awm", "kl_beta": kl_beta}
    cfg["logging"] = {**cfg["logging"], "tensorboard": False}
    summary, before, after = _run(cfg)
    assert any(not torch.equal(before[n], after[n]) for n in before), "no trainable parameter changed"
    records = _train_records(cfg["output_dir"])
    assert len(records) == 2
    for r in records:
        for key in ("train/loss", "train/policy_loss", "train/fm_loss", "train/kl", "train/grad_norm", "train/reward_mean"):
            assert key in r and torch.isfinite(torch.tensor(r[key])), (key, r.get(key))
        if kl_beta > 0:
            assert r["train/kl"] >= 0
    if kl_beta > 0:
        # iteration 1 runs after an update: the policy has left the reference
        assert records[1]["train/kl"] > 0
    assert summary["after"] is not None


def test_recipe_resume_replays_exactly(tiny_config, tmp_path):
    """2 iterations straight == 1 iteration, checkpoint, resume, 1 more (same AWM σ/ε streams)."""
    base = {**tiny_config}
    base["algorithm"] = {**base["algorithm"], "name": "awm"}
    base["logging"] = {**base["logging"], "tensorboard": False}
    straight = {**base, "output_dir": str(tmp_path / "straight")}
    _, _, w_straight = _run(straight)

    split = {**base, "output_dir": str(tmp_path / "split")}
    _run({**split, "train": {**split["train"], "iterations": 1}})
    _, _, w_resumed = _run(split)
    for n in w_straight:
        assert torch.allclose(w_straight[n], w_resumed[n], atol=1e-6), n


def test_recipe_requires_an_awm_algorithm(tiny_config):
    from flowalign.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="^algorithm.name: 'grpo' runs in the 'rl' recipe"):
        load_config({**tiny_config, "recipe": "awm"})


def test_shipped_awm_config(monkeypatch):
    """configs/awm/quickstart.yaml: the quickstart task with the AWM recipe and loss."""
    from flowalign.config import load_config

    monkeypatch.chdir(REPO)
    raw = OmegaConf.to_container(OmegaConf.load("configs/awm/quickstart.yaml"))
    assert raw["algorithm"]["name"] == "awm"
    quick = OmegaConf.to_container(OmegaConf.load("configs/quickstart.yaml"))
    assert raw["eval"] == quick["eval"] and raw["data"] == quick["data"] and raw["rewards"] == quick["rewards"]
    cfg = load_config("configs/awm/quickstart.yaml")
    assert cfg.recipe == "awm" and cfg.algorithm.name == "awm"


def test_train_dispatches_the_awm_recipe(tiny_config):
    import flowalign
    from flowalign.config import ConfigError

    cfg = {**tiny_config, "algorithm": {**tiny_config["algorithm"], "name": "awm"}}
    summary = flowalign.train(cfg)
    records = _train_records(cfg["output_dir"])
    assert summary["iterations"] == 2 and all("train/fm_loss" in r for r in records)
    with pytest.raises(ConfigError, match="^algorithm.name: 'grpo' runs in the 'rl' recipe"):
        flowalign.train({**tiny_config, "recipe": "awm"})
