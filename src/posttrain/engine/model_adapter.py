"""The model adapter: a Llama-family HF decoder (Llama, Mistral, Qwen2, Qwen3; GQA) as the fast engine
runs it — its shape, its inference weights (``projections``), and two pure-tensor forwards over a KV
cache: ``prefill`` (right-padded prompts, all positions at once) and ``step`` (one new token per row).

Projections run on inference weights built at the first ``build_weights`` and refreshed by ``refresh``
(a trainer's ``sync_weights``): q|k|v as one group and gate|up as one, so a decode step makes two GEMMs
where it made five, each group a ``MergedProjection`` (LoRA merged in: an adapter being trained costs no
extra GEMMs) or, for a bitsandbytes 4-bit base served without a dense copy, a ``LowRankProjection``
(``quantized_rollouts``). ``merge_weights=False`` calls the model's modules instead (LoRA live). The
embeddings, the rotary cos/sin and lm_head are always the model's own modules.

On a Llama-family model the decode step and the prefill run their norms, rotary embedding, cache writes and
SiLU on the fused elementwise kernels (``kernels.add_rms_norm``, ``rope_cache_write``, ``silu_mul``), decided
once when the weights are built; otherwise the model's own modules do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from posttrain.engine import kernels
from posttrain.engine.projections import (
    HostOffload,
    LowRankProjection,
    MergedProjection,
    check_quantized_rollouts,
    choose_quantized_path,
    compute_dtype,
    dense_copy_bytes,
    linear_parts,
    quantized_weights,
)

SUPPORTED = {"llama", "mistral", "qwen2", "qwen3"}
RMS_NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "DirectRMSNorm"}  # weight · x / rms(x), the eps in variance_epsilon


def base_model(model):
    """The HF CausalLM under a PEFT wrapper (its modules keep their LoRA layers)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def supports(model) -> tuple[bool, str]:
    base = base_model(model)
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


@dataclass
class LayerProjections:
    """One decoder layer's projection groups."""

    qkv: MergedProjection | LowRankProjection
    o: MergedProjection | LowRankProjection
    gu: MergedProjection | LowRankProjection
    down: MergedProjection | LowRankProjection

    def all(self):
        return (self.qkv, self.o, self.gu, self.down)


def _groups(layer) -> dict[str, list]:
    a, m = layer.self_attn, layer.mlp
    return {"qkv": [a.q_proj, a.k_proj, a.v_proj], "o": [a.o_proj], "gu": [m.gate_proj, m.up_proj], "down": [m.down_proj]}


