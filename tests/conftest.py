"""Shared fixtures: a tiny tokenizer and tiny random Llama built here (no downloads), real GSM8K data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
GSM8K_DIR = (ROOT.parent / "shared" / "data" / "gsm8k").resolve()

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)


def _corpus(n=400):
    from posttrain.tasks import make_task

    t = make_task("gsm_symbolic", train_size=n, test_size=50)
    return [e.question + "\n" + e.response for e in t.examples("train")]


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from posttrain.tokenization import train_bpe_tokenizer

    return train_bpe_tokenizer(_corpus(), vocab_size=384)


def make_tiny_model(vocab_size: int, seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
               bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True,
               initializer_range=0.3)  # large init: varied (not constant) greedy outputs
    cfg.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    model.eval()
    return model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A saved tiny model + tokenizer folder, loadable by path (for CLI tests)."""
    d = tmp_path_factory.mktemp("tiny-llama")
    model = make_tiny_model(len(tiny_tokenizer))
    model.generation_config.eos_token_id = tiny_tokenizer.eos_token_id
    model.generation_config.pad_token_id = tiny_tokenizer.pad_token_id
    model.save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


@pytest.fixture()
def tiny_model(tiny_tokenizer):
    return make_tiny_model(len(tiny_tokenizer))


def run_cli(*args, cwd=None, timeout=600):
    """Run ``python -m posttrain.cli.main ARGS`` in a subprocess; returns CompletedProcess."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "posttrain", *map(str, args)], cwd=cwd or ROOT,
                          capture_output=True, text=True, timeout=timeout, env=env)


def random_rl_batch(vocab, n=16, width=12, seed=0):
    """An RL training batch of ``n`` completions of different lengths after 4-token prompts, with
    random advantages and reference log-probs (deterministic by ``seed``)."""
    from posttrain.trainers.rl import Batch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, width), generator=g)
    lengths = torch.randint(6, width + 1, (n,), generator=g)
    attn = (torch.arange(width)[None] < lengths[:, None]).long()
    cmask = torch.zeros(n, width - 1)
    for i, n_tok in enumerate(lengths.tolist()):
        cmask[i, 3:n_tok - 1] = 1.0
    adv = torch.randn(n, generator=g)
    return Batch(ids, attn, cmask, adv, ref_logp=torch.randn(n, width - 1, generator=g) * 0.1 - 3.0)


def run_torchrun(nproc: int, *args, timeout=600):
    """``torchrun --standalone --nproc_per_node N ARGS`` (gloo on CPU), as ``accelerate launch`` starts ranks."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
