"""The fast engine's projections: how a group of linear layers that read one input (q|k|v, gate|up, o,
down) is computed, and, for a bitsandbytes 4-bit base, which way.

* ``MergedProjection``: one dense (weight, bias), the group's weights stacked and each LoRA adapter
  merged in (W + scale·B·A, in fp32, rounded once), so a step makes one GEMM per group. A lone plain
  Linear is the model's own tensor, no copy. A 4-bit base is dequantized into the copy: a bf16 copy of
  the whole base (13 GiB on Llama-3.1-8B) lives beside the 4-bit one, and every sync dequantizes and
  merges again.
* ``LowRankProjection``: each base layer computes itself — a bitsandbytes ``Linear4bit`` straight from
  its packed weights, through ``bnb.matmul_4bit`` (bitsandbytes ≥ 0.50: its fused 4-bit GEMM for a few
  rows, chosen per GPU and layer shape, else dequantize-then-GEMM one layer at a time, as in prefills;
  older releases: its 4-bit GEMV for one row) — and each adapter is added as its own low-rank product
  x·Aᵀ·Bᵀ·scale, in the order and dtypes PEFT uses. It holds no weight: a sync rewrites nothing, the
  step reads the adapters' own tensors (which the optimizer updates in place), so it follows the policy
  live, as HF generate does.

``choose_quantized_path`` picks between them for a 4-bit base (``quantized_rollouts``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from posttrain.errors import PosttrainError

QUANTIZED_ROLLOUTS = ("auto", "dequantized", "transient", "4bit")
KEEP_FREE = 0.25
"""``auto`` keeps the dequantized copy for the whole run only if, once it is built, this share of the
GPU's memory is still free: room for the KV cache, the activations and the trainer's own step
(optimizer states, gradients, log-prob forwards), which all come after the copy."""
TRANSIENT_SLACK = 0.02
"""``auto`` builds the copy for each rollout (``transient``) only if this share of the GPU's memory is
left beside it and the rollout's KV cache: room for the rollout's own activations and logits."""



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

    def tensors(self) -> tuple:
        """Identity of every tensor a step reads (captured graphs point at them), and the scales they bake in."""
        return (self.base.weight.data_ptr(), id(getattr(self.base.weight, "quant_state", None)),
                None if self.base.bias is None else self.base.bias.data_ptr(),
                tuple((lb.weight.data_ptr(), la.weight.data_ptr(), None if lb.bias is None else lb.bias.data_ptr(), s)
                      for lb, la, s in self.adapters))


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


class LowRankProjection:
    """Projections of one input computed by their own base layers (a 4-bit one from its packed
    weights, with bitsandbytes' kernels), outputs side by side, each LoRA adapter added as its own
    low-rank product as PEFT adds it: ``(B(A(x in A's dtype)) · scale)`` in the result's dtype. No
    weight is copied or rewritten, at construction or at a sync."""

    def __init__(self, modules):
        self.modules = modules
        self.parts: list[LinearParts] = []
        self._tensors = None
        self.refresh()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        outs = []
        for p in self.parts:
            y = p.base(x)  # bitsandbytes' Linear4bit.forward: bnb.matmul_4bit on the packed weight
            for lb, la, scale in p.adapters:
                y = y + (F.linear(F.linear(x.to(la.weight.dtype), la.weight, la.bias), lb.weight, lb.bias) * scale).to(y.dtype)
            outs.append(y)
        return outs[0] if len(outs) == 1 else torch.cat(outs, -1)

    def refresh(self) -> bool:
        """Re-read the modules' adapters (nothing to compute: the step reads their tensors); True when
        a tensor the step reads is another one now (captured graphs point at the old ones)."""
        self.parts = [linear_parts(m) for m in self.modules]
        tensors = [p.tensors() for p in self.parts]
        moved, self._tensors = tensors != self._tensors, tensors
        return moved


class HostOffload:
    """The packed weights of a 4-bit base in host memory while a transient dense copy serves a rollout
    (nothing reads them then), back on the GPU before the update: on Llama-3.1-8B 3.5 GiB less at the
    rollout's peak, for a round trip over PCIe. Host buffers are pinned (on CUDA) and kept for the
    next rollout; the copies are ordered on the current stream like the kernels around them."""

    def __init__(self, params: list[torch.nn.Parameter]):
        self.params = params
        self.host: list[torch.Tensor] | None = None
        self.away = False

    @torch.no_grad()
    def offload(self) -> None:
        if self.away:
            return
        if self.host is None:
            pin = any(p.device.type == "cuda" for p in self.params)
            self.host = [torch.empty(p.shape, dtype=p.dtype, device="cpu", pin_memory=pin) for p in self.params]
        for p, h in zip(self.params, self.host):
            h.copy_(p.data, non_blocking=True)
            p.data = p.data.new_empty(0)  # frees the GPU copy once the stream has read it
        self.away = True

    @torch.no_grad()
    def restore(self) -> None:
        if not self.away:
            return
        for p, h in zip(self.params, self.host):
            p.data = h.to(p.device, non_blocking=True)  # p's placeholder is still on its device
        self.away = False


def quantized_weights(groups: list[list]) -> list[torch.nn.Parameter]:
    """The packed weights of the 4-bit base layers among ``groups``, each once."""
    seen, out = set(), []
    for modules in groups:
        for m in modules:
            p = linear_parts(m)
            if p is not None and p.quantized and id(p.base.weight) not in seen:
                seen.add(id(p.base.weight))
                out.append(p.base.weight)
    return out


def dense_copy_bytes(groups: list[list], dtype: torch.dtype) -> int:
    """What the dequantized path costs over the 4-bit one: the dense copies of the groups that hold a 4-bit layer."""
    size = torch.empty((), dtype=dtype).element_size()
    total = 0
    for modules in groups:
        parts = [linear_parts(m) for m in modules]
        if any(p.quantized for p in parts):
            total += sum(p.base.out_features * p.base.in_features for p in parts) * size
    return total


def free_memory(device: torch.device) -> tuple[int, int] | None:
    """(free, total) bytes of a CUDA device's memory as this process may use it; None for other
    devices. Under a cap (``torch.cuda.set_per_process_memory_fraction``: a smaller card emulated, or
    a GPU shared) the cap is the total and what this process holds counts as used."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda device: 1.0)(device)
    if fraction >= 1.0:
        return free, total
    cap = int(fraction * total)
    return max(0, min(free, cap - torch.cuda.memory_reserved(device))), cap


def check_quantized_rollouts(option: str) -> None:
    if option not in QUANTIZED_ROLLOUTS:
        raise PosttrainError(f"quantized_rollouts must be one of {', '.join(QUANTIZED_ROLLOUTS)}, got {option!r}")


def choose_quantized_path(option: str, copy_bytes: int, dtype: torch.dtype, device: torch.device, rollout_bytes: int = 0) -> tuple[str, str]:
    """("dequantized", "transient" or "4bit", a one-line notice of which and why) for a 4-bit base.

    The dense copy (one GEMM per group on dense weights with the adapters merged) samples fastest;
    the 4-bit path runs bitsandbytes layer by layer (its fused 4-bit kernel for few rows, else a
    dequantization then the same GEMM) and two small GEMMs per adapter: on the 8B shape a rollout took
    1.7 s from the copy and 4.8–5.9 s from the 4-bit weights (``bench/qlora_engine.py``,
    ``bench/rl_phases.py``). ``transient`` builds the copy for each rollout and frees it (with the KV
    cache and the graphs) before the update, whose peak then holds neither. ``auto``: the copy kept
    for the run when it fits beside a ``KEEP_FREE`` share of the GPU; else the transient copy when it
    fits now beside the rollout's KV cache (``rollout_bytes``) and a ``TRANSIENT_SLACK`` share (the
    step's activations and logits); else the 4-bit path, which needs no memory beyond the 4-bit base."""
    dt = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))
    size = f"{copy_bytes / 2**30:.2f} GiB"
    copy = f"a {dt} copy of the 4-bit base ({size})"
    transient = f"{copy}, built for each rollout and freed before the update"
    if option == "dequantized":
        return "dequantized", f"fast engine: rollouts from {copy}, as quantized_rollouts=dequantized asks"
    if option == "transient":
        return "transient", f"fast engine: rollouts from {transient}, as quantized_rollouts=transient asks"
    if option == "4bit":
        return "4bit", f"fast engine: rollouts straight from the 4-bit weights, as quantized_rollouts=4bit asks (saves a {size} {dt} copy)"
    mem = free_memory(device)
    if mem is None:
        return "dequantized", f"fast engine: rollouts from {copy}: no GPU memory to save on {device.type}"
    free, total = mem
    room = f"{free / 2**30:.1f} of {total / 2**30:.1f} GiB free"
    if copy_bytes + KEEP_FREE * total <= free:
        return "dequantized", (f"fast engine: rollouts from {copy}, which fits ({room}, {KEEP_FREE:.0%} kept free); "
                               "quantized_rollouts=transient or 4bit saves that memory")
    if copy_bytes + rollout_bytes + TRANSIENT_SLACK * total <= free:
        return "transient", (f"fast engine: rollouts from {transient}: kept, it would not leave {KEEP_FREE:.0%} free ({room}); "
                             "quantized_rollouts=4bit saves it during rollouts too, dequantized keeps it")
    return "4bit", (f"fast engine: rollouts straight from the 4-bit weights: {copy} does not fit beside the rollout's "
                    f"{rollout_bytes / 2**30:.2f} GiB KV cache ({room}); quantized_rollouts=transient or dequantized forces it")
