"""Parallelism applied from outside an unmodified model (see `tessera.parallel.fsdp`)."""

from tessera.parallel.fsdp import (
    DistributedEnv,
    apply_activation_checkpointing,
    init_distributed,
    is_sharded,
    make_mesh,
    parallelize,
)

__all__ = [
    "DistributedEnv",
    "apply_activation_checkpointing",
    "init_distributed",
    "is_sharded",
    "make_mesh",
    "parallelize",
]
