"""The fast engine's decode state as typed records.

* ``KVCache``: K and V of every layer, pre-allocated ``[rows, kv_heads, max_len, head_dim]``.
* ``Rows``: what a decode step reads and writes per row, on the device.
* ``StepSpec``: what every decode step of one ``generate`` call shares (sampling, EOS ids, pad).
* ``Wave``: one wave's host-side bookkeeping — outputs so far, which original row each live slot holds.

The device tensors of ``KVCache`` and ``Rows`` persist across calls and are only ever rewritten in place:
captured CUDA graphs keep pointers to them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from posttrain.engine.base import SamplingParams


@dataclass
class KVCache:
    """Per-layer K and V as one flat tuple (k0, v0, k1, v1, …), the form the forwards (and
    torch.compile) take; each ``[rows, kv_heads, max_len, head_dim]``."""

    flat: tuple[torch.Tensor, ...]

    @classmethod
    def allocate(cls, layers: int, rows: int, kv_heads: int, max_len: int, head_dim: int, dtype, device) -> KVCache:
        shape = (rows, kv_heads, max_len, head_dim)
        return cls(tuple(torch.zeros(shape, dtype=dtype, device=device) for _ in range(2 * layers)))

    @staticmethod
    def nbytes(layers: int, rows: int, kv_heads: int, max_len: int, head_dim: int, dtype) -> int:
        """What ``allocate`` with these arguments takes, without allocating."""
        return 2 * layers * rows * kv_heads * max_len * head_dim * torch.empty((), dtype=dtype).element_size()

    @property
    def rows(self) -> int:
        return self.flat[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.flat[0].shape[2]

    def fits(self, rows: int, max_len: int) -> bool:
        return self.rows >= rows and self.max_len >= max_len

    def compact(self, keep: torch.Tensor) -> None:
        """Move rows ``keep`` to the front (one copy of their K/V)."""
        n = len(keep)
        for cache in self.flat:
            cache[:n] = cache[keep]


@dataclass
class Rows:
    """Per-row device state of the decode step: the token each row feeds next and its position, the
    token sampled after it and its log-prob, whether the row has finished; ``arange`` indexes the rows."""

    tokens: torch.Tensor
    pos: torch.Tensor
    next: torch.Tensor
    logp: torch.Tensor
    done: torch.Tensor
    arange: torch.Tensor

    MUTATED = ("tokens", "pos", "done")
    """What a step changes besides its outputs (``next``, ``logp``), and what compaction moves."""

    @classmethod
    def allocate(cls, rows: int, device) -> Rows:
        return cls(tokens=torch.zeros(rows, dtype=torch.long, device=device), pos=torch.zeros(rows, dtype=torch.long, device=device),
                   next=torch.zeros(rows, dtype=torch.long, device=device), logp=torch.zeros(rows, dtype=torch.float32, device=device),
                   done=torch.zeros(rows, dtype=torch.bool, device=device), arange=torch.arange(rows, device=device))

    def start(self, first: torch.Tensor, lens: torch.Tensor, eos: torch.Tensor, pad: int) -> None:
        """Rows [0, n) feed their first sampled token at their prompt's length; the rest are finished padding."""
        n = len(first)
        self.tokens[:n] = first
        self.pos[:n] = lens
        self.done[:n] = (first[:, None] == eos[None]).any(-1) if eos.numel() else False
        self.done[n:] = True
        self.pos[n:] = 0
        self.tokens[n:] = pad

    def snapshot(self, n: int) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, name)[:n].clone() for name in self.MUTATED)

    def restore(self, snapshot: tuple[torch.Tensor, ...], n: int) -> None:
        for name, saved in zip(self.MUTATED, snapshot):
            getattr(self, name)[:n].copy_(saved)

    def compact(self, keep: torch.Tensor) -> None:
        """Move rows ``keep`` to the front; the rows after them are marked finished, at position 0 (a
        finished row's attention reads one token)."""
        n = len(keep)
        for name in self.MUTATED:
            t = getattr(self, name)
            t[:n] = t[keep]
        self.done[n:] = True
        self.pos[n:] = 0


@dataclass(eq=False)
class StepSpec:
    """What every decode step of one generate call shares; the constants here are baked into the
    captured graphs, so ``graph_key`` names them."""

    params: SamplingParams
    eos: torch.Tensor
    """Ids that finish a row (empty when EOS is ignored)."""
    pad: int
    """The token a finished row emits."""
    max_pos: int
    """The last position the KV cache holds."""

    @property
    def graph_key(self) -> tuple:
        return self.params.temperature, self.params.top_p, self.params.ignore_eos


@dataclass
class Wave:
    """Host-side bookkeeping of one wave: every row's tokens and log-probs so far (``[rows, steps]``, on
    the device), the original row of each live slot, the live rows' prompt lengths, and the step ``t``."""

    tokens: torch.Tensor
    logps: torch.Tensor
    live: torch.Tensor
    lens: torch.Tensor
    longest_live: int
    """The longest live prompt, a Python int: no host sync inside the decode loop."""
    stop_hit: torch.Tensor
    """Per original row (on the host): a stop string has appeared."""
    t: int = 1

    @classmethod
    def start(cls, first: torch.Tensor, first_lp: torch.Tensor, lens: torch.Tensor, steps: int, longest: int) -> Wave:
        n = len(first)
        tokens = torch.zeros((n, steps), dtype=torch.long, device=first.device)
        logps = torch.zeros((n, steps), dtype=torch.float32, device=first.device)
        tokens[:, 0], logps[:, 0] = first, first_lp
        return cls(tokens, logps, torch.arange(n, device=first.device), lens, longest, torch.zeros(n, dtype=torch.bool))

    @property
    def n_live(self) -> int:
        return len(self.live)

    def record(self, rows: Rows) -> None:
        """Store the step's sampled tokens for the live rows; advance ``t``."""
        n = self.n_live
        self.tokens[self.live, self.t] = rows.next[:n]
        self.logps[self.live, self.t] = rows.logp[:n]
        self.t += 1

    def stop_hits(self, decode, stop: list[str], finished: torch.Tensor | None = None) -> torch.Tensor:
        """Per live slot (on the device of the outputs): its text so far (``decode(token ids)``)
        holds a stop string, now or at an earlier check. Slots already ``finished`` (at EOS) are not
        decoded: they end whatever their text holds."""
        rows = self.live.tolist()
        toks = self.tokens[self.live, :self.t].tolist()
        skip = finished.tolist() if finished is not None else [False] * len(rows)
        hits = torch.zeros(len(rows), dtype=torch.bool)
        for i, (r, seq) in enumerate(zip(rows, toks)):
            if skip[i]:
                continue
            if self.stop_hit[r]:
                hits[i] = True
                continue
            if any(s in decode(seq) for s in stop):
                hits[i] = self.stop_hit[r] = True
        return hits.to(self.tokens.device)

    def compact(self, keep: torch.Tensor) -> None:
        """Keep live slots ``keep`` (as ``Rows.compact`` moves them)."""
        self.live, self.lens = self.live[keep], self.lens[keep]
        self.longest_live = int(self.lens.max())
