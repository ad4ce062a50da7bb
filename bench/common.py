"""Shared helpers for the benchmarks: published model shapes with random weights, bandwidth, timing,
and where a profiled region's device time went."""

from __future__ import annotations

import json
import re
import time
from collections import defaultdict

import torch

# Llama-3.2-1B's published config (no weights are downloaded: they are random).
LLAMA32_1B = dict(
    vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
    num_key_value_heads=8, head_dim=64, max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
    rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                  "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001, hidden_act="silu",
)


# Llama-3.1-8B's published config (seed 003's model); random weights too.
LLAMA31_8B = dict(LLAMA32_1B, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
                  rope_scaling=dict(LLAMA32_1B["rope_scaling"], factor=8.0))
# SmolLM2-135M(-Instruct)'s published config (Llama architecture, tied embeddings).
SMOLLM2_135M = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, head_dim=64, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
    tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2, hidden_act="silu",
)
# Qwen2.5-Coder-0.5B-Instruct's published config (Qwen2ForCausalLM: q/k/v biases, untied lm_head).
QWEN25_CODER_05B = dict(
    model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
    num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6,
    rope_theta=1000000.0, tie_word_embeddings=False, use_sliding_window=False, sliding_window=None,
    bos_token_id=151643, eos_token_id=151645, pad_token_id=151643, hidden_act="silu",
)
SHAPES = {"llama32-1b": LLAMA32_1B, "llama31-8b": LLAMA31_8B, "smollm2-135m": SMOLLM2_135M,
          "qwen2.5-coder-0.5b": QWEN25_CODER_05B}


def shape_config(spec: dict):
    """The transformers config of a shape: ``spec`` holds its fields, and ``model_type`` (default llama)."""
    from transformers import AutoConfig

    spec = dict(spec)
    return AutoConfig.for_model(spec.pop("model_type", "llama"), **spec)


def shape_model(spec: dict, dtype=torch.bfloat16, device="cuda", seed=0):
    """A causal LM of shape ``spec`` (a dict of ``SHAPES``) with random weights, in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(shape_config(spec)).to(dtype)
    model.eval()
    return model


def stand_in_tokenizer(texts, vocab_size: int = 128256):
    """posttrain's byte-level BPE (8k merges) learned on ``texts``, padded with reserved special tokens
    to the real model's vocabulary size, as Llama 3 pads its own: ids past the BPE decode to nothing."""
    from tokenizers import AddedToken

    from posttrain.tokenization import train_bpe_tokenizer

    tok = train_bpe_tokenizer(texts, vocab_size=8192)
    tok.add_tokens([AddedToken(f"<|reserved_{i}|>", special=True, normalized=False) for i in range(vocab_size - len(tok))],
                   special_tokens=True)
    return tok


def save_shape(name: str, out, texts, seed: int = 0) -> None:
    """A model folder of a published shape with random bf16 weights and the stand-in tokenizer."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = shape_config(SHAPES[name])
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # initialise in bf16: an 8B model never exists in fp32
    try:
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = AutoModelForCausalLM.from_config(cfg)
    finally:
        torch.set_default_dtype(prev)
    model.save_pretrained(out)
    stand_in_tokenizer(texts, cfg.vocab_size).save_pretrained(out)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def llama32_1b(dtype=torch.bfloat16, device="cuda", seed=0):
    return shape_model(LLAMA32_1B, dtype, device, seed)


def copy_bandwidth(gib: float = 2.0, reps: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read and written."""
    n = int(gib * 2**30) // 2
    a = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        b.copy_(a)
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / reps
    del a, b
    return 2 * n * 2 / dt


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, *args, **kwargs):
    """(fn(*args, **kwargs), its wall seconds), the device synchronised before and after."""
    sync()
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    sync()
    return out, time.perf_counter() - t


