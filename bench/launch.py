"""How the start-up benchmarks (``eval_phases.py``, ``startup.py``, ``startup_ab.py``) launch posttrain in a
fresh process: the environment that puts one source tree first on the import path, and the
``python -m posttrain eval`` line of the GSM8K chat evaluation they time. No torch here: the launching
process stays light."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def code_env(code: Path | str, triton_cache: Path | str | None = None) -> dict:
    """This process's environment with source tree ``code`` first on PYTHONPATH (and, if given, its own
    Triton cache)."""
    path = [str(code)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    if triton_cache is not None:
        env["TRITON_CACHE_DIR"] = str(triton_cache)
    return env


def eval_command(model: str, data_dir: str, out: Path | str, new_tokens: int, batch: int, limit: int = 0,
                 python_flags: tuple[str, ...] = ()) -> list[str]:
    """``python [flags] -m posttrain eval`` on GSM8K test (chat prompts, no samples printed), the first
    ``limit`` problems (0: all), writing to ``out``."""
    return [sys.executable, *python_flags, "-m", "posttrain", "eval", "--model", model, "--task", "gsm8k", "--data-dir", data_dir,
            "--prompt-style", "chat", "--max-new-tokens", str(new_tokens), "--batch-size", str(batch), "--output", str(out),
            "--show-samples", "0"] + (["--limit", str(limit)] if limit else [])
