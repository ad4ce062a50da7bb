"""The fast engine's Triton kernels against their PyTorch references: agreement (bf16 and fp32) and time
per call, next to the SDPA / top-k paths they replace — decode attention on the Llama-3.2-1B decode shape,
the sampler at Llama's and Qwen2.5's vocabularies, the fused elementwise kernels on Qwen2.5-0.5B's and the
1B shape's sizes, the RL update's log-prob kernels.

    python bench/kernel_checks.py --out kernels.json [--only bookkeeping|logprobs|elementwise|sample]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import copy_bandwidth, device_name, emit  # noqa: E402
from posttrain.engine import kernels  # noqa: E402
from posttrain.losses import logprob_kernels as lk  # noqa: E402


def bench(fn, reps=50):
    """GPU time per call in ms, replayed from a CUDA graph as the engine runs it (a plain timing of
    a few-microsecond kernel measures Python's launch overhead instead)."""
    from triton.testing import do_bench_cudagraph

    fn()  # compile before capture
    torch.cuda.synchronize()
    return do_bench_cudagraph(fn, rep=reps)


def topk_sample(logits, temperature=0.7, top_p=0.9, k=256):
    """The sampler the kernel replaced: top-k candidates, nucleus inside them, Gumbel-max."""
    lse = torch.logsumexp(logits.float() / temperature, -1)
    vals, idx = torch.topk(logits, k, dim=-1)
    vals = vals.float() / temperature
    probs = torch.exp(vals - lse[:, None])
    keep = (torch.cumsum(probs, -1) - probs) < top_p
    gumbel = -torch.log(-torch.log(torch.rand_like(vals).clamp_(1e-20, 1.0)))
    choice = torch.where(keep, vals + gumbel, torch.full_like(vals, float("-inf"))).argmax(-1)
    return idx.gather(-1, choice[:, None])[:, 0]


def bookkeeping() -> list[dict]:
    """``greedy`` and ``advance_rows`` against their references: tokens and states exactly, log-probs
    to fp32 rounding; time per call beside the reference's (replayed from a graph)."""
    out = []
    for n, vocab in ((64, 151936), (256, 151936), (1319, 151936), (256, 128256)):
        logits = (torch.randn(n, vocab, device="cuda") * 3).to(torch.bfloat16)
        logits[0, 7] = logits[0, 9] = logits[0].max() + 1  # a tie: the first index wins, as in torch.argmax
        logits[1, vocab - 1] = logits[1].max() + 1  # the max in the last, partial chunk
        a, la = kernels.greedy(logits)
        b, lb = kernels.greedy_ref(logits)
        out.append({"op": "greedy", "rows": n, "vocab": vocab, "same_tokens": int((a == b).sum()), "of": n,
                    "logp_max_err": (la - lb).abs().max().item(), "ms_kernel": bench(lambda: kernels.greedy(logits)),
                    "ms_ref": bench(lambda: kernels.greedy_ref(logits))})
        print(out[-1], flush=True)
    for n, eos in ((256, [151645, 151643]), (1319, [2]), (64, [])):
        g = torch.Generator(device="cuda").manual_seed(n)
        eos_t = torch.tensor(eos, dtype=torch.long, device="cuda")
        nxt = torch.randint(0, 4, (n,), device="cuda", generator=g)
        if eos:
            nxt = torch.where(nxt == 0, eos_t[0], nxt)
        lp = torch.randn(n, device="cuda", generator=g)
        done0 = torch.rand(n, device="cuda", generator=g) < 0.3
        pos0 = torch.randint(0, 600, (n,), device="cuda", generator=g)
        states = []
        for fn in (kernels.advance_rows, kernels.advance_rows_ref):
            done, pos, tokens = done0.clone(), pos0.clone(), torch.zeros(n, dtype=torch.long, device="cuda")
            nout, lout = torch.zeros_like(tokens), torch.zeros(n, device="cuda")
            fn(nxt, lp, done, tokens, pos, nout, lout, eos_t, 151643, 575)
            states.append((done, pos, tokens, nout, lout))
        same = all(torch.equal(x, y) for x, y in zip(*states))
        bufs = (done0.clone(), torch.zeros(n, dtype=torch.long, device="cuda"), pos0.clone(),
                torch.zeros(n, dtype=torch.long, device="cuda"), torch.zeros(n, device="cuda"))
        out.append({"op": "advance_rows", "rows": n, "eos_ids": len(eos), "same_state": same,
                    "ms_kernel": bench(lambda: kernels.advance_rows(nxt, lp, bufs[0], bufs[1], bufs[2], bufs[3], bufs[4], eos_t, 151643, 575)),
                    "ms_ref": bench(lambda: kernels.advance_rows_ref(nxt, lp, bufs[0], bufs[1], bufs[2], bufs[3], bufs[4], eos_t, 151643, 575))})
        print(out[-1], flush=True)
    return out


def logprobs() -> list[dict]:
    """The RL update's ``token_stats`` and ``token_logits_grad`` against their references on chunks
    of bf16 logits the update projects (C positions of a 152k / 128k vocabulary): log-sum-exp, log-prob
    and entropy to fp32 rounding, the bf16 gradient to one bf16 rounding step; time per call."""
    out = []
    for c, vocab in ((220, 151936), (880, 151936), (261, 128256), (7, 151936)):
        x = (torch.randn(c, vocab, device="cuda") * 3).to(torch.bfloat16)
        tok = torch.randint(0, vocab, (c,), device="cuda")
        tok[0] = vocab - 1  # a token in the last, partial block
        g = torch.randn(c, device="cuda")
        ours, ref = lk.token_stats(x, tok), lk.token_stats_ref(x, tok)
        grad_ref = lk.token_logits_grad_ref(x, ref[0], tok, g)
        grad = lk.token_logits_grad(x.clone(), ours[0], tok, g)
        scratch = x.clone()
        out.append({"op": "token_logprobs", "rows": c, "vocab": vocab,
                    **{f"{k}_max_err": (a - b).abs().max().item() for k, a, b in zip(("lse", "logp", "entropy"), ours, ref)},
                    "grad_max_err": (grad.float() - grad_ref.float()).abs().max().item(),
                    "grad_max_abs": grad_ref.float().abs().max().item(),
                    "ms_stats": bench(lambda: lk.token_stats(x, tok)), "ms_stats_ref": bench(lambda: lk.token_stats_ref(x, tok)),
                    "ms_grad": bench(lambda: lk.token_logits_grad(scratch, ours[0], tok, g)),  # in place over a copy: x stays logits
                    "ms_grad_ref": bench(lambda: lk.token_logits_grad_ref(x, ref[0], tok, g))})
        print(out[-1], flush=True)
    return out


def elementwise() -> list[dict]:
    """The decode step's fused elementwise kernels (``add_rms_norm``, ``rope_cache_write``, ``silu_mul``)
    against their references on Qwen2.5-0.5B's and the 1B shape's sizes: max |kernel - reference| and the
    share of equal elements (they round where the modules round; the norm's sum of squares is ordered
    differently), and time per call replayed from a graph."""
    out = []

    def cmp(a, b) -> dict:
        a, b = a.flatten(), b.flatten()
        return {"max_abs_diff": (a.float() - b.float()).abs().max().item(), "unequal": int((a != b).sum()), "of": a.numel()}

    for name, heads, kv_heads, d, dim, inter in (("qwen2.5-0.5b", 14, 2, 64, 896, 4864), ("llama32-1b", 32, 8, 64, 2048, 8192)):
        for n in (64, 256, 1319):
            bf = dict(device="cuda", dtype=torch.bfloat16)
            qkv = torch.randn(n, (heads + 2 * kv_heads) * d, **bf)
            cos, sin = torch.randn(n, d, **bf), torch.randn(n, d, **bf)
            caches = [torch.zeros(n, kv_heads, 512, d, **bf) for _ in range(4)]
            rows_, pos = torch.randperm(n, device="cuda"), torch.randint(0, 512, (n,), device="cuda")
            q = kernels.rope_cache_write(qkv, cos, sin, caches[0], caches[1], rows_, pos, heads, kv_heads)
            q_ref = kernels.rope_cache_write_ref(qkv, cos, sin, caches[2], caches[3], rows_, pos, heads, kv_heads)
            # the prefill's form: q and k out, each token's K/V to two cache rows (a prompt's samples)
            pcaches = [torch.zeros(2 * n, kv_heads, 512, d, **bf) for _ in range(4)]
            prow = torch.randperm(2 * n, device="cuda").view(n, 2)
            qk = kernels.rope_cache_write(qkv, cos, sin, pcaches[0], pcaches[1], prow, pos, heads, kv_heads, with_k=True)
            qk_ref = kernels.rope_cache_write_ref(qkv, cos, sin, pcaches[2], pcaches[3], prow, pos, heads, kv_heads, with_k=True)
            h, delta, w = torch.randn(n, dim, **bf), torch.randn(n, dim, **bf), torch.randn(dim, **bf)
            gu = torch.randn(n, 2 * inter, **bf)
            out.append({"op": "elementwise", "shape": name, "rows": n,
                        "rope_cache_write": cmp(torch.cat([q.flatten(), caches[0].flatten(), caches[1].flatten()]),
                                                torch.cat([q_ref.flatten(), caches[2].flatten(), caches[3].flatten()])),
                        "rope_cache_write_prompts": cmp(torch.cat([qk.flatten(), pcaches[0].flatten(), pcaches[1].flatten()]),
                                                        torch.cat([qk_ref.flatten(), pcaches[2].flatten(), pcaches[3].flatten()])),
                        "add_rms_norm": cmp(torch.cat(kernels.add_rms_norm(h, delta, w, 1e-6)),
                                            torch.cat(kernels.add_rms_norm_ref(h, delta, w, 1e-6))),
                        "silu_mul": cmp(kernels.silu_mul(gu), kernels.silu_mul_ref(gu)),
                        "ms_rope_cache_write": bench(lambda: kernels.rope_cache_write(qkv, cos, sin, caches[0], caches[1], rows_, pos,
                                                                                      heads, kv_heads)),
                        "ms_add_rms_norm": bench(lambda: kernels.add_rms_norm(h, delta, w, 1e-6)),
                        "ms_silu_mul": bench(lambda: kernels.silu_mul(gu))})
            print(out[-1], flush=True)
    return out


def sampler() -> list[dict]:
    """``sample`` against ``sample_ref`` with the same uniforms at Qwen2.5's 152k vocabulary: same tokens and
    log-prob error, at flat, peaked and near-uniform logits, top-p 0.9 / 0.3 / 1.0, and with every row's first
    round rejected (the per-row restart path)."""
    out = []
    for n, vocab, scale in ((256, 151936, 1.0), (256, 151936, 4.0), (64, 151936, 0.02)):
        logits = (torch.randn(n, vocab, device="cuda") * scale).to(torch.bfloat16)
        row = {"op": "sample", "rows": n, "vocab": vocab, "logit_scale": scale, "candidates": kernels.NUM_CANDIDATES}
        for tp in (0.9, 0.3, 1.0, "restart"):
            top_p = 0.3 if tp == "restart" else tp
            u = torch.rand(n, kernels.uniforms_per_row(top_p), device="cuda")
            if tp == "restart":
                u[:, :kernels.NUM_CANDIDATES] = 0.99999  # deep in the tail: every first-round candidate rejected
            a, la = kernels.sample(logits, 0.7, top_p, u)
            b, lb = kernels.sample_ref(logits, 0.7, top_p, u)
            row[f"top_p_{tp}"] = {"same_tokens": int((a == b).sum()), "of": n, "logp_max_err": (la - lb).abs().max().item()}
        row["ms_top_p_0.9"] = bench(lambda: kernels.sample(logits, 0.7, 0.9))
        out.append(row)
        print(row, flush=True)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="kernels.json")
    ap.add_argument("--only", choices=("bookkeeping", "logprobs", "elementwise", "sample"), help="only the greedy and advance_rows "
                    "checks, the RL update's log-prob kernels, the decode step's fused elementwise kernels, or the sampler")
    args = ap.parse_args()
    torch.manual_seed(0)
    bw = copy_bandwidth()
    rows = [{"device": device_name(), "copy_bandwidth_TBps": bw / 1e12, "torch": torch.__version__}]
    only = {"logprobs": logprobs, "elementwise": elementwise, "sample": sampler}
    if args.only in only:
        emit(args.out, rows + only[args.only]())
        return
    rows += bookkeeping()
    if args.only:
        emit(args.out, rows)
        return
    rows += logprobs()
    hkv, g, d, cap = 8, 4, 64, 512
    for n, ctx in ((256, 310), (256, 460), (64, 310), (8, 460)):
        kc = torch.randn(n, hkv, cap, d, device="cuda", dtype=torch.bfloat16)
        vc = torch.randn_like(kc)
        q = torch.randn(n, hkv * g, d, device="cuda", dtype=torch.bfloat16)
        lens = torch.full((n,), ctx, device="cuda", dtype=torch.long)
        span = (ctx + 63) // 64 * 64
        ours = kernels.decode_attention(q, kc, vc, lens, 0.125, span)
        ref = kernels.decode_attention_ref(q.float(), kc.float(), vc.float(), lens, 0.125)
        err = (ours.float() - ref).abs().max().item()
        mask = (torch.arange(span, device="cuda")[None] < lens[:, None])[:, None, None]
        t_ours = bench(lambda: kernels.decode_attention(q, kc, vc, lens, 0.125, span))
        t_sdpa = bench(lambda: F.scaled_dot_product_attention(q[:, :, None], kc[:, :, :span], vc[:, :, :span], attn_mask=mask,
                                                             scale=0.125, enable_gqa=True))
        kv_bytes = 2 * n * hkv * ctx * d * 2
        rows.append({"op": "decode_attention", "rows": n, "context": ctx, "max_abs_err_vs_fp32": err,
                     "ms_triton": t_ours, "ms_sdpa": t_sdpa, "GBps_triton": kv_bytes / t_ours / 1e6,
                     "fraction_of_copy_bw": kv_bytes / t_ours / 1e-3 / bw})
        print(rows[-1], flush=True)
    # fp32 caches (the exactness check runs the model in fp32): IEEE dot products
    q32, k32, v32 = q.float(), kc.float(), vc.float()
    err32 = (kernels.decode_attention(q32, k32, v32, lens, 0.125) - kernels.decode_attention_ref(q32, k32, v32, lens, 0.125)).abs().max().item()
    rows.append({"op": "decode_attention_fp32", "max_abs_err": err32})
    print(rows[-1], flush=True)
    for n, vocab, scale in ((256, 128256, 1.0), (256, 128256, 0.02), (64, 128256, 4.0)):
        logits = (torch.randn(n, vocab, device="cuda") * scale).to(torch.bfloat16)
        agree = {}
        for tp in (0.9, 1.0, 0.3):
            u = torch.rand(n, kernels.uniforms_per_row(tp), device="cuda")
            a, la = kernels.sample(logits, 0.7, tp, u)
            b, lb = kernels.sample_ref(logits, 0.7, tp, u)
            agree[str(tp)] = {"same_tokens": int((a == b).sum()), "of": n, "logp_max_err": (la - lb).abs().max().item()}
        # every row's first round rejected (candidates deep in the tail): the per-row restart path
        u = torch.rand(n, kernels.uniforms_per_row(0.3), device="cuda")
        u[:, :kernels.NUM_CANDIDATES] = 0.99999
        a, la = kernels.sample(logits, 0.7, 0.3, u)
        b, lb = kernels.sample_ref(logits, 0.7, 0.3, u)
        agree["0.3_restart"] = {"same_tokens": int((a == b).sum()), "of": n, "logp_max_err": (la - lb).abs().max().item()}
        t_k = bench(lambda: kernels.sample(logits, 0.7, 0.9))
        t_k1 = bench(lambda: kernels.sample(logits, 0.7, 1.0))
        t_top = bench(lambda: topk_sample(logits))
        rows.append({"op": "sample", "rows": n, "vocab": vocab, "logit_scale": scale, "agreement_vs_ref": agree,
                     "ms_kernel_top_p_0.9": t_k, "ms_kernel_no_top_p": t_k1, "ms_topk256_path": t_top})
        print(rows[-1], flush=True)
    # Launch-setting sweeps at batch 256 (the engine's defaults live in kernels.ATTN / kernels.SAMPLE).
    n, ctx = 256, 310
    kc = torch.randn(n, hkv, cap, d, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    q = torch.randn(n, hkv * g, d, device="cuda", dtype=torch.bfloat16)
    lens = torch.full((n,), ctx, device="cuda", dtype=torch.long)
    kv_bytes = 2 * n * hkv * ctx * d * 2
    default_attn, default_sample = dict(kernels.ATTN), dict(kernels.SAMPLE)
    sweep = []
    for block_n in (32, 64, 128):
        for warps in (2, 4, 8):
            for stages in (1, 2, 3):
                for min_splits in (1, 2):
                    kernels.ATTN.update(block_n=block_n, num_warps=warps, num_stages=stages, min_splits=min_splits)
                    try:
                        t = bench(lambda: kernels.decode_attention(q, kc, vc, lens, 0.125, 320))
                    except Exception:  # some settings do not compile (shared memory)
                        t = float("nan")
                    sweep.append({"block_n": block_n, "num_warps": warps, "num_stages": stages, "min_splits": min_splits,
                                  "ms": t, "GBps": kv_bytes / t / 1e6})
    kernels.ATTN.update(default_attn)
    best = min((r for r in sweep if r["ms"] == r["ms"]), key=lambda r: r["ms"])
    rows.append({"op": "decode_attention_sweep", "best": best, "all": sweep})
    print("attention best", best, flush=True)
    logits = torch.randn(256, 128256, device="cuda").to(torch.bfloat16)
    sweep = []
    for chunk in (1024, 2048, 4096, 8192):
        for warps in (2, 4, 8, 16):
            kernels.SAMPLE.update(chunk=chunk, chunk_warps=warps)
            try:
                t = bench(lambda: kernels.sample(logits, 0.7, 0.9))
            except Exception:
                t = float("nan")
            sweep.append({"chunk": chunk, "chunk_warps": warps, "ms": t})
    kernels.SAMPLE.update(default_sample)
    best = min((r for r in sweep if r["ms"] == r["ms"]), key=lambda r: r["ms"])
    rows.append({"op": "sample_sweep", "best": best, "all": sweep})
    print("sample best", best, flush=True)
    emit(args.out, rows)


if __name__ == "__main__":
    main()
