"""The fast engine's scheduler: runs a generate call on a model adapter (``model_adapter``) in waves.

* A wave is as many whole groups (a prompt's ``n`` samples) as fit the batch; each distinct prompt is
  prefilled once, in chunks of bounded padded size, and its cache written into the G rows of its group.
* The KV cache ``[rows, kv_heads, max_len, head_dim]`` per layer is pre-allocated and reused across
  calls while it fits (``decode_state.KVCache``).
* Decode steps run on ``row buckets`` (1, 2, 4, …) and attended lengths rounded up to ``SPAN_STEP``;
  on CUDA each (rows, span, sampling) is captured once as a CUDA graph — projections, attention,
  sampling — so a step is one graph launch.
* Sampling (greedy, temperature, top-p) happens on the device with no host synchronisation per step
  (``kernels.sample``); the host looks at the finished flags only every ``sync_every`` steps, where it
  also checks stop strings and compacts the batch: live rows move to the front and a smaller graph
  takes over, so finished sequences stop costing work.
"""

from __future__ import annotations

import math
from typing import Callable, Protocol

import torch

from posttrain.engine import kernels
from posttrain.engine.base import Completion, SamplingParams, finish
from posttrain.engine.decode_state import KVCache, Rows, StepSpec, Wave
from posttrain.engine.models import sdpa_backends
from posttrain.utils import padded_chunks

ROW_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
SPAN_STEP = 64


class Decoder(Protocol):
    """What the scheduler needs of a model (``model_adapter.ModelAdapter``, or a mock in tests)."""

    n_layers: int
    n_kv: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device

    def prefill(self, ids: torch.Tensor, lens: torch.Tensor, dest: torch.Tensor, caches_flat: tuple) -> torch.Tensor:
        """Last-position logits [p, V] of right-padded prompts ``ids`` [p, W]; K/V into cache rows ``dest`` [p, G]."""

    def step(self, tokens: torch.Tensor, pos: torch.Tensor, ar: torch.Tensor, caches_flat: tuple, span: int) -> torch.Tensor:
        """Logits [n, V] for one token per row at ``pos``, its K/V written at cache rows ``ar``; no host syncs."""


