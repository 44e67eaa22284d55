"""AWQ: activation-aware scaling of weights before quantizing them.

A weight column that meets large activations matters more to the output than one that
meets small ones. For the Linears reading one input x `[T, K]`, AWQ picks per-input-channel
scales s `[K]`, quantizes `W diag(s)` instead of W and divides the input by s, which leaves
the exact product unchanged but spends the quantization grid where the activations are
large. Recipe (Lin et al., 2023), per group of Linears sharing an input:

1. statistics (`collect_input_stats`): one forward pass over calibration windows with hooks
   on the Linears' inputs; per channel the mean |x| over every token, and `max_samples`
   evenly spaced rows of x kept for step 2;
2. search (`search_scale`): for alpha in 0, 1/num_grid, ..., 1, `s = mean|x| ** alpha`
   normalised to geometric mean 1 between its extremes; keep the alpha whose quantized
   output `(x / s) @ Q(W diag(s)).T` is closest (mean squared error, summed over the group's
   Linears) to the exact `x @ W.T` on the kept rows. alpha = 0 is plain round-to-nearest, so
   the search never does worse than it on the calibration rows;
3. folding (`fold_scales`): 1/s goes where it costs nothing at run time:
   - q/k/v read `input_layernorm(h)`: the norm's weight is divided by s;
   - gate/up read `post_attention_layernorm(h)`: likewise;
   - down reads `silu(gate(x)) * up(x)`, linear in up's output: up's output rows are
     divided by s (row scaling commutes with row-wise group quantization);
   - o_proj reads the attention output, which has no per-channel weight to fold into
     under GQA: its module keeps an explicit `input_scale = 1/s`, as does any other Linear.

Then every targeted Linear is quantized: group-wise int4 with zero points (bits=4) or
per-channel int8 (bits=8). Weight clipping search (AWQ's second step) is not done. The
layer structure is read from the HF module names of `tessera.model.transformer`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from tessera.kernels.int8_matmul import dequantize_int8
from tessera.model.transformer import DecoderLayer
from tessera.quant.int4 import fake_quantize_groups, group_size_for
from tessera.quant.int8 import quantize_int8

_MIN_ACTIVATION = 1e-4  # floor on mean |x| before the power, as in the AWQ reference code


@dataclass(frozen=True)
class ScaleGroup:
    """Linears that read one input, and where 1/s can be folded (at most one of the two)."""

    names: tuple[str, ...]  # qualified names of every Linear reading the input
    norm: str | None = None  # an RMSNorm producing the input: its weight absorbs 1/s
    producer: str | None = None  # a Linear whose output rows produce it linearly

    @property
    def is_folded(self) -> bool:
        return self.norm is not None or self.producer is not None


@dataclass
class InputStats:
    """Running statistics of one Linear input (see `collect_input_stats`)."""

    stride: int  # keep every stride-th row
    max_samples: int
    abs_sum: torch.Tensor | None = None
    count: int = 0
    rows: list[torch.Tensor] = field(default_factory=list)

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if self.abs_sum is None:
            self.abs_sum = torch.zeros(x.shape[-1], dtype=torch.float64, device=x.device)
        self.abs_sum += x.abs().sum(0, dtype=torch.float64)
        first = (-self.count) % self.stride  # the first row index here that is kept
        kept = sum(r.shape[0] for r in self.rows)
        self.rows.append(x[first::self.stride][: self.max_samples - kept].clone())
        self.count += x.shape[0]

    @property
    def mean_abs(self) -> torch.Tensor:
        return (self.abs_sum / self.count).float()

    @property
    def samples(self) -> torch.Tensor:
        return torch.cat(self.rows)


# ---------------------------------------------------------------------------- groups


def scale_groups(model: nn.Module, targets: Iterable[str]) -> list[ScaleGroup]:
    """The groups of every decoder layer that hold a target, then one group per remaining
    target (explicit input scale)."""
    targets = set(targets)
    groups = []
    for prefix, module in model.named_modules():
        if isinstance(module, DecoderLayer):
            groups += _layer_groups(prefix)
    groups = [g for g in groups if targets & set(g.names)]
    covered = {name for g in groups for name in g.names}
    return groups + [ScaleGroup((name,)) for name in sorted(targets - covered)]


def _layer_groups(prefix: str) -> list[ScaleGroup]:
    attn, mlp = f"{prefix}.self_attn", f"{prefix}.mlp"
    return [
        ScaleGroup((f"{attn}.q_proj", f"{attn}.k_proj", f"{attn}.v_proj"),
                   norm=f"{prefix}.input_layernorm"),
        ScaleGroup((f"{attn}.o_proj",)),
        ScaleGroup((f"{mlp}.gate_proj", f"{mlp}.up_proj"),
                   norm=f"{prefix}.post_attention_layernorm"),
        ScaleGroup((f"{mlp}.down_proj",), producer=f"{mlp}.up_proj"),
    ]


# ---------------------------------------------------------------------------- statistics


@torch.no_grad()
def collect_input_stats(model: nn.Module, groups: list[ScaleGroup], windows: torch.Tensor,
                        max_samples: int, batch_size: int = 1) -> dict[str, InputStats]:
    """Statistics of each group's input (keyed by the group's first Linear) over one
    forward pass of the token windows `[B, T]`."""
    modules = dict(model.named_modules())
    stride = max(1, windows.numel() // max_samples)
    stats = {g.names[0]: InputStats(stride, max_samples) for g in groups}
    hooks = [modules[name].register_forward_pre_hook(
        lambda _module, args, s=stats[name]: s.add(args[0])) for name in stats]
    device = next(model.parameters()).device
    try:
        for start in range(0, windows.shape[0], batch_size):
            model(windows[start:start + batch_size].to(device))
    finally:
        for hook in hooks:
            hook.remove()
    return stats


# ---------------------------------------------------------------------------- search


def fake_quantizer(bits: int, group_size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """W -> Q(W) in fp32: group-wise int4 (bits=4) or per-channel int8 (bits=8)."""
    if bits == 8:
        return lambda w: dequantize_int8(*quantize_int8(w))
    return lambda w: fake_quantize_groups(w, group_size_for(w.shape[1], group_size))


def scales_for(mean_abs: torch.Tensor, alpha: float) -> torch.Tensor:
    s = mean_abs.float().clamp(min=_MIN_ACTIVATION).pow(alpha)
    return s / (s.max() * s.min()).sqrt()


def output_error(x: torch.Tensor, weight: torch.Tensor, s: torch.Tensor,
                 quantize: Callable[[torch.Tensor], torch.Tensor]) -> float:
    """Mean squared error of `(x / s) @ Q(W diag(s)).T` against `x @ W.T` (fp32)."""
    effective = quantize(weight * s[None, :]) / s[None, :]
    return (x @ (effective - weight).T).pow(2).mean().item()


@torch.no_grad()
def search_scale(x: torch.Tensor, mean_abs: torch.Tensor, weights: list[torch.Tensor],
                 quantize: Callable[[torch.Tensor], torch.Tensor], num_grid: int = 20
                 ) -> tuple[torch.Tensor, float, list[float]]:
    """(best s `[K]`, its alpha, the error of every alpha) for the Linears `weights` (each
    `[N_i, K]`) reading rows `x` `[n, K]` (see the module doc)."""
    weight = torch.cat([w.detach().float() for w in weights])
    x = x.float()
    errors = [output_error(x, weight, scales_for(mean_abs, i / num_grid), quantize)
              for i in range(num_grid + 1)]
    best = min(range(num_grid + 1), key=errors.__getitem__)
    return scales_for(mean_abs, best / num_grid), best / num_grid, errors


# ---------------------------------------------------------------------------- folding


@torch.no_grad()
def fold_scales(model: nn.Module, group: ScaleGroup, s: torch.Tensor) -> None:
    """Multiply the group's weight columns by s and divide the producing norm's weight (or
    the producing Linear's output rows) by s: the model computes the same function."""
    assert group.is_folded, "this group's 1/s has nowhere to go; use an input scale"
    modules = dict(model.named_modules())
    for name in group.names:
        _scale_(modules[name].weight, s[None, :])
    if group.norm is not None:
        _scale_(modules[group.norm].weight, 1.0 / s)
    else:
        _scale_(modules[group.producer].weight, 1.0 / s[:, None])


def _scale_(param: torch.Tensor, factor: torch.Tensor) -> None:
    """In place, computed in fp32 whatever the parameter's dtype."""
    param.copy_(param.float() * factor.to(param.device))


@torch.no_grad()
def search_and_fold(model: nn.Module, groups: list[ScaleGroup], stats: dict[str, InputStats],
                    targets: set[str], bits: int, group_size: int, num_grid: int
                    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Search every group's scale in turn, folding those that can be folded. Returns the
    unfolded scales (target name -> s, for an explicit input scale) and each group's alpha
    (keyed by its first Linear)."""
    modules = dict(model.named_modules())
    quantize = fake_quantizer(bits, group_size)
    unfolded, alphas = {}, {}
    for group in groups:
        group_stats = stats.pop(group.names[0])
        if group_stats.count == 0:
            continue  # never called in the calibration pass: plain quantization
        weights = [modules[n].weight for n in group.names if n in targets]
        s, alphas[group.names[0]], _ = search_scale(
            group_stats.samples, group_stats.mean_abs, weights, quantize, num_grid)
        if group.is_folded:
            fold_scales(model, group, s)
        else:
            unfolded.update({n: s for n in group.names if n in targets})
    return unfolded, alphas
