"""One matrix product for the projections that read the same input, applied to a loaded
model for inference.

`fuse_projections(model)` replaces, in every decoder layer, `q_proj`, `k_proj` and `v_proj`
(one input: the normed hidden state) and `gate_proj` and `up_proj` (one input: the normed
attention output) by `ProjectionSlice`s of one `SharedInputProjection` each. The model's
code is unchanged: it still calls `q_proj(x)`, `k_proj(x)`, `v_proj(x)`. The first slice
called with an input computes the whole product `x @ [Wq; Wk; Wv]^T` once and keeps it; the
other slices return their column ranges of it (views, no copy) when called with the same
tensor object (a slice called with another input computes the product for that input). The
last slice's call releases the kept product. At decode batch sizes a product is a
matrix-vector pass bounded by launch latency more than by bytes, so three launches become
one.

Plain `nn.Linear` groups of one dtype and device are fused, and so are groups of quantized
layers (`tessera.quant`) of one kind and options whose stored tensors all have a row per
output channel (int8, AWQ int4 without an input scale, FP8 with per-channel scales): their
tensors are concatenated into one module of that kind (`SharedInputQuantized`). Biases are
fused when every member has one (a group where only some have one is left alone). The
fused tensors live under the layer (`self_attn.qkv_proj`, `mlp.gate_up_proj`), but
`state_dict()` still lists the members' own names and
`load_state_dict` takes them (state-dict hooks split and join the fused tensors), so a
fused model saves, and loads checkpoints, like an unfused one. `unfuse_projections(model)`
puts the members back (their tensors views of the fused ones, no copy); the quantizer
calls it first, so a model an engine has fused can still be quantized.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from tessera.quant.linear import QuantizedLinear

ATTENTION_GROUP = ("q_proj", "k_proj", "v_proj")
MLP_GROUP = ("gate_proj", "up_proj")


class SharedInputProjection(nn.Module):
    """`[W_1; ...; W_n]` applied once per input; member i reads output columns
    `starts[i] : starts[i] + sizes[i]`."""

    STATE_PATH = ""  # where the fused tensors sit under the group, in the state dict

    def __init__(self, linears: list[nn.Module], member_names: tuple[str, ...]):
        super().__init__()
        self.member_names = member_names
        self.sizes = [m.out_features for m in linears]
        self.starts = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self._input: torch.Tensor | None = None
        self._output: torch.Tensor | None = None
        self.hooks: list = []  # the parent's state-dict hooks, removed on unfusing
        self._join(linears)

    def _join(self, linears: list[nn.Linear]) -> None:
        with torch.no_grad():
            self.weight = nn.Parameter(torch.cat([m.weight for m in linears]),
                                       requires_grad=False)
            biases = [m.bias for m in linears]
            self.bias = nn.Parameter(torch.cat(biases), requires_grad=False) \
                if all(b is not None for b in biases) else None
        # (x, weight, bias) -> x @ weight^T + bias; serving may swap in a faster one
        # (`cpu_prepack.py`, `gemv_products.py`)
        self.product = F.linear

    @property
    def suffixes(self) -> tuple[str, ...]:
        """The state-dict entries split among the members."""
        return ("weight", "bias")

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        return self.product(x, self.weight, self.bias)

    def split(self) -> list[nn.Module]:
        """The members again (their weights views of the fused ones, no copy)."""
        weights = self.weight.split(self.sizes)
        biases = self.bias.split(self.sizes) if self.bias is not None else \
            [None] * len(self.sizes)
        return [linear_of(w, b) for w, b in zip(weights, biases, strict=True)]

    def prime(self, x: torch.Tensor, output: torch.Tensor) -> None:
        """Take `output` as the product of x, computed elsewhere (`gemv_products.py` computes
        it with the norm before it); the members called with x read it."""
        self._input, self._output = x, output

    def whole(self, x: torch.Tensor) -> torch.Tensor:
        """The whole product of x (the primed one, released, when x is the primed input)."""
        if self._input is not x:
            return self.compute(x)
        out = self._output
        self._input = self._output = None
        return out

    def member(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if self._input is not x:
            self._input, self._output = x, self.compute(x)
        start = self.starts[index]
        out = self._output[..., start:start + self.sizes[index]]
        if index == len(self.sizes) - 1:
            self._input = self._output = None
        return out


class SharedInputQuantized(SharedInputProjection):
    """The same for quantized members of one kind and options (`tessera.quant`): their
    stored tensors, each with a row per output channel, concatenated into one module of
    that kind, which computes the product."""

    STATE_PATH = ".fused"

    def _join(self, members: list[QuantizedLinear]) -> None:
        first = members[0]
        self.fused = type(first).empty(first.in_features, sum(self.sizes),
                                       bias=first.bias is not None, input_scale=False,
                                       **first.options())
        for name in self.suffixes:
            setattr(self.fused, name, torch.cat([getattr(m, name) for m in members]))

    @property
    def suffixes(self) -> tuple[str, ...]:
        storage = self.fused.STORAGE
        return (*storage, "bias") if self.fused.bias is not None else storage

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused(x)

    def split(self) -> list[nn.Module]:
        kind, sizes = type(self.fused), self.sizes
        parts = {name: getattr(self.fused, name).split(sizes) for name in self.suffixes}
        members = []
        for i, size in enumerate(sizes):
            member = kind.empty(self.fused.in_features, size, bias="bias" in parts,
                                input_scale=False, **self.fused.options())
            for name, part in parts.items():
                setattr(member, name, part[i])
            members.append(member)
        return members


class ProjectionSlice(nn.Module):
    """Stands where one member `nn.Linear` stood; its output is that member's."""

    def __init__(self, group: SharedInputProjection, index: int, in_features: int):
        super().__init__()
        self.index, self.in_features = index, in_features
        self.out_features = group.sizes[index]
        object.__setattr__(self, "group", group)  # owned by the layer, not by the slice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.member(self.index, x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"member {self.index} of a fused projection"


