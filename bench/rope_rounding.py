"""Which rounding order a rotary kernel follows on the GPU: q from ``kernels.rope_cache_write`` (only its rotated
values) against the PyTorch reference and against emulations of each order — three roundings (PyTorch's),
one, and the product x·cos or rotate_half(x)·sin fused into the add — then variants of the kernel's arithmetic:
the cast round trip ``(x·cos).to(bf16).to(fp32)`` (what the engine's kernel did before 2026-12-03), the same
with an explicit round-to-nearest-even, and ``kernels._round_bf16`` (integer bit operations, what it does now)
(issue 25; BENCHMARKS.md, "the decode step kernel by kernel").

    python bench/rope_rounding.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name  # noqa: E402
from posttrain.engine import kernels  # noqa: E402
from posttrain.engine.kernels import _round_bf16  # noqa: E402

ROUND_TRIP, RTNE_CAST, BITS = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)


@triton.jit
def _rotate_q(QKV, Cos, Sin, Q, s_qkv, s_c, s_qn, s_qh, H: tl.constexpr, D: tl.constexpr, SLOTS: tl.constexpr,
              MODE: tl.constexpr):
    """The rotary kernel's q arithmetic alone, one program per row, rounding the MODE way."""
    r = tl.program_id(0)
    j = tl.arange(0, SLOTS)[:, None]
    cols = tl.arange(0, D)[None, :]
    live = j < H
    base = QKV + r * s_qkv + j * D
    x = tl.load(base + cols, mask=live, other=0.0)
    xr = tl.load(base + (cols + D // 2) % D, mask=live, other=0.0).to(tl.float32)
    xr = tl.where(cols < D // 2, -xr, xr)
    c = tl.load(Cos + r * s_c + cols).to(tl.float32)
    sn = tl.load(Sin + r * s_c + cols).to(tl.float32)
    if MODE == BITS:
        y = _round_bf16(_round_bf16(x.to(tl.float32) * c) + _round_bf16(xr * sn))
    elif MODE == RTNE_CAST:
        y = ((x.to(tl.float32) * c).to(tl.bfloat16, fp_downcast_rounding="rtne").to(tl.float32)
             + (xr * sn).to(tl.bfloat16, fp_downcast_rounding="rtne").to(tl.float32))
    else:
        y = (x.to(tl.float32) * c).to(tl.bfloat16).to(tl.float32) + (xr * sn).to(tl.bfloat16).to(tl.float32)
    tl.store(Q + r * s_qn + j * s_qh + cols, y.to(tl.bfloat16), mask=live)


def main():
    torch.manual_seed(0)
    n, heads, kv_heads, d = 256, 14, 2, 64  # Qwen2.5-0.5B's heads
    bf = dict(dtype=torch.bfloat16, device="cuda")
    qkv = torch.randn(n, (heads + 2 * kv_heads) * d, **bf)
    cos, sin = torch.randn(n, d, **bf), torch.randn(n, d, **bf)
    rows, pos = torch.randperm(n, device="cuda"), torch.randint(0, 64, (n,), device="cuda")
    caches = [torch.zeros(n, kv_heads, 64, d, **bf) for _ in range(4)]
    q = kernels.rope_cache_write(qkv, cos, sin, caches[0], caches[1], rows, pos, heads, kv_heads)
    q_ref = kernels.rope_cache_write_ref(qkv, cos, sin, caches[2], caches[3], rows, pos, heads, kv_heads)
    x = qkv.view(n, heads + 2 * kv_heads, d)[:, :heads].float()
    c, s, r = cos[:, None].float(), sin[:, None].float(), kernels.rotate_half(qkv.view(n, -1, d)[:, :heads]).float()
    emulations = {"three roundings": ((x * c).bfloat16().float() + (r * s).bfloat16().float()).bfloat16(),
                  "one rounding": (x * c + r * s).bfloat16(),
                  "x*cos fused into the add": torch.addcmul((r * s).bfloat16().float(), x, c).bfloat16(),
                  "xr*sin fused into the add": torch.addcmul((x * c).bfloat16().float(), r, s).bfloat16()}
    print(device_name(), f"q of {n} rows x {heads} heads x {d}: share of values equal to")
    print(f"  engine kernel vs reference: {(q == q_ref).float().mean().item():.4f}")
    for name, t in emulations.items():
        print(f"  {name}: engine kernel {(q == t).float().mean().item():.4f}, reference {(q_ref == t).float().mean().item():.4f}")
    for name, mode in (("cast round trip", ROUND_TRIP), ("cast round trip, explicit rtne", RTNE_CAST), ("bits", BITS)):
        out = torch.empty(n, heads, d, **bf)
        _rotate_q[(n,)](qkv, cos, sin, out, qkv.stride(0), cos.stride(0), out.stride(0), out.stride(1), H=heads, D=d,
                        SLOTS=triton.next_power_of_2(heads), MODE=mode, num_warps=4)
        print(f"  variant '{name}' vs reference: {(out == q_ref).float().mean().item():.4f}")


if __name__ == "__main__":
    main()
