"""Triton kernels for the token log-probs of an RL update, each with the plain-PyTorch reference that
CPU runs (and tests) use; the two are checked against each other on GPU (``bench/kernel_checks.py --only
logprobs``).

A chunk of logits x [C, V] (one projection of C positions' hidden states onto the vocabulary) gives
each position's log-sum-exp, the log-prob of its token and the entropy of its distribution; the
backward pass forms d logp / dx = g · (onehot(token) − softmax(x)). In PyTorch that is a fp32 copy
of the chunk and five to seven passes over it each way (logsumexp, subtract, exp, multiply, sum;
exp, multiply, scatter, cast): at Qwen2.5's 152k vocabulary, about a tenth of a GRPO update's GPU
time went to those passes (``bench/profile_rl.py --part update``). Here each is one pass over the
bf16 logits:

* ``token_stats``: one program per position streams its row once with an online softmax (running
  max, sum of exp and sum of exp · x), so no fp32 copy exists.
* ``token_logits_grad``: one program per (position, block of the vocabulary) writes the gradient in
  the logits' dtype, in place over the logits (the backward pass recomputes them and needs them no
  more), as the reference's fp32 gradient cast to that dtype would be.

Both compute in fp32 from the same bf16 values as the references and agree with them to fp32 rounding
(the order of the sums and Triton's exp/log differ). Tokens must lie in [0, V): the kernels read the
token's logit without the bounds check of the references' ``gather``.
"""

from __future__ import annotations

import torch

from posttrain.engine.kernels import triton, triton_ready

if triton is not None:
    import triton.language as tl

BLOCK = {"stats": 4096, "stats_warps": 8, "grad": 4096, "grad_warps": 8}


def _kernel_ready(x: torch.Tensor) -> bool:
    """Triton on x's device, and x a matrix of contiguous rows."""
    return triton_ready(x.device) and x.dim() == 2 and x.stride(1) == 1


# ------------------------------------------------------------------------------- references --
def token_stats_ref(x: torch.Tensor, tok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log-sum-exp, log softmax(x)[tok], entropy of softmax(x)) of logits x [..., V], in fp32."""
    x32 = x.float()
    lse = torch.logsumexp(x32, -1)
    logp = x32.gather(-1, tok[..., None]).squeeze(-1) - lse
    entropy = lse - (torch.exp(x32 - lse[..., None]) * x32).sum(-1)
    return lse, logp, entropy


def token_logits_grad_ref(x: torch.Tensor, lse: torch.Tensor, tok: torch.Tensor, grad_logp: torch.Tensor) -> torch.Tensor:
    """d(Σ g · logp)/dx = g · (onehot(tok) − softmax(x)), from the saved log-sum-exp, in x's dtype."""
    grad = torch.exp(x.float() - lse[..., None]).mul_(-grad_logp[..., None])  # -softmax · g
    return grad.scatter_add_(-1, tok[..., None], grad_logp[..., None]).to(x.dtype)  # + onehot · g


# ---------------------------------------------------------------------------------- kernels --
if triton is not None:

    @triton.jit
    def _token_stats_kernel(X, Tok, Lse, Logp, Ent, s_x, V, BLOCK: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)
        row = X + r * s_x
        cols = tl.arange(0, BLOCK)
        m = tl.full((), float("-inf"), tl.float32)  # running max
        s = tl.zeros((), tl.float32)  # running Σ exp(x - m)
        t = tl.zeros((), tl.float32)  # running Σ exp(x - m) · x
        for start in range(0, V, BLOCK):
            inside = start + cols < V
            x = tl.load(row + start + cols, mask=inside, other=float("-inf")).to(tl.float32)
            new_m = tl.maximum(m, tl.max(x, 0))
            e = tl.where(inside, tl.exp(x - new_m), 0.0)
            alpha = tl.exp(m - new_m)
            s = s * alpha + tl.sum(e, 0)
            t = t * alpha + tl.sum(tl.where(inside, e * x, 0.0), 0)
            m = new_m
        lse = m + tl.log(s)
        target = tl.load(row + tl.load(Tok + r)).to(tl.float32)
        tl.store(Lse + r, lse)
        tl.store(Logp + r, target - lse)
        tl.store(Ent + r, lse - t / s)

    @triton.jit
    def _token_grad_kernel(X, Tok, Lse, G, s_x, V, BLOCK: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = cols < V
        ptr = X + r * s_x + cols
        x = tl.load(ptr, mask=inside, other=0.0)
        g = tl.load(G + r)
        p = tl.exp(x.to(tl.float32) - tl.load(Lse + r))
        grad = tl.where(cols == tl.load(Tok + r), g - g * p, -g * p)
        tl.store(ptr, grad.to(x.dtype), mask=inside)


def token_stats(x: torch.Tensor, tok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``token_stats_ref`` of logits x [C, V] in one pass on CUDA; the reference elsewhere."""
    if not _kernel_ready(x):
        return token_stats_ref(x, tok)
    c, v = x.shape
    lse, logp, ent = (torch.empty(c, dtype=torch.float32, device=x.device) for _ in range(3))
    if c:
        with torch.cuda.device(x.device):
            _token_stats_kernel[(c,)](x, tok.contiguous(), lse, logp, ent, x.stride(0), v, BLOCK=BLOCK["stats"],
                                      num_warps=BLOCK["stats_warps"])
    return lse, logp, ent


def token_logits_grad(x: torch.Tensor, lse: torch.Tensor, tok: torch.Tensor, grad_logp: torch.Tensor) -> torch.Tensor:
    """``token_logits_grad_ref`` on CUDA in one pass, written over ``x`` (which it returns); the
    reference elsewhere (``x`` left as it is)."""
    if not _kernel_ready(x):
        return token_logits_grad_ref(x, lse, tok, grad_logp)
    c, v = x.shape
    if c:
        with torch.cuda.device(x.device):
            _token_grad_kernel[(c, triton.cdiv(v, BLOCK["grad"]))](x, tok.contiguous(), lse.contiguous(), grad_logp.float().contiguous(),
                                                                 x.stride(0), v, BLOCK=BLOCK["grad"], num_warps=BLOCK["grad_warps"])
    return x
