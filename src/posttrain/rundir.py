"""Run folders: which folders posttrain may write into, one writer at a time, and its temp folders.

posttrain writes into a folder only when it is absent or empty, or when posttrain made it. What
posttrain made is read from the record it keeps in each of its folders, ``.posttrain-run.json``, by
the record's *content*: a format version, the run's id, the command that made the folder and every
entry (file or folder) posttrain created in it. A file of that name that is not such a record (empty,
a folder, JSON of another shape) proves nothing: the folder is then the user's. So:

* a folder is claimed only when absent, empty, or owned by a valid record (of the same command, to
  resume or rerun in it);
* ``--overwrite`` removes only the entries the record lists; anything else in the folder stays;
* ``--resume`` makes the same check; an output that is a symbolic link is judged by its target;
* an entry posttrain is about to write is first recorded, and refused when something of that name
  is already there that the record does not list.

One writer per folder: a run holds an exclusive ``fcntl`` lock on the folder's ``.posttrain.lock``
while it writes. A second process meets a one-line error; the kernel drops the lock of a process that
dies, so a lock file left by a killed run never blocks.

Folders built under a temporary name (merges, fetches, model folders) carry a small stamp with their
builder's pid; :func:`sweep_temp_folders` removes those whose builder is dead: what a killed merge or
fetch left behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import shutil
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from posttrain.errors import PosttrainError
from posttrain.utils import check_writable, honour_umask, move_into_place, write_json

RECORD = ".posttrain-run.json"
LOCK = ".posttrain.lock"
FORMAT = 1
KIND = "posttrain run folder"
_RUN_ID = re.compile(r"[0-9a-f]{32}")
_MAX_RECORD_BYTES = 1 << 20


# ------------------------------------------------------------------------------------- the record --
@dataclass
class Record:
    """What a folder's ``.posttrain-run.json`` says: posttrain made this folder and these entries."""

    command: str
    """The command that made the folder (sft, rl, pretrain, eval, pipeline, merge, fetch, ...)."""
    run_id: str = field(default_factory=lambda: secrets.token_hex(16))
    """A new id for every run that starts afresh (a resumed run keeps its id)."""
    created: list[str] = field(default_factory=list)
    """Entries (names directly in the folder) that posttrain created."""

    def to_json(self) -> dict:
        return {"kind": KIND, "format": FORMAT, "run_id": self.run_id, "command": self.command, "created": sorted(self.created)}

    @classmethod
    def parse(cls, data) -> Record | None:
        """The record ``data`` holds, or None when it is not exactly what posttrain writes."""
        if not isinstance(data, dict) or data.get("kind") != KIND or data.get("format") != FORMAT:
            return None
        run_id, command, created = data.get("run_id"), data.get("command"), data.get("created")
        if not (isinstance(run_id, str) and _RUN_ID.fullmatch(run_id) and isinstance(command, str) and command.isidentifier()):
            return None
        if not isinstance(created, list) or not all(_plain_name(n) for n in created):
            return None
        return cls(command, run_id, list(created))


def _plain_name(name) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..", RECORD, LOCK) and "/" not in name and "\0" not in name


def read_record(folder: Path) -> Record | None:
    """The valid record in ``folder``, else None (no record, or one posttrain did not write)."""
    f = Path(folder) / RECORD
    try:
        if f.is_symlink() or not f.is_file() or f.stat().st_size > _MAX_RECORD_BYTES:
            return None
        return Record.parse(json.loads(f.read_text(encoding="utf-8")))
    except (OSError, ValueError, UnicodeDecodeError):
        return None


# ---------------------------------------------------------------------------------- the verdict --
@dataclass
class Folder:
    """What is at a path, as far as writing there goes."""

    path: Path
    """The path as given."""
    target: Path
    """Where writes land (a symbolic link's target)."""
    state: str
    """absent, empty, ours (a valid record) or foreign."""
    record: Record | None = None
    unlisted: list[str] = field(default_factory=list)
    """Entries of an owned folder its record does not list: the user's, never removed."""


