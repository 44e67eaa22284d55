"""Training checkpoints: atomic, verified, pruned, and restored exactly.

Layout under a run's `checkpoints/` directory:

    step-00000040/
        model.safetensors        module weights (one process), or DCP's `*.distcp` +
        optimizer.safetensors    `.metadata` (several ranks: torch.distributed.checkpoint)
        state.json               step, scheduler, sampler, run bookkeeping, tensor aliases,
                                 the optimizer's param groups
        rng-rank0.json ...       each rank's torch / python / numpy RNG states
        manifest.json            format version and the sha256 of every other file

A checkpoint is written into a hidden temporary sibling (`.tmp-step-...`), every file is
fsynced, `manifest.json` is written last, and only then is the directory renamed into
place (and the parent fsynced). A crash at any moment leaves either the previous set of
checkpoints or a hidden temporary directory, which `list_checkpoints` never returns and the
next save removes. After each save only the newest `keep_last` checkpoints are kept.

`find_latest` verifies checkpoints newest first against their manifest. A corrupt one
(a missing file, a bad sha256, an unreadable manifest) is reported through `warn` and
skipped, so resumption falls back to the previous good checkpoint; if checkpoints exist
but none verifies, it raises `CheckpointError` instead of silently starting over.

Tensors go to safetensors and everything else to JSON; nothing is unpickled. The optimizer
state is flattened into tensors `"{param index}.{name}"` plus JSON. This module knows
nothing about the trainer's loop: it saves and restores what it is given.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tessera.errors import CheckpointError

FORMAT = "tessera-train-checkpoint"
FORMAT_VERSION = 1
PREFIX = "step-"
TMP_PREFIX = ".tmp-"
MANIFEST = "manifest.json"
STATE = "state.json"


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Finished checkpoints `(step, path)` under `root`, oldest first; hidden temporary
    directories and unrelated names are ignored."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        step = path.name.removeprefix(PREFIX)
        if path.is_dir() and path.name.startswith(PREFIX) and step.isdigit():
            found.append((int(step), path))
    return sorted(found)


# --------------------------------------------------------------------------- RNG
def capture_rng() -> dict[str, Any]:
    """torch (CPU and the current CUDA device), python and numpy global RNG states as
    JSON-able data; `restore_rng` sets them back (CUDA: on the then current device)."""
    version, mt_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state().tolist(),
             "python": [version, list(mt_state), gauss],
             "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    if torch.cuda.is_available():
        # The current device's generator only: a rank uses one device, and the run may
        # resume with another number of visible devices.
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    version, mt_state, gauss = state["python"]
    random.setstate((version, tuple(mt_state), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


# --------------------------------------------------------------------------- flattening
def _unique_tensors(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor],
                                                              dict[str, str]]:
    """Drop tensors that alias an earlier one (tied embeddings); safetensors refuses them."""
    kept: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    by_storage: dict[tuple[int, int, tuple[int, ...]], str] = {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in by_storage:
            aliases[name] = by_storage[key]
        else:
            by_storage[key] = name
            kept[name] = tensor.detach().to("cpu").contiguous()
    return kept, aliases


def flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor],
                                                                 dict[str, Any]]:
    """(tensors, JSON) that together hold `optimizer.state_dict()`."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    values: dict[str, dict[str, Any]] = {}
    for index, entries in sd["state"].items():
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value.detach().to("cpu").contiguous()
            else:
                values.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": sd["param_groups"], "values": values}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]
                        ) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = tensor
    for index, entries in meta["values"].items():
        state.setdefault(int(index), {}).update(entries)
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()}
              for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


