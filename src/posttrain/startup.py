"""Process start-up: a bytecode cache where the environment turned Python's off.

Images that set ``PYTHONDONTWRITEBYTECODE=1`` (many Docker images do, to stay small) make Python
compile from source, in every process, each module that shipped without its ``.pyc``. For torch,
transformers and what they pull in, that was 1,787 modules and 8.5 s of every ``posttrain`` start on
the GPU machines we measure on (cProfile of ``posttrain eval``: ``builtins.compile``; BENCHMARKS.md).

``enable_bytecode_cache`` (called first thing by the ``posttrain`` command) keeps the environment's
choice for the packages' own folders and caches posttrain's way instead: Python reads a module's
bytecode from beside its source when it is there, as usual, and otherwise from
``$POSTTRAIN_HOME/pycache`` (default ``~/.cache/posttrain/pycache``), where it also writes what it had
to compile. Nothing is written anywhere else. ``POSTTRAIN_BYTECODE_CACHE=0`` turns it off.
"""

from __future__ import annotations

import importlib.machinery as machinery
import os
import sys
from importlib.util import MAGIC_NUMBER

from posttrain.utils import cache_home


class _BesideOrCacheLoader(machinery.SourceFileLoader):
    """A source loader whose bytecode path (under ``sys.pycache_prefix``) falls back to the
    ``__pycache__`` beside the source, where the package's own bytecode lives."""

    def get_data(self, path):
        prefix = sys.pycache_prefix
        if prefix and path.endswith(".pyc") and path.startswith(prefix + os.sep):
            try:
                data = super().get_data(_beside(self.path, path))
                if _current(data, self.path):
                    return data
            except OSError:
                pass
        return super().get_data(path)


def _beside(source: str, cached: str) -> str:
    """The ``__pycache__`` path Python would use without a prefix for ``source``, same file name as
    ``cached`` (``name.cpython-312.pyc``, optimisation tags included)."""
    return os.path.join(os.path.dirname(source), "__pycache__", os.path.basename(cached))


def _current(pyc: bytes, source: str) -> bool:
    """Whether bytecode ``pyc`` was compiled by this Python from ``source`` as it is now (a stale one
    beside the source must not hide a current one in the cache). Hash-based files are left to
    Python's own check."""
    if len(pyc) < 16 or pyc[:4] != MAGIC_NUMBER:
        return False
    if int.from_bytes(pyc[4:8], "little") != 0:
        return True
    st = os.stat(source)
    return (int.from_bytes(pyc[8:12], "little") == int(st.st_mtime) & 0xFFFFFFFF
            and int.from_bytes(pyc[12:16], "little") == st.st_size & 0xFFFFFFFF)


def enable_bytecode_cache() -> str | None:
    """Install posttrain's bytecode cache when Python's own is off; returns its folder, or None when
    nothing was changed (bytecode writing on, turned off by POSTTRAIN_BYTECODE_CACHE=0, or the cache
    folder cannot be made)."""
    if not sys.dont_write_bytecode or sys.pycache_prefix or os.environ.get("POSTTRAIN_BYTECODE_CACHE", "1") == "0":
        return None
    folder = cache_home() / "pycache"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    if not os.access(folder, os.W_OK):
        return None
    details = [(machinery.ExtensionFileLoader, machinery.EXTENSION_SUFFIXES),
               (_BesideOrCacheLoader, machinery.SOURCE_SUFFIXES),
               (machinery.SourcelessFileLoader, machinery.BYTECODE_SUFFIXES)]
    hook = machinery.FileFinder.path_hook(*details)
    # Replace the standard file finder's hook (always present) and forget the finders it made.
    sys.path_hooks[:] = [hook if getattr(h, "__qualname__", "").startswith("FileFinder.path_hook") else h
                         for h in sys.path_hooks]
    sys.path_importer_cache.clear()
    sys.pycache_prefix = str(folder)
    sys.dont_write_bytecode = False
    return str(folder)
