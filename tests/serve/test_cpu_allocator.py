"""`keep_freed_memory` (glibc's thresholds for a CPU server): the settings it asks for, in a
child process on the real C library (so that this process's allocator stays as it was),
and nothing done without `mallopt`."""

from __future__ import annotations

import ctypes
import platform
import subprocess
import sys

import pytest

from tessera.serve import cpu_allocator


class FakeMallopt:
    """Records its calls; takes `argtypes` and `restype` as ctypes functions do."""

    def __init__(self):
        self.calls = []

    def __call__(self, param, value):
        self.calls.append((param, value))
        return 1


class FakeLibc:
    def __init__(self):
        self.mallopt = FakeMallopt()


def test_both_thresholds_are_asked_for(monkeypatch):
    libc = FakeLibc()
    monkeypatch.setattr(ctypes, "CDLL", lambda name: libc)
    assert cpu_allocator.keep_freed_memory() is True
    assert libc.mallopt.calls == [(cpu_allocator.M_MMAP_THRESHOLD, 32 << 20),
                          (cpu_allocator.M_TRIM_THRESHOLD, 1 << 30)]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_glibc_is_called_for_real():
    code = "from tessera.serve.cpu_allocator import keep_freed_memory as k; print(k())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120).stdout.strip()
    assert out == "True"


def test_no_mallopt_means_nothing_done(monkeypatch):
    def no_library(name):
        raise OSError(f"{name}: not found")

    monkeypatch.setattr(ctypes, "CDLL", no_library)
    assert cpu_allocator.keep_freed_memory() is False
    monkeypatch.setattr(ctypes, "CDLL", lambda name: object())  # a libc without mallopt
    assert cpu_allocator.keep_freed_memory() is False
