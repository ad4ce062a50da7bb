"""The fast engine's scheduler: runs a generate call on a model adapter (``model_adapter``) in waves.

* A wave is as many whole groups (a prompt's ``n`` samples) as fit the batch; each distinct prompt is
  prefilled once, in chunks of bounded padded size, and its cache written into the G rows of its group.
* The KV cache ``[rows, kv_heads, max_len, head_dim]`` per layer is pre-allocated and reused across
  calls while it fits (``decode_state.KVCache``).
* Decode steps run on ``row buckets`` (…, 32, 48, 64, 96, …); on CUDA each (rows, sampling) is captured
  once as a CUDA graph — projections, attention, sampling — so a step is one graph launch. A graph
  attends to the whole cache span: its attention kernel reads each row's own length only, so one graph
  serves a wave's every step at that many rows (a graph per attended-length bucket as well cost a
  capture every ``SPAN_STEP`` tokens at each row count). Graphs are not made for fewer than
  ``GRAPH_MIN_ROWS`` rows (or the cache's rows, if fewer): a step that small costs what it costs at that
  many (Qwen2.5-0.5B's shape on an H200: 1.05 ms at 1 row, 1.06 at 32; a finished row's attention reads
  one token), so smaller buckets would only add captures. Where the driver allows, only a graph key's
  first capture warms the step up eagerly (``_capture``).
  Without graphs (CPU) the attended span is rounded up to ``SPAN_STEP`` from the longest live row,
  since the reference attention reads all of it.
* A prefill runs the prompts shortest first, so each chunk pads to a length close to its prompts'
  (GSM8K's 1319 chat prompts for Qwen2.5: 3.7% padding where the dataset's order padded 32.5%).
* Sampling (greedy, temperature, top-p) happens on the device with no host synchronisation per step
  (``kernels.sample``); the host looks at the finished flags only every ``sync_every`` steps, where it
  also checks stop strings and compacts the batch: live rows move to the front and a smaller graph
  takes over, so finished sequences stop costing work.
"""

from __future__ import annotations

import ctypes
import functools
import math
import time
from typing import Callable, Protocol

import torch

from posttrain.engine import kernels
from posttrain.engine.base import Completion, SamplingParams, finish
from posttrain.engine.decode_state import KVCache, Rows, StepSpec, Wave
from posttrain.engine.models import sdpa_backends
from posttrain.utils import padded_chunks

ROW_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
GRAPH_MIN_ROWS = 32
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


