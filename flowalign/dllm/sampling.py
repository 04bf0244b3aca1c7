"""Masked-diffusion decoding with recorded trajectories (issue 6, docs/ARCHITECTURE.md "dLLM").

The reverse process of LLaDA (Nie et al. 2025, "Large Language Diffusion Models", Alg. 4 / 5,
low-confidence and random remasking): the completion window of ``gen_length`` tokens starts all
``[MASK]``; at every step the model predicts every masked position, a candidate ``x0`` is drawn
(greedy at temperature 0, else categorical at temperature ``T`` via Gumbel-max with the explicit
``generator``), and the ``k_s`` masked positions of the *current block* with the highest
confidence ``p(x0)`` (or ``k_s`` random ones) are committed; the rest stay masked.

Options:

* semi-autoregressive blocks: the window is split in ``gen_length / block_length`` blocks decoded
  left to right, ``steps / num_blocks`` steps each (LLaDA §2.4, Alg. 5);
* step-size schedule ``k_s`` inside a block: ``"uniform"`` (LLaDA's ``get_num_transfer_tokens``:
  ``n // m`` per step, the first ``n % m`` steps one more) or ``"ascending"`` (ASS, Yang et al.
  2025, "Taming Masked Diffusion Language Models via Consistency Trajectory Reinforcement
  Learning with Fewer Decoding Step", §3.2: step ``s`` commits ``2^s`` tokens, the last step the
  rest; see :func:`ascending_schedule` for block sizes that are not ``2^m - 1``);
* EOS early rejection (EOSER, same paper, §3.1): the confidence of a candidate ``x0 == EOS`` is
  multiplied by ``gamma(s)``, rising linearly from ``gamma_min`` at the first step to 1 at the
  last (:func:`eos_confidence_factor`); ``eos_early_rejection = 1 - gamma_min`` (0 = off; the
  CJ-GRPO reference's ``eos_min_gamma = 0.01`` is ``eos_early_rejection = 0.99``); with several
  blocks the factor either runs over the whole decode or restarts in every block
  (``eos_restart_per_block``, the reference's ``eoser_generate``);
* classifier-free guidance (LLaDA's unsupervised CFG, ``cfg_scale``): each step also scores the
  sequence with the prompt masked and uses ``un + (s + 1) (cond - un)`` (:func:`guided_logits_fn`);
* ``order="ar"`` (JustGRPO, Ni et al. 2026, "The Flexibility Trap: Why Arbitrary Order Limits
  Reasoning Potential in Diffusion Language Models"): one token per step, always the left-most
  masked one, drawn from the model's distribution at that position given the prefix with every
  later position masked (``steps == gen_length``).

The decode is recorded as a :class:`Trajectory`: the step at which every completion token was
committed, and the log-probability under the *sampling policy* of the tokens committed at each
step, ``step_log_probs[b, s] = sum_{k committed at s} log softmax(logits_s / tau)[x_k]``, with
``tau = temperature`` when ``temperature > 0`` and ``tau = 1`` for greedy decoding (the greedy
policy is degenerate; its trajectory is then scored under the model's own distribution, the
convention of CJ-GRPO / MDPO which train the model distribution, not the argmax). The choice of
*which* positions to commit is not part of the log-probability (it is a deterministic function of
the confidences for low-confidence remasking, and independent of the parameters for random
remasking). :func:`flowalign.dllm.logprob.trajectory_logprob` recomputes these from the states
``Trajectory.state_at(s)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from flowalign.training.rng import Generator, rand_rows

__all__ = [
    "ORDERS",
    "REMASKING",
    "STEP_SCHEDULES",
    "LogitsFn",
    "SamplingSpec",
    "SamplingSpecError",
    "Trajectory",
    "ascending_schedule",
    "eos_confidence_factor",
    "generate",
    "guided_logits_fn",
    "gumbel_max_sample",
    "restrict_logits",
    "transfer_schedule",
    "uniform_schedule",
]

LogitsFn = Callable[[Tensor, Tensor | None], Tensor]
"""``(input_ids [B, L], attention_mask [B, L] | None) -> logits [B, L, V]``; position ``i`` holds
the distribution of token ``i`` (any logit shift already undone)."""

REMASKING: tuple[str, ...] = ("low_confidence", "random")
ORDERS: tuple[str, ...] = ("diffusion", "ar")
STEP_SCHEDULES: tuple[str, ...] = ("uniform", "ascending")


class SamplingSpecError(ValueError):
    """An invalid :class:`SamplingSpec`; ``field`` names the offending argument (so a config can
    report it as ``sampling.<field>``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


# --------------------------------------------------------------------------------------------
# the sampling specification
# --------------------------------------------------------------------------------------------
@dataclass
class SamplingSpec:
    """How to decode a completion window.

    Attributes:
        gen_length: completion window length ``Lg`` (answer, then EOS fill).
        steps: total number of decoding steps ``S`` (one model forward each).
        block_length: semi-AR block length; ``None`` = one block of ``gen_length`` (pure
            diffusion). Must divide ``gen_length``; the number of blocks must divide ``steps``.
        temperature: 0 = greedy ``x0``; ``> 0`` = categorical at that temperature.
        remasking: ``"low_confidence"`` (commit the most confident) or ``"random"``.
        order: ``"diffusion"`` or ``"ar"`` (left-most masked token each step; ``steps ==
            gen_length``).
        step_schedule: ``"uniform"`` or ``"ascending"`` (ASS) tokens per step inside a block.
        eos_early_rejection: EOSER strength ``1 - gamma_min`` in ``[0, 1)``; 0 = off.
        suppress_tokens: token ids never generated (e.g. pad / special tokens); ``[MASK]`` is
            always suppressed. The recorded log-probs are those of the renormalized distribution.
        cfg_scale: classifier-free guidance scale ``s >= 0`` (0 = off): the logits are
            ``un + (s + 1) (cond - un)``, ``un`` with the prompt masked (:func:`guided_logits_fn`).
        eos_restart_per_block: EOSER's decoding progress counts the step inside its block, not
            the global step (:func:`eos_confidence_factor`).
    """

    gen_length: int
    steps: int
    block_length: int | None = None
    temperature: float = 0.0
    remasking: str = "low_confidence"
    order: str = "diffusion"
    step_schedule: str = "uniform"
    eos_early_rejection: float = 0.0
    suppress_tokens: tuple[int, ...] = ()
    cfg_scale: float = 0.0
    eos_restart_per_block: bool = False

    def __post_init__(self) -> None:
        self.suppress_tokens = tuple(int(t) for t in self.suppress_tokens)
        if not isinstance(self.gen_length, int) or self.gen_length < 1:
            raise SamplingSpecError("gen_length", f"gen_length must be a positive int, got {self.gen_length!r}")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise SamplingSpecError("steps", f"steps must be a positive int, got {self.steps!r}")
        if self.block_length is None:
            self.block_length = self.gen_length
        if not isinstance(self.block_length, int) or self.block_length < 1:
            raise SamplingSpecError("block_length", f"block_length must be a positive int, got {self.block_length!r}")
        if self.remasking not in REMASKING:
            raise SamplingSpecError("remasking", f"remasking must be one of {REMASKING}, got {self.remasking!r}")
        if self.order not in ORDERS:
            raise SamplingSpecError("order", f"order must be one of {ORDERS}, got {self.order!r}")
        if self.step_schedule not in STEP_SCHEDULES:
            raise SamplingSpecError("step_schedule", f"step_schedule must be one of {STEP_SCHEDULES}, got {self.step_schedule!r}")
        if not (self.cfg_scale >= 0.0):
            raise SamplingSpecError("cfg_scale", f"cfg_scale must be >= 0, got {self.cfg_scale!r}")
        if not (self.temperature >= 0.0):
            raise SamplingSpecError("temperature", f"temperature must be >= 0, got {self.temperature!r}")
        if not (0.0 <= self.eos_early_rejection < 1.0):
            raise SamplingSpecError("eos_early_rejection", f"eos_early_rejection must lie in [0, 1), got {self.eos_early_rejection!r}")
        if self.gen_length % self.block_length:
            raise SamplingSpecError(
                "block_length",
                f"block_length={self.block_length} must divide gen_length={self.gen_length}"
            )
        if self.order == "ar":
            if self.steps != self.gen_length:
                raise SamplingSpecError(
                    "steps",
                    f"order='ar' commits one token per step: steps={self.steps} must equal "
                    f"gen_length={self.gen_length}"
                )
            if self.eos_early_rejection > 0:
                raise SamplingSpecError("eos_early_rejection", "eos_early_rejection has no effect with order='ar'; set it to 0")
            return
        if self.steps % self.num_blocks:
            raise SamplingSpecError(
                "steps",
                f"steps={self.steps} must be a multiple of the number of blocks "
                f"gen_length/block_length={self.num_blocks}"
            )
        if self.steps_per_block > self.block_length:
            raise SamplingSpecError(
                "steps",
                f"steps={self.steps} gives {self.steps_per_block} steps per block, more than "
                f"block_length={self.block_length} tokens: some steps would commit nothing"
            )
        if self.remasking == "random" and self.eos_early_rejection > 0:
            raise SamplingSpecError("eos_early_rejection", "eos_early_rejection needs remasking='low_confidence' (it rescales confidences)")

    @property
    def num_blocks(self) -> int:
        """Number of semi-AR blocks (1 for ``order="ar"``, where blocks play no role)."""
        return 1 if self.order == "ar" else self.gen_length // self.block_length

    @property
    def steps_per_block(self) -> int:
        return self.steps // self.num_blocks

    @property
    def log_prob_temperature(self) -> float:
        """The temperature ``tau`` of the recorded policy log-probs (1 for greedy decoding)."""
        return self.temperature if self.temperature > 0 else 1.0


# --------------------------------------------------------------------------------------------
# pure schedule functions
# --------------------------------------------------------------------------------------------
def uniform_schedule(num_tokens: int, num_steps: int) -> list[int]:
    """LLaDA's ``get_num_transfer_tokens`` (Nie et al. 2025, App. B.3): ``num_tokens // num_steps``
    per step, the first ``num_tokens % num_steps`` steps one more. Sums to ``num_tokens``."""
    if num_steps < 1 or num_tokens < 0:
        raise ValueError(f"need num_steps >= 1 and num_tokens >= 0, got {num_steps}, {num_tokens}")
    base, rem = divmod(num_tokens, num_steps)
    return [base + (1 if s < rem else 0) for s in range(num_steps)]


def ascending_schedule(num_tokens: int, num_steps: int) -> list[int]:
    """Ascending step sizes (ASS, Yang et al. 2025, §3.2): step ``s`` commits ``2^s`` tokens and
    the last step the remainder, ``k = [1, 2, 4, ..., n - (2^(m-1) - 1)]``, when
    ``n >= 2^m - 1``.

    For smaller blocks the same doubling is capped so every later step can still commit one
    token: ``k_s = min(2^s, floor(r_s / (m - s)))`` with ``r_s`` the tokens left before step ``s``,
    the last step taking the rest. This equals the paper's form whenever ``n >= 2^m - 1``
    (then ``r_s / (m - s) >= 2^s``), is non-decreasing, every ``k_s >= 1``, and sums to ``n``.
    """
    if num_steps < 1 or num_tokens < num_steps:
        raise ValueError(
            f"ascending schedule needs 1 <= num_steps <= num_tokens, got num_steps={num_steps}, "
            f"num_tokens={num_tokens}"
        )
    out, left = [], num_tokens
    for s in range(num_steps - 1):
        k = min(2**s, left // (num_steps - s))
        out.append(k)
        left -= k
    out.append(left)
    return out


def transfer_schedule(spec: SamplingSpec) -> list[int]:
    """Tokens committed at each of the ``spec.steps`` global steps (same for every row)."""
    if spec.order == "ar":
        return [1] * spec.steps
    per_block = (uniform_schedule if spec.step_schedule == "uniform" else ascending_schedule)(
        spec.block_length, spec.steps_per_block
    )
    return per_block * spec.num_blocks


def eos_confidence_factor(step: int, spec: SamplingSpec) -> float:
    """EOSER factor ``gamma(s)`` multiplying the confidence of an EOS candidate at global step ``s``.

    Yang et al. 2025 (§3.1, EOS Early Rejection): ``gamma(s) = gamma_min + (1 - gamma_min) * p(s)``,
    ``gamma_min = 1 - spec.eos_early_rejection``, with ``S = spec.steps`` the total steps and
    decoding progress

    * uniform schedule: ``p = i / (S - 1)`` -- the reference's ``sampling`` (yjyddq/EOSER-ASS-RL @
      5affb4e, ``cj-grpo/cj_grpo_trainer_eoser.py`` L281-283, ``eval/generate.py`` L78-80);
    * ascending schedule: ``p = (2^(i+1) - 1) / 2^S`` -- the reference's ``ass_sampling``
      (``cj-grpo/cj_grpo_trainer_eoser_ass.py`` L339-341, ``eval/generate.py`` L95-97): the
      fraction of a ``2^S`` window committed after step ``i`` under its doubling schedule;

    where ``i`` is the global step ``s``, or with ``spec.eos_restart_per_block`` the step inside its
    block, ``s mod steps_per_block`` (the reference's ``eoser_generate`` passes the in-block index
    with ``total_steps = steps``, ``eval/generate.py`` L220-251, so the factor restarts at
    ``gamma_min`` in every block). ``p`` is capped at 1. Returns 1 when EOSER is off.
    """
    if spec.eos_early_rejection <= 0:
        return 1.0
    gamma_min = 1.0 - spec.eos_early_rejection
    S = spec.steps
    i = step % spec.steps_per_block if spec.eos_restart_per_block else step
    if spec.step_schedule == "ascending":
        progress = (2 ** (i + 1) - 1) / 2**S
    else:
        progress = i / (S - 1) if S > 1 else 1.0
    return gamma_min + (1.0 - gamma_min) * min(progress, 1.0)


def guided_logits_fn(logits_fn: LogitsFn, prompt_length: int, mask_id: int, scale: float) -> LogitsFn:
    """LLaDA's unsupervised classifier-free guidance as a :data:`LogitsFn` (Nie et al. 2025, App. B.3;
    ML-GSAI/LLaDA @ b7e6c35 ``generate.py`` L79-87, ``get_log_likelihood.py`` L29-43; d1's
    ``diffu_grpo_trainer.py`` ``get_logits``): the input is scored twice in one call, as is and
    with its first ``prompt_length`` positions (the prompt) replaced by ``mask_id``, and the
    logits are ``un + (scale + 1) * (cond - un)``. ``scale = 0`` returns ``logits_fn`` itself."""
    if scale == 0:
        return logits_fn

    def guided(ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        un = ids.clone()
        un[:, :prompt_length] = mask_id
        am = None if attention_mask is None else torch.cat([attention_mask, attention_mask])
        cond, uncond = logits_fn(torch.cat([ids, un]), am).chunk(2, dim=0)
        return uncond + (scale + 1.0) * (cond - uncond)

    return guided


def restrict_logits(logits: Tensor, mask_id: int, suppress_tokens: Sequence[int] = ()) -> Tensor:
    """``logits [..., V]`` with ``[MASK]`` and ``suppress_tokens`` set to ``-inf`` (a copy).

    The clean-data distribution of a masked diffusion model never contains ``[MASK]`` (MDLM's
    "zero masking probabilities", Sahoo et al. 2024 §3.2.1; LLaDA never predicts it), so sampling
    and every log-probability renormalize over the other tokens.
    """
    ids = [mask_id, *suppress_tokens]
    V = logits.shape[-1]
    for i in ids:
        if not (0 <= i < V):
            raise ValueError(f"token id {i} (mask_id / suppress_tokens) is outside the vocabulary of size {V}")
    out = logits.clone()
    out[..., ids] = -float("inf")
    return out


def gumbel_max_sample(logits: Tensor, temperature: float, generator: Generator) -> Tensor:
    """Draw ``argmax(logits / T + G)``, ``G ~ Gumbel(0, 1)`` iid: an exact sample of
    ``softmax(logits / T)`` (Gumbel-max trick); ``argmax(logits)`` at ``T = 0``.

    Args:
        logits: ``[..., V]`` float.
        generator: a ``torch.Generator`` (``None``: the global one) or
            :class:`~flowalign.training.rng.RowStreams` (rows of ``logits``' first dim per block).
    Returns:
        ``[...]`` long token ids.
    """
    if temperature <= 0:
        return logits.argmax(dim=-1)
    # u ~ U[0, 1) in float64, kept inside (0, 1) so the Gumbel noise -log(-log u) is finite
    u = rand_rows(tuple(logits.shape), generator, device=logits.device, dtype=torch.float64)
    u = u.clamp(1e-300, 1.0 - 1e-16)
    g = -torch.log(-torch.log(u))
    return (logits.double() / temperature + g).argmax(dim=-1)


# --------------------------------------------------------------------------------------------
# the trajectory record
# --------------------------------------------------------------------------------------------
@dataclass
class Trajectory:
    """A decoded batch with its unmasking history.

    Attributes:
        sequences: ``[B, P + Lg]`` long, final tokens (prompt, then the completion; no mask left).
        attention_mask: ``[B, P + Lg]`` long, 0 on left padding of the prompt.
        prompt_length: ``P``.
        commit_step: ``[B, Lg]`` long, the step ``s`` in ``0..S-1`` at which each completion token
            was unmasked.
        step_log_probs: ``[B, S]`` float32, log-prob under the sampling policy (temperature
            ``log_prob_temperature``) of the tokens committed at step ``s``.
        num_steps: ``S``.
        predictions: ``[B, S, Lg]`` long, the intermediate decode at step ``s``: committed tokens
            as they were before the step and the drawn candidate ``x0`` at every masked position
            (MDPO's intermediate answers); ``None`` if not recorded.
        log_prob_temperature: the ``tau`` of ``step_log_probs``.
        suppressed_tokens: token ids excluded from the policy besides ``[MASK]``
            (``SamplingSpec.suppress_tokens``).
        cfg_scale: the classifier-free guidance scale of the decode (its log-probs are those of
            the guided logits, :func:`guided_logits_fn`).
        commit_records: with a ``commit_policy`` (:func:`generate`), what it returned at every step,
            stacked on dim 1 (``{name: [B, S, ...]}``; :mod:`flowalign.dllm.unmasking_policy`); else ``None``.
    """

    sequences: Tensor
    attention_mask: Tensor
    prompt_length: int
    commit_step: Tensor
    step_log_probs: Tensor
    num_steps: int
    predictions: Tensor | None = None
    log_prob_temperature: float = 1.0
    suppressed_tokens: tuple[int, ...] = ()
    cfg_scale: float = 0.0
    commit_records: dict[str, Tensor] | None = None

    @property
    def completion_ids(self) -> Tensor:
        """``[B, Lg]`` the completion tokens."""
        return self.sequences[:, self.prompt_length :]

    def step_commit_mask(self, s: int) -> Tensor:
        """``[B, Lg]`` bool, True where the token was committed at step ``s``."""
        self._check_step(s, upper=self.num_steps - 1)
        return self.commit_step == s

    def state_at(self, s: int, mask_id: int) -> Tensor:
        """``[B, P + Lg]`` tokens *before* step ``s``: prompt and the completion tokens with
        ``commit_step < s`` kept, the rest ``mask_id``. ``s = 0`` is the all-masked window,
        ``s = S`` the final sequences."""
        self._check_step(s, upper=self.num_steps)
        comp = torch.where(self.commit_step < s, self.completion_ids, torch.full_like(self.completion_ids, mask_id))
        return torch.cat([self.sequences[:, : self.prompt_length], comp], dim=1)

    def _check_step(self, s: int, upper: int) -> None:
        if not isinstance(s, int) or not (0 <= s <= upper):
            raise ValueError(f"step s must be an int in [0, {upper}], got {s!r}")

    def select(self, index: Tensor) -> Trajectory:
        """The sub-batch ``index`` (``[n]`` long or ``[B]`` bool) of this trajectory."""
        return Trajectory(
            sequences=self.sequences[index],
            attention_mask=self.attention_mask[index],
            prompt_length=self.prompt_length,
            commit_step=self.commit_step[index],
            step_log_probs=self.step_log_probs[index],
            num_steps=self.num_steps,
            predictions=None if self.predictions is None else self.predictions[index],
            log_prob_temperature=self.log_prob_temperature,
            suppressed_tokens=self.suppressed_tokens,
            cfg_scale=self.cfg_scale,
            commit_records=None if self.commit_records is None else {k: v[index] for k, v in self.commit_records.items()},
        )


# --------------------------------------------------------------------------------------------
# the decoder
# --------------------------------------------------------------------------------------------
def _check_prompt(prompt_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
    if not isinstance(prompt_ids, Tensor) or prompt_ids.dim() != 2 or prompt_ids.dtype != torch.long:
        raise ValueError(
            f"prompt_ids must be a torch.long tensor [B, P], got "
            f"{getattr(prompt_ids, 'dtype', type(prompt_ids))} {tuple(getattr(prompt_ids, 'shape', ()))}"
        )
    if attention_mask is None:
        return torch.ones_like(prompt_ids)
    if tuple(attention_mask.shape) != tuple(prompt_ids.shape):
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} must equal prompt_ids shape "
            f"{tuple(prompt_ids.shape)}"
        )
    return attention_mask.to(prompt_ids.device, torch.long)


@torch.no_grad()
def generate(
    logits_fn: LogitsFn,
    prompt_ids: Tensor,
    attention_mask: Tensor | None,
    spec: SamplingSpec,
    *,
    mask_id: int,
    eos_id: int | None = None,
    generator: Generator = None,
    record_predictions: bool = True,
    commit_policy: Callable[..., tuple[Tensor, dict[str, Tensor]]] | None = None,
) -> Trajectory:
    """Decode ``spec.gen_length`` tokens after each (left-padded) prompt.

    Args:
        logits_fn: ``(ids [B, L], attention_mask [B, L]) -> logits [B, L, V]``.
        prompt_ids: ``[B, P]`` long, left-padded prompts.
        attention_mask: ``[B, P]`` (0 on padding) or ``None`` (no padding).
        spec: the :class:`SamplingSpec`.
        mask_id: the ``[MASK]`` token id.
        eos_id: the EOS id (required when ``spec.eos_early_rejection > 0``).
        generator: the explicit RNG for temperature sampling and random remasking: a
            ``torch.Generator`` for the whole batch, or :class:`~flowalign.training.rng.RowStreams`
            (one stream per block of rows, e.g. per prompt group: a row's decode then does not
            depend on the rows decoded beside it).
        record_predictions: keep the ``[B, S, Lg]`` intermediate decodes.
        commit_policy: ``None`` (the ``spec.remasking`` rule) or a learned choice of the positions
            to commit (``order="diffusion"`` only): ``(logits [B, Lg, V], candidates [B, Lg] bool,
            k, step, num_steps, generator) -> (select [B, Lg] bool with k per row, records
            {name: [B, ...]})``, the records kept in ``Trajectory.commit_records``
            (:class:`flowalign.dllm.unmasking_policy.CommitmentPolicy`).
    Returns:
        the :class:`Trajectory`.
    """
    prompt_mask = _check_prompt(prompt_ids, attention_mask)
    if spec.eos_early_rejection > 0 and eos_id is None:
        raise ValueError("eos_id is required when spec.eos_early_rejection > 0")
    B, P = prompt_ids.shape
    Lg, S = spec.gen_length, spec.steps
    logits_fn = guided_logits_fn(logits_fn, P, mask_id, spec.cfg_scale)
    device = prompt_ids.device
    x = torch.cat([prompt_ids, torch.full((B, Lg), mask_id, dtype=torch.long, device=device)], dim=1)
    attn = torch.cat([prompt_mask, torch.ones((B, Lg), dtype=torch.long, device=device)], dim=1)
    commit_step = torch.full((B, Lg), -1, dtype=torch.long, device=device)
    step_log_probs = torch.zeros((B, S), dtype=torch.float32, device=device)
    predictions = torch.empty((B, S, Lg), dtype=torch.long, device=device) if record_predictions else None
    counts = transfer_schedule(spec)
    tau = spec.log_prob_temperature
    positions = torch.arange(Lg, device=device)
    if commit_policy is not None and spec.order != "diffusion":
        raise ValueError(f"a commit_policy chooses positions of a diffusion decode; spec.order is {spec.order!r}")
    records: list[dict[str, Tensor]] = []

    for s in range(S):
        logits = logits_fn(x, attn)
        if logits.dim() != 3 or logits.shape[:2] != (B, P + Lg):
            raise ValueError(f"logits_fn returned shape {tuple(logits.shape)}, expected [{B}, {P + Lg}, V]")
        logits = restrict_logits(logits[:, P:].float(), mask_id, spec.suppress_tokens)  # [B, Lg, V]
        masked = commit_step < 0  # [B, Lg]
        x0 = gumbel_max_sample(logits, spec.temperature, generator)  # [B, Lg]
        comp = x[:, P:]
        if predictions is not None:
            predictions[:, s] = torch.where(masked, x0, comp)

        if spec.order == "ar":
            # JustGRPO: the left-most masked position, i.e. the first one in left-to-right order.
            first = torch.where(masked, positions, torch.full_like(positions, Lg)).argmin(dim=1)
            select = positions.unsqueeze(0) == first.unsqueeze(1)
        else:
            block = s // spec.steps_per_block
            lo, hi = block * spec.block_length, (block + 1) * spec.block_length
            candidates = masked & (positions >= lo) & (positions < hi)
            if commit_policy is not None:
                select, record = commit_policy(logits, candidates, counts[s], s, S, generator)
                records.append(record)
            elif spec.remasking == "low_confidence":
                probs = torch.softmax(logits, dim=-1)
                conf = probs.gather(-1, x0.unsqueeze(-1)).squeeze(-1)  # LLaDA Alg. 5: p(x0)
                gamma = eos_confidence_factor(s, spec)
                if gamma != 1.0:
                    conf = torch.where(x0 == eos_id, conf * gamma, conf)  # EOSER, Yang et al. §3.1
            else:
                conf = rand_rows((B, Lg), generator, device=device)
            if commit_policy is None:
                conf = torch.where(candidates, conf, torch.full_like(conf, -float("inf")))
                idx = conf.topk(counts[s], dim=1).indices  # [B, k]
                select = torch.zeros((B, Lg), dtype=torch.bool, device=device).scatter_(1, idx, True)
            if bool((select & ~candidates).any()):  # cannot happen with a valid schedule
                raise RuntimeError(f"step {s} selected a position outside block [{lo}, {hi}) or already committed")

        logp = torch.log_softmax(logits / tau, dim=-1).gather(-1, x0.unsqueeze(-1)).squeeze(-1)
        step_log_probs[:, s] = torch.where(select, logp, torch.zeros_like(logp)).sum(dim=1)
        x[:, P:] = torch.where(select, x0, comp)
        commit_step = torch.where(select, torch.full_like(commit_step, s), commit_step)

    if bool((commit_step < 0).any()):
        raise RuntimeError("decoding ended with masked positions left; the step schedule is inconsistent")
    return Trajectory(
        sequences=x,
        attention_mask=attn,
        prompt_length=P,
        commit_step=commit_step,
        step_log_probs=step_log_probs,
        num_steps=S,
        predictions=predictions,
        log_prob_temperature=tau,
        suppressed_tokens=spec.suppress_tokens,
        cfg_scale=spec.cfg_scale,
        commit_records={k: torch.stack([r[k] for r in records], dim=1) for k in records[0]} if records else None,
    )
