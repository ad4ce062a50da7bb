"""What the fast engine pays before its first replayed decode step at each row count: the eager
warm-up (Triton compiles on a fresh machine, host launch work otherwise) and the CUDA-graph capture,
with a cProfile of both; and the decode-attention kernel against its reference at the row counts and
split counts it runs at. Random bf16 weights in a published shape.

    python bench/capture_cost.py --json OUT [--shape qwen2.5-coder-0.5b] [--rows 1024,256,64,8,1,48,24]

Run it twice on one machine: the first run is a fresh machine's (empty Triton cache, unless
TRITON_CACHE_DIR says otherwise), the second finds what the first compiled.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHAPES, device_name, shape_model  # noqa: E402
from posttrain.engine import SamplingParams, kernels  # noqa: E402
from posttrain.engine.fast import FastEngine  # noqa: E402
from rollout import StubTokenizer, prompts  # noqa: E402


def attention_agreement() -> list[dict]:
    out = []
    for n, hkv, g, ctx, cap in ((1, 2, 7, 300, 576), (8, 2, 7, 300, 576), (64, 2, 7, 520, 576), (256, 2, 7, 288, 448), (256, 8, 4, 460, 512)):
        kc = torch.randn(n, hkv, cap, 64, device="cuda", dtype=torch.bfloat16)
        vc = torch.randn_like(kc)
        q = torch.randn(n, hkv * g, 64, device="cuda", dtype=torch.bfloat16)
        lens = torch.randint(1, ctx + 1, (n,), device="cuda")
        ref = kernels.decode_attention_ref(q.float(), kc.float(), vc.float(), lens, 0.125)
        err = (kernels.decode_attention(q, kc, vc, lens, 0.125, cap).float() - ref).abs().max().item()
        out.append({"rows": n, "kv_heads": hkv, "group": g, "max_context": ctx, "cache": cap,
                    "splits": kernels._splits(n, hkv, cap, kernels.ATTN["block_n"]), "max_abs_err_vs_fp32": err})
        print(out[-1], flush=True)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    ap.add_argument("--shape", default="qwen2.5-coder-0.5b", choices=sorted(SHAPES))
    ap.add_argument("--rows", default="1024,256,64,8,1,48,24")
    args = ap.parse_args()
    rows = [int(x) for x in args.rows.split(",")]
    t0 = time.perf_counter()
    model = shape_model(SHAPES[args.shape])
    eng = FastEngine(model, StubTokenizer(), batch_size=max(rows))
    sch = eng.scheduler
    parts = []
    decode = sch.decode

    def timed_decode(spec, n, span):
        capturing = torch.cuda.is_current_stream_capturing()
        if not capturing:
            torch.cuda.synchronize()
        t = time.perf_counter()
        decode(spec, n, span)
        if not capturing:
            torch.cuda.synchronize()
        parts.append({"rows": n, "part": "capture" if capturing else "warm_up", "ms": 1000 * (time.perf_counter() - t)})

    sch.decode = timed_decode
    capture, prof = sch._capture, cProfile.Profile()

    def profiled(spec, n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        prof.enable()
        graph = capture(spec, n)
        prof.disable()
        torch.cuda.synchronize()
        parts.append({"rows": n, "part": "total", "ms": 1000 * (time.perf_counter() - t)})
        return graph

    sch._capture = profiled
    params = SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True)
    ps = prompts(max(rows))
    calls = []
    for n in rows:
        t = time.perf_counter()
        eng.generate(ps[:n], params)
        torch.cuda.synchronize()
        calls.append({"rows": n, "generate_s": time.perf_counter() - t})
        print(calls[-1], flush=True)
    for p in parts:
        print(p)
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(20)
    print(text.getvalue()[:5000])
    result = {"device": device_name(), "torch": torch.__version__, "shape": args.shape, "since_start_s": time.perf_counter() - t0,
              "generate_calls": calls, "captures": parts, "capture_host_s": sch.capture_s, "attention": attention_agreement(),
              "profile_top": text.getvalue()[:5000]}
    Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
