"""Seed 000's own REINFORCE loop, re-implemented faithfully from ``shared/seeds/000_…txt`` (part 5), to
time it against ``posttrain rl --config configs/reinforce_llama32_1b.yaml`` on the same model.

What is the notebook's: an HF ``Trainer`` subclass whose ``compute_loss`` samples with
``model.generate`` (max 300 new tokens, min 1, top-p 0.9, temperature 0.7 from its defaults), then runs
the policy forward with gradients over the whole sequence in fp32 logits with ``nan_to_num`` and a
full-vocabulary ``log_softmax``, gathers the sampled tokens' log-probs row by row (generated region,
up to the first EOS, clamped to [-20, 0]), rewards 1/0 by the numeric answer, baseline = the
micro-batch's mean reward, advantages normalised to unit std, loss = −mean(A · Σ log π), plus
0.1 × the per-sequence mean k1 KL to a second, frozen fp16 copy of the model. fp16 weights and
autocast, LoRA r 16 on every projection, batch 4 × accumulation 16, lr 1e-6, AdamW, no gradient
checkpointing. The notebook's TODOs are filled in as its comments describe.

    python bench/seed000_reinforce.py --model DIR --data-dir DIR --out steps.json [--max-steps 1]
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from posttrain.tasks import make_task  # noqa: E402
from posttrain.tasks.grading import grade  # noqa: E402
from posttrain.utils import process_age_s  # noqa: E402

CUDA = torch.cuda.is_available()


def reward_numeric(pred_texts, gold_answers):
    """The notebook's reward: 1 if the extracted number matches the gold one, else 0; and the batch mean."""
    rewards = [1 if grade(t, g).correct else 0 for t, g in zip(pred_texts, gold_answers)]
    return rewards, sum(rewards) / max(1, len(rewards))