def inspect(path: str | os.PathLike, flag: str = "--output") -> Folder:
    """Look at ``path`` without changing anything; one-line error for what can never be a folder."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise PosttrainError(f"{flag} {path} is a symbolic link to {os.readlink(path)}, which does not exist; "
                             f"create that folder or choose another {flag}")
    target = path.resolve()
    if not target.exists():
        return Folder(path, target, "absent")
    if not target.is_dir():
        raise PosttrainError(f"{flag} {path} is a file; give a folder")
    try:
        names = sorted(os.listdir(target))
    except OSError as e:
        raise PosttrainError(f"{flag} {path}: cannot read the folder ({e.strerror}); choose another {flag}") from None
    record = read_record(target)
    entries = [n for n in names if n != LOCK and not (record and n == RECORD) and not _record_being_written(n)]
    if record is None:
        return Folder(path, target, "foreign" if entries else "empty")
    return Folder(path, target, "ours", record, [n for n in entries if n not in record.created])


def _record_being_written(name: str) -> bool:
    """The temp file of a record being written this instant (utils.atomic_write's name for it): a
    folder that another posttrain process is claiming is not the user's for that."""
    return name.startswith(f".{RECORD}.") and name.endswith(".tmp")


def _listing(names: list[str], limit: int = 3) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


# ----------------------------------------------------------------------------------- the run dir --
_HELD: dict[Path, int] = {}  # folder -> lock fd, for every folder this process holds the lock of
_PROVISIONAL: list[RunDir] = []  # runs of this process that made nothing worth keeping yet (see discard_provisional)


class RunDir:
    """A folder this process writes: checked (:meth:`check`), locked (:meth:`lock`), recorded
    (:meth:`start`, :meth:`own`). ``RunDir.open`` does all three for single-process commands; a
    distributed trainer checks on every rank, locks and records on the main one.

        run = RunDir.open("runs/x", "sft", resume=cfg.resume, overwrite=cfg.overwrite)
        path = run.entry("metrics.jsonl")      # recorded before it is written
        ...
        run.release()
    """

    def __init__(self, path: str | os.PathLike, command: str, flag: str = "--output"):
        self.path, self.command, self.flag = Path(path), command, flag
        self.record: Record | None = None
        self.plan: str | None = None
        self.folder: Folder | None = None
        self._check_args: dict = {}
        self._fd: int | None = None
        self._made_folder = False
        self._made_lock = False

    @classmethod
    def open(cls, path, command: str, *, flag: str = "--output", **check_args) -> RunDir:
        run = cls(path, command, flag)
        run.check(**check_args)
        run.lock()
        run.start()
        return run

    # -- checking ----------------------------------------------------------------------------------
    def check(self, *, resume: bool = False, overwrite: bool = False, rerun: bool = False, expect=()) -> str:
        """May this command write here? Nothing is written. Returns the plan: ``new`` (absent or empty
        folder), ``resume`` (continue the run in it), ``overwrite`` (remove what the record lists, start
        afresh) or ``rerun`` (``rerun=True``: an owned folder of this command is written again). One-line
        PosttrainError otherwise. ``expect``: entries the run will write, checked now rather than when
        it gets to them."""
        self._check_args = dict(resume=resume, overwrite=overwrite, rerun=rerun, expect=tuple(expect))
        check_writable(self.path, self.flag)
        here = inspect(self.path, self.flag)
        where = f"{self.flag} {self.path}"
        if here.state == "foreign":
            raise PosttrainError(f"{where} holds files posttrain did not write ({_listing(sorted(os.listdir(here.target)))}); "
                                 f"posttrain writes only into a new or empty folder, or one it made. Choose another {self.flag}")
        if here.state in ("absent", "empty"):
            plan = "new"
        else:
            made_by = here.record.command
            if overwrite:
                linked = [n for n in here.record.created if (here.target / n).is_symlink()]
                if linked:
                    raise PosttrainError(f"--overwrite: {here.target / linked[0]} is a symbolic link, which posttrain never "
                                         "makes; remove it yourself or choose another " + self.flag)
                plan = "overwrite"
            elif made_by != self.command:
                raise PosttrainError(f"{where} holds a posttrain {made_by} run; posttrain {self.command} writes only into "
                                     f"a new folder or its own: choose another {self.flag}")
            elif resume:
                plan = "resume"
            elif rerun:
                plan = "rerun"
            else:
                raise PosttrainError(f"{where} already holds a run; pass --resume to continue it or --overwrite to start afresh")
            clash = [n for n in expect if n in here.unlisted]
            if clash:
                raise PosttrainError(f"{here.target / clash[0]} was not written by posttrain (the folder's record does not "
                                     f"list it) and this run would write there; move it away or choose another {self.flag}")
        self.plan, self.folder = plan, here
        return plan

    # -- locking -----------------------------------------------------------------------------------
    def lock(self) -> None:
        """Make the folder if absent and take its lock; then check again (a run that held the lock
        before may have changed the folder)."""
        target = self.path.resolve()
        self._made_folder = self._made_folder or not target.exists()
        try:
            target.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise PosttrainError(f"{self.flag} {self.path}: cannot create the folder ({e.strerror}); choose a writable place") from None
        if target in _HELD:  # an earlier run of this process that ended without releasing it
            self._fd = _HELD[target]
        else:
            try:
                self._made_lock = self._made_lock or not os.path.lexists(target / LOCK)
                fd = os.open(target / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
            except OSError as e:
                raise PosttrainError(f"{self.flag} {self.path}: cannot create its lock file {LOCK} ({e.strerror}); "
                                     f"choose a writable {self.flag}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.pread(fd, 64, 0).decode("ascii", "replace").split()
                os.close(fd)
                who = f" (pid {holder[0]})" if holder else ""
                raise PosttrainError(f"another posttrain process{who} is writing to {self.path}; wait for it to end, "
                                     f"or choose another {self.flag}") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
            self._fd = _HELD[target] = fd
        if self.plan in ("new", "overwrite") and self not in _PROVISIONAL:
            _PROVISIONAL.append(self)
        self.check(**self._check_args)

    def keep(self) -> None:
        """The run made something worth keeping (a step, a result): a failure no longer discards it
        (nor does one after :meth:`release`)."""
        if self in _PROVISIONAL:
            _PROVISIONAL.remove(self)

    def discard(self) -> None:
        """Undo a new run that failed before it made anything worth keeping: remove the entries it
        recorded, its record and lock, and the folder if this run made it. A failed first attempt
        leaves nothing behind, so nothing blocks the corrected rerun."""
        target = self.path.resolve()
        record = read_record(target) if self.record is not None else None
        if record is not None and record.run_id == self.record.run_id:
            for name in record.created:
                entry = target / name
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                elif os.path.lexists(entry):
                    entry.unlink()
            (target / RECORD).unlink(missing_ok=True)
        if self._fd is not None:
            if self._made_lock:  # a lock file an earlier run left stays: it was there before this one
                (target / LOCK).unlink(missing_ok=True)
        self.release()
        if self._made_folder:
            with contextlib.suppress(OSError):
                target.rmdir()  # only if empty

    def release(self) -> None:
        """The run is done: let the next writer in (the lock file stays; it blocks nobody)."""
        self.keep()
        target = self.path.resolve()
        if self._fd is not None and _HELD.get(target) == self._fd:
            del _HELD[target]
            os.close(self._fd)
        self._fd = None

    # -- recording ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Under the lock: carry out the plan. ``overwrite`` removes the entries the record lists and
        starts a new record; ``new`` writes one; ``resume`` and ``rerun`` keep the folder's."""
        if self._fd is None:
            raise RuntimeError("RunDir.start before RunDir.lock")
        here = self.folder
        if self.plan in ("resume", "rerun"):
            self.record = here.record
            return
        if self.plan == "overwrite":
            for name in here.record.created:
                entry = here.target / name
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                elif os.path.lexists(entry):
                    entry.unlink()
            if here.unlisted:
                print(f"note: --overwrite kept what posttrain did not write in {self.path}: {_listing(here.unlisted)}")
        self.record = Record(self.command)
        self._write()

    def own(self, *names: str) -> None:
        """Record ``names`` as this run's before they are written; refuse a name that something
        posttrain did not write already holds."""
        if self.record is None:
            raise RuntimeError("RunDir.own before RunDir.start")
        target = self.path.resolve()
        new = [n for n in dict.fromkeys(names) if n not in self.record.created]
        for name in new:
            if not _plain_name(name):
                raise ValueError(f"not an entry name: {name!r}")
            if os.path.lexists(target / name):
                raise PosttrainError(f"{target / name} was not written by posttrain and this run would write there; "
                                     f"move it away (or choose another {self.flag}) and run again")
        if new:
            self.record.created += new
            self._write()

    def entry(self, name: str) -> Path:
        """``path / name``, recorded as this run's (see :meth:`own`)."""
        self.own(name)
        return self.path / name

    def lists(self, name: str) -> bool:
        """Whether the record says posttrain wrote ``name`` here."""
        return self.record is not None and name in self.record.created

    def _write(self) -> None:
        write_json(self.path.resolve() / RECORD, self.record.to_json())


def discard_provisional() -> None:
    """After a failure: :meth:`RunDir.discard` every run of this process that made nothing worth
    keeping yet (the CLI calls this when a command fails)."""
    for run in list(_PROVISIONAL):
        run.discard()


def owned_entry(folder: str | os.PathLike, name: str, command: str | None = None) -> bool:
    """Whether ``folder/name`` is something posttrain wrote: the folder's valid record (of
    ``command``, when given) lists it, and it is there. What a later run may reuse or replace."""
    record = read_record(Path(folder))
    return (record is not None and (command is None or record.command == command) and name in record.created
            and os.path.lexists(Path(folder) / name))


# -------------------------------------------------------------------------------- temp folders --
STAMP = ".posttrain-temp.json"
_TEMP_KIND = "posttrain temp folder"


def _process_start(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), None where /proc cannot tell."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int, start: int | None) -> bool:
    """Whether the process that was ``pid`` (started at ``start``) still runs; a reused pid is not it."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    now = _process_start(pid)
    return start is None or now is None or now == start


def make_temp_folder(parent: str | os.PathLike, name: str) -> Path:
    """A hidden folder ``parent/.NAME.posttrain-tmp-PID-XXXX``, stamped with this process's pid and
    start time so that :func:`sweep_temp_folders` can tell when it was left by a process that died."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.posttrain-tmp-{os.getpid()}-", dir=parent))
    write_json(tmp / STAMP, {"kind": _TEMP_KIND, "for": name, "pid": os.getpid(), "start": _process_start(os.getpid()),
                             "host": socket.gethostname()})
    return tmp


def sweep_temp_folders(parent: str | os.PathLike, name: str, say=print) -> list[Path]:
    """Remove the temp folders for ``name`` in ``parent`` (see :func:`make_temp_folder`) whose stamp is
    valid and whose builder, on this host, is dead. Returns what was removed."""
    parent, gone = Path(parent), []
    if not parent.is_dir():
        return gone
    for tmp in parent.glob(f".{glob_escape(name)}.posttrain-tmp-*"):
        if tmp.is_symlink() or not tmp.is_dir():
            continue
        try:
            stamp = json.loads((tmp / STAMP).read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError):
            continue
        if not (isinstance(stamp, dict) and stamp.get("kind") == _TEMP_KIND and stamp.get("for") == name
                and isinstance(stamp.get("pid"), int) and stamp.get("host") == socket.gethostname()
                and tmp.name.startswith(f".{name}.posttrain-tmp-{stamp['pid']}-")):
            continue
        if _alive(stamp["pid"], stamp.get("start")):
            continue
        shutil.rmtree(tmp, ignore_errors=True)
        say(f"note: removed {tmp}, left by an interrupted posttrain run (pid {stamp['pid']})")
        gone.append(tmp)
    return gone


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def check_new_folder(path: str | os.PathLike, command: str, *, replace: bool = False, flag: str = "--output") -> None:
    """Whether :func:`atomic_folder` may put a folder at ``path`` (one-line error if not): ``path`` is
    absent or empty, or, with ``replace``, a folder ``command`` made whose record lists everything in it."""
    path = Path(path)
    check_writable(path, flag)
    here = inspect(path, flag)
    if here.state == "foreign":
        raise PosttrainError(f"{flag} {path} already exists and posttrain did not write it; posttrain will not "
                             f"replace it. Choose a new folder (or delete it yourself)")
    if here.state == "ours" and not (replace and here.record.command == command and not here.unlisted):
        why = (f"it holds files posttrain did not write ({_listing(here.unlisted)})" if here.unlisted and replace
               else f"it holds a posttrain {here.record.command} output")
        raise PosttrainError(f"{flag} {path} already exists and {why}; posttrain will not replace it. "
                             f"Choose a new folder (or delete it yourself)")


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, command: str, *, replace: bool = False, flag: str = "--output") -> Iterator[Path]:
    """Build a folder under a temp name, record everything in it as posttrain's, and move it into
    place when the block succeeds: a kill leaves either nothing new or the whole folder (and a
    stamped temp folder that the next run's sweep removes).

    ``path`` must pass :func:`check_new_folder` (before the block runs, and again before the swap)."""
    path = Path(path)
    check_new_folder(path, command, replace=replace, flag=flag)
    target = path.resolve()
    sweep_temp_folders(target.parent, target.name)
    tmp = make_temp_folder(target.parent, target.name)
    try:
        yield tmp
        (tmp / STAMP).unlink()
        write_json(tmp / RECORD, Record(command, created=sorted(os.listdir(tmp))).to_json())
        honour_umask(tmp)
        check_new_folder(path, command, replace=replace, flag=flag)
        move_into_place(tmp, target, lambda: make_temp_folder(target.parent, target.name))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
