"""Child process that runs kernel checks on Triton's CPU interpreter.

Started by `conftest.py` with TRITON_INTERPRET=1 already in its environment, so that Triton
(its standard library as well as our kernels) is interpreted from the first import. Reads
requests `(test file, its module name, function name, pickled args, seed)` from stdin and
answers `("ok", "")` or `("error", traceback)` on its original stdout; everything printed
goes to stderr.

Framing: an 8-byte little-endian length, then a pickle.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import struct
import sys
import traceback
from types import ModuleType


def read_message(stream):
    header = stream.read(8)
    if len(header) < 8:
        return None
    (size,) = struct.unpack("<Q", header)
    return pickle.loads(stream.read(size))


def write_message(stream, message) -> None:
    data = pickle.dumps(message)
    stream.write(struct.pack("<Q", len(data)) + data)
    stream.flush()


def load(path: str, module_name: str) -> ModuleType:
    """The test file at `path`, imported under the name it has in the parent, so that the
    parent's pickled arguments (e.g. dataclass instances) resolve to its classes."""
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


def squeeze_loop_bounds() -> None:
    """NOTE: Triton 3.6's interpreter turns tensor loop bounds into ints with `int(array)` on
    1-element arrays, which NumPy >= 2.4 refuses (Triton 3.9 squeezes the array first).
    Make older interpreters squeeze too; a no-op change where Triton already does."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patch_lang_tensor


def numpy_refuses_int_of_1d() -> bool:
    import numpy as np

    try:
        int(np.ones(1))
    except TypeError:
        return True
    return False


def serve() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1", "start me with TRITON_INTERPRET=1"
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # stray output must not corrupt the replies
    sys.stdout = sys.stderr
    import torch

    if numpy_refuses_int_of_1d():
        squeeze_loop_bounds()
    while (request := read_message(sys.stdin.buffer)) is not None:
        path, module_name, name, args, seed = request
        try:
            check = getattr(load(path, module_name), name)
            torch.manual_seed(seed)
            check(*pickle.loads(args))
            reply = ("ok", "")
        except BaseException:  # report everything, assertion failures and crashes alike
            reply = ("error", traceback.format_exc())
        write_message(replies, reply)


if __name__ == "__main__":
    serve()
