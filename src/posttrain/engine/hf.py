"""Generation through HF ``generate``: left padding, attention mask, batching, stop strings.

HF computes position ids from the attention mask, so a left-padded row sees the same positions it
would alone: greedy results do not depend on batch size (tests/test_engine.py checks it).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from posttrain.engine.base import Completion, Engine, SamplingParams, eos_token_ids, finish


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into ``input_ids`` [B, T] and ``attention_mask`` [B, T]."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if p:
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)


class _FirstToken:
    """A generate streamer that only notes when the first new token arrives (its second ``put``)."""

    def __init__(self, engine: Engine):
        self.engine, self.calls = engine, 0

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2:
            self.engine.note_first_token()

    def end(self) -> None:
        pass


class HFEngine(Engine):
    name = "hf"

    def __init__(self, model, tokenizer, batch_size: int = 16, cache_implementation: str | None = None):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.cache_implementation = cache_implementation

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], params: SamplingParams, progress: bool = False) -> list[Completion]:
        self.check_lengths(prompts, params)
        tok, model = self.tokenizer, self.model
        eos_ids = eos_token_ids(model, tok)
        device = next(model.parameters()).device
        # Each (prompt, sample) pair is one row; rows sorted by prompt length waste less on padding.
        rows = [(i, s) for i in range(len(prompts)) for s in range(params.n)]
        order = sorted(range(len(rows)), key=lambda r: len(prompts[rows[r][0]]))
        out: list[Completion | None] = [None] * len(rows)
        if params.seed is not None:
            torch.manual_seed(params.seed)
        bar = tqdm(total=len(rows), desc=f"generate[{self.name}]", disable=not progress, unit="seq")
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            batch = [prompts[rows[r][0]] for r in chunk]
            input_ids, attn = left_pad(batch, tok.pad_token_id, device)
            kwargs = dict(
                max_new_tokens=params.max_new_tokens,
                do_sample=not params.greedy,
                pad_token_id=tok.pad_token_id,
                eos_token_id=None if params.ignore_eos else sorted(eos_ids),
                return_dict_in_generate=True,
                output_logits=params.logprobs,
            )
            if not params.greedy:
                kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=0)
            else:
                kwargs.update(temperature=None, top_p=None, top_k=None)
            if params.ignore_eos:
                kwargs["min_new_tokens"] = params.max_new_tokens
            if params.stop:
                kwargs.update(stop_strings=list(params.stop), tokenizer=tok)
            if self.cache_implementation:
                kwargs["cache_implementation"] = self.cache_implementation
            if self.first_token_s is None:
                kwargs["streamer"] = _FirstToken(self)
            res = model.generate(input_ids=input_ids, attention_mask=attn, **kwargs)
            new = res.sequences[:, input_ids.shape[1]:]
            lp = [None] * len(chunk)
            if params.logprobs:
                # Log-probs of the chosen tokens under softmax(logits / T), one step at a time.
                t_scale = 1.0 if params.greedy else params.temperature
                lp = torch.stack([torch.log_softmax(step.float() / t_scale, -1).gather(-1, new[:, t, None])[:, 0]
                                  for t, step in enumerate(res.logits)], dim=1).tolist()
            new = new.tolist()
            for k, r in enumerate(chunk):
                out[r] = finish(tok, rows[r][0], new[k], eos_ids, params.stop, lp[k], params.ignore_eos)
            bar.update(len(chunk))
        bar.close()
        return out  # type: ignore[return-value]
