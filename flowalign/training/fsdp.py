"""FSDP2 for the recipes: shard the trained module over every process, gather it back to write it.

``torch.distributed.fsdp.fully_shard`` (FSDP2) turns each parameter into a ``DTensor`` sharded on
dim 0 over a 1-D mesh of all processes; a block's weights are all-gathered before its forward and
backward and its gradients reduce-scattered after. flowalign applies it itself (accelerate's FSDP
plugin does not run on CPU processes), on the same process group that ``accelerate launch`` /
``torchrun`` starts, so the same run works on CPU with gloo and on GPUs with NCCL.

* :func:`fsdp_settings` -- ``train.fsdp`` merged with an accelerate FSDP launch config, or ``None``;
* :func:`shard_module` -- ``fully_shard`` every repeated block (the children of the outermost
  ``nn.ModuleList``\ s), then the root;
* :func:`full_tensor` / :func:`gathered_state` -- what a checkpoint or an export needs, gathered
  onto the main process (collectives: every rank calls them);
* :func:`distribute_like` -- a full tensor read back from disk, cut into this rank's shard;
* :func:`sync_gradients` -- the FSDP analogue of DDP's ``no_sync`` for gradient accumulation.
* :func:`sum_gradients` -- reduce-scatter gradients as a sum over the ranks instead of FSDP's mean.

Every function here is a no-op on a module that is not sharded, so the recipes call them
unconditionally.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["FSDPSettings", "distribute_like", "fsdp_settings", "full_tensor", "gathered_state", "is_sharded",
           "shard_module", "sharded_blocks", "state_dict_view", "sum_gradients", "sync_gradients"]

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class FSDPSettings:
    """How the trained module is sharded (see ``flowalign.config_schema.FSDPConfig``)."""

    reshard_after_forward: bool = True
    cpu_offload: bool = False
    param_dtype: torch.dtype | None = None
    #: checkpoints gather the shards whole (``"full"``) or every rank writes its own (``"sharded"``)
    state_dict: str = "full"


def fsdp_settings(cfg: Any, accelerator: Any) -> FSDPSettings | None:
    """The run's FSDP settings, or ``None`` to train without sharding.

    ``cfg`` is ``train.fsdp``. An ``accelerate launch`` whose config says ``distributed_type: FSDP``
    turns sharding on too (read from the ``ACCELERATE_USE_FSDP`` / ``FSDP_*`` variables the launcher
    exports, so on CPU processes as well); its ``fsdp_reshard_after_forward`` /
    ``fsdp_offload_params`` then win over ``cfg``'s (flowalign shards the model itself; accelerate
    never wraps it). DeepSpeed is refused.

    Raises:
        ValueError: a DeepSpeed launch, or ``cpu_offload`` without a GPU (naming the key).
    """
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED or _env_flag("ACCELERATE_USE_DEEPSPEED"):
        raise ValueError("accelerate was launched with DeepSpeed, which flowalign does not support (it cannot be installed or "
                         "tested on our machines); use train.fsdp.enabled=true (FSDP2: reshard_after_forward true ~ ZeRO-3, "
                         "false ~ ZeRO-2) or an accelerate config from configs/accelerate/")
    reshard, offload = bool(cfg.reshard_after_forward), bool(cfg.cpu_offload)
    if kind == DistributedType.FSDP or _env_flag("ACCELERATE_USE_FSDP"):
        # what `accelerate launch` exports from an FSDP config into every process (also on CPU, where
        # accelerate itself drops the FSDP plugin)
        reshard = _env_flag("FSDP_RESHARD_AFTER_FORWARD", reshard)
        offload = _env_flag("FSDP_OFFLOAD_PARAMS", offload)
    elif not cfg.enabled:
        return None
    if offload and accelerator.device.type != "cuda":
        raise ValueError("train.fsdp.cpu_offload keeps the shards in CPU memory between uses of a GPU; this run has no GPU "
                         f"(device {accelerator.device}): set train.fsdp.cpu_offload=false")
    return FSDPSettings(reshard, offload, DTYPES[cfg.param_dtype] if cfg.param_dtype else None, cfg.state_dict)


def _env_flag(name: str, default: bool = False) -> bool:
    """A true / false environment variable set by ``accelerate launch`` (``default`` when unset)."""
    value = os.environ.get(name)
    return default if value is None else value.strip().lower() in ("1", "true", "yes")


def sharded_blocks(module: nn.Module) -> list[nn.Module]:
    """The submodules sharded on their own: the blocks of the outermost ``nn.ModuleList``\ s inside
    ``module`` -- each child that has submodules and weights (UNet down / up / mid blocks,
    transformer blocks, a language model's layers) and does not lie inside another such block, so
    that a block's weights are gathered once while it runs and single layers (an attention's
    ``to_out`` Linear) never become units of their own."""
    candidates = {name: child for list_name, sub in module.named_modules() if isinstance(sub, nn.ModuleList)
                  for name, child in ((f"{list_name}.{i}" if list_name else str(i), c) for i, c in enumerate(sub))
                  if next(child.children(), None) is not None and next(child.parameters(), None) is not None}
    return [child for name, child in candidates.items()
            if not any(name.startswith(other + ".") for other in candidates if other != name)]


def shard_module(module: nn.Module, *, device_type: str, reshard_after_forward: bool = True, cpu_offload: bool = False,
                 param_dtype: torch.dtype | None = None) -> nn.Module:
    """``fully_shard`` each of :func:`sharded_blocks` and then ``module`` itself over all processes
    (a 1-D mesh on ``device_type``; without a process group, one of a single process is started). Frozen and trainable
    weights (LoRA) may share a block. Returns ``module``, now an ``FSDPModule`` whose parameters are
    ``DTensor`` shards.

    Args:
        device_type: ``"cpu"`` (gloo) or ``"cuda"`` (NCCL).
        reshard_after_forward: free gathered weights after a block's forward (ZeRO-3-like).
        cpu_offload: keep shards on the CPU between uses (GPU only).
        param_dtype: the weights' dtype in forward / backward; gradients are reduced in float32.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise RuntimeError("shard_module: WORLD_SIZE > 1 but no process group was started")
        # one process (`flowalign train`, or accelerate's one-process launcher): a process group of one, so
        # that CPU offload and the mixed-precision policy work there too
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    options = dict(mesh=mesh, reshard_after_forward=reshard_after_forward,
                   offload_policy=CPUOffloadPolicy() if cpu_offload else OffloadPolicy())
    if param_dtype is not None:
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    sharded: list[nn.Module] = []
    for block in sharded_blocks(module):
        _shard_by_dtype(block, sharded, lambda unit: fully_shard(unit, **options))
    _shard_by_dtype(module, sharded, lambda unit: fully_shard(unit, **options))
    return module


