"""Shared helpers for the benchmarks: the Llama-3.2-1B shape with random weights, bandwidth, timing."""

from __future__ import annotations

import json
import time

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
SHAPES = {"llama32-1b": LLAMA32_1B, "llama31-8b": LLAMA31_8B}


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
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**SHAPES[name])
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # initialise in bf16: an 8B model never exists in fp32
    try:
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    model.save_pretrained(out)
    stand_in_tokenizer(texts, cfg.vocab_size).save_pretrained(out)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def llama32_1b(dtype=torch.bfloat16, device="cuda", seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**LLAMA32_1B)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    model.eval()
    return model


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
