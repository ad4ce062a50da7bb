"""Small shared helpers: atomic file writes, JSONL reading with line-accurate errors, seeding."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from posttrain.errors import PosttrainError


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is >= ``n`` (padded batch widths)."""
    return -(-n // multiple) * multiple


def cache_home() -> Path:
    """posttrain's own cache (fetched models, bytecode): $POSTTRAIN_HOME, else
    $XDG_CACHE_HOME/posttrain, else ~/.cache/posttrain."""
    if os.environ.get("POSTTRAIN_HOME"):
        return Path(os.environ["POSTTRAIN_HOME"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "posttrain"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: Path) -> None:
    """Give ``path`` (and, for a folder, everything in it) the modes a plain ``open``/``mkdir`` would:
    temp files and folders are created 0600/0700, whatever the user's umask."""
    mask = _umask()
    if path.is_dir():
        for p in [path, *path.rglob("*")]:
            p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)
    else:
        path.chmod(0o666 & ~mask)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8"):
    """Open a temp file beside ``path``; rename it over ``path`` only if the block succeeds.

    A crash or Ctrl-C inside the block leaves no half-written file behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        kwargs = {} if "b" in mode else {"encoding": encoding}
        with open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        honour_umask(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_write(path) as f:
        json.dump(obj, f, indent=2, default=str)
        f.write("\n")


def read_json_object(path: str | os.PathLike) -> dict | None:
    """A JSON object file's content; None when it is absent, unreadable, damaged or not an object."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def write_jsonl(path: str | os.PathLike, rows: list[dict]) -> None:
    with atomic_write(path) as f:
        for row in rows:
            f.write(json.dumps(row, default=str, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def open_text(path: str | os.PathLike, **kwargs):
    """Open a UTF-8 text file for reading; a file that is not UTF-8 text (binary, another encoding)
    raises a one-line PosttrainError naming it, wherever in the file the bad byte is."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8", **kwargs) as f:
            yield f
    except UnicodeDecodeError as e:
        raise PosttrainError(f"{path} is not UTF-8 text (byte {e.start} of a read block is {e.object[e.start:e.start + 1]!r}); "
                             "give a UTF-8 text file") from None
    except IsADirectoryError:
        raise PosttrainError(f"{path} is a folder; give a file") from None


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSONL file; a malformed line raises a PosttrainError naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise PosttrainError(f"file not found: {path}")
    rows = []
    with open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise PosttrainError(f"{path}:{lineno}: malformed JSON ({e.msg}); fix or remove that line") from None
            if not isinstance(row, dict):
                raise PosttrainError(f"{path}:{lineno}: expected a JSON object per line, got {type(row).__name__}")
            rows.append(row)
    return rows


def move_into_place(tmp: Path, target: Path, make_aside) -> None:
    """Rename the finished folder ``tmp`` to ``target``. An existing ``target`` (already judged
    replaceable by the caller) is first renamed into a fresh empty folder from ``make_aside()``, so
    ``target`` is always whole (old or new), then removed with it."""
    if not target.exists():
        os.replace(tmp, target)
        return
    aside = make_aside()
    os.replace(target, aside / target.name)
    os.replace(tmp, target)
    shutil.rmtree(aside, ignore_errors=True)


def check_writable(path: str | os.PathLike, flag: str = "--output", kind: str = "folder") -> Path:
    """Check, before any work and without leaving anything behind, that a ``kind`` ("folder" or
    "file") can be written at ``path``; one-line error otherwise."""
    path = Path(path)
    if kind == "folder" and path.exists() and not path.is_dir():
        raise PosttrainError(f"{flag} {path} is a file; give a folder")
    if kind == "file" and path.is_dir():
        raise PosttrainError(f"{flag} {path} is a folder; give a file path")
    existing = path if path.is_dir() else path.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise PosttrainError(f"{flag} {path}: {existing} is a file, so nothing can be written below it")
    try:
        _probe_write(existing)
    except OSError as e:
        raise PosttrainError(f"{flag} {path}: cannot write in {existing} ({e.strerror or type(e).__name__}); "
                             "choose a writable place") from None
    return path


def _probe_write(folder: Path) -> None:
    """Raise OSError unless a file can be created in ``folder`` (permissions, read-only mounts, root
    included, which ``os.access`` would not tell). On Linux the probe is an unnamed file (O_TMPFILE),
    so the folder never shows an entry that another posttrain process inspecting it at that instant
    would take for a user's; elsewhere, a temp folder made and removed at once."""
    tmpfile = getattr(os, "O_TMPFILE", None)
    if tmpfile is not None:
        try:
            os.close(os.open(folder, tmpfile | os.O_WRONLY, 0o600))
            return
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT):
                raise  # EACCES, EROFS, ...: the folder is not writable
    Path(tempfile.mkdtemp(prefix=".posttrain-probe-", dir=folder)).rmdir()


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def process_age_s() -> float | None:
    """Seconds since this process started (the kernel's start time, so interpreter start-up and every
    import count), or None where /proc is not available. What a user waits for is measured from here."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return time.clock_gettime(time.CLOCK_BOOTTIME) - int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def padded_chunks(lengths: list[int], budget: int) -> list[tuple[int, int]]:
    """Consecutive [start, stop) slices of rows whose padded size (rows × longest) stays within
    ``budget`` tokens, a row longer than it alone (prefill chunks, the update's pieces)."""
    out, start, longest = [], 0, 0
    for i, n in enumerate(lengths):
        if i > start and (i - start + 1) * max(longest, n) > budget:
            out.append((start, i))
            start, longest = i, 0
        longest = max(longest, n)
    if lengths:
        out.append((start, len(lengths)))
    return out
