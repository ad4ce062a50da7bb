"""Write a model folder of a published shape (random bf16 weights, stand-in tokenizer with the real
vocabulary size) for the side-by-side runs: no hub needed.

    python bench/shapes.py llama31-8b /tmp/llama31-8b --data-dir DIR    # or llama32-1b, smollm2-135m, qwen2.5-coder-0.5b
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHAPES, save_shape  # noqa: E402

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("out")
    ap.add_argument("--data-dir", required=True, help="GSM8K folder: the stand-in tokenizer is learned on its train split")
    args = ap.parse_args()
    rows = [json.loads(line) for line in open(Path(args.data_dir) / "train.jsonl")]
    t = time.perf_counter()
    save_shape(args.shape, args.out, [r["question"] + "\n" + r["answer"] for r in rows])
    print(f"{args.shape} -> {args.out} in {time.perf_counter() - t:.0f} s")
