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
    """(underlying type, is_list) for annotations like ``int | None`` or ``list[str]``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0]) if len(args) == 1 else (str, False)
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return (args[0] if args else str), True
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
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        elif is_list:
            parser.add_argument(flag, type=tp, action="append", default=argparse.SUPPRESS, help=help_text + " (repeatable)")
        else:
            parser.add_argument(flag, type=tp if tp in (int, float, str) else str, default=argparse.SUPPRESS, help=help_text)


def load_yaml(path: str | Path) -> dict:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise PosttrainError(f"config file not found: {path}")
    from posttrain.utils import open_text

    with open_text(path) as f:
        text = f.read()
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise PosttrainError(f"{path}{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise PosttrainError(f"{path}: a config file must be a mapping of option: value")
    return data


def build_config(cls, values: dict, source: str = "config"):
    """Instantiate ``cls`` from a dict, with clear errors for unknown keys and bad values."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - names)
    if unknown:
        raise PosttrainError(f"{source}: unknown option(s) {', '.join(unknown)}; valid options: {', '.join(sorted(names))}")
    hints = _hints(cls)
    clean = {}
    for key, value in values.items():
        tp, is_list = _base_type(hints[key])
        if is_list and value is not None and not isinstance(value, (list, tuple)):
            value = [value]
        try:
            if value is not None and tp in (int, float) and not is_list and not isinstance(value, bool):
                value = tp(value)
        except (TypeError, ValueError, OverflowError):
            raise PosttrainError(f"{source}: option {key} expects {tp.__name__}, got {value!r}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise PosttrainError(f"{source}: option {key} must be a finite number, got {value!r}")
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