def _shard_by_dtype(unit: nn.Module, sharded: list[nn.Module], shard: Callable[[nn.Module], Any]) -> None:
    """``shard(unit)`` after sharding, innermost first, each of its :func:`mixed_dtype_parts` the same way
    (a part may hold submodules of yet another dtype); appends every sharded module to ``sharded``."""
    for part in mixed_dtype_parts(unit, inside=sharded):
        if not any(part is done for done in sharded):
            _shard_by_dtype(part, sharded, shard)
    shard(unit)
    sharded.append(unit)


def mixed_dtype_parts(unit: nn.Module, inside: list[nn.Module]) -> list[nn.Module]:
    """The submodules of ``unit`` to shard on their own because FSDP2 needs one original parameter dtype
    per unit: diffusers keeps some modules of a bfloat16 model in float32 (``_keep_in_fp32_modules``, e.g.
    Wan's norms, time embedder and ``scale_shift_table``), and peft may keep LoRA weights in float32.
    The dtype ``unit`` keeps is that of its own direct parameters, else the one holding the most elements;
    every module (outside the already sharded ``inside`` blocks) whose direct parameters are of another
    dtype is returned, innermost first. Empty when ``unit`` has one dtype.

    Raises:
        ValueError: one module holds direct parameters of two dtypes (no FSDP2 unit can hold them).
    """
    skip = {id(m) for m in inside}
    owners: list[tuple[str, nn.Module, set[torch.dtype]]] = []
    numel: dict[torch.dtype, int] = {}
    stack = [("", unit)]
    while stack:
        name, mod = stack.pop()
        direct = list(mod.parameters(recurse=False))
        if direct:
            owners.append((name, mod, {p.dtype for p in direct}))
            for p in direct:
                numel[p.dtype] = numel.get(p.dtype, 0) + p.numel()
        stack.extend(reversed([(f"{name}.{child_name}".lstrip("."), child) for child_name, child in mod.named_children()
                               if id(child) not in skip]))  # reversed: the walk visits modules in their order
    if len(numel) <= 1:
        return []
    for name, _, dtypes in owners:
        if len(dtypes) > 1:
            raise ValueError(f"FSDP2 cannot shard {type(unit).__name__}.{name or '<root>'}: it holds parameters of "
                             f"dtypes {sorted(map(str, dtypes))} itself")
    own = next((dtypes for _, mod, dtypes in owners if mod is unit), None)
    keep = next(iter(own)) if own else max(numel, key=numel.get)
    parts = [mod for _, mod, dtypes in owners if mod is not unit and dtypes != {keep}]
    return parts[::-1]  # the walk visits parents before their children


