"""Prompt-masked next-token loss for SFT."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def masked_nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed negative log-likelihood of the labelled tokens, and how many there were.

    logits: [B, T, V] — logits[:, t] predicts the token at t + 1.
    labels: [B, T]    — the input ids with prompt and padding positions set to IGNORE_INDEX (-100).

    Returns (nll_sum [], n_tokens []). Summing (not averaging) lets a trainer normalise by the token
    count of a whole optimizer step, across micro-batches and ranks, so every response token weighs
    the same however the step was split.
    """
    shift_logits = logits[:, :-1, :].float()  # [B, T-1, V]
    shift_labels = labels[:, 1:]  # [B, T-1]
    nll = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="sum",
    )
    return nll, (shift_labels != IGNORE_INDEX).sum()


def masked_nll_mean(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean NLL over labelled tokens (0 when there are none)."""
    total, n = masked_nll_sum(logits, labels)
    return total / n.clamp(min=1)
