"""The decode kernels' PyTorch references (what CPU runs; bench/kernel_checks.py checks the Triton kernels
against them on GPU): attention over each row's own length, exact top-p sampling without a sort, and the
rows' bookkeeping after a step."""

import math

import pytest
import torch

from posttrain.engine import kernels


def _nucleus(p: torch.Tensor, top_p: float) -> torch.Tensor:
    """The sorted-prefix rule: keep a token when the mass of the tokens before it is below top_p."""
    order = torch.argsort(p, descending=True)
    keep = torch.zeros_like(p, dtype=torch.bool)
    keep[order[(torch.cumsum(p[order], 0) - p[order]) < top_p]] = True
    return keep


def _chi2_limit(dof: int) -> float:
    z = 3.29  # 99.95th percentile (Wilson-Hilferty)
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9), (1.0, 0.5), (1.3, 0.12)])
def test_sample_ref_matches_the_nucleus_distribution(temperature, top_p):
    torch.manual_seed(0)
    logits = torch.tensor([2.0, 1.7, 1.5, 1.0, 0.3, 0.0, -0.5, -2.0, -3.0, 1.6])
    n = 40000
    tok, logp = kernels.sample_ref(logits.expand(n, -1), temperature, top_p,
                                   torch.rand(n, kernels.uniforms_per_row(top_p)))
    p = torch.softmax(logits.double() / temperature, -1)
    keep = _nucleus(p, top_p)
    counts = torch.bincount(tok, minlength=len(logits)).double()
    assert torch.all(counts[~keep] == 0), counts
    expected = p[keep] / p[keep].sum() * n
    chi2 = (((counts[keep] - expected) ** 2) / expected).sum().item()
    dof = int(keep.sum()) - 1
    if dof:
        assert chi2 < _chi2_limit(dof), (chi2, counts, expected)
    # the log-prob is that of the full tempered softmax, not of the renormalised nucleus
    assert torch.allclose(logp.double(), torch.log(p)[tok], atol=1e-5)


def test_sample_ref_next_round_draws_above_the_rejected_pivot():
    """The wide first round and the restart's first round put every candidate in the tail; the
    restart's second round draws only from tokens above the likeliest of them, so it lands in the
    nucleus instead of falling back to the argmax."""
    logits = torch.log(torch.tensor([[0.30, 0.25, 0.20, 0.15, 0.10]]))
    k = kernels.NUM_CANDIDATES
    u = torch.full((1, kernels.uniforms_per_row(0.5)), 0.97)  # every candidate is token 4 (cdf 0.90..1.0): outside top_p 0.5
    u[0, 2 * k] = 0.5  # restart, round 2, first candidate: 0.5 of the mass above token 4 (0.9) = 0.45 -> token 1 (cdf 0.30..0.55)
    tok, _ = kernels.sample_ref(logits, 1.0, 0.5, u)
    assert tok.item() == 1  # in the nucleus {0, 1}; not the argmax fall-back (0)
    u[0, 2 * k] = 0.2  # 0.18 of the mass -> token 0
    assert kernels.sample_ref(logits, 1.0, 0.5, u)[0].item() == 0
    u[0, k - 1] = 0.4  # a first-round candidate inside the nucleus (token 1) decides at once
    assert kernels.sample_ref(logits, 1.0, 0.5, u)[0].item() == 1


def test_sample_ref_keeps_ties_at_the_edge():
    logits = torch.zeros(1, 4)  # all tied: no token is strictly likelier, so all are in any nucleus
    seen = {kernels.sample_ref(logits, 1.0, 0.3, torch.full((1, kernels.uniforms_per_row(0.3)), u))[0].item()
            for u in (0.1, 0.35, 0.6, 0.9)}
    assert seen == {0, 1, 2, 3}


def test_decode_attention_ref_reads_each_rows_own_length():
    torch.manual_seed(0)
    n, h, hkv, span, d = 3, 4, 2, 9, 8
    q = torch.randn(n, h, d)
    kc, vc = torch.randn(n + 2, hkv, span, d), torch.randn(n + 2, hkv, span, d)  # extra rows are ignored
    lens = torch.tensor([1, 5, 9])
    out = kernels.decode_attention(q, kc, vc, lens, 0.3)
    for r in range(n):
        for head in range(h):
            kv = head // (h // hkv)  # grouped-query: query heads share their KV head
            k, v = kc[r, kv, : lens[r]], vc[r, kv, : lens[r]]
            want = torch.softmax(k @ q[r, head] * 0.3, 0) @ v
            assert torch.allclose(out[r, head], want, atol=1e-5)


def test_advance_rows_ref_feeds_tokens_on_and_sends_finished_rows_to_position_0():
    """A live row feeds its token one position on (at most max_pos); a row that samples EOS emits it and
    finishes; a finished row emits padding with log-prob 0; every finished row goes to position 0, so
    its attention reads one token until the host compacts it away."""
    nxt, logp = torch.tensor([5, 7, 6, 4]), torch.tensor([-0.5, -0.25, -1.0, -2.0])
    done = torch.tensor([False, False, True, False])
    tokens, pos = torch.zeros(4, dtype=torch.long), torch.tensor([10, 11, 12, 63])
    next_out, logp_out = torch.zeros(4, dtype=torch.long), torch.zeros(4)
    kernels.advance_rows_ref(nxt, logp, done, tokens, pos, next_out, logp_out, torch.tensor([7, 9]), pad=0, max_pos=63)
    assert next_out.tolist() == [5, 7, 0, 4] and logp_out.tolist() == [-0.5, -0.25, 0.0, -2.0]
    assert done.tolist() == [False, True, True, False] and tokens.tolist() == [5, 7, 0, 4]
    assert pos.tolist() == [11, 0, 0, 63]


def test_tritons_cache_key_is_hashed_in_a_background_thread_only_with_a_gpu(monkeypatch):
    """With Triton and a GPU, Triton's once-a-process cache key is computed, and the modules its first launch
    imports are imported, in a daemon thread (the first launch would do both on the way to the first token);
    without a GPU nothing starts."""
    import sys
    import threading
    import types

    assert kernels.hash_triton_in_background() is None  # the CPU: no GPU
    ran = []
    cache = types.ModuleType("triton.runtime.cache")
    cache.triton_key = lambda: ran.append(threading.current_thread().name)
    for name, module in (("triton", types.ModuleType("triton")), ("triton.runtime", types.ModuleType("triton.runtime")),
                         ("triton.runtime.cache", cache)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(kernels, "triton", sys.modules["triton"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(kernels.importlib, "import_module", lambda name: ran.append(name))
    thread = kernels.hash_triton_in_background()
    thread.join(5)
    assert thread.daemon and ran == ["posttrain-triton-key", *kernels.FIRST_LAUNCH_IMPORTS]
