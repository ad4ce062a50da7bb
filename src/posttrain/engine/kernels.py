"""Triton kernels for the fast engine's decode step, each with a plain-PyTorch reference that CPU
runs (and tests) use. The two are checked against each other on GPU (``bench/kernel_checks.py``).

* ``decode_attention``: one query token per row against that row's KV cache, grouped-query aware.
  One program per (row, KV head, split) loads the G query heads that share the KV head as a small
  [G, d] tile, so each K/V block is read from memory once for all of them; long contexts are cut
  into splits whose partial softmaxes are merged by a second, tiny kernel (flash-decoding). Each
  row reads only its own length, not a padded span.
* ``sample``: temperature / top-p sampling of one token per row without sorting the vocabulary.
  Candidates are drawn from the full distribution by inverse CDF (one uniform each) and the first
  one inside the nucleus is taken — rejection sampling, so the result is distributed exactly as
  the renormalised nucleus. A token is in the nucleus when the probability mass of the tokens
  strictly more likely than it is below ``top_p`` (the sorted-prefix rule; tied tokens at the edge
  are all kept). Each candidate is rejected with probability at most 1 - top_p. When all K of a
  round are, every token no likelier than the likeliest of them is outside the nucleus too, so the
  next round draws from the tokens above it (a rising pivot), where acceptance is likelier still.
  Only after ``ROUNDS`` such rounds — probability at most (1 - top_p)^(K·ROUNDS), 1e-16 at top_p
  0.9 — is the most likely token (always in the nucleus) taken.
  The first round, which decides all but a (1 - top_p)^K fraction of rows, runs wide: the vocabulary
  is cut into chunks and each pass is one program per (row, chunk) — per-chunk max and sum of exp,
  then each candidate found inside its chunk, then each chunk's mass above the candidates — so the
  whole GPU works on it rather than one program per row. A row whose K candidates are all rejected
  restarts with the rounds above (one program per row, fresh uniforms): restarting a rejection
  sampler keeps it exact, and the argmax fall-back now needs K·(ROUNDS + 1) rejections. All on the
  device, no host synchronisation.
* ``greedy``: the most likely token per row and its log-prob, in one pass over the logits (per
  (row, chunk) max, first argmax and sum of exp, then one tiny kernel per row), where argmax, a fp32
  copy of the logits and a log-sum-exp over it read them three to four times (at 1319 rows of a
  152k vocabulary, 0.4 GB of bf16 logits a step). The token is exactly ``argmax`` (ties: the first).
* ``advance_rows``: a decode step's bookkeeping after sampling — finished rows emit padding and
  log-prob 0, rows that sampled EOS finish, tokens and positions advance — in one kernel for PyTorch's
  dozen small ones.
* ``add_rms_norm``, ``rope_cache_write``, ``silu_mul``: the elementwise work of a decode step, one
  kernel each where PyTorch runs the modules' five to ten small ones (Llama-family RMSNorm with the
  residual add before it; rotary embedding of q and k with the K/V cache writes; SiLU(gate) · up).
  They round where the modules round (bf16 products, sums and casts in the same order), so greedy
  decoding follows the modules' arithmetic; the order of a norm's fp32 sum of squares differs. Measured
  on an H200 (``bench/kernel_checks.py --only elementwise``): SiLU and the norms equal their references on
  all but ≤ 4e-5 of elements; the rotary kernel in bf16 on all of them (``_round_bf16``).
"""

from __future__ import annotations

import importlib
import threading

import torch
import torch.nn.functional as F

try:  # Triton ships with CUDA builds of PyTorch; CPU installs use the references below.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

NUM_CANDIDATES = 4  # top-p candidates per row and round
# 4, not 8: the wide round's pass over the logits makes one reduction per candidate (at 256 rows of a 152k
# vocabulary it was the step's largest sampling kernel, 63 µs with 8), and a row needs the slow per-row
# rounds only when all 4 are rejected, at most (1 - top_p)^4 = 1e-4 of rows at top_p 0.9.
ROUNDS = 4  # rounds of candidates before falling back to the most likely token
# Launch settings, chosen with bench/kernel_checks.py on an H200 (it sweeps them); the attention kernel's
# third pipeline stage from bench/roofline.py's whole decode step (--attn), where the caches come from
# memory, not from L2 as in a sweep of one call: Qwen2.5-0.5B 1.228 -> 1.179 ms a step at 64 rows, 1.672 ->
# 1.685 at 256 (single runs, ±2%); four stages measured the same (1.173 / 1.676) for a third more shared memory.
ATTN = {"block_n": 64, "num_warps": 2, "num_stages": 3, "min_splits": 1}
MAX_SPLITS = 16
SAMPLE = {"block": 4096, "num_warps": 8, "chunk": 2048, "chunk_warps": 2}


def uniforms_per_row(top_p: float) -> int:
    """Uniforms ``sample`` uses per row: K for the wide first round, then K per fall-back round;
    a single one without top-p (the first candidate is always taken)."""
    return NUM_CANDIDATES * (1 + ROUNDS) if top_p < 1.0 else 1


