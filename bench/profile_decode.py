"""Where does a fast-engine decode step spend its time? Kernel table for one eager step at batch 256,
plus micro-benchmarks of the attention and sampling pieces (Llama-3.2-1B shape, random bf16).

    python bench/profile_decode.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import llama32_1b  # noqa: E402
from posttrain.engine import SamplingParams  # noqa: E402
from posttrain.engine.fast import FastEngine  # noqa: E402
from rollout import StubTokenizer, prompts  # noqa: E402


def timeit(fn, reps=50):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - t) / reps


def main():
    model = llama32_1b()
    eng = FastEngine(model, StubTokenizer(), batch_size=256, use_cuda_graphs=False)
    p = SamplingParams(max_new_tokens=300, temperature=0.7, top_p=0.9, ignore_eos=True)
    eng.generate(prompts(256)[:256], SamplingParams(max_new_tokens=4, temperature=0.7, top_p=0.9, ignore_eos=True))
    spec = eng.scheduler.spec(256, 512, p)
    eng.scheduler.rows.pos[:256] = 300
    with torch.inference_mode():
        print("eager decode step ms:", timeit(lambda: eng.scheduler.decode(spec, 256, 448), 20))
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                eng.scheduler.decode(spec, 256, 448)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))
        n, hkv, g, d, S = 256, 8, 4, 64, 448
        kc = torch.randn(n, hkv, 512, d, device="cuda", dtype=torch.bfloat16)
        vc = torch.randn_like(kc)
        q = torch.randn(n, hkv * g, 1, d, device="cuda", dtype=torch.bfloat16)
        pos = torch.full((n,), 300, device="cuda")
        mask = torch.arange(S, device="cuda")[None] <= pos[:, None]

        def ours():
            qg = q.view(n, hkv, g, d)
            s = torch.matmul(qg, kc[:, :, :S].transpose(-1, -2)).float() * 0.125
            pr = torch.softmax(s.masked_fill(~mask[:, None, None], float("-inf")), -1).to(torch.bfloat16)
            return torch.matmul(pr, vc[:, :, :S])

        def sdpa():
            return F.scaled_dot_product_attention(q, kc[:, :, :S], vc[:, :, :S], attn_mask=mask[:, None, None], enable_gqa=True)

        def sdpa_grouped():  # queries of a KV head as a 4-row "sequence": one K/V read per head
            qg = q.view(n, hkv, g, d)
            return F.scaled_dot_product_attention(qg, kc[:, :, :S], vc[:, :, :S], attn_mask=mask[:, None, None])

        kv_bytes = 2 * n * hkv * S * d * 2
        for name, fn in [("matmul", ours), ("sdpa_gqa", sdpa), ("sdpa_grouped", sdpa_grouped)]:
            ms = timeit(fn)
            print(f"attention {name}: {ms:.3f} ms/layer  {kv_bytes / ms / 1e9:.0f} GB/s")
        logits = torch.randn(256, 128256, device="cuda")
        print("topk256 ms", timeit(lambda: torch.topk(logits, 256, dim=-1)))
        print("topk64 ms", timeit(lambda: torch.topk(logits, 64, dim=-1)))
        print("sort ms", timeit(lambda: torch.sort(logits, dim=-1, descending=True)))
        print("logsumexp ms", timeit(lambda: torch.logsumexp(logits, -1)))
        x = torch.randn(256, 2048, device="cuda", dtype=torch.bfloat16)
        print("lm_head ms", timeit(lambda: model.lm_head(x)))
        print("mlp ms", timeit(lambda: model.model.layers[0].mlp(x[:, None])))


if __name__ == "__main__":
    main()