def rows_bucket(n: int) -> int:
    """The smallest of ``ROW_BUCKETS`` that holds ``n`` rows; past the last, ``n`` rounded up to a multiple
    of 256 (each row count a graph of its own cost 14 captures above 1024 rows in a GSM8K evaluation)."""
    return next((b for b in ROW_BUCKETS if b >= n), -(-n // 256) * 256)


@functools.cache
def driver_loads_kernels_in_capture() -> bool:
    """Whether the CUDA driver loads a kernel met first inside a graph capture (lazy loading during
    capture: drivers for CUDA 12.3 and later); with an older one, or none found, every capture warms up."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    version = ctypes.c_int(0)
    return libcuda.cuDriverGetVersion(ctypes.byref(version)) == 0 and version.value >= 12030


class Scheduler:
    """Generates completions on a ``Decoder`` one wave at a time (``wave``); owns the KV cache, the
    per-row state and the captured graphs, which outlive a call."""

    def __init__(self, decoder: Decoder, tokenizer, eos: list[int], batch_size: int, *, use_graphs: bool, sync_every: int = 8,
                 prefill_tokens: int = 16384, on_first_token: Callable[[torch.Tensor], None] | None = None):
        self.decoder, self.tokenizer = decoder, tokenizer
        self.device = decoder.device
        self.batch_size = max(1, batch_size)
        self.use_graphs = use_graphs
        self.sync_every = sync_every
        self.prefill_tokens = prefill_tokens  # padded prompt tokens per prefill forward (bounds its memory)
        self.on_first_token = on_first_token
        self.eos = list(eos)
        self.reserved_prompt_len = 0  # KV caches hold prompts at least this long (``reserve``)
        self.kv: KVCache | None = None
        self.rows: Rows | None = None
        self._graphs: dict = {}
        self._pool = None
        self._warmup: torch.cuda.Stream | None = None  # the one side stream captures warm up on (see ``_capture``)
        self._warmed: set = set()  # graph keys whose step has run eagerly on that stream (see ``_capture``)
        self.graph_min_rows = GRAPH_MIN_ROWS
        # Persistent tensors: captured graphs keep pointers to them.
        self._eos = torch.tensor(self.eos, dtype=torch.long, device=self.device)
        self._no_eos = torch.zeros(0, dtype=torch.long, device=self.device)
        self.captures, self.capture_s = 0, 0.0  # CUDA graphs captured in this scheduler's life, and the host time they took

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
            return kernels.greedy(logits)
        return kernels.sample(logits, p.temperature, p.top_p)

    def decode(self, spec: StepSpec, n: int, span: int) -> None:
        """One decode step for rows [0, n): feeds ``rows.tokens`` at ``rows.pos``, writes ``rows.next``
        and ``rows.logp``, updates ``rows.done`` and advances tokens and positions."""
        r = self.rows
        tokens, pos = r.tokens[:n], r.pos[:n]
        logits = self.decoder.step(tokens, pos, r.arange[:n], self.kv.flat, span)
        nxt, lp = self.sample(logits, spec.params)
        kernels.advance_rows(nxt, lp, r.done[:n], tokens, pos, r.next[:n], r.logp[:n], spec.eos, spec.pad, spec.max_pos)

    def step_rows(self, n_live: int) -> int:
        """The rows a step runs on for ``n_live`` live ones: with graphs, their bucket, at least
        ``graph_min_rows`` as far as the cache has rows; without, the live rows themselves."""
        if not self.use_graphs:
            return n_live
        return min(max(rows_bucket(n_live), self.graph_min_rows), self.kv.rows)

    def step(self, spec: StepSpec, n: int, span: int) -> None:
        """``decode``, on CUDA as the replay of a graph captured once per (rows, sampling), which
        attends to the whole cache (``span`` is for the plain path)."""
        if not self.use_graphs:
            self.decode(spec, n, span)
            return
        key = (n, spec.graph_key)
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._capture(spec, n)
            self._graphs[key] = graph
        graph.replay()

    def _capture(self, spec: StepSpec, n: int):
        """A CUDA graph of ``decode`` over rows [0, n), attending to the whole cache.

        Captured on a side stream, after an eager warm-up run of the step there (its libraries' handles
        and workspaces made, its kernels compiled and loaded; the state a step mutates is snapshot and
        restored around it). The warm-up runs before a graph key's first capture, and before every
        capture where the driver cannot load a kernel inside one (``driver_loads_kernels_in_capture``)
        or torch.compile may recompile in it; elsewhere later captures skip it (half a capture's host
        time), and one that fails anyway (a kernel that would not load inside the capture) is made again
        after a warm-up. One side stream for the scheduler's life: cuBLAS keeps a workspace (32 MiB on
        Hopper) for each stream it has run on, for the process's life, so a new stream per capture grew the
        memory held by 0.16 GiB a rollout wherever graphs are captured again (issue 26).
        ``capture_begin``/``capture_end``, not the ``torch.cuda.graph`` context: that one synchronises the
        device and empties the allocator's caches (device and pinned host) at each capture, which a
        capture in the middle of a wave does not need."""
        t = time.perf_counter()
        if self._warmup is None:
            self._warmup = torch.cuda.Stream()
        skip = spec.graph_key in self._warmed and driver_loads_kernels_in_capture() and not getattr(self.decoder, "compiled", False)
        try:
            graph = self._record(spec, n, warm_up=not skip)
        except Exception:
            if not skip:
                raise
            graph = self._record(spec, n, warm_up=True)
        self._warmed.add(spec.graph_key)
        self.captures += 1
        self.capture_s += time.perf_counter() - t
        return graph

    def _record(self, spec: StepSpec, n: int, warm_up: bool):
        """One capture of ``decode`` over rows [0, n) on the side stream (see ``_capture``); the rows'
        state is as it was before, whether it succeeds or not."""
        span = self.kv.max_len
        snap = self.rows.snapshot(n)
        s = self._warmup
        s.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.stream(s):
                if warm_up:
                    self.decode(spec, n, span)
                    self.rows.restore(snap, n)
                graph.capture_begin(pool=self._pool)
                try:
                    self.decode(spec, n, span)
                except BaseException:
                    try:  # end the broken capture; the step's own error is the one to report
                        graph.capture_end()
                    except Exception:
                        pass
                    raise
                graph.capture_end()
        finally:
            torch.cuda.current_stream().wait_stream(s)
            self.rows.restore(snap, n)  # (a capture records without running; CPU stand-ins in the tests run it)
        return graph

    # ------------------------------------------------------------------------------------ a wave --
    def shape(self, n_rows: int, longest: int, params: SamplingParams) -> tuple[int, int]:
        """(rows, max_len) of the KV cache for ``n_rows`` rows whose longest prompt has ``longest``
        tokens: rows a bucket of at least the batch (graphs are captured for it; past the last bucket,
        those rows exactly), max_len that prompt (at least ``reserved_prompt_len``) and its completion, rounded up."""
        longest = max(longest, self.reserved_prompt_len)
        max_len = int(math.ceil((longest + params.max_new_tokens + 1) / SPAN_STEP) * SPAN_STEP)
        rows = max(n_rows, self.batch_size if self.use_graphs else n_rows)
        return (rows_bucket(rows) if rows <= ROW_BUCKETS[-1] else rows), max_len  # past the buckets: no padding rows

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
        group); return the last-position logits [P, V] (the lm_head's dtype, as the steps')."""
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # shortest first: little padding
        ordered = [prompts[i] for i in order]
        where = self._to_device(torch.tensor(order))  # each sorted prompt's place in the prompts' order
        dest = rows[where]
        logits = None
        for start, stop in padded_chunks([len(p) for p in ordered], self.prefill_tokens):
            chunk = ordered[start:stop]
            width = max(len(p) for p in chunk)
            # From pinned memory, without waiting: a copy from pageable memory waits for the GPU to
            # finish the chunk before, so the host could not queue this chunk's kernels meanwhile.
            ids = self._to_device(torch.tensor([p + [0] * (width - len(p)) for p in chunk]))
            lens = self._to_device(torch.tensor([len(p) for p in chunk]))
            with sdpa_backends():
                out = self.decoder.prefill(ids, lens, dest[start:stop], self.kv.flat)
            if logits is None:
                logits = out.new_empty((len(prompts), out.shape[1]))
            logits[where[start:stop]] = out
        return logits

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type != "cuda":
            return t.to(self.device)
        return t.pin_memory().to(self.device, non_blocking=True)

    def wave(self, prompts: list[list[int]], params: SamplingParams, offset: int) -> list[Completion]:
        """Completions of ``prompts`` (``params.n`` each), which fit one batch; ``offset``: the first one's prompt index."""
        g, n_rows = params.n, len(prompts) * params.n
        longest = max(len(p) for p in prompts)
        cap_rows, max_len = self.shape(n_rows, longest, params)
        spec = self.spec(cap_rows, max_len, params)
        last_logits = self.prefill(prompts, torch.arange(n_rows, device=self.device).view(len(prompts), g))  # [P, V]
        last_logits = last_logits.repeat_interleave(g, 0)
        # The first tokens come from the prefill's logits in the steps' dtype, through the steps' kernels: no
        # variant of their own to compile or load (fp32 logits took 0.12 s of PyTorch kernels in a first call).
        first, first_lp = self.sample(last_logits, params)
        lens = self._to_device(torch.tensor([len(p) for p in prompts])).repeat_interleave(g)  # not waiting for the prefill
        self.rows.start(first, lens, spec.eos, spec.pad)
        steps = params.max_new_tokens
        wave = Wave.start(first, first_lp, lens, steps, longest)
        if self.on_first_token is not None:
            self.on_first_token(first)
        while wave.t < steps:
            n_b = self.step_rows(wave.n_live)
            span = self.kv.max_len if self.use_graphs else min(max_len, int(math.ceil((wave.longest_live + wave.t + 1) / SPAN_STEP) * SPAN_STEP))
            for _ in range(min(self.sync_every, steps - wave.t)):
                self.step(spec, n_b, span)
                wave.record(self.rows)
                if wave.longest_live + wave.t + 1 > span:
                    break
            # ---- host sync point: finished rows, stop strings, compaction
            done = self.rows.done[:wave.n_live].clone()
            if params.stop:
                done |= wave.stop_hits(lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True), params.stop, finished=done)
            if bool(done.all()):
                break
            keep = (~done).nonzero()[:, 0]
            if self.step_rows(len(keep)) < n_b:
                self.kv.compact(keep)
                self.rows.compact(keep)
                wave.compact(keep)
        tokens, logps = wave.tokens.tolist(), wave.logps.tolist()
        eos = set(self.eos)
        return [finish(self.tokenizer, offset + r // g, tokens[r], eos, params.stop, logps[r], params.ignore_eos)
                for r in range(n_rows)]
