"""What a user waits for, from process start: `posttrain eval` of SmolLM2-135M-Instruct on all 1319
GSM8K test problems (chat, 300 tokens, greedy), with the fast engine's compilation on and off, cold
(empty compile and bytecode caches) and warm (the caches an earlier process left), and HF generate
beside them; and GRPO runs of a config for a number of steps, cold and warm, with TRL's GRPOTrainer
on the same config where ``trl`` is installed.

    posttrain fetch smollm2-135m-instruct     # once
    python bench/e2e.py --data-dir ../shared/data/gsm8k --out bench/results/e2e_DEVICE_DATE.json
    python bench/e2e.py --cases none --grpo-config configs/grpo_smollm2.yaml --grpo-steps 20 [--grpo-cases ...]

Each case is a fresh `python -m posttrain ...` process, timed by the wall clock around it; the
evaluation's own generation time and tokens/s come from its summary.json, a GRPO run's steps from its
metrics.jsonl (process age at each step's end). Steady-state figures are the generation phase of a
warm run (eval) and the median step after the first (GRPO). "Cold" caches are posttrain's bytecode
cache (where the environment turned Python's off, see posttrain.startup) and TorchInductor's, both
empty; the operating system's file cache is whatever earlier processes left.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def fresh_home(work: Path, name: str) -> str:
    """A POSTTRAIN_HOME with no bytecode cache that still finds the fetched models."""
    from posttrain.engine.registry import models_home

    home = work / name
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "models").exists():
        (home / "models").symlink_to(models_home())
    return str(home)


def timed(name: str, cmd: list[str], env: dict | None = None) -> tuple[dict, bool, float]:
    """Run ``cmd`` as a fresh process from the repository root: (its row — case, wall clock around it,
    return code, stderr's tail on failure —, whether it succeeded, the unrounded wall clock)."""
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    row = {"case": name, "wall_s_from_process_start": round(wall, 1), "returncode": r.returncode}
    if r.returncode:
        row["stderr_tail"] = r.stderr[-1500:]
    return row, r.returncode == 0, wall


def posttrain(args: list[str], out: Path) -> list[str]:
    return [sys.executable, "-m", "posttrain", *args, "--output", str(out)]


def emit(row: dict) -> dict:
    print(json.dumps(row), flush=True)
    return row


def run_case(name: str, args: list[str], env: dict, out: Path) -> dict:
    row, ok, wall = timed(name, posttrain(args, out), {**env, "PYTHONPATH": str(ROOT / "src")})
    row["env"] = {k: v for k, v in env.items() if k.startswith(("POSTTRAIN", "TORCHINDUCTOR", "PYTHONDONT"))}
    if ok:
        s = json.loads((out / "summary.json").read_text())
        row.update(generation_s=round(s["seconds"], 1), tokens_per_s=round(s["tokens_per_s"], 1), accuracy=s["accuracy"],
                   strict_accuracy=s["strict_accuracy"], n=s["n"], engine=s["engine"],
                   start_overhead_s=round(wall - s["seconds"], 1),
                   first_token_s_from_process_start=s.get("first_token_s_from_process_start"),
                   phases_end_s_from_process_start=s.get("phases_end_s_from_process_start"),
                   done_s_from_process_start=s.get("done_s_from_process_start"))
    return emit(row)


def _steps(times: list[float]) -> dict:
    """First step's end from process start, and the median step after it."""
    gaps = [b - a for a, b in zip(times, times[1:])]
    return {"steps": len(times), "first_step_done_s_from_process_start": round(times[0], 1) if times else None,
            "median_step_s": round(statistics.median(gaps), 3) if gaps else None}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_grpo(name: str, args: list[str], env: dict, out: Path) -> dict:
    row, ok, _ = timed(name, posttrain(args, out), {**env, "PYTHONPATH": str(ROOT / "src")})
    if ok:
        steps = [s for s in _jsonl(out / "metrics.jsonl") if "time_s" in s]
        row.update(_steps([s["time_s"] for s in steps]), peak_gpu_mem_gib=max((s.get("gpu_mem_peak_gib") or 0) for s in steps),
                   completion_len_mean=round(statistics.mean(s["completion_len_mean"] for s in steps), 1))
    return emit(row)


def run_trl(args, out: Path) -> dict:
    cmd = [sys.executable, str(ROOT / "bench" / "trl_grpo.py"), "--config", args.grpo_config, "--data-dir", args.data_dir,
           "--max-steps", str(args.grpo_steps), "--no-save", "--out", str(out), *(["--model", args.grpo_model] if args.grpo_model else [])]
    row, ok, _ = timed("trl", cmd)
    if ok:
        summary = json.loads((out / "summary.json").read_text())
        row.update(_steps([s["time_s"] for s in _jsonl(out / "steps.jsonl")]), peak_gpu_mem_gib=summary.get("peak_gpu_mem_gib"),
                   trl=summary.get("trl_version"))
    return emit(row)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", default="../shared/data/gsm8k")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--out", default=f"bench/results/e2e_{datetime.date.today()}.json")
    ap.add_argument("--cases", default="nocompile_cold,nocompile_warm,nocompile_no_bytecode_cache,compile_cold,compile_warm,hf",
                    help="eval cases to run, comma-separated, or none")
    ap.add_argument("--grpo-config", help="also time `posttrain rl` on this config, cold then warm")
    ap.add_argument("--grpo-model", help="model for the GRPO runs (default: the config's)")
    ap.add_argument("--grpo-steps", type=int, default=20)
    ap.add_argument("--grpo-cases", default="grpo_cold,grpo_warm,trl",
                    help="posttrain's runs (grpo_cold, grpo_warm) and TRL's GRPOTrainer on the same config (trl: bench/trl_grpo.py)")
    args = ap.parse_args()
    base = ["eval", "--model", args.model, "--task", "gsm8k", "--data-dir", args.data_dir, "--prompt-style", "chat",
            "--max-new-tokens", "300", "--batch-size", "1319", "--show-samples", "0"]
    work = Path(tempfile.mkdtemp(prefix="posttrain-e2e-"))
    a = {"TORCHINDUCTOR_CACHE_DIR": str(work / "inductor_a"), "POSTTRAIN_HOME": fresh_home(work, "home_a")}
    b = {"TORCHINDUCTOR_CACHE_DIR": str(work / "inductor_b"), "POSTTRAIN_HOME": fresh_home(work, "home_b")}
    cases = {
        "nocompile_cold": (base, {"POSTTRAIN_COMPILE": "0", **a}),
        "nocompile_warm": (base, {"POSTTRAIN_COMPILE": "0", **a}),
        "nocompile_no_bytecode_cache": (base, {"POSTTRAIN_COMPILE": "0", **a, "POSTTRAIN_BYTECODE_CACHE": "0"}),
        "compile_cold": (base, {"POSTTRAIN_COMPILE": "1", **b}),
        "compile_warm": (base, {"POSTTRAIN_COMPILE": "1", **b}),
        "hf": (base + ["--engine", "hf", "--batch-size", "256"], a),
    }
    rows = [run_case(name, *cases[name], work / name) for name in args.cases.split(",") if name != "none"]
    grpo = []
    if args.grpo_config:
        rl = ["rl", "--config", args.grpo_config, "--data-dir", args.data_dir, "--max-steps", str(args.grpo_steps),
              "--report-to", "none", "--save-steps", "0", "--eval-steps", "0", *(["--model", args.grpo_model] if args.grpo_model else [])]
        g = {"TORCHINDUCTOR_CACHE_DIR": str(work / "inductor_g"), "POSTTRAIN_HOME": fresh_home(work, "home_g")}
        grpo = [run_trl(args, work / name) if name == "trl" else run_grpo(name, rl, g, work / name)
                for name in args.grpo_cases.split(",")]
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"date": str(datetime.date.today()), "device": device, "torch": torch.__version__,
                                          "model": args.model, "rows": rows, "grpo": grpo}, indent=2))


if __name__ == "__main__":
    main()
