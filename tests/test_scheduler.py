"""The fast engine's scheduler alone, on a mock decoder whose next token is a closed form of what the
KV cache holds: waves, prefill chunks, group rows, EOS, stop strings and compaction are checked
without a transformer."""

import contextlib

import pytest
import torch
import torch.nn.functional as F

from posttrain.engine import SamplingParams
from posttrain.engine.scheduler import Scheduler

M = 31  # tokens count modulo M; token M is the mock's "something went wrong" sentinel
SENTINEL = M


class CountingDecoder:
    """After the token at position j of a sequence whose first prompt token is p0, the next token is
    (p0 + j + 1) mod M. p0 is read back from the row's V cache and the previous token from its K cache (prefill
    writes every prompt token there, steps write theirs), so a row moved wrongly at compaction, a token fed at the wrong
    position or a step attending past its span emits the sentinel instead."""

    n_layers, n_kv, head_dim, dtype, device = 1, 1, 1, torch.float32, torch.device("cpu")

    def __init__(self):
        self.prefills, self.widths, self.steps = [], [], []

    @staticmethod
    def _logits(tok):
        return 40.0 * F.one_hot(tok, M + 1).float()

    def prefill(self, ids, lens, dest, caches_flat):
        k, v = caches_flat
        self.prefills.append(ids.shape[0])
        self.widths.append(ids.shape[1])
        for cache in (k, v):
            cache[dest.reshape(-1), 0, :ids.shape[1], 0] = ids.float().repeat_interleave(dest.shape[1], 0)
        return self._logits((ids[:, 0] + lens) % M)

    def step(self, tokens, pos, ar, caches_flat, span):
        k, v = caches_flat
        self.steps.append(len(tokens))
        k[ar, 0, pos, 0] = v[ar, 0, pos, 0] = tokens.float()
        p0 = v[ar, 0, 0, 0].long()
        ok = (tokens == (p0 + pos) % M) & (pos < span) & (k[ar, 0, pos - 1, 0].long() == (p0 + pos - 1) % M)
        return self._logits(torch.where(ok, (p0 + pos + 1) % M, torch.full_like(tokens, SENTINEL)))


class StubTok:
    pad_token_id = 0
    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def expected(prompt, n_new, eos=None):
    out = []
    for i in range(n_new):
        out.append((prompt[0] + len(prompt) + i) % M)
        if out[-1] == eos:
            break
    return out


def counting_prompts(lengths, firsts):
    """Prompts that follow the mock's rule: p0, p0 + 1, … (mod M)."""
    return [[(p0 + j) % M for j in range(n)] for n, p0 in zip(lengths, firsts)]


def scheduler(decoder, eos=(), batch_size=8, **kw):
    return Scheduler(decoder, StubTok(), list(eos), batch_size, use_graphs=False, **kw)


@torch.inference_mode()
def test_greedy_wave_with_groups_eos_and_compaction():
    dec = CountingDecoder()
    prompts = counting_prompts([3, 9, 5, 2], [1, 4, 20, 27])
    eos = 7
    out = scheduler(dec, eos=[eos], sync_every=1).wave(prompts, SamplingParams(max_new_tokens=12, n=2), offset=10)
    assert [c.prompt_index for c in out] == [10, 10, 11, 11, 12, 12, 13, 13]
    for c, p in zip(out, [p for p in prompts for _ in range(2)]):
        assert c.token_ids == expected(p, 12, eos)
        assert c.finish_reason == ("eos" if c.token_ids[-1] == eos else "length")
    assert {c.finish_reason for c in out} == {"eos", "length"}
    assert dec.prefills == [4]  # each distinct prompt once, for its whole group
    assert dec.steps[0] == 8 and dec.steps[-1] < 8  # finished rows were compacted away
    assert dec.steps == sorted(dec.steps, reverse=True)


