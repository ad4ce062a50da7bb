"""The fast engine's projections: how a group of linear layers that read one input (q|k|v, gate|up, o,
down) is computed.

``MergedProjection``: one dense (weight, bias), the group's weights stacked and each LoRA adapter merged
in (W + scale·B·A, in fp32, rounded once), so a step makes one GEMM per group. A lone plain Linear is
the model's own tensor, no copy. A bitsandbytes 4-bit base is dequantized into the copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


def dequantize(weight: torch.Tensor) -> torch.Tensor:
    """A bitsandbytes 4-bit weight (packed, with its ``quant_state``) as a dense [out, in] tensor in the
    compute dtype (QLoRA: NF4 with double quantization, bf16 compute)."""
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(weight.data, weight.quant_state)


def is_4bit(linear: torch.nn.Module) -> bool:
    """A bitsandbytes 4-bit layer: an nn.Linear whose weight is packed data with a ``quant_state``."""
    return getattr(getattr(linear, "weight", None), "quant_state", None) is not None


def compute_dtype(module) -> torch.dtype:
    """The dtype a projection computes in: its dense weight's (a 4-bit weight's quant state records
    the dtype it dequantizes to), through a PEFT wrapper to its base layer."""
    linear = getattr(module, "base_layer", module)
    return linear.weight.quant_state.dtype if is_4bit(linear) else linear.weight.dtype


@dataclass
class LinearParts:
    """One projection as the engine computes it: its base layer and its active, unmerged LoRA adapters."""

    base: torch.nn.Linear
    """A plain or bitsandbytes 4-bit Linear."""
    adapters: list[tuple[torch.nn.Linear, torch.nn.Linear, float]] = field(default_factory=list)
    """(lora_B, lora_A, scale) per active adapter."""

    @property
    def quantized(self) -> bool:
        return is_4bit(self.base)


def linear_parts(module) -> LinearParts | None:
    """A plain or 4-bit ``nn.Linear`` (no adapters), or a PEFT LoRA layer with its active, unmerged
    adapters; None for anything else (DoRA and other LoRA variants, other quantizations or custom
    layers), which the engine then calls as modules."""
    if isinstance(module, torch.nn.Linear):
        return LinearParts(module)
    base = getattr(module, "base_layer", None)
    if not isinstance(base, torch.nn.Linear) or not hasattr(module, "lora_A"):
        return None
    if getattr(module, "disable_adapters", False) or getattr(module, "merged", False):
        return LinearParts(base)  # PEFT's own forward then uses the base layer alone
    adapters = []
    for name in module.active_adapters:
        if name not in module.lora_A:
            continue
        if getattr(module, "use_dora", {}).get(name, False) or name in getattr(module, "lora_variant", {}):
            return None
        adapters.append((module.lora_B[name], module.lora_A[name], module.scaling[name]))
    return LinearParts(base, adapters)


def _dense(linear) -> torch.Tensor:
    """The dense weight of an ``nn.Linear``: its own tensor, or a 4-bit one dequantized (a new tensor)."""
    return dequantize(linear.weight) if is_4bit(linear) else linear.weight


class MergedProjection:
    """Projections of one input as a single (weight, bias): stacked, LoRA merged in, a 4-bit base
    dequantized. A lone plain Linear is used as it is (the model's own tensors, no copy); anything
    else lives in a buffer that ``refresh`` rewrites in place, so captured CUDA graphs stay valid."""

    def __init__(self, modules):
        self.modules = modules
        self.weight, self.bias, self.own = None, None, False
        self.refresh()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    @torch.no_grad()
    def refresh(self) -> bool:
        """Bring the weights up to date with the modules; True when the tensors moved (captured
        graphs point at the old ones)."""
        parts = [linear_parts(m) for m in self.modules]
        if len(parts) == 1 and not parts[0].adapters and not parts[0].quantized:  # the model's own tensor
            w, b = parts[0].base.weight, parts[0].base.bias
            moved = not self.own or w.data_ptr() != self.weight.data_ptr()
            self.weight, self.bias, self.own = w, b, True
            return moved
        dense = [_dense(p.base) for p in parts]
        moved = self.own or self.weight is None
        if moved:
            w0 = dense[0]
            rows = sum(w.shape[0] for w in dense)
            self.weight = torch.empty((rows, w0.shape[1]), dtype=w0.dtype, device=w0.device)
            biased = any(p.base.bias is not None or any(lb.bias is not None for lb, _, _ in p.adapters) for p in parts)
            self.bias = torch.zeros(rows, dtype=w0.dtype, device=w0.device) if biased else None
            self.own = False
        row = 0
        for w, p in zip(dense, parts):
            out = slice(row, row + w.shape[0])
            if p.adapters:  # merged in fp32, rounded once
                acc = w.float().clone()  # never the model's own tensor (fp32 .float() is a no-op)
                for lb, la, scale in p.adapters:
                    acc.addmm_(lb.weight.float(), la.weight.float(), alpha=scale)
                self.weight[out].copy_(acc)
            else:
                self.weight[out].copy_(w)
            if self.bias is not None:
                b = p.base.bias
                acc = b.float() if b is not None else torch.zeros(w.shape[0], device=w.device)
                for lb, _, scale in p.adapters:
                    if lb.bias is not None:
                        acc = acc + scale * lb.bias.float()
                self.bias[out].copy_(acc)
            row += w.shape[0]
        return moved
