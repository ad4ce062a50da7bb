"""TRL's ``GRPOTrainer`` driven by a posttrain RL config: the same model, prompts (rendered by
posttrain's task, so the same tokens), reward functions (posttrain's, which have TRL's signature),
group size, completions per step, sampling, loss aggregation, LoRA/QLoRA and optimiser. The side of
the side-by-side runs (issues 11, 12, 13) that posttrain is compared with; TRL is not a dependency of
posttrain, so this script runs where ``trl`` and ``datasets`` are installed.

    python bench/trl_grpo.py --config configs/grpo_smollm2.yaml --out DIR [--max-steps N] [--max-minutes M]

Writes ``DIR/steps.jsonl`` (per optimizer step: the process age at its end and the step's seconds),
``DIR/trl_logs.jsonl`` (TRL's own logs: reward, lengths), ``DIR/summary.json`` (time to first step from process start, median step time, completions/s,
peak GPU memory) and, unless ``--no-save``, the trained model as a standard HF folder in ``DIR/model``
(LoRA merged into the base) for ``posttrain eval``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from posttrain.config import build_config, load_yaml  # noqa: E402
from posttrain.engine.models import load_tokenizer  # noqa: E402
from posttrain.engine.registry import resolve_model  # noqa: E402
from posttrain.tasks import make_task  # noqa: E402
from posttrain.tasks.rewards import parse_reward  # noqa: E402
from posttrain.trainers.rl import RLConfig, training_problems  # noqa: E402
from posttrain.utils import process_age_s  # noqa: E402

CUDA = torch.cuda.is_available()
SCHEDULERS = {"constant_with_warmup": "constant_with_warmup", "constant": "constant", "cosine": "cosine", "linear": "linear"}


def load_model(cfg: RLConfig):
    """As seed 003 loads it: bf16, SDPA, and for QLoRA NF4 with double quantization and bf16 compute."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = dict(dtype=torch.bfloat16, attn_implementation="sdpa", device_map={"": 0} if CUDA else None)
    if cfg.method == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    src = resolve_model(cfg.model)
    model = AutoModelForCausalLM.from_pretrained(src.path, gguf_file=src.gguf_file, **kwargs)
    lora = None
    if cfg.method in ("lora", "qlora"):
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias="none",
                          task_type="CAUSAL_LM", target_modules=cfg.lora_target_modules or "all-linear")
    return model, lora


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--model")
    ap.add_argument("--data-dir")
    ap.add_argument("--max-steps", type=int)
    ap.add_argument("--max-minutes", type=float, help="wall-clock budget from process start, as posttrain's")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()

    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    values = load_yaml(args.config)
    values.update({k: v for k, v in {"model": args.model, "data_dir": args.data_dir, "max_steps": args.max_steps}.items() if v})
    cfg = build_config(RLConfig, values, args.config)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    task = make_task(cfg.task, prompt_style=cfg.prompt_style, data_dir=cfg.data_dir)
    examples, _ = training_problems(task, cfg)
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    data = Dataset.from_dict({"prompt": [task.prompt_text(ex, tokenizer) for ex in examples],
                              "answer": [ex.response or f"#### {ex.numeric_answer}" for ex in examples],
                              "numeric_answer": [ex.numeric_answer for ex in examples]})
    rewards = [parse_reward(r) for r in cfg.reward]
    model, lora = load_model(cfg)

    per_step = cfg.per_device_batch_size * cfg.gradient_accumulation_steps
    grpo = GRPOConfig(
        output_dir=str(out / "trl"), report_to="none", logging_steps=1, save_strategy="no", bf16=CUDA, use_cpu=not CUDA,
        learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay, lr_scheduler_type=SCHEDULERS[cfg.lr_scheduler],
        warmup_steps=cfg.warmup_steps or 0, max_grad_norm=cfg.max_grad_norm, max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.per_device_batch_size, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        generation_batch_size=per_step, num_generations=cfg.num_generations, num_iterations=cfg.num_iterations,
        beta=cfg.beta, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0, max_completion_length=cfg.max_new_tokens,
        loss_type=cfg.loss_type, scale_rewards="group" if cfg.scale_rewards else "none",
        epsilon=cfg.epsilon_low, epsilon_high=cfg.epsilon_high, mask_truncated_completions=cfg.mask_truncated_completions,
        reward_weights=[r.weight for r in rewards], gradient_checkpointing=cfg.gradient_checkpointing, seed=cfg.seed,
        disable_tqdm=True,
    )
    steps: list[dict] = []
    state = {"t_prev": None}

    class Clock(TrainerCallback):
        def on_step_begin(self, a, s, control, **kw):
            if state["t_prev"] is None:
                state["t_prev"] = time.perf_counter()

        def on_step_end(self, a, s, control, **kw):
            if CUDA:
                torch.cuda.synchronize()
            now = time.perf_counter()
            row = {"step": s.global_step, "time_s": process_age_s(), "step_s": now - state["t_prev"]}
            state["t_prev"] = now
            steps.append(row)
            with open(out / "steps.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            if args.max_minutes and row["time_s"] > 60 * args.max_minutes:
                control.should_training_stop = True

        def on_log(self, a, s, control, logs=None, **kw):  # TRL's own step logs (reward, lengths, …)
            with open(out / "trl_logs.jsonl", "a") as f:
                f.write(json.dumps({"step": s.global_step, **(logs or {})}) + "\n")

    fns = []
    for r in rewards:  # TRL names each function by __name__
        def fn(prompts, completions, _r=r, **kw):
            return _r.fn(prompts, completions, **kw)
        fn.__name__ = r.name
        fns.append(fn)
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    trainer = GRPOTrainer(model=model, reward_funcs=fns, args=grpo, train_dataset=data, processing_class=tokenizer,
                          peft_config=lora, callbacks=[Clock()])
    trainer.train()
    times = [r["step_s"] for r in steps]
    summary = {
        "side": "trl", "trl_version": __import__("trl").__version__, "config": args.config, "model": cfg.model,
        "method": cfg.method, "steps": len(steps), "completions_per_step": per_step,
        "first_step_done_s_from_process_start": steps[0]["time_s"] if steps else None,
        "last_step_done_s_from_process_start": steps[-1]["time_s"] if steps else None,
        "median_step_s": statistics.median(times[1:] or times) if times else None,
        "completions_per_s": per_step / statistics.median(times[1:] or times) if times else None,
        "peak_gpu_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if CUDA else None,
        "device": torch.cuda.get_device_name() if CUDA else "cpu", "torch": torch.__version__,
    }
    if not args.no_save:
        policy = trainer.model
        if lora is not None:
            policy = policy.merge_and_unload() if cfg.method == "lora" else None
        if policy is not None:  # a QLoRA policy is only timed (its merged weights would be 4-bit rounded)
            policy.save_pretrained(out / "model")
            tokenizer.save_pretrained(out / "model")
    summary["done_s_from_process_start"] = process_age_s()
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
