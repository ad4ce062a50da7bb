"""posttrain's own sampling engine for Llama-family decoders (Llama, Mistral, Qwen2, Qwen3; GQA).

Why not HF ``generate``: its dynamic cache re-allocates every step and every kernel launch goes
through Python, so small decode steps are launch-bound. This engine:

* pre-allocates one KV cache ``[rows, kv_heads, max_len, head_dim]`` per layer;
* prefills each distinct prompt once and copies its cache into the G rows of its group;
* decodes with attention that reads each KV head once for all the query heads that share it (no
  repeat of K/V): on CUDA a Triton flash-decoding kernel that reads each row's own length only
  (``kernels.decode_attention``), elsewhere PyTorch's SDPA with ``enable_gqa``;
* on CUDA, captures the whole decode step — projections, attention, sampling — as a CUDA graph,
  one per (row bucket, attended-length bucket), so a step is one graph launch;
* samples (greedy, temperature, top-p) on the device with no host synchronisation per step and no
  sort of the vocabulary (``kernels.sample``: inverse-CDF candidates, rejection outside the
  nucleus); the host looks at the finished flags only every ``sync_every`` steps;
* compacts the batch when enough rows have finished (EOS or stop string), moving live rows to the
  front and switching to a smaller captured graph, so finished sequences stop costing work.

Projections run on inference weights built from the model at the first ``generate`` and refreshed by
``sync_weights`` (a few milliseconds), which a trainer calls after it changed the policy: q|k|v as one
matrix and gate|up as one, so a decode step makes two GEMMs where it made five, and LoRA adapters
merged in (W + scale·B·A), so an adapter being trained costs no extra GEMMs. A plain projection that needs neither (o, down
without LoRA) is the model's own weight, no copy. ``merge_weights=False`` keeps the memory instead
and calls the model's modules (LoRA live). Norms, MLP activation, rotary embedding and lm_head are
always the model's own modules.

Sampling is exact: the token follows softmax(logits / T) renormalised over the top-p nucleus (see
``kernels`` for the one approximation, a fall-back to the most likely token with probability at most
(1 - top_p)^40 per step).
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from posttrain.engine import kernels
from posttrain.engine.base import Completion, Engine, SamplingParams, eos_token_ids, finish
from posttrain.engine.models import sdpa_backends

SUPPORTED = {"llama", "mistral", "qwen2", "qwen3"}
ROW_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
SPAN_STEP = 64
RMS_NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm"}  # weight · x / rms(x), the eps in variance_epsilon


def _base(model):
    """The HF CausalLM under a PEFT wrapper (its modules keep their LoRA layers)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def supports(model) -> tuple[bool, str]:
    base = _base(model)
    cfg = getattr(base, "config", None)
    mt = getattr(cfg, "model_type", None)
    if mt not in SUPPORTED:
        return False, f"model type {mt!r} is not one of {sorted(SUPPORTED)}"
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", mt == "mistral"):
        return False, "sliding-window attention"
    if getattr(base, "is_loaded_in_8bit", False):
        return False, "8-bit quantized weights"
    inner = getattr(base, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
        return False, "unexpected module layout"
    return True, ""


def _lse(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """log-sum-exp of logits / T in fp32. [n, V] -> [n]"""
    return torch.logsumexp(logits.float() / temperature, dim=-1)


def _prefill_chunks(lengths: list[int], budget: int) -> list[tuple[int, int]]:
    """Consecutive [start, stop) slices whose padded size (rows × longest) stays within ``budget``
    tokens (always at least one prompt): big prefill products, bounded activation memory."""
    out, start, longest = [], 0, 0
    for i, n in enumerate(lengths):
        if i > start and (i - start + 1) * max(longest, n) > budget:
            out.append((start, i))
            start, longest = i, 0
        longest = max(longest, n)
    if lengths:
        out.append((start, len(lengths)))
    return out


def _rows_bucket(n: int) -> int:
    return next((b for b in ROW_BUCKETS if b >= n), n)


def _dequantize(weight: torch.Tensor) -> torch.Tensor:
    """A bitsandbytes 4-bit weight (packed, with its ``quant_state``) as a dense [out, in] tensor in the
    compute dtype (QLoRA: NF4 with double quantization, bf16 compute)."""
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(weight.data, weight.quant_state)


def _dense(linear) -> tuple[torch.Tensor, bool]:
    """(the dense weight of an ``nn.Linear``, whether it is the module's own tensor). A 4-bit layer
    (bitsandbytes' Linear4bit is an nn.Linear whose weight is packed) is dequantized: a new tensor."""
    if getattr(linear.weight, "quant_state", None) is not None:
        return _dequantize(linear.weight), False
    return linear.weight, True


def _compute_dtype(module) -> torch.dtype:
    """The dtype a projection computes in: its dense weight's (a 4-bit weight's quant state records
    the dtype it dequantizes to), through a PEFT wrapper to its base layer."""
    linear = getattr(module, "base_layer", module)
    state = getattr(linear.weight, "quant_state", None)
    return state.dtype if state is not None else linear.weight.dtype


def _linear_parts(module):
    """(weight, bias, LoRA adapters, whether the weight is the module's own tensor) of a projection: a
    plain or 4-bit ``nn.Linear`` (no adapters), or a PEFT LoRA layer with its active, unmerged adapters
    as (lora_B, lora_A, scale); None for anything else (DoRA, other quantizations or custom layers),
    which the engine then calls as modules."""
    if isinstance(module, torch.nn.Linear):
        weight, owned = _dense(module)
        return weight, module.bias, [], owned
    base = getattr(module, "base_layer", None)
    if not isinstance(base, torch.nn.Linear) or not hasattr(module, "lora_A"):
        return None
    weight, owned = _dense(base)
    if getattr(module, "disable_adapters", False) or getattr(module, "merged", False):
        return weight, base.bias, [], owned  # PEFT's own forward then uses the base layer alone
    adapters = []
    for name in module.active_adapters:
        if name not in module.lora_A:
            continue
        if getattr(module, "use_dora", {}).get(name, False):
            return None
        adapters.append((module.lora_B[name], module.lora_A[name], module.scaling[name]))
    return weight, base.bias, adapters, owned


class _Proj:
    """Projections of one input as a single (weight, bias): q|k|v stacked, gate|up stacked, LoRA
    merged in. A lone plain Linear is used as it is (the model's own tensors, no copy); anything else
    lives in a buffer that ``refresh`` rewrites in place, so captured CUDA graphs stay valid."""

    def __init__(self, modules):
        self.modules = modules
        self.weight, self.bias, self.own = None, None, False
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> bool:
        """Bring the weights up to date with the modules; True when the tensors moved (captured
        graphs point at the old ones)."""
        parts = [_linear_parts(m) for m in self.modules]
        if len(parts) == 1 and not parts[0][2] and parts[0][3]:  # a plain projection: the model's own tensor
            w, b, _, _ = parts[0]
            moved = not self.own or w.data_ptr() != self.weight.data_ptr()
            self.weight, self.bias, self.own = w, b, True
            return moved
        moved = self.own or self.weight is None
        if moved:
            w0 = parts[0][0]
            rows = sum(w.shape[0] for w, _, _, _ in parts)
            self.weight = torch.empty((rows, w0.shape[1]), dtype=w0.dtype, device=w0.device)
            biased = any(b is not None or any(lb.bias is not None for lb, _, _ in ad) for _, b, ad, _ in parts)
            self.bias = torch.zeros(rows, dtype=w0.dtype, device=w0.device) if biased else None
            self.own = False
        row = 0
        for w, b, adapters, _ in parts:
            out = slice(row, row + w.shape[0])
            if adapters:  # merged in fp32, rounded once
                acc = w.float().clone()  # never the model's own tensor (fp32 .float() is a no-op)
                for lb, la, scale in adapters:
                    acc.addmm_(lb.weight.float(), la.weight.float(), alpha=scale)
                self.weight[out].copy_(acc)
            else:
                self.weight[out].copy_(w)
            if self.bias is not None:
                acc = b.float() if b is not None else torch.zeros(w.shape[0], device=w.device)
                for lb, _, scale in adapters:
                    if lb.bias is not None:
                        acc = acc + scale * lb.bias.float()
                self.bias[out].copy_(acc)
            row += w.shape[0]
        return moved


class FastEngine(Engine):
    name = "fast"

    def __init__(self, model, tokenizer, batch_size: int = 256, *, use_cuda_graphs: bool | None = None,
                 sync_every: int = 8, prefill_tokens: int = 16384, compile: bool | None = None,
                 merge_weights: bool = True):
        ok, why = supports(model)
        if not ok:
            raise ValueError(f"fast engine does not support this model: {why}")
        self.model, self.tokenizer = model, tokenizer
        self.base = _base(model)
        self.inner = self.base.model
        cfg = self.base.config
        self.n_layers = cfg.num_hidden_layers
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.group = self.n_heads // self.n_kv
        self.gqa = bool(self.group > 1)  # a plain bool: torch.compile would make the comparison symbolic
        attn0 = self.inner.layers[0].self_attn
        self.scaling = getattr(attn0, "scaling", self.head_dim ** -0.5)
        self.batch_size = max(1, batch_size)
        self.sync_every = sync_every
        self.prefill_tokens = prefill_tokens  # padded prompt tokens per prefill forward (bounds its memory)
        self.device = next(model.parameters()).device
        # The projections' compute dtype. A QLoRA policy after peft's prepare_model_for_kbit_training
        # keeps embeddings, norms and lm_head in fp32 around bf16 (dequantized) projections: the
        # engine's residual stream and KV cache are in the projections' dtype, cast at those modules.
        self.dtype = _compute_dtype(attn0.q_proj)
        self.head_dtype = self.base.lm_head.weight.dtype
        self.use_graphs = (self.device.type == "cuda") if use_cuda_graphs is None else use_cuda_graphs
        self.eos = sorted(eos_token_ids(model, tokenizer))
        self._graphs: dict = {}
        self._pool = None
        self._cache_shape = None
        self.merge_weights = merge_weights
        self._w = None  # per layer {"qkv", "o", "gu", "down"}: _Proj, built at the first generate
        self._fused = False  # decode on the fused elementwise kernels (decided once the weights are built)
        # Persistent tensors: captured graphs keep pointers to them.
        self._eos = torch.tensor(self.eos, dtype=torch.long, device=self.device)
        self._fwd, self._prefill_fwd, self._lse_impl = self._forward_step, self._prefill_forward, _lse
        if compile is None:
            # Off by default: on an H100, torch.compile made a whole GSM8K evaluation of SmolLM2 take
            # 227 s from process start (85 s with warm caches) against 24 s (22 s) without it, while
            # its steady-state gain is 1.5x decode on the 1B shape (bench/e2e.py, bench/rollout.py;
            # BENCHMARKS.md). POSTTRAIN_COMPILE=1 turns it on for long runs, where it pays.
            compile = os.environ.get("POSTTRAIN_COMPILE", "0") == "1"
        self.compiled = bool(self.device.type == "cuda" and compile)  # a plain bool: read inside the traced step
        if self.compiled:
            # Fuse the many small elementwise kernels (norms, rotary, residuals, activations).
            self._fwd = torch.compile(self._forward_step, dynamic=True)
            self._prefill_fwd = torch.compile(self._prefill_forward, dynamic=True)
            self._lse_impl = torch.compile(_lse, dynamic=True)
        self._no_eos = torch.zeros(0, dtype=torch.long, device=self.device)

    @torch.inference_mode()  # the buffers were made in inference mode, inside generate
    def sync_weights(self, policy) -> None:
        """Rebuild the inference weights from ``policy`` (the engine's own model), which changed."""
        super().sync_weights(policy)
        if self._w is not None:
            self._refresh_weights()

    # ------------------------------------------------------------------------------ model pieces --
    def _refresh_weights(self):
        """Rebuild the inference weights from the model (see the module docstring); drop captured
        graphs if any tensor moved."""
        if not self.merge_weights:
            return
        if self._w is None:
            layers = []
            for layer in self.inner.layers:
                a, m = layer.self_attn, layer.mlp
                groups = {"qkv": [a.q_proj, a.k_proj, a.v_proj], "o": [a.o_proj],
                          "gu": [m.gate_proj, m.up_proj], "down": [m.down_proj]}
                if any(_linear_parts(mod) is None for mods in groups.values() for mod in mods):
                    self.merge_weights = False  # e.g. DoRA: call the modules instead
                    return
                layers.append({k: _Proj(mods) for k, mods in groups.items()})
            self._w = layers  # built before any graph is captured: nothing to drop
            self._fused = self._fusable()
            return
        if any([p.refresh() for w in self._w for p in w.values()]):
            self._drop_graphs()

    def _drop_graphs(self):
        """Forget captured graphs; later captures go to a fresh memory pool (the old one is released
        with its graphs and cannot take new ones)."""
        self._graphs.clear()
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None

    def _qkv(self, li, layer, x, cos, sin):
        """x: [N, T, D] -> q [N, H, T, d], k/v [N, Hkv, T, d] with rotary applied."""
        n, t, _ = x.shape
        attn = layer.self_attn
        if self._w is not None:
            p = self._w[li]["qkv"]
            q, k, v = F.linear(x, p.weight, p.bias).split(
                [self.n_heads * self.head_dim, self.n_kv * self.head_dim, self.n_kv * self.head_dim], -1)
        else:
            q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
        q = q.reshape(n, t, self.n_heads, self.head_dim)
        k = k.reshape(n, t, self.n_kv, self.head_dim)
        v = v.reshape(n, t, self.n_kv, self.head_dim)
        if hasattr(attn, "q_norm"):  # Qwen3
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        cos, sin = cos[:, None], sin[:, None]  # [N, 1, T, d]
        q = q * cos + kernels.rotate_half(q) * sin
        k = k * cos + kernels.rotate_half(k) * sin
        return q, k, v

    def _o(self, li, layer, x):
        if self._w is None:
            return layer.self_attn.o_proj(x)
        p = self._w[li]["o"]
        return F.linear(x, p.weight, p.bias)

    def _mlp(self, li, layer, x):
        """The gated MLP, act(gate(x)) * up(x) -> down, with gate|up as one GEMM."""
        if self._w is None:
            return layer.mlp(x)
        gu, down = self._w[li]["gu"], self._w[li]["down"]
        gate, up = F.linear(x, gu.weight, gu.bias).chunk(2, -1)
        return F.linear(layer.mlp.act_fn(gate) * up, down.weight, down.bias)

    def _lse(self, logits, temperature):
        return self._lse_impl(logits, temperature)

    def _rope(self, h, positions):
        cos, sin = self.inner.rotary_emb(h, positions)
        return cos.to(h.dtype), sin.to(h.dtype)

    # ----------------------------------------------------------------------------------- prefill --
    @torch.no_grad()
    def _prefill(self, prompts: list[list[int]], caches_flat, rows: torch.Tensor):
        """Run each prompt once; write its K/V into cache rows ``rows`` (one list of rows per prompt's
        group); return the last-position logits [P, V] (fp32)."""
        out = []
        for start, stop in _prefill_chunks([len(p) for p in prompts], self.prefill_tokens):
            chunk = prompts[start:stop]
            width = max(len(p) for p in chunk)
            ids = torch.tensor([p + [0] * (width - len(p)) for p in chunk], device=self.device)
            lens = torch.tensor([len(p) for p in chunk], device=self.device)
            with sdpa_backends():
                out.append(self._prefill_fwd(ids, lens, rows[start:stop], caches_flat))
        return torch.cat(out)

    def _prefill_forward(self, ids, lens, dest, caches_flat):
        """Last-position logits [p, V] (fp32) of right-padded prompts ``ids`` [p, W]; each prompt's K/V
        go to its cache rows ``dest`` [p, G]. Pure tensor code, so torch.compile can fuse it."""
        p, width = ids.shape
        g = dest.shape[1]
        pos = torch.arange(width, device=ids.device)[None].expand(p, -1)
        h = self.inner.embed_tokens(ids).to(self.dtype)
        cos, sin = self._rope(h, pos)
        for li, layer in enumerate(self.inner.layers):
            q, k, v = self._qkv(li, layer, layer.input_layernorm(h).to(self.dtype), cos, sin)
            # Right padding + causal mask: real tokens never see the padding after them.
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scaling, enable_gqa=self.gqa)
            h = h + self._o(li, layer, o.transpose(1, 2).reshape(p, width, -1))
            h = h + self._mlp(li, layer, layer.post_attention_layernorm(h).to(self.dtype))
            kc, vc = caches_flat[2 * li], caches_flat[2 * li + 1]
            kc[dest.reshape(-1), :, :width] = k.repeat_interleave(g, dim=0)
            vc[dest.reshape(-1), :, :width] = v.repeat_interleave(g, dim=0)
        last = h[torch.arange(p, device=h.device), lens - 1]
        return self.base.lm_head(self.inner.norm(last).to(self.head_dtype)).float()

    # ------------------------------------------------------------------------------------ decode --
    def _fusable(self) -> bool:
        """Whether the decode step can run on the fused elementwise kernels (``_fused_step``), asked once
        when the merged inference weights are built: no torch.compile (which fuses by itself),
        Llama-family RMSNorms in the projections' dtype, SiLU, no per-head q/k norms (Qwen3), a
        power-of-two head size."""
        if self.compiled:
            return False
        layers = self.inner.layers
        norms = [m for layer in layers for m in (layer.input_layernorm, layer.post_attention_layernorm)] + [self.inner.norm]
        return (getattr(self.base.config, "hidden_act", None) == "silu" and not hasattr(layers[0].self_attn, "q_norm")
                and all(type(m).__name__ in RMS_NORMS and m.weight.dtype == self.dtype for m in norms)
                and self.head_dim & (self.head_dim - 1) == 0)

    def _fused_step(self, tokens, pos, ar, caches, span: int):
        """``_forward_step`` with each layer's elementwise work in four kernels (``kernels.add_rms_norm``
        twice, ``rope_cache_write``, ``silu_mul``) where the modules launch dozens: on a small model the
        decode step is bound by its kernel count, not by arithmetic (bench/fused_step.py: 2.5× on the
        SmolLM2 shape at 64 rows). Same rounding as the modules."""
        n, layers = tokens.shape[0], self.inner.layers
        h = self.inner.embed_tokens(tokens).to(self.dtype)  # [n, D]
        cos, sin = self._rope(h[:, None], pos[:, None])  # [n, 1, d]
        cos, sin = cos[:, 0], sin[:, 0]
        norm = layers[0].input_layernorm
        h, x = kernels.add_rms_norm(h, None, norm.weight, norm.variance_epsilon)
        for li, layer in enumerate(layers):
            w, kc, vc = self._w[li], caches[2 * li], caches[2 * li + 1]
            qkv = F.linear(x, w["qkv"].weight, w["qkv"].bias)
            q = kernels.rope_cache_write(qkv, cos, sin, kc, vc, ar, pos, self.n_heads, self.n_kv)  # [n, H, d]
            o = kernels.decode_attention(q, kc, vc, pos + 1, self.scaling, span)
            norm = layer.post_attention_layernorm
            h, x = kernels.add_rms_norm(h, F.linear(o.reshape(n, -1), w["o"].weight, w["o"].bias), norm.weight, norm.variance_epsilon)
            act = kernels.silu_mul(F.linear(x, w["gu"].weight, w["gu"].bias))
            norm = layers[li + 1].input_layernorm if li + 1 < len(layers) else self.inner.norm
            h, x = kernels.add_rms_norm(h, F.linear(act, w["down"].weight, w["down"].bias), norm.weight, norm.variance_epsilon)
        return self.base.lm_head(x.to(self.head_dtype))

    def _forward_step(self, tokens, pos, ar, caches, span: int):
        """Logits [n, V] for one new token per row at positions ``pos``, attending to [0, span).

        Pure tensor code (no host syncs): it is captured in a CUDA graph, optionally after
        torch.compile has fused its elementwise work."""
        if self._fused:
            return self._fused_step(tokens, pos, ar, caches, span)
        n = tokens.shape[0]
        h = self.inner.embed_tokens(tokens[:, None]).to(self.dtype)  # [n, 1, D]
        cos, sin = self._rope(h, pos[:, None])
        for li, layer in enumerate(self.inner.layers):
            q, k, v = self._qkv(li, layer, layer.input_layernorm(h).to(self.dtype), cos, sin)  # q [n, H, 1, d]
            kc, vc = caches[2 * li], caches[2 * li + 1]
            kc[ar, :, pos] = k[:, :, 0]
            vc[ar, :, pos] = v[:, :, 0]
            # Grouped-query attention: each KV head is read once for the queries that share it.
            o = kernels.decode_attention(q[:, :, 0], kc, vc, pos + 1, self.scaling, span)  # [n, H, d]
            h = h + self._o(li, layer, o.reshape(n, 1, -1))
            h = h + self._mlp(li, layer, layer.post_attention_layernorm(h).to(self.dtype))
        return self.base.lm_head(self.inner.norm(h[:, 0]).to(self.head_dtype))

    def _decode(self, st: dict, n: int, span: int):
        """One decode step for rows [0, n): reads st['tokens'], st['pos'], writes st['next'],
        st['logp'], updates st['done'] and advances tokens/pos."""
        tokens, pos = st["tokens"][:n], st["pos"][:n]
        logits = self._fwd(tokens, pos, st["arange"][:n], st["caches_flat"], span)
        nxt, lp = self._sample(logits, st["params"])
        done = st["done"][:n]
        nxt = torch.where(done, torch.full_like(nxt, st["pad"]), nxt)
        st["next"][:n] = nxt
        st["logp"][:n] = torch.where(done, torch.zeros_like(lp), lp)
        if st["eos"].numel():
            done |= (nxt[:, None] == st["eos"][None]).any(-1)
        tokens.copy_(nxt)
        pos.add_(1).clamp_(max=st["max_pos"])

    def _sample(self, logits: torch.Tensor, p: SamplingParams):
        """Next token and its log-prob under softmax(logits / T); no host synchronisation.

        ``logits`` may be bf16: the argmax is exact on them (bf16 -> fp32 is exact) and the
        log-sum-exp accumulates in fp32."""
        if p.greedy:
            tok = logits.argmax(-1)
            lp = logits.gather(-1, tok[:, None])[:, 0].float() - self._lse(logits, 1.0)
            return tok, lp
        return kernels.sample(logits, p.temperature, p.top_p)

    def _step(self, st: dict, n: int, span: int):
        if not self.use_graphs:
            self._decode(st, n, span)
            return
        key = (n, span, st["key"])
        graph = self._graphs.get(key)
        if graph is None:
            # Warm up on a side stream, then capture. Capture runs the step, so undo its effects:
            # snapshot the state it mutates and restore it before the real (replayed) step.
            snap = {k: st[k][:n].clone() for k in ("tokens", "pos", "done")}
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                self._decode(st, n, span)
                for k, v in snap.items():
                    st[k][:n].copy_(v)
            torch.cuda.current_stream().wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=st["pool"]):
                self._decode(st, n, span)
            for k, v in snap.items():
                st[k][:n].copy_(v)
            self._graphs[key] = graph
        graph.replay()

    # ---------------------------------------------------------------------------------- generate --
    def _state(self, rows: int, max_len: int, params: SamplingParams) -> dict:
        """Buffers for one generation call; the KV cache is reused across calls when it fits."""
        shape = (rows, self.n_kv, max_len, self.head_dim)
        if self._cache_shape is None or any(a < b for a, b in zip(self._cache_shape, shape)):
            self._drop_graphs()  # graphs point into the old buffers
            self._caches = [(torch.zeros(shape, dtype=self.dtype, device=self.device),
                             torch.zeros(shape, dtype=self.dtype, device=self.device)) for _ in range(self.n_layers)]
            self._cache_shape = shape
            self._caches_flat = tuple(t for kv in self._caches for t in kv)
            self._bufs = {
                "tokens": torch.zeros(rows, dtype=torch.long, device=self.device),
                "pos": torch.zeros(rows, dtype=torch.long, device=self.device),
                "next": torch.zeros(rows, dtype=torch.long, device=self.device),
                "logp": torch.zeros(rows, dtype=torch.float32, device=self.device),
                "done": torch.zeros(rows, dtype=torch.bool, device=self.device),
                "arange": torch.arange(rows, device=self.device),
            }
        rows_c, _, len_c, _ = self._cache_shape
        return {**self._bufs, "caches": self._caches, "caches_flat": self._caches_flat, "pool": self._pool, "params": params,
                "key": (params.temperature, params.top_p, params.ignore_eos),
                "eos": self._no_eos if params.ignore_eos else self._eos,
                "pad": int(self.tokenizer.pad_token_id or 0), "max_pos": len_c - 1}

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], params: SamplingParams, progress: bool = False) -> list[Completion]:
        from tqdm.auto import tqdm

        self.check_lengths(prompts, params)
        g = params.n
        per_wave = max(1, self.batch_size // g)  # prompts per wave; whole groups stay together
        out: list[Completion] = []
        bar = tqdm(total=len(prompts) * g, desc="generate[fast]", disable=not progress, unit="seq")
        if params.seed is not None:
            torch.manual_seed(params.seed)
        if self._w is None:
            self._refresh_weights()  # first call: build the inference weights
        for start in range(0, len(prompts), per_wave):
            wave = prompts[start:start + per_wave]
            out.extend(self._wave(wave, params, start))
            bar.update(len(wave) * g)
        bar.close()
        return out

    def _wave(self, prompts: list[list[int]], params: SamplingParams, offset: int) -> list[Completion]:
        g, n_rows = params.n, len(prompts) * params.n
        longest = max(len(p) for p in prompts)
        max_len = int(math.ceil((longest + params.max_new_tokens + 1) / SPAN_STEP) * SPAN_STEP)
        cap_rows = _rows_bucket(max(n_rows, self.batch_size if self.use_graphs else n_rows))
        st = self._state(cap_rows, max_len, params)
        rows = torch.arange(n_rows, device=self.device).view(len(prompts), g)
        last_logits = self._prefill(prompts, st["caches_flat"], rows)  # [P, V]
        first, first_lp = self._sample(last_logits.repeat_interleave(g, 0), params)
        if self.first_token_s is None:  # one host sync in the engine's life, to time the first token
            first.cpu()
            self.note_first_token()
        lens = torch.tensor([len(p) for p in prompts], device=self.device).repeat_interleave(g)
        st["tokens"][:n_rows] = first
        st["pos"][:n_rows] = lens
        st["done"][:n_rows] = (first[:, None] == st["eos"][None]).any(-1) if st["eos"].numel() else False
        st["done"][n_rows:] = True
        st["pos"][n_rows:] = 0
        st["tokens"][n_rows:] = st["pad"]
        steps = params.max_new_tokens
        tok_buf = torch.zeros((n_rows, steps), dtype=torch.long, device=self.device)
        lp_buf = torch.zeros((n_rows, steps), dtype=torch.float32, device=self.device)
        tok_buf[:, 0], lp_buf[:, 0] = first, first_lp
        live = torch.arange(n_rows, device=self.device)  # original row of each live slot
        n_live = n_rows
        stop_hit = torch.zeros(n_rows, dtype=torch.bool)
        t = 1
        longest_live = longest  # a Python int: no host sync inside the decode loop
        while t < steps:
            n_b = _rows_bucket(n_live) if self.use_graphs else n_live
            span = min(max_len, int(math.ceil((longest_live + t + 1) / SPAN_STEP) * SPAN_STEP))
            for _ in range(min(self.sync_every, steps - t)):
                self._step(st, n_b, span)
                tok_buf[live, t] = st["next"][:n_live]
                lp_buf[live, t] = st["logp"][:n_live]
                t += 1
                if longest_live + t + 1 > span:
                    break
            # ---- host sync point: finished rows, stop strings, compaction
            done = st["done"][:n_live].clone()
            if params.stop:
                done |= self._stop_hits(tok_buf, live, n_live, t, params.stop, stop_hit)
            if bool(done.all()):
                break
            keep = (~done).nonzero()[:, 0]
            if self.use_graphs and _rows_bucket(len(keep)) < n_b or not self.use_graphs and len(keep) < n_live:
                self._compact(st, keep)
                live, n_live = live[keep], len(keep)
                lens = lens[keep]
                longest_live = int(lens.max())
                st["done"][n_live:] = True
        tokens, logps = tok_buf.tolist(), lp_buf.tolist()
        eos = set(self.eos)
        return [finish(self.tokenizer, offset + r // g, tokens[r], eos, params.stop, logps[r], params.ignore_eos)
                for r in range(n_rows)]

    def _stop_hits(self, tok_buf, live, n_live, t, stop, stop_hit) -> torch.Tensor:
        rows = live.tolist()
        toks = tok_buf[live, :t].tolist()
        hits = torch.zeros(n_live, dtype=torch.bool)
        for i, (r, seq) in enumerate(zip(rows, toks)):
            if stop_hit[r]:
                hits[i] = True
                continue
            text = self.tokenizer.decode(seq, skip_special_tokens=True)
            if any(s in text for s in stop):
                hits[i] = stop_hit[r] = True
        return hits.to(self.device)

    def _compact(self, st: dict, keep: torch.Tensor):
        """Move live rows to the front of every buffer (one copy of their KV cache)."""
        n = len(keep)
        for kc, vc in st["caches"]:
            kc[:n] = kc[keep]
            vc[:n] = vc[keep]
        for name in ("tokens", "pos", "done"):
            st[name][:n] = st[name][keep]
