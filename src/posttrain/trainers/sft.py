"""Supervised fine-tuning with a prompt-masked loss (seed 000, part 4), top to bottom.

Each example is prompt + response + EOS; only response tokens count in the loss. Sequences are
packed padding-free: one row per forward, position ids restarting at every sequence, so attention
stays within each sequence and no compute is spent on padding. An optimizer step sees
``per_device_batch_size × gradient_accumulation_steps × world_size`` sequences, as in the seed, and
normalises the loss by the step's total response tokens.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from posttrain.config import require
from posttrain.errors import PosttrainError
from posttrain.losses.sft import IGNORE_INDEX, masked_nll_sum
from posttrain.tasks import Task, make_task
from posttrain.trainers.common import (Checkpoints, TrainerOptions, GracefulStop, MetricsLogger, accuracy_eval, build_optimizer,
                                       build_scheduler, config_dict, count_parameters, load_policy, make_accelerator,
                                       prepare_output, push_folder, save_final_model, warmup_steps_for)
from posttrain.utils import seed_everything, write_json

TRUNCATION = ("prompt_left", "drop", "left")


@dataclass
class SFTConfig(TrainerOptions):
    # -- what to train
    output: str = "runs/sft"
    """Output folder: adapter or model, metrics.jsonl, tensorboard/, checkpoints/."""
    # -- optimisation
    epochs: float = 2.0
    """Passes over the training data (ignored when max_steps is set)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps."""
    learning_rate: float = 2e-4
    """Peak learning rate."""
    lr_scheduler: str = "cosine"
    """cosine, linear, constant or constant_with_warmup."""
    warmup_ratio: float = 0.03
    """Share of steps spent warming up (the seed's 3%)."""
    # -- data shaping
    max_len: int = 400
    """Longest sequence (prompt + response + EOS) in tokens (the seed's 400)."""
    truncation: str = "prompt_left"
    """Too-long examples: prompt_left (cut the prompt's start, keep the whole answer; drop if the answer alone is too long), drop, or left (the seed: cut the sequence's start)."""
    packing: bool = True
    """Pack sequences padding-free into one row per forward; off = padded micro-batches grouped by length."""
    max_tokens_per_forward: int = 8192
    """Token budget of one packed forward pass."""
    # -- runtime
    eval_steps: int = 25
    """Evaluate every N steps (0 disables); the seed's 25."""
    eval_examples: int = 100
    """Held-out examples for the evaluation loss (the seed's 100)."""
    eval_accuracy_samples: int = 64
    """Held-out problems graded by the evaluation harness at each evaluation (0 disables)."""
    eval_max_new_tokens: int = 300
    """Generation budget for the accuracy evaluation."""
    save_steps: int = 250
    """Checkpoint every N steps (0 disables); the seed's 250."""

    def __post_init__(self):
        self._check_common()
        require(self, {
            "learning_rate": self.learning_rate > 0,
            "max_len": self.max_len >= 8,
            "epochs": self.epochs > 0,
            "max_steps": self.max_steps is None or self.max_steps >= 1,
            "max_tokens_per_forward": self.max_tokens_per_forward >= self.max_len,
            "warmup_ratio": 0 <= self.warmup_ratio < 1,
        }, "sft")
        if self.truncation not in TRUNCATION:
            raise PosttrainError(f"unknown truncation {self.truncation!r}; choose one of {', '.join(TRUNCATION)}")


# ------------------------------------------------------------------------------------------ data --
@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]
    """input_ids with prompt positions set to -100."""


def tokenize_examples(task: Task, examples, tokenizer, max_len: int, truncation: str) -> tuple[list[Tokenized], dict]:
    """Pre-tokenize once; apply the truncation policy and count what it touched."""
    out, stats = [], {"examples": 0, "truncated": 0, "dropped": 0, "no_solution": 0}
    targets = []
    kept = []
    for ex in examples:
        if not ex.response:
            stats["no_solution"] += 1
            continue
        kept.append(ex)
        targets.append(task.target(ex))
    if not kept:
        raise PosttrainError(f"task {task.name!r} has no training examples with worked solutions")
    target_ids = tokenizer(targets, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    for ex, resp in zip(kept, target_ids):
        prompt = task.encode_prompt(ex, tokenizer)
        resp = list(resp) + [eos]
        if len(prompt) + len(resp) > max_len:
            if truncation == "drop":
                stats["dropped"] += 1
                continue
            if truncation == "left":
                ids = (prompt + resp)[-max_len:]
                labels = ([IGNORE_INDEX] * len(prompt) + resp)[-max_len:]
                out.append(Tokenized(ids, labels))
                stats["truncated"] += 1
                continue
            keep_prompt = max_len - len(resp)
            if keep_prompt < 2:  # the answer alone does not fit: never cut it
                stats["dropped"] += 1
                continue
            # Keep the first token (BOS) and the end of the prompt, which holds the question.
            prompt = prompt[:1] + prompt[len(prompt) - keep_prompt + 1:]
            stats["truncated"] += 1
        out.append(Tokenized(prompt + resp, [IGNORE_INDEX] * len(prompt) + resp))
    stats["examples"] = len(out)
    if not out:
        raise PosttrainError(f"every training example is longer than max_len={max_len} tokens; raise --max-len")
    return out, stats


def pack(batch: list[Tokenized], device) -> dict:
    """One padding-free row: sequences concatenated, position ids restarting at each.

    HF models build a block-diagonal causal mask from restarting position ids when no attention
    mask is given, so no sequence attends to another.
    """
    ids = torch.tensor([t for ex in batch for t in ex.input_ids], device=device)[None]
    labels = torch.tensor([t for ex in batch for t in ex.labels], device=device)[None]
    pos = torch.tensor([i for ex in batch for i in range(len(ex.input_ids))], device=device)[None]
    return {"input_ids": ids, "labels": labels, "position_ids": pos}


def pad_right(batch: list[Tokenized], pad_id: int, device, multiple_of: int = 8) -> dict:
    """The seed's collator: right padding (to a multiple of 8) with an attention mask."""
    width = max(len(ex.input_ids) for ex in batch)
    width = int(math.ceil(width / multiple_of) * multiple_of)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, ex in enumerate(batch):
        n = len(ex.input_ids)
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(ex.input_ids), torch.tensor(ex.labels), 1
    return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}


