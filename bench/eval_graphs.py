"""The CUDA graphs a GSM8K evaluation captures: for each, its rows, the host time the capture took
(ms) and the decode step of the wave it was captured at; then the same evaluation again on the same
engine with its graphs dropped (every kernel loaded and, where the driver allows, no warm-up: a
capture is then the step's launches recorded).

    python bench/eval_graphs.py --model DIR --data-dir DIR [--label NAME]

All 1319 GSM8K test problems, chat prompts, greedy, <= 400 new tokens, one batch (as bench/eval_phases.py).
Prints one line per evaluation: ``GRAPHS label seconds [(rows, capture ms, step), ...]``.
"""

from __future__ import annotations

import argparse
import time

from posttrain.engine import load_model, load_tokenizer, make_engine
from posttrain.engine.base import SamplingParams
from posttrain.evaluation import evaluate
from posttrain.tasks import make_task


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--label", default="")
    args = ap.parse_args()
    task = make_task("gsm8k", prompt_style="chat", fewshot=0, data_dir=args.data_dir)
    examples = task.examples("test", None)
    tok = load_tokenizer(args.model)
    engine = make_engine("fast", load_model(args.model, "auto", "auto"), tok, len(examples))
    sch = engine.scheduler
    captures, steps = [], [0]
    capture, step = sch._capture, sch.step

    def counted_step(*a):
        steps[0] += 1
        return step(*a)

    def timed_capture(spec, n):
        t = time.perf_counter()
        graph = capture(spec, n)
        captures.append((n, round(1e3 * (time.perf_counter() - t), 1), steps[0]))
        return graph

    sch.step, sch._capture = counted_step, timed_capture
    params = SamplingParams(400, 0.0, 1.0, 1, list(task.stop_strings), 0)
    for label in (args.label, f"again {args.label}"):
        captures.clear()
        steps[0] = 0
        sch.drop_graphs()
        r = evaluate(task, examples, engine, tok, params, progress=False)
        print("GRAPHS", label, r.summary["seconds"], captures, flush=True)


if __name__ == "__main__":
    main()
