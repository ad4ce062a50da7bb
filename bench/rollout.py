"""Rollout throughput: HF generate (dynamic cache), HF generate (static cache, compiled) and
posttrain's fast engine on the Llama-3.2-1B shape (random bf16 weights), 160 prompt + 300 new tokens,
top-p 0.9, temperature 0.7, EOS ignored so every row runs to length; plus a run where rows finish at
varied lengths, a GSM8K-test-sized evaluation (1319 × 300), and a greedy exactness check vs HF.

    python bench/rollout.py --out rollout.json [--skip-static]
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import copy_bandwidth, device_name, emit, llama32_1b, save  # noqa: E402
from posttrain.engine import SamplingParams  # noqa: E402
from posttrain.engine.fast import FastEngine  # noqa: E402
from posttrain.engine.hf import HFEngine  # noqa: E402

PROMPT, NEW = 160, 300


class StubTokenizer:
    """Ids are enough for throughput; decoding is not timed."""

    pad_token_id = 0
    eos_token_id = 128001

    def decode(self, ids, skip_special_tokens=True):
        return ""


def prompts(n, seed=0, length=PROMPT, vocab=120000):
    """``n`` random prompts of ``length`` ids in [1000, vocab) (the lower half of a small vocabulary's excluded)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(min(1000, vocab // 2), vocab, (n, length), generator=g).tolist()


def floor_tokens_per_s(model, batch, bw, mean_ctx):
    """Bandwidth floor: every weight once per step (embedding rows aside) plus each row's KV cache."""
    cfg = model.config
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2
    step_bytes = weight_bytes + batch * mean_ctx * kv_per_token
    return batch / (step_bytes / bw)


def run(engine, ps, params):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    out = engine.generate(ps, params)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t
    toks = sum(len(c.token_ids) for c in out)
    return {"seconds": dt, "tokens": toks, "tokens_per_s": toks / dt, "ms_per_step": 1000 * dt / max(len(c.token_ids) for c in out),
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30, "mean_len": toks / len(out)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="rollout.json")
    ap.add_argument("--skip-static", action="store_true")
    ap.add_argument("--batches", default="64,256")
    ap.add_argument("--eager-too", action="store_true", help="also time the engine with CUDA graphs but no torch.compile")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    bw = copy_bandwidth()
    print(f"device {device_name()}  copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    model = llama32_1b()
    tok = StubTokenizer()
    model.generation_config.eos_token_id = tok.eos_token_id
    sample = SamplingParams(max_new_tokens=NEW, temperature=0.7, top_p=0.9, ignore_eos=True, seed=0)
    rows = []
    mean_ctx = PROMPT + NEW / 2
    for b in [int(x) for x in args.batches.split(",")]:
        ps = prompts(b)
        floor = floor_tokens_per_s(model, b, bw, mean_ctx)
        engines = [("hf_dynamic", HFEngine(model, tok, batch_size=b))]
        for name, compiled in ((("fast_eager_graphs", False),) if args.eager_too else ()) + (("fast", True),):
            try:
                fast = FastEngine(model, tok, batch_size=b, compile=compiled)
                fast.generate(ps, SamplingParams(max_new_tokens=NEW, temperature=0.7, top_p=0.9, ignore_eos=True))  # warm-up: compile, capture
                engines.append((name, fast))
            except Exception as e:  # report, keep benchmarking the rest
                rows.append({"engine": name, "batch": b, "error": f"{type(e).__name__}: {str(e)[:300]}"})
                print(rows[-1], flush=True)
        if not args.skip_static:
            engines.insert(1, ("hf_static", HFEngine(model, tok, batch_size=b, cache_implementation="static")))
        for name, eng in engines:
            if name == "hf_static":  # compile
                eng.generate(ps, SamplingParams(max_new_tokens=NEW, temperature=0.7, top_p=0.9, ignore_eos=True))  # compile
            r = run(eng, ps, sample)
            r.update(engine=name, batch=b, floor_tokens_per_s=floor, fraction_of_floor=r["tokens_per_s"] / floor)
            if name.startswith("fast"):
                # The same call cut to its prefill and first token: what is left is the decode steps.
                pre = run(eng, ps, SamplingParams(max_new_tokens=1, temperature=0.7, top_p=0.9, ignore_eos=True, seed=0))
                step_ms = 1000 * (r["seconds"] - pre["seconds"]) / (NEW - 1)
                r.update(prefill_seconds=pre["seconds"], decode_ms_per_step=step_ms,
                         decode_tokens_per_s=b / step_ms * 1000, decode_fraction_of_floor=b / step_ms * 1000 / floor)
            rows.append(r)
            print(r, flush=True)
            if name == "fast" and b % 8 == 0:
                # GRPO-shaped: b / 8 prompts × 8 samples, each prompt prefilled once for its group.
                grpo = SamplingParams(max_new_tokens=NEW, temperature=0.7, top_p=0.9, ignore_eos=True, seed=0, n=8)
                eng.generate(ps[: b // 8], grpo)
                r = run(eng, ps[: b // 8], grpo)
                r.update(engine=name, batch=b, workload=f"grpo_{b // 8}_prompts_x8", floor_tokens_per_s=floor,
                         fraction_of_floor=r["tokens_per_s"] / floor)
                rows.append(r)
                print(r, flush=True)
            save(args.out, rows)
            gc.collect()
            torch.cuda.empty_cache()
    # Rows finishing at varied lengths: ~1/150 of the vocabulary counts as EOS, so lengths are
    # geometric with mean ~150 (capped at 300), as answers vary in length.
    eos_ids = list(range(1000, 120000, 150))
    model.generation_config.eos_token_id = eos_ids
    for b in [256]:
        ps = prompts(b, seed=1)
        varied = SamplingParams(max_new_tokens=NEW, temperature=0.7, top_p=0.9, seed=0)
        fast = FastEngine(model, tok, batch_size=b)
        fast.generate(ps[:b], varied)
        for name, eng in [("hf_dynamic", HFEngine(model, tok, batch_size=b)), ("fast", fast)]:
            r = run(eng, ps, varied)
            r.update(engine=name, batch=b, workload="varied_lengths")
            rows.append(r)
            print(r, flush=True)
            save(args.out, rows)
    model.generation_config.eos_token_id = tok.eos_token_id
    # GSM8K-test-sized evaluation: 1319 prompts × 300 greedy tokens.
    ps = prompts(1319, seed=2)
    for b in (512,):
        fast = FastEngine(model, tok, batch_size=b)
        fast.generate(ps[:b], SamplingParams(max_new_tokens=NEW, ignore_eos=True))
        r = run(fast, ps, SamplingParams(max_new_tokens=NEW, ignore_eos=True))
        r.update(engine="fast", batch=b, workload="gsm8k_test_eval_1319x300")
        rows.append(r)
        print(r, flush=True)
        save(args.out, rows)
    # Greedy exactness vs HF generate in fp32 (TF32 off), 8 prompts × 64 tokens.
    del fast
    gc.collect()
    torch.cuda.empty_cache()
    m32 = model.float()
    ps = prompts(8, seed=3)
    g = SamplingParams(max_new_tokens=64, ignore_eos=True)
    a = HFEngine(m32, tok, 8).generate(ps, g)
    bb = FastEngine(m32, tok, 8).generate(ps, g)
    same_seq = sum(x.token_ids == y.token_ids for x, y in zip(a, bb))
    same_tok = sum(u == v for x, y in zip(a, bb) for u, v in zip(x.token_ids, y.token_ids))
    rows.append({"check": "greedy_fp32_vs_hf", "identical_sequences": same_seq, "of": len(a),
                 "identical_tokens": same_tok, "tokens": sum(len(x.token_ids) for x in a)})
    rows.append({"device": device_name(), "copy_bandwidth_TBps": bw / 1e12, "torch": torch.__version__})
    emit(args.out, rows)


if __name__ == "__main__":
    main()