def is_sharded(module: nn.Module) -> bool:
    """Whether ``module`` was sharded by :func:`shard_module`."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def full_tensor(value: Any) -> Any:
    """A ``DTensor`` gathered whole on every rank (a collective); anything else as it is."""
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value


def distribute_like(value: Tensor, like: Tensor) -> Tensor:
    """``value`` (a whole tensor, the same on every rank) as a shard laid out as ``like``'s when
    ``like`` is a ``DTensor``; else ``value`` itself."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor) or isinstance(value, DTensor):
        return value
    return distribute_tensor(value.to(device=like.device, dtype=like.dtype), like.device_mesh, like.placements)


def gathered_state(state: dict[str, Any], keep: bool) -> dict[str, Any]:
    """``state`` with every ``DTensor`` gathered whole (a collective: every rank calls it in the
    same order), moved to the CPU where ``keep`` (the main rank) and dropped elsewhere; nested
    dicts (optimizer state) are walked."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, dict):
            value = gathered_state(value, keep)
        elif isinstance(value, Tensor):
            value = full_tensor(value)
            value = value.detach().cpu() if keep else None
        if keep:
            out[key] = value
    return out


@contextmanager
def state_dict_view(module: nn.Module, state: dict[str, Tensor]) -> Iterator[nn.Module]:
    """Make ``module.state_dict()`` return ``state`` (whole tensors gathered from a sharded module)
    for the duration, so that a library's own writer -- diffusers' / transformers'
    ``save_pretrained``, peft's LoRA export -- writes the usual layout."""
    module.state_dict = lambda *args, **kwargs: dict(state)  # type: ignore[method-assign]
    try:
        yield module
    finally:
        del module.state_dict


@contextmanager
def sync_gradients(module: nn.Module, sync: bool) -> Iterator[None]:
    """Reduce-scatter the gradients of this backward (``sync``) or keep accumulating them locally
    (FSDP2's ``set_requires_gradient_sync``, the analogue of DDP's ``no_sync``)."""
    if not is_sharded(module):
        yield
        return
    module.set_requires_gradient_sync(sync)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def sum_gradients(module: nn.Module) -> None:
    """Make every FSDP unit inside ``module`` (blocks and root) reduce its gradients as a SUM over
    the ranks instead of FSDP2's default mean (``set_gradient_divide_factor(1.0)``), for a recipe
    whose per-rank losses are already shares of the global loss (the dLLM recipe scales each
    micro-batch by its weight over every rank's total). The sum is forced to be a plain
    ``ReduceOp.SUM`` (``set_force_sum_reduction_for_comms``): with a factor FSDP2 would otherwise
    use NCCL's ``PREMUL_SUM``, which gloo lacks. No-op on a module that is not sharded."""
    from torch.distributed.fsdp import FSDPModule

    for sub in module.modules():
        if isinstance(sub, FSDPModule):
            sub.set_gradient_divide_factor(1.0)
            sub.set_force_sum_reduction_for_comms(True)
