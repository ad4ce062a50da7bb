"""Reward functions: a registry of named functions combined with weights.

Every reward function has seed 003's signature ``(prompts, completions, answer, **kwargs) -> list[float]``.
``completions`` are strings for plain/fewshot prompts and chat turns (``[[{"role": "assistant",
"content": text}]]``, as TRL passes them) for chat prompts, so seed 003's functions run unchanged.
``answer`` is the GSM8K-style answer text ending in ``#### N``; ``numeric_answer`` (kwarg) holds bare numbers.

``correctness`` *is* the evaluation grader: what RL optimises is what evaluation measures.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import numbers
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from posttrain.errors import PosttrainError
from posttrain.tasks.grading import grade

RewardFn = Callable[..., list[float]]


def completion_text(c) -> str:
    """Plain text of a completion given as a string or as chat turns."""
    if isinstance(c, str):
        return c
    if isinstance(c, list) and c and isinstance(c[0], dict):
        return str(c[0].get("content", ""))
    return str(c)


def correctness(prompts, completions, answer, **kwargs) -> list[float]:
    """1.0 if the completion's answer matches the gold number (the flexible grader), else 0.0."""
    gold = kwargs.get("numeric_answer") or answer
    return [1.0 if grade(completion_text(c), g).correct else 0.0 for c, g in zip(completions, gold)]


def strict_correctness(prompts, completions, answer, **kwargs) -> list[float]:
    """1.0 if the explicitly marked answer (#### N or <answer>) is right, else 0.0."""
    gold = kwargs.get("numeric_answer") or answer
    return [1.0 if grade(completion_text(c), g).strict_correct else 0.0 for c, g in zip(completions, gold)]


_STRICT_RE = re.compile(r"^<thinking>\n.*?\n</thinking>\n<answer>\n.*?\n</answer>$", re.DOTALL)
_ANSWER_TAG_RE = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.IGNORECASE | re.DOTALL)
_AFTER_ANSWER_RE = re.compile(r"</answer>\s*(.*)$", re.DOTALL)


def strict_format(prompts, completions, answer=None, **kwargs) -> list[float]:
    """Seed 003: +1 if the whole completion is <thinking>\\n…\\n</thinking>\\n<answer>\\n…\\n</answer>, else -1."""
    return [1.0 if _STRICT_RE.fullmatch(completion_text(c).strip()) else -1.0 for c in completions]


def xml_count(prompts, completions, answer=None, **kwargs) -> list[float]:
    """Seed 003: 0 if nothing but whitespace follows </answer>, -0.5 otherwise (or with no </answer>)."""
    out = []
    for c in completions:
        m = _AFTER_ANSWER_RE.search(completion_text(c))
        out.append(0.0 if m and not m.group(1).strip() else -0.5)
    return out


def int_answer(prompts, completions, answer=None, **kwargs) -> list[float]:
    """Seed 003: +1 if the <answer> tag holds a (signed) integer, -1 otherwise."""
    out = []
    for c in completions:
        m = _ANSWER_TAG_RE.search(completion_text(c))
        out.append(1.0 if m and re.fullmatch(r"[+-]?\d+", m.group(1).strip()) else -1.0)
    return out


def length(prompts, completions, answer=None, **kwargs) -> list[float]:
    """Seed 003's length penalty: -0.5 for completions of 100 tokens or more, else 0."""
    lengths = kwargs.get("completion_lengths") or [len(completion_text(c).split()) for c in completions]
    return [0.0 if n < 100 else -0.5 for n in lengths]


def random_reward(prompts, completions, answer=None, **kwargs) -> list[float]:
    """A control, not a goal: 1.0 or 0.0 with even odds, independent of what is right (the bit is read off a
    sha256 of the prompt and the completion, so a rerun or a resumed run gives every completion the same
    reward). Published work found Qwen-family models improve at math even under such rewards; a real reward's
    gain must exceed this arm's at the same budget."""
    out = []
    for p, c in zip(prompts, completions):
        digest = hashlib.sha256(f"{p}\x00{completion_text(c)}".encode()).digest()
        out.append(float(digest[0] & 1))
    return out