def linear_of(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A plain `nn.Linear` holding these parameters (no copy)."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = weight if isinstance(weight, nn.Parameter) else \
        nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = bias if isinstance(bias, nn.Parameter) else \
            nn.Parameter(bias, requires_grad=False)
    return linear


def restore_linears(model: nn.Module, module_type: type,
                    swapped: Callable[[Callable], bool]) -> int:
    """Undo a serving transform of products: every `module_type` child back to a plain
    `nn.Linear` of its parameters, and every float fused projection whose product
    `swapped(product)` back to `F.linear`; returns how many were restored."""
    restored = 0
    for parent in list(model.modules()):
        if type(parent) is SharedInputProjection and swapped(parent.product):
            parent.product = F.linear
            restored += 1
        for name, child in list(parent.named_children()):
            if isinstance(child, module_type):
                setattr(parent, name, linear_of(child.weight, child.bias))
                restored += 1
    return restored


def fusable(linears: list[nn.Module]) -> bool:
    """Plain `nn.Linear`s of one dtype and device, or quantized ones (see below)."""
    if all(isinstance(m, QuantizedLinear) for m in linears):
        return quantized_fusable(linears)
    if not all(type(m) is nn.Linear for m in linears):
        return False
    first = linears[0].weight
    return all(m.weight.dtype == first.dtype and m.weight.device == first.device and
               m.in_features == linears[0].in_features for m in linears)


def quantized_fusable(members: list[nn.Module]) -> bool:
    """One kind and options, no input scale, and every stored tensor with a row per output
    channel (so that they concatenate; a per-tensor FP8 scale does not)."""
    first = members[0]
    if any(type(m) is not type(first) or m.options() != first.options() or
           m.in_features != first.in_features or m.input_scale is not None
           for m in members):
        return False
    device = getattr(first, first.STORAGE[0]).device
    return all(getattr(m, name).shape[0] == m.out_features and
               getattr(m, name).device == device for m in members for name in m.STORAGE)


def fuse_group(parent: nn.Module, names: tuple[str, ...], fused_name: str) -> bool:
    linears = [getattr(parent, name, None) for name in names]
    if any(m is None for m in linears) or not fusable(linears):
        return False
    if len({m.bias is None for m in linears}) > 1:
        return False  # some members have a bias and some not: left as they are
    kind = SharedInputQuantized if isinstance(linears[0], QuantizedLinear) else \
        SharedInputProjection
    group = kind(linears, names)
    parent.add_module(fused_name, group)
    for index, name in enumerate(names):
        setattr(parent, name, ProjectionSlice(group, index, linears[index].in_features))
    state_name = fused_name + group.STATE_PATH
    group.hooks = [
        parent.register_state_dict_post_hook(
            partial(_split_state, state_name, names, group.suffixes, group.sizes)),
        parent.register_load_state_dict_pre_hook(
            partial(_join_state, state_name, names, group.suffixes))]
    return True


def unfuse_group(parent: nn.Module, names: tuple[str, ...], fused_name: str) -> bool:
    group = getattr(parent, fused_name, None)
    if not isinstance(group, SharedInputProjection):
        return False
    for name, member in zip(names, group.split(), strict=True):
        setattr(parent, name, member)
    for hook in group.hooks:
        hook.remove()
    delattr(parent, fused_name)
    return True


def unfuse_projections(model: nn.Module) -> int:
    """Undo `fuse_projections`; returns the number of groups split."""
    return _each_group(model, unfuse_group)


def _split_state(state_name: str, names: tuple[str, ...], suffixes: tuple[str, ...],
                 sizes: list[int], _module: nn.Module, state_dict: dict, prefix: str,
                 _metadata) -> None:
    """state_dict post-hook: the fused tensors back under the members' names (copies, so
    nothing in the dict shares storage)."""
    for suffix in suffixes:
        whole = state_dict.pop(f"{prefix}{state_name}.{suffix}", None)
        if whole is not None:
            for name, part in zip(names, whole.split(sizes), strict=True):
                state_dict[f"{prefix}{name}.{suffix}"] = part.clone()


def _join_state(state_name: str, names: tuple[str, ...], suffixes: tuple[str, ...],
                _module: nn.Module, state_dict: dict, prefix: str, *_rest) -> None:
    """load_state_dict pre-hook: members' tensors joined under the fused name."""
    for suffix in suffixes:
        keys = [f"{prefix}{name}.{suffix}" for name in names]
        if all(key in state_dict for key in keys):
            state_dict[f"{prefix}{state_name}.{suffix}"] = torch.cat(
                [state_dict.pop(key) for key in keys])


def is_fused(model: nn.Module) -> bool:
    return any(isinstance(m, SharedInputProjection) for m in model.modules())


def fuse_projections(model: nn.Module) -> int:
    """Fuse q/k/v and gate/up in every decoder layer of a Tessera model (see above)."""
    return _each_group(model, fuse_group)


def _each_group(model: nn.Module, action) -> int:
    """`action(parent, member names, fused name)` on both groups of every layer; the
    number of groups it acted on."""
    done = 0
    for layer in model.model.layers:
        done += action(layer.self_attn, ATTENTION_GROUP, "qkv_proj")
        done += action(layer.mlp, MLP_GROUP, "gate_up_proj")
    return done
