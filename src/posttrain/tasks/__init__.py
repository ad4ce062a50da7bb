"""Tasks: problem sources, prompt templates, answer extraction, grading and rewards."""

from posttrain.tasks.grading import Grade, extract, grade, numbers_match, parse_gold, parse_number
from posttrain.tasks.prompts import PROMPTS, PromptTemplate, get_prompt
from posttrain.tasks.sources import Example
from posttrain.tasks.task import Task, check_contamination, make_task

__all__ = [
    "Example", "Grade", "PROMPTS", "PromptTemplate", "Task", "check_contamination", "extract", "get_prompt", "grade",
    "make_task", "numbers_match", "parse_gold", "parse_number",
]
