"""GGUF reading: metadata -> config, dequantization bounds, the q/k un-permute, bad files."""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as Q
from tokenizers import pre_tokenizers

from tessera.checkpoint.gguf import SUPPORTED_TYPES, read_gguf
from tessera.config import PRESETS, ModelConfig
from tessera.errors import CheckpointError, ModelNotFoundError, UnsupportedModelError

# ----------------------------------------------------------------------------- tiny files
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he"]
TOKENS = SPECIALS + sorted(pre_tokenizers.ByteLevel.alphabet()) + ["Ġt", "he", "Ġthe"]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}")

TINY = {  # 262-token vocab, non-power-of-two FFN; every row length a multiple of 32
    "llama": ModelConfig(
        vocab_size=len(TOKENS), hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
        intermediate_size=96, rope_theta=50000.0, rms_norm_eps=1e-6, max_seq_len=256,
        tie_word_embeddings=False, bos_token_id=1, eos_token_ids=(2,), pad_token_id=2),
}
TINY["qwen2"] = TINY["llama"].replace(model_type="qwen2", attention_bias=True)
TINY["qwen3"] = TINY["llama"].replace(model_type="qwen3", qk_norm=True, tie_word_embeddings=True)


def hf_state_dict(config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random state dict of transformers' own model for `config` (names and shapes)."""
    torch.manual_seed(seed)
    hf_config = transformers.AutoConfig.for_model(**config.to_hf_config())
    model = transformers.AutoModelForCausalLM.from_config(hf_config)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for value in state.values():  # norms init to 1 and biases to 0: make them random
        value.copy_(torch.randn_like(value) * (0.5 if value.ndim == 1 else 0.05))
    if config.tie_word_embeddings:
        state.pop("lm_head.weight")
    return state


def name_map(config: ModelConfig) -> gguf.TensorNameMap:
    """gguf's own HF -> GGUF tensor name table for the config's architecture."""
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == config.model_type)
    return gguf.get_tensor_name_map(arch, config.num_layers)


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute (HF halves -> llama.cpp interleaved)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def write_gguf(path: Path, config: ModelConfig, state: dict[str, torch.Tensor], *,
               arch: str | None = None, qtype: Q = Q.F32, raw: dict | None = None,
               extra_tensors: dict | None = None, extra_kv=None) -> Path:
    """Write `state` as llama.cpp's converter would: GGUF names, q/k permuted for llama,
    2-D weights in `qtype` (norms and biases F32); `raw` maps a GGUF name to (bytes, type)."""
    arch = arch or config.model_type
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config.num_layers)
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(TOKENS)
    writer.add_token_types([3] * len(SPECIALS) + [1] * (len(TOKENS) - len(SPECIALS)))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_chat_template(TEMPLATE)
    if extra_kv is not None:
        extra_kv(writer)
    names = name_map(config)
    for hf_name, tensor in state.items():
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        data = tensor.numpy().astype(np.float32)
        if config.model_type == "llama" and (".q_proj." in hf_name or ".k_proj." in hf_name):
            data = permute(data, config.num_heads if ".q_proj." in hf_name else config.num_kv_heads)
        if raw and name in raw:
            writer.add_tensor(name, raw[name][0], raw_dtype=raw[name][1])
        elif data.ndim == 2 and qtype != Q.F32:
            writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, data)
    for name, data in (extra_tensors or {}).items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    state = hf_state_dict(TINY["llama"])
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", TINY["llama"], state), state


# ----------------------------------------------------------------------------- real file
@pytest.fixture(scope="module")
def smollm2_checkpoint(smollm2_gguf):
    return read_gguf(smollm2_gguf)


def test_smollm2_metadata_gives_the_preset_config(smollm2_checkpoint):
    config = smollm2_checkpoint.config
    assert config == PRESETS["smollm2-135m"]
    assert config.rms_norm_eps == 1e-5  # the float32 in the file, read back as its decimal
    meta = smollm2_checkpoint.metadata
    assert meta["general.architecture"] == "llama" and meta["llama.block_count"] == 30
    assert "tokenizer.ggml.tokens" not in meta  # big arrays live in the tokenizer
    assert smollm2_checkpoint.tokenizer.vocab_size == config.vocab_size


