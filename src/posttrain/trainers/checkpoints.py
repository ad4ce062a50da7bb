"""What a run saves: ``checkpoints/step-N`` folders (atomic, checksummed, rotated) to resume from, and
the final model as a standard HF folder."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import zlib
from pathlib import Path

from posttrain.errors import PosttrainError
from posttrain.utils import honour_umask, write_json


class Checkpoints:
    """``OUTPUT/checkpoints/step-N`` folders written atomically (temp folder, then rename).

    Each holds the accelerate state (model, optimizer, scheduler, RNG), ``trainer_state.json`` and,
    written last, ``manifest.json`` (every file's size and CRC-32). A kill during a save leaves only a
    hidden temp folder, never a ``step-N``; a ``step-N`` damaged later (truncated, zeroed, flipped
    bytes, a file missing) fails its manifest, and resuming goes back to the newest intact one.
    """

    MANIFEST = "manifest.json"

    def __init__(self, output: Path, keep: int):
        self.root = output / "checkpoints"
        self.keep = keep

    def _done(self) -> list[Path]:
        """Checkpoints that finished saving, oldest first (``step-N`` folders: anything else in
        ``checkpoints/`` is not posttrain's and left alone)."""
        if not self.root.is_dir():
            return []
        return sorted((p for p in self.root.glob("step-*") if STEP.fullmatch(p.name) and p.is_dir() and not p.is_symlink()
                       and (p / "trainer_state.json").exists()), key=lambda p: int(p.name.split("-")[1]))

    def latest(self) -> Path | None:
        done = self._done()
        return done[-1] if done else None

    @classmethod
    def damage(cls, path: Path) -> str | None:
        """What is wrong with a checkpoint folder, or None when it matches its manifest."""
        manifest = path / cls.MANIFEST
        if not manifest.exists():
            return f"no {cls.MANIFEST}"
        try:
            files = json.loads(manifest.read_text())["files"]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError, OSError):
            return f"{cls.MANIFEST} is unreadable"
        if not (isinstance(files, dict) and all(isinstance(w, dict) and isinstance(w.get("size"), int)
                                                and isinstance(w.get("crc32"), int) for w in files.values())):
            return f"{cls.MANIFEST} is not one posttrain wrote"
        for name, want in files.items():
            f = path / name
            if ".." in Path(name).parts or Path(name).is_absolute():
                return f"{cls.MANIFEST} names a file outside the checkpoint"
            if not f.is_file():
                return f"{name} is missing"
            if f.stat().st_size != want["size"]:
                return f"{name} has {f.stat().st_size} bytes, not {want['size']}"
            if _crc32(f) != want["crc32"]:
                return f"{name} does not match its checksum"
        return None

    @staticmethod
    def only_trainable(accelerator, model) -> None:
        """Checkpoint only trainable weights: a LoRA checkpoint is megabytes, not the whole base model."""
        names = {n for n, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad}

        def hook(models, weights, output_dir):
            for w in weights:
                for k in list(w):
                    if k.removeprefix("module.") not in names:
                        del w[k]

        accelerator.register_save_state_pre_hook(hook)

    def clear_unfinished(self) -> None:
        """Remove temp folders of saves that a kill interrupted (ours: hidden ``.step-N.tmp``)."""
        for tmp in self.root.glob(".step-*.tmp") if self.root.exists() else []:
            shutil.rmtree(tmp, ignore_errors=True)

    def save(self, accelerator, step: int, state: dict) -> Path:
        target = self.root / f"step-{step}"
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)
        accelerator.wait_for_everyone()
        # Every rank writes its own RNG state into the same folder, so it must be the same path on
        # all ranks: save into a shared temp name, then rank 0 renames it.
        tmp = self.root / f".step-{step}.tmp"
        if accelerator.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp), safe_serialization=True)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_json(tmp / "trainer_state.json", state)
            files = {str(f.relative_to(tmp)): {"size": f.stat().st_size, "crc32": _crc32(f)}
                     for f in sorted(tmp.rglob("*")) if f.is_file()}
            write_json(tmp / self.MANIFEST, {"files": files})  # last: its presence means the rest is whole
            honour_umask(tmp)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
            self._rotate()
        accelerator.wait_for_everyone()
        return target

    def load(self, accelerator, path: Path) -> dict:
        accelerator.load_state(str(path), strict=False)
        state = json.loads((path / "trainer_state.json").read_text())
        if not (isinstance(state, dict) and isinstance(state.get("step"), int) and state["step"] >= 0):
            raise ValueError("trainer_state.json holds no step")
        return state

    def resume(self, accelerator, say=print) -> tuple[Path | None, dict]:
        """Load the newest checkpoint that is intact and loads; one that fails to load (a damaged
        pickle its manifest was written over, a file of another format) is reported and skipped like a
        damaged one. (None, {}) when there is none; one-line error when every one is unusable."""
        done = self._done()
        for path in reversed(done):
            problem = self.damage(path)
            if problem is None:
                try:
                    return path, self.load(accelerator, path)
                except (OSError, ValueError, RuntimeError, KeyError, TypeError, EOFError, pickle.UnpicklingError) as e:
                    problem = f"it does not load: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:120]}"
            say(f"warning: checkpoint {path} is damaged ({problem}); trying an older one")
        if done:
            raise PosttrainError(f"every checkpoint in {self.root} is damaged; nothing to resume from. "
                                 f"Start afresh with --overwrite")
        return None, {}

    def _rotate(self) -> None:
        if self.keep <= 0:
            return
        for old in self._done()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)


STEP = re.compile(r"step-[0-9]+")  # a checkpoint's folder name


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            crc = zlib.crc32(block, crc)
    return crc


def save_final_model(model, tokenizer, output: Path, accelerator, extra: dict | None = None, own=None) -> None:
    """A standard HF folder in ``output``: PEFT adapter (LoRA) or full model, plus the tokenizer.
    ``own(*names)`` (``RunDir.own``) records each top-level name before it is written and refuses one
    that something posttrain did not write holds."""
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    state_dict = accelerator.get_state_dict(model)  # gathers full weights under FSDP
    if accelerator.is_main_process:
        own = own or (lambda *names: None)
        # The files are written into a staging folder the run's record names (so a run killed while
        # saving leaves only that, which the next save clears), then moved to the top of the output.
        own("model.tmp-final")
        final = output / "model.tmp-final"
        shutil.rmtree(final, ignore_errors=True)  # ours (recorded), left by a run killed while saving
        final.mkdir()
        unwrapped.save_pretrained(final, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(final)
        if extra:
            write_json(final / "posttrain.json", extra)
        honour_umask(final)
        own(*sorted(f.name for f in final.iterdir()))  # every name checked before any file moves
        # Move the finished files to the top of the output folder (where users look for them).
        for f in final.iterdir():
            dest = output / f.name
            if dest.is_dir():
                shutil.rmtree(dest)
            os.replace(f, dest)
        final.rmdir()
    accelerator.wait_for_everyone()
