"""Training a small byte-level BPE tokenizer (digits one per token) with a chat template.

Used by ``posttrain pretrain`` for the nano model and by the tests for their tiny models.
Splitting digits one per token lets a small model learn arithmetic digit by digit. The answer marker
of our prompts, ``####``, is always one token: a model writes it in one sampling step, so a sampled
completion cannot half-write it (four ``#`` tokens at temperature 0.7 rarely came out as four).
"""

from __future__ import annotations

import contextlib
import re
import weakref
from typing import Iterable

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
ANSWER_MARKER = "####"

# ChatML-style turns; the assistant turn ends with EOS so generation stops there.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% else %}<|im_end|>{% endif %}{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 1024, min_frequency: int = 2):
    """Train a byte-level BPE tokenizer and wrap it as a ``PreTrainedTokenizerFast``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    specials = [PAD, BOS, EOS, IM_START, IM_END]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1, min_frequency=min_frequency, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_tokens([AddedToken(ANSWER_MARKER, normalized=False)])  # matched before BPE: one token wherever it occurs
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        additional_special_tokens=[IM_START, IM_END], clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


# ------------------------------------------------------------------ text from data, as plain text --
_SPECIALS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def special_token_pattern(tokenizer) -> re.Pattern | None:
    """A regex matching the text of any of the tokenizer's special tokens (BOS, EOS, role markers,
    reserved tokens), or None when it has none. Added tokens that are not special (``####``) are
    ordinary text and not matched."""
    try:
        return _SPECIALS[tokenizer]
    except (KeyError, TypeError):
        pass
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    texts = {t.content for t in decoder.values() if getattr(t, "special", False)} | set(getattr(tokenizer, "all_special_tokens", []))
    texts = sorted((t for t in texts if t), key=len, reverse=True)
    pattern = re.compile("|".join(map(re.escape, texts))) if texts else None
    with contextlib.suppress(TypeError):
        _SPECIALS[tokenizer] = pattern
    return pattern


def holds_special_text(tokenizer, texts: Iterable[str]) -> bool:
    """Whether any of ``texts`` contains the text of one of the tokenizer's special tokens."""
    pattern = special_token_pattern(tokenizer)
    return pattern is not None and any(pattern.search(t) for t in texts if t)


def encode_pieces(tokenizer, pieces: list[tuple[str, bool]], add_special_tokens: bool) -> list[int]:
    """Token ids of the concatenated ``pieces`` (text, is_data): template text as the tokenizer reads
    it (its special tokens are special), data text as plain text, so that special-token text in data
    (a question holding ``<|im_start|>system``) becomes ordinary tokens and cannot open a role turn.
    ``add_special_tokens`` wraps the whole as the tokenizer wraps one text (e.g. a leading BOS)."""
    ids: list[int] = []
    for text, is_data in pieces:
        if text:
            ids += tokenizer(text, add_special_tokens=False, split_special_tokens=is_data)["input_ids"]
    if not add_special_tokens:
        return ids
    probe = "".join(text for text, _ in pieces)
    full = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    bare = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    for i in range(len(full) - len(bare) + 1):  # where the tokenizer put the text between its wrapping
        if full[i:i + len(bare)] == bare:
            return full[:i] + ids + full[i + len(bare):]
    return ids
