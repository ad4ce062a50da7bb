"""What an evaluation's first call spends that its second does not: the host's time, function by function.

    python bench/first_call.py --model DIR --data-dir DIR [--max-new-tokens 1] [--out OUT.txt]

Loads the model and the fast engine as ``posttrain eval`` does (Triton's once-a-process work started in the
background, as there, and waited for), then evaluates all 1319 GSM8K test problems (chat prompts, greedy)
twice on the one engine under cProfile, and prints each call's wall time and its functions by own time and
by cumulative time. With ``--max-new-tokens 1`` a call is the rendering, tokenising and prefill of every
prompt and its first token: the first call's extra time is first-call work (kernel loads, library set-up,
launchers built, imports), which the second call does not repeat.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time

import torch


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--max-new-tokens", type=int, default=1)
    ap.add_argument("--top", type=int, default=28, help="functions listed per ordering")
    ap.add_argument("--out", help="also write the report here")
    args = ap.parse_args()

    from posttrain.engine import kernels, load_model, load_tokenizer, make_engine
    from posttrain.engine.base import SamplingParams
    from posttrain.evaluation import evaluate
    from posttrain.tasks import make_task

    thread = kernels.hash_triton_in_background()
    task = make_task("gsm8k", prompt_style="chat", fewshot=0, data_dir=args.data_dir)
    examples = task.examples("test", None)
    tokenizer = load_tokenizer(args.model)
    engine = make_engine("fast", load_model(args.model, "auto", "auto"), tokenizer, len(examples))
    if thread is not None:
        thread.join()  # its work is not what this measures
    params = SamplingParams(args.max_new_tokens, 0.0, 1.0, 1, list(task.stop_strings), 0)
    lines = []
    for call in (1, 2):
        profile = cProfile.Profile()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        profile.enable()
        evaluate(task, examples, engine, tokenizer, params, progress=False)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        profile.disable()
        lines.append(f"CALL {call} (max_new_tokens {args.max_new_tokens}): {time.perf_counter() - t:.3f} s")
        for key in ("tottime", "cumulative"):
            s = io.StringIO()
            pstats.Stats(profile, stream=s).sort_stats(key).print_stats(args.top)
            lines += [line[:170] for line in s.getvalue().splitlines()[6:]]
    report = "\n".join(lines)
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