def triton_ready(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


def hash_triton_in_background() -> threading.Thread | None:
    """Start what a process's first Triton launch pays once in a background thread, where Triton and a GPU are there.

    That launch hashes Triton's own files, its 415 MB compiler library among them (``triton.runtime.cache.triton_key``,
    cached for the process): 0.4-0.8 s that the first token of ``posttrain eval`` waited for. hashlib lets go of
    the GIL while it hashes, so from a thread this runs beside the loading that comes before the first kernel.
    Then the thread imports the Gluon modules that Triton 3.6's argument specialisation imports at the first
    launch (0.13 s in a first evaluation's profile, H200, 2026-12-04). None when there is nothing to do."""
    if triton is None or not torch.cuda.is_available():
        return None
    try:
        from triton.runtime.cache import triton_key
    except ImportError:  # pragma: no cover - another Triton: its first launch hashes as before
        return None
    thread = threading.Thread(target=_prepare_triton, args=(triton_key,), name="posttrain-triton-key", daemon=True)
    thread.start()
    return thread


FIRST_LAUNCH_IMPORTS = ("triton.experimental.gluon.nvidia.hopper",)  # what Triton 3.6's first launch imports


def _prepare_triton(triton_key) -> None:
    triton_key()
    for name in FIRST_LAUNCH_IMPORTS:
        try:
            importlib.import_module(name)
        except Exception:  # another Triton (or a broken one): its first launch imports what it needs, as before
            pass


# ------------------------------------------------------------------------------- references --
def decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
                         scale: float, span: int | None = None) -> torch.Tensor:
    """q [n, H, d], caches [R >= n, Hkv, L, d], lengths [n] (positions 0..len-1 are valid, len <= span)
    -> [n, H, d]. Reads positions [0, span) only (default: the whole cache)."""
    n, h, d = q.shape
    span = span or k_cache.shape[2]
    mask = (torch.arange(span, device=q.device)[None] < lengths[:, None])[:, None, None]  # [n, 1, 1, span]
    o = F.scaled_dot_product_attention(q[:, :, None], k_cache[:n, :, :span], v_cache[:n, :, :span], attn_mask=mask,
                                       scale=scale, enable_gqa=h != k_cache.shape[1])
    return o[:, :, 0]


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama-family RMSNorm as transformers computes it: fp32 statistics, the normalised row cast back
    to x's dtype, then scaled by the weight. x [n, D] -> [n, D]."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def add_rms_norm_ref(h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float):
    """(h + delta, RMSNorm of it): a residual add and the next norm. ``delta`` None: no add."""
    s = h if delta is None else h + delta
    return s, rms_norm_ref(s, weight, eps)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the last dimension: the rotary embedding's pairing (Llama family)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_cache_write_ref(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                         v_cache: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor, heads: int, kv_heads: int,
                         with_k: bool = False) -> torch.Tensor:
    """qkv [n, (H + 2·Hkv)·d] (n tokens), cos/sin [n, d] -> q [n, H, d] with the rotary embedding applied
    (``with_k``: q and k, [n, H + Hkv, d]); k (rotated) and v are written to the caches [R, Hkv, L, d] at
    (rows, :, pos), ``rows`` [n] or [n, G] (each token's K/V to G cache rows: a prompt's samples)."""
    n, d = qkv.shape[0], cos.shape[-1]
    q, k, v = qkv.view(n, heads + 2 * kv_heads, d).split([heads, kv_heads, kv_heads], 1)
    c, s = cos[:, None], sin[:, None]
    k = k * c + rotate_half(k) * s
    for row in (rows[:, None] if rows.dim() == 1 else rows).unbind(1):
        k_cache[row, :, pos] = k
        v_cache[row, :, pos] = v
    q = q * c + rotate_half(q) * s
    return torch.cat([q, k], 1) if with_k else q


