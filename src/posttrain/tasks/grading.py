"""Answer extraction and numeric grading for math word problems.

Two extraction modes, reported side by side:

* **strict**: the answer must be explicitly marked in a format our prompts ask for:
  ``#### N`` (GSM8K) or ``<answer>N</answer>`` (seed 003's tags).
* **flexible**: strict markers first, then ``\\boxed{N}``, then "the (final) answer is N", then the last
  number in the text.

The *first* marked answer wins: base models often keep writing after ``#### 18`` (a new "Question: …
#### 42"), and that run-on text must not change the answer.

Numbers are compared exactly as fractions with the seed's tolerance (absolute or relative 1e-9).
Nothing in this module raises on any string: graders run inside reward functions on arbitrary model
output.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

# A number as models write it: optional sign (ASCII or unicode minus), optional currency,
# thousands separators (comma; space only in marked answers), decimals, fractions like 3/4.
_SIGN = r"[-+\u2212]?"
_INT_COMMA = r"\d{1,3}(?:,\d{3})+(?!\d)"
_INT_SPACE = r"\d{1,3}(?:[ \u00a0\u202f]\d{3})+(?!\d)"
_INT_PLAIN = r"\d+"
_DEC = r"(?:\.\d+)?"
_FRAC = r"(?:\s*/\s*\d+(?:\.\d+)?)?"

_NUM_LOOSE = rf"{_SIGN}\$?\s?(?:{_INT_COMMA}|{_INT_PLAIN}){_DEC}{_FRAC}"
_NUM_MARKED = rf"{_SIGN}\$?\s?(?:{_INT_COMMA}|{_INT_SPACE}|{_INT_PLAIN}){_DEC}{_FRAC}"

# Not preceded by a letter/digit/dot so "x2" or "v1.2.3" fragments are not half-read.
_NUM_LOOSE_RE = re.compile(rf"(?<![\w.]){_NUM_LOOSE}")
_NUM_MARKED_RE = re.compile(_NUM_MARKED)

_HASH_RE = re.compile(r"####\s*(?:\*\*)?\s*(" + _NUM_MARKED + ")")
_TAG_RE = re.compile(r"<answer>\s*(.*?)\s*(?:</answer>|$)", re.IGNORECASE | re.DOTALL)
_BOXED_RE = re.compile(r"\\boxed\s*\{")
_ANSWER_IS_RE = re.compile(
    r"(?:final\s+answer|the\s+answer|answer)\s*(?:is|:|=)\s*(?:\*\*)?\s*(?:\\\(|\$\$)?\s*(" + _NUM_MARKED + ")",
    re.IGNORECASE,
)

ABS_TOL = Fraction(1, 10**9)
REL_TOL = Fraction(1, 10**9)

# Guard against pathological inputs (a million-digit "number") making Fraction arithmetic slow.
_MAX_NUMBER_CHARS = 200


def parse_number(s: str) -> Fraction | None:
    """Parse one number as written by a model ("$1,234.50", "−3/4", "18.", "007", "45%") or None."""
    try:
        return _parse_number(s)
    except Exception:  # the grader never raises
        return None


def _parse_number(s: str) -> Fraction | None:
    s = str(s).strip()
    if not s or len(s) > _MAX_NUMBER_CHARS:
        return None
    s = s.replace("\u2212", "-").replace("$", "").replace("%", "")
    s = s.rstrip(".").strip()
    s = re.sub(r"(?<=\d)[,  \u00a0\u202f](?=\d{3}(?!\d))", "", s)
    s = s.replace(" ", "")
    m = re.fullmatch(r"([-+]?)(\d+(?:\.\d+)?)(?:/(\d+(?:\.\d+)?))?", s)
    if not m:
        return None
    sign, num, den = m.groups()
    value = Fraction(num)
    if den is not None:
        d = Fraction(den)
        if d == 0:
            return None
        value /= d
    return -value if sign == "-" else value


def _first_number(text: str, pattern: re.Pattern) -> Fraction | None:
    m = pattern.search(text)
    return parse_number(m.group(0)) if m else None


def _boxed_contents(text: str) -> str | None:
    """Contents of the first ``\\boxed{...}``, with nested braces balanced."""
    m = _BOXED_RE.search(text)
    if not m:
        return None
    depth, start = 1, m.end()
    for i in range(start, min(len(text), start + 1000)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start:i]
    return None


def _latex_frac(s: str) -> str:
    return re.sub(r"\\d?frac\{([^{}]*)\}\{([^{}]*)\}", r"\1/\2", s)


@dataclass(frozen=True)
class Extraction:
    """What the grader read from a completion."""

    strict: Fraction | None
    """The explicitly marked answer (``####`` or answer tags), or None."""
    flexible: Fraction | None
    """Strict answer if present, else boxed, "answer is", or the last number."""
    method: str
    """Which rule produced ``flexible``: hash, tag, boxed, answer_is, last_number or none."""


def extract(text: str) -> Extraction:
    """Extract strict and flexible answers from a completion. Never raises."""
    try:
        return _extract(str(text))
    except Exception:
        return Extraction(None, None, "none")


def _extract(text: str) -> Extraction:
    candidates: list[tuple[int, str, Fraction]] = []
    m = _HASH_RE.search(text)
    if m:
        v = parse_number(m.group(1))
        if v is not None:
            candidates.append((m.start(), "hash", v))
    m = _TAG_RE.search(text)
    if m:
        v = _first_number(_latex_frac(m.group(1)), _NUM_MARKED_RE)
        if v is not None:
            candidates.append((m.start(), "tag", v))
    if candidates:
        # The earliest marked answer wins; later ones are usually run-on text.
        _, method, value = min(candidates, key=lambda c: c[0])
        return Extraction(value, value, method)

    boxed = _boxed_contents(text)
    if boxed is not None:
        v = _first_number(_latex_frac(boxed), _NUM_MARKED_RE)
        if v is not None:
            return Extraction(None, v, "boxed")
    m = _ANSWER_IS_RE.search(text)
    if m:
        v = parse_number(m.group(1))
        if v is not None:
            return Extraction(None, v, "answer_is")
    last = None
    for m in _NUM_LOOSE_RE.finditer(text):
        last = m
    if last is not None:
        v = parse_number(last.group(0))
        if v is not None:
            return Extraction(None, v, "last_number")
    return Extraction(None, None, "none")


def parse_gold(answer: str | int | float | Fraction) -> Fraction | None:
    """Gold answer from GSM8K answer text ("... #### 1,234") or a bare number."""
    try:
        if isinstance(answer, Fraction):
            return answer
        if isinstance(answer, (int, float)) and not isinstance(answer, bool):
            return Fraction(str(answer))
        text = str(answer)
        m = _HASH_RE.search(text)
        if m:
            return parse_number(m.group(1))
        return parse_number(text)
    except Exception:
        return None


def numbers_match(pred: Fraction | None, gold: Fraction | None) -> bool:
    """Equal within the seed's tolerance: |pred-gold| <= 1e-9 or relative error <= 1e-9."""
    if pred is None or gold is None:
        return False
    diff = abs(pred - gold)
    return diff <= ABS_TOL or diff / max(Fraction(1), abs(gold)) <= REL_TOL


def format_number(x: Fraction | None) -> str | None:
    """Canonical string for a number: integers plain, others as a short decimal."""
    if x is None:
        return None
    if x.denominator == 1:
        return str(x.numerator)
    return f"{float(x):.10g}"


@dataclass(frozen=True)
class Grade:
    """Result of grading one completion."""

    pred: str | None
    """Flexible prediction as a canonical string (None if no number found)."""
    correct: bool
    """Flexible match with the gold answer."""
    strict_correct: bool
    """Strict (explicitly marked) match with the gold answer."""
    method: str
    """Extraction rule used for the flexible prediction."""


def grade(completion: str, gold: str | int | float | Fraction) -> Grade:
    """Grade a completion against a gold answer. Never raises."""
    ext = extract(completion)
    g = parse_gold(gold)
    return Grade(
        pred=format_number(ext.flexible),
        correct=numbers_match(ext.flexible, g),
        strict_correct=numbers_match(ext.strict, g),
        method=ext.method,
    )