def test_smollm2_weights_equal_transformers(smollm2_checkpoint, hf_smollm2):
    """transformers un-permutes q/k on its own; every tensor must agree with ours."""
    ours = smollm2_checkpoint.state_dict
    theirs = hf_smollm2[0].state_dict()
    assert "lm_head.weight" not in ours  # tied: the file has no output.weight
    assert set(ours) == set(theirs) - {"lm_head.weight"}
    for name, value in ours.items():
        assert value.dtype == torch.float32 and value.is_contiguous(), name
        if not torch.equal(value, theirs[name]):  # both dequantize the same blocks in fp32
            torch.testing.assert_close(value, theirs[name], rtol=1e-6, atol=1e-7, msg=name)


# ----------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_tiny_file_loads_back_equal_to_its_source(tmp_path, arch):
    config = TINY[arch]
    state = hf_state_dict(config)
    path = write_gguf(tmp_path / f"{arch}.gguf", config, state)
    checkpoint = read_gguf(path)
    assert checkpoint.config == config
    assert set(checkpoint.state_dict) == set(state)
    for name, value in state.items():
        assert torch.equal(checkpoint.state_dict[name], value), name
    q_name = "model.layers.1.self_attn.q_proj.weight"
    stored = next(t.data for t in gguf.GGUFReader(path).tensors if t.name == "blk.1.attn_q.weight")
    # The file really holds llama's interleaved layout, so equality above needs the un-permute.
    assert np.array_equal(stored, state[q_name].numpy()) == (arch != "llama")


def test_tiny_tokenizer_follows_the_file(tiny_llama):
    tokenizer = read_gguf(tiny_llama[0]).tokenizer
    the = TOKENS.index("Ġthe")
    assert tokenizer.encode(" the the") == [the, the]  # the merges apply
    assert tokenizer.encode("<|im_end|>x") == [2, TOKENS.index("x")]  # control stays whole
    assert tokenizer.eos_token_ids == (2,) and tokenizer.bos_token_id == 1
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]) == \
        "<|im_start|>user\nhi<|im_end|>\n"


def _block_bound(x: np.ndarray, qtype: Q) -> np.ndarray:
    """Largest error each element may have after quantizing to `qtype` and back."""
    if qtype in (Q.F16, Q.BF16):
        rel = 2.0 ** -11 if qtype == Q.F16 else 2.0 ** -8  # half an ulp of the mantissa
        return np.abs(x) * rel + 2.0 ** -24
    blocks = x.reshape(*x.shape[:-1], -1, 32)
    amax = np.abs(blocks).max(-1, keepdims=True)
    spread = blocks.max(-1, keepdims=True) - blocks.min(-1, keepdims=True)
    fp16 = amax * 2.0 ** -9  # the fp16 block scale/min rounding, amplified by the levels
    bound = {
        Q.Q8_0: 0.5 * amax / 127,  # symmetric, 255 levels: half a step
        Q.Q4_0: amax / 8,  # the far side of the range can clip by a whole step
        Q.Q5_0: amax / 16,
        Q.Q4_1: 0.5 * spread / 15,  # affine min..max, 16 levels: half a step
        Q.Q5_1: 0.5 * spread / 31,
    }[qtype]
    return np.broadcast_to(bound + fp16, blocks.shape).reshape(x.shape)


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1])
def test_dequantization_error_within_the_type_bound(tmp_path, qtype):
    config = TINY["llama"]
    state = hf_state_dict(config, seed=1)
    checkpoint = read_gguf(write_gguf(tmp_path / "q.gguf", config, state, qtype=qtype))
    worst = 0.0
    for name, source in state.items():
        src, out = source.numpy(), checkpoint.state_dict[name].numpy()
        if src.ndim == 1 or qtype == Q.F32:
            assert np.array_equal(out, src), name
            continue
        error = np.abs(out - src)
        assert (error <= _block_bound(src, qtype)).all(), (name, error.max())
        worst = max(worst, float(error.max()))
    assert (worst > 0) == (qtype != Q.F32)  # the lossy types really went through quantization


