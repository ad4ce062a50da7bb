"""The decode-attention kernel's launch settings swept per model shape and row count: block size,
warps, pipeline stages and the number of KV splits (forced, where the engine derives it from the
GPU's size), each timed replayed from a CUDA graph as the engine runs it, against the KV bytes it must
read. Issue 25 uses it to choose ``kernels.ATTN`` and the split rule for Qwen2.5-0.5B's 2 KV heads.

    python bench/attn_sweep.py --json OUT.json [--shapes qwen2.5-coder-0.5b llama32-1b …] [--rows 64 256 1319]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHAPES, copy_bandwidth, device_name  # noqa: E402
from kernel_checks import bench  # noqa: E402
from posttrain.engine import kernels  # noqa: E402

SETTINGS = {"block_n": (32, 64, 128), "num_warps": (1, 2, 4), "num_stages": (1, 2, 3), "splits": (1, 2, 4, 8)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", required=True)
    ap.add_argument("--shapes", nargs="+", default=["qwen2.5-coder-0.5b"])
    ap.add_argument("--rows", nargs="+", type=int, default=[64, 256, 1319])
    ap.add_argument("--context", type=int, default=288, help="tokens each row attends to (a GSM8K prompt and half its completion)")
    args = ap.parse_args()
    torch.manual_seed(0)
    bw = copy_bandwidth()
    out = {"device": device_name(), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "copy_bandwidth_TBps": bw / 1e12,
           "default": dict(kernels.ATTN), "context": args.context, "cases": []}
    derive = kernels._splits
    for name in args.shapes:
        spec = SHAPES[name]
        hkv, h = spec["num_key_value_heads"], spec["num_attention_heads"]
        d = spec.get("head_dim") or spec["hidden_size"] // h
        for n in args.rows:
            ctx, cap = args.context, (args.context + 127) // 64 * 64
            span = (ctx + 63) // 64 * 64
            kc = torch.randn(n, hkv, cap, d, device="cuda", dtype=torch.bfloat16)
            vc = torch.randn_like(kc)
            q = torch.randn(n, h, d, device="cuda", dtype=torch.bfloat16)
            lens = torch.full((n,), ctx, device="cuda", dtype=torch.long)
            kv_bytes = 2 * n * hkv * ctx * d * 2
            ref = kernels.decode_attention_ref(q.float(), kc.float(), vc.float(), lens, d ** -0.5, span)
            default = bench(lambda: kernels.decode_attention(q, kc, vc, lens, d ** -0.5, span))
            rows = []
            for block_n, warps, stages, splits in itertools.product(*SETTINGS.values()):
                if splits > 1 and span // splits < block_n:
                    continue
                kernels.ATTN.update(block_n=block_n, num_warps=warps, num_stages=stages)
                kernels._splits = lambda *a, s=splits: s
                try:
                    err = (kernels.decode_attention(q, kc, vc, lens, d ** -0.5, span).float() - ref).abs().max().item()
                    t = bench(lambda: kernels.decode_attention(q, kc, vc, lens, d ** -0.5, span))
                except Exception as e:  # some settings do not fit the shared memory
                    err, t = None, float("nan")
                    print(f"  {block_n} {warps} {stages} {splits}: {type(e).__name__}", flush=True)
                rows.append({"block_n": block_n, "num_warps": warps, "num_stages": stages, "splits": splits, "ms": t,
                             "max_abs_err": err, "fraction_of_copy_bw": kv_bytes / (t * 1e-3) / bw if t == t else None})
                kernels.ATTN.update(out["default"])
                kernels._splits = derive
            best = min((r for r in rows if r["ms"] == r["ms"]), key=lambda r: r["ms"])
            case = {"shape": name, "rows": n, "kv_heads": hkv, "heads": h, "head_dim": d, "kv_bytes": kv_bytes,
                    "default_ms": default, "default_splits": derive(n, hkv, span, out["default"]["block_n"]),
                    "default_fraction_of_copy_bw": kv_bytes / (default * 1e-3) / bw, "best": best, "all": rows}
            out["cases"].append(case)
            print(f"{name} {n} rows: default {default * 1e3:.1f} us ({case['default_fraction_of_copy_bw']:.0%} of copy bw, "
                  f"{case['default_splits']} splits), best {best['ms'] * 1e3:.1f} us {best}", flush=True)
    Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
