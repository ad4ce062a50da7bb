"""Scoring sequences under a policy: the log-prob and entropy of every next token from the model's own
forward (through DDP/FSDP and PEFT wrappers), and the reference policy's log-probs for the KL penalty.

The token arithmetic is ``losses.policy``'s (pure torch); this module is the model side: which forward
to run and, where the lm_head is a plain projection, how to skip the [N, L, V] logits."""

from __future__ import annotations

import torch

from posttrain.engine.models import sdpa_backends
from posttrain.losses.policy import linear_token_logprobs, token_logprobs


def output_head(model):
    """The plain ``nn.Linear`` lm_head of ``model`` (through DDP/FSDP and PEFT wrappers) when its
    logits are exactly that projection of the final hidden state, else None: the families the fast
    engine runs (``engine.fast.SUPPORTED``), whose forward it reproduces, have no scaling or
    soft-capping after the lm_head."""
    from posttrain.engine.fast import SUPPORTED

    inner = getattr(model, "module", model)
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    family = getattr(getattr(inner, "config", None), "model_type", None)
    if type(head) is not torch.nn.Linear or family not in SUPPORTED:
        return None
    # FSDP shards parameters (a flat view of another size, or a DTensor): its lm_head is only whole
    # inside the model's forward, so those runs keep the logits path.
    whole = tuple(head.weight.shape) == (head.out_features, head.in_features) and type(head.weight.data) is torch.Tensor
    return head if whole else None


def sequence_logprobs(model, input_ids, attention_mask, scored=None, right_padded: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob and entropy of every next token: ([N, L-1], [N, L-1]); with ``scored`` ([N, L-1], >0
    where a value is needed: the completions' tokens), 0 at the other positions.

    ``right_padded``: every row is its tokens, then padding (an RL batch). The causal mask alone then
    keeps each token from attending to padding, so the model gets no padding mask and positions
    0..L-1 (the tokens' own; the padding's continue past them, where a repeated position would read
    as packed sequences, for which transformers builds a [N, 1, L, L] mask): attention is plain causal
    and SDPA may run flash attention (a mask rules it out). The padding positions' own values are
    computed from padding and are not scored.

    Where the lm_head is a plain projection, the model runs up to it (a pre-hook hands the lm_head an
    empty slice and keeps the hidden states) and ``linear_token_logprobs`` projects chunk by chunk,
    only the scored positions: the [N, L, V] logits and their gradient never exist (the largest tensors
    of an RL step at a 128k vocabulary). The forward still goes through ``model``, so DDP sees it."""
    where = scored > 0 if scored is not None else None
    if right_padded:
        mask, pos = None, torch.arange(input_ids.shape[1], device=input_ids.device).expand(input_ids.shape[0], -1)
    else:
        mask, pos = attention_mask, (attention_mask.cumsum(-1) - 1).clamp(min=0)
    head = output_head(model)
    if head is None:
        with sdpa_backends():
            logits = model(input_ids=input_ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
        logp, entropy = token_logprobs(logits[:, :-1], input_ids[:, 1:])
        if where is None:
            return logp, entropy
        return logp.where(where, 0.0), entropy.where(where, 0.0)
    kept = {}

    def keep_hidden(module, args):
        kept["hidden"] = args[0]
        return (args[0][:, :0],)

    handle = head.register_forward_pre_hook(keep_hidden)
    try:
        with sdpa_backends():
            model(input_ids=input_ids, attention_mask=mask, position_ids=pos, use_cache=False)
    finally:
        handle.remove()
    return linear_token_logprobs(kept["hidden"][:, :-1], head.weight, head.bias, input_ids[:, 1:], where)


@torch.no_grad()
def reference_logprobs(model, ref_model, input_ids, attention_mask, scored, accelerator, right_padded: bool = False) -> torch.Tensor:
    """Reference log-probs of the scored tokens ([N, L-1]): the explicit reference model, or the policy
    with its LoRA adapter off."""
    if ref_model is not None:
        return sequence_logprobs(ref_model, input_ids, attention_mask, scored, right_padded)[0]
    unwrapped = accelerator.unwrap_model(model)
    with unwrapped.disable_adapter():
        return sequence_logprobs(model, input_ids, attention_mask, scored, right_padded)[0]
