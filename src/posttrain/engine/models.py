"""Loading causal LMs and tokenizers from the hub or local folders, with one-line errors."""

from __future__ import annotations

import contextlib
import os
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError

from posttrain.errors import PosttrainError

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}


def resolve_device(device: str | None = "auto") -> torch.device:
    """``auto`` picks this process's CUDA device when present (LOCAL_RANK-aware), else CPU."""
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise PosttrainError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise PosttrainError(f"--device {device}: no CUDA GPU is usable here (or PyTorch was built without CUDA); "
                                 "use --device cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise PosttrainError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps":
        if not (torch.backends.mps.is_available()):
            raise PosttrainError(f"--device {device}: Apple's MPS is not usable here (it needs a Mac with Apple silicon and a "
                                 "PyTorch built with MPS); use --device cpu or auto")
    elif dev.type == "xpu":
        if not (hasattr(torch, "xpu") and torch.xpu.is_available()):
            raise PosttrainError(f"--device {device}: no Intel XPU is usable here (or PyTorch was built without XPU); "
                                 "use --device cpu or auto")
    elif dev.type != "cpu":
        raise PosttrainError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")
    return dev


def sdpa_backends():
    """Context for PyTorch's scaled-dot-product attention over batches whose lengths change from call
    to call (prefills, RL micro-batches): flash, memory-efficient or math kernels, not cuDNN's. On an
    H100 PyTorch picks cuDNN's, which spent 1.8 ms of host time in each forward call and as much in
    each backward: half a second of a SmolLM2 GRPO step, with the GPU waiting (bench/profile_rl.py)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on GPUs that support it, else fp32 (CPU bf16 matmuls are slow and inexact)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in DTYPES:
        raise PosttrainError(f"unknown dtype {dtype!r}; use auto, bf16, fp16 or fp32")
    return DTYPES[dtype]


def _first_line(e: Exception) -> str:
    """``Type: the first line of the message``, short, for a one-line error."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {' '.join(lines[:2])[:200]}" if lines else type(e).__name__


def _not_found(name: str, e: Exception) -> PosttrainError:
    hint = "pass a local folder that holds config.json and weights (e.g. --model models/nano-gsm)"
    if Path(name).exists():
        return PosttrainError(f"could not load model from {name}: {str(e).splitlines()[0][:200]}")
    return PosttrainError(
        f"model {name!r} is not a local folder and could not be fetched from the hub "
        f"(offline, a typo, or a gated repo without HF_TOKEN); {hint}"
    )


def _prequantized(path: str) -> bool:
    """A local model folder saved already quantized (its config names a quantization method)."""
    import json

    cfg = Path(path) / "config.json"
    try:
        return cfg.is_file() and "quantization_config" in json.loads(cfg.read_text())
    except (ValueError, UnicodeDecodeError):
        return False


def load_tokenizer(name: str, trust_remote_code: bool = False, padding_side: str = "left"):
    """Tokenizer with a pad token (falls back to EOS, as the seeds do) and the given padding side."""
    from transformers import AutoTokenizer

    from posttrain.engine.registry import resolve_model

    src = resolve_model(name)
    try:
        tok = AutoTokenizer.from_pretrained(src.path, gguf_file=src.gguf_file, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise _not_found(name, e) from None
    except (UnicodeDecodeError, KeyError, RuntimeError, EOFError) as e:
        raise PosttrainError(f"could not read the tokenizer of {name}: {type(e).__name__}; the files are damaged") from None
    except Exception as e:  # a config or tokenizer file transformers cannot make sense of (wrong types, wrong values)
        raise PosttrainError(f"could not load the tokenizer of {name}: {_first_line(e)}; its config.json or tokenizer files "
                             "are damaged or not ones transformers reads") from None
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise PosttrainError(f"tokenizer of {name!r} has neither a pad nor an EOS token")
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return tok


@contextlib.contextmanager
def _without_load_report():
    """transformers warns in many lines (a table of keys) when weights are missing, unused or oddly
    tied; ``check_loaded`` says what matters in one line instead."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity(max(level, logging.ERROR))
    try:
        yield
    finally:
        logging.set_verbosity(level)


def check_loaded(model, info: dict, name: str) -> None:
    """Refuse weights that match none of the model's tensors (it would run randomly initialised);
    name, in one line, the tensors that start random when only some are missing."""
    missing = sorted(info.get("missing_keys") or [])
    if not missing:
        return
    expected = list(model.state_dict())
    if len(missing) >= len(expected):
        unused = sorted(info.get("unexpected_keys") or [])
        seen = f" (they hold e.g. {unused[0]!r}, the model expects e.g. {missing[0]!r})" if unused else ""
        raise PosttrainError(f"the weights of {name} match none of the model's tensors{seen}: they belong to another "
                             "architecture or were saved under other names; check the model folder")
    print(f"warning: {len(missing)} of the {len(expected)} tensors of {name} are not in its weights and start random "
          f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")


def load_model(name: str, dtype: str | torch.dtype | None = "auto", device: str | None = "auto",
               trust_remote_code: bool = False, quantization_config=None, attn_implementation: str | None = "sdpa"):
    """Any HF causal LM by hub id, local folder, posttrain model name or GGUF file (see
    ``registry.resolve_model``), on ``device`` in ``dtype``, in eval mode.

    The hub token comes from HF_TOKEN or the usual ``hf auth login`` cache through huggingface_hub;
    posttrain never reads, prints or stores it.
    """
    from transformers import AutoModelForCausalLM

    from posttrain.engine.registry import resolve_model

    src = resolve_model(name)
    dev = resolve_device(device)
    kwargs = dict(dtype=resolve_dtype(dtype, dev), trust_remote_code=trust_remote_code)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    if src.gguf_file:
        kwargs["gguf_file"] = src.gguf_file
    # Quantizing now, or saved quantized (e.g. posttrain merge --quantize-4bit): bitsandbytes places it at load time.
    placed_at_load = quantization_config is not None or _prequantized(src.path)
    if placed_at_load:
        kwargs["device_map"] = {"": dev.index or 0} if dev.type == "cuda" else None
    try:
        with _without_load_report():
            model, info = AutoModelForCausalLM.from_pretrained(src.path, output_loading_info=True, **kwargs)
    except (OSError, ValueError) as e:
        raise _not_found(name, e) from None
    except (SafetensorError, RuntimeError, EOFError, KeyError, pickle.UnpicklingError) as e:  # damaged weight files
        why = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
        if "ignore_mismatched_sizes" in why:
            why = "tensor shapes differ from the model's config.json"
        raise PosttrainError(f"could not read the weights of {name}: {type(e).__name__}: {why}; "
                             "the files are damaged or incomplete: copy or fetch the model again") from None
    except Exception as e:  # a config.json transformers cannot make sense of (wrong types, wrong values)
        raise PosttrainError(f"could not read the model files of {name}: {_first_line(e)}; check its config.json, or copy "
                             "or fetch the model again") from None
    check_loaded(model, info, name)
    if not placed_at_load:
        model.to(dev)
    model.eval()
    return model