@torch.inference_mode()
def test_prefill_shortest_first_in_chunks_and_a_cache_reused_while_it_fits():
    dec = CountingDecoder()
    sch = scheduler(dec, prefill_tokens=12)
    prompts = counting_prompts([3, 9, 5, 2, 6], [1, 4, 20, 27, 3])
    out = sch.wave(prompts, SamplingParams(max_new_tokens=5), offset=0)
    assert [c.token_ids for c in out] == [expected(p, 5) for p in prompts]
    # Shortest first, in padded chunks within 12 tokens: (2, 3), (5, 6), (9); each row's tokens above
    # follow from its own prompt's cache, so the logits and cache rows went back to the prompts' order.
    assert dec.prefills == [2, 2, 1] and dec.widths == [3, 6, 9]
    kv = sch.kv
    sch.wave(prompts[:2], SamplingParams(max_new_tokens=5), offset=0)
    assert sch.kv is kv  # a smaller call reuses the cache
    sch.wave(prompts[:1], SamplingParams(max_new_tokens=100), offset=0)
    assert sch.kv is not kv and sch.kv.max_len >= 3 + 100  # a longer one gets a new, larger one


@torch.inference_mode()
def test_stop_strings_end_rows_at_the_host_check():
    dec = CountingDecoder()
    prompts = counting_prompts([2, 2], [1, 11])  # completions 3 4 5 6 7 … and 13 14 15 …
    out = scheduler(dec, sync_every=2).wave(prompts, SamplingParams(max_new_tokens=10, stop=["5 6"]), offset=0)
    assert out[0].finish_reason == "stop" and out[0].text == "3 4 " and out[0].token_ids == [3, 4, 5]
    assert out[1].finish_reason == "length" and out[1].token_ids == expected(prompts[1], 10)
    assert dec.steps[-1] == 1  # the stopped row left the batch


@pytest.mark.parametrize("top_p", [1.0, 0.9])
@torch.inference_mode()
def test_sampling_follows_a_peaked_distribution(top_p):
    """Through the sampling kernel: logits this peaked leave one token with all the mass."""
    torch.manual_seed(0)
    dec = CountingDecoder()
    prompts = counting_prompts([4, 7], [2, 9])
    out = scheduler(dec).wave(prompts, SamplingParams(max_new_tokens=8, temperature=0.7, top_p=top_p, n=3, logprobs=True), offset=0)
    assert [c.token_ids for c in out] == [expected(p, 8) for p in prompts for _ in range(3)]
    assert all(abs(lp) < 1e-6 for c in out for lp in c.logprobs)


@torch.inference_mode()
def test_finished_rows_emit_padding_and_never_count():
    """A row that hit EOS keeps decoding as padding until the next host check; none of it reaches the completion."""
    dec = CountingDecoder()
    prompts = counting_prompts([2, 2], [4, 20])  # row 0: 6 7 … hits EOS 7 at its second token
    out = scheduler(dec, eos=[7], sync_every=8).wave(prompts, SamplingParams(max_new_tokens=8, logprobs=True), offset=0)
    assert out[0].token_ids == [6, 7] and out[0].finish_reason == "eos" and len(out[0].logprobs) == 2
    assert out[1].token_ids == expected(prompts[1], 8)


class FakeCudaGraphs:
    """CUDA's stream and graph calls as the scheduler makes them, on the CPU: a "capture" records the
    decode step it runs and a replay runs that step again on the buffers as they are then, as a real
    graph replays its kernels. Counts the streams made and the steps run eagerly (warm-ups); records
    each capture's (rows, span)."""

    def __init__(self, monkeypatch, sch: Scheduler):
        self.streams, self.eager, self.captured, self.recording, self.replaying = 0, 0, [], None, False
        fakes = self
        stream = type("Stream", (), {"wait_stream": lambda self, other: None})

        class Graph:
            def capture_begin(self, pool=None):
                fakes.recording = self

            def capture_end(self):
                fakes.recording = None
                fakes.captured.append(self.step[1:])

            def replay(self):
                fakes.replaying = True
                decode(*self.step)
                fakes.replaying = False

        def new_stream():
            self.streams += 1
            return stream()

        decode = sch.decode

        def recorded(spec, n, span):
            if self.recording is not None:
                self.recording.step = (spec, n, span)
            elif not self.replaying:
                self.eager += 1
            decode(spec, n, span)

        sch.use_graphs = True
        monkeypatch.setattr(sch, "decode", recorded)
        for name, fake in {"Stream": new_stream, "current_stream": stream, "stream": lambda s: contextlib.nullcontext(),
                           "graph_pool_handle": object, "CUDAGraph": Graph}.items():
            monkeypatch.setattr(torch.cuda, name, fake)


