"""Where problems come from: GSM8K (hub or local files), reasoning-gym's gsm_symbolic, any table file.

Every source yields :class:`Example` rows with the seed's columns: ``question``, ``response`` (the worked
solution ending in ``#### N``) and ``numeric_answer``.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from posttrain.errors import PosttrainError
from posttrain.tasks.grading import format_number, parse_gold
from posttrain.utils import open_text, read_jsonl

_CALC_RE = re.compile(r"<<[^<>]*>>")
_FINAL_LINE_RE = re.compile(r"\n?\s*####\s*(.*)$", re.DOTALL)


@dataclass(frozen=True)
class Example:
    question: str
    """The problem statement."""
    response: str
    """Worked solution ending in ``#### N`` (calculator annotations removed); may be empty."""
    numeric_answer: str
    """Gold answer as a canonical number string."""
    id: str
    """Stable identifier, ``<source>/<split>/<index>``."""

    @property
    def reasoning(self) -> str:
        """The worked solution without its final ``#### N`` line."""
        return _FINAL_LINE_RE.sub("", self.response).strip()


def preprocess_gsm8k(row: dict, source: str, split: str, index: int) -> Example:
    """OpenAI GSM8K row (``question``, ``answer`` = solution + ``#### N``) -> Example."""
    answer_text = str(row["answer"])
    gold = parse_gold(answer_text)
    if gold is None:
        raise PosttrainError(f"{source} {split} row {index}: answer has no '#### <number>' line")
    response = _CALC_RE.sub("", answer_text).strip()
    return Example(str(row["question"]).strip(), response, format_number(gold), f"{source}/{split}/{index}")


class Source:
    """A named collection of problems with ``train`` and ``test`` splits."""

    name: str = "source"

    def load(self, split: str) -> list[Example]:
        raise NotImplementedError

    def splits(self) -> tuple[str, ...]:
        return ("train", "test")


def _check_split(split: str, splits: tuple[str, ...]) -> None:
    if split not in splits:
        raise PosttrainError(f"unknown split {split!r}; choose one of {', '.join(splits)}")


class GSM8K(Source):
    """openai/gsm8k (config ``main``): from ``data_dir`` (OpenAI's ``train.jsonl``/``test.jsonl``) or the hub."""

    name = "gsm8k"

    def __init__(self, data_dir: str | None = None):
        self.data_dir = data_dir or os.environ.get("POSTTRAIN_GSM8K_DIR") or None

    def load(self, split: str) -> list[Example]:
        _check_split(split, self.splits())
        return list(_load_gsm8k(self.data_dir, split))


@lru_cache(maxsize=8)
def _load_gsm8k(data_dir: str | None, split: str) -> tuple[Example, ...]:
    if data_dir:
        path = Path(data_dir) / f"{split}.jsonl"
        if not path.is_file():
            raise PosttrainError(f"GSM8K {split} split not found: {path} (the folder needs OpenAI's train.jsonl and test.jsonl)")
        rows = read_jsonl(path)
        for i, row in enumerate(rows):
            if "question" not in row or "answer" not in row:
                raise PosttrainError(f"{path}:{i + 1}: GSM8K rows need 'question' and 'answer' fields")
        return tuple(preprocess_gsm8k(r, "gsm8k", split, i) for i, r in enumerate(rows))
    try:
        import datasets

        ds = datasets.load_dataset("openai/gsm8k", "main", split=split)
    except Exception as e:  # offline, no datasets cache, hub error
        raise PosttrainError(
            "GSM8K is not available: the hub could not be reached "
            f"({type(e).__name__}); download OpenAI's train.jsonl/test.jsonl and pass --data-dir DIR"
        ) from None
    return tuple(preprocess_gsm8k(r, "gsm8k", split, i) for i, r in enumerate(ds))


class GSMSymbolic(Source):
    """Procedural GSM-style problems from reasoning-gym's ``gsm_symbolic``; works offline.

    Train and test come from different seeds, and any train problem whose question also appears in
    test is dropped, so the streams never overlap.
    """

    name = "gsm_symbolic"
    _SUFFIX = " Give the result as your final answer. Do not include units."

    def __init__(self, seed: int = 0, train_size: int = 20000, test_size: int = 1000):
        self.seed, self.train_size, self.test_size = seed, train_size, test_size

    def load(self, split: str) -> list[Example]:
        _check_split(split, self.splits())
        test = _gsm_symbolic(self.seed * 2 + 1, self.test_size, "test", frozenset())
        if split == "test":
            return list(test)
        return list(_gsm_symbolic(self.seed * 2, self.train_size, "train", frozenset(e.question for e in test)))


