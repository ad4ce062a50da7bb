"""The posttrain command, run many times without paying the interpreter's start-up each time.

A multiprocessing fork server imports torch, transformers and posttrain's CLI once; each run is a
child forked from it (never reused: one child per run, ``max_tasks_per_child=1``) that does what
``python -m posttrain ARGS`` does after its imports: ``main(argv)`` in the given folder and
environment, its exit status, and what it writes to stdout and stderr, an uncaught exception's
traceback included. Not reproduced: what a new interpreter does before ``main`` (an import-time error
shows only in a real process; the bad-input test runs a few cases that way too) and at exit (atexit
handlers, threads that would keep it alive). On a 2-core CI machine a new interpreter spent 1-5 s
importing torch and transformers before each of the bad-input table's cases; a fork takes
milliseconds. The server runs no torch operation; torch's OpenMP threads, started at its import, do
not follow a fork (a child starts its own).
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor

PRELOAD = ["torch", "transformers", "peft", "posttrain.cli.main", "posttrain.cli.commands", "posttrain.engine.models",
           "posttrain.trainers.sft", "posttrain.trainers.rl"]


def pool(workers: int) -> ProcessPoolExecutor:
    """An executor whose every task runs in a new child of the preloaded fork server (a child that
    dies makes its task's result raise ``BrokenProcessPool``)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ProcessPoolExecutor(workers, mp_context=ctx, max_tasks_per_child=1)


def run(argv: list[str], cwd: str, env: dict[str, str], out: str, err: str) -> tuple[int, bool]:
    """``posttrain ARGV`` in folder ``cwd`` with environment ``env``; stdout and stderr go to the
    files ``out`` and ``err``. Returns the exit status the command would have, and whether torch was
    already imported (the fork server's preload worked)."""
    import traceback
    import warnings

    preloaded = "torch" in sys.modules
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    if env.get("PYTHONWARNINGS"):  # read by a new interpreter at start-up: applied here instead
        warnings.resetwarnings()
        for spec in env["PYTHONWARNINGS"].split(","):
            warnings.simplefilter(spec.strip())
    for fd, path in ((1, out), (2, err)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    sys.stdout = open(1, "w", closefd=False, buffering=1)
    sys.stderr = open(2, "w", closefd=False, buffering=1)
    sys.argv = ["posttrain", *argv]
    from posttrain.cli.main import main

    try:
        rc = main(argv)
    except SystemExit as e:  # as the interpreter turns one into an exit status
        if e.code is None or isinstance(e.code, int):
            rc = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            rc = 1
    except BaseException:
        traceback.print_exc()
        rc = 1
    sys.stdout.flush()
    sys.stderr.flush()
    return rc, preloaded
