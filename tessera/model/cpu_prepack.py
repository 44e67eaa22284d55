"""Linear layers with oneDNN-prepacked weights, for serving on the CPU.

A CPU matrix product (MKL or oneDNN) first repacks the weight into its blocked layout, on
every call. At prefill sizes that is a small share of the work, but at decode sizes (a few
rows against a weight read from memory) it costs about as much as the product: measured on
a 2-core AVX-512 machine over SmolLM2-135M's 121 weights, float32, rows 4..16, 1.4-1.6x
faster with the weights packed once beforehand, 1.1-1.2x at 32..2048 rows; bfloat16
1.3-1.6x from one to 32 rows.

One float32 row (a lone decode step) is where CPUs differ: MKL's matrix-vector product was
faster than the packed product on that Intel host (0.87x), but on a 2-core AMD EPYC host
the packed product read SmolLM2's weights 2-2.5x faster (one-row products of 69-181 us
against 155-495 us, LM head 3.2 ms against 8.0 ms). So `prepack_linears` times one one-row
pass over the model's own weights (up to `PROBE_BYTES`) both ways, twice, alternating, and
packs one float32 row only where the packed pass was the faster (`packed_wins_one_row`).

`prepack_linears(model)` gives every plain `nn.Linear` (and every fused projection of
`tessera/model/fused_projections.py`) of a float32 or bfloat16 CPU model a `PackedProduct`:
the weight reordered once by `torch.ops.mkldnn._reorder_linear_weight`, applied by
`torch.ops.mkldnn._linear_pointwise` to inputs of at least `min_rows` rows, `F.linear` on
the unchanged weight below that. The modules keep their weight parameters (tied embeddings
stay tied, `state_dict` is unchanged), so the packed copy is extra memory, about the size
of the model. `unprepack_linears` undoes it. Results equal `F.linear`'s up to the
summation order (relative differences around 1e-6 in float32). Quantized layers are left
alone. Where oneDNN is missing, nothing is packed. `copy.deepcopy` of a packed model packs
the copy's weights again (an engine packs the model it is given in place).
"""

from __future__ import annotations

import copy
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from tessera.model.fused_projections import SharedInputProjection, restore_linears

PACK_BATCH_HINT = 16  # the row count oneDNN chooses the packed layout for
MIN_ROWS = {torch.float32: 2, torch.bfloat16: 1}  # fewer rows: plain F.linear
PROBE_BYTES = 64 << 20  # weights read by each timed one-row pass (more than a CPU's L3)


def can_prepack(weight: torch.Tensor) -> bool:
    return (weight.device.type == "cpu" and weight.dtype in MIN_ROWS
            and torch.backends.mkldnn.is_available())


class PackedProduct:
    """`F.linear(x, weight, bias)` through a prepacked copy of `weight`."""

    def __init__(self, weight: torch.Tensor):
        with torch.no_grad():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(),
                                                                  PACK_BATCH_HINT)
        self.weight = weight  # the module's own parameter: a reference, not a copy
        self.min_rows = MIN_ROWS[weight.dtype]
        self.out_features = weight.shape[0]

    def __deepcopy__(self, memo: dict) -> PackedProduct:
        """oneDNN's packed tensor cannot be copied: a copied model packs its copied weight
        (`memo` makes that the copy's own parameter) again."""
        return PackedProduct(copy.deepcopy(self.weight, memo))

    def __call__(self, x: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows < self.min_rows or x.dtype != weight.dtype or torch.is_grad_enabled():
            return F.linear(x, weight, bias)
        flat = x.reshape(rows, x.shape[-1])
        out = torch.ops.mkldnn._linear_pointwise(flat, self.packed, bias, "none", [], "")
        return out.view(*x.shape[:-1], self.out_features)


class PrepackedLinear(nn.Module):
    """Stands where an `nn.Linear` stood, with the same weight and bias parameters."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.product = PackedProduct(linear.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.product(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"bias={self.bias is not None}, prepacked"


def prepack_linears(model: nn.Module) -> int:
    """Pack every plain `nn.Linear` and fused projection of `model` (in place), one float32
    row too where `packed_wins_one_row` over its weights; returns how many were packed."""
    products = []
    for parent in list(model.modules()):
        if type(parent) is SharedInputProjection and parent.product is F.linear \
                and can_prepack(parent.weight):
            parent.product = PackedProduct(parent.weight)
            products.append(parent.product)
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and can_prepack(child.weight):
                setattr(parent, name, PrepackedLinear(child))
                products.append(getattr(parent, name).product)
    one_row = [p for p in products if p.weight.dtype == torch.float32]
    if one_row and packed_wins_one_row(one_row):
        for product in one_row:
            product.min_rows = 1
    return len(products)


def packed_wins_one_row(products: list[PackedProduct]) -> bool:
    """Whether one-row products through the packed weights beat `F.linear` on this CPU:
    the best of two timed passes each way over the products' first `PROBE_BYTES` of
    weights, alternating (a few milliseconds at start-up)."""
    probe, size = [], 0
    for product in products:
        if size >= PROBE_BYTES:
            break
        probe.append(product)
        size += product.weight.numel() * product.weight.element_size()
    best = {True: float("inf"), False: float("inf")}
    with torch.inference_mode():
        for packed in (False, True, False, True):
            best[packed] = min(best[packed], _one_row_pass(probe, packed))
    return best[True] < best[False]


def _one_row_pass(products: list[PackedProduct], packed: bool) -> float:
    """Seconds for one one-row product by every product, packed or by `F.linear`."""
    rows = {p.weight.shape[1]: torch.randn(1, p.weight.shape[1]) for p in products}
    start = time.perf_counter()
    for p in products:
        x = rows[p.weight.shape[1]]
        if packed:
            torch.ops.mkldnn._linear_pointwise(x, p.packed, None, "none", [], "")
        else:
            F.linear(x, p.weight)
    return time.perf_counter() - start


def unprepack_linears(model: nn.Module) -> int:
    """Undo `prepack_linears`; returns how many were unpacked."""
    return restore_linears(model, PrepackedLinear, lambda product: product is not F.linear)
