"""A matmul straight from bitsandbytes' NF4 weights for the few rows of a decode step.

Why our own kernel: for one row bitsandbytes has a 4-bit GEMV; for more (a rollout's 32 rows)
``bnb.matmul_4bit`` dequantizes the whole weight to a new bf16 tensor at each call and then runs a
dense GEMM, so every decode step writes and reads the base in bf16 (for Llama-3.1-8B ≈ 28 GB of traffic
per step where the packed weights are 3.5 GB). ``matmul`` reads the packed bytes once per step: each
program takes ``BLOCK_N`` output features and one span of the input features, walks it ``BLOCK_K``
inputs at a time, dequantizes that tile in registers (NF4 codes × their blocks' absmaxes) exactly as
bitsandbytes rounds it (code × absmax in fp32, then to the compute dtype), and multiplies on tensor
cores. The weight never
exists in bf16 outside registers, so it costs no memory and no sync rewrites anything.

Layout (bitsandbytes' ``Params4bit``): the [N, K] weight flattened row-major, two codes per byte, the
even element in the high nibble; one absmax per 64 consecutive elements; under double quantization
absmax = code2[absmax_u8] · absmax2[block // 256] + offset, which ``NF4Weight.of`` computes once.

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
LAUNCH = {"block_n": 32, "block_k": 128, "num_warps": 4, "num_stages": 2, "programs": 528, "join": True, "lut": "select", "scale": "block"}
NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)
"""bitsandbytes' NF4 code (the QLoRA paper's normal-float levels), which the kernel holds as constants."""


@dataclass(frozen=True)
class NF4Weight:
    """One bitsandbytes NF4 weight as the kernel reads it: its packed bytes (a view, no copy) and its
    absmaxes dequantized once to fp32 (1/16 of the packed size; bitsandbytes recomputes them at each call)."""

    packed: torch.Tensor  # uint8 [N*K/2]
    absmax: torch.Tensor  # fp32 [N*K/64]
    code: torch.Tensor  # fp32 [16]: the NF4 levels
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
        if not torch.equal(qs.code.float().cpu(), torch.tensor(NF4_LEVELS)):
            return None
        absmax = qs.absmax.reshape(-1)
        if nested:  # as bitsandbytes' dequantize_blockwise, then + offset, in fp32
            blocks = torch.arange(absmax.numel(), device=absmax.device) // QBLOCK2
            absmax = qs.state2.code.float()[absmax.long()] * qs.state2.absmax.float()[blocks] + qs.offset.float()
        return cls(weight.data.reshape(-1), absmax.float().contiguous(), qs.code.float().contiguous(), n, k)


def usable(device: torch.device) -> bool:
    """Whether ``matmul`` runs here: CUDA with Triton, or Triton's interpreter (CPU tensors)."""
    if triton is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def splits(n: int, k: int, block_n: int, block_k: int, programs: int) -> int:
    """How many spans the input features are cut into so that about ``programs`` programs run (a
    projection with few outputs has few column blocks), each span a whole number of ``block_k``."""
    columns = -(-n // block_n)
    return max(1, min(-(-k // block_k), -(-programs // columns)))


def matmul(x: torch.Tensor, w: NF4Weight, bias: torch.Tensor | None = None, **launch) -> torch.Tensor:
    """x [..., K] @ Wᵀ (+ bias) -> [..., N] in x's dtype, W dequantized tile by tile in registers.
    fp32 accumulation; the spans of a split input are summed in fp32, in a fixed order."""
    cfg = {**LAUNCH, **launch}
    lead, k = x.shape[:-1], x.shape[-1]
    assert k == w.in_features, (k, w.in_features)
    x2 = x.reshape(-1, k).contiguous()
    m, n, bk = x2.shape[0], w.out_features, cfg["block_k"]
    n_split = splits(n, k, cfg["block_n"], bk, cfg["programs"])
    steps = -(-k // bk)
    span = -(-steps // n_split) * bk  # inputs per program, whole steps
    n_split = -(-k // span)
    part = torch.empty((n_split, m, n), dtype=torch.float32, device=x.device)
    _nf4_matmul[(-(-n // cfg["block_n"]), n_split)](
        x2, w.packed, w.absmax, w.code, part, m, n, k, span, x2.stride(0),
        BLOCK_M=max(16, triton.next_power_of_2(m)), BLOCK_N=cfg["block_n"], BLOCK_K=bk, JOIN=cfg["join"],
        LUT={"gather": 0, "select": 1, "none": 2}[cfg["lut"]], SCALE_BLOCK=cfg["scale"] == "block",
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    out = part[0] if n_split == 1 else part.sum(0)
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).reshape(*lead, n)


def dequantize(w: NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    """The dense [N, K] weight in ``dtype``, rounded as bitsandbytes' and the kernel's (the reference
    the tests hold ``matmul`` to)."""
    codes = torch.stack([w.packed >> 4, w.packed & 15], -1).reshape(-1).long()
    values = w.code[codes].view(-1, QBLOCK) * w.absmax[:, None]
    return values.to(dtype).view(w.out_features, w.in_features)


if triton is not None:

    @triton.jit
    def _nf4_level(q, code_ptr, LUT: tl.constexpr):
        """The NF4 level of 4-bit codes ``q`` (int32): a load from the code table, or (``LUT`` 1) a
        tree of selects on the code's bits over the constant levels, which needs no memory access."""
        if LUT == 0:
            return tl.load(code_ptr + q)
        if LUT == 2:  # bench only: the kernel without its decoding, to see what decoding costs
            return q.to(tl.float32)
        b0, b1, b2, b3 = (q & 1) != 0, (q & 2) != 0, (q & 4) != 0, (q & 8) != 0
        a0 = tl.where(b0, -0.6961928009986877, -1.0)
        a1 = tl.where(b0, -0.39491748809814453, -0.5250730514526367)
        a2 = tl.where(b0, -0.18477343022823334, -0.28444138169288635)
        a3 = tl.where(b0, 0.0, -0.09105003625154495)
        a4 = tl.where(b0, 0.16093020141124725, 0.07958029955625534)
        a5 = tl.where(b0, 0.33791524171829224, 0.24611230194568634)
        a6 = tl.where(b0, 0.5626170039176941, 0.44070982933044434)
        a7 = tl.where(b0, 1.0, 0.7229568362236023)
        c0, c1, c2, c3 = tl.where(b1, a1, a0), tl.where(b1, a3, a2), tl.where(b1, a5, a4), tl.where(b1, a7, a6)
        d0, d1 = tl.where(b2, c1, c0), tl.where(b2, c3, c2)
        return tl.where(b3, d1, d0)

    @triton.jit
    def _nf4_matmul(x_ptr, w_ptr, absmax_ptr, code_ptr, out_ptr, M, N, K, span, stride_xm,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, JOIN: tl.constexpr,
                    LUT: tl.constexpr, SCALE_BLOCK: tl.constexpr):
        # Program (column block, span): out[span, :, cols] = x[:, span] @ W[cols, span]ᵀ, BLOCK_K inputs a step.
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rows = tl.arange(0, BLOCK_M)
        j = tl.arange(0, BLOCK_K // 2)  # a step's bytes in each column's row: codes 2j (high nibble) and 2j + 1
        col_ok, row_ok = cols < N, rows < M
        k_lo = tl.program_id(1) * span
        k_hi = tl.minimum(k_lo + span, K)
        w_rows = w_ptr + cols[:, None] * (K // 2) + j[None, :]
        s_bytes = absmax_ptr + cols[:, None] * (K // 64) + (j // 32)[None, :]  # each byte's block absmax
        s_blocks = absmax_ptr + cols[:, None] * (K // 64) + tl.arange(0, BLOCK_K // 64)[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            k_ok = (k0 + 2 * j < k_hi)[None, :]
            byte = tl.load(w_rows + k0 // 2, mask=col_ok[:, None] & k_ok, other=0)
            hi = _nf4_level((byte >> 4).to(tl.int32), code_ptr, LUT)
            lo = _nf4_level((byte & 15).to(tl.int32), code_ptr, LUT)
            # code x absmax in fp32, then rounded to the compute dtype: bitsandbytes' dequantized weight
            if SCALE_BLOCK:
                b_ok = (k0 + 64 * tl.arange(0, BLOCK_K // 64) < k_hi)[None, :]
                scale = tl.load(s_blocks + k0 // 64, mask=col_ok[:, None] & b_ok, other=0.0)[:, :, None]
                hi = tl.reshape(tl.reshape(hi, (BLOCK_N, BLOCK_K // 64, 32)) * scale, (BLOCK_N, BLOCK_K // 2))
                lo = tl.reshape(tl.reshape(lo, (BLOCK_N, BLOCK_K // 64, 32)) * scale, (BLOCK_N, BLOCK_K // 2))
            else:
                scale = tl.load(s_bytes + k0 // 64, mask=col_ok[:, None] & k_ok, other=0.0)
                hi, lo = hi * scale, lo * scale
            hi, lo = hi.to(x_ptr.dtype.element_ty), lo.to(x_ptr.dtype.element_ty)
            if JOIN:  # the weights in input order: one dot over the step's BLOCK_K inputs
                w = tl.reshape(tl.join(hi, lo), (BLOCK_N, BLOCK_K))
                kk = k0 + tl.arange(0, BLOCK_K)
                xt = tl.load(x_ptr + rows[:, None] * stride_xm + kk[None, :], mask=row_ok[:, None] & (kk < k_hi)[None, :], other=0.0)
                acc += tl.dot(xt, tl.trans(w))
            else:  # even and odd inputs apart: two dots
                xs = x_ptr + rows[:, None] * stride_xm + k0 + 2 * j[None, :]
                x_even = tl.load(xs, mask=row_ok[:, None] & k_ok, other=0.0)
                x_odd = tl.load(xs + 1, mask=row_ok[:, None] & k_ok, other=0.0)
                acc += tl.dot(x_even, tl.trans(hi)) + tl.dot(x_odd, tl.trans(lo))
        out = out_ptr + tl.program_id(1) * M * N + rows[:, None] * N + cols[None, :]
        tl.store(out, acc, mask=row_ok[:, None] & col_ok[None, :])