@pytest.mark.parametrize("qtype", [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K])
def test_k_quants_dequantize_in_the_right_layout(tmp_path, qtype):
    """gguf cannot quantize K types: write random blocks with sane fp16 scales and check each
    tensor equals gguf's dequantization of its own bytes, in HF order and un-permuted."""
    config = TINY["llama"].replace(hidden_size=256, head_dim=64, intermediate_size=512)
    state = hf_state_dict(config)
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    names = name_map(config)
    rng = np.random.default_rng(0)
    scale = np.array([0.01], dtype=np.float16).view(np.uint8)
    raw, expected = {}, {}
    for hf_name, tensor in state.items():
        if tensor.ndim != 2:
            continue
        rows, blocks = tensor.shape[0], tensor.shape[1] // block_size
        data = rng.integers(0, 256, (rows, blocks, type_size), dtype=np.uint8)
        if qtype in (Q.Q4_K, Q.Q5_K):  # fp16 d and dmin open the block
            data[..., 0:2], data[..., 2:4] = scale, scale
        elif qtype == Q.Q2_K:  # fp16 d and dmin close the block
            data[..., -4:-2], data[..., -2:] = scale, scale
        else:  # fp16 d closes the block
            data[..., -2:] = scale
        data = data.reshape(rows, blocks * type_size)
        raw[names.get_name(hf_name, try_suffixes=(".weight",))] = (data, qtype)
        expected[hf_name] = _unpermute_if_qk(hf_name, gguf.quants.dequantize(data, qtype), config)
    checkpoint = read_gguf(write_gguf(tmp_path / "k.gguf", config, state, raw=raw))
    for name, values in expected.items():
        out = checkpoint.state_dict[name].numpy()
        assert out.shape == tuple(state[name].shape), name
        assert np.isfinite(out).all() and np.array_equal(out, values), name


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    return (w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _unpermute_if_qk(name: str, values: np.ndarray, config: ModelConfig) -> np.ndarray:
    if ".q_proj." in name:
        return _unpermute(values, config.num_heads)
    if ".k_proj." in name:
        return _unpermute(values, config.num_kv_heads)
    return values


def test_permute_helpers_are_inverse_and_not_identity():
    w = np.arange(4 * 16 * 3, dtype=np.float32).reshape(4 * 16, 3)
    assert not np.array_equal(permute(w, 4), w)
    assert np.array_equal(_unpermute(permute(w, 4), 4), w)


def test_llama3_rope_freqs_become_rope_scaling(tmp_path):
    from tessera.model.rope import inverse_frequencies

    config = TINY["llama"]
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    base = inverse_frequencies(config.head_dim, 500000.0)
    freqs = (base / inverse_frequencies(config.head_dim, 500000.0, scaling)).numpy()
    assert freqs.max() == pytest.approx(8.0) and freqs.min() == pytest.approx(1.0)
    config = config.replace(rope_theta=500000.0)
    state = hf_state_dict(config)
    path = write_gguf(tmp_path / "l3.gguf", config, state,
                      extra_tensors={"rope_freqs.weight": freqs.astype(np.float32)})
    assert read_gguf(path).config.rope_scaling == scaling
    bad = write_gguf(tmp_path / "bad.gguf", config, state,
                     extra_tensors={"rope_freqs.weight": np.linspace(1, 3, 8, dtype=np.float32)})
    with pytest.raises(UnsupportedModelError, match="rope_freqs"):
        read_gguf(bad)


def test_linear_rope_scaling_and_extra_stop_tokens(tmp_path):
    config = TINY["llama"]

    def linear(writer):
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(4.0)
        writer.add_eot_token_id(0)

    checkpoint = read_gguf(write_gguf(tmp_path / "lin.gguf", config, hf_state_dict(config),
                                      extra_kv=linear))
    assert checkpoint.config.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    assert checkpoint.config.eos_token_ids == checkpoint.tokenizer.eos_token_ids == (2, 0)


def test_unsupported_rope_scaling(tmp_path):
    config = TINY["llama"]
    path = write_gguf(tmp_path / "yarn.gguf", config, hf_state_dict(config),
                      extra_kv=lambda w: w.add_rope_scaling_type(gguf.RopeScalingType.YARN))
    with pytest.raises(UnsupportedModelError, match="rope scaling type 'yarn'"):
        read_gguf(path)


# ----------------------------------------------------------------------------- bad files
def test_missing_file(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        read_gguf(tmp_path / "nope.gguf")


def _truncate(src: Path, dst: Path, size: int) -> Path:
    with open(src, "rb") as f, open(dst, "wb") as g:
        g.write(f.read(size))
    return dst


@pytest.mark.parametrize("fraction", [0.0, 0.001, 0.02, 0.5, 0.999])
def test_truncated_tiny_file(tmp_path, tiny_llama, fraction):
    size = int(os.path.getsize(tiny_llama[0]) * fraction)
    path = _truncate(tiny_llama[0], tmp_path / "cut.gguf", size)
    with pytest.raises(CheckpointError, match=r"cut\.gguf is not a valid GGUF file"):
        read_gguf(path)


def test_truncated_real_file_by_one_byte(tmp_path, smollm2_gguf):
    size = os.path.getsize(smollm2_gguf) - 1
    path = _truncate(smollm2_gguf, tmp_path / "smol.gguf", size)
    with pytest.raises(CheckpointError, match="not a valid GGUF file.*truncated or corrupt"):
        read_gguf(path)


@pytest.mark.parametrize("prefix", [b"", b"GGUF\x03\x00\x00\x00"])
def test_random_bytes(tmp_path, prefix):
    path = tmp_path / "random.gguf"
    rng = np.random.default_rng(0)
    path.write_bytes(prefix + rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(CheckpointError, match="is not a valid GGUF file"):
        read_gguf(path)


def test_unsupported_architecture(tmp_path):
    config = TINY["llama"]
    path = write_gguf(tmp_path / "f.gguf", config, hf_state_dict(config), arch="falcon")
    with pytest.raises(UnsupportedModelError, match="architecture 'falcon' is not supported"):
        read_gguf(path)


def test_unsupported_tensor_type(tmp_path):
    config = TINY["llama"]
    state = hf_state_dict(config)
    block_size, type_size = gguf.GGML_QUANT_SIZES[Q.IQ4_NL]
    assert Q.IQ4_NL not in SUPPORTED_TYPES
    data = np.zeros((96, 64 // block_size * type_size), dtype=np.uint8)
    path = write_gguf(tmp_path / "iq.gguf", config, state,
                      raw={"blk.1.ffn_up.weight": (data, Q.IQ4_NL)})
    with pytest.raises(UnsupportedModelError, match=r"blk\.1\.ffn_up\.weight has type IQ4_NL"):
        read_gguf(path)


def test_tensor_shape_inconsistent_with_metadata(tmp_path):
    config = TINY["llama"]
    state = hf_state_dict(config)
    state["model.layers.0.mlp.up_proj.weight"] = torch.zeros(64, 64)
    path = write_gguf(tmp_path / "shape.gguf", config, state)
    with pytest.raises(CheckpointError, match=r"blk\.0\.ffn_up\.weight .* has shape \(64, 64\) "
                                              r"but the metadata implies \(96, 64\)"):
        read_gguf(path)


def test_missing_tensor(tmp_path):
    config = TINY["llama"]
    state = hf_state_dict(config)
    del state["model.layers.1.mlp.down_proj.weight"]
    with pytest.raises(CheckpointError, match=r"lacks 1 tensor.*layers\.1\.mlp\.down_proj"):
        read_gguf(write_gguf(tmp_path / "missing.gguf", config, state))
