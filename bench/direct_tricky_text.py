"""Direct loading's tokenizer against transformers' on text GSM8K does not hold (issue 25): decomposed accents,
compatibility characters, carriage returns, runs of spaces, special tokens inside text, CJK and emoji.

    python bench/direct_tricky_text.py --model DIR --json OUT

Each string is encoded with and without special tokens by both; the JSON counts the encodings that are the
same and names both tokenizers' normalizers (transformers 5 gives a Qwen2 folder NFC whatever its
tokenizer.json says; the direct tokenizer does the same).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import transformers

from posttrain.engine import load_tokenizer
from posttrain.engine.direct import plan

TRICKY = ["cafe\u0301 and caf\u00e9", "\r\n\r\n  x", "  two leading spaces", "x <|im_end|> y", "\u212b \ufb01 \uff21 \u2460",
          "tab\there", "a\u0308o\u0301", "<|endoftext|>hi", "It's 12,345.67 dollars!", "\u4f60\u597d \U0001f600"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    direct, hf = plan(args.model).tokenizer(), load_tokenizer(args.model)
    pairs = [(direct(s, add_special_tokens=a)["input_ids"], list(hf(s, add_special_tokens=a)["input_ids"])) for s in TRICKY for a in (True, False)]
    res = {"transformers": transformers.__version__, "n": len(pairs), "same": sum(a == b for a, b in pairs),
           "len": [len(direct), len(hf)], "normalizer": [str(direct.backend.normalizer), str(hf._tokenizer.normalizer)]}
    Path(args.json).write_text(json.dumps(res))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
