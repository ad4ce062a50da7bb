"""What a user waits for, from process start: `posttrain eval` of SmolLM2-135M-Instruct on all 1319
GSM8K test problems (chat, 300 tokens, greedy), with the fast engine's compilation on and off, cold
(empty compile caches) and warm (the caches an earlier process left), and HF generate beside them.

    posttrain fetch smollm2-135m-instruct     # once
    python bench/e2e.py --data-dir ../shared/data/gsm8k --out bench/results/e2e_DEVICE_DATE.json

Each case is a fresh `python -m posttrain eval` process, timed by the wall clock around it; the
evaluation's own generation time and tokens/s come from its summary.json. Steady-state figures are the
generation phase of a warm run; the bandwidth floor counts the bf16 weights read once per decode step.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_case(name: str, args: list[str], env: dict, out: Path) -> dict:
    cmd = [sys.executable, "-m", "posttrain", *args, "--output", str(out)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env, "PYTHONPATH": str(ROOT / "src")}, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    row = {"case": name, "wall_s_from_process_start": round(wall, 1), "returncode": r.returncode,
           "env": {k: v for k, v in env.items() if k.startswith(("POSTTRAIN", "TORCHINDUCTOR"))}}
    if r.returncode == 0:
        s = json.loads((out / "summary.json").read_text())
        row.update(generation_s=round(s["seconds"], 1), tokens_per_s=round(s["tokens_per_s"], 1), accuracy=s["accuracy"],
                   strict_accuracy=s["strict_accuracy"], n=s["n"], engine=s["engine"],
                   start_overhead_s=round(wall - s["seconds"], 1),
                   first_token_s_from_process_start=s.get("first_token_s_from_process_start"),
                   phases_end_s_from_process_start=s.get("phases_end_s_from_process_start"),
                   done_s_from_process_start=s.get("done_s_from_process_start"))
    else:
        row["stderr_tail"] = r.stderr[-1500:]
    print(json.dumps(row), flush=True)
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", default="../shared/data/gsm8k")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--out", default=f"bench/results/e2e_{datetime.date.today()}.json")
    ap.add_argument("--cases", default="nocompile_cold,compile_cold,compile_warm,nocompile_warm,hf")
    args = ap.parse_args()
    base = ["eval", "--model", args.model, "--task", "gsm8k", "--data-dir", args.data_dir, "--prompt-style", "chat",
            "--max-new-tokens", "300", "--batch-size", "1319", "--show-samples", "0"]
    work = Path(tempfile.mkdtemp(prefix="posttrain-e2e-"))
    caches = {"cold_a": work / "inductor_a", "cold_b": work / "inductor_b"}
    cases = {
        "nocompile_cold": (base, {"POSTTRAIN_COMPILE": "0", "TORCHINDUCTOR_CACHE_DIR": str(caches["cold_a"])}),
        "compile_cold": (base, {"POSTTRAIN_COMPILE": "1", "TORCHINDUCTOR_CACHE_DIR": str(caches["cold_b"])}),
        "compile_warm": (base, {"POSTTRAIN_COMPILE": "1", "TORCHINDUCTOR_CACHE_DIR": str(caches["cold_b"])}),
        "nocompile_warm": (base, {"POSTTRAIN_COMPILE": "0", "TORCHINDUCTOR_CACHE_DIR": str(caches["cold_a"])}),
        "hf": (base + ["--engine", "hf", "--batch-size", "256"], {}),
    }
    rows = [run_case(name, *cases[name], work / name) for name in args.cases.split(",")]
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"date": str(datetime.date.today()), "device": device, "torch": torch.__version__,
                                          "model": args.model, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
