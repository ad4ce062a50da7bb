"""RL from verifiable rewards: sample → reward → advantage → policy update, top to bottom.

One loop serves three algorithms (registered in ``ALGORITHMS``):

* ``reinforce`` (seed 000): one sample per prompt, baseline = mean reward of the micro-batch, optional
  unit-variance scaling, loss = −Σ_t log π(a_t)·A summed per sequence, KL (k1) to the frozen reference.
* ``grpo`` (seed 003): G samples per prompt, advantages normalised within each group, clipped ratio
  when a rollout batch is reused for ``num_iterations`` updates, loss aggregation ``grpo``/``dr_grpo``/``dapo``.
* ``rloo``: G samples per prompt, leave-one-out baseline.

With LoRA the reference policy is the same base model with the adapter switched off: no second copy
of the weights. Rollouts are sharded by rank; group statistics never cross ranks because whole groups
live on one rank.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from posttrain.config import require
from posttrain.errors import PosttrainError
from posttrain.losses.policy import ADVANTAGES, AGGREGATIONS, KL_ESTIMATORS, policy_loss, token_logprobs
from posttrain.tasks import Task, make_task
from posttrain.tasks.rewards import compute_rewards, parse_reward
from posttrain.trainers.common import (Checkpoints, TrainerOptions, GracefulStop, MetricsLogger, accuracy_eval, build_optimizer,
                                       build_scheduler, config_dict, count_parameters, load_policy, make_accelerator,
                                       prepare_output, push_folder, save_final_model, warmup_steps_for)
from posttrain.utils import seed_everything, write_json

# algorithm -> how advantages are computed and which group they are computed over
ALGORITHMS = {
    "reinforce": {"advantage": "batch_mean", "group": "micro_batch", "aggregation": "seq_sum", "kl_estimator": "k1"},
    "grpo": {"advantage": "group", "group": "prompt", "aggregation": None, "kl_estimator": None},
    "rloo": {"advantage": "leave_one_out", "group": "prompt", "aggregation": None, "kl_estimator": None},
}


@dataclass
class RLConfig(TrainerOptions):
    # -- what to train
    ref_model: str | None = None
    """Reference policy for the KL penalty; default: the starting policy (with LoRA, the adapter switched off)."""
    algo: str = "grpo"
    """reinforce, grpo or rloo."""
    reward: list[str] = field(default_factory=lambda: ["correctness"])
    """Reward functions NAME[:WEIGHT] or path/file.py:function[:WEIGHT] (repeatable)."""
    output: str = "runs/rl"
    """Output folder."""
    # -- rollouts
    num_generations: int = 4
    """Samples per prompt (GRPO/RLOO group size G; REINFORCE uses 1 unless set higher)."""
    temperature: float = 0.7
    """Sampling temperature for rollouts."""
    top_p: float = 0.9
    """Nucleus sampling threshold for rollouts."""
    max_new_tokens: int = 300
    """Completion length limit."""
    mask_truncated_completions: bool = False
    """Exclude completions that hit max_new_tokens from the loss."""
    engine: str = "auto"
    """Rollout engine: fast, hf or auto."""
    rollout_batch_size: int = 64
    """Sequences generated together."""
    # -- optimisation
    max_steps: int = 100
    """Optimizer steps."""
    num_iterations: int = 1
    """Updates per rollout batch (>1 reuses rollouts with the clipped importance ratio)."""
    learning_rate: float = 1e-5
    """Peak learning rate."""
    lr_scheduler: str = "constant_with_warmup"
    """cosine, linear, constant or constant_with_warmup."""
    warmup_ratio: float = 0.0
    """Share of steps spent warming up."""
    beta: float = 0.04
    """KL coefficient β (0 disables the KL term and the reference forward)."""
    kl_estimator: str | None = None
    """k1 or k3; default k1 for reinforce (the seed) and k3 for grpo/rloo."""
    loss_type: str = "grpo"
    """Loss aggregation for grpo/rloo: grpo (per sequence), dr_grpo (constant normaliser) or dapo (per token)."""
    scale_rewards: bool = True
    """Divide advantages by the group (or batch) std."""
    drop_zero_advantage: bool = False
    """Leave completions whose advantage is exactly 0 (groups where every sample got the same reward)
    out of the update. With beta = 0 they add nothing to the gradient, only compute; the loss is
    then averaged over the completions that carry signal. Ignored when beta > 0 (the KL term needs them)."""
    epsilon_low: float = 0.2
    """Lower clip range ε_low of the importance ratio."""
    epsilon_high: float = 0.2
    """Upper clip range ε_high (DAPO raises it, e.g. 0.28)."""
    max_bad_steps: int = 3
    """Stop after this many consecutive steps with NaN/inf loss (each is skipped)."""
    # -- runtime
    eval_steps: int = 50
    """Evaluate accuracy on held-out problems every N steps (0 disables)."""
    eval_samples: int = 64
    """Held-out problems per evaluation."""
    save_steps: int = 100
    """Checkpoint every N steps (0 disables)."""

    def __post_init__(self):
        if self.algo not in ALGORITHMS:
            raise PosttrainError(f"unknown --algo {self.algo!r}; choose one of {', '.join(ALGORITHMS)}")
        if self.loss_type not in AGGREGATIONS or self.loss_type == "seq_sum":
            raise PosttrainError(f"unknown --loss-type {self.loss_type!r}; choose grpo, dr_grpo or dapo")
        if self.kl_estimator is not None and self.kl_estimator not in KL_ESTIMATORS:
            raise PosttrainError(f"unknown --kl-estimator {self.kl_estimator!r}; choose k1 or k3")
        if self.algo in ("grpo", "rloo") and self.num_generations < 2:
            raise PosttrainError(f"--algo {self.algo} compares samples within a group: set --num-generations >= 2")
        rows = self.per_device_batch_size * self.gradient_accumulation_steps
        if rows % self.num_generations:
            raise PosttrainError(f"completions per step per device ({rows}) must be a multiple of "
                                 f"--num-generations ({self.num_generations}) so whole groups stay on one device")
        self._check_common()
        require(self, {"max_steps": self.max_steps >= 1, "num_iterations": self.num_iterations >= 1,
                  "learning_rate": self.learning_rate > 0, "beta": self.beta >= 0, "temperature": self.temperature > 0,
                  "max_new_tokens": self.max_new_tokens >= 1}, "rl")
        if not self.reward:
            raise PosttrainError("give at least one --reward")

    @property
    def spec(self) -> dict:
        """The algorithm's settings with the config's choices filled in."""
        s = dict(ALGORITHMS[self.algo])
        s["aggregation"] = s["aggregation"] or self.loss_type
        s["kl_estimator"] = self.kl_estimator or s["kl_estimator"] or "k3"
        return s


# ------------------------------------------------------------------------------------- rollouts --
@dataclass
class Rollout:
    """One optimizer step's worth of completions on this rank, as right-padded tensors."""

    input_ids: torch.Tensor  # [N, L] prompt + completion, right-padded
    attention_mask: torch.Tensor  # [N, L]
    completion_mask: torch.Tensor  # [N, L-1] 1 where position t+1 is a generated token that counts
    advantages: torch.Tensor  # [N]
    rewards: torch.Tensor  # [N]
    old_logp: torch.Tensor | None = None  # [N, L-1]
    ref_logp: torch.Tensor | None = None  # [N, L-1]


