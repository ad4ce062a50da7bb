"""Supervised fine-tuning with a prompt-masked loss (seed 000, part 4), top to bottom.

Each example is prompt + response + EOS; only response tokens count in the loss. Sequences are
packed padding-free: one row per forward, position ids restarting at every sequence, so attention
stays within each sequence and no compute is spent on padding. An optimizer step sees
``per_device_batch_size × gradient_accumulation_steps × world_size`` sequences, as in the seed, and
normalises the loss by the step's total response tokens.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from functools import partial

import torch

from posttrain.config import require
from posttrain.engine.models import sdpa_backends
from posttrain.errors import PosttrainError
from posttrain.evaluation import accuracy_eval
from posttrain.losses.sft import IGNORE_INDEX, masked_nll_sum
from posttrain.tasks import Task, make_task
from posttrain.trainers.data import data_splits, epoch_indices
from posttrain.trainers.run import TrainingRun
from posttrain.trainers.setup import TrainerOptions, build_optimizer, build_scheduler, count_parameters, load_policy, warmup_steps_for, warn_rounded_away
from posttrain.utils import round_up, seed_everything

TRUNCATION = ("prompt_left", "drop", "left")


@dataclass(kw_only=True)
class SFTConfig(TrainerOptions):
    # Options declared in TrainerOptions or RunOptions appear below only to set SFT's default (and, with a
    # docstring, SFT's wording of them).
    # -- what to train
    output: str = "runs/sft"
    """Output folder: adapter or model, metrics.jsonl, tensorboard/, checkpoints/."""
    # -- optimisation
    epochs: float = 2.0
    """Passes over the training data (ignored when max_steps is set)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps."""
    learning_rate: float = 2e-4
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    """Share of steps spent warming up (the seed's 3%)."""
    # -- data shaping
    max_len: int = 400
    """Longest sequence (prompt + response + EOS) in tokens (the seed's 400)."""
    truncation: str = "prompt_left"
    """Too-long examples: prompt_left (cut the prompt's start, keep the whole answer; drop if the answer
    alone is too long), drop, or left (the seed: cut the sequence's start)."""
    packing: bool = True
    """Pack sequences padding-free into one row per forward; off = padded micro-batches grouped by length."""
    max_tokens_per_forward: int = 8192
    """Token budget of one packed forward pass."""
    # -- runtime
    eval_steps: int = 25
    """Evaluate every N steps (0 disables); the seed's 25."""
    eval_examples: int = 100
    """Held-out examples for the evaluation loss (the seed's 100; test split, or validation_size's set)."""
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
            "eval_examples": self.eval_examples >= 0,
            "eval_accuracy_samples": self.eval_accuracy_samples >= 0,
            "eval_max_new_tokens": self.eval_max_new_tokens >= 1,
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
    kept = []
    for ex in examples:
        if not ex.response:
            stats["no_solution"] += 1
            continue
        kept.append(ex)
    if not kept:
        raise PosttrainError(f"task {task.name!r} has no training examples with worked solutions")
    target_ids = task.encode_targets(kept, tokenizer)
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
    width = round_up(max(len(ex.input_ids) for ex in batch), multiple_of)
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


def step_batch(data: list[Tokenized], step: int, per_step: int, seed: int, rank: int, world: int) -> list[Tokenized]:
    """The sequences this rank trains on at optimizer step ``step`` (0-based; see ``epoch_indices``)."""
    return [data[j] for j in epoch_indices(len(data), step, per_step, seed * 1000003, rank, world)]


# -------------------------------------------------------------------------------------- training --
def held_out_loss(model, data: list[Tokenized], cfg: SFTConfig, pad_id: int, device, accelerator) -> float:
    model.eval()
    total = torch.zeros((), device=device)
    count = torch.zeros((), device=device)
    with torch.no_grad(), sdpa_backends():
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
    from posttrain.engine import make_engine
    from posttrain.engine.models import load_tokenizer

    run = TrainingRun(cfg, "sft")
    if run.done is not None:
        return run.done
    seed_everything(cfg.seed)
    acc, device = run.accelerator, run.device

    # -- data, model, optimizer
    task = make_task(cfg.task, prompt_style=cfg.prompt_style, data_dir=cfg.data_dir)
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code, padding_side="left")
    train_examples, eval_examples = data_splits(task, cfg)
    train_data, stats = tokenize_examples(task, train_examples, tokenizer, cfg.max_len, cfg.truncation)
    eval_data, _ = tokenize_examples(task, eval_examples[: cfg.eval_examples], tokenizer, cfg.max_len, cfg.truncation) \
        if cfg.eval_steps and cfg.eval_examples else ([], {})
    run.log(f"data: {stats['examples']} training sequences; truncation={cfg.truncation}: "
            f"{stats['truncated']} truncated, {stats['dropped']} dropped, {stats['no_solution']} without a solution")
    model = load_policy(cfg, device)
    trainable, total = count_parameters(model)
    run.log(f"model: {cfg.model} ({cfg.method}); trainable params {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")
    per_step = cfg.per_device_batch_size * cfg.gradient_accumulation_steps
    steps_per_epoch = max(1, len(train_data) // (per_step * run.world))
    total_steps = cfg.max_steps or max(1, int(round(cfg.epochs * steps_per_epoch)))
    optimizer = build_optimizer(model, cfg.learning_rate, cfg.weight_decay)
    warn_rounded_away(model, cfg.learning_rate, run.log)
    warmup = warmup_steps_for(total_steps, cfg.warmup_ratio, cfg.warmup_steps)
    scheduler = build_scheduler(optimizer, cfg.lr_scheduler, warmup, total_steps)
    model, optimizer, scheduler = run.prepare(model, optimizer, scheduler, total_steps, {"data_stats": stats, "total_steps": total_steps})
    engine = None  # built at the first accuracy evaluation, then kept for the run

    def evaluate() -> dict:
        nonlocal engine
        out = {}
        if eval_data:
            out["eval_loss"] = held_out_loss(model, eval_data, cfg, tokenizer.pad_token_id, device, acc)
        if cfg.eval_accuracy_samples:
            policy = acc.unwrap_model(model)
            engine = engine or make_engine(cfg.engine, policy, tokenizer, batch_size=cfg.eval_batch_size,
                                                  quantized_rollouts=cfg.quantized_rollouts)
            engine.sync_weights(policy)
            out.update(accuracy_eval(engine, tokenizer, task, eval_examples[: cfg.eval_accuracy_samples], cfg.eval_max_new_tokens, acc))
            engine.release()  # a transient copy of a 4-bit base makes room for training again
        return out

    while run.running():
        t0 = time.perf_counter()
        batch = step_batch(train_data, run.step, per_step, cfg.seed, run.rank, run.world)
        # The step's loss is the sum of its response tokens' NLL over the token count of the whole step
        # (all chunks, all ranks): the gradient does not depend on how the step is split.
        n_tokens = torch.tensor(sum(sum(1 for t in ex.labels[1:] if t != IGNORE_INDEX) for ex in batch), device=device)
        global_tokens = acc.reduce(n_tokens.clone(), "sum").clamp(min=1)
        chunks = forward_chunks(batch, cfg, tokenizer.pad_token_id, device)
        loss_sum = torch.zeros((), device=device)
        for k, chunk in enumerate(chunks):
            labels = chunk.pop("labels")
            sync = acc.no_sync(model) if k < len(chunks) - 1 else contextlib.nullcontext()  # all-reduce after the last
            with sync, acc.autocast(), sdpa_backends():  # not cuDNN's: Qwen2.5's SFT went NaN on it (H200)
                nll, _ = masked_nll_sum(model(**chunk, use_cache=False).logits, labels)
            with sdpa_backends():  # gradient checkpointing runs a layer's forward again here: the forward's attention kernels
                acc.backward(nll * run.world / global_tokens)  # DDP averages over ranks; the shares add up over them
            loss_sum += nll.detach()
        step_loss = (acc.reduce(loss_sum, "sum") / global_tokens).item()
        run.optimizer_step(math.isfinite(step_loss),
                           partial(step_metrics, step_loss, batch, global_tokens, run.world, (run.step + 1) / steps_per_epoch, t0),
                           evaluate, progress)
    return run.save_and_close(model, tokenizer, {"method": cfg.method})


def step_metrics(loss: float, batch: list[Tokenized], response_tokens: torch.Tensor, world: int, epoch: float, started: float) -> dict:
    """What a step logs: its loss, the epoch it reached, tokens and speed (from ``started`` to now: the
    optimizer step has just been taken)."""
    dt = time.perf_counter() - started
    tokens = sum(len(ex.input_ids) for ex in batch) * world
    return {"loss": loss, "epoch": epoch, "tokens": tokens, "tokens_per_s": tokens / dt,
            "response_tokens": int(response_tokens.item()), "step_time_s": dt}


def progress(metrics: dict) -> dict:
    """The progress bar's figures for a step."""
    return {"loss": f"{metrics['loss']:.4f}", "lr": f"{metrics['lr']:.2e}"}
