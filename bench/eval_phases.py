"""Where a whole `posttrain eval` goes, from process start: each start-up phase, the first token, the
generation phase, and inside it the prefill, the CUDA-graph captures and the decode steps.

    python bench/eval_phases.py --model DIR --data-dir DIR --json OUT [--code SRC ...]

For each source tree given with ``--code`` (default: this checkout's ``src``; e.g. an older commit's
``git archive`` beside it, to compare), two fresh ``python -m posttrain eval`` processes — the first
with an empty Triton cache (a fresh machine's), the second with the cache the first left — then one
in-process run that evaluates twice on one engine: the first pays the captures and the second
replays the graphs, so the difference is what captures and first calls cost. The command is the
issue's: all 1319 GSM8K test problems, chat prompt, greedy, <= 400 new tokens, one batch of 1319.
Greedy outputs of every run are compared with the first tree's first run (agreement: the share of
problems whose generation is the same text, and the first differing problem).
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from launch import code_env, eval_command  # noqa: E402

INPROC = r'''
import json, sys, time
t0 = time.perf_counter()
import torch
from posttrain.engine import load_model, load_tokenizer, make_engine
from posttrain.evaluation import evaluate
from posttrain.engine.base import SamplingParams
from posttrain.tasks import make_task
model_dir, data_dir, limit, new, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
task = make_task("gsm8k", prompt_style="chat", fewshot=0, data_dir=data_dir)
examples = task.examples("test", limit or None)
tok = load_tokenizer(model_dir)
model = load_model(model_dir, "auto", "auto")
engine = make_engine("fast", model, tok, batch)
sch = engine.scheduler
timings = {"prefill_s": 0.0, "prefills": 0}
prefill = sch.prefill
sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
def timed_prefill(*a, **k):
    sync(); t = time.perf_counter()
    out = prefill(*a, **k)
    sync(); timings["prefill_s"] += time.perf_counter() - t; timings["prefills"] += 1
    return out
sch.prefill = timed_prefill
params = SamplingParams(new, 0.0, 1.0, 1, list(task.stop_strings), 0)
runs = []
for i in range(2):
    timings.update(prefill_s=0.0, prefills=0)
    c0, s0 = getattr(sch, "captures", None), getattr(sch, "capture_s", None)
    g0 = len(sch._graphs)
    r = evaluate(task, examples, engine, tok, params, progress=False)
    runs.append({"seconds": r.summary["seconds"], "tokens_per_s": r.summary["tokens_per_s"], "accuracy": r.summary["accuracy"],
                 "generated_tokens": r.summary["generated_tokens"], "graphs_held": len(sch._graphs), "graphs_new": len(sch._graphs) - g0,
                 "captures": None if c0 is None else sch.captures - c0, "capture_s": None if s0 is None else sch.capture_s - s0, **timings})
print("INPROC " + json.dumps(runs))
'''


def cli_eval(code: Path, model: str, data_dir: str, out: Path, triton_cache: Path, limit: int, new: int, batch: int) -> dict:
    env = code_env(code, triton_cache)
    cmd = eval_command(model, data_dir, out, new, batch, limit)
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        return {"wall_s": wall, "rc": r.returncode, "stderr": r.stderr[-2000:]}
    s = json.loads((out / "summary.json").read_text())
    gens = [json.loads(line)["generation"] for line in open(out / "records.jsonl")]
    return {"wall_s": wall, "rc": 0, "first_token_s": s.get("first_token_s_from_process_start"),
            "phases_end_s": s.get("phases_end_s_from_process_start"), "done_s": s.get("done_s_from_process_start"),
            "generation_s": s["seconds"], "tokens_per_s": s["tokens_per_s"], "generated_tokens": s["generated_tokens"],
            "accuracy": s["accuracy"], "strict_accuracy": s["strict_accuracy"], "truncation_rate": s["truncation_rate"],
            "_generations": gens}


def agreement(a: list[str], b: list[str]) -> dict:
    same = [x == y for x, y in zip(a, b)]
    return {"same_share": sum(same) / max(1, len(same)), "first_diff": next((i for i, s in enumerate(same) if not s), None)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--code", action="append", help="a source tree to run (repeatable; default this checkout's src)")
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=1319)
    ap.add_argument("--no-inproc", action="store_true")
    ap.add_argument("--json", default=f"bench/results/eval_phases_{datetime.date.today()}.json")
    args = ap.parse_args()
    import torch

    codes = [Path(c).resolve() for c in (args.code or [ROOT / "src"])]
    work = Path(tempfile.mkdtemp(prefix="eval_phases_"))
    meta = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "date": str(datetime.date.today()),
            "torch": torch.__version__, "model": args.model, "limit": args.limit, "max_new_tokens": args.max_new_tokens,
            "batch_size": args.batch_size}
    rows, reference = [], None
    for ci, code in enumerate(codes):
        cache = work / f"triton{ci}"
        for run in ("fresh_triton_cache", "warm_triton_cache"):
            row = {"code": str(code), "run": run, **cli_eval(code, args.model, args.data_dir, work / f"out{ci}_{run}", cache,
                                                             args.limit, args.max_new_tokens, args.batch_size)}
            gens = row.pop("_generations", None)
            if gens is not None:
                reference = reference or gens
                row["agreement_with_first"] = agreement(reference, gens)
            rows.append(row)
            print(json.dumps(row), flush=True)
        if not args.no_inproc:
            r = subprocess.run([sys.executable, "-c", INPROC, args.model, args.data_dir, str(args.limit), str(args.max_new_tokens),
                                str(args.batch_size)], cwd=ROOT, env=code_env(code, cache), capture_output=True, text=True)
            line = next((x for x in r.stdout.splitlines() if x.startswith("INPROC ")), None)
            row = {"code": str(code), "run": "in_process_twice", "rc": r.returncode,
                   **({"evaluations": json.loads(line[7:])} if line else {"stderr": r.stderr[-2000:]})}
            rows.append(row)
            print(json.dumps(row), flush=True)
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