REWARDS: dict[str, RewardFn] = {
    "correctness": correctness,
    "strict_correctness": strict_correctness,
    "strict_format": strict_format,
    "xml_count": xml_count,
    "int_answer": int_answer,
    "length": length,
    "random": random_reward,
}


@dataclass
class WeightedReward:
    name: str
    fn: RewardFn
    weight: float


def _load_custom(path: str, func: str) -> RewardFn:
    file = Path(path)
    if not file.is_file():
        raise PosttrainError(f"reward file not found: {file}")
    spec = importlib.util.spec_from_file_location(f"posttrain_reward_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    except Exception as e:
        raise PosttrainError(f"could not import reward file {file}: {type(e).__name__}: {e}") from None
    fn = getattr(module, func, None)
    if not callable(fn):
        raise PosttrainError(f"{file} has no function {func!r}")
    return fn


def parse_reward(spec: str) -> WeightedReward:
    """``NAME[:WEIGHT]`` for a built-in, ``path/to/file.py:function[:WEIGHT]`` for your own."""
    parts = spec.split(":")
    weight = 1.0
    if len(parts) > 1:
        try:
            weight = float(parts[-1])
            parts = parts[:-1]
        except ValueError:
            pass
    if parts[0].endswith(".py"):
        if len(parts) != 2:
            raise PosttrainError(f"custom reward {spec!r} must look like path/to/file.py:function[:weight]")
        return WeightedReward(f"{Path(parts[0]).stem}.{parts[1]}", _load_custom(parts[0], parts[1]), weight)
    name = ":".join(parts)
    if name not in REWARDS:
        raise PosttrainError(f"unknown reward {name!r}; built-ins: {', '.join(REWARDS)}, or path/to/file.py:function")
    return WeightedReward(name, REWARDS[name], weight)


def _reward_values(name: str, values, n: int) -> list[float]:
    """A reward function's return value as ``n`` floats; one-line error for anything else (a string,
    a mapping, a list of the wrong length or with a value that is not a number)."""
    if hasattr(values, "tolist") and not isinstance(values, (str, bytes)):  # numpy arrays, torch tensors
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        raise PosttrainError(f"reward function {name!r} returned {type(values).__name__} {str(values)[:40]!r}, not a list of "
                             f"{n} numbers (one per completion): fix the function")
    if len(values) != n:
        raise PosttrainError(f"reward function {name!r} returned {len(values)} rewards for {n} completions: it must return "
                             "one number per completion")
    bad = next((i for i, v in enumerate(values) if not isinstance(v, numbers.Real)), None)
    if bad is not None:
        raise PosttrainError(f"reward function {name!r} returned {values[bad]!r} ({type(values[bad]).__name__}) for completion "
                             f"{bad}; rewards must be numbers: fix the function")
    return [float(v) for v in values]


def compute_rewards(rewards: list[WeightedReward], prompts: list, completions: list, answer: list[str],
                    **kwargs) -> tuple[list[float], dict[str, list[float]]]:
    """Weighted sum of every reward function, plus each function's raw values (for metrics)."""
    n = len(completions)
    total = [0.0] * n
    per_fn: dict[str, list[float]] = {}
    for r in rewards:
        try:
            values = r.fn(prompts=prompts, completions=completions, answer=answer, **kwargs)
        except Exception as e:
            why = (str(e).strip().splitlines() or [""])[0][:200]
            raise PosttrainError(f"reward function {r.name!r} raised {type(e).__name__}: {why}; fix the function") from None
        values = _reward_values(r.name, values, n)
        bad = next((i for i, v in enumerate(values) if not math.isfinite(v)), None)
        if bad is not None:
            raise PosttrainError(f"reward function {r.name!r} returned {values[bad]} for completion {bad}; rewards must be "
                                 "finite numbers: fix the function")
        per_fn[r.name] = values
        total = [t + r.weight * v for t, v in zip(total, values)]
    return total, per_fn
