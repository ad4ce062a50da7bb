"""Where does an RL step spend its time? Runs `posttrain rl` on a config for a few steps with each of
the loop's steps timed (the device synchronised around each), then profiles one whole step with the
PyTorch profiler: GPU time by kernel, kernel launches, and CPU time not covered by the GPU.

    python bench/profile_rl.py --config bench/grpo_1b_shape.yaml --model DIR --data-dir DIR --steps 6 \
        --out bench/results/profile_rl_DEVICE_DATE.json

Rows: per step, seconds in sample / reward / batch / fill_logprobs / update / optimizer and the rest.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_time, sync, timed  # noqa: E402
from posttrain.config import build_config, load_yaml  # noqa: E402
from posttrain.trainers import rl, run  # noqa: E402
from posttrain.utils import process_age_s  # noqa: E402

PARTS = ("collect_rollouts", "score", "training_batch", "fill_logprobs", "update")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--profile-step", type=int, default=4, help="the step the PyTorch profiler records (0: none)")
    ap.add_argument("--part", choices=PARTS, help="profile only this part of the profiled step (default: the whole step)")
    ap.add_argument("--compile-layers", action="store_true", help="train with the trainer's compile_layers option")
    ap.add_argument("--set", nargs="*", default=[], help="extra config options KEY=VALUE (YAML values)")
    ap.add_argument("--out", default=f"bench/results/profile_rl_{datetime.date.today()}.json")
    args = ap.parse_args()

    import yaml

    overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    if args.compile_layers:
        overrides["compile_layers"] = True
    values = {**load_yaml(args.config), "model": args.model, "data_dir": args.data_dir, "max_steps": args.steps,
              "output": f"/tmp/profile_rl_{time.time_ns()}", "report_to": ["none"], "save_steps": 0, **overrides}
    cfg = build_config(rl.RLConfig, values, args.config)
    step_parts: list[dict] = []
    current: dict = defaultdict(float)
    steps_done = {"n": 0}
    for name in PARTS:  # the loop calls these by their module-level names
        fn = getattr(rl, name)

        def timed_part(*a, _fn=fn, _name=name, **k):
            profiled = prof is not None and args.part == _name and steps_done["n"] == args.profile_step - 1
            if profiled:
                prof.start()
            out, seconds = timed(_fn, *a, **k)
            if profiled:
                sync()
                prof.stop()
            current[_name] += seconds
            return out

        setattr(rl, name, timed_part)

    prof = None
    if args.profile_step and torch.cuda.is_available():
        from torch.profiler import ProfilerActivity, profile, schedule

        if args.part:  # started and stopped around that part's call in the profiled step
            prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
        else:
            prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                           schedule=schedule(wait=args.profile_step - 1, warmup=0, active=1, repeat=1))
            prof.start()
    end_step = run.TrainingRun.end_step
    last = {"t": None}

    def timed_end(self, metrics, postfix=None):
        sync()
        now = time.perf_counter()
        row = {k: round(v, 4) for k, v in current.items()}
        row["step"] = self.step
        row["step_s"] = round(now - last["t"], 4) if last["t"] is not None else None
        row["time_s_from_process_start"] = round(process_age_s() or 0.0, 2)
        row["completion_len_mean"] = round(metrics["completion_len_mean"], 1)
        if row["step_s"] is not None:
            row["other_s"] = round(row["step_s"] - sum(current.values()), 4)
        step_parts.append(row)
        print(json.dumps(row), flush=True)
        current.clear()
        last["t"] = now
        end_step(self, metrics, postfix)
        steps_done["n"] += 1
        if prof is not None and not args.part:
            prof.step()

    run.TrainingRun.end_step = timed_end
    rl.train(cfg)
    result = {"date": str(datetime.date.today()), "torch": torch.__version__, "config": args.config, "overrides": overrides,
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "steps": step_parts}
    if prof is not None:
        if not args.part:
            prof.stop()
        events = prof.key_averages()
        # The step's own annotation (ProfilerStep#N) is a CUDA-side event spanning the whole step: not a kernel.
        kernels = [e for e in events if e.device_type.name == "CUDA" and not e.key.startswith("ProfilerStep")]
        result["profiled_step"], result["profiled_part"] = args.profile_step, args.part or "whole step"
        result["device_time"] = device_time(prof)  # kernel time by category, busy time, launches (bench/common.py)
        result["cuda_kernels_launched"] = sum(e.count for e in kernels)
        result["cuda_time_s"] = round(sum(e.self_device_time_total for e in kernels) / 1e6, 4)
        result["top_kernels"] = [{"name": e.key[:120], "count": e.count, "ms": round(e.self_device_time_total / 1e3, 2)}
                                 for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:25]]
        cpu = sorted((e for e in events if e.device_type.name == "CPU"), key=lambda e: -e.cpu_time_total)[:40]
        result["top_cpu_ops"] = [{"name": e.key[:120], "count": e.count, "cpu_ms": round(e.cpu_time_total / 1e3, 2),
                                  "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 2)} for e in cpu]
        print(events.table(sort_by="self_device_time_total", row_limit=30), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
