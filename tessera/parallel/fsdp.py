"""Data-parallel sharding with PyTorch FSDP2, applied to an unmodified Tessera model.

`init_distributed()` reads the variables `torchrun` sets (RANK, WORLD_SIZE, LOCAL_RANK) and
starts a process group (NCCL on CUDA, gloo on CPU) when there is more than one process;
`make_mesh` builds a 1-D `DeviceMesh` over all ranks (axis name "dp"). `parallelize(model,
mesh)` calls `torch.distributed.fsdp.fully_shard` on each decoder layer and then on the
root, so parameters, gradients and optimizer state are sharded across ranks and each layer
is all-gathered just before it runs; the model's code is untouched and its parameter names
stay the same (tied embeddings remain one tensor, owned by the root). The root's own
parameters (embeddings, final norm, LM head) stay whole from its forward until the end of
the backward pass, so a loss that applies the LM head outside the forward (the fused
KD op) reads the whole weight as `model.lm_head.weight` and its gradient is reduce-scattered
with the rest; a frozen root that never runs a backward (a sharded teacher) keeps them whole.

A frozen teacher can be sharded the same way (it then costs 1/world of its memory per rank
and one all-gather per layer per forward) or replicated (each rank holds all of it, and no
communication is spent on it); the trainer's `teacher_sharding` option picks.

`apply_activation_checkpointing` recomputes each decoder layer in the backward pass instead
of storing its activations (the composable `checkpoint` API, which keeps parameter names).

Gradients are averaged over ranks by FSDP's reduce-scatter; a caller whose loss is already
normalised by global token counts multiplies it by the world size (see the trainer). Over
several micro-batches, `set_accumulating(modules, True)` defers that reduce-scatter (and the
reshard after backward) to the last one. `shard_whole` shards a small trained module
(hidden-state projections) as one unit, so its gradients are averaged too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

DP_AXIS = "dp"


@dataclass(frozen=True)
class DistributedEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistributedEnv:
    """Join the process group torchrun describes (a no-op for a single process)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        index = local_rank if world_size > 1 or device in ("auto", "cuda") else \
            torch.device(device).index or 0
        torch.cuda.set_device(index)
        target = torch.device("cuda", index)
    else:
        target = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistributedEnv(rank, world_size, local_rank, target)


def make_mesh(env: DistributedEnv) -> DeviceMesh:
    return init_device_mesh(env.device.type, (env.world_size,), mesh_dim_names=(DP_AXIS,))


def parallelize(model: nn.Module, mesh: DeviceMesh, *, reshard_after_forward: bool = True,
                mp_policy=None) -> nn.Module:
    """Shard each decoder layer (`model.model.layers[i]`), then the root, with FSDP2.

    `mp_policy` is an optional `torch.distributed.fsdp.MixedPrecisionPolicy`. Returns the
    same module object, now an FSDP module.
    """
    from torch.distributed.fsdp import (
        MixedPrecisionPolicy,
        fully_shard,
        register_fsdp_forward_method,
    )

    kwargs = {"mesh": mesh, "mp_policy": mp_policy or MixedPrecisionPolicy()}
    for layer in model.model.layers:
        fully_shard(layer, reshard_after_forward=reshard_after_forward, **kwargs)
    # The root is not resharded after forward: the backward needs it at once, and the
    # fused loss applies its LM head after the forward has returned.
    fully_shard(model, reshard_after_forward=False, **kwargs)
    if hasattr(model, "run"):
        # `run` (hidden states, optional head) is a second entry point besides forward:
        # it needs the same all-gather before and reshard after.
        register_fsdp_forward_method(model, "run")
    return model


def shard_whole(module: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """FSDP2 on a small trainable module as one unit (e.g. hidden-state projections), so its
    gradients are averaged over ranks and its optimizer state is sharded like the model's."""
    from torch.distributed.fsdp import fully_shard

    fully_shard(module, mesh=mesh)
    return module


def set_accumulating(modules, accumulating: bool) -> None:
    """Gradient accumulation without communication: while `accumulating`, the sharded
    modules among `modules` keep their parameters and gradients whole between micro-batches
    (no reduce-scatter, no re-gather for the next forward); the micro-batch after
    `set_accumulating(..., False)` reduce-scatters the summed gradients once."""
    from torch.distributed.fsdp import FSDPModule

    for module in modules:
        if isinstance(module, FSDPModule):
            module.set_requires_gradient_sync(not accumulating)
            module.set_reshard_after_backward(not accumulating)


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute every decoder layer in the backward pass (names unchanged)."""
    from torch.distributed._composable import checkpoint

    for layer in model.model.layers:
        checkpoint(layer)
    return model


def is_multiprocess() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (identity without a process group)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(value, src: int = 0):
    """`value` from rank `src` on every rank (identity without a process group)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def shutdown() -> None:
    """Leave the process group. After a normal finish call `barrier()` first, so no rank
    tears down its connections while a peer still talks over them (gloo aborts a rank
    that does); after an error, leave at once (the peers may be inside a collective)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
