"""Which engine `--engine auto` should pick on a CPU: HF `generate` vs posttrain's fast engine, same
prompts, greedy, for the nano model and SmolLM2-135M-Instruct (`posttrain fetch smollm2-135m-instruct`).

    python bench/cpu_engines.py [--out bench/results/cpu_engines_DATE.json]

Each engine runs the batch once to warm up, then the two engines alternate for ``--reps`` runs each
(so a busy moment of a shared machine hits both); the median is the figure. Greedy tokens must agree.
"""

import argparse
import datetime
import json
import platform
import statistics
import time

import torch

from posttrain.engine import SamplingParams, load_model, load_tokenizer
from posttrain.engine.fast import FastEngine
from posttrain.engine.hf import HFEngine
from posttrain.tasks import make_task

CASES = [  # model, task, prompt style, problems (= batch), new tokens
    ("nano-gsm", "gsm_symbolic", "plain", 64, 160),
    ("smollm2-135m-instruct", "gsm8k", "chat", 16, 64),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=f"bench/results/cpu_engines_{datetime.date.today()}.json")
    ap.add_argument("--data-dir", default="../shared/data/gsm8k")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    rows = []
    for name, task_name, style, n, new in CASES:
        model, tok = load_model(name, "auto", "cpu"), load_tokenizer(name)
        task = make_task(task_name, prompt_style=style, data_dir=args.data_dir)
        prompts = [task.encode_prompt(e, tok) for e in task.examples("test")[:n]]
        params = SamplingParams(max_new_tokens=new, stop=task.stop_strings)
        row, outs = {"model": name, "problems": n, "max_new_tokens": new, "threads": torch.get_num_threads()}, {}
        engines = {"hf": HFEngine(model, tok, n), "fast": FastEngine(model, tok, n)}
        times = {label: [] for label in engines}
        for rep in range(args.reps + 1):
            for label, engine in engines.items():
                t = time.perf_counter()
                out = engine.generate(prompts, params)
                dt = time.perf_counter() - t
                if rep == 0:
                    row[f"{label}_first_call_s"] = round(dt, 2)
                else:
                    times[label].append(dt)
                outs[label] = [c.token_ids for c in out]
        tokens = sum(len(c) for c in outs["hf"])
        for label, ts in times.items():
            row[f"{label}_runs_s"] = [round(t, 2) for t in ts]
            row[f"{label}_median_tokens_per_s"] = round(tokens / statistics.median(ts), 1)
        row["greedy_identical"] = outs["hf"] == outs["fast"]
        row["fast_over_hf"] = round(statistics.median(times["hf"]) / statistics.median(times["fast"]), 3)
        print(json.dumps(row), flush=True)
        rows.append(row)
    result = {"date": str(datetime.date.today()), "machine": f"{platform.processor() or platform.machine()}, "
              f"{torch.get_num_threads()} threads", "torch": torch.__version__, "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
