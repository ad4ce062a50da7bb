"""Roofline of the decode step, the prefill and the RL update: bytes moved and FLOPs per step, the floor
time they allow at the device's memory bandwidth and dense bf16 rate, the achieved time, and where it goes.

    python bench/roofline.py --json bench/results/roofline_h200_DATE.json            # all shapes x rows
    python bench/roofline.py --shapes qwen2.5-coder-0.5b --rows 256 --phases decode  # one case
    python bench/roofline.py --shapes qwen2.5-coder-0.5b --rows 1319 --phases prefill # 1319 prompts at once
    python bench/roofline.py --model /models/qwen2.5-coder-0.5b-instruct             # a real model folder
    python bench/roofline.py --tiny                                                  # CPU smoke run

Shapes are published configs with random bf16 weights (bench/common.py: SHAPES); ``--model`` adds real
model folders. Per shape:

* decode, at each row count: the fast engine (its public ``generate``) on random prompts of
  ``--prompt-len`` tokens (bench/rollout.py's GSM8K-like 160), EOS ignored so every row stays in flight
  for ``--new-tokens`` steps. One call warms up (Triton compiles, a CUDA graph per attended-length
  bucket), then ms per decode step = (wall of the call − wall of the same call cut to 1 token, its
  prefill) / (steps − 1). Where the time goes: two profiled calls on prompts whose context during the
  profiled steps averages the timed window's, ``--profile-steps``+1 tokens and 1 token; their
  difference, per step, is the decode steps' kernels without the prefill.
* prefill, at each row count: the engine's ``generate`` of one token for that many random prompts whose
  lengths are spread evenly over ``--prefill-lengths`` (default 105-270 tokens: the span of GSM8K's test
  problems as Qwen2.5's chat prompts; evenly spread they average 187.5 tokens, where GSM8K's average 143),
  after one warm-up call; the "step" is the whole call (the prefill in its chunks and the first token),
  timed three times, profiled once.
* update: the trainer's update path on a batch of its GRPO config's shape (configs/grpo_smollm2.yaml:
  64 completions, full fine-tuning; bench/grpo_1b_shape.yaml for the 1B shape: LoRA, KL to the
  adapter-less reference): ``load_policy``, ``build_optimizer``, then per step ``rl.fill_logprobs``,
  ``rl.update``, gradient clipping, ``optimizer.step``: one warm-up step, ``--update-steps`` timed, one
  profiled. Completions are all ``max_new_tokens`` long (random weights never stop): the upper bound of
  "<= 256 tokens".

Floors: bytes / bandwidth and FLOPs / dense bf16 rate, from ``PEAKS`` by device name (or --bandwidth,
--tflops); "% of floor" = max(the two floors) / achieved. Decode bytes = weights (every projection and
the lm_head once, the embedding rows looked up) + each row's KV cache at the mean context + the new
K/V + logits (written once, read once); FLOPs = 2 x projection parameters x rows + 4 x layers x heads x
head_dim x context x rows (q.k and p.v). Update FLOPs = forward (2 x parameters x tokens through the
layers, lm_head only at the scored positions) + backward (2x forward with full fine-tuning, 1x plus the
adapters' own with LoRA) + causal attention (forward 2 x layers x heads x head_dim x length^2 per
sequence, backward twice that) + the reference forward when beta > 0; bytes = the projection weights read
once per micro-batch by every forward and backward + gradients written and accumulated + gradient
clipping (3 passes) + AdamW (param, grad, two moments read; param, moments written). Activations are not
in the floor (a fused implementation keeps most on chip); the decode rows report an unfused estimate.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import platform
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import CATEGORIES, SHAPES, copy_bandwidth, device_name, device_time, kernel_category, save, shape_model, sync, timed  # noqa: E402
from posttrain.config import build_config, load_yaml  # noqa: E402
from posttrain.engine import SamplingParams, kernels  # noqa: E402
from posttrain.engine.base import Completion  # noqa: E402
from posttrain.engine.fast import FastEngine  # noqa: E402
from posttrain.engine.models import load_model  # noqa: E402
from posttrain.trainers import rl  # noqa: E402
from posttrain.trainers.run import make_accelerator  # noqa: E402
from posttrain.trainers.setup import build_optimizer, load_policy  # noqa: E402
from rollout import PROMPT, StubTokenizer, prompts  # noqa: E402

# Memory bandwidth (bytes/s) and dense bf16 tensor-core rate (FLOP/s) from the vendors' datasheets, by
# torch.cuda.get_device_name(); the first name contained in it wins (so "H200 NVL" before "H200").
PEAKS = (
    ("H200 NVL", 4.8e12, 835e12),
    ("H200", 4.8e12, 989e12),
    ("H100 NVL", 3.9e12, 835e12),
    ("H100 PCIe", 2.0e12, 756e12),
    ("H100", 3.35e12, 989e12),  # SXM: "NVIDIA H100 80GB HBM3"
    ("A100-SXM4-80GB", 2.039e12, 312e12),
    ("A100 80GB PCIe", 1.935e12, 312e12),
    ("A100", 1.555e12, 312e12),
)
DEFAULT_SHAPES = ("smollm2-135m", "qwen2.5-coder-0.5b", "llama32-1b")
UPDATE_CONFIGS = {"smollm2-135m": "configs/grpo_smollm2.yaml", "qwen2.5-coder-0.5b": "configs/grpo_smollm2.yaml",
                  "llama32-1b": "bench/grpo_1b_shape.yaml"}
REAL_MODEL_CONFIG = "configs/grpo_smollm2.yaml"  # --model folders: the config of the Qwen2.5-Coder GRPO run
# --tiny: a Llama of a few layers on the CPU, both update paths (full fine-tuning; LoRA with a KL term)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=512, tie_word_embeddings=True,
            bos_token_id=1, eos_token_id=2)
TINY_UPDATE = {"per_device_batch_size": 4, "gradient_accumulation_steps": 2, "num_generations": 4, "max_new_tokens": 8}
LABELS = {"attention": "attn", "projections": "proj", "elementwise": "elem", "sampling_bookkeeping": "samp/bk",
          "optimizer": "optim", "copies": "copies", "other": "other"}


START = time.perf_counter()


def say(msg: str) -> None:
    """Progress, to stderr (the table goes to stdout)."""
    print(f"[{time.perf_counter() - START:6.1f}s] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------- the model --
@dataclass
class Shape:
    """What the roofline needs of a model: dimensions and parameter counts (PEFT wrappers looked through)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    layer_params: int  # every parameter but the embedding, the lm_head and LoRA adapters: projections, biases, norms
    lora_params: int
    elt: int  # bytes per weight

    @classmethod
    def of(cls, model) -> Shape:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        cfg = base.config
        emb, head = base.get_input_embeddings().weight, base.get_output_embeddings().weight
        named = dict(base.named_parameters())  # a tied lm_head appears once
        lora = sum(p.numel() for n, p in named.items() if "lora_" in n)
        layer = sum(p.numel() for n, p in named.items() if "lora_" not in n and p is not emb and p is not head)
        return cls(cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
                   cfg.num_key_value_heads, getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
                   cfg.vocab_size, layer, lora, head.element_size())

    @property
    def matmul_params(self) -> int:
        """Parameters a token's forward multiplies by: the layers' and the lm_head's."""
        return self.layer_params + self.vocab * self.hidden

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.elt


