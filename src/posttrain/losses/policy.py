"""Policy-gradient losses for RL from verifiable rewards: advantages, KL estimators, clipped
surrogate, and loss aggregation. Pure functions of tensors; variants live in dicts.

Notation: N completions, T completion positions (right-padded), ``mask`` [N, T] marks generated
tokens up to and including the first EOS.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from posttrain.losses.logprob_kernels import token_logits_grad, token_logits_grad_ref, token_stats, token_stats_ref

# ------------------------------------------------------------------------------------ advantages --
# Each takes rewards grouped as [num_groups, group_size] and returns advantages of the same shape.


def batch_mean_baseline(r: torch.Tensor, scale_std: bool) -> torch.Tensor:
    """REINFORCE (seed 000): reward minus the mean of its batch; optionally divided by the batch std.

    r: [num_batches, batch_size] -> [num_batches, batch_size]
    """
    adv = r - r.mean(dim=1, keepdim=True)
    if scale_std:
        std = adv.std(dim=1, keepdim=True)  # unbiased, as torch.Tensor.std in the seed
        adv = torch.where(std > 0, adv / std.clamp(min=1e-8), adv)
    return adv


def group_normalized(r: torch.Tensor, scale_std: bool) -> torch.Tensor:
    """GRPO: reward minus its group's mean, divided by the group's std when ``scale_std`` (Dr. GRPO turns it off).

    r: [num_prompts, G] -> [num_prompts, G]
    """
    adv = r - r.mean(dim=1, keepdim=True)
    if scale_std:
        adv = adv / (r.std(dim=1, keepdim=True) + 1e-4)
    return adv


def leave_one_out(r: torch.Tensor, scale_std: bool = False) -> torch.Tensor:
    """RLOO: reward minus the mean of the *other* G-1 rewards of its group.

    r: [num_prompts, G] -> [num_prompts, G];  A_i = r_i - (sum_j r_j - r_i) / (G - 1)
    """
    g = r.shape[1]
    if g < 2:
        return torch.zeros_like(r)
    return r - (r.sum(dim=1, keepdim=True) - r) / (g - 1)


ADVANTAGES = {"batch_mean": batch_mean_baseline, "group": group_normalized, "leave_one_out": leave_one_out}


# -------------------------------------------------------------------------------------------- KL --
def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k1 = log π(a) - log π_ref(a): unbiased, can be negative per token. [N, T] -> [N, T]"""
    return logp - ref_logp


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 = exp(ref - logp) - (ref - logp) - 1 >= 0 (Schulman's estimator), clamped for stability. [N, T]"""
    d = (ref_logp - logp).clamp(-20.0, 20.0)
    return (torch.exp(d) - d - 1).clamp(max=10.0)


KL_ESTIMATORS = {"k1": kl_k1, "k3": kl_k3}


# ----------------------------------------------------------------------------------- aggregation --
# An optimizer step's loss is spread over micro-batches (and ranks). Each aggregation below returns
# one micro-batch's *share* of the step's loss, divided by a normaliser of the whole step
# (``StepSize``), so summing the shares over micro-batches and ranks gives the same loss, and the same
# gradient, however the step is split. Only ``bnpo`` normalises per micro-batch, and says so.


@dataclass(frozen=True)
class StepSize:
    """What one optimizer step holds, over all its micro-batches and all ranks."""

    sequences: int
    """Completions that enter the loss."""
    tokens: int
    """Completion tokens that enter the loss (mask ones)."""
    micro_batches: int = 1
    """Micro-batches per rank (only ``bnpo`` uses it)."""

    @staticmethod
    def of(masks: list[torch.Tensor], world: int = 1, reduce=None) -> StepSize:
        """The step size from this rank's micro-batch masks; ``reduce(tensor)`` sums over ranks."""
        counts = torch.tensor([float(sum(m.shape[0] for m in masks)), float(sum(m.sum() for m in masks))])
        if reduce is not None and world > 1:
            counts = reduce(counts)
        return StepSize(int(counts[0]), int(counts[1]), len(masks))


def agg_seq_sum(x: torch.Tensor, mask: torch.Tensor, step: StepSize, max_len: int) -> torch.Tensor:
    """REINFORCE (seed 000): sum over each sequence's tokens, mean over the step's sequences."""
    return (x * mask).sum() / max(step.sequences, 1)


def agg_seq_mean(x: torch.Tensor, mask: torch.Tensor, step: StepSize, max_len: int) -> torch.Tensor:
    """GRPO: mean over each sequence's tokens, then mean over the step's sequences (a long answer's
    tokens weigh less each)."""
    return ((x * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / max(step.sequences, 1)


def agg_token_mean(x: torch.Tensor, mask: torch.Tensor, step: StepSize, max_len: int) -> torch.Tensor:
    """DAPO (verl's token-mean): mean over every token of the step; each token weighs the same."""
    return (x * mask).sum() / max(step.tokens, 1)


def agg_constant(x: torch.Tensor, mask: torch.Tensor, step: StepSize, max_len: int) -> torch.Tensor:
    """Dr. GRPO: sum over tokens divided by a constant (the step's sequences × max completion length)."""
    return (x * mask).sum() / (max(step.sequences, 1) * max_len)


def agg_bnpo(x: torch.Tensor, mask: torch.Tensor, step: StepSize, max_len: int) -> torch.Tensor:
    """TRL's bnpo: mean over the tokens of each *micro-batch*, averaged over micro-batches. Not
    split-invariant: the weight of a token depends on which micro-batch it landed in."""
    return (x * mask).sum() / mask.sum().clamp(min=1) / step.micro_batches


AGGREGATIONS = {"seq_sum": agg_seq_sum, "grpo": agg_seq_mean, "dapo": agg_token_mean, "dr_grpo": agg_constant,
                "bnpo": agg_bnpo}
SPLIT_INVARIANT = ("seq_sum", "grpo", "dapo", "dr_grpo")


# ---------------------------------------------------------------------------------------- losses --
def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    step: StepSize,
    *,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
    kl_estimator: str = "k3",
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    aggregation: str = "grpo",
    max_len: int = 1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """This micro-batch's share of a step's clipped policy-gradient loss, with an optional KL penalty.

    logp, old_logp, ref_logp: [N, T] log-probs of the sampled tokens under the current, rollout-time
    and reference policies. advantages: [N] one per completion. mask: [N, T] in {0, 1}. ``step``: the
    size of the whole optimizer step this micro-batch belongs to.

    Per token: -min(ρ·A, clip(ρ, 1-ε_low, 1+ε_high)·A) + β·KL, with ρ = exp(logp - old_logp).
    With one update per rollout ρ = 1 and the gradient is exactly A·∇log π (REINFORCE).
    For ``seq_sum`` (REINFORCE) the KL term is averaged per sequence as in seed 000.

    Every returned value (loss and metrics) is a share: summed over the step's micro-batches and
    ranks it gives the step's value.
    """
    mask = mask.to(logp.dtype)
    adv = advantages[:, None].to(logp.dtype)  # [N, 1]
    ratio = torch.exp(logp - old_logp)  # [N, T]
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high)
    pg = -torch.minimum(ratio * adv, clipped * adv)  # [N, T]
    agg = AGGREGATIONS[aggregation]
    loss = agg(pg, mask, step, max_len)
    metrics: dict[str, torch.Tensor] = {"pg_loss": loss.detach()}
    if ref_logp is not None:
        kl_agg = agg_seq_mean if aggregation == "seq_sum" else agg
        kl_term = kl_agg(KL_ESTIMATORS[kl_estimator](logp, ref_logp), mask, step, max_len)  # [N, T] -> share
        if beta != 0:
            loss = loss + beta * kl_term
        metrics["kl"] = kl_term.detach()
    is_clipped = ((ratio < 1 - eps_low) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))
    metrics["clip_fraction"] = agg_token_mean(is_clipped.to(mask.dtype), mask, step, max_len).detach()
    metrics["loss"] = loss.detach()
    return loss, metrics


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, chunk_elements: int = 1 << 25) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob (with gradient) and entropy (a metric, without) of each next token, chunk by chunk.

    logits: [N, T, V] predicting ``tokens`` [N, T] -> (logp [N, T] fp32, entropy [N, T] fp32).

    fp32 full-vocabulary temporaries exist for one chunk of positions at a time (at most
    ``chunk_elements`` values), and autograd keeps only the logits themselves and one log-sum-exp per
    position: the softmax is recomputed per chunk in the backward pass (``_TokenLogp``). A whole
    micro-batch's fp32 log-softmax, kept for backward, was the largest allocation of an RL step at a
    128k vocabulary.
    """
    n, t, v = logits.shape
    step = max(1, chunk_elements // max(1, n * v))
    parts = [_TokenLogp.apply(logits[:, s:s + step], tokens[:, s:s + step]) for s in range(0, t, step)]
    return torch.cat([lp for lp, _ in parts], 1), torch.cat([ent for _, ent in parts], 1)


class _TokenLogp(torch.autograd.Function):
    """(log softmax(x)[tok], entropy of softmax(x)) for one chunk x [N, S, V], computed in fp32.

    d logp / dx = onehot(tok) - softmax(x): formed in the backward pass from x and the saved
    log-sum-exp, so nothing of size V is kept between forward and backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, tok: torch.Tensor):
        lse, logp, entropy = token_stats_ref(x, tok)
        ctx.save_for_backward(x, tok, lse)
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp: torch.Tensor, grad_entropy: torch.Tensor):
        x, tok, lse = ctx.saved_tensors
        return token_logits_grad_ref(x, lse, tok, grad_logp), None