class ModelAdapter:
    """What the scheduler needs of a model: its KV shape and dtype, ``prefill`` and ``step``."""

    def __init__(self, model, *, merge_weights: bool = True, compiled: bool = False, quantized_rollouts: str = "auto"):
        ok, why = supports(model)
        if not ok:
            raise ValueError(f"fast engine does not support this model: {why}")
        check_quantized_rollouts(quantized_rollouts)
        self.base = base_model(model)
        self.inner = self.base.model
        cfg = self.base.config
        self.n_layers = cfg.num_hidden_layers
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.gqa = bool(self.n_heads // self.n_kv > 1)  # a plain bool: torch.compile would make the comparison symbolic
        attn0 = self.inner.layers[0].self_attn
        self.scaling = getattr(attn0, "scaling", self.head_dim ** -0.5)
        self.device = next(model.parameters()).device
        # The projections' compute dtype. A QLoRA policy after peft's prepare_model_for_kbit_training
        # keeps embeddings, norms and lm_head in fp32 around bf16 (dequantized) projections: the
        # engine's residual stream and KV cache are in the projections' dtype, cast at those modules.
        self.dtype = compute_dtype(attn0.q_proj)
        self.head_dtype = self.base.lm_head.weight.dtype
        self.merge_weights = merge_weights
        self.quantized_rollouts = quantized_rollouts
        self.quantized_path: str | None = None  # "dequantized", "transient" or "4bit" once built, for a 4-bit base
        self.weights: list[LayerProjections] | None = None  # built at the first build_weights
        self.offload: HostOffload | None = None  # transient: the 4-bit base's packed weights, in host memory during rollouts
        self.fused = False  # prefill and decode on the fused elementwise kernels (decided once the weights are built)
        self.compiled = compiled  # a plain bool: read inside the traced step
        self.step, self.prefill = self.step_forward, self.prefill_forward
        if compiled:
            # Fuse the many small elementwise kernels (norms, rotary, residuals, activations).
            self.step = torch.compile(self.step_forward, dynamic=True)
            self.prefill = torch.compile(self.prefill_forward, dynamic=True)

    # ---------------------------------------------------------------------------------- weights --
    @property
    def built(self) -> bool:
        return self.weights is not None or not self.merge_weights

    def build_weights(self, rollout_bytes: int = 0) -> None:
        """Build the inference weights from the model (see the module docstring): once, before any
        graph is captured. A layer the engine cannot compute (e.g. DoRA) turns the modules live.
        ``rollout_bytes``: what the coming generate call allocates besides (its KV cache), which the
        choice of a 4-bit base's path weighs."""
        if self.built:
            return
        groups = [_groups(layer) for layer in self.inner.layers]
        parts = [linear_parts(mod) for g in groups for mods in g.values() for mod in mods]
        if any(p is None for p in parts):
            self.merge_weights = False  # e.g. DoRA: call the modules instead
            return
        if self.quantized_path is None and any(p.quantized for p in parts):  # chosen (and said) once
            self.quantized_path, notice = choose_quantized_path(self.quantized_rollouts, self.copy_bytes(), self.dtype, self.device,
                                                                    rollout_bytes)
            print(notice)

        def projection(mods):
            if self.quantized_path == "4bit" and any(linear_parts(m).quantized for m in mods):
                return LowRankProjection(mods)
            return MergedProjection(mods)

        self.weights = [LayerProjections(**{k: projection(mods) for k, mods in g.items()}) for g in groups]
        self.fused = self._fusable()
        if self.quantized_path == "transient":  # the copy serves the rollout: its 4-bit source waits in host memory
            self.offload = self.offload or HostOffload(quantized_weights([mods for g in groups for mods in g.values()]))
            self.offload.offload()

    def release(self) -> bool:
        """Free a ``transient`` dense copy until the next ``build_weights`` and bring the 4-bit base's
        weights back to the GPU; True when freed (captured graphs point into the copy)."""
        if self.quantized_path != "transient" or self.weights is None:
            return False
        self.weights = None
        self.offload.restore()
        return True

    def copy_bytes(self) -> int:
        """What serving a 4-bit base from a dense copy costs over serving it from its 4-bit weights (0 without one)."""
        return dense_copy_bytes([mods for layer in self.inner.layers for mods in _groups(layer).values()], self.dtype)

    def refresh(self) -> bool:
        """Bring the inference weights up to date with the model, which changed; True when a tensor
        the step reads moved (captured graphs then point at the old ones)."""
        if self.weights is None:
            return False
        away = self.offload is not None and self.offload.away
        if away:  # a transient copy refreshed before its release: it is dequantized from the 4-bit weights
            self.offload.restore()
        moved = any([p.refresh() for w in self.weights for p in w.all()])
        if away:
            self.offload.offload()
        return moved

    def _fusable(self) -> bool:
        """Whether the decode step and the prefill can run on the fused elementwise kernels (``_fused_step``,
        ``_fused_prefill``), asked once
        when the inference weights are built: no torch.compile (which fuses by itself),
        Llama-family RMSNorms in the projections' dtype, SiLU, no per-head q/k norms (Qwen3), a
        power-of-two head size."""
        if self.compiled:
            return False
        layers = self.inner.layers
        norms = [m for layer in layers for m in (layer.input_layernorm, layer.post_attention_layernorm)] + [self.inner.norm]
        return (getattr(self.base.config, "hidden_act", None) == "silu" and not hasattr(layers[0].self_attn, "q_norm")
                and all(type(m).__name__ in RMS_NORMS and m.weight.dtype == self.dtype for m in norms)
                and self.head_dim & (self.head_dim - 1) == 0)

    # --------------------------------------------------------------------------------- the layer --
    def _qkv(self, li, layer, x, cos, sin):
        """x: [N, T, D] -> q [N, H, T, d], k/v [N, Hkv, T, d] with rotary applied."""
        n, t, _ = x.shape
        attn = layer.self_attn
        if self.weights is not None:
            q, k, v = self.weights[li].qkv(x).split(
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
        if self.weights is None:
            return layer.self_attn.o_proj(x)
        return self.weights[li].o(x)

    def _mlp(self, li, layer, x):
        """The gated MLP, act(gate(x)) * up(x) -> down, with gate|up as one GEMM."""
        if self.weights is None:
            return layer.mlp(x)
        w = self.weights[li]
        gate, up = w.gu(x).chunk(2, -1)
        return w.down(layer.mlp.act_fn(gate) * up)

    def _rope(self, h, positions):
        cos, sin = self.inner.rotary_emb(h, positions)
        return cos.to(h.dtype), sin.to(h.dtype)

    # ---------------------------------------------------------------------------------- forwards --
    def prefill_forward(self, ids, lens, dest, caches_flat):
        """Last-position logits [p, V] (the lm_head's dtype) of right-padded prompts ``ids`` [p, W]; each prompt's K/V
        go to its cache rows ``dest`` [p, G]. Pure tensor code, so torch.compile can fuse it."""
        if self.fused:
            return self._fused_prefill(ids, lens, dest, caches_flat)
        (p, width), g = ids.shape, dest.shape[1]
        h, cos, sin = self._prompt_inputs(ids)
        for li, layer in enumerate(self.inner.layers):
            q, k, v = self._qkv(li, layer, layer.input_layernorm(h).to(self.dtype), cos, sin)
            kc, vc = caches_flat[2 * li], caches_flat[2 * li + 1]
            kc[dest.reshape(-1), :, :width] = k.repeat_interleave(g, dim=0)  # each prompt's G rows
            vc[dest.reshape(-1), :, :width] = v.repeat_interleave(g, dim=0)
            h = h + self._o(li, layer, self._attend_prompts(q, k, v))
            h = h + self._mlp(li, layer, layer.post_attention_layernorm(h).to(self.dtype))
        last = h[torch.arange(p, device=h.device), lens - 1]
        return self.base.lm_head(self.inner.norm(last).to(self.head_dtype))

    def _fused_prefill(self, ids, lens, dest, caches_flat):
        """``prefill_forward`` on the decode step's fused kernels over every position, the same rounding as the
        modules: ``kernels.add_rms_norm``, ``kernels.silu_mul``, and ``kernels.rope_cache_write`` for the rotary
        embedding of q and k with the cache writes (each token's K/V to its prompt's rows in ``dest``). The
        modules' elementwise kernels were 47% of a prefill of 1319 GSM8K-length prompts on Qwen2.5-0.5B's shape
        (bench/roofline.py --phases prefill)."""
        p, width = ids.shape
        layers, hq, hkv, d = self.inner.layers, self.n_heads, self.n_kv, self.head_dim
        h, cos, sin = self._prompt_inputs(ids)
        h, cos, sin = h.reshape(p * width, -1), cos.reshape(p * width, d), sin.reshape(p * width, d)
        rows = dest.repeat_interleave(width, 0)  # [p·W, G]: each token's cache rows
        pos = torch.arange(width, device=ids.device).repeat(p)
        norm = layers[0].input_layernorm
        h, x = kernels.add_rms_norm(h, None, norm.weight, norm.variance_epsilon)
        for li, layer in enumerate(layers):
            w, kc, vc = self.weights[li], caches_flat[2 * li], caches_flat[2 * li + 1]
            qkv = w.qkv(x)
            qk = kernels.rope_cache_write(qkv, cos, sin, kc, vc, rows, pos, hq, hkv, with_k=True).view(p, width, hq + hkv, d)
            v = qkv.view(p, width, hq + 2 * hkv, d)[:, :, hq + hkv:]
            o = self._attend_prompts(qk[:, :, :hq].transpose(1, 2), qk[:, :, hq:].transpose(1, 2), v.transpose(1, 2))
            norm = layer.post_attention_layernorm
            h, x = kernels.add_rms_norm(h, w.o(o.reshape(p * width, -1)), norm.weight, norm.variance_epsilon)
            act = kernels.silu_mul(w.gu(x))
            norm = layers[li + 1].input_layernorm if li + 1 < len(layers) else self.inner.norm
            h, x = kernels.add_rms_norm(h, w.down(act), norm.weight, norm.variance_epsilon)
        last = x.view(p, width, -1)[torch.arange(p, device=x.device), lens - 1]  # the final norm's output
        return self.base.lm_head(last.to(self.head_dtype))

    def _prompt_inputs(self, ids):
        """The embeddings [p, W, D] of right-padded prompts ``ids`` [p, W] and their rotary cos/sin."""
        pos = torch.arange(ids.shape[1], device=ids.device)[None].expand(ids.shape[0], -1)
        h = self.inner.embed_tokens(ids).to(self.dtype)
        cos, sin = self._rope(h, pos)
        return h, cos, sin

    def _attend_prompts(self, q, k, v):
        """Causal attention over right-padded prompts (q [p, H, W, d], k/v [p, Hkv, W, d]: real tokens
        never see the padding after them) -> [p, W, H·d]."""
        p, _, width, _ = q.shape
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scaling, enable_gqa=self.gqa)
        return o.transpose(1, 2).reshape(p, width, -1)

    def step_forward(self, tokens, pos, ar, caches_flat, span: int):
        """Logits [n, V] for one new token per row at positions ``pos`` (its K/V written at cache rows
        ``ar``), attending to [0, span).

        Pure tensor code (no host syncs): it is captured in a CUDA graph, optionally after
        torch.compile has fused its elementwise work."""
        if self.fused:
            return self._fused_step(tokens, pos, ar, caches_flat, span)
        n = tokens.shape[0]
        h = self.inner.embed_tokens(tokens[:, None]).to(self.dtype)  # [n, 1, D]
        cos, sin = self._rope(h, pos[:, None])
        lens = pos + 1  # once a step, not once a layer: each is a kernel in the captured graph
        for li, layer in enumerate(self.inner.layers):
            q, k, v = self._qkv(li, layer, layer.input_layernorm(h).to(self.dtype), cos, sin)  # q [n, H, 1, d]
            kc, vc = caches_flat[2 * li], caches_flat[2 * li + 1]
            kc[ar, :, pos] = k[:, :, 0]
            vc[ar, :, pos] = v[:, :, 0]
            # Grouped-query attention: each KV head is read once for the queries that share it.
            o = kernels.decode_attention(q[:, :, 0], kc, vc, lens, self.scaling, span)  # [n, H, d]
            h = h + self._o(li, layer, o.reshape(n, 1, -1))
            h = h + self._mlp(li, layer, layer.post_attention_layernorm(h).to(self.dtype))
        return self.base.lm_head(self.inner.norm(h[:, 0]).to(self.head_dtype))

    def _fused_step(self, tokens, pos, ar, caches_flat, span: int):
        """``step_forward`` with each layer's elementwise work in four kernels (``kernels.add_rms_norm``
        twice, ``rope_cache_write``, ``silu_mul``) where the modules launch dozens: on a small model the
        decode step is bound by its kernel count, not by arithmetic (bench/fused_step.py: 2.5× on the
        SmolLM2 shape at 64 rows). Same rounding as the modules."""
        n, layers = tokens.shape[0], self.inner.layers
        h = self.inner.embed_tokens(tokens).to(self.dtype)  # [n, D]
        cos, sin = self._rope(h[:, None], pos[:, None])  # [n, 1, d]
        cos, sin = cos[:, 0], sin[:, 0]
        lens = pos + 1
        norm = layers[0].input_layernorm
        h, x = kernels.add_rms_norm(h, None, norm.weight, norm.variance_epsilon)
        for li, layer in enumerate(layers):
            w, kc, vc = self.weights[li], caches_flat[2 * li], caches_flat[2 * li + 1]
            q = kernels.rope_cache_write(w.qkv(x), cos, sin, kc, vc, ar, pos, self.n_heads, self.n_kv)  # [n, H, d]
            o = kernels.decode_attention(q, kc, vc, lens, self.scaling, span)
            norm = layer.post_attention_layernorm
            h, x = kernels.add_rms_norm(h, w.o(o.reshape(n, -1)), norm.weight, norm.variance_epsilon)
            act = kernels.silu_mul(w.gu(x))
            norm = layers[li + 1].input_layernorm if li + 1 < len(layers) else self.inner.norm
            h, x = kernels.add_rms_norm(h, w.down(act), norm.weight, norm.variance_epsilon)
        return self.base.lm_head(x.to(self.head_dtype))
