"""A matmul straight from bitsandbytes' NF4 weights for the few rows of a decode step.

Why our own kernel: for one row bitsandbytes has a 4-bit GEMV; for more (a rollout's 32 rows)
``bnb.matmul_4bit`` dequantizes the whole weight to a new bf16 tensor at each call and then runs a
dense GEMM, so every decode step writes and reads the base in bf16 (for Llama-3.1-8B ≈ 28 GB of traffic
per step where the packed weights are 3.5 GB). ``matmul`` reads the packed bytes once per step: each
program takes ``BLOCK_N`` output features and one span of the input features, walks it one 64-weight
quantization block at a time, dequantizes the block in registers (its NF4 codes × the block's absmax,
which double quantization stores as an 8-bit code of its own) exactly as bitsandbytes rounds it
(code × absmax in fp32, then to the compute dtype), and multiplies on tensor cores. The weight never
exists in bf16 outside registers, so it costs no memory and no sync rewrites anything.

Layout (bitsandbytes' ``Params4bit``): the [N, K] weight flattened row-major, two codes per byte, the
even element in the high nibble; one absmax per 64 consecutive elements; under double quantization
absmax = code2[absmax_u8] · absmax2[block // 256] + offset.

Prefills (many rows) stay on bitsandbytes (one dequantization per layer, then a GEMM at compute
bound), as does anything but NF4 in 64-blocks. Without Triton or off CUDA, ``usable`` says no; the
kernel runs on CPU tensors under ``TRITON_INTERPRET=1`` (the tests)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

try:  # Triton ships with CUDA builds of PyTorch
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

QBLOCK = 64  # weights per absmax (bitsandbytes' QLoRA default)
QBLOCK2 = 256  # absmaxes per second-level scale under double quantization
MAX_ROWS = 64
"""Rows up to which ``matmul`` serves a projection (decode steps); more go to bitsandbytes."""
# Launch settings, chosen with bench/nf4.py on an H200 (it sweeps them).
LAUNCH = {"block_n": 32, "num_warps": 4, "num_stages": 3, "programs": 264}


@dataclass(frozen=True)
class NF4Weight:
    """One bitsandbytes NF4 weight as the kernel reads it (views of its own tensors, no copies)."""

    packed: torch.Tensor  # uint8 [N*K/2]
    absmax: torch.Tensor  # [N*K/64]: uint8 codes (double quantization) or fp32
    code: torch.Tensor  # fp32 [16]: the NF4 levels
    absmax_code: torch.Tensor | None  # fp32 [256] (double quantization)
    absmax_scale: torch.Tensor | None  # fp32 [N*K/64/256] (double quantization)
    offset: float  # added to every dequantized absmax (double quantization)
    out_features: int
    in_features: int

    @classmethod
    def of(cls, weight) -> NF4Weight | None:
        """The kernel's view of a ``Params4bit`` (``weight.quant_state`` set), or None when the kernel
        does not serve its format (FP4, other block sizes, an input size not a multiple of 64)."""
        qs = getattr(weight, "quant_state", None)
        if qs is None or getattr(qs, "quant_type", None) != "nf4" or qs.blocksize != QBLOCK or len(qs.shape) != 2:
            return None
        n, k = (int(s) for s in qs.shape)
        if k % QBLOCK:
            return None
        nested = getattr(qs, "nested", False) or getattr(qs, "state2", None) is not None
        if nested and qs.state2.blocksize != QBLOCK2:
            return None
        return cls(weight.data.reshape(-1), qs.absmax.reshape(-1), qs.code.float(),
                   qs.state2.code.float() if nested else None, qs.state2.absmax.float() if nested else None,
                   float(qs.offset) if nested else 0.0, n, k)


def usable(device: torch.device) -> bool:
    """Whether ``matmul`` runs here: CUDA with Triton, or Triton's interpreter (CPU tensors)."""
    if triton is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def splits(n: int, k: int, block_n: int, programs: int) -> int:
    """How many spans the input features are cut into so that about ``programs`` programs run (a
    projection with few outputs has few column blocks), each span a whole number of 64-blocks."""
    columns = -(-n // block_n)
    return max(1, min(k // QBLOCK, -(-programs // columns)))


def matmul(x: torch.Tensor, w: NF4Weight, bias: torch.Tensor | None = None, **launch) -> torch.Tensor:
    """x [..., K] @ Wᵀ (+ bias) -> [..., N] in x's dtype, W dequantized block by block in registers.
    fp32 accumulation; the spans of a split input are summed in fp32, in a fixed order."""
    cfg = {**LAUNCH, **launch}
    lead, k = x.shape[:-1], x.shape[-1]
    assert k == w.in_features, (k, w.in_features)
    x2 = x.reshape(-1, k).contiguous()
    m, n = x2.shape[0], w.out_features
    block_m = max(16, triton.next_power_of_2(m))
    n_split = splits(n, k, cfg["block_n"], cfg["programs"])
    span = -(-(k // QBLOCK) // n_split) * QBLOCK
    n_split = -(-k // span)
    part = torch.empty((n_split, m, n), dtype=torch.float32, device=x.device)
    double = w.absmax_code is not None
    _nf4_matmul[(-(-n // cfg["block_n"]), n_split)](
        x2, w.packed, w.absmax, w.code, w.absmax_code if double else w.code, w.absmax_scale if double else w.code,
        part, w.offset, m, n, k, span, x2.stride(0),
        DOUBLE=double, BLOCK_M=block_m, BLOCK_N=cfg["block_n"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    out = part[0] if n_split == 1 else part.sum(0)
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).reshape(*lead, n)


def dequantize(w: NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    """The dense [N, K] weight in ``dtype``, rounded as bitsandbytes' and the kernel's (the reference
    the tests hold ``matmul`` to)."""
    codes = torch.stack([w.packed >> 4, w.packed & 15], -1).reshape(-1).long()
    absmax = w.absmax.float()
    if w.absmax_code is not None:
        blocks = torch.arange(absmax.numel(), device=absmax.device)
        absmax = w.absmax_code[w.absmax.long()] * w.absmax_scale[blocks // QBLOCK2] + w.offset
    values = w.code[codes].view(-1, QBLOCK) * absmax[:, None]
    return values.to(dtype).view(w.out_features, w.in_features)


if triton is not None:

    @triton.jit
    def _nf4_matmul(x_ptr, w_ptr, absmax_ptr, code_ptr, code2_ptr, absmax2_ptr, out_ptr, offset, M, N, K, span, stride_xm,
                    DOUBLE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        # Program (column block, span): out[split, :, cols] = x[:, span] @ W[cols, span]ᵀ
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rows = tl.arange(0, BLOCK_M)
        half = tl.arange(0, 32)  # the 32 bytes (64 codes) of one quantization block
        col_ok, row_ok = cols < N, rows < M
        k_lo = tl.program_id(1) * span
        k_hi = tl.minimum(k_lo + span, K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, 64):
            start = cols.to(tl.int64) * K + k0  # flat index of each column's first weight in this block
            byte = tl.load(w_ptr + (start // 2)[:, None] + half[None, :], mask=col_ok[:, None], other=0)
            block = start // 64
            if DOUBLE:
                code = tl.load(absmax_ptr + block, mask=col_ok, other=0).to(tl.int32)
                scale = tl.load(code2_ptr + code) * tl.load(absmax2_ptr + block // 256, mask=col_ok, other=0) + offset
            else:
                scale = tl.load(absmax_ptr + block, mask=col_ok, other=0)
            # the block's 64 weights, even (high nibble) and odd (low nibble), rounded as bitsandbytes'
            hi = (tl.load(code_ptr + (byte >> 4).to(tl.int32)) * scale[:, None]).to(x_ptr.dtype.element_ty)
            lo = (tl.load(code_ptr + (byte & 15).to(tl.int32)) * scale[:, None]).to(x_ptr.dtype.element_ty)
            xs = x_ptr + rows[:, None] * stride_xm + k0 + 2 * half[None, :]
            x_even = tl.load(xs, mask=row_ok[:, None], other=0.0)
            x_odd = tl.load(xs + 1, mask=row_ok[:, None], other=0.0)
            acc += tl.dot(x_even, tl.trans(hi)) + tl.dot(x_odd, tl.trans(lo))
        out = out_ptr + tl.program_id(1) * M * N + rows[:, None] * N + cols[None, :]
        tl.store(out, acc, mask=row_ok[:, None] & col_ok[None, :])
