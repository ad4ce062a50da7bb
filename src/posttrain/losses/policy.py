"""Policy-gradient losses for RL from verifiable rewards: advantages, KL estimators, clipped
surrogate, and loss aggregation. Pure functions of tensors; variants live in dicts.

Notation: N completions, T completion positions (right-padded), ``mask`` [N, T] marks generated
tokens up to and including the first EOS.
"""

from __future__ import annotations

import torch

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
# Each turns a per-token loss [N, T] and mask [N, T] into a scalar.


def agg_seq_sum(x: torch.Tensor, mask: torch.Tensor, max_len: int) -> torch.Tensor:
    """REINFORCE (seed 000): sum over each sequence's tokens, mean over sequences."""
    return (x * mask).sum(1).mean()


def agg_seq_mean(x: torch.Tensor, mask: torch.Tensor, max_len: int) -> torch.Tensor:
    """GRPO: mean over each sequence's tokens, then mean over sequences (long answers weigh less per token)."""
    return ((x * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()


def agg_token_mean(x: torch.Tensor, mask: torch.Tensor, max_len: int) -> torch.Tensor:
    """DAPO: mean over all tokens of the batch (every token weighs the same)."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def agg_constant(x: torch.Tensor, mask: torch.Tensor, max_len: int) -> torch.Tensor:
    """Dr. GRPO: sum over tokens divided by a constant (N × max completion length): no length bias."""
    return (x * mask).sum() / (x.shape[0] * max_len)


AGGREGATIONS = {"seq_sum": agg_seq_sum, "grpo": agg_seq_mean, "dapo": agg_token_mean, "dr_grpo": agg_constant}


# ---------------------------------------------------------------------------------------- losses --
def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
    kl_estimator: str = "k3",
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    aggregation: str = "grpo",
    max_len: int = 1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped policy-gradient loss with an optional KL penalty to a reference policy.

    logp, old_logp, ref_logp: [N, T] log-probs of the sampled tokens under the current, rollout-time
    and reference policies. advantages: [N] one per completion. mask: [N, T] in {0, 1}.

    Per token: -min(ρ·A, clip(ρ, 1-ε_low, 1+ε_high)·A) + β·KL, with ρ = exp(logp - old_logp).
    With one update per rollout ρ = 1 and the gradient is exactly A·∇log π (REINFORCE).
    For ``seq_sum`` (REINFORCE) the KL term is averaged per sequence as in seed 000.
    """
    mask = mask.to(logp.dtype)
    adv = advantages[:, None].to(logp.dtype)  # [N, 1]
    ratio = torch.exp(logp - old_logp)  # [N, T]
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high)
    pg = -torch.minimum(ratio * adv, clipped * adv)  # [N, T]
    agg = AGGREGATIONS[aggregation]
    loss = agg(pg, mask, max_len)
    metrics: dict[str, torch.Tensor] = {"pg_loss": loss.detach()}
    if ref_logp is not None and beta != 0:
        kl = KL_ESTIMATORS[kl_estimator](logp, ref_logp)  # [N, T]
        kl_agg = agg_seq_mean if aggregation == "seq_sum" else agg
        kl_term = kl_agg(kl, mask, max_len)
        loss = loss + beta * kl_term
        metrics["kl"] = kl_term.detach()
    elif ref_logp is not None:
        metrics["kl"] = agg_seq_mean(KL_ESTIMATORS[kl_estimator](logp, ref_logp), mask, max_len).detach()
    is_clipped = ((ratio < 1 - eps_low) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))
    metrics["clip_fraction"] = ((is_clipped.to(mask.dtype) * mask).sum() / mask.sum().clamp(min=1)).detach()
    metrics["loss"] = loss.detach()
    return loss, metrics


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob and entropy of each next token.

    logits: [N, T, V] predicting ``tokens`` [N, T] -> (logp [N, T], entropy [N, T]).
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    logp = logprobs.gather(-1, tokens[..., None]).squeeze(-1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    return logp, entropy
