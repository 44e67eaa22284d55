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

Only plain `nn.Linear` groups of one dtype and device are fused (quantized layers keep
their own kernels); biases are fused when every member has one (a group where only some
have one is left alone). The fused weight is a new parameter under the layer (`self_attn.qkv_proj`,
`mlp.gate_up_proj`), but `state_dict()` still lists the members' own names and
`load_state_dict` takes them (state-dict hooks split and join the fused tensors), so a
fused model saves, and loads checkpoints, like an unfused one. `unfuse_projections(model)`
puts `nn.Linear` members back (their weights views of the fused ones, no copy); the
quantizer calls it first, so a model an engine has fused can still be quantized.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

ATTENTION_GROUP = ("q_proj", "k_proj", "v_proj")
MLP_GROUP = ("gate_proj", "up_proj")


class SharedInputProjection(nn.Module):
    """`[W_1; ...; W_n]` applied once per input; member i reads output columns
    `starts[i] : starts[i] + sizes[i]`."""

    def __init__(self, linears: list[nn.Linear]):
        super().__init__()
        with torch.no_grad():
            self.weight = nn.Parameter(torch.cat([m.weight for m in linears]),
                                       requires_grad=False)
            biases = [m.bias for m in linears]
            self.bias = nn.Parameter(torch.cat(biases), requires_grad=False) \
                if all(b is not None for b in biases) else None
        self.sizes = [m.out_features for m in linears]
        self.starts = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self._input: torch.Tensor | None = None
        self._output: torch.Tensor | None = None
        self.hooks: list = []  # the parent's state-dict hooks, removed on unfusing
        # (x, weight, bias) -> x @ weight^T + bias; serving may swap in a faster one
        # (`cpu_prepack.py`)
        self.product = F.linear

    def member(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if self._input is not x:
            self._input, self._output = x, self.product(x, self.weight, self.bias)
        start = self.starts[index]
        out = self._output[..., start:start + self.sizes[index]]
        if index == len(self.sizes) - 1:
            self._input = self._output = None
        return out


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


def fusable(linears: list[nn.Module]) -> bool:
    if not all(type(m) is nn.Linear for m in linears):
        return False
    first = linears[0].weight
    return all(m.weight.dtype == first.dtype and m.weight.device == first.device and
               m.in_features == linears[0].in_features for m in linears)


def fuse_group(parent: nn.Module, names: tuple[str, ...], fused_name: str) -> bool:
    linears = [getattr(parent, name, None) for name in names]
    if any(m is None for m in linears) or not fusable(linears):
        return False
    if len({m.bias is None for m in linears}) > 1:
        return False  # some members have a bias and some not: left as they are
    group = SharedInputProjection(linears)
    parent.add_module(fused_name, group)
    for index, name in enumerate(names):
        setattr(parent, name, ProjectionSlice(group, index, linears[index].in_features))
    group.hooks = [
        parent.register_state_dict_post_hook(partial(_split_state, fused_name, names)),
        parent.register_load_state_dict_pre_hook(partial(_join_state, fused_name, names))]
    return True


def unfuse_group(parent: nn.Module, names: tuple[str, ...], fused_name: str) -> bool:
    group = getattr(parent, fused_name, None)
    if not isinstance(group, SharedInputProjection):
        return False
    weights = group.weight.split(group.sizes)
    biases = group.bias.split(group.sizes) if group.bias is not None else [None] * len(names)
    for name, weight, bias in zip(names, weights, biases, strict=True):
        setattr(parent, name, linear_of(weight, bias))
    for hook in group.hooks:
        hook.remove()
    delattr(parent, fused_name)
    return True


def unfuse_projections(model: nn.Module) -> int:
    """Undo `fuse_projections`; returns the number of groups split."""
    return _each_group(model, unfuse_group)


def _split_state(fused_name: str, names: tuple[str, ...], module: nn.Module,
                 state_dict: dict, prefix: str, _metadata) -> None:
    """state_dict post-hook: the fused tensors back under the members' names (copies, so
    nothing in the dict shares storage)."""
    sizes = getattr(module, fused_name).sizes
    for suffix in ("weight", "bias"):
        whole = state_dict.pop(f"{prefix}{fused_name}.{suffix}", None)
        if whole is not None:
            for name, part in zip(names, whole.split(sizes), strict=True):
                state_dict[f"{prefix}{name}.{suffix}"] = part.clone()


def _join_state(fused_name: str, names: tuple[str, ...], _module: nn.Module,
                state_dict: dict, prefix: str, *_rest) -> None:
    """load_state_dict pre-hook: members' tensors joined under the fused name."""
    for suffix in ("weight", "bias"):
        keys = [f"{prefix}{name}.{suffix}" for name in names]
        if all(key in state_dict for key in keys):
            state_dict[f"{prefix}{fused_name}.{suffix}"] = torch.cat(
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
