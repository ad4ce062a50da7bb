"""Direct loading: a Llama or Qwen2 folder read straight from its files, for the fast engine, without transformers.

Why not transformers here: importing transformers 5.17 took 3.3-4.4 s of every ``posttrain eval`` start on
the GPU machines we measure on (its tokenizer classes pull in scikit-learn, ``torch._dynamo`` and sympy;
BENCHMARKS.md), longer than everything else before the first token together. The fast engine needs of a model
only its weights, held in modules named as transformers names them (it runs its own forward,
``model_adapter``), and of a tokenizer only the Rust tokenizer of ``tokenizers`` and the chat template: this
module builds both from a folder's ``config.json``, safetensors, ``tokenizer.json`` and
``tokenizer_config.json`` / ``chat_template.jinja``, with ``safetensors``, ``tokenizers`` and ``jinja2``.

``plan`` says whether a folder can be read this way, from its small files alone, and returns None for
anything it does not read exactly as transformers does: another architecture, rope scaling, biases or
activations other than the architecture's, a quantized, adapter or remote-code folder, weights whose names or
shapes are not the architecture's, a tokenizer class that rebuilds its pipeline, clean-up of decoded spaces,
a chat template with generation blocks, tokenizer settings transformers applies on its own (``add_bos_token``,
``split_special_tokens``, a legacy ``special_tokens_map.json``). Those load through transformers, as before.
``DirectFolder.tokenizer`` builds what transformers 5 builds, Qwen2's own normalizer and pre-tokenizer included,
or returns None (then transformers builds the tokenizer beside the direct model). Tests hold the two ways to the
same token ids, chat text, weights and greedy completions (tests/test_direct.py); bench/direct_agreement.py does on
a real model.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from posttrain.engine.base import listed_token_ids
from posttrain.utils import read_json_object

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# Tokenizer classes read directly: the first two transformers 5 builds from tokenizer.json as it is; Qwen2's
# (which transformers also gives every qwen2 folder) rebuilds its normalizer, pre-tokenizer and decoder around
# tokenizer.json's vocabulary, as ``_qwen2_pipeline`` does. Others (Llama's and GPT-2's own classes, which add
# BOS / a prefix space by flags) go through transformers.
TOKENIZER_CLASSES = {"TokenizersBackend", "PreTrainedTokenizerFast", "Qwen2Tokenizer", "Qwen2TokenizerFast"}
SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


# ------------------------------------------------------------------------------------ tokenizer --
class DirectTokenizer:
    """What posttrain asks of a tokenizer (encode, decode, chat template, special tokens), on tokenizers' Rust
    tokenizer as transformers' ``TokenizersBackend`` calls it."""

    def __init__(self, backend, config: dict, chat_template: str | None, name_or_path: str = ""):
        self.backend, self.chat_template, self.name_or_path = backend, chat_template, name_or_path
        self.padding_side = "left"
        self.special_tokens_map = {k: t for k in SPECIAL_NAMES if (t := _token_text(config.get(k)))}
        extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
        self.extra_special_tokens = [t for t in map(_token_text, extra if isinstance(extra, list) else []) if t]
        self._template = None

    def _id(self, name: str) -> int | None:
        text = self.special_tokens_map.get(name)
        return None if text is None else self.backend.token_to_id(text)

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens_map.get("eos_token")

    @property
    def pad_token(self) -> str | None:
        return self.special_tokens_map.get("pad_token")

    @pad_token.setter
    def pad_token(self, text: str) -> None:
        self.special_tokens_map["pad_token"] = text

    eos_token_id = property(lambda self: self._id("eos_token"))
    pad_token_id = property(lambda self: self._id("pad_token"))
    bos_token_id = property(lambda self: self._id("bos_token"))

    @property
    def all_special_tokens(self) -> list[str]:
        return list(dict.fromkeys([*self.special_tokens_map.values(), *self.extra_special_tokens]))

    @property
    def added_tokens_decoder(self) -> dict:
        return self.backend.get_added_tokens_decoder()

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __call__(self, text, add_special_tokens: bool = True, split_special_tokens: bool = False) -> dict:
        """``{"input_ids": ...}`` of one text or a list of them."""
        self.backend.encode_special_tokens = split_special_tokens
        if isinstance(text, str):
            return {"input_ids": self.backend.encode(text, add_special_tokens=add_special_tokens).ids}
        return {"input_ids": [e.ids for e in self.backend.encode_batch(list(text), add_special_tokens=add_special_tokens)]}

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(s, skip_special_tokens) for s in sequences]

    def apply_chat_template(self, messages: list[dict], tokenize: bool = False, add_generation_prompt: bool = False) -> str:
        """The chat rendered as transformers renders it: jinja2's immutable sandbox, blocks trimmed,
        ``loopcontrols``, a ``tojson`` that leaves non-ASCII as it is, ``raise_exception`` and
        ``strftime_now``, the special tokens as variables."""
        if tokenize:
            raise NotImplementedError("DirectTokenizer.apply_chat_template renders text only (tokenize=False)")
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template")
        if self._template is None:
            self._template = _compile(self.chat_template)
        chat = [{k: v for k, v in m.items() if v is not None} for m in messages]
        return self._template.render(messages=chat, tools=None, documents=None, add_generation_prompt=add_generation_prompt,
                                     **self.special_tokens_map)


