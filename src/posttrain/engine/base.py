"""The generation interface shared by the HF-generate path and our fast engine."""

from __future__ import annotations

from dataclasses import dataclass, field

from posttrain.errors import PosttrainError


@dataclass
class SamplingParams:
    max_new_tokens: int = 300
    """Most tokens generated per completion (the seed's 300)."""
    temperature: float = 0.0
    """0 means greedy decoding; > 0 samples from softmax(logits / temperature)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    n: int = 1
    """Completions per prompt (a GRPO group, or samples for pass@k)."""
    stop: list[str] = field(default_factory=list)
    """Stop strings: generation ends once one appears; the text is cut before it."""
    seed: int | None = None
    """Seed for sampling, for reproducible runs."""
    ignore_eos: bool = False
    """Keep generating past EOS (benchmarks only)."""
    logprobs: bool = False
    """Return each generated token's log-probability (the HF path then keeps every step's logits)."""

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise PosttrainError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise PosttrainError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise PosttrainError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.n < 1:
            raise PosttrainError(f"the number of samples per prompt must be >= 1, got {self.n}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Completion:
    prompt_index: int
    """Index of the prompt this completion answers."""
    token_ids: list[int]
    """Generated tokens: up to and including EOS, or up to the token that completed a stop string."""
    text: str
    """Decoded completion without special tokens, cut before any stop string."""
    finish_reason: str
    """``eos``, ``stop`` (a stop string) or ``length`` (hit max_new_tokens)."""
    logprobs: list[float] | None = None
    """Log-probability of each generated token under softmax(logits / temperature) (T=1 if greedy)."""


def finish(tokenizer, prompt_index: int, tokens: list[int], eos_ids: set[int], stop: list[str],
           logprobs: list[float] | None, ignore_eos: bool = False) -> Completion:
    """Cut raw generated tokens at the first EOS or stop string and decode them."""
    reason = "length"
    if not ignore_eos:
        for i, t in enumerate(tokens):
            if t in eos_ids:
                tokens, reason = tokens[: i + 1], "eos"
                break
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    if stop:
        hits = [(text.find(s), s) for s in stop if s and s in text]
        if hits:
            cut = min(hits)[0]
            text = text[:cut]
            # Keep the tokens up to the one that completed the stop string.
            for i in range(1, len(tokens) + 1):
                if len(tokenizer.decode(tokens[:i], skip_special_tokens=True)) > cut:
                    tokens = tokens[:i]
                    break
            reason = "stop"
    if logprobs is not None:
        logprobs = logprobs[: len(tokens)]
    return Completion(prompt_index, list(tokens), text, reason, logprobs)


def listed_token_ids(value) -> list[int] | None:
    """A config's ``eos_token_id`` (one id, a list of them, or none) as a list; None when it is not that."""
    listed = list(value) if isinstance(value, (list, tuple)) else [value] if isinstance(value, int) or value else []
    return listed if all(isinstance(x, int) and not isinstance(x, bool) for x in listed) else None


def eos_token_ids(model, tokenizer) -> set[int]:
    """All ids that end a completion: the tokenizer's EOS and the model's generation_config EOS list."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    listed = listed_token_ids(gen_eos)
    if listed is None:
        raise PosttrainError(f"the model's generation_config.json gives eos_token_id {gen_eos!r}: it must be a token id "
                             "or a list of them; fix or delete that file")
    return ids | set(listed)


class Engine:
    """Generates completions for tokenized prompts from ``model``.

    The contract with a trainer: ``generate`` samples from weights no older than the last
    ``sync_weights`` (or construction); a trainer calls ``sync_weights(policy)`` wherever it changed
    the policy. An engine may sample from a copy (the fast engine's merged weights, stale until the
    sync) or read the policy live (HF generate; the fast engine's live modules and 4-bit path). One
    engine serves a whole run: rollouts and evaluations alike.
    """

    name = "engine"
    model = None
    first_token_s: float | None = None
    """Process age (``utils.process_age_s``) when this engine produced its first token: the time to
    first token a user lives, imports, loading and any compilation included."""

    def note_first_token(self) -> None:
        if self.first_token_s is None:
            from posttrain.utils import process_age_s

            self.first_token_s = process_age_s()

    def check_lengths(self, prompts: list[list[int]], params: SamplingParams) -> None:
        """One-line error when a prompt plus the completion budget does not fit the model's positions."""
        limit = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        longest = max((len(p) for p in prompts), default=0)
        if limit and longest + params.max_new_tokens > limit:
            raise PosttrainError(f"a prompt of {longest} tokens plus --max-new-tokens {params.max_new_tokens} exceeds the "
                                 f"model's {limit} positions; shorten the prompts or lower --max-new-tokens")
        if not all(prompts):
            raise PosttrainError("an empty prompt (no tokens) was given; every prompt needs at least one token")

    def sync_weights(self, policy) -> None:
        """Make the next ``generate`` sample from ``policy``'s current weights. ``policy`` must be the
        model the engine was built on (an engine's caches and compiled code are shaped for it)."""
        if policy is not self.model:
            raise ValueError("sync_weights: this engine serves another model; build an engine for this one")

    def reserve(self, longest_prompt: int) -> None:
        """Size the buffers of later ``generate`` calls for prompts up to ``longest_prompt`` tokens (a run's
        longest), so that a longer prompt than any before does not make the engine allocate them again
        (and, for the fast engine, capture its CUDA graphs again); nothing by default."""

    def release(self) -> None:
        """Free what only sampling needs until the next ``generate`` (the fast engine's transient copy
        of a 4-bit base); nothing by default."""

    def generate(self, prompts: list[list[int]], params: SamplingParams, progress: bool = False) -> list[Completion]:
        """Completions ordered prompt by prompt: [p0 s0, p0 s1, …, p1 s0, …]."""
        raise NotImplementedError
