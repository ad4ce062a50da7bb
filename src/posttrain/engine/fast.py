"""posttrain's own sampling engine for Llama-family decoders (Llama, Mistral, Qwen2, Qwen3; GQA).

Why not HF ``generate``: its dynamic cache re-allocates every step and every kernel launch goes
through Python, so small decode steps are launch-bound. This engine:

* pre-allocates one KV cache ``[rows, kv_heads, max_len, head_dim]`` per layer;
* prefills each distinct prompt once and copies its cache into the G rows of its group;
* decodes with attention that reads each KV head once for all the query heads that share it (no
  repeat of K/V): on CUDA a Triton flash-decoding kernel that reads each row's own length only
  (``kernels.decode_attention``), elsewhere PyTorch's SDPA with ``enable_gqa``;
* on CUDA, captures the whole decode step — projections, attention, sampling — as a CUDA graph,
  one per row bucket (attention reads each row's own length, so a graph serves every length), so a
  step is one graph launch;
* samples (greedy, temperature, top-p) on the device with no host synchronisation per step and no
  sort of the vocabulary (``kernels.sample``: inverse-CDF candidates, rejection outside the
  nucleus); the host looks at the finished flags only every ``sync_every`` steps;
* compacts the batch when enough rows have finished (EOS or stop string), moving live rows to the
  front and switching to a smaller captured graph, so finished sequences stop costing work.

Two parts do this: the model adapter (``model_adapter``: the model's shape, its inference weights —
``projections`` — and the prefill and decode-step forwards) and the scheduler (``scheduler``: waves,
buckets, CUDA graphs, compaction, over the typed state of ``decode_state``). ``FastEngine`` joins them
behind the ``Engine`` contract.

Projections run on inference weights built from the model at the first ``generate`` and refreshed by
``sync_weights`` (a few milliseconds), which a trainer calls after it changed the policy: q|k|v as one
matrix and gate|up as one, so a decode step makes two GEMMs where it made five, and LoRA adapters
merged in (W + scale·B·A), so an adapter being trained costs no extra GEMMs. A plain projection that needs neither (o, down
without LoRA) is the model's own weight, no copy. ``merge_weights=False`` keeps the memory instead
and calls the model's modules (LoRA live). On merged weights of a Llama-family model the norms (with
their residual adds) and SiLU run as fused kernels (``kernels``: Triton on CUDA, their references
elsewhere) in the prefill and the decode step, and rotary with the cache write in the decode step;
otherwise they are the model's own modules, as the lm_head always is. A bitsandbytes 4-bit (QLoRA) base is served from a dequantized copy
or straight from its 4-bit weights with the adapters as their own low-rank products
(``quantized_rollouts``: ``auto`` picks by free GPU memory and says which, in one line).

Sampling is exact: the token follows softmax(logits / T) renormalised over the top-p nucleus (see
``kernels`` for the one approximation, a fall-back to the most likely token with probability at most
(1 - top_p)^40 per step).
"""

from __future__ import annotations

import os

import torch

from posttrain.engine.base import Completion, Engine, SamplingParams, eos_token_ids
from posttrain.engine.model_adapter import SUPPORTED, ModelAdapter, supports
from posttrain.engine.scheduler import Scheduler

__all__ = ["FastEngine", "SUPPORTED", "supports"]


