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
