"""Generation: model loading, the HF-generate engine and posttrain's fast engine."""

from posttrain.engine.base import Completion, Engine, SamplingParams
from posttrain.engine.models import load_model, load_tokenizer, resolve_device, resolve_dtype

__all__ = ["Completion", "Engine", "SamplingParams", "load_model", "load_tokenizer", "resolve_device", "resolve_dtype", "make_engine",
           "ENGINES"]

ENGINES = ("auto", "fast", "hf")


def make_engine(name: str, model, tokenizer, batch_size: int = 16, quantized_rollouts: str = "auto") -> Engine:
    """``hf`` (HF generate), ``fast`` (ours; falls back to hf for unsupported models) or ``auto``.

    ``auto`` is the fast engine wherever it supports the model, CPUs included: bench/cpu_engines.py on
    the 2-core CI machine (medians of 5 interleaved runs, greedy identical) measured it 1.15x HF
    generate for the 6.8M nano model and 1.08x for SmolLM2-135M; on GPUs 19x (BENCHMARKS.md).

    ``quantized_rollouts`` (``auto``, ``dequantized`` or ``4bit``): how the fast engine serves a
    bitsandbytes 4-bit base (``fast.FastEngine``)."""
    from posttrain.engine.hf import HFEngine
    from posttrain.engine.projections import check_quantized_rollouts
    from posttrain.errors import PosttrainError

    check_quantized_rollouts(quantized_rollouts)
    if name == "hf":
        return HFEngine(model, tokenizer, batch_size)
    if name in ("fast", "auto"):
        try:
            from posttrain.engine.fast import FastEngine, supports
        except ImportError:
            return HFEngine(model, tokenizer, batch_size)
        ok, why = supports(model)
        if ok:
            return FastEngine(model, tokenizer, batch_size, quantized_rollouts=quantized_rollouts)
        if name == "fast":
            print(f"note: fast engine does not support this model ({why}); using HF generate")
        return HFEngine(model, tokenizer, batch_size)
    raise PosttrainError(f"unknown engine {name!r}; choose fast, hf or auto")