# -------------------------------------------------------------------------------------- decode --
def decode_cost(s: Shape, rows: int, ctx: float) -> dict:
    """Bytes and FLOPs of one decode step of ``rows`` rows attending to ``ctx`` tokens on average."""
    kv = s.kv_bytes_per_token
    terms = {"weights": s.matmul_params * s.elt + rows * s.hidden * s.elt, "kv_read": rows * ctx * kv, "kv_write": rows * kv,
             "logits": 2 * rows * s.vocab * s.elt}
    # Not in the floor: each layer's intermediate results written once and read once, unfused.
    per_row_layer = (s.heads + 2 * s.kv_heads) * s.head_dim + s.heads * s.head_dim + 3 * s.intermediate + 4 * s.hidden
    flops = 2 * s.matmul_params * rows + 4 * s.layers * s.heads * s.head_dim * ctx * rows
    return {"bytes": sum(terms.values()), "bytes_terms": terms, "flops": flops,
            "activation_bytes_unfused": 2 * s.elt * per_row_layer * s.layers * rows}


def profiled(fn) -> dict:
    """``device_time`` of one call of ``fn``, CPU and (where present) CUDA activity recorded."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    sync()
    with profile(activities=acts) as prof:
        fn()
        sync()
    return device_time(prof)


def per_step(a: dict, b: dict, steps: int) -> dict:
    """(profile ``a`` − profile ``b``) / ``steps``: the steps ``a`` ran beyond ``b``."""
    return {"busy_ms": (a["busy_ms"] - b["busy_ms"]) / steps,
            "by_category_ms": {c: (a["by_category_ms"][c] - b["by_category_ms"][c]) / steps for c in CATEGORIES},
            "kernels": (a["kernels"] - b["kernels"]) / steps, "launches": (a["launches"] - b["launches"]) / steps,
            "other_top": a["other_top"], "top": top_kernels(a, b, steps)}


def top_kernels(a: dict, b: dict, steps: int, k: int = 30) -> list[dict]:
    """The ``k`` kernels (by name) that took the most time per step of the steps ``a`` ran beyond ``b``."""
    names = set(a.get("by_name_ms", {})) | set(b.get("by_name_ms", {}))
    per = {n: (a.get("by_name_ms", {}).get(n, 0.0) - b.get("by_name_ms", {}).get(n, 0.0)) / steps for n in names}
    return [{"name": n[:160], "category": kernel_category(n), "ms": round(ms, 5)}
            for n, ms in sorted(per.items(), key=lambda kv: -kv[1])[:k]]


def decode_case(model, s: Shape, rows: int, args) -> dict:
    n, p, k = args.new_tokens, args.prompt_len, min(args.profile_steps, args.new_tokens - 1)

    def params(m):
        return SamplingParams(max_new_tokens=m, temperature=args.temperature, top_p=args.top_p, ignore_eos=True, seed=0)

    engine = FastEngine(model, StubTokenizer(), batch_size=rows)
    ps = prompts(rows, length=p, vocab=s.vocab)
    _, warm = timed(engine.generate, ps, params(n))  # Triton compiles, one CUDA graph per attended-length bucket
    out, wall = timed(engine.generate, ps, params(n))
    _, prefill = timed(engine.generate, ps, params(1))
    tokens = sum(len(c.token_ids) for c in out)
    step_s = (wall - prefill) / (n - 1)
    ctx = p + n / 2  # decode step t (1 .. n-1) attends to p + t tokens
    # Profiled: k decode steps whose mean context is the timed window's (their prompt is longer by
    # what the window's first half adds); the same call cut to its prefill is subtracted.
    pp = prompts(rows, seed=1, length=max(1, round(ctx - (k + 1) / 2)), vocab=s.vocab)
    engine.generate(pp, params(k + 1))  # the prefill's new width warmed up: nothing compiles or captures under the profiler
    split = per_step(profiled(lambda: engine.generate(pp, params(k + 1))), profiled(lambda: engine.generate(pp, params(1))), k)
    return {"phase": "decode", "rows": rows, "prompt_len": p, "new_tokens": n, "mean_context": ctx,
            "rows_in_flight_mean": tokens / n, "warmup_s": warm, "generate_s": wall, "prefill_s": prefill,
            "tokens_per_s": tokens / wall, "generate_ms_per_step": 1e3 * wall / n, "decode_tokens_per_s": rows / step_s,
            "achieved_ms": 1e3 * step_s,
            "sampling": {"temperature": args.temperature, "top_p": args.top_p}, "profile_steps": k, "profile": split,
            **decode_cost(s, rows, ctx)}


# ------------------------------------------------------------------------------------- prefill --
def prefill_lengths(rows: int, lo: int, hi: int) -> list[int]:
    """``rows`` prompt lengths spread evenly over [lo, hi], in a shuffled order (a dataset's is not sorted)."""
    lengths = [lo + round(i * (hi - lo) / max(1, rows - 1)) for i in range(rows)]
    g = torch.Generator().manual_seed(0)
    return [lengths[i] for i in torch.randperm(rows, generator=g).tolist()]


def prefill_cost(s: Shape, lengths: list[int], chunks: int) -> dict:
    """FLOPs and bytes of prefilling prompts of ``lengths`` in ``chunks`` forwards: the real tokens only
    (padding is work the achieved time pays, not the floor), the lm_head at each prompt's last position."""
    tokens = sum(lengths)
    flops = 2 * s.layer_params * tokens + 2 * s.vocab * s.hidden * len(lengths) + 2 * s.layers * s.heads * s.head_dim * sum(n * n for n in lengths)
    terms = {"weights": chunks * s.matmul_params * s.elt + tokens * s.hidden * s.elt, "kv_write": tokens * s.kv_bytes_per_token,
             "logits": 4 * len(lengths) * s.vocab}
    return {"tokens": tokens, "chunks": chunks, "flops": flops, "bytes": sum(terms.values()), "bytes_terms": terms}


def prefill_case(model, s: Shape, rows: int, args) -> dict:
    from posttrain.utils import padded_chunks

    lengths = prefill_lengths(rows, *args.prefill_lengths)
    ps = [p[:n] for p, n in zip(prompts(rows, seed=5, length=max(lengths), vocab=s.vocab), lengths)]
    engine = FastEngine(model, StubTokenizer(), batch_size=rows)
    one = SamplingParams(max_new_tokens=1, temperature=args.temperature, top_p=args.top_p, ignore_eos=True, seed=0)
    engine.generate(ps, one)  # warm-up: the cache allocated, every chunk width's kernels chosen
    walls = [timed(engine.generate, ps, one)[1] for _ in range(3)]
    ordered = sorted(lengths)  # as the scheduler runs them: shortest first
    chunks = padded_chunks(ordered, engine.scheduler.prefill_tokens)
    padded = sum((b - a) * ordered[b - 1] for a, b in chunks)
    wall = sorted(walls)[1]
    return {"phase": "prefill", "rows": rows, "prompt_len": sum(lengths) / rows, "completion_len": 0,
            "length_range": list(args.prefill_lengths), "padded_tokens": padded, "walls_s": walls, "achieved_ms": 1e3 * wall,
            "tokens_per_s": sum(lengths) / wall, "profile": profiled(lambda: engine.generate(ps, one)),
            **prefill_cost(s, lengths, len(chunks))}


# -------------------------------------------------------------------------------------- update --
def config_file(path: str) -> Path:
    """An RL config: as given, or relative to the repository (the defaults are)."""
    return Path(path) if Path(path).is_file() else HERE.parent / path


def update_config(config_path: str, folder: str, tiny: bool) -> rl.RLConfig:
    values = {**load_yaml(config_file(config_path)), "model": folder, "report_to": ["none"], "save_steps": 0, "eval_steps": 0,
              **(TINY_UPDATE if tiny else {})}
    return build_config(rl.RLConfig, values, config_path)


def training_batch(cfg: rl.RLConfig, prompt_len: int, vocab: int, device) -> rl.Batch:
    """One optimizer step's completions as the trainer batches them (``rl.sequence_tensors``): every one
    ``max_new_tokens`` long."""
    rows = cfg.per_device_batch_size * cfg.gradient_accumulation_steps
    ps, cs = prompts(rows, seed=2, length=prompt_len, vocab=vocab), prompts(rows, seed=3, length=cfg.max_new_tokens, vocab=vocab)
    comps = [Completion(i // cfg.num_generations, c, "", "eos") for i, c in enumerate(cs)]
    m = rl.width_multiple(cfg)
    ids, attn, cmask = rl.sequence_tensors(ps, comps, 0, cfg.mask_truncated_completions, device, m)
    advantages = torch.randn(rows, generator=torch.Generator().manual_seed(4)).to(device)
    return rl.Batch(ids, attn, cmask, advantages, multiple_of=m)


def update_cost(s: Shape, cfg: rl.RLConfig, batch: rl.Batch, trainable_bytes: int) -> dict:
    """FLOPs and bytes of one update on ``batch`` (see the module docstring)."""
    mbs = batch.micro_batches(cfg.per_device_batch_size)
    tokens = sum(mb.input_ids.numel() for mb in mbs)  # through the layers, padding to each micro-batch's longest included
    scored = int(batch.completion_mask.sum())  # through the lm_head
    lengths = batch.attention_mask.sum(1).double()
    attn_fwd = 2 * s.layers * s.heads * s.head_dim * float((lengths ** 2).sum())
    fwd = 2 * s.layer_params * tokens + 2 * s.vocab * s.hidden * scored
    full = cfg.method == "full"
    extra_forwards = int(cfg.beta > 0) + int(cfg.num_iterations > 1)  # reference / rollout-time log-probs
    flops = (3 if full else 2) * fwd + 3 * attn_fwd + 6 * s.lora_params * tokens + extra_forwards * (fwd + attn_fwd)
    m = len(mbs)
    weight_bytes = s.matmul_params * s.elt
    terms = {"weights": (2 + extra_forwards) * m * weight_bytes, "grads": (2 * m - 1) * trainable_bytes,
             "grad_clip": 3 * trainable_bytes if cfg.max_grad_norm > 0 else 0, "optimizer": 7 * trainable_bytes}
    return {"tokens": tokens, "scored_tokens": scored, "micro_batches": m, "flops": flops, "bytes": sum(terms.values()),
            "bytes_terms": terms}


def update_case(folder: str, config_path: str, args) -> dict:
    cfg = update_config(config_path, folder, args.tiny)
    acc = make_accelerator(cfg.mixed_precision)
    model = load_policy(cfg, acc.device)
    optimizer = build_optimizer(model, cfg.learning_rate, cfg.weight_decay)
    model, optimizer = acc.prepare(model, optimizer)
    ref = None
    if cfg.beta > 0 and cfg.method == "full":  # the trainer's frozen reference (with LoRA: the adapter switched off)
        ref = load_model(folder, cfg.dtype, str(acc.device))
        ref.requires_grad_(False)
    policy = acc.unwrap_model(model)
    s = Shape.of(policy)
    batch = training_batch(cfg, args.prompt_len, s.vocab, acc.device)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    trainable_params, trainable_bytes = sum(p.numel() for p in trainable), sum(p.numel() * p.element_size() for p in trainable)

    def step() -> dict:
        """The loop's update after a rollout (rl.train): log-probs it needs, forward+backward, clip, AdamW."""
        batch.old_logp = batch.ref_logp = None
        _, fill = timed(rl.fill_logprobs, batch, model, ref, cfg, acc)
        (finite, _), fwd_bwd = timed(rl.update, model, batch, cfg, acc)
        if not finite:
            raise RuntimeError("the update's loss was not finite")

        def optimize():
            if cfg.max_grad_norm > 0:
                acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        _, opt = timed(optimize)
        return {"fill_logprobs_ms": 1e3 * fill, "forward_backward_ms": 1e3 * fwd_bwd, "optimizer_ms": 1e3 * opt}

    step()  # warm-up: kernels chosen and compiled, optimizer state allocated
    runs = [step() for _ in range(args.update_steps)]
    mean = {key: sum(r[key] for r in runs) / len(runs) for key in runs[0]}
    profile = profiled(step)
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    acc.free_memory()  # the accelerator's references to the model and optimizer (ours go with this frame)
    return {"phase": "update", "config": config_path, "method": cfg.method, "beta": cfg.beta,
            "rows": len(batch.input_ids), "prompt_len": args.prompt_len, "completion_len": cfg.max_new_tokens,
            "achieved_ms": sum(mean.values()), **mean, "steps_ms": [round(sum(r.values()), 3) for r in runs],
            "trainable_params": trainable_params, "peak_mem_gib": peak, "profile": profile, **update_cost(s, cfg, batch, trainable_bytes)}


# ------------------------------------------------------------------------------------- report --
def peaks(args) -> dict:
    name = device_name()
    bw, fl = next(((b, f) for key, b, f in PEAKS if key in name), (None, None))
    source = "table" if bw else "none"
    if args.bandwidth or args.tflops:
        source = "override" if bw is None else "table+override"
    bw = args.bandwidth * 1e12 if args.bandwidth else bw
    fl = args.tflops * 1e12 if args.tflops else fl
    # For context, not used in the floors: what a device-to-device copy reaches here.
    copy = copy_bandwidth(1.0, 10) if torch.cuda.is_available() else None
    return {"bandwidth_Bps": bw, "flops_per_s": fl, "source": source, "measured_copy_Bps": copy}


def add_floor(row: dict, pk: dict) -> dict:
    bw, fl = pk["bandwidth_Bps"], pk["flops_per_s"]
    row["floor_bandwidth_ms"] = 1e3 * row["bytes"] / bw if bw else None
    row["floor_flops_ms"] = 1e3 * row["flops"] / fl if fl else None
    floors = [f for f in (row["floor_bandwidth_ms"], row["floor_flops_ms"]) if f is not None]
    row["floor_ms"] = max(floors) if floors else None
    row["bound"] = None if len(floors) < 2 else ("memory" if row["floor_bandwidth_ms"] >= row["floor_flops_ms"] else "compute")
    row["pct_of_floor"] = 100 * row["floor_ms"] / row["achieved_ms"] if row["floor_ms"] else None
    prof = row["profile"]
    # Host time the device did not cover (launches, syncs, Python between kernels): the achieved
    # (unprofiled) step minus the device's busy time per step.
    row["host_gaps_ms"] = min(row["achieved_ms"], max(0.0, row["achieved_ms"] - prof["busy_ms"]))
    return row


def _ms(x) -> str:
    return "-" if x is None else (f"{x:.3f}" if x < 10 else f"{x:.1f}")


def _n(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def _rows(r) -> str:
    return str(r["rows"]) if r["phase"] == "decode" else f"{r['rows']}x{r['prompt_len'] + r['completion_len']:.0f}"


def print_table(result: dict) -> None:
    m, pk = result["meta"], result["peaks"]
    bw = f"{pk['bandwidth_Bps'] / 1e12:.2f} TB/s" if pk["bandwidth_Bps"] else "no bandwidth"
    fl = f"{pk['flops_per_s'] / 1e12:.4g} TFLOP/s" if pk["flops_per_s"] else "no FLOP rate"
    copy = f"; a copy here reaches {pk['measured_copy_Bps'] / 1e12:.2f} TB/s" if pk["measured_copy_Bps"] else ""
    print(f"\nroofline  {m['device']}  {bw}, {fl} dense bf16 ({pk['source']}{copy})  torch {m['torch']}  {m['date']}")
    print("ms per step; decode: rows x mean context, tok/s = rows / step, gen tok/s = the whole generate call (prefill included);"
          "\nprefill: prompts x mean length, the step = the whole call; update: completions x (prompt + completion);"
          " tok/s = tokens through the layers / step")
    head = (f"{'phase':7} {'shape':20} {'rows':>8} {'ctx':>5} {'GB/step':>8} {'GFLOP':>8} {'floorBW':>8} {'floorFL':>8} "
            f"{'achieved':>9} {'%floor':>7} {'bound':>7} {'tok/s':>9} {'gen tok/s':>9}")
    print(head)
    print("-" * len(head))
    for r in result["cases"]:
        decode = r["phase"] == "decode"
        ctx = f"{r['mean_context']:.0f}" if decode else "-"
        toks = r["decode_tokens_per_s"] if decode else r["tokens"] / r["achieved_ms"] * 1e3
        gen = _n(r["tokens_per_s"]) if decode else "-"
        pct = "-" if r["pct_of_floor"] is None else f"{r['pct_of_floor']:.3g}%"
        print(f"{r['phase']:7} {r['shape'][:20]:20} {_rows(r):>8} {ctx:>5} {r['bytes'] / 1e9:8.3f} {r['flops'] / 1e9:8.1f} "
              f"{_ms(r['floor_bandwidth_ms']):>8} {_ms(r['floor_flops_ms']):>8} {_ms(r['achieved_ms']):>9} {pct:>7} "
              f"{r['bound'] or '-':>7} {_n(toks):>9} {gen:>9}")
    print("\nwhere the time goes: % of the achieved step (ms in the JSON); gaps = achieved - device busy; kernels per step")
    head = f"{'phase':7} {'shape':20} {'rows':>8} " + " ".join(f"{LABELS[c]:>7}" for c in CATEGORIES) + f" {'gaps':>7} {'kernels':>8}"
    print(head)
    print("-" * len(head))
    for r in result["cases"]:
        by, a = r["profile"]["by_category_ms"], r["achieved_ms"]
        cells = " ".join(f"{100 * max(0.0, by[c]) / a:6.1f}%" for c in CATEGORIES)
        print(f"{r['phase']:7} {r['shape'][:20]:20} {_rows(r):>8} {cells} {100 * r['host_gaps_ms'] / a:6.1f}% {r['profile']['kernels']:8.0f}")


def meta(args) -> dict:
    try:
        describe = ["git", "describe", "--always", "--dirty", "--abbrev=40"]  # "-dirty": uncommitted changes ran
        commit = subprocess.run(describe, cwd=HERE, capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    import transformers

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"script": "bench/roofline.py", "command": shlex.join(["python", *sys.argv]), "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "device": device_name(), "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
            "triton": triton_version, "python": platform.python_version(), "git_commit": commit,
            "settings": {k: v for k, v in vars(args).items() if k != "json"}}


# --------------------------------------------------------------------------------------- main --
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", help=f"comma-separated, of {', '.join(sorted(SHAPES))} (default: {','.join(DEFAULT_SHAPES)}, "
                                     "or none when --model is given)")
    ap.add_argument("--model", action="append", default=[], help="a real model folder (repeatable), measured after the shapes")
    ap.add_argument("--rows", help="decode and prefill row counts, comma-separated (default 64,256,1319)")
    ap.add_argument("--phases", default="decode,update", help="comma-separated, of decode, prefill, update")
    ap.add_argument("--prefill-lengths", help="prefill prompt lengths MIN,MAX (default 105,270)")
    ap.add_argument("--new-tokens", type=int, help="decode steps per timed generate call (default 256)")
    ap.add_argument("--prompt-len", type=int, help=f"prompt tokens (default {PROMPT}, bench/rollout.py's GSM8K-like length)")
    ap.add_argument("--profile-steps", type=int, help="decode steps in the profiled window (default 16)")
    ap.add_argument("--temperature", type=float, default=0.7, help="decode sampling temperature (0: greedy, as the eval)")
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--update-steps", type=int, help="timed update steps after one warm-up (default 3)")
    ap.add_argument("--update-config", help="RL config for every update (default: per shape, UPDATE_CONFIGS)")
    ap.add_argument("--bandwidth", type=float, help="memory bandwidth in TB/s (overrides the device table)")
    ap.add_argument("--tflops", type=float, help="dense bf16 rate in TFLOP/s (overrides the device table)")
    ap.add_argument("--attn", help="decode-attention launch settings BLOCK_N,WARPS,STAGES for this run "
                    "(default: the engine's kernels.ATTN)")
    ap.add_argument("--json", help="where the raw JSON goes (default bench/results/roofline_DEVICE_DATE.json)")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: a tiny random Llama, a few steps, both update paths")
    args = ap.parse_args(argv)
    tiny = args.tiny
    args.rows = [int(x) for x in (args.rows or ("4,8" if tiny else "64,256,1319")).split(",")]
    args.new_tokens = args.new_tokens or (8 if tiny else 256)
    args.prompt_len = args.prompt_len or (12 if tiny else PROMPT)
    args.profile_steps = args.profile_steps or (4 if tiny else 16)
    args.update_steps = args.update_steps or (1 if tiny else 3)
    args.phases = args.phases.split(",")
    shapes = args.shapes.split(",") if args.shapes else ([] if args.model or tiny else list(DEFAULT_SHAPES))
    unknown = [s for s in shapes if s not in SHAPES]
    bad_phase = [p for p in args.phases if p not in ("decode", "prefill", "update")]
    try:
        lo, hi = (int(x) for x in (args.prefill_lengths or ("6,20" if tiny else "105,270")).split(","))
    except ValueError:
        ap.error(f"--prefill-lengths {args.prefill_lengths}: give MIN,MAX, two whole numbers")
    args.prefill_lengths = (lo, hi)
    if unknown or bad_phase or args.new_tokens < 2 or min(args.rows) < 1 or not 1 <= lo <= hi:
        ap.error(f"unknown shape(s) {unknown}" if unknown else f"unknown phase(s) {bad_phase}" if bad_phase
                 else "--new-tokens must be >= 2, --rows >= 1 and --prefill-lengths 1 <= MIN <= MAX")
    missing = [m for m in args.model if not (Path(m) / "config.json").is_file()]
    if missing:
        ap.error(f"--model {missing[0]}: no config.json there; give a model folder")
    if args.update_config and not config_file(args.update_config).is_file():
        ap.error(f"--update-config {args.update_config}: no such file")
    args.shapes = shapes
    if args.json is None:
        dev = device_name().replace("NVIDIA ", "").split()[0].lower() if torch.cuda.is_available() else "cpu"
        args.json = str(HERE / "results" / f"roofline_{'tiny_' if tiny else ''}{dev}_{datetime.date.today()}.json")
    return args


def cases(args) -> list[tuple[str, dict | None, str | None, list[str]]]:
    """(name, random-weight spec or None, real folder or None, update configs) per model measured."""
    out = [(name, SHAPES[name], None, [args.update_config or UPDATE_CONFIGS.get(name, REAL_MODEL_CONFIG)]) for name in args.shapes]
    out += [(Path(m).name, None, m, [args.update_config or REAL_MODEL_CONFIG]) for m in args.model]
    if args.tiny:
        out.insert(0, ("tiny-llama", TINY, None, [args.update_config] if args.update_config else sorted(set(UPDATE_CONFIGS.values()))))
    return out


def measure(name: str, spec: dict | None, folder: str | None, configs: list[str], args, record) -> None:
    """Every decode row count, every prefill row count, then every update config, of one model (random
    weights of ``spec``, or ``folder``)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = shape_model(spec, torch.bfloat16 if device == "cuda" else torch.float32, device) if spec else load_model(folder, "auto", device)
    s = Shape.of(model)
    say(f"{name}: {s.layer_params / 1e6:.1f}M layer + {s.vocab * s.hidden / 1e6:.1f}M lm_head parameters")
    for phase, case_fn in (("decode", decode_case), ("prefill", prefill_case)):
        if phase not in args.phases:
            continue
        for rows in args.rows:
            record(name, phase, rows, partial(case_fn, model, s, rows, args))
            gc.collect()  # the engine (its KV cache, graphs) goes
            if device == "cuda":
                torch.cuda.empty_cache()
    if "update" not in args.phases:
        return
    with tempfile.TemporaryDirectory(prefix="roofline_") as tmp:
        if folder is None:  # the trainer loads its policy from a folder: the random weights go to one
            folder = tmp
            model.save_pretrained(folder)
        del model
        gc.collect()
        for config in configs:
            if device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            record(name, "update", config, partial(update_case, folder, config, args))
            gc.collect()


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.attn:  # a bench-only override of the engine's defaults, recorded in the JSON's settings
        block_n, warps, stages = (int(v) for v in args.attn.split(","))
        kernels.ATTN.update(block_n=block_n, num_warps=warps, num_stages=stages)
    result = {"meta": meta(args), "peaks": peaks(args), "cases": [], "errors": []}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    todo = cases(args)
    say(f"{result['meta']['device']}: {len(todo)} model(s), rows {args.rows}, phases {args.phases} -> {args.json}")

    def record(shape: str, phase: str, case, measure_fn) -> None:
        """One case's row, or its error (reported; the other cases still run)."""
        try:
            row = add_floor({"shape": shape, **measure_fn()}, result["peaks"])
        except Exception as e:  # e.g. out of memory at 1319 rows: the rest is still worth the GPU time
            traceback.print_exc()
            result["errors"].append({"shape": shape, "phase": phase, "case": case, "error": f"{type(e).__name__}: {str(e)[:300]}"})
            say(f"  {phase} {shape} {case}: FAILED {result['errors'][-1]['error']}")
            return
        finally:
            save(args.json, result)  # what is measured so far survives a run cut short
        result["cases"].append(row)
        save(args.json, result)
        pct = row["pct_of_floor"]
        say(f"  {phase} {shape} {_rows(row)}: {row['achieved_ms']:.3f} ms/step"
            + (f", {pct:.3g}% of the {row['bound']} floor ({row['floor_ms']:.3f} ms)" if pct else ""))

    for case in todo:
        measure(*case, args, record)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print_table(result)
    for e in result["errors"]:
        print(f"FAILED {e['phase']} {e['shape']} {e['case']}: {e['error']}")
    say(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    sys.exit(1 if main()["errors"] else 0)