def lse(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """log-sum-exp of logits / T in fp32. [n, V] -> [n]"""
    return torch.logsumexp(logits.float() / temperature, dim=-1)


def rows_bucket(n: int) -> int:
    return next((b for b in ROW_BUCKETS if b >= n), n)


class Scheduler:
    """Generates completions on a ``Decoder`` one wave at a time (``wave``); owns the KV cache, the
    per-row state and the captured graphs, which outlive a call."""

    def __init__(self, decoder: Decoder, tokenizer, eos: list[int], batch_size: int, *, use_graphs: bool, sync_every: int = 8,
                 prefill_tokens: int = 16384, compiled: bool = False, on_first_token: Callable[[torch.Tensor], None] | None = None):
        self.decoder, self.tokenizer = decoder, tokenizer
        self.device = decoder.device
        self.batch_size = max(1, batch_size)
        self.use_graphs = use_graphs
        self.sync_every = sync_every
        self.prefill_tokens = prefill_tokens  # padded prompt tokens per prefill forward (bounds its memory)
        self.on_first_token = on_first_token
        self.eos = list(eos)
        self.kv: KVCache | None = None
        self.rows: Rows | None = None
        self._graphs: dict = {}
        self._pool = None
        self._warmup: torch.cuda.Stream | None = None  # the one side stream captures warm up on (see ``step``)
        # Persistent tensors: captured graphs keep pointers to them.
        self._eos = torch.tensor(self.eos, dtype=torch.long, device=self.device)
        self._no_eos = torch.zeros(0, dtype=torch.long, device=self.device)
        self._lse = torch.compile(lse, dynamic=True) if compiled else lse

    def drop_graphs(self) -> None:
        """Forget captured graphs; later captures go to a fresh memory pool (the old one is released
        with its graphs and cannot take new ones)."""
        self._graphs.clear()
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None

    def release(self) -> None:
        """Free the KV cache, the rows and the captured graphs; the next call allocates them again."""
        self.drop_graphs()
        self.kv = self.rows = None

    # ------------------------------------------------------------------------------------ a step --
    def sample(self, logits: torch.Tensor, p: SamplingParams):
        """Next token and its log-prob under softmax(logits / T); no host synchronisation.

        ``logits`` may be bf16: the argmax is exact on them (bf16 -> fp32 is exact) and the
        log-sum-exp accumulates in fp32."""
        if p.greedy:
            tok = logits.argmax(-1)
            lp = logits.gather(-1, tok[:, None])[:, 0].float() - self._lse(logits, 1.0)
            return tok, lp
        return kernels.sample(logits, p.temperature, p.top_p)

    def decode(self, spec: StepSpec, n: int, span: int) -> None:
        """One decode step for rows [0, n): feeds ``rows.tokens`` at ``rows.pos``, writes ``rows.next``
        and ``rows.logp``, updates ``rows.done`` and advances tokens and positions."""
        r = self.rows
        tokens, pos = r.tokens[:n], r.pos[:n]
        logits = self.decoder.step(tokens, pos, r.arange[:n], self.kv.flat, span)
        nxt, lp = self.sample(logits, spec.params)
        done = r.done[:n]
        nxt = torch.where(done, torch.full_like(nxt, spec.pad), nxt)
        r.next[:n] = nxt
        r.logp[:n] = torch.where(done, torch.zeros_like(lp), lp)
        if spec.eos.numel():
            done |= (nxt[:, None] == spec.eos[None]).any(-1)
        tokens.copy_(nxt)
        pos.add_(1).clamp_(max=spec.max_pos)

    def step(self, spec: StepSpec, n: int, span: int) -> None:
        """``decode``, on CUDA as the replay of a graph captured once per (rows, span, sampling)."""
        if not self.use_graphs:
            self.decode(spec, n, span)
            return
        key = (n, span, spec.graph_key)
        graph = self._graphs.get(key)
        if graph is None:
            # Warm up on a side stream, then capture. Capture runs the step, so undo its effects:
            # snapshot the state it mutates and restore it before the real (replayed) step.
            # One side stream for the scheduler's life: cuBLAS keeps a workspace (32 MiB on Hopper) for
            # each stream it has run on, for the process's life, so a new stream per capture grew the
            # memory held by 0.16 GiB a rollout wherever graphs are captured again (issue 26).
            snap = self.rows.snapshot(n)
            if self._warmup is None:
                self._warmup = torch.cuda.Stream()
            s = self._warmup
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                self.decode(spec, n, span)
                self.rows.restore(snap, n)
            torch.cuda.current_stream().wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                self.decode(spec, n, span)
            self.rows.restore(snap, n)
            self._graphs[key] = graph
        graph.replay()

    # ------------------------------------------------------------------------------------ a wave --
    def shape(self, n_rows: int, longest: int, params: SamplingParams) -> tuple[int, int]:
        """(rows, max_len) of the KV cache for ``n_rows`` rows whose longest prompt has ``longest``
        tokens: rows a bucket of at least the batch (graphs are captured for it), max_len that prompt
        and its completion, rounded up."""
        max_len = int(math.ceil((longest + params.max_new_tokens + 1) / SPAN_STEP) * SPAN_STEP)
        return rows_bucket(max(n_rows, self.batch_size if self.use_graphs else n_rows)), max_len

    def kv_bytes(self, prompts: list[list[int]], params: SamplingParams) -> int:
        """What a generate call over ``prompts`` (in waves of whole groups) would allocate for its KV
        cache: 0 when the one held fits."""
        if not prompts:
            return 0
        per_wave = max(1, self.batch_size // params.n)
        rows, max_len = self.shape(min(len(prompts), per_wave) * params.n, max(len(p) for p in prompts), params)
        if self.kv is not None and self.kv.fits(rows, max_len):
            return 0
        d = self.decoder
        return KVCache.nbytes(d.n_layers, rows, d.n_kv, max_len, d.head_dim, d.dtype)

    def spec(self, rows: int, max_len: int, params: SamplingParams) -> StepSpec:
        """The buffers for one generation call (the KV cache and rows, reused across calls when they
        fit) and the constants its steps share."""
        d = self.decoder
        if self.kv is None or not self.kv.fits(rows, max_len):
            self.drop_graphs()  # graphs point into the old buffers
            self.kv = KVCache.allocate(d.n_layers, rows, d.n_kv, max_len, d.head_dim, d.dtype, self.device)
            self.rows = Rows.allocate(rows, self.device)
        return StepSpec(params, self._no_eos if params.ignore_eos else self._eos, int(self.tokenizer.pad_token_id or 0),
                        self.kv.max_len - 1)

    @torch.no_grad()
    def prefill(self, prompts: list[list[int]], rows: torch.Tensor) -> torch.Tensor:
        """Run each prompt once; write its K/V into cache rows ``rows`` (one list of rows per prompt's
        group); return the last-position logits [P, V] (fp32)."""
        out = []
        for start, stop in padded_chunks([len(p) for p in prompts], self.prefill_tokens):
            chunk = prompts[start:stop]
            width = max(len(p) for p in chunk)
            ids = torch.tensor([p + [0] * (width - len(p)) for p in chunk], device=self.device)
            lens = torch.tensor([len(p) for p in chunk], device=self.device)
            with sdpa_backends():
                out.append(self.decoder.prefill(ids, lens, rows[start:stop], self.kv.flat))
        return torch.cat(out)

    def wave(self, prompts: list[list[int]], params: SamplingParams, offset: int) -> list[Completion]:
        """Completions of ``prompts`` (``params.n`` each), which fit one batch; ``offset``: the first one's prompt index."""
        g, n_rows = params.n, len(prompts) * params.n
        longest = max(len(p) for p in prompts)
        cap_rows, max_len = self.shape(n_rows, longest, params)
        spec = self.spec(cap_rows, max_len, params)
        last_logits = self.prefill(prompts, torch.arange(n_rows, device=self.device).view(len(prompts), g))  # [P, V]
        first, first_lp = self.sample(last_logits.repeat_interleave(g, 0), params)
        if self.on_first_token is not None:
            self.on_first_token(first)
        lens = torch.tensor([len(p) for p in prompts], device=self.device).repeat_interleave(g)
        self.rows.start(first, lens, spec.eos, spec.pad)
        steps = params.max_new_tokens
        wave = Wave.start(first, first_lp, lens, steps, longest)
        while wave.t < steps:
            n_b = rows_bucket(wave.n_live) if self.use_graphs else wave.n_live
            span = min(max_len, int(math.ceil((wave.longest_live + wave.t + 1) / SPAN_STEP) * SPAN_STEP))
            for _ in range(min(self.sync_every, steps - wave.t)):
                self.step(spec, n_b, span)
                wave.record(self.rows)
                if wave.longest_live + wave.t + 1 > span:
                    break
            # ---- host sync point: finished rows, stop strings, compaction
            done = self.rows.done[:wave.n_live].clone()
            if params.stop:
                done |= wave.stop_hits(lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True), params.stop)
            if bool(done.all()):
                break
            keep = (~done).nonzero()[:, 0]
            if self.use_graphs and rows_bucket(len(keep)) < n_b or not self.use_graphs and len(keep) < wave.n_live:
                self.kv.compact(keep)
                self.rows.compact(keep)
                wave.compact(keep)
        tokens, logps = wave.tokens.tolist(), wave.logps.tolist()
        eos = set(self.eos)
        return [finish(self.tokenizer, offset + r // g, tokens[r], eos, params.stop, logps[r], params.ignore_eos)
                for r in range(n_rows)]