def prompts_for_step(n_prompts: int, step: int, per_step: int, seed: int, rank: int, world: int) -> list[int]:
    """Prompt indices for this rank at rollout ``step``: a fresh permutation each epoch (sampling
    without replacement), sharded by rank. Deterministic, so resumed runs see the same prompts."""
    global_per_step = per_step * world
    steps_per_epoch = max(1, n_prompts // global_per_step)
    epoch, i = divmod(step, steps_per_epoch)
    order = torch.randperm(n_prompts, generator=torch.Generator().manual_seed(seed * 7919 + epoch)).tolist()
    if len(order) < global_per_step:
        order = order * math.ceil(global_per_step / len(order))
    return order[i * global_per_step:(i + 1) * global_per_step][rank::world]


def build_rollout(prompt_ids: list[list[int]], completions, pad_id: int, mask_truncated: bool, device) -> tuple:
    """Right-padded prompt+completion rows and a mask over the generated tokens (up to and including
    EOS; never prompt or padding). Position t of the mask scores the token at t + 1."""
    rows = [p + c.token_ids for p, c in zip(prompt_ids, completions)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    cmask = torch.zeros((len(rows), width - 1), dtype=torch.float32)
    for i, (p, c) in enumerate(zip(prompt_ids, completions)):
        n = len(p) + len(c.token_ids)
        ids[i, :n] = torch.tensor(p + c.token_ids)
        attn[i, :n] = 1
        if not (mask_truncated and c.finish_reason == "length"):
            cmask[i, len(p) - 1:n - 1] = 1.0
    return ids.to(device), attn.to(device), cmask.to(device)


def sequence_logprobs(model, input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob and entropy of every next token: ([N, L-1], [N, L-1])."""
    pos = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos, use_cache=False).logits
    return token_logprobs(logits[:, :-1], input_ids[:, 1:])


def compute_advantages(rewards: torch.Tensor, cfg: RLConfig) -> torch.Tensor:
    """Group rewards as the algorithm asks ([groups, size]) and apply its advantage function."""
    spec = cfg.spec
    size = min(cfg.per_device_batch_size if spec["group"] == "micro_batch" else cfg.num_generations, rewards.numel())
    usable = rewards.numel() - rewards.numel() % size
    adv = torch.zeros_like(rewards)
    adv[:usable] = ADVANTAGES[spec["advantage"]](rewards[:usable].view(-1, size), cfg.scale_rewards).reshape(-1)
    return adv


# -------------------------------------------------------------------------------------- training --
def train(cfg: RLConfig) -> dict:
    """Run RL; returns the final metrics. Writes everything under ``cfg.output``."""
    from posttrain.engine import SamplingParams, make_engine
    from posttrain.engine.models import load_tokenizer

    output = Path(cfg.output)
    done = prepare_output(output, cfg.resume, cfg.overwrite)
    if done is not None:
        return done
    accelerator = make_accelerator()
    device, is_main, rank, world = accelerator.device, accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    seed_everything(cfg.seed + rank)
    spec = cfg.spec

    # -- data, rewards, models
    task: Task = make_task(cfg.task, prompt_style=cfg.prompt_style, data_dir=cfg.data_dir)
    train_examples = task.examples("train", cfg.train_limit)
    eval_examples = task.examples("test")[: cfg.eval_samples] if cfg.eval_steps and cfg.eval_samples else []
    rewards_fns = [parse_reward(r) for r in cfg.reward]
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    # Rendered once: reward functions get the prompt text, the engine its token ids.
    prompt_texts_all = [task.prompt_text(ex, tokenizer) for ex in train_examples]
    prompt_ids_all = [task.encode_text(text, tokenizer) for text in prompt_texts_all]
    chat = task.template.style == "chat"
    model = load_policy(cfg, device)
    is_peft = cfg.method in ("lora", "qlora")
    ref_model = None
    if cfg.beta > 0 and (cfg.ref_model or not is_peft):
        ref_model = _load_reference(cfg, tokenizer, device)
    trainable, total = count_parameters(model)
    if is_main:
        print(f"rl: {cfg.algo} on {cfg.model} ({cfg.method}, {trainable:,}/{total:,} trainable); "
              f"rewards {', '.join(f'{r.name}×{r.weight:g}' for r in rewards_fns)}; {len(train_examples)} prompts")

    rows_per_step = cfg.per_device_batch_size * cfg.gradient_accumulation_steps  # completions per rank per step
    prompts_per_step = rows_per_step // cfg.num_generations
    total_steps = cfg.max_steps
    optimizer = build_optimizer(model, cfg.learning_rate, cfg.weight_decay)
    scheduler = build_scheduler(optimizer, cfg.lr_scheduler, warmup_steps_for(total_steps, cfg.warmup_ratio, cfg.warmup_steps), total_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    Checkpoints.only_trainable(accelerator, model)
    ckpts = Checkpoints(output, cfg.save_total_limit)
    step = 0
    latest = ckpts.latest() if cfg.resume else None
    if latest is not None:
        step = ckpts.load(accelerator, latest)["step"]
        if is_main:
            print(f"resumed from {latest} (step {step})")
    logger = MetricsLogger(output, is_main, cfg.report_to, config_dict(cfg), resume=latest is not None)
    if is_main:
        write_json(output / "rl_config.json", {**config_dict(cfg), "resolved": spec})
    policy = accelerator.unwrap_model(model)
    engine = make_engine(cfg.engine, policy, tokenizer, cfg.rollout_batch_size)
    params = SamplingParams(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.num_generations, task.stop_strings)
    pad_id = tokenizer.pad_token_id

    bad_in_a_row, zero_adv_batches, last = 0, 0, {}
    bar = tqdm(total=total_steps, initial=step, desc=f"rl[{cfg.algo}]", disable=not is_main, unit="step")
    with GracefulStop() as stop:
        rollout_index = step // cfg.num_iterations
        while step < total_steps:
            # ---- 1. sample: this rank's prompts, G completions each, from the current policy
            t0 = time.perf_counter()
            idx = prompts_for_step(len(train_examples), rollout_index, prompts_per_step, cfg.seed, rank, world)
            params.seed = cfg.seed + 1_000_003 * rollout_index + rank
            policy.eval()  # the fast engine refreshes its merged inference weights from the policy at each call
            completions = engine.generate([prompt_ids_all[i] for i in idx], params)
            policy.train()
            rollout_time = time.perf_counter() - t0
            exs = [train_examples[i] for i in idx for _ in range(cfg.num_generations)]
            prompt_ids = [prompt_ids_all[i] for i in idx for _ in range(cfg.num_generations)]

            # ---- 2. reward: every reward function on every completion
            texts = [c.text for c in completions]
            comp_arg = [[{"role": "assistant", "content": t}] for t in texts] if chat else texts
            total_r, per_fn = compute_rewards(
                rewards_fns, prompts=[prompt_texts_all[i] for i in idx for _ in range(cfg.num_generations)], completions=comp_arg,
                answer=[e.response or f"#### {e.numeric_answer}" for e in exs],
                numeric_answer=[e.numeric_answer for e in exs], completion_lengths=[len(c.token_ids) for c in completions],
                completion_ids=[c.token_ids for c in completions])
            rewards = torch.tensor(total_r, dtype=torch.float32, device=device)

            # ---- 3. advantage: within groups (never across ranks: whole groups live here)
            advantages = compute_advantages(rewards, cfg)
            size = cfg.num_generations if cfg.num_generations > 1 else min(cfg.per_device_batch_size, len(rewards))
            groups = rewards[: len(rewards) - len(rewards) % size].view(-1, size)
            all_equal = (groups.max(1).values - groups.min(1).values == 0).float().mean()
            if torch.all(advantages == 0):
                zero_adv_batches += 1
            used = list(range(len(completions)))
            if cfg.drop_zero_advantage and cfg.beta == 0:
                # At least one row stays, so every rank runs a backward (DDP all-reduces in it).
                used = (advantages != 0).nonzero()[:, 0].tolist() or [0]
            ids, attn, cmask = build_rollout([prompt_ids[i] for i in used], [completions[i] for i in used], pad_id,
                                             cfg.mask_truncated_completions, device)
            ro = Rollout(ids, attn, cmask, advantages[used], rewards[used])
            mb = cfg.per_device_batch_size
            with torch.no_grad():
                if cfg.num_iterations > 1:
                    ro.old_logp = torch.cat([sequence_logprobs(model, ids[i:i + mb], attn[i:i + mb])[0] for i in range(0, len(ids), mb)])
                if cfg.beta > 0:
                    ro.ref_logp = torch.cat([_reference_logprobs(model, ref_model, ids[i:i + mb], attn[i:i + mb], accelerator)
                                             for i in range(0, len(ids), mb)])

            # ---- 4. update: num_iterations optimizer steps on this rollout
            for _ in range(cfg.num_iterations):
                if step >= total_steps:
                    break
                t1 = time.perf_counter()
                sums: dict[str, float] = {}
                n_mb = math.ceil(len(ids) / mb)
                finite = True
                for k, i in enumerate(range(0, len(ids), mb)):
                    sl = slice(i, i + mb)
                    sync = accelerator.no_sync(model) if k < n_mb - 1 else contextlib.nullcontext()
                    with sync, accelerator.autocast():
                        logp, entropy = sequence_logprobs(model, ids[sl], attn[sl])
                        old = ro.old_logp[sl] if ro.old_logp is not None else logp.detach()
                        loss, m = policy_loss(
                            logp, old, ro.advantages[sl], cmask[sl], ref_logp=ro.ref_logp[sl] if ro.ref_logp is not None else None,
                            beta=cfg.beta, kl_estimator=spec["kl_estimator"], eps_low=cfg.epsilon_low,
                            eps_high=cfg.epsilon_high, aggregation=spec["aggregation"], max_len=cfg.max_new_tokens)
                        loss = loss / n_mb
                    if not torch.isfinite(loss):
                        finite = False
                        break
                    accelerator.backward(loss)
                    m["entropy"] = (entropy.detach() * cmask[sl]).sum() / cmask[sl].sum().clamp(min=1)
                    for key, v in m.items():
                        sums[key] = sums.get(key, 0.0) + float(v) / n_mb
                finite_all = accelerator.reduce(torch.tensor(float(finite), device=device), "min").item() > 0
                if not finite_all:
                    optimizer.zero_grad(set_to_none=True)
                    bad_in_a_row += 1
                    print(f"warning: non-finite loss at step {step + 1}; step skipped ({bad_in_a_row} in a row)")
                    if bad_in_a_row >= cfg.max_bad_steps:
                        raise PosttrainError(f"{bad_in_a_row} steps in a row had NaN/inf loss; stopped. "
                                             f"Last good checkpoint: {ckpts.latest() or 'none'}. Lower --learning-rate")
                    continue
                bad_in_a_row = 0
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                train_time = time.perf_counter() - t1

                # ---- 5. metrics, evaluation, checkpoints
                lengths = torch.tensor([len(c.token_ids) for c in completions], dtype=torch.float32)
                gen_tokens = float(lengths.sum())
                metrics = {
                    **sums,
                    "reward_mean": rewards.mean().item(), "reward_std": rewards.std().item() if len(rewards) > 1 else 0.0,
                    **{f"reward/{name}": sum(v) / len(v) for name, v in per_fn.items()},
                    "accuracy": sum(task.grade(t, e).correct for t, e in zip(texts, exs)) / len(texts),
                    "frac_groups_all_equal": all_equal.item(), "zero_advantage_batches": zero_adv_batches,
                    "completion_len_mean": lengths.mean().item(), "completion_len_max": lengths.max().item(),
                    "truncation_rate": sum(c.finish_reason == "length" for c in completions) / len(completions),
                    "trained_completions": len(used),
                    "rollout_tokens_per_s": gen_tokens * world / max(rollout_time, 1e-9),
                    "train_tokens_per_s": int(attn.sum().item()) * world / max(train_time, 1e-9),
                    "lr": scheduler.get_last_lr()[0],
                }
                if grad_norm is not None:
                    metrics["grad_norm"] = float(grad_norm)
                if eval_examples and (step % cfg.eval_steps == 0 or step == total_steps):
                    acc = accuracy_eval(model, tokenizer, task, eval_examples, cfg.max_new_tokens, accelerator)
                    metrics.update(acc)
                if step % cfg.logging_steps == 0 or step == total_steps or "eval_accuracy" in metrics:
                    logger.log(step, metrics)
                last = metrics
                bar.update(1)
                bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", acc=f"{metrics['accuracy']:.2f}")
                if (cfg.save_steps and step % cfg.save_steps == 0) or stop.requested:
                    ckpts.save(accelerator, step, {"step": step, "total_steps": total_steps})
                if stop.requested:
                    bar.close()
                    logger.close()
                    raise PosttrainError(f"stopped at step {step}; checkpoint saved. Continue with --resume --output {output}")
            rollout_index += 1
    bar.close()
    logger.close()
    save_final_model(model, tokenizer, output, accelerator, extra={"stage": "rl", "algo": cfg.algo, "base_model": cfg.model})
    final = {"finished": True, "step": step, **{k: v for k, v in last.items() if isinstance(v, (int, float))}}
    if is_main:
        write_json(output / "run_state.json", final)
    if cfg.push_to_hub and is_main:
        push_folder(output, cfg.push_to_hub)
    return final


def _load_reference(cfg: RLConfig, tokenizer, device):
    """A frozen reference model (full fine-tuning, or an explicit --ref-model)."""
    from posttrain.engine.models import load_model, load_tokenizer

    name = cfg.ref_model or cfg.model
    ref_tok = load_tokenizer(name, cfg.trust_remote_code)
    if ref_tok.get_vocab() != tokenizer.get_vocab():
        raise PosttrainError(f"reference model {name!r} uses a different tokenizer than the policy {cfg.model!r}; "
                             "the KL penalty compares token log-probs, so they must share one")
    ref = load_model(name, cfg.dtype, str(device), cfg.trust_remote_code)
    ref.requires_grad_(False)
    return ref


@torch.no_grad()
def _reference_logprobs(model, ref_model, ids, attn, accelerator) -> torch.Tensor:
    """Reference log-probs: the explicit reference model, or the policy with its LoRA adapter off."""
    if ref_model is not None:
        return sequence_logprobs(ref_model, ids, attn)[0]
    unwrapped = accelerator.unwrap_model(model)
    with unwrapped.disable_adapter():
        return sequence_logprobs(model, ids, attn)[0]
