"""Peak GPU memory of one RL micro-batch's forward + backward on the Llama-3.2-1B shape (vocabulary
128,256), LoRA r=16 on every projection, bf16 autocast: log-probs through the whole-batch fp32
log-softmax (posttrain before issue 12) against ``losses.policy.token_logprobs`` (chunked, softmax
recomputed in backward) and against ``trainers.logprobs.sequence_logprobs`` as RL runs it now (the lm_head
fused into the chunks: no [N, T, V] logits at all). Also checks that all give the same log-probs and
gradients.

    python bench/logits_memory.py --out bench/results/logits_memory_DEVICE_DATE.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, llama32_1b  # noqa: E402
from posttrain.losses.policy import token_logprobs  # noqa: E402
from posttrain.trainers.logprobs import sequence_logprobs  # noqa: E402


def full_softmax(logits, tokens):
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return logprobs.gather(-1, tokens[..., None]).squeeze(-1), -(logprobs.exp() * logprobs).sum(-1)


def step(model, ids, fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        if fn is sequence_logprobs:
            logp, ent = sequence_logprobs(model, ids, torch.ones_like(ids))
        else:
            logits = model(input_ids=ids, use_cache=False).logits
            logp, ent = fn(logits[:, :-1], ids[:, 1:])
    (-logp.mean()).backward()
    torch.cuda.synchronize()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return (torch.cuda.max_memory_allocated() - base) / 2**30, logp.detach(), grads


def main():
    from peft import LoraConfig, get_peft_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="logits_memory.json")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--length", type=int, default=460)
    args = ap.parse_args()
    model = get_peft_model(llama32_1b(), LoraConfig(r=16, lora_alpha=32, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    ids = torch.randint(1000, 120000, (args.rows, args.length), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    step(model, ids, token_logprobs)  # warm-up
    old_gib, old_lp, old_g = step(model, ids, full_softmax)
    new_gib, new_lp, new_g = step(model, ids, token_logprobs)
    fused_gib, fused_lp, fused_g = step(model, ids, sequence_logprobs)

    def grad_err(g):
        return max((old_g[k] - g[k]).abs().max().item() / (old_g[k].abs().max().item() + 1e-12) for k in old_g)

    row = {"device": device_name(), "torch": torch.__version__, "rows": args.rows, "length": args.length, "vocab": 128256,
           "peak_gib_full_softmax": round(old_gib, 2), "peak_gib_chunked": round(new_gib, 2), "peak_gib_fused_head": round(fused_gib, 2),
           "ratio": round(old_gib / new_gib, 2), "ratio_fused": round(old_gib / fused_gib, 2),
           "logp_max_abs_diff": (old_lp - new_lp).abs().max().item(), "grad_max_rel_diff": grad_err(new_g),
           "fused_logp_max_abs_diff": (old_lp - fused_lp).abs().max().item(), "fused_grad_max_rel_diff": grad_err(fused_g)}
    print(json.dumps(row))
    Path(args.out).write_text(json.dumps(row, indent=2) + "\n")


if __name__ == "__main__":
    main()
