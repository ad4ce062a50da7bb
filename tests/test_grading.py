"""Answer extraction and grading: the cases seed 000 lists and what real models emit."""

from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from posttrain.tasks.grading import extract, grade, numbers_match, parse_gold, parse_number


@pytest.mark.parametrize("text,expected", [
    ("1,234", Fraction(1234)), ("1 234", Fraction(1234)), ("$18", Fraction(18)), ("18.00", Fraction(18)),
    ("18.", Fraction(18)), ("45%", Fraction(45)), ("3/4", Fraction(3, 4)), ("-7", Fraction(-7)),
    ("\u22127", Fraction(-7)), ("007", Fraction(7)), ("$1,234.50", Fraction(246900, 200)), ("0.5", Fraction(1, 2)),
    ("abc", None), ("", None), ("3/0", None), ("1" * 500, None),
])
def test_parse_number(text, expected):
    assert parse_number(text) == expected


@pytest.mark.parametrize("completion,gold,correct,strict", [
    # strict '#### N'
    ("She has 5 + 3 = 8 apples.\n#### 8", "8", True, True),
    ("#### 1,234", "1234", True, True),
    ("#### 1 234", "1234", True, True),
    ("#### $18.00.", "18", True, True),
    ("#### -5", "-5", True, True),
    ("#### \u22125", "-5", True, True),
    ("#### 007", "7", True, True),
    ("#### 3/4", "0.75", True, True),
    ("#### 0.75", "3/4", True, True),
    ("#### 50%", "50", True, True),
    # run-on text after a marked answer must not change it
    ("#### 18\n\nQuestion: Tom has 4 apples...\nAnswer: 2+2=4\n#### 4", "18", True, True),
    ("<answer>\n18\n</answer>\nMore text 99", "18", True, True),
    # answer tags (seed 003)
    ("<thinking>\n3 * 4 = 12\n</thinking>\n<answer>\n12\n</answer>", "12", True, True),
    ("<answer>1,000</answer>", "1000", True, True),
    # flexible-only formats
    ("so the result is \\boxed{42}.", "42", True, False),
    ("\\boxed{\\frac{3}{4}}", "0.75", True, False),
    ("The answer is 17.", "17", True, False),
    ("Thus the final answer is: $2,500.", "2500", True, False),
    ("He pays 3 * 4 = 12 dollars", "12", True, False),
    ("I think 12 then 13", "13", True, False),
    # wrong and empty
    ("#### 19", "18", False, False),
    ("", "18", False, False),
    ("no numbers here", "18", False, False),
    ("#### 18.5", "18", False, False),
    # tolerance: seed's 1e-9
    ("#### 0.3333333333", "1/3", True, True),
    ("#### 0.333", "1/3", False, False),
])
def test_grade_table(completion, gold, correct, strict):
    g = grade(completion, gold)
    assert (g.correct, g.strict_correct) == (correct, strict), g


def test_gold_from_gsm8k_answer_text():
    assert parse_gold("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72") == 72
    assert parse_gold("#### 1,000,000") == 1_000_000
    assert parse_gold(18) == 18 and parse_gold(2.5) == Fraction(5, 2) and parse_gold("  42 ") == 42


def test_extraction_methods():
    assert extract("#### 5").method == "hash"
    assert extract("<answer>5</answer>").method == "tag"
    assert extract("\\boxed{5}").method == "boxed"
    assert extract("answer is 5").method == "answer_is"
    assert extract("5 apples").method == "last_number"
    assert extract("none").method == "none"


def test_numbers_match_relative_tolerance():
    big = Fraction(10**12)
    assert numbers_match(big + Fraction(1, 10**5), big)
    assert not numbers_match(big + 10_000, big)  # relative error 1e-8 > 1e-9
    assert not numbers_match(None, big)


@settings(max_examples=300, deadline=None)
@given(st.text(), st.one_of(st.text(), st.integers(), st.floats(allow_nan=True)))
def test_grader_never_raises(completion, gold):
    g = grade(completion, gold)
    assert isinstance(g.correct, bool) and isinstance(g.strict_correct, bool)


@settings(max_examples=200, deadline=None)
@given(st.integers(-10**9, 10**9), st.text(alphabet=st.characters(blacklist_categories=["Nd"]), max_size=40))
def test_marked_integer_survives_run_on_text(n, tail):
    text = f"Working... #### {n:,}\n{tail} #### 99999999999"
    assert grade(text, str(n)).strict_correct
