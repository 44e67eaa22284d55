"""Kernel test fixtures: a child process for Triton's CPU interpreter, and the `gpu` marker.

NOTE: Triton decides between interpreting and compiling when `@triton.jit` runs: for its
own standard library (`tl.sum`, `tl.max`, ...) at `import triton`, for our kernels at the
import of their module; TRITON_INTERPRET set later has no effect on either. Other test
files import the kernels (through the model) before this file is read, and on a GPU machine
the `gpu` tests need compiled kernels in this very process. So interpreter tests hand their
check function to `interpreter.run(check, *args)`, which runs it in one child process
started with TRITON_INTERPRET=1 (see `interpreter_worker.py`), on CPU tensors.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import select
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tessera.kernels._triton import HAS_TRITON

WORKER = Path(__file__).with_name("interpreter_worker.py")
_spec = importlib.util.spec_from_file_location("kernels_interpreter_worker", WORKER)
protocol = importlib.util.module_from_spec(_spec)  # for its message framing
_spec.loader.exec_module(protocol)


class Interpreter:
    """A persistent child Python with Triton in interpreter mode; restarted if it dies."""

    TIMEOUT_S = 300  # per check

    def __init__(self, root: Path):
        self._root = root
        self._child: subprocess.Popen | None = None

    def _start(self) -> subprocess.Popen:
        paths = [str(self._root), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
        env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(paths)}
        return subprocess.Popen([sys.executable, str(WORKER)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, env=env, cwd=self._root)

    def run(self, check, *args) -> None:
        """Call `check(*args)` (a module-level function of a test file) in the child;
        fail this test with the child's traceback if it raises."""
        if self._child is None or self._child.poll() is not None:
            self._child = self._start()
        seed = int(torch.randint(2**31, ()))  # follows this process's seed, for reproduction
        request = (check.__code__.co_filename, check.__module__, check.__name__,
                   pickle.dumps(args), seed)
        protocol.write_message(self._child.stdin, request)
        if not select.select([self._child.stdout], [], [], self.TIMEOUT_S)[0]:
            self._child.kill()
            self._child.wait()
            pytest.fail(f"{check.__name__}{args} took over {self.TIMEOUT_S} s", pytrace=False)
        reply = protocol.read_message(self._child.stdout)
        if reply is None:
            pytest.fail(f"interpreter child exited with {self._child.wait()}", pytrace=False)
        status, details = reply
        if status != "ok":
            pytest.fail(f"{check.__name__}{args} on the Triton interpreter:\n{details}",
                        pytrace=False)

    def close(self) -> None:
        if self._child is not None and self._child.poll() is None:
            self._child.stdin.close()
            self._child.wait(timeout=60)


@pytest.fixture(scope="session")
def interpreter(request):
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    child = Interpreter(request.config.rootpath)
    yield child
    child.close()


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
