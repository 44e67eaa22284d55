"""A deterministic, resumable order over packed sequences, split by data-parallel rank.

Each epoch is a permutation of the sequence indices drawn from `(seed, epoch)` alone (or the
identity without shuffling), so every process computes the same order with no
communication. The epoch is cut into global batches of `global_batch_size`; the incomplete
tail is dropped so that every rank does the same number of steps. Within a global batch,
rank r of `world_size` takes the r-th contiguous slice and cuts it into
`grad_accum_steps` micro-batches of `micro_batch_size`:

    global_batch_size = world_size * grad_accum_steps * micro_batch_size

The ranks' slices are disjoint and together are the global batch, so one optimizer step
sees the same sequences whatever the world size. The state is (epoch, step in epoch),
counted in global batches: `load_state_dict` resumes at exactly the next step, also on a
different world size. The sampler yields indices; `tessera.data.packing` makes batches.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from tessera.errors import ConfigError, DataError

SAMPLER_STATE_VERSION = 1


class SequenceSampler:
    """Per-step micro-batches of sequence indices for one rank (see the module doc)."""

    def __init__(self, num_sequences: int, *, global_batch_size: int, micro_batch_size: int,
                 world_size: int = 1, rank: int = 0, seed: int = 0, shuffle: bool = True):
        for name, value in (("global_batch_size", global_batch_size),
                            ("micro_batch_size", micro_batch_size),
                            ("world_size", world_size)):
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if global_batch_size % (micro_batch_size * world_size):
            raise ConfigError(
                f"global_batch_size ({global_batch_size}) must be a multiple of "
                f"micro_batch_size * world_size ({micro_batch_size} * {world_size})")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside 0..{world_size - 1}")
        if num_sequences < global_batch_size:
            raise DataError(f"the data has {num_sequences} sequences, fewer than one global "
                            f"batch of {global_batch_size}; add data or shrink the batch")
        self.num_sequences = num_sequences
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.world_size, self.rank = world_size, rank
        self.seed, self.shuffle = seed, shuffle
        self.grad_accum_steps = global_batch_size // (micro_batch_size * world_size)
        self.steps_per_epoch = num_sequences // global_batch_size
        self.epoch = 0
        self.step_in_epoch = 0
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, permutation) cache

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The permutation of all sequence indices used in `epoch`."""
        if self._order is None or self._order[0] != epoch:
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(self.num_sequences)
            else:
                order = np.arange(self.num_sequences)
            self._order = (epoch, order)
        return self._order[1]

    def global_batch(self, epoch: int, step: int) -> np.ndarray:
        """All `global_batch_size` indices of step `step` of `epoch` (every rank's)."""
        if not 0 <= step < self.steps_per_epoch:
            raise IndexError(f"step {step} outside the epoch's {self.steps_per_epoch} steps")
        start = step * self.global_batch_size
        return self.epoch_order(epoch)[start:start + self.global_batch_size]

    def rank_micro_batches(self, global_batch: np.ndarray) -> list[list[int]]:
        """This rank's slice of a global batch, cut into micro-batches."""
        per_rank = self.global_batch_size // self.world_size
        mine = global_batch[self.rank * per_rank:(self.rank + 1) * per_rank]
        size = self.micro_batch_size
        return [mine[i:i + size].tolist() for i in range(0, per_rank, size)]

    def next_step(self) -> list[list[int]]:
        """This rank's micro-batches for the next optimizer step; advances the state."""
        batch = self.global_batch(self.epoch, self.step_in_epoch)
        self.step_in_epoch += 1
        if self.step_in_epoch == self.steps_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        return self.rank_micro_batches(batch)

    def __iter__(self) -> Iterator[list[list[int]]]:
        """Steps forever, epoch after epoch."""
        while True:
            yield self.next_step()

    def state_dict(self) -> dict[str, Any]:
        return {"version": SAMPLER_STATE_VERSION, "epoch": self.epoch,
                "step_in_epoch": self.step_in_epoch, "seed": self.seed,
                "shuffle": self.shuffle, "num_sequences": self.num_sequences,
                "global_batch_size": self.global_batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at the step after the one `state` was saved at."""
        if state.get("version") != SAMPLER_STATE_VERSION:
            raise DataError(f"sampler state version {state.get('version')} is not "
                            f"{SAMPLER_STATE_VERSION}")
        for key in ("seed", "shuffle", "num_sequences", "global_batch_size"):
            if state.get(key) != getattr(self, key):
                raise DataError(
                    f"cannot resume: the sampler state has {key}={state.get(key)!r} but this "
                    f"run has {getattr(self, key)!r}; resume with the same data and batch size")
        if not 0 <= state["step_in_epoch"] < self.steps_per_epoch or state["epoch"] < 0:
            raise DataError(f"sampler state position (epoch {state['epoch']}, step "
                            f"{state['step_in_epoch']}) is out of range")
        self.epoch, self.step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
