"""The fast engine on a QLoRA policy, both ways it can serve the 4-bit base (issue 26):

* ``dequantized``: a bf16 copy of the base with the LoRA adapters merged in (rewritten at each sync);
* ``4bit``: straight from the NF4 weights with bitsandbytes' kernels, each adapter its own low-rank
  product (nothing rewritten at a sync).

The policy is built as seed 003's run builds it (``configs/grpo_llama31_8b.yaml``): a model of the shape
with random bf16 weights, saved, loaded NF4 + double quantization + bf16 compute,
LoRA from the config (r 8, alpha 32, all seven projections), its
``lora_B`` made non-zero so the adapters matter. For HF generate and each path, in this order and in one
process: greedy agreement with HF generate (16 prompts × 64 tokens, token-level %), the rollout of one
GRPO step with the config's settings (8 prompts × G 4 = 32 completions, 256 new tokens, T 0.7, top-p 0.9,
an engine of 64 rows as ``posttrain rl`` builds it; median of 3 after a warm-up call that captures the
graphs), ``sync_weights`` after an in-place change of the adapters, and the peak GPU memory of the path
(allocated by PyTorch, the 4-bit model included; the previous path's engine freed first). Random weights
never emit EOS; completions run to their limit (``ignore_eos``), as in the seed recipes' benchmark.

On one GPU (H200 or H100); the 8B shape writes and loads a 16 GB model first (a few minutes, not yet
timed); ``--paths 4bit`` or ``--paths dequantized`` measures one path alone (both by default):

    python bench/qlora_engine.py --shape llama31-8b --out bench/results/qlora_engine_8b_DEVICE_DATE.json
    python bench/qlora_engine.py --shape llama32-1b --out bench/results/qlora_engine_1b_DEVICE_DATE.json

Smoke run on a CPU (a tiny Llama, bitsandbytes' CPU kernels; needs bitsandbytes; a few minutes on 2 cores):

    python bench/qlora_engine.py --shape tiny --out /tmp/qlora_engine_tiny.json

Add ``--compute-dtype fp32`` to separate rounding from logic (fp32 compute: HF and both paths should agree
token for token). On a real model (``--model DIR`` with its tokenizer, ``--data-dir GSM8K``) the greedy
prompts are the first GSM8K test questions in seed 003's chat template; ``--agreement-only`` stops after
the agreement (no rollouts: a CPU measures it on a small real model, e.g. SmolLM2-135M-Instruct):

    python bench/qlora_engine.py --model SMOLLM2_DIR --data-dir GSM8K --agreement-only --out OUT.json
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHAPES, device_name  # noqa: E402
from posttrain.engine import SamplingParams, load_model  # noqa: E402
from posttrain.engine.fast import FastEngine  # noqa: E402
from posttrain.engine.hf import HFEngine  # noqa: E402
from posttrain.engine.projections import choose_quantized_path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "grpo_llama31_8b.yaml"
TINY = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False,
            bos_token_id=1, eos_token_id=2, hidden_act="silu")
GIB = 2**30


class StubTokenizer:
    pad_token_id = 0
    eos_token_id = 2

    def decode(self, ids, skip_special_tokens=True):
        return ""


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def write_model(shape: dict, folder: str, device: torch.device) -> None:
    """A model of ``shape`` with random weights, made in bf16 (an 8B model never exists in fp32), saved."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(LlamaConfig(**shape))
    finally:
        torch.set_default_dtype(prev)
    model.save_pretrained(folder)
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def qlora_policy(folder: str, cfg: dict, compute_dtype: torch.dtype, device: torch.device):
    """Seed 003's policy as ``posttrain rl`` builds it: NF4 with double quantization at load, LoRA on top
    (``get_peft_model`` alone, as the seed and TRL: no fp32 upcast of norms and embeddings)."""
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=compute_dtype)
    model = load_model(folder, compute_dtype, str(device), quantization_config=quant)
    model = get_peft_model(model, LoraConfig(r=cfg["lora_r"], lora_alpha=cfg["lora_alpha"], lora_dropout=cfg["lora_dropout"],
                                             bias="none", task_type="CAUSAL_LM", target_modules=cfg["lora_target_modules"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    model.eval()
    model.generation_config.eos_token_id = StubTokenizer.eos_token_id
    return model


def flip_adapters(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(-1)


def timed(engine, prompts, params, device):
    sync(device)
    t = time.perf_counter()
    out = engine.generate(prompts, params)
    sync(device)
    return out, time.perf_counter() - t


def agreement(ref, got) -> dict:
    """Token-level agreement (same token at the same position) and where sequences first differ."""
    pairs = [(a, b) for x, y in zip(ref, got) for a, b in zip(x.token_ids, y.token_ids)]
    first = [next((i for i, (a, b) in enumerate(zip(x.token_ids, y.token_ids)) if a != b), len(x.token_ids)) for x, y in zip(ref, got)]
    return {"tokens_agree_pct": round(100 * sum(a == b for a, b in pairs) / len(pairs), 2),
            "sequences_identical": sum(x.token_ids == y.token_ids for x, y in zip(ref, got)), "of": len(ref),
            "mean_first_divergence": round(sum(first) / len(first), 1)}


def peak_gib(device) -> float | None:
    return round(torch.cuda.max_memory_allocated() / GIB, 2) if device.type == "cuda" else None


def free_engine(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=["tiny", *sorted(SHAPES)], default="llama31-8b")
    ap.add_argument("--out", default="qlora_engine.json")
    ap.add_argument("--compute-dtype", choices=["bf16", "fp32"], default="bf16", help="bf16 (seed 003) or fp32")
    ap.add_argument("--paths", default="4bit,dequantized", help="which of the engine's paths to measure, in order")
    ap.add_argument("--model", help="a saved model of the shape to load (bench/shapes.py writes one) instead of writing one")
    ap.add_argument("--data-dir", help="with --model: greedy prompts from GSM8K's test split, in the config's chat template")
    ap.add_argument("--agreement-only", action="store_true", help="measure greedy agreement only (no rollouts, no sync)")
    args = ap.parse_args()
    cfg = yaml.safe_load(CONFIG.read_text())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    compute_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.compute_dtype]
    shape = TINY if args.shape == "tiny" else SHAPES[args.shape]
    tok = StubTokenizer()
    row = {"device": device_name(), "torch": torch.__version__, "shape": args.shape, "compute_dtype": args.compute_dtype,
           "date": time.strftime("%Y-%m-%d"), "config": str(CONFIG.relative_to(ROOT))}
    try:
        import bitsandbytes

        row["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        sys.exit("bench/qlora_engine.py needs bitsandbytes: pip install bitsandbytes")

    t = time.perf_counter()
    if args.model:
        model = qlora_policy(args.model, cfg, compute_dtype, device)
    else:
        with tempfile.TemporaryDirectory(prefix="qlora-engine-") as folder:
            write_model(shape, folder, device)
            model = qlora_policy(folder, cfg, compute_dtype, device)
    row["build_s"] = round(time.perf_counter() - t, 1)
    row["model_gib"] = round(torch.cuda.memory_allocated() / GIB, 2) if device.type == "cuda" else None
    copy = FastEngine(model, tok, 1).adapter.copy_bytes()
    row["dense_copy_gib"] = round(copy / GIB, 2)
    row["auto_choice"], row["auto_notice"] = choose_quantized_path("auto", copy, compute_dtype, device)

    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    greedy_prompts = torch.randint(3, vocab, (16, 160), generator=g).tolist()
    if args.data_dir:
        from posttrain.engine.models import load_tokenizer
        from posttrain.tasks import make_task

        real = load_tokenizer(args.model)
        task = make_task(cfg["task"], prompt_style=cfg["prompt_style"], data_dir=args.data_dir)
        questions = task.examples("test", limit=16)
        greedy_prompts = [task.encode_prompt(ex, real) for ex in questions]
        row["prompts"] = f"the first {len(questions)} GSM8K test questions, {cfg['prompt_style']} template"
    step_prompts = torch.randint(3, vocab, (32 // cfg["num_generations"], 180), generator=g).tolist()
    greedy = SamplingParams(max_new_tokens=64, ignore_eos=True)
    rollout = SamplingParams(max_new_tokens=cfg["max_new_tokens"], temperature=cfg["temperature"], top_p=cfg["top_p"],
                             n=cfg["num_generations"], ignore_eos=True, seed=0)
    free_engine(device)
    ref, row["hf_greedy_s"] = timed(HFEngine(model, tok, 16), greedy_prompts, greedy, device)
    row["hf_greedy_s"] = round(row["hf_greedy_s"], 2)
    row["hf_peak_gib"] = peak_gib(device)

    for path in args.paths.split(","):
        free_engine(device)
        r = {}
        engine = FastEngine(model, tok, 64, quantized_rollouts=path)
        got, r["first_call_s"] = timed(engine, greedy_prompts, greedy, device)  # builds the weights, captures graphs
        r["first_call_s"] = round(r["first_call_s"], 2)
        r.update(agreement(ref, got))
        if args.agreement_only:
            row[path] = r
            print(json.dumps({path: r}), flush=True)
            continue
        timed(engine, step_prompts, rollout, device)  # warm-up: the rollout's graphs
        times = [timed(engine, step_prompts, rollout, device)[1] for _ in range(3)]
        r["rollout_s"] = round(statistics.median(times), 3)
        r["rollout_tokens_per_s"] = round(len(step_prompts) * rollout.n * rollout.max_new_tokens / r["rollout_s"])
        flip_adapters(model)  # an optimizer step on the adapters, in place
        sync(device)
        t = time.perf_counter()
        engine.sync_weights(model)
        sync(device)
        r["sync_weights_s"] = round(time.perf_counter() - t, 4)
        timed(engine, step_prompts, rollout, device)  # a rollout after the sync
        r["peak_gib"] = peak_gib(device)
        flip_adapters(model)  # back to the adapters HF generate ran with, for the next path
        row[path] = r
        print(json.dumps({path: r}), flush=True)
        del engine, got
    Path(args.out).write_text(json.dumps(row, indent=2) + "\n")
    print(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
