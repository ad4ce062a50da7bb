"""Prompt templates: named, versioned data.

A template says how a question becomes a prompt and how a worked solution becomes the training target
in the same format, so SFT teaches exactly the format that evaluation and rewards expect. Changing
a template's text means adding a new version, never editing one in place: results recorded with
``gsm8k_plain_v1`` must stay reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from posttrain.errors import PosttrainError


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    """Registry key, ``<family>_v<version>``."""
    style: str
    """``plain`` (instruction + question), ``chat`` (system + user turn via the chat template) or
    ``fewshot`` (k worked examples in "Question: …\\nAnswer:" layout)."""
    instruction: str = ""
    """Plain style: text placed before the question. Chat style: the system prompt."""
    question_format: str = "{question}\n"
    """How the question is written after the instruction (plain and chat user turn)."""
    target_format: str = "{reasoning}\n#### {answer}"
    """How a worked solution is rendered as the SFT target; ``{reasoning}`` is the solution without its
    final answer line, ``{answer}`` the numeric answer."""
    stop: tuple[str, ...] = field(default_factory=tuple)
    """Default stop strings for generation with this template."""
    description: str = ""
    """Where the template comes from."""


# Seed 000 leaves the role sentence to the student and fixes the formatting guideline; this is ours
# around its fixed part (kept byte-for-byte: " \n#### <NUMERIC_ANSWER>.\n Now solve...").
_SEED000_INSTRUCTION = (
    "Your role is a careful assistant that solves grade school math questions by reasoning step by step. "
    "When you are ready to give your solution, format as follows. \n#### <NUMERIC_ANSWER>.\n "
    "Now solve the following problem:\n"
)

# Seed 003's system prompt, verbatim (including its mixed <reasoning>/<thinking> wording).
_SEED003_SYSTEM = """
Respond in the following format and make sure the entire response is wrapped in <reasoning> and <answer> tags with no other text outside of these tags:
<thinking>
your reasoning goes here and do not use newlines so that the entire reasoning becomes a single paragraph
</thinking>
<answer>
your answer goes here
</answer>
"""

_TAGS_TARGET = "<thinking>\n{reasoning_oneline}\n</thinking>\n<answer>\n{answer}\n</answer>"

PROMPTS: dict[str, PromptTemplate] = {
    t.name: t
    for t in [
        PromptTemplate(
            name="gsm8k_plain_v1",
            style="plain",
            instruction=_SEED000_INSTRUCTION,
            question_format="{question}\n",
            target_format="{reasoning}\n#### {answer}",
            description="Seed 000: instruction prefix + question, answer after '####'.",
        ),
        PromptTemplate(
            name="gsm8k_brief_v1",
            style="plain",
            instruction="Solve the problem step by step, then give the answer on the last line as #### N.\n",
            question_format="{question}\n",
            target_format="{reasoning}\n#### {answer}",
            description="A one-line instruction, same answer line as gsm8k_plain_v1: short prompts for small models "
                        "and CPUs (27 nano-gsm tokens against the seed's 88).",
        ),
        PromptTemplate(
            name="reasoning_tags_v1",
            style="chat",
            instruction=_SEED003_SYSTEM,
            question_format="{question}",
            target_format=_TAGS_TARGET,
            description="Seed 003: system prompt asking for <thinking>/<answer> tags, through the chat template.",
        ),
        PromptTemplate(
            name="fewshot_qa_v1",
            style="fewshot",
            question_format="Question: {question}\nAnswer:",
            target_format=" {reasoning}\n#### {answer}",
            stop=("\n\nQuestion:", "Question:"),
            description="lm-evaluation-harness layout: k solved 'Question: …\\nAnswer: …' blocks, then the question.",
        ),
    ]
}

DEFAULT_PROMPT_FOR_STYLE = {"plain": "gsm8k_plain_v1", "chat": "reasoning_tags_v1", "fewshot": "fewshot_qa_v1"}


def get_prompt(name_or_style: str) -> PromptTemplate:
    """Look up a template by name (``gsm8k_plain_v1``) or by style (``plain``, ``chat``, ``fewshot``)."""
    key = DEFAULT_PROMPT_FOR_STYLE.get(name_or_style, name_or_style)
    if key not in PROMPTS:
        choices = sorted(DEFAULT_PROMPT_FOR_STYLE) + sorted(PROMPTS)
        raise PosttrainError(f"unknown prompt style or template {name_or_style!r}; choose one of {', '.join(choices)}")
    return PROMPTS[key]
