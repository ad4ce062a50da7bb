"""Configs: documented dataclasses, filled from defaults, then a YAML file, then CLI flags.

Each config field carries a docstring right under it (cleanrl style); :func:`field_docs` reads them
from the source so ``--help`` shows the same text a reader sees in the code.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import math
import textwrap
import types
import typing
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from posttrain.errors import PosttrainError


@lru_cache(maxsize=None)
def field_docs(cls) -> dict[str, str]:
    """Map field name -> its help text: the string literal written under the field in the class body
    (of the class that declares it, or of a subclass that redeclares it), or the wording a class gives
    an inherited field in its ``HELP`` mapping (a command's own phrasing of a shared option)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            tree = None
        body = tree.body[0].body if tree is not None else []  # type: ignore[attr-defined]
        for prev, node in zip(body, body[1:]):
            if (isinstance(prev, ast.AnnAssign) and isinstance(prev.target, ast.Name)
                    and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
                    and isinstance(node.value.value, str)):
                docs[prev.target.id] = " ".join(node.value.value.split())
        docs.update(vars(klass).get("HELP", {}))
    return docs


def _base_type(tp) -> tuple[Any, bool]:
    """(underlying type, is_list) for annotations like ``int | None`` or ``list[str]``: what argparse parses."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0]) if len(args) == 1 else (str, False)
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return (args[0] if args else str), True
    if origin is typing.Literal:
        return type(typing.get_args(tp)[0]), False
    return tp, False


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def add_dataclass_args(parser: argparse.ArgumentParser, cls, exclude: tuple[str, ...] = ()) -> None:
    """Add ``--field-name`` for each field; defaults are suppressed so only given flags override."""
    docs, hints = field_docs(cls), _hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in exclude or not f.init:
            continue
        tp, is_list = _base_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        help_text = docs.get(f.name, "")
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
        help_text = f"{help_text} (default: {default})".replace("%", "%%")
        choices = _choices(hints[f.name])
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        elif is_list:
            parser.add_argument(flag, type=tp, action="append", default=argparse.SUPPRESS, help=help_text + " (repeatable)")
        else:
            parser.add_argument(flag, type=tp if tp in (int, float, str) else str, default=argparse.SUPPRESS, help=help_text,
                                **({"choices": choices} if choices else {}))


def _choices(tp) -> tuple | None:
    """The values a ``Literal[...]`` annotation (or ``Literal[...] | None``) allows, else None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _choices(args[0]) if len(args) == 1 else None
    return typing.get_args(tp) if typing.get_origin(tp) is typing.Literal else None


# ------------------------------------------------------------------------------------------ YAML --
class _DuplicateKey(Exception):
    def __init__(self, key, mark):
        self.key, self.mark = key, mark


@lru_cache(maxsize=None)
def _yaml_loader():
    """PyYAML's safe loader with YAML 1.2's plain scalars: booleans are true/false only (``no``, ``off``
    and ``yes`` stay text), ``1e-5`` is a number, ``010`` is ten, dates stay text; a key given twice in
    one mapping is an error instead of the last one silently winning."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                if isinstance(key, typing.Hashable):
                    if key in seen:
                        raise _DuplicateKey(key, key_node.start_mark)
                    seen.add(key)
            return super().construct_mapping(node, deep)

        def construct_yaml_int(self, node):
            text = self.construct_scalar(node).replace("_", "")
            sign = -1 if text.startswith("-") else 1
            text = text.lstrip("+-")
            base = 16 if text.startswith("0x") else 8 if text.startswith("0o") else 10
            return sign * int(text[2:] if base != 10 else text, base)

    dropped = {"tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float", "tag:yaml.org,2002:timestamp"}
    Loader.yaml_implicit_resolvers = {k: [(tag, rx) for tag, rx in v if tag not in dropped]
                                      for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
    Loader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?[0-9][0-9_]*|[-+]?0x[0-9a-fA-F_]+|[-+]?0o[0-7_]+)$"),
                                 list("-+0123456789"))
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(
        r"^(?:[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"), list("-+0123456789."))
    Loader.add_constructor("tag:yaml.org,2002:int", Loader.construct_yaml_int)
    return Loader


def load_yaml(path: str | Path) -> dict:
    """A YAML config file as a dict of option: value (see ``_yaml_loader`` for how plain values read)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise PosttrainError(f"config file not found: {path}")
    from posttrain.utils import open_text

    with open_text(path) as f:
        text = f.read()
    try:
        data = yaml.load(text, Loader=_yaml_loader()) or {}
    except _DuplicateKey as e:
        raise PosttrainError(f"{path}:{e.mark.line + 1}: option {e.key} is given twice in the same mapping; keep one") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise PosttrainError(f"{path}{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise PosttrainError(f"{path}: a config file must be a mapping of option: value")
    return data


# ------------------------------------------------------------------------------- typed values --
def _describe(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(map(str, args))
    if origin in (list, tuple):
        return f"a list of {_describe(args[0]) if args else 'values'}"
    return {bool: "true or false", int: "int (a whole number)", float: "a number", str: "text", dict: "a mapping of option: value",
            type(None): "null"}.get(tp, getattr(tp, "__name__", str(tp)))


def _what(value) -> str:
    if isinstance(value, str):
        return f"the text {value!r}"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, (int, float)):
        return f"{value!r} (a number)"
    return f"{value!r} ({'a list' if isinstance(value, list) else 'a mapping' if isinstance(value, dict) else type(value).__name__})"


class _Mismatch(Exception):
    pass


def convert(value, tp):
    """``value`` as the annotation ``tp`` asks: booleans only from booleans, whole numbers for ints
    (3.0 is 3, 2.9 is refused), ints or floats for floats (finite), text for str, a list (or one
    value, as a list of one) for lists, a listed value for ``Literal``. Raises ``_Mismatch``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return convert(value, arg)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is typing.Literal:
        if any(type(value) is type(a) and value == a for a in args):
            return value
        raise _Mismatch
    if origin in (list, tuple):
        items = value if isinstance(value, (list, tuple)) else [value]
        return [convert(v, args[0]) if args else v for v in items]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
        raise _Mismatch
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            return value
        raise _Mismatch
    return value


def _fix(tp, value) -> str:
    """What to do about a value of the wrong type."""
    base, _ = _base_type(tp)
    if isinstance(value, str) and base in (bool, int, float):
        return "write the value without quotes" + ("" if base is not bool else " (true or false)")
    if base is int and isinstance(value, float):
        return "give a whole number"
    if base is str and not isinstance(value, (list, dict)):
        return "put the value in quotes if you mean it as text"
    return "fix the value"


def build_config(cls, values: dict, source: str = "config"):
    """Instantiate ``cls`` from a dict: every value converted to and checked by its field's type
    (see :func:`convert`), with one-line errors naming ``source`` (the file), the option and what to do."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - names)
    if unknown:
        raise PosttrainError(f"{source}: unknown option(s) {', '.join(map(str, unknown))}; valid options: {', '.join(sorted(names))}")
    hints = _hints(cls)
    clean = {}
    for key, value in values.items():
        try:
            value = convert(value, hints[key])
        except _Mismatch:
            raise PosttrainError(f"{source}: option {key} expects {_describe(hints[key])}, got {_what(value)}; "
                                 f"{_fix(hints[key], value)}") from None
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, float) and not math.isfinite(v):
                raise PosttrainError(f"{source}: option {key} must be a finite number, got {v!r}")
        clean[key] = value
    return cls(**clean)


def config_from_args(cls, ns: argparse.Namespace, config_file: str | None = None, base: dict | None = None):
    """defaults < ``base`` < YAML file < CLI flags."""
    values = dict(base or {})
    if config_file:
        values.update(load_yaml(config_file))
    names = {f.name for f in dataclasses.fields(cls)}
    values.update({k: v for k, v in vars(ns).items() if k in names})
    return build_config(cls, values, source=config_file or "options")


def require(cfg, checks: dict[str, bool], command: str = "") -> None:
    """Raise a one-line error naming the first option whose check failed."""
    for name, ok in checks.items():
        if not ok:
            raise PosttrainError(f"invalid {name}={getattr(cfg, name)!r}" + (f" (see posttrain {command} --help)" if command else ""))



# ------------------------------------------------------------------------------ shared records --
@dataclass(kw_only=True)
class StageOptions:
    """What every stage of the story names: the model, the task and its data, the prompt template
    (evaluation, the trainers and the pipeline share these)."""

    model: str = "models/nano-gsm"
    """Hub id or local folder of the model."""
    task: str = "gsm_symbolic"
    """gsm8k, gsm_symbolic, a .jsonl/.csv/.parquet file, or hf:org/dataset."""
    data_dir: str | None = None
    """Folder with OpenAI's GSM8K train.jsonl/test.jsonl (otherwise the hub is tried)."""
    prompt_style: str = "plain"
    """plain, chat, fewshot, or a template name such as gsm8k_plain_v1."""


@dataclass(kw_only=True)
class LoadOptions:
    """How a model is loaded (evaluation and the trainers share these)."""

    dtype: str = "auto"
    """auto (bf16 on GPU, fp32 on CPU), bf16, fp16 or fp32."""
    trust_remote_code: bool = False
    """Allow model repos to run their own code (off unless you trust the repo)."""
