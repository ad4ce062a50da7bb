"""Where an RL step's time and GPU memory go: `posttrain rl` run in this process with its four steps
(sample, reward, reference log-probs, update) wrapped, each timed (synchronised) and its peak GPU
memory taken (the peak counter reset before each), plus what stays allocated between the steps and
the engine's own buffers (KV cache, graph pool). Issue 26 uses it on seed 003's 8B QLoRA config.

    python bench/rl_phases.py --json OUT.json -- --config configs/grpo_llama31_8b.yaml --model DIR \\
        --max-steps 4 --quantized-rollouts 4bit --output /tmp/rl

``--memory-cap-gib G`` caps this process's GPU memory at G GiB (``torch.cuda.set_per_process_memory_fraction``):
a card of that size emulated, where any allocation past it fails, and what ``quantized_rollouts=auto`` sees.
Everything after ``--`` is passed to ``posttrain rl`` unchanged. Writes one row per optimizer step:
each phase's seconds and peak GiB, the GiB allocated when the step began, the KV cache's GiB.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name  # noqa: E402

GIB = 2**30
PHASES = {"collect_rollouts": "sample", "score": "reward", "fill_logprobs": "ref_logprobs", "update": "update"}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", required=True)
    ap.add_argument("--memory-cap-gib", type=float, help="cap this process's GPU memory (a smaller card emulated)")
    ap.add_argument("rl_args", nargs=argparse.REMAINDER, help="-- then posttrain rl's arguments")
    args = ap.parse_args()
    rl_args = args.rl_args[1:] if args.rl_args[:1] == ["--"] else args.rl_args

    from posttrain.cli.main import main as posttrain_main
    from posttrain.engine import scheduler as sched
    from posttrain.trainers import rl

    cuda = torch.cuda.is_available()
    if args.memory_cap_gib and cuda:
        torch.cuda.set_per_process_memory_fraction(args.memory_cap_gib * GIB / torch.cuda.mem_get_info()[1])
    steps: list[dict] = []
    engines = []

    def wrap(name, label):
        inner = getattr(rl, name)

        def timed(*a, **kw):
            if label == "sample":  # a new step begins
                steps.append({})
            current = steps[-1]
            if label == "sample":
                current["allocated_at_start_gib"] = torch.cuda.memory_allocated() / GIB if cuda else None
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            out = inner(*a, **kw)
            if cuda:
                torch.cuda.synchronize()
                current[f"{label}_peak_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 2)
            current[f"{label}_s"] = round(time.perf_counter() - t, 3)
            if label == "sample" and engines and engines[-1].kv is not None:
                current["kv_cache_gib"] = round(sum(x.numel() * x.element_size() for x in engines[-1].kv.flat) / GIB, 2)
            return out

        setattr(rl, name, timed)

    for name, label in PHASES.items():
        wrap(name, label)
    init = sched.Scheduler.__init__

    def remember(self, *a, **kw):
        init(self, *a, **kw)
        engines.append(self)

    sched.Scheduler.__init__ = remember
    t0 = time.perf_counter()
    rc = posttrain_main(["rl", *rl_args])
    row = {"device": device_name(), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "rl_args": rl_args,
           "memory_cap_gib": args.memory_cap_gib, "quantized_path": getattr(engines[-1].decoder, "quantized_path", None) if engines else None,
           "returncode": rc, "wall_s": round(time.perf_counter() - t0, 1),
           "peak_gib": max((v for s in steps for k, v in s.items() if k.endswith("_peak_gib")), default=None), "steps": steps}
    Path(args.json).write_text(json.dumps(row, indent=1))
    print(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
