"""The `tessera` CLI: real subprocesses for the entry point, and a table of bad inputs that
must each give one clear error line and a non-zero exit, never a traceback."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest
import torch

import tessera
from tessera.checkpoint import hf
from tessera.checkpoint.loader import LoadedModel
from tessera.cli import main
from tessera.config import ModelConfig
from tessera.model import build_model


def _tessera(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    exe = shutil.which("tessera")
    command = [exe] if exe else [sys.executable, "-m", "tessera.cli"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=timeout)


def test_generate_answers_paris_from_the_command_line():
    result = _tessera("generate", "smollm2-135m-instruct", "--chat", "--max-tokens", "24",
                      "--prompt", "What is the capital of France?")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_info_lists_presets_and_kernels():
    result = _tessera("info")
    assert result.returncode == 0, result.stderr
    for name in ("smollm2-135m", "llama-3.2-1b", "qwen3-0.6b", "attention", "rms_norm"):
        assert name in result.stdout


def test_convert_gguf_to_hf_directory(smollm2_gguf, tmp_path):
    assert main(["convert", str(smollm2_gguf), str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "tokenizer.json").exists()
    converted = tessera.load(tmp_path / "out", device="cpu")
    assert converted.config.num_layers == 30 and converted.tokenizer.chat_template


def _saved_model(directory):
    config = ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2,
                         num_kv_heads=1, intermediate_size=48)
    loaded = LoadedModel(build_model(config), None, config, "random")
    tessera.save(loaded, directory)
    return directory


def _truncate(path, keep: int | None = None) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: keep if keep is not None else len(data) // 2])


def _bad_missing_path(tmp_path):
    return str(tmp_path / "no" / "such" / "model")


def _bad_unknown_name(tmp_path):
    return "no-such-registered-model"


def _bad_truncated_safetensors(tmp_path):
    _truncate(_saved_model(tmp_path / "m") / hf.SAFETENSORS)
    return str(tmp_path / "m")


def _bad_corrupt_safetensors(tmp_path):
    (_saved_model(tmp_path / "m") / hf.SAFETENSORS).write_bytes(b"\x07" * 4096)
    return str(tmp_path / "m")


def _bad_random_gguf(tmp_path):
    path = tmp_path / "random.gguf"
    path.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    return str(path)


def _bad_truncated_gguf(tmp_path, smollm2_gguf):
    path = tmp_path / "truncated.gguf"
    path.write_bytes(smollm2_gguf.read_bytes()[: 3 << 20])
    return str(path)


def _edit_config(tmp_path, **changes):
    directory = _saved_model(tmp_path / "m")
    config = json.loads((directory / "config.json").read_text()) | changes
    (directory / "config.json").write_text(json.dumps(config))
    return str(directory)


def _bad_architecture(tmp_path):
    return _edit_config(tmp_path, model_type="gpt2", architectures=["GPT2LMHeadModel"])


def _bad_inconsistent_heads(tmp_path):
    return _edit_config(tmp_path, num_attention_heads=3, num_key_value_heads=2)


def _bad_inconsistent_shapes(tmp_path):
    return _edit_config(tmp_path, intermediate_size=50)


BAD_SOURCES = {
    "missing path": (_bad_missing_path, "neither an existing path"),
    "unknown name": (_bad_unknown_name, "smollm2-135m-instruct"),
    "truncated safetensors": (_bad_truncated_safetensors, "safetensors"),
    "corrupt safetensors": (_bad_corrupt_safetensors, "safetensors"),
    "random bytes gguf": (_bad_random_gguf, "GGUF"),
    "truncated gguf": (_bad_truncated_gguf, "GGUF"),
    "unsupported architecture": (_bad_architecture, "gpt2"),
    "inconsistent heads": (_bad_inconsistent_heads, "divisible"),
    "inconsistent shapes": (_bad_inconsistent_shapes, "shape"),
}


@pytest.mark.parametrize("case", sorted(BAD_SOURCES))
def test_bad_input_gives_one_clear_error_line(case, tmp_path, capsys, smollm2_gguf):
    make, pattern = BAD_SOURCES[case]
    args = (tmp_path, smollm2_gguf) if make is _bad_truncated_gguf else (tmp_path,)
    source = make(*args)
    code = main(["convert", source, str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("tessera: error: "), err
    assert re.search(pattern, err, flags=re.IGNORECASE), err
    assert not (tmp_path / "out").exists()


def test_bad_input_in_a_real_subprocess_has_no_traceback(tmp_path):
    result = _tessera("generate", str(tmp_path / "missing"), "--prompt", "hi")
    assert result.returncode == 2
    assert result.stderr.startswith("tessera: error:") and "Traceback" not in result.stderr