@pytest.mark.parametrize("loads_in_capture", [True, False])
@torch.inference_mode()
def test_graph_captures_give_the_same_tokens_once_per_row_bucket_on_one_stream(monkeypatch, loads_in_capture):
    """The captured path (snapshot, warm-up, capture, restore, replay) gives the tokens of the plain
    one; a wave captures once per row bucket it runs at, each graph attending to the whole cache (the
    attended span grows past 64 here, which cost a capture of its own when graphs were keyed by it);
    every capture of the scheduler's life runs on one side stream: cuBLAS keeps a workspace for each
    stream it ran on, so a stream per capture grew the memory held by 0.16 GiB a rollout on the 8B
    shape, where each rollout captures again (issue 26). The step warms up eagerly once in the
    scheduler's life where the driver loads kernels inside a capture, before every capture elsewhere."""
    monkeypatch.setattr("posttrain.engine.scheduler.driver_loads_kernels_in_capture", lambda: loads_in_capture)
    prompts = counting_prompts([3, 9, 5, 2], [1, 4, 20, 27])
    eos_stops = SamplingParams(max_new_tokens=70, n=2)  # rows finish at EOS: compaction to smaller row buckets
    long = SamplingParams(max_new_tokens=70, n=2, ignore_eos=True)  # every row runs 70 steps: the plain path's span goes 64 -> 128
    for params in (eos_stops, long):
        want = [c.token_ids for c in scheduler(CountingDecoder(), eos=[7], sync_every=1).wave(prompts, params, offset=0)]
        assert max(map(len, want)) == (70 if params is long else 26)
        sch = scheduler(CountingDecoder(), eos=[7], sync_every=1)
        sch.graph_min_rows = 1  # buckets of 8, 4 and 2 rows
        cuda = FakeCudaGraphs(monkeypatch, sch)
        steps = []
        monkeypatch.setattr(sch.decoder, "step", lambda tokens, *a, f=sch.decoder.step, steps=steps: steps.append(len(tokens)) or f(tokens, *a))
        for _ in range(2):  # the second call captures again after the graphs are dropped, as after a transient release
            cuda.captured.clear()
            assert [c.token_ids for c in sch.wave(prompts, params, offset=0)] == want
            rows = sorted({n for n, _ in cuda.captured})
            assert [n for n, _ in sorted(cuda.captured)] == rows == sorted(set(steps))
            assert {span for _, span in cuda.captured} == {sch.kv.max_len} and sch.kv.max_len > 64
            sch.release()
        assert len(rows) == (1 if params is long else 3) and sch.captures == 2 * len(rows) and cuda.streams == 1
        assert cuda.eager == (1 if loads_in_capture else sch.captures)


@torch.inference_mode()
def test_a_capture_that_fails_without_its_warm_up_is_made_again_after_one(monkeypatch):
    """Where the driver loads kernels inside a capture, later captures skip the warm-up; one that fails
    anyway (e.g. a kernel compiled for its row count that will not load inside it) is made again after
    a warm-up, and the tokens are the plain path's."""
    monkeypatch.setattr("posttrain.engine.scheduler.driver_loads_kernels_in_capture", lambda: True)
    prompts = counting_prompts([3, 9, 5, 2], [1, 4, 20, 27])
    params = SamplingParams(max_new_tokens=70, n=2)
    want = [c.token_ids for c in scheduler(CountingDecoder(), eos=[7], sync_every=1).wave(prompts, params, offset=0)]
    sch = scheduler(CountingDecoder(), eos=[7], sync_every=1)
    sch.graph_min_rows = 1
    cuda = FakeCudaGraphs(monkeypatch, sch)
    step, failed = sch.decoder.step, []

    def refuses_in_capture(tokens, *a):
        if cuda.recording is not None and len(tokens) == 4 and not failed:
            failed.append(cuda.eager)
            raise RuntimeError("operation not permitted when stream is capturing")
        return step(tokens, *a)

    monkeypatch.setattr(sch.decoder, "step", refuses_in_capture)
    assert [c.token_ids for c in sch.wave(prompts, params, offset=0)] == want
    assert failed == [1]  # the 4-row capture failed after the first capture's warm-up alone
    assert sorted({n for n, _ in cuda.captured}) == [2, 4, 8] and cuda.eager == 2  # made again after a warm-up


