"""Which rounding order the fused rotary kernel follows on the GPU: q from ``kernels.rope_cache_write`` (only
its rotated values) against the PyTorch reference and against emulations of each order — three roundings
(PyTorch's), one, and the product x·cos or rotate_half(x)·sin fused into the add — then two variant kernels:
every rounding through integer bit operations (what the engine's kernel does since 2026-12-03), and casts with
an explicit round-to-nearest-even (issue 25; BENCHMARKS.md, "the decode step kernel by kernel").

    python bench/rope_rounding.py
"""
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from posttrain.engine import kernels  # noqa: E402

torch.manual_seed(0)
n, heads, kv_heads, d = 256, 14, 2, 64
bf = dict(dtype=torch.bfloat16, device="cuda")
qkv = torch.randn(n, (heads + 2 * kv_heads) * d, **bf)
cos, sin = torch.randn(n, d, **bf), torch.randn(n, d, **bf)
rows_, pos = torch.randperm(n, device="cuda"), torch.randint(0, 64, (n,), device="cuda")
caches = [torch.zeros(n, kv_heads, 64, d, **bf) for _ in range(4)]
q = kernels.rope_cache_write(qkv, cos, sin, caches[0], caches[1], rows_, pos, heads, kv_heads)
q_ref = kernels.rope_cache_write_ref(qkv, cos, sin, caches[2], caches[3], rows_, pos, heads, kv_heads)
qv = qkv.view(n, heads + 2 * kv_heads, d)[:, :heads]
c, s = cos[:, None].float(), sin[:, None].float()
r = kernels.rotate_half(qv).float()
three = ((qv.float() * c).bfloat16().float() + (r * s).bfloat16().float()).bfloat16()
one = (qv.float() * c + r * s).bfloat16()
fma1 = torch.addcmul((r * s).bfloat16().float(), qv.float(), c).bfloat16()  # x*c fused into the add
fma2 = torch.addcmul((qv.float() * c).bfloat16().float(), r, s).bfloat16()
for name, t in (("ref", q_ref), ("three roundings", three), ("one rounding", one), ("fma x*c", fma1), ("fma xr*s", fma2)):
    print(f"kernel == {name}: {(q == t).float().mean().item():.4f}; ref == {name}: {(q_ref == t).float().mean().item():.4f}")

# Variants: MODE 0 rounds t1, t2 and their sum through integer bit operations (ties to even), which no
# compiler pass can fold away; MODE 1 casts with an explicit round-to-nearest-even.

@triton.jit
def _rne_bf16(x):
    u = x.to(tl.uint32, bitcast=True)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.to(tl.float32, bitcast=True)


@triton.jit
def _rope_variant(QKV, Cos, Sin, Q, s_qkv, s_c, s_qn, s_qh, H: tl.constexpr, D: tl.constexpr, SLOTS: tl.constexpr, MODE: tl.constexpr):
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
    if MODE == 0:
        t1 = _rne_bf16(x.to(tl.float32) * c)
        t2 = _rne_bf16(xr * sn)
    else:
        t1 = (x.to(tl.float32) * c).to(tl.bfloat16, fp_downcast_rounding="rtne").to(tl.float32)
        t2 = (xr * sn).to(tl.bfloat16, fp_downcast_rounding="rtne").to(tl.float32)
    y = _rne_bf16(t1 + t2) if MODE == 0 else t1 + t2
    tl.store(Q + r * s_qn + j * s_qh + cols, y.to(tl.bfloat16), mask=live)


for mode in (0, 1):
    qq = torch.empty(n, heads, d, **bf)
    _rope_variant[(n,)](qkv, cos, sin, qq, qkv.stride(0), cos.stride(0), qq.stride(0), qq.stride(1), H=heads, D=d,
                        SLOTS=triton.next_power_of_2(heads), MODE=mode, num_warps=4)
    print(f"variant {'bit-rounded' if mode == 0 else 'rtne cast'} == ref: {(qq == q_ref).float().mean().item():.4f}")
