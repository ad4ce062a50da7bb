"""The default pipeline as a user lives it: `posttrain pipeline` timed from process start, with each
stage's wall time and the steady state of its training loops beside it.

    python bench/pipeline_cpu.py --out bench/results/pipeline_cpu_DATE.json            # runs it (~11 min, 2 cores)
    python bench/pipeline_cpu.py --from-run runs/pipeline --wall-s 692 --out FILE      # a finished run

Steady state: the median SFT step (time, tokens/s) and the median RL step (rollout seconds at its
tokens/s, update seconds), over the steps without an evaluation; from each stage's metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def steady_state(run: Path) -> dict:
    rows = {s: [json.loads(line) for line in (run / s / "metrics.jsonl").read_text().splitlines()]
            for s in ("sft", "rl", "control") if (run / s / "metrics.jsonl").exists()}
    plain = {s: [r for r in rs if not any(k.startswith("eval_") for k in r)] for s, rs in rows.items()}
    out = {}
    for s in ("sft", "control"):
        if plain.get(s):
            out[s] = {"median_step_s": statistics.median(r["step_time_s"] for r in plain[s]),
                      "median_tokens_per_s": statistics.median(r["tokens_per_s"] for r in plain[s]), "steps": len(rows[s])}
    if plain.get("rl"):
        rl = plain["rl"]
        out["rl"] = {"median_rollout_tokens_per_s": statistics.median(r["rollout_tokens_per_s"] for r in rl),
                     "median_update_tokens_per_s": statistics.median(r["train_tokens_per_s"] for r in rl),
                     "median_completion_len": statistics.median(r["completion_len_mean"] for r in rl), "steps": len(rows["rl"]),
                     "median_step_wall_s": statistics.median(b["time"] - a["time"] for a, b in zip(rows["rl"], rows["rl"][1:]))}
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=f"bench/results/pipeline_cpu_{time.strftime('%Y-%m-%d')}.json")
    ap.add_argument("--from-run", help="a finished run folder to read instead of running the pipeline")
    ap.add_argument("--wall-s", type=float, help="with --from-run: its wall time from process start, as measured")
    args = ap.parse_args()
    if args.from_run:
        run, wall = Path(args.from_run), args.wall_s
    else:
        run = Path(tempfile.mkdtemp(prefix="posttrain-pipeline-")) / "run"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "posttrain", "pipeline", "--output", str(run)], cwd=ROOT, check=True)
        wall = time.perf_counter() - t0
    summary = json.loads((run / "summary.json").read_text())
    result = {"wall_s_from_process_start": wall, "stage_wall_s": summary["timings_s"],
              "stages": {s["name"]: {"accuracy": s["accuracy"], "strict_accuracy": s["strict_accuracy"], "n": s["n"]}
                         for s in summary["stages"]},
              "compute": summary["compute"], "steady_state": steady_state(run), "run": str(run)}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