def forward_chunks(batch: list[Tokenized], cfg: SFTConfig, pad_id: int, device) -> list[dict]:
    """Split one optimizer step's sequences into forward passes."""
    if not cfg.packing:
        # Length-grouped micro-batches (sorted within the step) keep padding small.
        batch = sorted(batch, key=lambda e: len(e.input_ids))
        size = cfg.per_device_batch_size
        return [pad_right(batch[i:i + size], pad_id, device) for i in range(0, len(batch), size)]
    chunks, current, tokens = [], [], 0
    for ex in sorted(batch, key=lambda e: -len(e.input_ids)):
        if current and tokens + len(ex.input_ids) > cfg.max_tokens_per_forward:
            chunks.append(pack(current, device))
            current, tokens = [], 0
        current.append(ex)
        tokens += len(ex.input_ids)
    if current:
        chunks.append(pack(current, device))
    return chunks


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1000003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def step_batch(data: list[Tokenized], step: int, per_step: int, seed: int, rank: int, world: int) -> list[Tokenized]:
    """The sequences this rank trains on at optimizer step ``step`` (0-based): deterministic, so a
    resumed run sees exactly the data an uninterrupted one would."""
    global_per_step = per_step * world
    steps_per_epoch = max(1, len(data) // global_per_step)
    epoch, i = divmod(step, steps_per_epoch)
    order = epoch_order(len(data), seed, epoch)
    if len(order) < global_per_step:  # tiny datasets: cycle
        order = (order * math.ceil(global_per_step / len(order)))
    chunk = order[i * global_per_step:(i + 1) * global_per_step]
    return [data[j] for j in chunk[rank::world]]


# -------------------------------------------------------------------------------------- training --
def held_out_loss(model, data: list[Tokenized], cfg: SFTConfig, pad_id: int, device, accelerator) -> float:
    model.eval()
    total = torch.zeros((), device=device)
    count = torch.zeros((), device=device)
    with torch.no_grad():
        for chunk in forward_chunks(data[accelerator.process_index::accelerator.num_processes], cfg, pad_id, device):
            labels = chunk.pop("labels")
            nll, n = masked_nll_sum(model(**chunk, use_cache=False).logits, labels)
            total += nll
            count += n
    total, count = accelerator.reduce(total, "sum"), accelerator.reduce(count, "sum")
    model.train()
    return (total / count.clamp(min=1)).item()


def train(cfg: SFTConfig) -> dict:
    """Run SFT; returns the final metrics. Writes everything under ``cfg.output``."""
    from posttrain.engine.models import load_tokenizer

    output = Path(cfg.output)
    done = prepare_output(output, cfg.resume, cfg.overwrite)
    if done is not None:
        return done
    accelerator = make_accelerator()
    device, is_main = accelerator.device, accelerator.is_main_process
    ckpts = Checkpoints(output, cfg.save_total_limit)
    seed_everything(cfg.seed)

    task = make_task(cfg.task, prompt_style=cfg.prompt_style, data_dir=cfg.data_dir)
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code, padding_side="left")
    train_data, stats = tokenize_examples(task, task.examples("train", cfg.train_limit), tokenizer, cfg.max_len, cfg.truncation)
    eval_examples = task.examples("test")
    eval_data, _ = tokenize_examples(task, eval_examples[: cfg.eval_examples], tokenizer, cfg.max_len, cfg.truncation) \
        if cfg.eval_steps and cfg.eval_examples else ([], {})
    if is_main:
        print(f"data: {stats['examples']} training sequences; truncation={cfg.truncation}: "
              f"{stats['truncated']} truncated, {stats['dropped']} dropped, {stats['no_solution']} without a solution")

    model = load_policy(cfg, device)
    trainable, total = count_parameters(model)
    if is_main:
        print(f"model: {cfg.model} ({cfg.method}); trainable params {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")

    per_step = cfg.per_device_batch_size * cfg.gradient_accumulation_steps
    steps_per_epoch = max(1, len(train_data) // (per_step * accelerator.num_processes))
    total_steps = cfg.max_steps or max(1, int(round(cfg.epochs * steps_per_epoch)))
    optimizer = build_optimizer(model, cfg.learning_rate, cfg.weight_decay)
    scheduler = build_scheduler(optimizer, cfg.lr_scheduler, warmup_steps_for(total_steps, cfg.warmup_ratio, cfg.warmup_steps), total_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    Checkpoints.only_trainable(accelerator, model)

    step = 0
    latest = ckpts.latest() if cfg.resume else None
    if latest is not None:
        step = ckpts.load(accelerator, latest)["step"]
        if is_main:
            print(f"resumed from {latest} (step {step})")
    logger = MetricsLogger(output, is_main, cfg.report_to, config_dict(cfg), resume=latest is not None)
    if is_main:
        write_json(output / "sft_config.json", {**config_dict(cfg), "data_stats": stats, "total_steps": total_steps})

    pad_id = tokenizer.pad_token_id
    last: dict = {}
    bar = tqdm(total=total_steps, initial=step, desc="sft", disable=not is_main, unit="step")
    with GracefulStop() as stop:
        while step < total_steps:
            t0 = time.perf_counter()
            batch = step_batch(train_data, step, per_step, cfg.seed, accelerator.process_index, accelerator.num_processes)
            chunks = forward_chunks(batch, cfg, pad_id, device)
            n_tokens = torch.tensor(sum(sum(1 for t in ex.labels[1:] if t != IGNORE_INDEX) for ex in batch), device=device)
            global_tokens = accelerator.reduce(n_tokens.clone(), "sum").clamp(min=1)
            loss_sum = torch.zeros((), device=device)
            for k, chunk in enumerate(chunks):
                labels = chunk.pop("labels")
                # Gradients are all-reduced only after the last chunk of the step.
                sync = accelerator.no_sync(model) if k < len(chunks) - 1 else contextlib.nullcontext()
                with sync, accelerator.autocast():
                    nll, _ = masked_nll_sum(model(**chunk, use_cache=False).logits, labels)
                    # DDP averages gradients over ranks; scale so the step's loss is sum/global_tokens.
                    loss = nll * accelerator.num_processes / global_tokens
                accelerator.backward(loss)
                loss_sum += nll.detach()
            step_loss = (accelerator.reduce(loss_sum, "sum") / global_tokens).item()
            if not math.isfinite(step_loss):
                optimizer.zero_grad(set_to_none=True)
                kept = ckpts.latest()
                raise PosttrainError(f"loss became {step_loss} at step {step + 1}; stopped without saving. "
                                     f"Last good checkpoint: {kept or 'none'}. Lower --learning-rate or check the data")
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            dt = time.perf_counter() - t0
            seq_tokens = sum(len(ex.input_ids) for ex in batch) * accelerator.num_processes
            metrics = {"loss": step_loss, "lr": scheduler.get_last_lr()[0], "epoch": step / steps_per_epoch,
                       "tokens_per_s": seq_tokens / dt, "response_tokens": int(global_tokens.item()),
                       "step_time_s": dt}
            if grad_norm is not None:
                metrics["grad_norm"] = float(grad_norm)
            if cfg.eval_steps and (step % cfg.eval_steps == 0 or step == total_steps):
                if eval_data:
                    metrics["eval_loss"] = held_out_loss(model, eval_data, cfg, pad_id, device, accelerator)
                if cfg.eval_accuracy_samples:
                    metrics.update(accuracy_eval(model, tokenizer, task, eval_examples[: cfg.eval_accuracy_samples],
                                                 cfg.eval_max_new_tokens, accelerator))
            if step % cfg.logging_steps == 0 or "eval_loss" in metrics or step == total_steps:
                logger.log(step, metrics)
            last = metrics
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{metrics['lr']:.2e}")
            if (cfg.save_steps and step % cfg.save_steps == 0) or stop.requested:
                ckpts.save(accelerator, step, {"step": step, "total_steps": total_steps})
            if stop.requested:
                bar.close()
                logger.close()
                raise PosttrainError(f"stopped at step {step}; checkpoint saved. Continue with --resume --output {output}")
    bar.close()
    logger.close()
    save_final_model(model, tokenizer, output, accelerator, extra={"stage": "sft", "method": cfg.method, "base_model": cfg.model})
    final = {"finished": True, "step": step, **{k: v for k, v in last.items() if isinstance(v, (int, float))}}
    if is_main:
        write_json(output / "run_state.json", final)
    if cfg.push_to_hub and is_main:
        push_folder(output, cfg.push_to_hub)
    return final