def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tokens: torch.Tensor,
                          where: torch.Tensor | None = None, chunk_elements: int = 1 << 25) -> tuple[torch.Tensor, torch.Tensor]:
    """``token_logprobs`` of ``logits = hidden @ weight.T + bias`` without the logits: the output
    projection is fused into the chunks, so no [N, T, V] tensor exists at any time (neither the model's
    logits nor their gradient), only one chunk's at a time.

    hidden: [N, T, D] final hidden states, weight: [V, D] (the lm_head), tokens: [N, T], where: [N, T]
    bool, the positions to score (default all; elsewhere log-prob and entropy are 0, and nothing is
    computed for them: an RL step scores completions, not prompts or padding)
    -> (logp [N, T] fp32, entropy [N, T] fp32). Under autocast the projection runs in the autocast
    dtype, as the model's own lm_head would.

    Chunks are runs of the flattened [N·T, D] positions, so each projection is one plain GEMM: chunks
    sliced across the sequence of a batch are strided, and a strided 3-D input made every chunk a
    batched GEMM over a broadcast weight (2.97 ms a chunk on the 1B shape, a third of the GPU time of
    an RL step; bench/profile_rl.py)."""
    n, t, d = hidden.shape
    dev = hidden.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else torch.promote_types(hidden.dtype, weight.dtype)
    flat, tok, idx = hidden.reshape(n * t, d), tokens.reshape(n * t), None
    if where is not None:
        idx = where.reshape(-1).nonzero()[:, 0]
        if len(idx) == 0:
            idx = idx.new_zeros(1)  # score one position (masked out by the caller) so a backward pass still exists
        flat, tok = flat.index_select(0, idx), tok.index_select(0, idx)
    step = max(1, chunk_elements // weight.shape[0])
    parts = [_LinearTokenLogp.apply(flat[s:s + step], weight, bias, tok[s:s + step], dtype) for s in range(0, len(flat), step)]
    logp, entropy = torch.cat([lp for lp, _ in parts]), torch.cat([ent for _, ent in parts])
    if idx is not None:
        logp = logp.new_zeros(n * t).index_copy(0, idx, logp)
        entropy = entropy.new_zeros(n * t).index_copy(0, idx, entropy)
    return logp.view(n, t), entropy.view(n, t)


class _LinearTokenLogp(torch.autograd.Function):
    """``_TokenLogp`` of x = h Wᵀ + b for one chunk h [C, D] of positions; x is recomputed in the
    backward pass."""

    @staticmethod
    def forward(ctx, h, weight, bias, tok, dtype):
        with torch.autocast(h.device.type, enabled=False):
            x = F.linear(h.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
        lse, logp, entropy = token_stats(x, tok)
        ctx.save_for_backward(h, weight, bias, tok, lse)
        ctx.dtype = dtype
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        h, weight, bias, tok, lse = ctx.saved_tensors
        with torch.autocast(h.device.type, enabled=False):
            w = weight.to(ctx.dtype)
            x = F.linear(h.to(ctx.dtype), w, None if bias is None else bias.to(ctx.dtype))
            grad = token_logits_grad(x, lse, tok, grad_logp)  # [C, V] in the projection's dtype (over x on CUDA)
            grad_h = (grad @ w).to(h.dtype) if ctx.needs_input_grad[0] else None
            grad_w = grad.flatten(0, -2).T.mm(h.to(ctx.dtype).flatten(0, -2)).to(weight.dtype) if ctx.needs_input_grad[1] else None
            grad_b = grad.flatten(0, -2).sum(0).to(bias.dtype) if bias is not None and ctx.needs_input_grad[2] else None
        return grad_h, grad_w, grad_b, None, None