def build_trainer_class():
    from transformers import Trainer

    class REINFORCETrainer(Trainer):
        def __init__(self, *args, gen_kwargs=None, ref_model=None, kl_beta=0.0, **kwargs):
            super().__init__(*args, **kwargs)
            self.gen_kwargs = gen_kwargs
            self.ref_model = ref_model
            self.kl_beta = kl_beta

        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            tok = self.processing_class
            input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
            B = input_ids.size(0)
            eos_id, pad_id = tok.eos_token_id, tok.pad_token_id
            with torch.no_grad():
                gen = model.generate(input_ids=input_ids, attention_mask=attention_mask, pad_token_id=pad_id,
                                     eos_token_id=eos_id, return_dict_in_generate=True, output_scores=False, **self.gen_kwargs)
                full_ids = gen.sequences
                full_attn = (full_ids != pad_id).long()
                prompt_lens = attention_mask.sum(dim=1)
            T_full = full_ids.size(1)
            out = model(input_ids=full_ids[:, :-1], attention_mask=full_attn[:, :-1])
            logits = out.logits.float()
            logits = torch.nan_to_num(logits, nan=0.0, posinf=torch.finfo(torch.float32).max, neginf=torch.finfo(torch.float32).min)
            logprobs = torch.log_softmax(logits, dim=-1)

            # TASK 1: positions >= prompt_len (left padding: the prompt ends at the padded width), up to the first EOS
            ar = torch.arange(T_full, device=full_ids.device).unsqueeze(0).expand(B, -1)
            width = input_ids.size(1)
            gen_region = ar >= width
            is_eos = (full_ids == eos_id) & gen_region
            first_eos = torch.where(is_eos.any(1), is_eos.float().argmax(1), torch.full_like(prompt_lens, T_full))
            valid = gen_region & (ar <= first_eos[:, None])  # pad is EOS: what follows the first EOS is padding
            # TASKS 2-3: per sample, the sampled tokens' log-probs at valid positions, summed
            logprob_sums = []
            for i in range(B):
                pos = valid[i].nonzero().squeeze(-1)
                pos = pos[pos > 0]
                if pos.numel() == 0:
                    logprob_sums.append((model.get_input_embeddings().weight[0, 0] * 0.0).to(dtype=logits.dtype))
                    continue
                tok_ids = full_ids[i, pos]
                step_logps = logprobs[i, pos - 1, :].gather(-1, tok_ids.view(-1, 1)).squeeze(-1)
                step_logps = torch.where(torch.isfinite(step_logps), step_logps, torch.zeros_like(step_logps))
                step_logps = step_logps.clamp(min=-20.0, max=0.0)
                logprob_sums.append(step_logps.sum())
            logprob_sums = torch.stack(logprob_sums, dim=0)
            with torch.no_grad():
                texts = tok.batch_decode(full_ids[:, width:], skip_special_tokens=True)
                rewards_list, b = reward_numeric(texts, inputs["gold_answer"])
                rewards = torch.tensor(rewards_list, dtype=logprob_sums.dtype, device=logprob_sums.device)
                baseline = torch.tensor(b, dtype=logprob_sums.dtype, device=logprob_sums.device)
            # TASK 4: advantage, normalised; the REINFORCE loss
            advantages = rewards - baseline
            std = advantages.std()
            if torch.isfinite(std) and std > 0:
                advantages = advantages / std
            loss = -(advantages.detach() * logprob_sums).mean()
            kl_loss = torch.tensor(0.0, device=loss.device)
            if self.ref_model is not None and self.kl_beta > 0:
                with torch.no_grad():
                    ref_out = self.ref_model(input_ids=full_ids[:, :-1], attention_mask=full_attn[:, :-1])
                    ref_logprobs = torch.log_softmax(ref_out.logits.float(), dim=-1)
                mask_float = valid[:, 1:].contiguous().float()
                target_ids = full_ids[:, 1:].unsqueeze(-1)
                policy_logp = torch.gather(logprobs, -1, target_ids).squeeze(-1).clamp(min=-20.0, max=0.0)
                ref_logp = torch.gather(ref_logprobs, -1, target_ids).squeeze(-1).clamp(min=-20.0, max=0.0)
                kl_per_token = (policy_logp - ref_logp) * mask_float
                kl_per_token = torch.where(torch.isfinite(kl_per_token), kl_per_token, torch.zeros_like(kl_per_token))
                kl_loss = (kl_per_token.sum(dim=1) / mask_float.sum(dim=1).clamp(min=1)).mean()
            if not torch.isfinite(kl_loss):
                kl_loss = torch.tensor(0.0, device=loss.device)
            loss = loss + self.kl_beta * kl_loss
            return (loss, {"loss": loss}) if return_outputs else loss

    return REINFORCETrainer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="a merged SFT model folder (the seed's ./gsm8k_1b_lora_merged)")
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--max-steps", type=int, default=1, help="optimizer steps (each 16 micro-batches of 4)")
    args = ap.parse_args()
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback, TrainingArguments

    tok = AutoTokenizer.from_pretrained(args.model, use_fast=True)
    tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    task = make_task("gsm8k", prompt_style="plain", data_dir=args.data_dir)
    rows = [{"input_ids": task.encode_prompt(ex, tok)[-399:], "gold_answer": ex.numeric_answer}
            for ex in task.examples("train")[: 64 * args.max_steps]]

    def collate(features):  # the notebook's PromptOnlyCollator
        batch = tok.pad({"input_ids": [f["input_ids"] for f in features]}, padding=True, return_tensors="pt", pad_to_multiple_of=8)
        batch["gold_answer"] = [f["gold_answer"] for f in features]
        return batch

    dev = {"device_map": "auto"} if CUDA else {}
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float16 if CUDA else torch.float32, attn_implementation="sdpa", **dev)
    model.generation_config.return_dict_in_generate = True
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    ref_model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float16 if CUDA else torch.float32, attn_implementation="sdpa", **dev)
    ref_model.eval()
    ref_model.requires_grad_(False)
    steps, micro = [], []

    class Clock(TrainerCallback):
        def on_substep_end(self, a, s, control, **kw):
            micro.append(time.perf_counter())

        def on_step_end(self, a, s, control, **kw):
            if CUDA:
                torch.cuda.synchronize()
            steps.append({"step": s.global_step, "time_s": process_age_s(), "t": time.perf_counter()})

    targs = TrainingArguments(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=4, gradient_accumulation_steps=16, max_grad_norm=1.0,
        learning_rate=1e-6, weight_decay=0.0, max_steps=args.max_steps, logging_steps=1, save_strategy="no", eval_strategy="no",
        optim="adamw_torch", fp16=CUDA, gradient_checkpointing=False, report_to="none", remove_unused_columns=False,
        disable_tqdm=True, use_cpu=not CUDA)
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    trainer = build_trainer_class()(
        model=model, args=targs, train_dataset=rows, data_collator=collate, processing_class=tok, callbacks=[Clock()],
        gen_kwargs=dict(max_new_tokens=300, min_new_tokens=1, do_sample=True, top_p=0.9), ref_model=ref_model, kl_beta=0.1)
    t_start = time.perf_counter()
    trainer.train()
    times = [b["t"] - a["t"] for a, b in zip([{"t": t_start}] + steps, steps)]
    result = {"side": "seed000 (HF Trainer, REINFORCE, generate)", "model": args.model, "steps": len(steps),
              "completions_per_step": 64, "first_step_done_s_from_process_start": steps[0]["time_s"],
              "step_s": times, "median_step_s": statistics.median(times),
              "peak_gpu_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if CUDA else None,
              "device": torch.cuda.get_device_name() if CUDA else "cpu", "torch": torch.__version__}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