class FastEngine(Engine):
    name = "fast"

    def __init__(self, model, tokenizer, batch_size: int = 256, *, use_cuda_graphs: bool | None = None,
                 sync_every: int = 8, prefill_tokens: int = 16384, compile: bool | None = None,
                 merge_weights: bool = True, quantized_rollouts: str = "auto"):
        """``quantized_rollouts`` (a bitsandbytes 4-bit base only): ``dequantized`` serves it from a
        dense copy with the adapters merged in (13 GiB more on an 8B model, rewritten at each sync),
        ``transient`` from that copy built at each rollout and freed by ``release`` before the update,
        ``4bit`` straight from the 4-bit weights with the adapters as their own low-rank products (no
        copy; a sync rewrites nothing), ``auto`` by free memory (``projections.choose_quantized_path``)."""
        if compile is None:
            # Off by default: on an H100, torch.compile made a whole GSM8K evaluation of SmolLM2 take
            # 227 s from process start (85 s with warm caches) against 24 s (22 s) without it, while
            # its steady-state gain is 1.5x decode on the 1B shape (bench/e2e.py, bench/rollout.py;
            # BENCHMARKS.md). POSTTRAIN_COMPILE=1 turns it on for long runs, where it pays.
            compile = os.environ.get("POSTTRAIN_COMPILE", "0") == "1"
        device = next(model.parameters()).device
        self.compiled = bool(device.type == "cuda" and compile)
        self.adapter = ModelAdapter(model, merge_weights=merge_weights, compiled=self.compiled, quantized_rollouts=quantized_rollouts)
        self.model, self.tokenizer = model, tokenizer
        self.device = device
        self.dtype = self.adapter.dtype
        self.eos = sorted(eos_token_ids(model, tokenizer))
        use_graphs = (device.type == "cuda") if use_cuda_graphs is None else use_cuda_graphs
        self.scheduler = Scheduler(self.adapter, tokenizer, self.eos, batch_size, use_graphs=use_graphs, sync_every=sync_every,
                                   prefill_tokens=prefill_tokens, on_first_token=self._first_token)

    def _first_token(self, first: torch.Tensor) -> None:
        if self.first_token_s is None:  # one host sync in the engine's life, to time the first token
            first.cpu()
            self.note_first_token()

    @torch.inference_mode()  # the buffers were made in inference mode, inside generate
    def sync_weights(self, policy) -> None:
        """Bring the inference weights up to date with ``policy`` (the engine's own model), which changed."""
        super().sync_weights(policy)
        if self.adapter.refresh():
            self.scheduler.drop_graphs()  # captured graphs point at the old tensors

    def reserve(self, longest_prompt: int) -> None:
        """The KV cache holds prompts of ``longest_prompt`` tokens from its next allocation on: an RL run's
        rollouts reallocated it, and captured every graph again, at the first step whose longest prompt was
        longer than any before (step 3 of every GRPO run on GSM8K, H200, 2026-12-04; that rollout took 0.4-1.9 s
        against ~0.35 s). A longer cache costs memory (from the first rollout on) and a longer row copy when
        finished rows are compacted; attention still reads each row's own length, in more splits of the
        longer span (a GRPO step on Qwen2.5-0.5B's shape measured the same, 0.80 s)."""
        self.scheduler.reserved_prompt_len = max(self.scheduler.reserved_prompt_len, longest_prompt)

    def release(self) -> None:
        """After a rollout: with ``quantized_rollouts=transient``, free the dense copy, the KV cache and
        the graphs for the trainer's update, and bring the 4-bit base's weights back from host memory
        (until then the model cannot run its own forward); the next ``generate`` builds them again."""
        if self.adapter.release():
            self.scheduler.release()

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], params: SamplingParams, progress: bool = False) -> list[Completion]:
        from tqdm.auto import tqdm

        self.check_lengths(prompts, params)
        g = params.n
        per_wave = max(1, self.scheduler.batch_size // g)  # prompts per wave; whole groups stay together
        out: list[Completion] = []
        bar = tqdm(total=len(prompts) * g, desc="generate[fast]", disable=not progress, unit="seq")
        if params.seed is not None:
            torch.manual_seed(params.seed)
        self.adapter.build_weights(self.scheduler.kv_bytes(prompts, params))  # first call: build the inference weights
        try:
            for start in range(0, len(prompts), per_wave):
                wave = prompts[start:start + per_wave]
                out.extend(self.scheduler.wave(wave, params, start))
                bar.update(len(wave) * g)
        except BaseException:
            self.release()  # a transient copy's 4-bit source comes back to the model, whatever stopped the rollout
            raise
        bar.close()
        return out