@torch.inference_mode()
def test_graphs_run_at_least_the_minimum_rows_the_cache_holds(monkeypatch):
    """With graphs, a step runs on at least ``graph_min_rows`` rows (finished rows as padding), never more
    than the cache holds; the tokens are the plain path's."""
    prompts = counting_prompts([3, 9, 5, 2], [1, 4, 20, 27])
    params = SamplingParams(max_new_tokens=30, n=2)  # 8 rows, finishing at EOS
    want = [c.token_ids for c in scheduler(CountingDecoder(), eos=[7], sync_every=1).wave(prompts, params, offset=0)]
    for batch_size, rows in ((64, [32]), (8, [8])):
        sch = scheduler(CountingDecoder(), eos=[7], batch_size=batch_size, sync_every=1)
        cuda = FakeCudaGraphs(monkeypatch, sch)
        assert [c.token_ids for c in sch.wave(prompts, params, offset=0)] == want
        assert sch.kv.rows == batch_size and sorted({n for n, _ in cuda.captured}) == rows


@torch.inference_mode()
def test_kv_bytes_is_what_the_call_allocates_and_nothing_once_the_cache_fits():
    """What ``kv_bytes`` foresees for a call (its waves' KV cache: the batch's rows, the longest prompt
    and its completion) is what the call allocates; 0 once the cache held fits (``auto`` weighs it)."""
    sch = scheduler(CountingDecoder(), batch_size=4)
    prompts = counting_prompts([3, 9, 5, 2, 6], [1, 4, 20, 27, 3])
    params = SamplingParams(max_new_tokens=5, n=2)
    foreseen = sch.kv_bytes(prompts, params)
    sch.wave(prompts[:2], params, offset=0)  # a wave: two prompts of the batch of 4 rows, the longest (9) among them
    assert foreseen == sum(t.numel() * t.element_size() for t in sch.kv.flat) > 0
    assert sch.kv_bytes(prompts, params) == 0 and sch.kv_bytes([], params) == 0
    assert sch.kv_bytes(counting_prompts([200], [1]), params) > 0  # a longer prompt needs a new cache


def test_row_buckets_past_1024_are_multiples_of_256_and_the_cache_holds_the_batch_exactly():
    """Past the last bucket a row count rounds up to a multiple of 256 (not a graph per count), the cache
    holds the batch's rows and no padding rows, and a step never runs on more rows than the cache holds."""
    from types import SimpleNamespace

    from posttrain.engine.scheduler import rows_bucket

    assert [rows_bucket(n) for n in (1, 20, 33, 1024, 1025, 1319, 1536, 1537)] == [1, 24, 48, 1024, 1280, 1536, 1536, 1792]
    sch = Scheduler(CountingDecoder(), StubTok(), [], 1319, use_graphs=True)
    assert sch.shape(1319, 10, SamplingParams(max_new_tokens=5)) == (1319, 64)
    assert sch.shape(100, 10, SamplingParams(max_new_tokens=5))[0] == 1319  # graphs: at least the batch
    sch.kv = SimpleNamespace(rows=1319)
    assert [sch.step_rows(n) for n in (1319, 1300, 1280, 1200, 1024, 700, 40, 3)] == [1319, 1319, 1280, 1280, 1024, 768, 48, 32]