@lru_cache(maxsize=8)
def _gsm_symbolic(seed: int, size: int, split: str, exclude: frozenset) -> tuple[Example, ...]:
    try:
        import reasoning_gym
    except ImportError:
        raise PosttrainError("the gsm_symbolic task needs reasoning-gym: pip install reasoning-gym") from None
    out = []
    # Over-generate a little so dropped items (bad worked solutions, overlaps) do not shrink the split.
    ds = reasoning_gym.create_dataset("gsm_symbolic", seed=seed + 1000003, size=int(size * 1.15) + 50)
    seen = set()
    for item in ds:
        if len(out) >= size:
            break
        question = str(item["question"]).replace(GSMSymbolic._SUFFIX, "").strip()
        if question in exclude or question in seen:
            continue
        gold = parse_gold(item["answer"])
        cot = str(item.get("metadata", {}).get("answer_cot", ""))
        # Some generated solutions end in a different number than the answer: unusable for SFT.
        if gold is None or parse_gold(cot) != gold:
            continue
        seen.add(question)
        response = _FINAL_LINE_RE.sub("", cot).strip() + f"\n#### {format_number(gold)}"
        out.append(Example(question, response, format_number(gold), f"gsm_symbolic/{split}/{len(out)}"))
    return tuple(out)


class TableFile(Source):
    """A local JSONL/CSV/Parquet file (or a hub dataset ``hf:org/name``) with question/answer columns.

    ``path`` may hold ``{split}`` (e.g. ``data/{split}.jsonl``); otherwise the one file serves both splits.
    """

    name = "file"

    def __init__(self, path: str, question_field: str = "question", answer_field: str = "answer",
                 solution_field: str | None = None, hub_config: str | None = None):
        self.path, self.qf, self.af, self.sf, self.hub_config = path, question_field, answer_field, solution_field, hub_config

    def load(self, split: str) -> list[Example]:
        _check_split(split, self.splits())
        rows, where = self._rows(split)
        out = []
        for i, row in enumerate(rows):
            for col in (self.qf, self.af):
                if col not in row:
                    raise PosttrainError(f"{where}: row {i + 1} has no column {col!r}; name the right one with question_field/answer_field")
            gold = parse_gold(row[self.af])
            if gold is None:
                raise PosttrainError(f"{where}: row {i + 1}: answer {str(row[self.af])[:40]!r} has no number")
            solution = str(row.get(self.sf) or "") if self.sf else (str(row[self.af]) if "####" in str(row[self.af]) else "")
            response = _CALC_RE.sub("", solution).strip()
            if response and "####" not in response:
                response += f"\n#### {format_number(gold)}"
            out.append(Example(str(row[self.qf]).strip(), response, format_number(gold), f"file/{split}/{i}"))
        return out

    def _rows(self, split: str) -> tuple[list[dict], str]:
        if self.path.startswith("hf:"):
            try:
                import datasets

                ds = datasets.load_dataset(self.path[3:], self.hub_config, split=split)
            except Exception as e:
                raise PosttrainError(f"could not load hub dataset {self.path[3:]!r} ({type(e).__name__}); use a local file instead") from None
            return [dict(r) for r in ds], self.path
        path = Path(self.path.replace("{split}", split))  # only that placeholder: other braces are part of the name
        if not path.is_file():
            raise PosttrainError(f"data file not found: {path}")
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".json"):
            return read_jsonl(path), str(path)
        if suffix == ".csv":
            with open_text(path, newline="") as f:
                try:
                    return list(csv.DictReader(f)), str(path)
                except csv.Error as e:
                    raise PosttrainError(f"{path}: not a readable CSV file ({e})") from None
        if suffix == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise PosttrainError("reading Parquet needs pyarrow: pip install pyarrow") from None
            try:
                return pq.read_table(path).to_pylist(), str(path)
            except Exception as e:  # pyarrow's ArrowInvalid/ArrowIOError: not a Parquet file or damaged
                raise PosttrainError(f"{path}: not a readable Parquet file ({type(e).__name__}); check the file") from None
        raise PosttrainError(f"unsupported data file type {suffix!r} for {path}; use .jsonl, .csv or .parquet")
