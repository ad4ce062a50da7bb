"""The fast engine's decode step on the fused elementwise kernels (``kernels.add_rms_norm``,
``rope_cache_write``, ``silu_mul``) against the same engine calling the modules: each Triton kernel
against its PyTorch reference, greedy tokens of the two steps, and rollout throughput (CUDA graphs,
no torch.compile, EOS ignored), on the Llama-3.2-1B shape and a SmolLM2-135M shape (random bf16).

    python bench/fused_step.py --out bench/results/fused_step_DEVICE_DATE.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import LLAMA32_1B, device_name, save  # noqa: E402
from posttrain.engine import SamplingParams, kernels  # noqa: E402
from posttrain.engine.fast import FastEngine  # noqa: E402
from rollout import StubTokenizer, prompts, run  # noqa: E402

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
               tie_word_embeddings=True, hidden_act="silu")


def model_of(shape: dict):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(LlamaConfig(**shape)).to(torch.bfloat16).eval()
    return model


def kernel_checks(shape: dict) -> dict:
    """Max |Triton - reference| and the share of equal elements, per kernel, at this shape."""
    g = torch.Generator(device="cuda").manual_seed(1)
    bf, n = torch.bfloat16, 64
    d_model, inter = shape["hidden_size"], shape["intermediate_size"]
    heads, kv = shape["num_attention_heads"], shape["num_key_value_heads"]
    d = d_model // heads
    out = {}

    def cmp(name, a, b):
        out[name] = {"max_abs_diff": (a.float() - b.float()).abs().max().item(), "equal_share": (a == b).float().mean().item()}

    h, delta = (torch.randn(n, d_model, generator=g, device="cuda").to(bf) for _ in range(2))
    w = torch.randn(d_model, generator=g, device="cuda").to(bf)
    for with_delta in (False, True):
        s, y = kernels.add_rms_norm(h, delta if with_delta else None, w, 1e-5)
        s_ref, y_ref = kernels.add_rms_norm_ref(h, delta if with_delta else None, w, 1e-5)
        cmp(f"add_rms_norm{'' if with_delta else '_no_add'}", torch.cat([s, y]), torch.cat([s_ref, y_ref]))
    qkv = torch.randn(n, (heads + 2 * kv) * d, generator=g, device="cuda").to(bf)
    cos, sin = torch.randn(n, d, generator=g, device="cuda").to(bf), torch.randn(n, d, generator=g, device="cuda").to(bf)
    caches = [torch.zeros(96, kv, 512, d, dtype=bf, device="cuda") for _ in range(4)]
    rows, pos = torch.randperm(96, device="cuda")[:n], torch.randint(0, 512, (n,), device="cuda")
    q = kernels.rope_cache_write(qkv, cos, sin, caches[0], caches[1], rows, pos, heads, kv)
    q_ref = kernels.rope_cache_write_ref(qkv, cos, sin, caches[2], caches[3], rows, pos, heads, kv)
    cmp("rope_cache_write", torch.cat([q.flatten(), caches[0].flatten(), caches[1].flatten()]),
        torch.cat([q_ref.flatten(), caches[2].flatten(), caches[3].flatten()]))
    gu = torch.randn(n, 2 * inter, generator=g, device="cuda").to(bf)
    cmp("silu_mul", kernels.silu_mul(gu), kernels.silu_mul_ref(gu))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="fused_step.json")
    ap.add_argument("--new-tokens", type=int, default=256)
    args = ap.parse_args()
    rows = []
    for name, shape in (("smollm2-135m", SMOLLM2), ("llama32-1b", LLAMA32_1B)):
        model = model_of(shape)
        row = {"shape": name, "kernels": kernel_checks(shape)}
        vocab = shape["vocab_size"]

        def ps_of(n, seed=0):
            return [[t % vocab for t in p] for p in prompts(n, seed)]

        greedy = {}
        for fused in (True, False):
            eng = FastEngine(model, StubTokenizer(), batch_size=256, compile=False)
            if not fused:
                eng.adapter._fusable = lambda: False
            gp = SamplingParams(max_new_tokens=64, temperature=0.0, ignore_eos=True)
            greedy[fused] = [c.token_ids for c in eng.generate(ps_of(16, seed=3), gp)]
            for batch in (64, 256):
                ps = ps_of(batch)
                p = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.7, top_p=0.9, ignore_eos=True)
                run(eng, ps, p)  # captures the graphs
                r = run(eng, ps, p)
                row[f"{'fused' if fused else 'modules'}_batch{batch}"] = {k: round(v, 3) for k, v in r.items()}
            print(row, flush=True)
            del eng
        pairs = [(a, b) for ra, rb in zip(greedy[True], greedy[False]) for a, b in zip(ra, rb)]
        row["greedy_tokens_equal_share"] = sum(a == b for a, b in pairs) / len(pairs)
        row["greedy_rows_identical"] = sum(ra == rb for ra, rb in zip(greedy[True], greedy[False]))
        rows.append(row)
        del model
        torch.cuda.empty_cache()
    save(args.out, {"device": device_name(), "torch": torch.__version__, "new_tokens": args.new_tokens, "rows": rows})


if __name__ == "__main__":
    main()