def _compile(source: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env.from_string(source)


# ---------------------------------------------------------------------------------------- model --
class DirectRMSNorm(nn.Module):
    """weight · x / rms(x), the mean of squares taken in fp32 and the result cast back before the weight,
    the rounding of Llama's and Qwen2's norms (``model_adapter.RMS_NORMS`` fuses it)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.variance_epsilon = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


class DirectRotary(nn.Module):
    """The default rotary embedding: cos/sin [n, T, d] of positions [n, T], computed in fp32."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x, position_ids):
        freqs = position_ids[..., None].float() * self.inv_freq.to(x.device)  # [n, T, d/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


class _Linear(nn.Linear):
    """``nn.Linear`` built without initialising its weights: they are built on the meta device and then
    replaced by the folder's, and initialising a meta tensor runs PyTorch's reference implementation, whose first
    call imports ``torch._dynamo`` (0.5-1 s of a start-up)."""

    def reset_parameters(self) -> None:
        pass


class _Embedding(nn.Embedding):
    """``nn.Embedding`` built without initialising its weights (see ``_Linear``)."""

    def reset_parameters(self) -> None:
        pass


class _Attention(nn.Module):
    def __init__(self, c, qkv_bias: bool, o_bias: bool):
        super().__init__()
        d = c.head_dim
        self.q_proj = _Linear(c.hidden_size, c.num_attention_heads * d, bias=qkv_bias)
        self.k_proj = _Linear(c.hidden_size, c.num_key_value_heads * d, bias=qkv_bias)
        self.v_proj = _Linear(c.hidden_size, c.num_key_value_heads * d, bias=qkv_bias)
        self.o_proj = _Linear(c.num_attention_heads * d, c.hidden_size, bias=o_bias)
        self.scaling = d ** -0.5


class _MLP(nn.Module):
    def __init__(self, c, bias: bool):
        super().__init__()
        self.gate_proj = _Linear(c.hidden_size, c.intermediate_size, bias=bias)
        self.up_proj = _Linear(c.hidden_size, c.intermediate_size, bias=bias)
        self.down_proj = _Linear(c.intermediate_size, c.hidden_size, bias=bias)
        self.act_fn = nn.functional.silu

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class _Layer(nn.Module):
    def __init__(self, c, qkv_bias: bool, o_bias: bool, mlp_bias: bool):
        super().__init__()
        self.self_attn = _Attention(c, qkv_bias, o_bias)
        self.mlp = _MLP(c, mlp_bias)
        self.input_layernorm = DirectRMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = DirectRMSNorm(c.hidden_size, c.rms_norm_eps)


class DirectCausalLM(nn.Module):
    """The modules of a Llama / Qwen2 causal LM under transformers' names (``model.layers.0.self_attn.q_proj``,
    ``lm_head``), holding its weights for the fast engine, which computes the forward itself; no ``forward`` or
    ``generate`` of its own."""

    def __init__(self, config: SimpleNamespace, biases: tuple[bool, bool, bool], generation_config: SimpleNamespace,
                 rotary: DirectRotary):
        super().__init__()
        self.config, self.generation_config = config, generation_config
        c = config
        self.model = nn.Module()
        self.model.embed_tokens = _Embedding(c.vocab_size, c.hidden_size)
        self.model.layers = nn.ModuleList(_Layer(c, *biases) for _ in range(c.num_hidden_layers))
        self.model.norm = DirectRMSNorm(c.hidden_size, c.rms_norm_eps)
        self.model.rotary_emb = rotary  # built off the meta device: its arithmetic there would import torch._dynamo
        self.lm_head = _Linear(c.hidden_size, c.vocab_size, bias=False)
        if c.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight


QWEN2_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
"""The pre-tokenizer's split of transformers 5's ``Qwen2Tokenizer`` (``PRETOKENIZE_REGEX``)."""


def _qwen2_pipeline(backend, add_prefix_space: bool) -> bool:
    """Give ``backend`` the normalizer, pre-tokenizer and decoder that transformers 5's ``Qwen2Tokenizer`` builds
    around a byte-level BPE model; False where tokenizer.json's model is not one it would rebuild the same."""
    from tokenizers import Regex, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    model = backend.model
    if not isinstance(model, BPE) or model.byte_fallback or model.dropout or model.continuing_subword_prefix \
            or model.end_of_word_suffix or model.fuse_unk:
        return False
    if _adds_tokens(backend.post_processor):
        return False  # Qwen2Tokenizer's own post-processor adds none
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    return True


def _adds_tokens(post) -> bool:
    """Whether a post-processor adds tokens to an encoding (a template with special tokens, or one of another kind)."""
    if post is None or type(post).__name__ == "ByteLevel":
        return False
    state = json.loads(post.__getstate__())
    return not (state.get("type") == "TemplateProcessing" and not state.get("special_tokens"))


# ----------------------------------------------------------------------------------------- plan --
@dataclass(frozen=True)
class DirectFolder:
    """A folder ``plan`` found readable directly: what to build and from which files."""

    path: Path
    config: SimpleNamespace
    biases: tuple[bool, bool, bool]
    """q/k/v, o and MLP projections with a bias."""
    weight_files: tuple[Path, ...]
    tokenizer_config: dict
    chat_template: str | None
    eos_token_id: int | list[int] | None

    def tokenizer(self) -> DirectTokenizer | None:
        """The tokenizer as transformers 5 builds it from this folder, or None where this module cannot tell
        that it would be the same (then transformers loads it)."""
        from tokenizers import AddedToken, Tokenizer

        from posttrain.errors import PosttrainError

        try:
            backend = Tokenizer.from_file(str(self.path / "tokenizer.json"))
        except Exception as e:  # tokenizers raises a bare Exception for a file it cannot parse
            raise PosttrainError(f"could not read {self.path / 'tokenizer.json'}: {str(e).strip()[:160]}; the file is damaged: "
                                 "copy or fetch the model again") from None
        config = dict(self.tokenizer_config)
        if self.config.model_type == "qwen2" or str(config.get("tokenizer_class")).startswith("Qwen2Tokenizer"):
            # transformers gives every qwen2 folder its Qwen2Tokenizer, whatever tokenizer_config.json names: the
            # vocabulary and merges of tokenizer.json, its own normalizer, pre-tokenizer and decoder, and
            # <|endoftext|> for an unk, EOS and pad token the config does not name.
            if not _qwen2_pipeline(backend, bool(config.get("add_prefix_space"))):
                return None
            for name in ("unk_token", "eos_token", "pad_token"):
                config.setdefault(name, "<|endoftext|>")
        tok = DirectTokenizer(backend, config, self.chat_template, str(self.path))
        if any(backend.token_to_id(t) is None for t in tok.all_special_tokens):
            return None  # transformers would add it to the vocabulary
        # transformers (``_post_init``) makes every named and extra special token special, whatever tokenizer.json says
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tok.all_special_tokens])
        if tok.pad_token is None and tok.eos_token is not None:
            tok.pad_token = tok.eos_token  # as load_tokenizer does
        return tok

    def model(self, dtype: torch.dtype, device: torch.device) -> DirectCausalLM:
        """The model with its weights, read straight onto ``device`` and cast to ``dtype``, in eval mode."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from posttrain.errors import PosttrainError

        rotary = DirectRotary(self.config.head_dim, self.config.rope_theta).to(device)
        with torch.device("meta"):
            model = DirectCausalLM(self.config, self.biases, SimpleNamespace(eos_token_id=self.eos_token_id), rotary)
        tied = self.config.tie_word_embeddings
        state = {}
        try:
            for f in self.weight_files:
                for k, v in load_file(str(f), device=str(device)).items():  # cast a file at a time, not all at once
                    if not k.endswith("rotary_emb.inv_freq") and not (tied and k == "lm_head.weight"):
                        state[k] = v.to(dtype)
        except (OSError, SafetensorError) as e:
            raise PosttrainError(f"could not read the weights in {self.path}: {str(e).strip().splitlines()[0][:160]}; the files "
                                 "are damaged or incomplete: copy or fetch the model again") from None
        except torch.OutOfMemoryError:
            raise PosttrainError(f"the weights of {self.path} do not fit in {device}'s free memory in {dtype}: free it, or "
                                 "choose another --device or a smaller --dtype") from None
        model.load_state_dict(state, strict=not tied, assign=True)
        if tied:
            model.lm_head.weight = model.model.embed_tokens.weight
        model.requires_grad_(False)
        return model.eval()


def plan(path: str, *, engine: str = "auto", trust_remote_code: bool = False) -> DirectFolder | None:
    """The folder at ``path`` as a ``DirectFolder`` when posttrain can read it without transformers, the same
    way transformers reads it (see the module docstring); None to load it through transformers."""
    folder = Path(path)
    try:
        import posttrain.engine.fast  # noqa: F401  (the only engine that runs a DirectCausalLM)
    except ImportError:
        return None
    if engine == "hf" or trust_remote_code or not folder.is_dir() or (folder / "adapter_config.json").exists():
        return None
    try:
        return _plan(folder)
    except (TypeError, ValueError, AttributeError, KeyError):  # an entry of an unexpected type: transformers says what
        return None


def _plan(folder: Path) -> DirectFolder | None:
    cfg, tcfg = read_json_object(folder / "config.json"), read_json_object(folder / "tokenizer_config.json")
    if cfg is None or tcfg is None or not (folder / "tokenizer.json").is_file():
        return None
    config = _model_config(cfg)
    if config is None or tcfg.get("tokenizer_class") not in TOKENIZER_CLASSES or tcfg.get("clean_up_tokenization_spaces"):
        return None
    if tcfg.get("split_special_tokens") or not isinstance(tcfg.get("chat_template", ""), (str, type(None))):
        return None  # a default transformers applies to every call; a list of named templates
    if "add_bos_token" in tcfg or "add_eos_token" in tcfg:
        return None  # transformers may rebuild tokenizer.json's post-processor from these
    legacy = [f for f in ("special_tokens_map.json", "added_tokens.json") if (folder / f).exists()]
    if legacy and "added_tokens_decoder" not in tcfg:
        return None  # transformers merges those files' tokens into the config's
    try:
        template = _chat_template(folder, tcfg)
    except (OSError, UnicodeDecodeError):
        return None  # transformers' loading says what is wrong with it
    if template is not None and ("{% generation" in template or "{%- generation" in template):
        return None
    mt = config.model_type
    biases = (True, False, False) if mt == "qwen2" else (bool(cfg.get("attention_bias")), bool(cfg.get("attention_bias")),
                                                         bool(cfg.get("mlp_bias")))
    files = _weight_files(folder)
    if not files or not _weights_match(files, config, biases):
        return None
    gen = read_json_object(folder / "generation_config.json")
    # transformers: a readable generation_config.json's EOS (none if it names none), else config.json's
    eos = gen.get("eos_token_id") if gen is not None else cfg.get("eos_token_id")
    if listed_token_ids(eos) is None:
        return None  # transformers' loading says what is wrong with it
    return DirectFolder(folder, config, biases, files, tcfg, template, eos)


def _model_config(cfg: dict) -> SimpleNamespace | None:
    mt = cfg.get("model_type")
    if mt not in ARCHITECTURES or cfg.get("architectures") not in (None, [ARCHITECTURES[mt]]):
        return None
    if cfg.get("quantization_config") or cfg.get("auto_map") or cfg.get("hidden_act", "silu") != "silu":
        return None
    if mt == "qwen2" and cfg.get("use_sliding_window"):
        return None
    layer_types = cfg.get("layer_types") or []
    if not isinstance(layer_types, list) or any(t != "full_attention" for t in layer_types):
        return None
    rope = cfg.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        return None
    if cfg.get("rope_scaling") or rope.get("rope_type", "default") != "default" or set(rope) - {"rope_theta", "rope_type"}:
        return None
    try:
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        c = SimpleNamespace(
            model_type=mt, vocab_size=int(cfg["vocab_size"]), hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]), num_hidden_layers=int(cfg["num_hidden_layers"]),
            num_attention_heads=heads, num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads), rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))), hidden_act="silu",
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_position_embeddings=int(cfg["max_position_embeddings"]),  # base.py bounds the token budget by it
            sliding_window=None, use_sliding_window=False,
        )
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    if not all(math.isfinite(x) and x > 0 for x in (c.rms_norm_eps, c.rope_theta)):
        return None
    return c


def _chat_template(folder: Path, tcfg: dict) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = tcfg.get("chat_template")
    return template if isinstance(template, str) else None


def _weight_files(folder: Path) -> tuple[Path, ...]:
    single = folder / "model.safetensors"
    if single.is_file():
        return (single,)
    index = read_json_object(folder / "model.safetensors.index.json")
    names = sorted(set((index or {}).get("weight_map", {}).values()))
    files = tuple(folder / n for n in names)
    return files if files and all(f.is_file() and f.parent == folder for f in files) else ()


def _expected_shapes(c: SimpleNamespace, biases: tuple[bool, bool, bool]) -> dict[str, tuple[int, ...]]:
    d, hq, hkv, dm, di = c.head_dim, c.num_attention_heads, c.num_key_value_heads, c.hidden_size, c.intermediate_size
    shapes = {"model.embed_tokens.weight": (c.vocab_size, dm), "model.norm.weight": (dm,)}
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, dm)
    proj = {"self_attn.q_proj": (hq * d, dm, biases[0]), "self_attn.k_proj": (hkv * d, dm, biases[0]),
            "self_attn.v_proj": (hkv * d, dm, biases[0]), "self_attn.o_proj": (dm, hq * d, biases[1]),
            "mlp.gate_proj": (di, dm, biases[2]), "mlp.up_proj": (di, dm, biases[2]), "mlp.down_proj": (dm, di, biases[2])}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = shapes[p + "post_attention_layernorm.weight"] = (dm,)
        for name, (out, inp, bias) in proj.items():
            shapes[f"{p}{name}.weight"] = (out, inp)
            if bias:
                shapes[f"{p}{name}.bias"] = (out,)
    return shapes


def _weights_match(files: tuple[Path, ...], c: SimpleNamespace, biases: tuple[bool, bool, bool]) -> bool:
    """Whether the files hold exactly the architecture's tensors, in floating dtypes (headers only)."""
    from safetensors import SafetensorError, safe_open

    found: dict[str, tuple[int, ...]] = {}
    try:
        for f in files:
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    sl = h.get_slice(k)
                    if sl.get_dtype() not in ("BF16", "F16", "F32"):
                        return False
                    found[k] = tuple(sl.get_shape())
    except (OSError, SafetensorError, ValueError):
        return False
    found = {k: v for k, v in found.items() if not k.endswith("rotary_emb.inv_freq")}
    if c.tie_word_embeddings:
        found.pop("lm_head.weight", None)
    return found == _expected_shapes(c, biases)