def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) · up of the gate|up projection [n, 2I] -> [n, I]."""
    gate, up = gate_up.chunk(2, -1)
    return F.silu(gate) * up


def greedy_ref(logits: torch.Tensor):
    """(argmax [n], its log-prob under softmax(logits) in fp32 [n]) of logits [n, V] (bf16 logits:
    the argmax is exact on them, the log-sum-exp accumulates in fp32)."""
    tok = logits.argmax(-1)
    return tok, logits.gather(-1, tok[:, None])[:, 0].float() - torch.logsumexp(logits.float(), dim=-1)


def advance_rows_ref(nxt, logp, done, tokens, pos, next_out, logp_out, eos, pad: int, max_pos: int) -> None:
    """After sampling ``nxt``/``logp`` [n] for rows [0, n): a finished row emits ``pad`` and log-prob 0
    (into ``next_out``/``logp_out``), a row that sampled one of ``eos`` finishes (``done``), every row
    feeds its token next (``tokens``) one position on (``pos``, at most ``max_pos``), except a finished
    row, which goes back to position 0: its attention then reads one token, not its whole length, until
    the host compacts it away (up to a row bucket's worth of rows between compactions). In place."""
    nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
    next_out.copy_(nxt)
    logp_out.copy_(torch.where(done, torch.zeros_like(logp), logp))
    if eos.numel():
        done |= (nxt[:, None] == eos[None]).any(-1)
    tokens.copy_(nxt)
    pos.add_(1).clamp_(max=max_pos).masked_fill_(done, 0)


def sample_ref(logits: torch.Tensor, temperature: float, top_p: float, uniforms: torch.Tensor):
    """Same algorithm as the kernels, in PyTorch. logits [n, V], uniforms [n, uniforms_per_row(top_p)]
    in [0, 1): the first K for the first round, then K per fall-back round. Returns (tokens [n] long,
    log-probs [n] fp32 under softmax(logits / T))."""
    x = logits.float() / temperature  # [n, V]
    n, vocab = x.shape
    lse = torch.logsumexp(x, -1, keepdim=True)  # [n, 1]
    p = torch.exp(x - lse)
    k_cand = NUM_CANDIDATES if top_p < 1.0 else uniforms.shape[1]
    u = uniforms.view(n, -1, k_cand)  # [n, 1 + R, K]

    def draw(tau, mass, r):  # K candidates from p restricted to {x > tau}: [n, K]
        cdf = torch.cumsum(torch.where(x > tau, p, 0.0), -1)
        return (cdf[:, None, :] < (u[:, r] * mass)[:, :, None]).sum(-1).clamp(max=vocab - 1)

    def rounds(rs):  # rounds rs with a rising pivot -> (token [n], decided [n])
        tau = torch.full((n, 1), float("-inf"), device=x.device)
        mass = torch.ones((n, 1), device=x.device)
        tok = torch.zeros(n, dtype=torch.long, device=x.device)
        done = torch.zeros(n, dtype=torch.bool, device=x.device)
        k_idx = torch.arange(k_cand, device=x.device)
        for r in rs:
            cand = draw(tau, mass, r)
            xc = x.gather(-1, cand)  # [n, K]
            above = torch.stack([(p * (x > xc[:, k:k + 1])).sum(-1) for k in range(k_cand)], -1)  # [n, K]
            ok = above < top_p
            first = torch.where(ok, k_idx, k_cand).min(-1).values  # [n]
            hit = ~done & (first < k_cand)
            tok = torch.where(hit, cand.gather(-1, first.clamp(max=k_cand - 1)[:, None])[:, 0], tok)
            done |= hit
            # Every candidate was outside the nucleus: so is every token no likelier than the likeliest
            # of them. Draw the next round from the tokens above it.
            top = xc.argmax(-1, keepdim=True)
            tau = torch.where(done[:, None], tau, xc.gather(-1, top))
            mass = torch.where(done[:, None], mass, above.gather(-1, top))
        return tok, done

    if top_p >= 1.0:
        tok = draw(torch.tensor(float("-inf")), torch.ones((n, 1), device=x.device), 0)[:, 0]
        return tok, (x.gather(-1, tok[:, None]) - lse)[:, 0]
    tok, done = rounds([0])  # the wide first round
    again, again_done = rounds(range(1, u.shape[1]))  # a restart for the rows it rejected
    tok = torch.where(done, tok, torch.where(again_done, again, x.argmax(-1)))
    return tok, (x.gather(-1, tok[:, None]) - lse)[:, 0]


# ---------------------------------------------------------------------------------- kernels --
if triton is not None:

    # The split count is a run-time argument, never specialised on (Triton compiles a variant for each
    # value of a constexpr, and for an int argument equal to 1): a new split count no longer costs a
    # compile on a fresh machine (0.2-0.5 s). One split (no fp32 partials) and a split count that is a
    # multiple of 16 (the partials' strides) still get variants of their own.
    @triton.jit(do_not_specialize=["SPLITS"])
    def _attn_split_kernel(Q, K, V, Lens, Out, MidO, MidL, scale,
                           s_qn, s_qh, s_kn, s_kh, s_kt, s_vn, s_vh, s_vt, s_on, s_oh, s_mn, s_mh, s_ms, s_ln, s_lh, SPLITS,
                           G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
                           IEEE: tl.constexpr):
        row, kvh, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        length = tl.load(Lens + row).to(tl.int32)
        chunk = tl.cdiv(tl.cdiv(length, SPLITS), BLOCK_N) * BLOCK_N
        start = split * chunk
        end = tl.minimum(start + chunk, length)
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, D)
        nn = tl.arange(0, BLOCK_N)
        heads = kvh * G + g
        gmask = g < G
        q = tl.load(Q + row * s_qn + heads[:, None] * s_qh + d[None, :], mask=gmask[:, None], other=0.0)  # [BG, D]
        m = tl.full([BLOCK_G], -1.0e30, tl.float32)
        l = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, D], tl.float32)
        kb = K + row * s_kn + kvh * s_kh
        vb = V + row * s_vn + kvh * s_vh
        for t0 in range(start, end, BLOCK_N):
            t = t0 + nn
            tm = t < end
            k = tl.load(kb + t[:, None] * s_kt + d[None, :], mask=tm[:, None], other=0.0)  # [BN, D]
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = tl.where(tm[None, :], s * scale, float("-inf"))  # [BG, BN]
            m_new = tl.maximum(m, tl.max(s, 1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new[:, None])
            l = l * alpha + tl.sum(p, 1)
            v = tl.load(vb + t[:, None] * s_vt + d[None, :], mask=tm[:, None], other=0.0)  # [BN, D]
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        if SPLITS == 1:
            out = acc / l[:, None]
            tl.store(Out + row * s_on + heads[:, None] * s_oh + d[None, :], out.to(Out.dtype.element_ty), mask=gmask[:, None])
        else:
            empty = l == 0.0  # this split lies past the row's length
            lse = tl.where(empty, float("-inf"), m + tl.log(tl.where(empty, 1.0, l)))
            o = acc / tl.where(empty, 1.0, l)[:, None]
            tl.store(MidO + row * s_mn + heads[:, None] * s_mh + split * s_ms + d[None, :], o, mask=gmask[:, None])
            tl.store(MidL + row * s_ln + heads * s_lh + split, lse, mask=gmask)

    @triton.jit(do_not_specialize=["SPLITS"])
    def _attn_merge_kernel(MidO, MidL, Out, s_mn, s_mh, s_ms, s_ln, s_lh, s_on, s_oh, SPLITS,
                           BLOCK_S: tl.constexpr, D: tl.constexpr):
        row, h = tl.program_id(0), tl.program_id(1)
        s = tl.arange(0, BLOCK_S)
        d = tl.arange(0, D)
        smask = s < SPLITS
        lse = tl.load(MidL + row * s_ln + h * s_lh + s, mask=smask, other=float("-inf"))
        w = tl.exp(lse - tl.max(lse, 0))  # [BS]; empty splits weigh 0
        o = tl.load(MidO + row * s_mn + h * s_mh + s[:, None] * s_ms + d[None, :], mask=smask[:, None], other=0.0)
        out = tl.sum(o * w[:, None], 0) / tl.sum(w, 0)
        tl.store(Out + row * s_on + h * s_oh + d, out.to(Out.dtype.element_ty))

    @triton.jit
    def _sample_stats_kernel(Logits, M, S, s_l, V, inv_t, C, CH: tl.constexpr):
        """Per (row, chunk): max of x = logits / T and sum of exp(x - max)."""
        row, c = tl.program_id(0), tl.program_id(1)
        idx = c * CH + tl.arange(0, CH)
        x = tl.load(Logits + row * s_l + idx, mask=idx < V, other=float("-inf")).to(tl.float32) * inv_t
        m = tl.max(x, 0)
        tl.store(M + row * C + c, m)
        tl.store(S + row * C + c, tl.sum(tl.exp(x - m), 0))

    @triton.jit
    def _sample_locate_kernel(Logits, U, M, S, Cand, Xc, Lse, s_l, s_u, V, inv_t, C,
                              K: tl.constexpr, CH: tl.constexpr, BLOCK_C: tl.constexpr):
        """Per (row, candidate k): the token whose cumulative probability first reaches u_k — the
        chunk from the chunk masses, then the token inside it. Candidate 0 also stores the row's lse."""
        row, k = tl.program_id(0), tl.program_id(1)
        cc = tl.arange(0, BLOCK_C)
        cm = cc < C
        m = tl.load(M + row * C + cc, mask=cm, other=float("-inf"))
        s = tl.load(S + row * C + cc, mask=cm, other=0.0)
        mx = tl.max(m, 0)
        lse = mx + tl.log(tl.sum(s * tl.exp(m - mx), 0))
        w = s * tl.exp(m - lse)  # [BC] each chunk's probability mass
        u = tl.load(U + row * s_u + k)
        chunk = tl.minimum(tl.sum((tl.cumsum(w, 0) < u).to(tl.int32), 0), C - 1)
        rest = u - tl.sum(tl.where(cc < chunk, w, 0.0), 0)
        idx = chunk * CH + tl.arange(0, CH)
        x = tl.load(Logits + row * s_l + idx, mask=idx < V, other=float("-inf")).to(tl.float32) * inv_t
        cnt = tl.sum((tl.cumsum(tl.exp(x - lse), 0) < rest).to(tl.int32), 0)
        tok = tl.minimum(chunk * CH + cnt, tl.minimum(chunk * CH + CH, V) - 1)
        tl.store(Cand + row * K + k, tok)
        tl.store(Xc + row * K + k, tl.load(Logits + row * s_l + tok).to(tl.float32) * inv_t)
        if k == 0:
            tl.store(Lse + row, lse)

    @triton.jit
    def _sample_above_kernel(Logits, Xc, Lse, Above, s_l, V, inv_t, C, K: tl.constexpr, KP: tl.constexpr, CH: tl.constexpr):
        """Per (row, chunk): the chunk's probability mass strictly above each candidate (one 1-D
        reduction per candidate: a [K, CH] tile would spill registers)."""
        row, c = tl.program_id(0), tl.program_id(1)
        lse = tl.load(Lse + row)
        idx = c * CH + tl.arange(0, CH)
        x = tl.load(Logits + row * s_l + idx, mask=idx < V, other=float("-inf")).to(tl.float32) * inv_t
        p = tl.exp(x - lse)
        for k in tl.static_range(K):
            xc = tl.load(Xc + row * K + k)
            tl.store(Above + (row * C + c) * KP + k, tl.sum(tl.where(x > xc, p, 0.0), 0))

    @triton.jit
    def _sample_kernel(Logits, U, Tok, Logp, Cand, Xc, Lse, Above, s_l, s_u, V, inv_t, top_p, C,
                       K: tl.constexpr, KP: tl.constexpr, ROUNDS: tl.constexpr, BLOCK: tl.constexpr, TOP_P: tl.constexpr,
                       BLOCK_C: tl.constexpr):
        """Per row: take the wide first round's first candidate inside the nucleus; if there is none,
        restart with ROUNDS rising-pivot rounds over the whole row (uniforms after the first K)."""
        row = tl.program_id(0)
        kk = tl.arange(0, KP)
        valid = kk < K
        if TOP_P:
            cc = tl.arange(0, BLOCK_C)
            above = tl.sum(tl.load(Above + (row * C + cc[:, None]) * KP + kk[None, :], mask=(cc < C)[:, None], other=0.0), 0)
            ok = (above < top_p) & valid
        else:
            ok = kk == 0
        first = tl.min(tl.where(ok, kk, KP), 0)
        if first < KP:
            tok = tl.sum(tl.where(kk == first, tl.load(Cand + row * K + kk, mask=valid, other=0), 0), 0)
            xt = tl.sum(tl.where(kk == first, tl.load(Xc + row * K + kk, mask=valid, other=0.0), 0.0), 0)
            tl.store(Tok + row, tok.to(tl.int64))
            tl.store(Logp + row, xt - tl.load(Lse + row))
        else:
            _sample_rounds(Logits, U + K, Tok, Logp, row, s_l, s_u, V, inv_t, top_p, K, KP, ROUNDS, BLOCK)

    @triton.jit
    def _sample_rounds(Logits, U, Tok, Logp, row, s_l, s_u, V, inv_t, top_p,
                       K: tl.constexpr, KP: tl.constexpr, ROUNDS: tl.constexpr, BLOCK: tl.constexpr):
        """The whole algorithm for one row, one program: rounds of K candidates with a rising pivot."""
        base = Logits + row * s_l
        offs = tl.arange(0, BLOCK)
        # pass 1: max, sum of exp (online, per lane) and argmax of x = logits / T
        m_v = tl.full([BLOCK], -1.0e30, tl.float32)
        s_v = tl.zeros([BLOCK], tl.float32)
        b_v = tl.full([BLOCK], float("-inf"), tl.float32)
        b_i = tl.zeros([BLOCK], tl.int32)
        for start in range(0, V, BLOCK):
            idx = start + offs
            x = tl.load(base + idx, mask=idx < V, other=float("-inf")).to(tl.float32) * inv_t
            m_new = tl.maximum(m_v, x)
            s_v = s_v * tl.exp(m_v - m_new) + tl.exp(x - m_new)
            m_v = m_new
            upd = x > b_v
            b_v = tl.where(upd, x, b_v)
            b_i = tl.where(upd, idx, b_i)
        mx = tl.max(m_v, 0)
        lse = mx + tl.log(tl.sum(s_v * tl.exp(m_v - mx), 0))
        vmax = tl.max(b_v, 0)
        best = tl.min(tl.where(b_v == vmax, b_i, V), 0)  # first index of the maximum, as torch.argmax
        kk = tl.arange(0, KP)
        tok = best
        tau = float("-inf")  # candidates come from the tokens with x > tau ...
        mass = 1.0  # ... whose probability mass is this
        r = 0
        done = 0
        while (r < ROUNDS) & (done == 0):
            # pass 2: inverse CDF; candidate k = number of tokens whose cumulative probability is < u_k
            u = tl.load(U + row * s_u + r * K + kk, mask=kk < K, other=2.0) * mass
            cnt = tl.zeros([KP], tl.int32)
            run = tl.zeros([1], tl.float32)
            for start in range(0, V, BLOCK):
                idx = start + offs
                x = tl.load(base + idx, mask=idx < V, other=float("-inf")).to(tl.float32) * inv_t
                p = tl.where(x > tau, tl.exp(x - lse), 0.0)
                c = tl.cumsum(p, 0) + run
                cnt += tl.sum((c[None, :] < u[:, None]).to(tl.int32), 1)
                run += tl.sum(p, 0)
            cand = tl.minimum(cnt, V - 1)
            # pass 3: mass of the tokens strictly more likely than each candidate
            xc = tl.load(base + cand).to(tl.float32) * inv_t  # [KP]
            above = tl.zeros([KP], tl.float32)
            for start in range(0, V, BLOCK):
                idx = start + offs
                x = tl.load(base + idx, mask=idx < V, other=float("-inf")).to(tl.float32) * inv_t
                p = tl.exp(x - lse)
                above += tl.sum(tl.where(x[None, :] > xc[:, None], p[None, :], 0.0), 1)
            valid = kk < K
            ok = (above < top_p) & valid
            first = tl.min(tl.where(ok, kk, KP), 0)
            if first < KP:
                tok = tl.sum(tl.where(kk == first, cand, 0), 0)
                done = 1
            else:  # all outside the nucleus: next round draws from the tokens above the likeliest
                xv = tl.where(valid, xc, float("-inf"))
                top = tl.min(tl.where(xv == tl.max(xv, 0), kk, KP), 0)
                tau = tl.max(xv, 0)
                mass = tl.sum(tl.where(kk == top, above, 0.0), 0)
            r += 1
        xt = tl.load(base + tok).to(tl.float32) * inv_t
        tl.store(Tok + row, tok.to(tl.int64))
        tl.store(Logp + row, xt - lse)


if triton is not None:

    @triton.jit
    def _greedy_stats_kernel(Logits, M, A, S, s_l, V, C, CH: tl.constexpr):
        """Per (row, chunk): max of the logits, the first index holding it, sum of exp(x - max)."""
        row, c = tl.program_id(0), tl.program_id(1)
        idx = c * CH + tl.arange(0, CH)
        x = tl.load(Logits + row * s_l + idx, mask=idx < V, other=float("-inf")).to(tl.float32)
        m, a = tl.max(x, 0, return_indices=True, return_indices_tie_break_left=True)
        tl.store(M + row * C + c, m)
        tl.store(A + row * C + c, c * CH + a)
        tl.store(S + row * C + c, tl.sum(tl.exp(x - m), 0))

    @triton.jit
    def _greedy_pick_kernel(M, A, S, Tok, Logp, C, BLOCK_C: tl.constexpr):
        """Per row: the first chunk holding the row's max gives the token; lse from the chunks' sums."""
        row = tl.program_id(0)
        cc = tl.arange(0, BLOCK_C)
        cm = cc < C
        m = tl.load(M + row * C + cc, mask=cm, other=float("-inf"))
        s = tl.load(S + row * C + cc, mask=cm, other=0.0)
        mx = tl.max(m, 0)
        first = tl.min(tl.where((m == mx) & cm, cc, BLOCK_C), 0)
        tok = tl.sum(tl.where(cc == first, tl.load(A + row * C + cc, mask=cm, other=0), 0), 0)
        tl.store(Tok + row, tok.to(tl.int64))
        tl.store(Logp + row, -tl.log(tl.sum(s * tl.exp(m - mx), 0)))  # x[tok] - lse, x[tok] = mx

    @triton.jit(do_not_specialize=["n"])
    def _advance_rows_kernel(Nxt, Lp, Done, Tokens, Pos, NextOut, LogpOut, Eos, n, pad, max_pos,
                             E: tl.constexpr, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = i < n
        done = tl.load(Done + i, mask=m, other=1) != 0
        nxt = tl.where(done, pad, tl.load(Nxt + i, mask=m, other=0))
        tl.store(NextOut + i, nxt, mask=m)
        tl.store(LogpOut + i, tl.where(done, 0.0, tl.load(Lp + i, mask=m, other=0.0)), mask=m)
        for e in tl.static_range(E):
            done = done | (nxt == tl.load(Eos + e))
        tl.store(Done + i, done, mask=m)
        tl.store(Tokens + i, nxt, mask=m)
        tl.store(Pos + i, tl.where(done, 0, tl.minimum(tl.load(Pos + i, mask=m, other=0) + 1, max_pos)), mask=m)

    @triton.jit
    def _add_rms_norm_kernel(H, Delta, W, Hout, Out, s_h, s_d, s_ho, s_o, D, eps,
                             HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr):
        r = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        m = cols < D
        x = tl.load(H + r * s_h + cols, mask=m, other=0.0)
        if HAS_DELTA:  # the residual add, rounded to the stream's dtype as PyTorch's add is
            x = (x.to(tl.float32) + tl.load(Delta + r * s_d + cols, mask=m, other=0.0).to(tl.float32)).to(x.dtype)
            tl.store(Hout + r * s_ho + cols, x, mask=m)
        xf = x.to(tl.float32)
        y = (xf * (1.0 / tl.sqrt(tl.sum(xf * xf, 0) / D + eps))).to(x.dtype)
        w = tl.load(W + cols, mask=m, other=0.0)
        tl.store(Out + r * s_o + cols, (w.to(tl.float32) * y.to(tl.float32)).to(x.dtype), mask=m)

    @triton.jit
    def _round_bf16(x):
        """fp32 -> the nearest bf16 value (ties to even), still as fp32, by integer bit operations. A cast
        round trip (``x.to(bf16).to(fp32)``) is folded away by the compiler, which then fuses the product
        into the next add (one rounding where PyTorch rounds twice): the rotary kernel matched its reference
        on 76% of q's values that way, on all of them this way (H200, 2026-12-03)."""
        u = x.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        return tl.where(x != x, x, u.to(tl.float32, bitcast=True))  # NaN stays NaN (its bits would carry into inf or 0)

    @triton.jit
    def _rope_cache_write_kernel(QKV, Cos, Sin, Q, Kc, Vc, Rows, Pos, s_qkv, s_c, s_qn, s_qh, s_r, s_g,
                                 s_kn, s_kh, s_kl, s_vn, s_vh, s_vl, H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
                                 SLOTS: tl.constexpr, QK_OUT: tl.constexpr, G: tl.constexpr, BF16: tl.constexpr):
        """One program per token: its q, k and v heads as one [SLOTS, D] tile (head slots: q heads, then
        k heads, then v heads; SLOTS the next power of two), so each token's cos/sin are read once. The
        first QK_OUT rotated heads go to Q (H: q; H + HKV: q and k); k and v to each of the token's G
        cache rows."""
        r = tl.program_id(0)
        j = tl.arange(0, SLOTS)[:, None]
        cols = tl.arange(0, D)[None, :]
        live = j < H + 2 * HKV
        base = QKV + r * s_qkv + j * D
        x = tl.load(base + cols, mask=live, other=0.0)
        # q*cos + rotate_half(q)*sin (and k's), each product and the sum rounded as in PyTorch
        xr = tl.load(base + (cols + D // 2) % D, mask=live, other=0.0).to(tl.float32)
        xr = tl.where(cols < D // 2, -xr, xr)
        c = tl.load(Cos + r * s_c + cols).to(tl.float32)
        sn = tl.load(Sin + r * s_c + cols).to(tl.float32)
        if BF16:
            t1 = _round_bf16(x.to(tl.float32) * c)
            t2 = _round_bf16(xr * sn)
            rot = _round_bf16(t1 + t2).to(x.dtype)
        else:  # fp32 (exactness checks): nothing to round; fp16: the cast round trip, which the compiler may
            # fold as it did for bf16 (not measured)
            t1 = (x.to(tl.float32) * c).to(x.dtype).to(tl.float32)
            t2 = (xr * sn).to(x.dtype).to(tl.float32)
            rot = (t1 + t2).to(x.dtype)
        x = tl.where(j < H + HKV, rot, x)
        tl.store(Q + r * s_qn + j * s_qh + cols, x, mask=j < QK_OUT)
        p = tl.load(Pos + r)
        for g in tl.static_range(G):
            row = tl.load(Rows + r * s_r + g * s_g)
            tl.store(Kc + row * s_kn + (j - H) * s_kh + p * s_kl + cols, x, mask=(j >= H) & (j < H + HKV))
            tl.store(Vc + row * s_vn + (j - H - HKV) * s_vh + p * s_vl + cols, x, mask=(j >= H + HKV) & live)

    @triton.jit
    def _silu_mul_kernel(GU, Out, s_gu, s_o, I, BLOCK: tl.constexpr):
        r = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = cols < I
        g = tl.load(GU + r * s_gu + cols, mask=m, other=0.0)
        u = tl.load(GU + r * s_gu + I + cols, mask=m, other=0.0)
        gf = g.to(tl.float32)
        a = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)  # F.silu, rounded to the input's dtype
        tl.store(Out + r * s_o + cols, (a.to(tl.float32) * u.to(tl.float32)).to(g.dtype), mask=m)


def add_rms_norm(h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float):
    """(h + delta, RMSNorm(h + delta)) of rows [n, D] in one kernel on CUDA (``delta`` None: the norm
    alone, h returned as is); ``add_rms_norm_ref`` elsewhere."""
    if not triton_ready(h.device):
        return add_rms_norm_ref(h, delta, weight, eps)
    n, d = h.shape
    out = torch.empty_like(h)
    s = torch.empty_like(h) if delta is not None else h
    dl = delta if delta is not None else h
    _add_rms_norm_kernel[(n,)](h, dl, weight, s, out, h.stride(0), dl.stride(0), s.stride(0), out.stride(0), d, float(eps),
                               HAS_DELTA=delta is not None, BLOCK=triton.next_power_of_2(d), num_warps=4)
    return s, out


def rope_cache_write(qkv, cos, sin, k_cache, v_cache, rows, pos, heads: int, kv_heads: int, with_k: bool = False) -> torch.Tensor:
    """``rope_cache_write_ref`` in one kernel on CUDA: q [n, H, d] (``with_k``: q and k, [n, H + Hkv, d])
    out, k and v into the caches."""
    d = cos.shape[-1]
    if not triton_ready(qkv.device) or d & (d - 1):
        return rope_cache_write_ref(qkv, cos, sin, k_cache, v_cache, rows, pos, heads, kv_heads, with_k)
    n = qkv.shape[0]
    assert qkv.stride(-1) == cos.stride(-1) == sin.stride(-1) == 1 and cos.stride(0) == sin.stride(0) and pos.is_contiguous()
    out_heads = heads + kv_heads if with_k else heads
    q = torch.empty((n, out_heads, d), dtype=qkv.dtype, device=qkv.device)
    rows2 = rows[:, None] if rows.dim() == 1 else rows
    _rope_cache_write_kernel[(n,)](
        qkv, cos, sin, q, k_cache, v_cache, rows2, pos, qkv.stride(0), cos.stride(0), q.stride(0), q.stride(1),
        rows2.stride(0), rows2.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0),
        v_cache.stride(1), v_cache.stride(2), H=heads, HKV=kv_heads, D=d, SLOTS=triton.next_power_of_2(heads + 2 * kv_heads),
        QK_OUT=out_heads, G=rows2.shape[1], BF16=qkv.dtype == torch.bfloat16, num_warps=4)
    return q


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu_mul_ref`` in one kernel on CUDA."""
    if not triton_ready(gate_up.device):
        return silu_mul_ref(gate_up)
    n, two_i = gate_up.shape
    i = two_i // 2
    out = torch.empty((n, i), dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _silu_mul_kernel[(n, triton.cdiv(i, block))](gate_up, out, gate_up.stride(0), out.stride(0), i, BLOCK=block, num_warps=4)
    return out


def greedy(logits: torch.Tensor):
    """``greedy_ref`` in one pass over the logits on CUDA (two kernels); the reference elsewhere."""
    if not triton_ready(logits.device):
        return greedy_ref(logits)
    logits = logits.contiguous()
    n, vocab = logits.shape
    ch = SAMPLE["chunk"]
    c = triton.cdiv(vocab, ch)
    dev = logits.device
    m, s_ = torch.empty((n, c), device=dev, dtype=torch.float32), torch.empty((n, c), device=dev, dtype=torch.float32)
    a = torch.empty((n, c), device=dev, dtype=torch.int32)
    tok, logp = torch.empty(n, dtype=torch.long, device=dev), torch.empty(n, dtype=torch.float32, device=dev)
    _greedy_stats_kernel[(n, c)](logits, m, a, s_, logits.stride(0), vocab, c, CH=ch, num_warps=SAMPLE["chunk_warps"])
    _greedy_pick_kernel[(n,)](m, a, s_, tok, logp, c, BLOCK_C=max(2, triton.next_power_of_2(c)), num_warps=1)
    return tok, logp


def advance_rows(nxt, logp, done, tokens, pos, next_out, logp_out, eos, pad: int, max_pos: int) -> None:
    """``advance_rows_ref`` in one kernel on CUDA (every tensor 1-D and contiguous)."""
    if not triton_ready(nxt.device):
        return advance_rows_ref(nxt, logp, done, tokens, pos, next_out, logp_out, eos, pad, max_pos)
    n, block = nxt.shape[0], 256
    eos_ids = eos if eos.numel() else nxt  # (read only when there are EOS ids: an empty tensor has no address)
    _advance_rows_kernel[(triton.cdiv(n, block),)](nxt, logp, done, tokens, pos, next_out, logp_out, eos_ids, n, int(pad), int(max_pos),
                                                   E=eos.numel(), BLOCK=block, num_warps=4)


def _splits(n: int, hkv: int, span: int, block_n: int) -> int:
    """Enough (row, head, split) programs to fill the GPU, but splits of at least four blocks: on an
    H200 at Qwen2.5-0.5B's 2 KV heads and 288 tokens of context, one split beat two at 64 and 256 rows
    (6.8 and 10.1 µs a call against 7.1 and 12.6: the merge kernel and its fp32 partials cost more than
    the occupancy gained; bench/attn_sweep.py)."""
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    want = max(-(-4 * sms // max(1, n * hkv)), ATTN["min_splits"])
    return int(max(1, min(want, span // (4 * block_n), MAX_SPLITS)))


def _decode_attention_triton(q, k_cache, v_cache, lengths, scale: float, span: int) -> torch.Tensor:
    n, h, d = q.shape
    hkv = k_cache.shape[1]
    g = h // hkv
    block_n = ATTN["block_n"]
    splits = _splits(n, hkv, span, block_n)
    out = torch.empty_like(q)
    mid_o = torch.empty((n, h, splits, d), device=q.device, dtype=torch.float32) if splits > 1 else out
    mid_l = torch.empty((n, h, splits), device=q.device, dtype=torch.float32) if splits > 1 else out
    ms = (mid_o.stride(0), mid_o.stride(1), mid_o.stride(2)) if splits > 1 else (0, 0, 0)
    ls = (mid_l.stride(0), mid_l.stride(1)) if splits > 1 else (0, 0)
    _attn_split_kernel[(n, hkv, splits)](
        q, k_cache, v_cache, lengths, out, mid_o, mid_l, scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1), *ms, *ls, splits,
        G=g, BLOCK_G=max(16, triton.next_power_of_2(g)), D=d, BLOCK_N=block_n,
        IEEE=q.dtype == torch.float32, num_warps=ATTN["num_warps"], num_stages=ATTN["num_stages"])
    if splits > 1:
        _attn_merge_kernel[(n, h)](mid_o, mid_l, out, *ms, *ls, out.stride(0), out.stride(1), splits,
                                   BLOCK_S=MAX_SPLITS, D=d, num_warps=1)
    return out


def decode_attention(q, k_cache, v_cache, lengths, scale: float, span: int | None = None) -> torch.Tensor:
    """Attention of one new token per row; Triton on CUDA, the SDPA reference elsewhere.
    ``span`` bounds the lengths (it sizes the splits, and what the reference reads); default: the cache length."""
    if not triton_ready(q.device):
        return decode_attention_ref(q, k_cache, v_cache, lengths, scale, span)
    span = int(span or k_cache.shape[2])
    if torch.compiler.is_compiling():  # an opaque op to torch.compile; a direct call otherwise (the custom op's
        # dispatch cost ~0.2 ms of host time a call: 5 ms a step on 24 layers, paid at every graph capture)
        return torch.ops.posttrain.decode_attention(q, k_cache, v_cache, lengths, float(scale), span)
    return _decode_attention_triton(q, k_cache, v_cache, lengths, float(scale), span)


def sample(logits: torch.Tensor, temperature: float, top_p: float, uniforms: torch.Tensor | None = None):
    """One token per row from softmax(logits / T) restricted to the top-p nucleus, and its log-prob
    under softmax(logits / T). ``uniforms``: [n, uniforms_per_row(top_p)] (default: fresh
    ``torch.rand``, which CUDA graphs replay with new draws)."""
    n, vocab = logits.shape
    if uniforms is None:
        uniforms = torch.rand((n, uniforms_per_row(top_p)), device=logits.device)
    if not triton_ready(logits.device):
        return sample_ref(logits, temperature, top_p, uniforms)
    logits = logits.contiguous()
    dev, f32 = logits.device, torch.float32
    k = NUM_CANDIDATES if top_p < 1.0 else 1
    kp = max(2, triton.next_power_of_2(k))
    ch = SAMPLE["chunk"]
    c = triton.cdiv(vocab, ch)
    m, s_, lse = torch.empty((n, c), device=dev, dtype=f32), torch.empty((n, c), device=dev, dtype=f32), torch.empty(n, device=dev, dtype=f32)
    cand, xc = torch.empty((n, k), device=dev, dtype=torch.int32), torch.empty((n, k), device=dev, dtype=f32)
    above = torch.empty((n, c, kp), device=dev, dtype=f32)
    tok, logp = torch.empty(n, dtype=torch.long, device=dev), torch.empty(n, dtype=f32, device=dev)
    inv_t, cw = 1.0 / temperature, SAMPLE["chunk_warps"]
    _sample_stats_kernel[(n, c)](logits, m, s_, logits.stride(0), vocab, inv_t, c, CH=ch, num_warps=cw)
    _sample_locate_kernel[(n, k)](logits, uniforms, m, s_, cand, xc, lse, logits.stride(0), uniforms.stride(0), vocab,
                                  inv_t, c, K=k, CH=ch, BLOCK_C=max(2, triton.next_power_of_2(c)), num_warps=cw)
    if top_p < 1.0:
        _sample_above_kernel[(n, c)](logits, xc, lse, above, logits.stride(0), vocab, inv_t, c, K=k, KP=kp, CH=ch, num_warps=cw)
    _sample_kernel[(n,)](logits, uniforms, tok, logp, cand, xc, lse, above, logits.stride(0), uniforms.stride(0), vocab, inv_t,
                         top_p, c, K=k, KP=kp, ROUNDS=max(1, (uniforms.shape[1] - k) // k), BLOCK=SAMPLE["block"],
                         TOP_P=top_p < 1.0, BLOCK_C=max(2, triton.next_power_of_2(c)), num_warps=SAMPLE["num_warps"])
    return tok, logp


if triton is not None:
    # A custom op, so torch.compile treats the kernel launch as one opaque call inside the step.
    @torch.library.custom_op("posttrain::decode_attention", mutates_args=())
    def _decode_attention_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
                             scale: float, span: int) -> torch.Tensor:
        return _decode_attention_triton(q, k_cache, v_cache, lengths, scale, span)

    @_decode_attention_op.register_fake
    def _(q, k_cache, v_cache, lengths, scale, span):
        return torch.empty_like(q)
