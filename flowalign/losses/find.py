"""FIND: a prompt-conditioned Gaussian policy over the initial noise, trained with ratio-clipped policy gradients.

Chen et al. 2024, "FIND: Fine-tuning Initial Noise Distribution with Policy Optimization for Diffusion Models"
(ACM MM 2024, arXiv:2407.19453). The denoising process is a one-step MDP (the paper's reformulation): the state is the prompt
``c``, the action the initial noise ``z_T ~ π_θ(·|c) = N(μ_θ(c), diag σ_θ(c)²)``, the frozen generator maps it
deterministically to an image and the reward scores that image. The policy is trained with a PPO-style ratio
clip on the exact Gaussian log-density (the paper's "ratio clipping", reusing the iteration's samples for
several optimizer steps), the advantage being the reward minus a learned prediction of the policy's expected
reward for the prompt (the paper's "dynamic reward calibration", a reward-prediction network ``φ`` trained by
regression on the observed rewards).

No public code was found (the authors' page, vpx-ecnu/FIND-website, holds no training code), so the network
below is ours: a two-layer MLP on the prompt's pooled text features with three heads (mean, log-std, predicted
reward), the mean / log-std heads initialised to zero so that training starts at the generator's own
``N(0, I)``; the log-std is clamped to ``[log_std_min, log_std_max]`` (ours).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from flowalign.types import Conditioning

__all__ = ["NoisePolicy", "gaussian_log_prob", "prompt_features", "reparameterize", "value_loss"]


def prompt_features(cond: Conditioning) -> Tensor:
    """``[N, F]`` pooled prompt features: every floating tensor of ``cond.tensors`` (sorted by name) averaged
    over its dims between the batch and the last (``[N, L, D] -> [N, D]``; ``[N, D]`` kept), concatenated (ours).

    Raises:
        ValueError: the conditioning holds no floating tensor.
    """
    parts = []
    for name in sorted(cond.tensors):
        t = cond.tensors[name]
        if not t.is_floating_point():
            continue
        t = t.float()
        parts.append(t.reshape(t.shape[0], -1, t.shape[-1]).mean(dim=1) if t.dim() > 2 else t.reshape(t.shape[0], -1))
    if not parts:
        raise ValueError(f"prompt_features: the conditioning has no floating tensor (keys {sorted(cond.tensors)})")
    return torch.cat(parts, dim=1)


def gaussian_log_prob(z: Tensor, mean: Tensor, log_std: Tensor) -> Tensor:
    """``[N]`` exact log-density of ``z`` under ``N(mean, diag exp(log_std)²)``, summed over the latent dims:
    ``Σ_d −(z − μ)²/(2σ²) − log σ − ½ log 2π`` (the Gaussian policy's ``log π_θ(z_T|c)``; the paper's equation numbers
    were not at hand, so none is cited).

    Args:
        z, mean, log_std: ``[N, *latent]`` each (``mean`` / ``log_std`` broadcastable to ``z``).
    """
    z, mean, log_std = z.float(), mean.float(), log_std.float()
    per_dim = -0.5 * ((z - mean) * torch.exp(-log_std)).pow(2) - log_std - 0.5 * math.log(2 * math.pi)
    return per_dim.expand_as(z).flatten(1).sum(dim=1)


def reparameterize(noise: Tensor, mean: Tensor, log_std: Tensor) -> Tensor:
    """``z = μ + σ·ε``: a draw of the policy from standard-normal ``noise`` ``ε [N, *latent]`` (same shape out)."""
    return mean + torch.exp(log_std) * noise


def value_loss(predicted: Tensor, rewards: Tensor) -> Tensor:
    """0-dim ``mean (φ(c) − r)²``: the reward-prediction network's regression loss (dynamic reward calibration)."""
    return (predicted.float() - rewards.float().to(predicted.device)).pow(2).mean()


class NoisePolicy(nn.Module):
    """``c -> (μ [N, *latent], log σ [N, *latent], predicted reward [N])`` from pooled prompt features ``[N, F]``.

    Args:
        feature_dim: ``F`` of :func:`prompt_features`.
        latent_shape: the generator's per-sample latent shape.
        hidden: width of the shared hidden layer.
        log_std_min, log_std_max: clamp of ``log σ`` (ours).
    """

    def __init__(self, feature_dim: int, latent_shape: tuple[int, ...], hidden: int = 64,
                 log_std_min: float = -2.0, log_std_max: float = 1.0):
        super().__init__()
        if not log_std_min < 0.0 < log_std_max:
            raise ValueError(f"NoisePolicy: needs log_std_min < 0 < log_std_max (so N(0, I) is reachable), got "
                             f"{log_std_min}, {log_std_max}")
        self.latent_shape = tuple(latent_shape)
        self.log_std_min, self.log_std_max = float(log_std_min), float(log_std_max)
        dim = math.prod(self.latent_shape)
        self.body = nn.Sequential(nn.Linear(feature_dim, hidden), nn.SiLU())
        self.mean_head = nn.Linear(hidden, dim)
        self.log_std_head = nn.Linear(hidden, dim)
        self.value_head = nn.Linear(hidden, 1)
        for head in (self.mean_head, self.log_std_head, self.value_head):  # start at N(0, I), predicted reward 0
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        h = self.body(features.float())
        shape = (features.shape[0], *self.latent_shape)
        log_std = self.log_std_head(h).clamp(self.log_std_min, self.log_std_max)
        return self.mean_head(h).view(shape), log_std.view(shape), self.value_head(h).squeeze(1)