# --------------------------------------------------------------------------- files
def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory file descriptors
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, data: Any) -> None:
    with open(path, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_manifest(directory: Path, step: int) -> None:
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    for path in files:
        _fsync_file(path)
    hashes = {p.relative_to(directory).as_posix(): sha256_file(p) for p in files}
    _write_json(directory / MANIFEST, {"format": FORMAT, "version": FORMAT_VERSION,
                                       "step": step, "sha256": hashes})
    _fsync_dir(directory)


def _publish(tmp: Path, final: Path) -> None:
    """Rename the finished temporary directory into place (replacing a same-step one)."""
    if final.exists():
        old = final.with_name(f"{TMP_PREFIX}old-{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    _fsync_dir(final.parent)


def remove_temporaries(root: Path) -> None:
    """Delete hidden temporary directories that a crashed save left behind."""
    if root.is_dir():
        for path in root.iterdir():
            if path.name.startswith(TMP_PREFIX):
                shutil.rmtree(path, ignore_errors=True)


def prune(root: Path, keep_last: int) -> None:
    for _step, path in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------- save
def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def save_checkpoint(root: str | Path, step: int, module: nn.Module,
                    optimizer: torch.optim.Optimizer, state: dict[str, Any], *,
                    keep_last: int) -> Path:
    """Write checkpoint `step` atomically; every rank calls it. `state` is JSON-able."""
    root = Path(root)
    rank, world = _rank_world()
    tmp = root / f"{TMP_PREFIX}{checkpoint_name(step)}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        remove_temporaries(root)
        tmp.mkdir()
    _barrier(world)
    if world > 1:
        meta = _save_sharded(tmp, module, optimizer)
    else:
        meta = _save_local(tmp, module, optimizer)
    _write_json(tmp / f"rng-rank{rank}.json", capture_rng())
    _barrier(world)
    final = root / checkpoint_name(step)
    if rank == 0:
        _write_json(tmp / STATE, {**state, "step": step, "world_size": world, **meta})
        _write_manifest(tmp, step)
        _publish(tmp, final)
        prune(root, keep_last)
    _barrier(world)
    return final


def _save_local(directory: Path, module: nn.Module,
                optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    weights, aliases = _unique_tensors(module.state_dict())
    save_file(weights, str(directory / "model.safetensors"))
    opt_tensors, opt_meta = flatten_optimizer(optimizer)
    save_file(opt_tensors, str(directory / "optimizer.safetensors"))
    return {"layout": "local", "aliases": aliases, "optimizer": opt_meta}


def _save_sharded(directory: Path, module: nn.Module,
                  optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(module, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(directory))
    return {"layout": "dcp"}


# --------------------------------------------------------------------------- verify / load
def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """The manifest, after checking every listed file's sha256; `CheckpointError` if not."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} has no {MANIFEST}; it is incomplete") \
            from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is unreadable ({exc})") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} is not a {FORMAT} version "
                              f"{FORMAT_VERSION} checkpoint")
    for name, expected in manifest["sha256"].items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} is missing")
        if sha256_file(file) != expected:
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} does not match its "
                                  "sha256 in the manifest")
    return manifest


def find_latest(root: str | Path, warn: Callable[[str], None] = print) -> Path | None:
    """The newest checkpoint that verifies, or None if there is none at all."""
    found = list_checkpoints(root)
    for _step, path in reversed(found):
        try:
            verify_checkpoint(path)
        except CheckpointError as exc:
            warn(f"skipping checkpoint: {exc}")
            continue
        return path
    if found:
        raise CheckpointError(f"none of the {len(found)} checkpoints in {root} verifies (see "
                              "the messages above); delete them to start over, or restore a "
                              "good copy")
    return None


def load_checkpoint(path: str | Path, module: nn.Module,
                    optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore module and optimizer from a verified checkpoint; returns its state.json
    with this rank's RNG states under "rng" (restore them with `restore_rng` when the run
    is otherwise set up)."""
    path = Path(path)
    rank, world = _rank_world()
    state = _read_json(path / STATE)
    if state["world_size"] != world and state["layout"] == "local":
        raise CheckpointError(f"checkpoint {path} was written by one process; resume it "
                              "with one process")
    if state["layout"] == "dcp":
        _load_sharded(path, module, optimizer)
    else:
        _load_local(path, module, optimizer, state)
    rng_file = path / f"rng-rank{rank}.json"
    state["rng"] = _read_json(rng_file) if rng_file.exists() else None
    return state


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path} ({exc})") from None


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc})") from None


def _load_local(path: Path, module: nn.Module, optimizer: torch.optim.Optimizer,
                state: dict[str, Any]) -> None:
    weights = _load_tensors(path / "model.safetensors")
    for alias, name in state["aliases"].items():
        weights[alias] = weights[name]
    try:
        module.load_state_dict(weights)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {path} does not fit this model: {exc}") from None
    tensors = _load_tensors(path / "optimizer.safetensors")
    optimizer.load_state_dict(unflatten_optimizer(tensors, state["optimizer"]))


def _load_sharded(path: Path, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(module, optimizer)
    both = {"model": model_sd, "optim": optim_sd}
    dcp.load(both, checkpoint_id=str(path))
    set_state_dict(module, optimizer, model_state_dict=both["model"],
                   optim_state_dict=both["optim"])
