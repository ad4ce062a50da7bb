"""The fast engine on a QLoRA policy (4-bit NF4 base, double quantization, bf16 compute, LoRA r 16 on
every projection with non-zero adapters) against HF generate on the same model: greedy agreement and
throughput. Llama-3.2-1B shape with random weights, quantized at load as seed 003 does.

    python bench/qlora_engine.py --out bench/results/qlora_engine_DEVICE_DATE.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, llama32_1b  # noqa: E402
from posttrain.engine import SamplingParams, load_model  # noqa: E402
from posttrain.engine.fast import FastEngine  # noqa: E402
from posttrain.engine.hf import HFEngine  # noqa: E402
from posttrain.trainers.setup import bnb_4bit_config  # noqa: E402


class StubTokenizer:
    pad_token_id = 0
    eos_token_id = 128001

    def decode(self, ids, skip_special_tokens=True):
        return ""


def timed(engine, prompts, params):
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = engine.generate(prompts, params)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t
    return out, dt, sum(len(c.token_ids) for c in out) / dt


def main():
    from peft import LoraConfig, get_peft_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="qlora_engine.json")
    ap.add_argument("--compute-dtype", default="bf16", help="bf16 (seed 003) or fp32 (separates rounding from logic)")
    args = ap.parse_args()
    folder = tempfile.mkdtemp()
    llama32_1b().save_pretrained(folder)
    quant = bnb_4bit_config()
    if args.compute_dtype == "fp32":
        quant.bnb_4bit_compute_dtype = torch.float32
    model = load_model(folder, args.compute_dtype, "cuda", quantization_config=quant)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    tok = StubTokenizer()
    model.generation_config.eos_token_id = tok.eos_token_id
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(1000, 120000, (64, 160), generator=g).tolist()
    rows = {"device": device_name(), "torch": torch.__version__, "model": "Llama-3.2-1B shape, NF4 + LoRA r16",
            "compute_dtype": args.compute_dtype}
    greedy = SamplingParams(max_new_tokens=64, ignore_eos=True)
    hf, rows["hf_greedy_s"], _ = timed(HFEngine(model, tok, 64), prompts[:16], greedy)
    fast_engine = FastEngine(model, tok, 256)
    t = time.perf_counter()
    fast, _, _ = timed(fast_engine, prompts[:16], greedy)
    rows["fast_first_call_s"] = round(time.perf_counter() - t, 2)
    same_tok = [sum(a == b for a, b in zip(x.token_ids, y.token_ids)) for x, y in zip(hf, fast)]
    first_diff = [next((i for i, (a, b) in enumerate(zip(x.token_ids, y.token_ids)) if a != b), 64) for x, y in zip(hf, fast)]
    rows.update(greedy_identical_sequences=sum(d == 64 for d in first_diff), of=len(hf),
                identical_tokens=sum(same_tok), tokens=64 * len(hf), mean_first_divergence=sum(first_diff) / len(hf))
    sample = SamplingParams(max_new_tokens=300, temperature=0.7, top_p=0.9, ignore_eos=True, seed=0)
    _, rows["hf_rollout_s"], rows["hf_tokens_per_s"] = timed(HFEngine(model, tok, 64), prompts, sample)
    _, rows["fast_rollout_s"], rows["fast_tokens_per_s"] = timed(fast_engine, prompts, sample)
    rows["fast_over_hf"] = rows["fast_tokens_per_s"] / rows["hf_tokens_per_s"]
    t = time.perf_counter()
    fast_engine.sync_weights(model)
    torch.cuda.synchronize()
    rows["sync_weights_s"] = time.perf_counter() - t  # dequantize + merge, per optimizer step
    rows["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print(json.dumps(rows))
    Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