# Where device time goes: kernel names (or, in a CPU-only run, aten op names) to a category; the
# first pattern that matches wins, so the order matters (an index_put kernel is an "elementwise_kernel").
CATEGORIES = ("attention", "projections", "elementwise", "sampling_bookkeeping", "optimizer", "copies", "other")
_RULES = tuple((cat, re.compile(pattern, re.IGNORECASE)) for cat, pattern in (
    ("copies", r"memcpy|memset|copy_kernel|CatArrayBatchedCopy|^aten::(copy_|to|_to_copy|clone|cat|contiguous)$"),
    ("attention", r"attn|attention|flash|fmha|sdpa|scaled_dot_product"),
    ("optimizer", r"adam|multi_tensor_apply|foreach|LpNorm|vector_norm"),
    ("projections", r"gemm|gemv|nvjet|xmma|cublas|splitK|dot_kernel|^aten::(mm|addmm|bmm|baddbmm|matmul|linear)$"),
    ("sampling_bookkeeping", r"_sample|_greedy|_advance_rows|sort|topk|argmax|ArgMax|MaxOps|MinOps|logsumexp|softmax|cross_entropy|nll_loss"
                             r"|index|scatter|gather|where|Compare|Bitwise|arange|fill|cumsum|scan|masked_fill|nonzero"
                             r"|embedding|multinomial|exponential|uniform|distribution|clamp"
                             r"|^aten::(eq|ne|lt|gt|le|ge|any|all|max|min|zeros|full|rand|empty|bernoulli)_?$"),
    ("elementwise", r"rms_norm|rope|silu|elementwise|Functor|triton_|reduce_kernel|dropout|masked_scale"
                    r"|^aten::(add|mul|pow|rsqrt|mean|neg|cos|sin|sub|div|exp|log|sigmoid|sum|square|reciprocal|sqrt)_?$"),
))
_LAUNCHES = re.compile(r"^(cudaLaunchKernel|cudaLaunchKernelExC|cuLaunchKernel|cuLaunchKernelEx|cudaGraphLaunch)")


def kernel_category(name: str) -> str:
    return next((cat for cat, pattern in _RULES if pattern.search(name)), "other")


def device_time(prof) -> dict:
    """Where a profiled region's device time went (a finished ``torch.profiler.profile``): kernel time
    in ms by ``CATEGORIES``, the time the device was busy (the union of the kernels' intervals, ms:
    wall minus this is time the device waited for the host), kernels run, kernel and graph launches,
    the largest kernels left in "other", and every kernel's total time by name. A run without CUDA events (CPU only) reports the CPU's
    aten ops by their self time instead."""
    events = [e for e in prof.events() if not getattr(e, "is_user_annotation", False) and not e.name.startswith("ProfilerStep")]
    kernels = [e for e in events if e.device_type.name == "CUDA"]
    if kernels:
        spans = sorted((e.time_range.start, e.time_range.end) for e in kernels)
        busy, end = 0.0, float("-inf")
        for a, b in spans:
            busy += max(0.0, b - max(a, end))
            end = max(end, b)
        timings = [(e.name, e.time_range.end - e.time_range.start) for e in kernels]
    else:
        timings = [(e.name, e.self_cpu_time_total) for e in events if e.name.startswith("aten::")]
        busy = sum(us for _, us in timings)
    by = dict.fromkeys(CATEGORIES, 0.0)
    other, per_name = defaultdict(float), defaultdict(float)
    for name, us in timings:
        cat = kernel_category(name)
        by[cat] += us / 1e3
        per_name[name] += us / 1e3
        if cat == "other":
            other[name] += us / 1e3
    return {"device": "cuda" if kernels else "cpu", "busy_ms": busy / 1e3, "by_category_ms": by, "kernels": len(timings),
            "launches": sum(1 for e in events if e.device_type.name == "CPU" and _LAUNCHES.match(e.name)),
            "other_top": [{"name": n[:160], "ms": round(ms, 4)} for n, ms in sorted(other.items(), key=lambda kv: -kv[1])[:5]],
            "by_name_ms": dict(per_name)}


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def save(path, rows):
    """Write what is measured so far (a run cut short still leaves its rows)."""
    with open(path, "w") as f:
        json.dump(rows, f, indent=2)


def emit(path, rows):
    with open(path, "w") as f:
        json.dump(rows, f, indent=2)
    print(json.dumps(rows, indent=2))
