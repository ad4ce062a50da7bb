"""SFT throughput: posttrain sft (padding-free packing, bf16) against seed 000's recipe (HF Trainer,
per-device batch 4 × accumulation 4, right padding to a multiple of 8, group_by_length, gradient
checkpointing) on the same model (Llama-3.2-1B shape, random bf16 weights, LoRA r=8) and data (GSM8K
train, seed 000's prompt). Tokens/s counts real (non-padding) tokens.

    python bench/sft.py --data-dir DIR --out sft.json [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, emit, llama32_1b  # noqa: E402
from posttrain.tasks import make_task  # noqa: E402
from posttrain.tokenization import train_bpe_tokenizer  # noqa: E402
from posttrain.trainers.sft import SFTConfig, tokenize_examples, train  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def seed_recipe(model_dir: Path, data, steps: int, warm: int, pad_id: int) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation="sdpa").cuda()
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM",
                                             target_modules=TARGETS))
    rows = [{"input_ids": d.input_ids, "labels": d.labels} for d in data]

    def collate(features):  # seed 000's PromptMaskedCollator: right padding to a multiple of 8
        width = max(len(f["input_ids"]) for f in features)
        width = (width + 7) // 8 * 8
        ids = torch.full((len(features), width), pad_id)
        labels = torch.full((len(features), width), -100)
        attn = torch.zeros((len(features), width), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n], labels[i, :n], attn[i, :n] = torch.tensor(f["input_ids"]), torch.tensor(f["labels"]), 1
        return {"input_ids": ids, "labels": labels, "attention_mask": attn}

    times = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            torch.cuda.synchronize()
            times.append(time.perf_counter())

    import inspect

    # transformers 5 replaced group_by_length=True with train_sampling_strategy="group_by_length".
    grouping = ({"train_sampling_strategy": "group_by_length"}
                if "train_sampling_strategy" in inspect.signature(TrainingArguments.__init__).parameters
                else {"group_by_length": True})
    args = TrainingArguments(
        **grouping, output_dir=tempfile.mkdtemp(), per_device_train_batch_size=4, gradient_accumulation_steps=4, learning_rate=2e-4,
        lr_scheduler_type="cosine", warmup_steps=max(1, round(0.03 * steps)), logging_steps=1, bf16=True, gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False}, optim="adamw_torch", report_to="none",
        remove_unused_columns=False, max_steps=steps, save_strategy="no", eval_strategy="no",
        dataloader_num_workers=0, disable_tqdm=True)
    torch.cuda.reset_peak_memory_stats()
    Trainer(model=model, args=args, train_dataset=rows, data_collator=collate, callbacks=[Clock()]).train()
    mean_len = statistics.fmean(len(d.input_ids) for d in data)
    dt = times[-1] - times[warm - 1]
    return {"recipe": "seed000 (HF Trainer, batch 4x4, padding, group_by_length, grad ckpt)",
            "tokens_per_s": (steps - warm) * 16 * mean_len / dt, "seconds_per_step": dt / (steps - warm),
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30}


def ours(model_dir: Path, data_dir: str, steps: int, warm: int, checkpointing: bool, mean_len: float) -> dict:
    out = Path(tempfile.mkdtemp()) / "run"
    torch.cuda.reset_peak_memory_stats()
    train(SFTConfig(model=str(model_dir), task="gsm8k", data_dir=data_dir, output=str(out), max_steps=steps,
                    eval_steps=0, save_steps=0, report_to=[], gradient_checkpointing=checkpointing,
                    max_tokens_per_forward=16384, lora_target_modules=TARGETS, truncation="left"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    dt = sum(r["step_time_s"] for r in rows[warm:])
    return {"recipe": f"posttrain sft (packing{', grad ckpt' if checkpointing else ''})",
            "tokens_per_s": (steps - warm) * 16 * mean_len / dt, "seconds_per_step": dt / (steps - warm),
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--out", default="sft.json")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warm", type=int, default=5)
    args = ap.parse_args()
    task = make_task("gsm8k", data_dir=args.data_dir)
    train_rows = task.examples("train")
    tok = train_bpe_tokenizer([e.question + "\n" + e.response for e in train_rows], vocab_size=8192)
    model_dir = Path(tempfile.mkdtemp()) / "llama32-1b-random"
    model = llama32_1b()
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    del model
    torch.cuda.empty_cache()
    data, stats = tokenize_examples(task, train_rows, tok, 400, "left")
    mean_len = statistics.fmean(len(d.input_ids) for d in data)
    rows = [ours(model_dir, args.data_dir, args.steps, args.warm, False, mean_len),
            ours(model_dir, args.data_dir, args.steps, args.warm, True, mean_len),
            seed_recipe(model_dir, data, args.steps, args.warm, tok.pad_token_id)]
    base = rows[-1]["tokens_per_s"]
    for r in rows:
        r["speedup_vs_seed"] = r["tokens_per_s"] / base
    rows.append({"device": device_name(), "torch": torch.__version__, "mean_seq_len": mean_len, "steps": args.steps,
                 "warmup_steps_excluded": args.warm, "sequences_per_step": 16})
    emit(args.out, rows)


if __name__ == "__main__":
    main()
