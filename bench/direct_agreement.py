"""Direct loading (engine/direct.py) against transformers on one model folder, on the machine at hand (issue 25):
the same prompt token ids, chat text, decodes and special tokens; the same weights, tensor for tensor; the same
``posttrain eval`` records; and how long each way takes to load.

    python bench/direct_agreement.py --model DIR --data-dir GSM8K_DIR --json OUT [--max-new-tokens 400]

Prompts: every GSM8K test and train problem in the chat, plain and fewshot styles. Decodes: 1000 random id
sequences, with and without special tokens. Evaluation: all 1319 test problems, chat prompts, greedy, the fast
engine, once on the direct model and tokenizer and once on transformers' (``run_eval`` given them).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import random
import time
from pathlib import Path

import torch

from posttrain.engine import load_model, load_tokenizer, resolve_device, resolve_dtype
from posttrain.engine.direct import plan
from posttrain.evaluation import EvalConfig, run_eval
from posttrain.tasks import make_task


def timed(fn):
    t = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t


def tokenizers_agree(direct, hf, data_dir: str) -> dict:
    res = {}
    for style in ("chat", "plain", "fewshot"):
        task = make_task("gsm8k", prompt_style=style, data_dir=data_dir)
        examples = task.examples("test", None) + task.examples("train", None)
        texts = [task.prompt_text(e, direct) for e in examples]
        same_text = sum(a == task.prompt_text(e, hf) for a, e in zip(texts, examples))
        ids_d, ids_h = task.encode_prompts(examples, direct, texts), task.encode_prompts(examples, hf, texts)
        tgt_d, tgt_h = task.encode_targets(examples, direct), task.encode_targets(examples, hf)
        res[style] = {"n": len(examples), "same_text": same_text, "same_ids": sum(a == b for a, b in zip(ids_d, ids_h)),
                      "same_targets": sum(list(a) == list(b) for a, b in zip(tgt_d, tgt_h))}
    rng = random.Random(0)
    same = 0
    for _ in range(1000):
        ids = [rng.randrange(len(hf)) for _ in range(rng.randrange(1, 80))]
        same += all(direct.decode(ids, skip_special_tokens=s) == hf.decode(ids, skip_special_tokens=s) for s in (True, False))
    res["decodes"] = {"n": 1000, "same": same}
    res["specials_same"] = ((direct.eos_token_id, direct.pad_token_id, direct.bos_token_id, sorted(direct.all_special_tokens), len(direct))
                            == (hf.eos_token_id, hf.pad_token_id, hf.bos_token_id, sorted(hf.all_special_tokens), len(hf)))
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--json", required=True)
    ap.add_argument("--max-new-tokens", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=1319)
    args = ap.parse_args()
    import transformers

    dev = resolve_device("auto")
    dtype = resolve_dtype("auto", dev)
    folder = plan(args.model)
    assert folder is not None, f"{args.model} does not read directly"
    name = torch.cuda.get_device_name() if dev.type == "cuda" else platform.processor()
    res = {"date": datetime.date.today().isoformat(), "model": args.model, "device": name,
           "torch": torch.__version__, "transformers": transformers.__version__}
    (d_tok, res["direct_tokenizer_s"]), (h_tok, res["transformers_tokenizer_s"]) = timed(folder.tokenizer), timed(lambda: load_tokenizer(args.model))
    res["tokenizer"] = tokenizers_agree(d_tok, h_tok, args.data_dir)
    d_model, res["direct_model_s"] = timed(lambda: folder.model(dtype, dev))
    h_model, res["transformers_model_s"] = timed(lambda: load_model(args.model, "auto", "auto"))
    want, got = h_model.state_dict(), d_model.state_dict()
    res["weights"] = {"tensors": len(want), "same_names": set(want) == set(got),
                      "equal": sum(torch.equal(got[k], v) for k, v in want.items() if k in got)}
    cfg = dict(model=args.model, task="gsm8k", data_dir=args.data_dir, max_new_tokens=args.max_new_tokens,
               batch_size=args.batch_size, show_samples=0)
    runs = {"direct": run_eval(EvalConfig(**cfg), model=d_model, tokenizer=d_tok, progress=False),
            "transformers": run_eval(EvalConfig(**cfg), model=h_model, tokenizer=h_tok, progress=False)}
    a, b = runs["direct"].records, runs["transformers"].records
    res["eval"] = {"n": len(a), "same_prompt": sum(x["prompt"] == y["prompt"] for x, y in zip(a, b)),
                   "same_generation": sum(x["generation"] == y["generation"] for x, y in zip(a, b)),
                   **{k: {m: r.summary[m] for m in ("accuracy", "seconds", "tokens_per_s", "mean_gen_len")} for k, r in runs.items()}}
    Path(args.json).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
