"""RL from verifiable rewards: sample → reward → advantage → policy update, top to bottom.

One loop serves three algorithms (registered in ``ALGORITHMS``):

* ``reinforce`` (seed 000): one sample per prompt, baseline = mean reward of a group of
  ``baseline_group_size`` completions, optional unit-variance scaling, loss = −Σ_t log π(a_t)·A summed
  per sequence, KL (k1) to the frozen reference.
* ``grpo`` (seed 003): G samples per prompt, advantages normalised within each group, clipped ratio
  when a rollout batch is reused for ``num_iterations`` updates, loss aggregation ``grpo``/``dapo``/
  ``dr_grpo`` (normalised over the whole optimizer step: the gradient does not depend on how the step
  is split into micro-batches or ranks) or ``bnpo``.
* ``rloo``: G samples per prompt, leave-one-out baseline.

With LoRA the reference policy is the same base model with the adapter switched off: no second copy
of the weights. Rollouts are sharded by rank; group statistics never cross ranks because whole groups
live on one rank.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F

from posttrain.config import require
from posttrain.engine.models import sdpa_backends
from posttrain.errors import PosttrainError
from posttrain.evaluation import accuracy_eval
from posttrain.losses.policy import (
    ADVANTAGES,
    AGGREGATIONS,
    KL_ESTIMATORS,
    SPLIT_INVARIANT,
    StepSize,
    agg_token_mean,
    policy_loss,
)
from posttrain.tasks import make_task
from posttrain.tasks.rewards import compute_rewards, parse_reward
from posttrain.trainers.data import data_splits, epoch_indices
from posttrain.trainers.logprobs import reference_logprobs, sequence_logprobs
from posttrain.trainers.run import TrainingRun
from posttrain.trainers.setup import (
    TrainerOptions,
    build_optimizer,
    build_scheduler,
    count_parameters,
    load_policy,
    load_reference,
    warmup_steps_for,
    warn_rounded_away,
)
from posttrain.utils import padded_chunks, round_up, seed_everything

# algorithm -> how advantages are computed and which group they are computed over
ALGORITHMS = {
    "reinforce": {"advantage": "batch_mean", "group": "batch", "aggregation": "seq_sum", "kl_estimator": "k1"},
    "grpo": {"advantage": "group", "group": "prompt", "aggregation": None, "kl_estimator": None},
    "rloo": {"advantage": "leave_one_out", "group": "prompt", "aggregation": None, "kl_estimator": None},
}


@dataclass(kw_only=True)
class RLConfig(TrainerOptions):
    # Options declared in TrainerOptions or RunOptions appear below only to set RL's default (and, with a
    # docstring, RL's wording of them).
    # -- what to train
    ref_model: str | None = None
    """Reference policy for the KL penalty; default: the starting policy (with LoRA, the adapter switched off)."""
    algo: str = "grpo"
    """reinforce, grpo or rloo."""
    reward: list[str] = field(default_factory=lambda: ["correctness"])
    """Reward functions NAME[:WEIGHT] (correctness, strict_correctness, strict_format, xml_count, int_answer,
    length, random) or path/file.py:function[:WEIGHT] (repeatable). A file.py is imported and run by
    posttrain: name only files you trust."""
    answers_only: bool = False
    """Train on the problems' final answers alone: worked solutions are dropped before anything (reward
    functions included) sees them, as with data that has answers but no solutions."""
    output: str = "runs/rl"
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
    rollout_batch_size: int = 64
    """Sequences generated together."""
    # -- optimisation
    max_steps: int = 100
    num_iterations: int = 1
    """Updates per rollout batch (>1 reuses rollouts with the clipped importance ratio)."""
    learning_rate: float = 1e-5
    lr_scheduler: str = "constant_with_warmup"
    warmup_ratio: float = 0.0
    beta: float = 0.04
    """KL coefficient β (0 disables the KL term and the reference forward)."""
    kl_estimator: str | None = None
    """k1 or k3; default k1 for reinforce (the seed) and k3 for grpo/rloo."""
    loss_type: str = "grpo"
    """Loss aggregation for grpo/rloo, over the whole optimizer step: grpo (mean per sequence, then over
    sequences), dapo (mean over every token of the step), dr_grpo (sum over a constant) or bnpo (TRL's:
    mean over each micro-batch's tokens; the only one that changes with --per-device-batch-size)."""
    baseline_group_size: int | None = None
    """REINFORCE: each completion's baseline is the mean reward of its group of this many consecutive
    completions (seed 000: 4, its micro-batch); default: all of this rank's completions of the step."""
    update_max_tokens: int | None = None
    """Most tokens (rows × longest row) one forward of the update holds: a micro-batch of
    --per-device-batch-size rows that would hold more is run as smaller consecutive pieces. The loss and
    its gradient stay the same (each piece's loss is its share of the whole step's; not with bnpo,
    which is defined per micro-batch), only the update's activation memory falls, at a few more
    forwards (the no-grad log-prob forwards keep whole micro-batches). Default: whole micro-batches."""
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
    # -- runtime
    eval_steps: int = 50
    eval_samples: int = 64
    """Held-out problems per evaluation."""
    save_steps: int = 100

    def __post_init__(self):
        if self.algo not in ALGORITHMS:
            raise PosttrainError(f"unknown --algo {self.algo!r}; choose one of {', '.join(ALGORITHMS)}")
        if self.loss_type not in AGGREGATIONS or self.loss_type == "seq_sum":
            raise PosttrainError(f"unknown --loss-type {self.loss_type!r}; choose grpo, dapo, dr_grpo or bnpo")
        if self.kl_estimator is not None and self.kl_estimator not in KL_ESTIMATORS:
            raise PosttrainError(f"unknown --kl-estimator {self.kl_estimator!r}; choose k1 or k3")
        if self.algo in ("grpo", "rloo") and self.num_generations < 2:
            raise PosttrainError(f"--algo {self.algo} compares samples within a group: set --num-generations >= 2")
        rows = self.per_device_batch_size * self.gradient_accumulation_steps
        if rows % self.num_generations:
            raise PosttrainError(f"completions per step per device ({rows}) must be a multiple of "
                                 f"--num-generations ({self.num_generations}) so whole groups stay on one device")
        self._check_common()
        if self.baseline_group_size is not None and (self.baseline_group_size < 1 or rows % self.baseline_group_size):
            raise PosttrainError(f"--baseline-group-size {self.baseline_group_size} must divide the completions per step "
                                 f"per device ({rows})")
        require(self, {"max_steps": self.max_steps >= 1, "num_iterations": self.num_iterations >= 1,
                  "learning_rate": self.learning_rate > 0, "beta": self.beta >= 0, "temperature": self.temperature > 0,
                  "max_new_tokens": self.max_new_tokens >= 1, "num_generations": self.num_generations >= 1,
                  "top_p": 0 < self.top_p <= 1, "rollout_batch_size": self.rollout_batch_size >= 1,
                  "warmup_ratio": 0 <= self.warmup_ratio < 1, "epsilon_low": self.epsilon_low >= 0,
                  "epsilon_high": self.epsilon_high >= 0, "eval_samples": self.eval_samples >= 0}, "rl")
        if self.update_max_tokens is not None and self.update_max_tokens < 1:
            raise PosttrainError(f"--update-max-tokens must be at least 1, got {self.update_max_tokens}")
        if self.update_max_tokens is not None and self.spec["aggregation"] == "bnpo":
            raise PosttrainError("--update-max-tokens cuts micro-batches, which changes what bnpo averages over: "
                                 "use it with --loss-type grpo, dapo or dr_grpo")
        if not self.reward:
            raise PosttrainError("give at least one --reward")

    @property
    def spec(self) -> dict:
        """The algorithm's settings with the config's choices filled in."""
        s = dict(ALGORITHMS[self.algo])
        s["aggregation"] = s["aggregation"] or self.loss_type
        s["kl_estimator"] = self.kl_estimator or s["kl_estimator"] or "k3"
        return s


# ------------------------------------------------------------------------------------ data types --
@dataclass
class Prompts:
    """The training prompts, rendered once: reward functions get the text, the engine the token ids."""

    examples: list  # [P] task examples (question, answer)
    texts: list[str]  # [P]
    ids: list[list[int]]  # [P] token ids


@dataclass
class Rollout:
    """One optimizer step's completions on this rank: whole groups of G, prompt by prompt.

    Filled in order by the loop's steps: ``collect_rollouts`` (prompt, completions), ``score``
    (rewards), ``compute_advantages`` (advantages).
    """

    prompt_idx: list[int]  # [N] index into Prompts of each completion (G consecutive per prompt)
    completions: list  # [N] engine Completions
    seconds: float  # wall time of sampling
    rewards: torch.Tensor | None = None  # [N] weighted sum of the reward functions
    reward_parts: dict[str, list[float]] = field(default_factory=dict)  # reward name -> [N]
    advantages: torch.Tensor | None = None  # [N]
    frac_groups_all_equal: float = 0.0  # share of advantage groups whose rewards all agree


@dataclass
class Batch:
    """The tensors an update trains on: the completions it uses, right-padded."""

    input_ids: torch.Tensor  # [B, L] prompt + completion
    attention_mask: torch.Tensor  # [B, L]
    completion_mask: torch.Tensor  # [B, L-1] 1 where position t+1 is a generated token that counts
    advantages: torch.Tensor  # [B]
    old_logp: torch.Tensor | None = None  # [B, L-1] at rollout time (num_iterations > 1)
    ref_logp: torch.Tensor | None = None  # [B, L-1] under the reference policy (beta > 0)
    multiple_of: int = 1  # micro-batch widths are multiples of it (L is one too)
    rows: list[int] | None = None  # a micro-batch's rows in the batch it was cut from

    def micro_batches(self, size: int, max_tokens: int | None = None, by_length: bool = False) -> list[Batch]:
        """Groups of ``size`` rows, each cut to its own longest row (rows are right-padded), rounded up to
        ``multiple_of``: no micro-batch pays for another's longest completion. The rows in their order, or
        ``by_length`` longest first, so that each group's rows are of like lengths (the least padding; a
        step's loss is the same however its rows are grouped, except bnpo's). With ``max_tokens``, a group
        whose rows × longest row exceeds it is cut further into consecutive pieces that do not (a row
        alone may)."""
        m, full = self.multiple_of, self.input_ids.shape[1]
        widths = [min(round_up(int(n), m), full) for n in self.attention_mask.sum(1).tolist()]  # each row's, rounded
        order = sorted(range(len(widths)), key=lambda i: -widths[i]) if by_length else list(range(len(widths)))
        out = []
        for i in range(0, len(order), size):
            group = order[i:i + size]
            for start, stop in [(0, len(group))] if max_tokens is None else padded_chunks([widths[r] for r in group], max_tokens):
                rows = group[start:stop]
                w = max(widths[r] for r in rows)
                consecutive = rows == list(range(rows[0], rows[-1] + 1))
                index = slice(rows[0], rows[-1] + 1) if consecutive else torch.tensor(rows, device=self.input_ids.device)
                out.append(Batch(_take(self.input_ids, index, w), _take(self.attention_mask, index, w),
                                 _take(self.completion_mask, index, w - 1), self.advantages[index],
                                 _take(self.old_logp, index, w - 1), _take(self.ref_logp, index, w - 1), m, rows))
        return out


def _take(x: torch.Tensor | None, rows, width: int) -> torch.Tensor | None:
    return None if x is None else x[rows, :width]


def step_micro_batches(batch: Batch, cfg: RLConfig, max_tokens: int | None = None) -> list[Batch]:
    """The micro-batches a step's forwards run on, the same for the log-prob passes and the update: rows
    grouped by length where the loss does not depend on the grouping, in the rollout's order for bnpo."""
    return batch.micro_batches(cfg.per_device_batch_size, max_tokens, by_length=cfg.spec["aggregation"] in SPLIT_INVARIANT)


# ------------------------------------------------------------------------------ the loop's steps --
def prompts_for_step(n_prompts: int, step: int, per_step: int, seed: int, rank: int, world: int) -> list[int]:
    """Prompt indices for this rank at rollout ``step`` (see ``epoch_indices``)."""
    return epoch_indices(n_prompts, step, per_step, seed * 7919, rank, world)


def training_problems(task, cfg: RLConfig) -> tuple[list, list]:
    """(the problems RL learns from, the held-out problems of its evaluations during training). With
    ``answers_only`` the worked solutions are dropped first: no reward function can see one."""
    examples, held_out = data_splits(task, cfg)
    if cfg.answers_only:
        examples = [dataclasses.replace(ex, response="") for ex in examples]
    return examples, held_out[: cfg.eval_samples] if cfg.eval_steps and cfg.eval_samples else []


def collect_rollouts(engine, prompts: Prompts, rollout_index: int, cfg: RLConfig, params, rank: int, world: int) -> Rollout:
    """Step 1, sample: this rank's prompts for the step, G completions each, from the engine's
    current copy of the policy."""
    per_step = cfg.per_device_batch_size * cfg.gradient_accumulation_steps // cfg.num_generations
    idx = prompts_for_step(len(prompts.ids), rollout_index, per_step, cfg.seed, rank, world)
    params.seed = cfg.seed + 1_000_003 * rollout_index + rank
    t0 = time.perf_counter()
    completions = engine.generate([prompts.ids[i] for i in idx], params)
    return Rollout([i for i in idx for _ in range(cfg.num_generations)], completions, time.perf_counter() - t0)


def score(rollout: Rollout, prompts: Prompts, reward_fns, chat: bool, device) -> None:
    """Step 2, reward: every reward function on every completion; the weighted sum is the reward."""
    exs = [prompts.examples[i] for i in rollout.prompt_idx]
    texts = [c.text for c in rollout.completions]
    total, rollout.reward_parts = compute_rewards(
        reward_fns, prompts=[prompts.texts[i] for i in rollout.prompt_idx],
        completions=[[{"role": "assistant", "content": t}] for t in texts] if chat else texts,
        answer=[e.response or f"#### {e.numeric_answer}" for e in exs], numeric_answer=[e.numeric_answer for e in exs],
        completion_lengths=[len(c.token_ids) for c in rollout.completions],
        completion_ids=[c.token_ids for c in rollout.completions])
    rollout.rewards = torch.tensor(total, dtype=torch.float32, device=device)


def advantage_group_size(cfg: RLConfig, n: int) -> int:
    """Completions per advantage group: G for grpo/rloo; for reinforce, ``baseline_group_size``
    (default: the whole step on this rank). Never the micro-batch size."""
    if ALGORITHMS[cfg.algo]["group"] == "prompt":
        return cfg.num_generations
    return min(cfg.baseline_group_size or n, n)


def compute_advantages(rewards: torch.Tensor, cfg: RLConfig) -> tuple[torch.Tensor, float]:
    """Step 3, advantage: rewards grouped as the algorithm asks ([groups, size]; whole groups live on
    one rank) through its advantage function. Returns ([N] advantages, share of all-equal groups)."""
    size = advantage_group_size(cfg, rewards.numel())
    groups = rewards.view(-1, size)  # rows per step is a multiple of size (checked in RLConfig)
    adv = ADVANTAGES[cfg.spec["advantage"]](groups, cfg.scale_rewards).reshape(-1)
    all_equal = (groups.max(1).values == groups.min(1).values).float().mean().item()
    return adv, all_equal


def sequence_tensors(prompt_ids: list[list[int]], completions, pad_id: int, mask_truncated: bool, device,
                     multiple_of: int = 1) -> tuple:
    """Right-padded prompt+completion rows (to a width that is a multiple of ``multiple_of``) and a mask
    over the generated tokens (up to and including EOS; never prompt or padding). Position t of the
    mask scores the token at t + 1."""
    rows = [p + c.token_ids for p, c in zip(prompt_ids, completions)]
    width = round_up(max(len(r) for r in rows), multiple_of)
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


def width_multiple(cfg: RLConfig) -> int:
    """What the RL batch rounds its widths up to: 8 with compiled layers (inductor specialises its
    graphs on it, and would compile each layer's twice), else 1."""
    return 8 if cfg.compile_layers else 1


def training_batch(rollout: Rollout, prompts: Prompts, cfg: RLConfig, pad_id: int, device) -> Batch:
    """The completions the update trains on, as tensors. With ``drop_zero_advantage`` (and no KL term)
    completions whose advantage is 0 carry no gradient and are left out; at least one row stays, so
    every rank runs a backward (DDP all-reduces in it). Widths are multiples of ``width_multiple``."""
    used = list(range(len(rollout.completions)))
    if cfg.drop_zero_advantage and cfg.beta == 0:
        used = (rollout.advantages != 0).nonzero()[:, 0].tolist() or [0]
    m = width_multiple(cfg)
    ids, attn, cmask = sequence_tensors([prompts.ids[rollout.prompt_idx[i]] for i in used], [rollout.completions[i] for i in used],
                                     pad_id, cfg.mask_truncated_completions, device, m)
    return Batch(ids, attn, cmask, rollout.advantages[used], multiple_of=m)


@torch.no_grad()
def fill_logprobs(batch: Batch, model, ref_model, cfg: RLConfig, accelerator) -> None:
    """Rollout-time log-probs (for the clipped ratio when a rollout is reused) and reference
    log-probs (for the KL penalty) of the completions' tokens, micro-batch by micro-batch."""
    mbs = step_micro_batches(batch, cfg)  # no activations kept: no token budget
    width, order = batch.completion_mask.shape[1], [r for mb in mbs for r in mb.rows]

    def whole(logp_of) -> torch.Tensor:  # [B, L-1]: the micro-batches' values, zero-padded, back in the batch's rows
        parts = torch.cat([F.pad(logp_of(mb).float(), (0, width - mb.completion_mask.shape[1])) for mb in mbs])
        out = torch.empty_like(parts)
        out[torch.tensor(order, device=parts.device)] = parts  # one index copy, after every forward is queued
        return out

    if cfg.num_iterations > 1:
        batch.old_logp = whole(lambda mb: sequence_logprobs(model, mb.input_ids, mb.attention_mask, mb.completion_mask, right_padded=True)[0])
    if cfg.beta > 0:
        batch.ref_logp = whole(lambda mb: reference_logprobs(model, ref_model, mb.input_ids, mb.attention_mask, mb.completion_mask,
                                                             accelerator, right_padded=True))


def update(model, batch: Batch, cfg: RLConfig, accelerator) -> tuple[bool, dict[str, float]]:
    """Step 4, update: forward and backward over the batch's micro-batches, each loss a share of the
    whole step's (normalised by ``StepSize`` over all micro-batches and ranks). Gradients are left
    for the optimizer. Returns (every loss was finite on this rank, the step's metrics)."""
    spec, world = cfg.spec, accelerator.num_processes
    mbs = step_micro_batches(batch, cfg, cfg.update_max_tokens)
    step = StepSize.of([mb.completion_mask for mb in mbs], world, lambda t: accelerator.reduce(t.to(accelerator.device), "sum"))
    sums: dict[str, torch.Tensor] = {}
    losses = []
    for k, mb in enumerate(mbs):
        # Gradients are all-reduced only after the last micro-batch of the step.
        sync = accelerator.no_sync(model) if k < len(mbs) - 1 else contextlib.nullcontext()
        with sync, accelerator.autocast():
            logp, entropy = sequence_logprobs(model, mb.input_ids, mb.attention_mask, mb.completion_mask, right_padded=True)
            loss, m = policy_loss(
                logp, mb.old_logp if mb.old_logp is not None else logp.detach(), mb.advantages,
                mb.completion_mask, step, ref_logp=mb.ref_logp,
                beta=cfg.beta, kl_estimator=spec["kl_estimator"], eps_low=cfg.epsilon_low, eps_high=cfg.epsilon_high,
                aggregation=spec["aggregation"], max_len=cfg.max_new_tokens)
        with sdpa_backends():  # gradient checkpointing runs a layer's forward again here: the forward's attention kernels
            accelerator.backward(loss * world)  # DDP averages gradients over ranks; the shares add up over them
        losses.append(loss.detach())
        m["entropy"] = agg_token_mean(entropy.detach(), mb.completion_mask, step, 0)
        for key, v in m.items():
            sums[key] = sums.get(key, 0.0) + v.detach().float()
    # One host sync a step, after every backward is queued (a check per micro-batch would stall the
    # launches of the next one); a non-finite step's gradients are then discarded by the optimizer step.
    finite = bool(torch.isfinite(torch.stack(losses)).all())
    names = sorted(sums)
    totals = accelerator.reduce(torch.stack([sums[k] for k in names]).to(accelerator.device), "sum")
    return finite, dict(zip(names, totals.tolist())) if finite else {}


# -------------------------------------------------------------------------------------- training --
def train(cfg: RLConfig) -> dict:
    """Run RL; returns the final metrics. Writes everything under ``cfg.output``."""
    from posttrain.engine import SamplingParams, kernels, make_engine
    from posttrain.engine.models import load_tokenizer

    run = TrainingRun(cfg, "rl")
    if run.done is not None:
        return run.done
    seed_everything(cfg.seed + run.rank)
    if run.device.type == "cuda":
        kernels.hash_triton_in_background()  # while the data and the models load

    # -- data, rewards, models, optimizer, the run's one engine
    task = make_task(cfg.task, prompt_style=cfg.prompt_style, data_dir=cfg.data_dir)
    examples, eval_examples = training_problems(task, cfg)
    reward_fns = [parse_reward(r) for r in cfg.reward]
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    texts = [task.prompt_text(ex, tokenizer) for ex in examples]
    prompts = Prompts(examples, texts, task.encode_prompts(examples, tokenizer, texts))
    model = load_policy(cfg, run.device)
    ref_model = None
    if cfg.beta > 0 and (cfg.ref_model or cfg.method == "full"):
        ref_model = load_reference(cfg, tokenizer, run.device)
    trainable, total = count_parameters(model)
    run.log(f"rl: {cfg.algo} on {cfg.model} ({cfg.method}, {trainable:,}/{total:,} trainable); "
            f"rewards {', '.join(f'{r.name}×{r.weight:g}' for r in reward_fns)}; {len(examples)} prompts")
    optimizer = build_optimizer(model, cfg.learning_rate, cfg.weight_decay)
    warn_rounded_away(model, cfg.learning_rate, run.log)
    warmup = warmup_steps_for(cfg.max_steps, cfg.warmup_ratio, cfg.warmup_steps)
    scheduler = build_scheduler(optimizer, cfg.lr_scheduler, warmup, cfg.max_steps)
    model, optimizer, scheduler = run.prepare(model, optimizer, scheduler, cfg.max_steps, {"resolved": cfg.spec})
    policy = run.accelerator.unwrap_model(model)
    # The engine's rows (its KV cache): no more than a step samples, unless evaluations ask for more.
    rows = min(cfg.rollout_batch_size, cfg.per_device_batch_size * cfg.gradient_accumulation_steps)
    engine = make_engine(cfg.engine, policy, tokenizer, max(rows, cfg.eval_batch_size if eval_examples else 0),
                         quantized_rollouts=cfg.quantized_rollouts)
    engine.reserve(max((len(p) for p in prompts.ids), default=0))  # one KV cache, and one set of graphs, for the whole run
    params = SamplingParams(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.num_generations, task.stop_strings)

    synced = run.step  # the engine samples from the policy as it was at this step

    def current(engine):
        """The engine, told of the policy's updates since it last generated (once, not per update)."""
        nonlocal synced
        if synced != run.step:
            engine.sync_weights(policy)
            synced = run.step
        return engine

    def evaluate() -> dict:
        result = accuracy_eval(current(engine), tokenizer, task, eval_examples, cfg.max_new_tokens, run.accelerator)
        engine.release()  # a transient copy of a 4-bit base gives the memory and the 4-bit weights back
        return result

    rollout_index = run.step // cfg.num_iterations
    while run.running():
        policy.eval()
        rollout = collect_rollouts(current(engine), prompts, rollout_index, cfg, params, run.rank, run.world)  # 1. sample
        engine.release()  # what only sampling needs (a transient copy of a 4-bit base) makes room for the update
        policy.train()
        score(rollout, prompts, reward_fns, task.template.style == "chat", run.device)               # 2. reward
        rollout.advantages, rollout.frac_groups_all_equal = compute_advantages(rollout.rewards, cfg)  # 3. advantage
        batch = training_batch(rollout, prompts, cfg, tokenizer.pad_token_id, run.device)
        fill_logprobs(batch, model, ref_model, cfg, run.accelerator)
        for _ in range(min(cfg.num_iterations, cfg.max_steps - run.step)):                       # 4. update
            t0 = time.perf_counter()
            finite, stats = update(model, batch, cfg, run.accelerator)
            run.optimizer_step(finite, partial(step_metrics, rollout, batch, stats, task, prompts, run.world, t0),
                               evaluate if eval_examples else None, progress)
        rollout_index += 1
    return run.save_and_close(model, tokenizer, {"algo": cfg.algo})


def step_metrics(rollout: Rollout, batch: Batch, stats: dict, task, prompts: Prompts, world: int, started: float) -> dict:
    """What a step logs: the loss terms, rewards (total and per function), sampled accuracy, lengths,
    speed (the update's, from ``started`` to now: the optimizer step has just been taken)."""
    train_s = time.perf_counter() - started
    comps, rewards = rollout.completions, rollout.rewards
    lengths = torch.tensor([len(c.token_ids) for c in comps], dtype=torch.float32)
    trained_tokens = int(batch.attention_mask.sum().item()) * world
    exs = [prompts.examples[i] for i in rollout.prompt_idx]
    return {
        **stats,
        "reward_mean": rewards.mean().item(), "reward_std": rewards.std().item() if len(rewards) > 1 else 0.0,
        **{f"reward/{name}": sum(v) / len(v) for name, v in rollout.reward_parts.items()},
        "accuracy": sum(task.grade(c.text, e).correct for c, e in zip(comps, exs)) / len(comps),
        "frac_groups_all_equal": rollout.frac_groups_all_equal,
        "completion_len_mean": lengths.mean().item(), "completion_len_max": lengths.max().item(),
        "truncation_rate": sum(c.finish_reason == "length" for c in comps) / len(comps),
        "trained_completions": len(batch.input_ids),
        # tokens through the engine (prompt + completion per sample) and through the update: the compute record
        "rollout_tokens": sum(len(prompts.ids[i]) + len(c.token_ids) for i, c in zip(rollout.prompt_idx, comps)) * world,
        "trained_tokens": trained_tokens,
        "rollout_tokens_per_s": float(lengths.sum()) * world / max(rollout.seconds, 1e-9),
        "train_tokens_per_s": trained_tokens / max(train_s, 1e-9),
    }


def progress(metrics: dict) -> dict:
    """The progress bar's figures for a step."""
    return {"reward": f"{metrics['reward_mean']:.3f}", "acc": f"{metrics['accuracy']:.2f}"}
