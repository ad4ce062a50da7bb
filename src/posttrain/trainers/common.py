"""What every trainer needs: model set-up (LoRA/QLoRA/full), optimizer and schedule, rank-aware
logging, atomic checkpoints with resume, and graceful stops on Ctrl-C/SIGTERM."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import signal
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from posttrain.config import require
from posttrain.errors import PosttrainError
from posttrain.rundir import RunDir, inspect
from posttrain.utils import atomic_dir, check_writable, honour_umask, process_age_s, write_json, write_jsonl

DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = ("lora", "qlora", "full")


# --------------------------------------------------------------------------------------- models --
def bnb_4bit_config():
    """Seed 003's quantization: 4-bit NF4, double quantization, bf16 compute."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise PosttrainError("--method qlora needs bitsandbytes (and a CUDA GPU): pip install bitsandbytes, or use --method lora") from None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def load_policy(cfg, device):
    """Load the model to train as ``cfg.method`` asks (a TrainerOptions, already validated) and wrap
    it with LoRA where needed."""
    from posttrain.engine.models import load_model

    quant = bnb_4bit_config() if cfg.method == "qlora" else None
    model = load_model(cfg.model, cfg.dtype, str(device), cfg.trust_remote_code, quantization_config=quant)
    model.config.use_cache = False
    if cfg.method in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if quant is not None:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
        targets = cfg.lora_target_modules or DEFAULT_LORA_TARGETS
        present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        missing = [t for t in targets if t not in present]
        if missing:
            raise PosttrainError(f"LoRA target modules {missing} do not exist in {cfg.model}; set lora_target_modules")
        lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias="none",
                          task_type="CAUSAL_LM", target_modules=targets)
        model = get_peft_model(model, lcfg)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def build_optimizer(model, lr: float, weight_decay: float, betas=(0.9, 0.999)):
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise PosttrainError("the model has no trainable parameters")
    fused = all(p.is_cuda for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas, fused=fused or None)


def build_scheduler(optimizer, kind: str, warmup_steps: int, total_steps: int):
    from transformers import get_scheduler

    kinds = ("cosine", "linear", "constant", "constant_with_warmup")
    if kind not in kinds:
        raise PosttrainError(f"unknown lr_scheduler {kind!r}; choose one of {', '.join(kinds)}")
    return get_scheduler(kind, optimizer, num_warmup_steps=warmup_steps, num_training_steps=max(1, total_steps))


def warmup_steps_for(total_steps: int, warmup_ratio: float, warmup_steps: int | None) -> int:
    return int(warmup_steps) if warmup_steps is not None else int(round(warmup_ratio * total_steps))


# -------------------------------------------------------------------------------------- logging --
class MetricsLogger:
    """Writes one JSON object per logged step to ``metrics.jsonl`` and to TensorBoard (W&B if asked).

    Only the main process writes; other ranks' calls are no-ops.
    """

    def __init__(self, output: Path, is_main: bool, report_to: list[str], run_config: dict, resume_step: int | None):
        """``resume_step``: the step a resumed run continues from (rows logged after it, by the run
        that was interrupted, are dropped so no step appears twice); None starts a fresh file."""
        self.is_main = is_main
        self.path = output / "metrics.jsonl"
        self.tb = self.wandb = None
        if not is_main:
            return
        output.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.unlink(missing_ok=True)
        elif self.path.exists():
            write_jsonl(self.path, [r for r in read_metrics(self.path) if isinstance(r.get("step"), int) and r["step"] <= resume_step])
        if "tensorboard" in report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(output / "tensorboard"))
            except ImportError:
                print("note: tensorboard is not installed; logging to metrics.jsonl only")
        if "wandb" in report_to:
            try:
                import wandb
            except ImportError:
                raise PosttrainError("report_to wandb needs wandb installed: pip install wandb") from None
            self.wandb = wandb.init(config=run_config, dir=str(output), resume="allow")

    def log(self, step: int, metrics: dict) -> None:
        if not self.is_main:
            return
        row = {"step": step, "time": round(time.time(), 3), **{k: _plain(v) for k, v in metrics.items()}}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        for k, v in row.items():
            if isinstance(v, (int, float)) and k not in ("step", "time"):
                if self.tb is not None:
                    self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(row, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _plain(v):
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    return v


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl; damaged lines (not a JSON object with an integer step) are skipped
    with a one-line warning."""
    if not path.is_file():
        return []
    rows, bad = [], 0
    for line in path.read_bytes().decode("utf-8", "replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
        else:
            bad += 1
    if bad:
        print(f"warning: {path}: skipped {bad} damaged line(s)")
    return rows


# ---------------------------------------------------------------------------------- checkpoints --
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
        return sorted((p for p in self.root.glob("step-*") if _STEP.fullmatch(p.name) and p.is_dir() and not p.is_symlink()
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


_STEP = re.compile(r"step-[0-9]+")


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
        own("model.tmp-final")
        shutil.rmtree(output / "model.tmp-final", ignore_errors=True)  # ours (recorded), left by a run killed while saving
        with atomic_dir(output / "model.tmp-final") as tmp:
            unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            if extra:
                write_json(tmp / "posttrain.json", extra)
        final = output / "model.tmp-final"
        own(*sorted(f.name for f in final.iterdir()))  # every name checked before any file moves
        # Move the finished files to the top of the output folder (where users look for them).
        for f in final.iterdir():
            dest = output / f.name
            if dest.is_dir():
                shutil.rmtree(dest)
            os.replace(f, dest)
        final.rmdir()
    accelerator.wait_for_everyone()


# ------------------------------------------------------------------------------------- stopping --
class GracefulStop:
    """Turn the first SIGINT/SIGTERM into a flag the loop checks after each step (then it saves and
    exits); a second signal interrupts at once."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\nreceived {signal.Signals(signum).name}: saving a checkpoint after this step, then stopping")

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


def config_dict(cfg) -> dict:
    return asdict(cfg)


# ----------------------------------------------------------------------------------------- data --
def data_splits(task, cfg) -> tuple[list, list]:
    """(training examples, held-out examples for evaluations during training). With
    ``validation_size`` the held-out ones are the train split's last N problems, kept apart from the
    training slice ``[train_offset, train_offset + train_limit)``; otherwise the test split."""
    rows = task.examples("train")
    pool = rows[: len(rows) - cfg.validation_size]
    train = pool[cfg.train_offset: cfg.train_offset + cfg.train_limit if cfg.train_limit else None]
    if not train:
        raise PosttrainError(f"no training examples left: the train split has {len(rows)}, of which validation_size takes "
                             f"{cfg.validation_size} and train_offset skips {cfg.train_offset}; lower them")
    return train, rows[len(pool):] if cfg.validation_size else task.examples("test")


# ----------------------------------------------------------------------------------- evaluation --
def accuracy_eval(engine, tokenizer, task, examples, max_new_tokens: int, accelerator) -> dict:
    """Greedy accuracy through the evaluation harness, on the run's own engine (whose weights the
    caller has synced); problems sharded across ranks."""
    from accelerate.utils import gather_object

    from posttrain.engine import SamplingParams
    from posttrain.evaluation import evaluate

    shard = examples[accelerator.process_index::accelerator.num_processes]
    was_training = engine.model.training
    engine.model.eval()
    res = evaluate(task, shard, engine, tokenizer, SamplingParams(max_new_tokens, stop=task.stop_strings), progress=False)
    engine.model.train(was_training)
    records = gather_object(res.records)
    n = max(1, len(records))
    return {"eval_accuracy": sum(r["correct"] for r in records) / n,
            "eval_strict_accuracy": sum(r["strict_correct"] for r in records) / n}


def push_folder(folder: Path, repo: str) -> None:
    """Upload a model/adapter folder to the hub, with a one-line error when offline or unauthorised."""
    try:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(repo, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo,
                          ignore_patterns=["checkpoints/*", "tensorboard/*", "*.tmp*", ".*"])
    except Exception as e:
        raise PosttrainError(f"could not push to hub repo {repo!r} ({type(e).__name__}): check the network and "
                             f"that HF_TOKEN (or `hf auth login`) grants write access") from None
    print(f"pushed {folder} to https://huggingface.co/{repo}")


# ------------------------------------------------------------------------------------ run set-up --
# Options a resumed run may change; any other change would make the saved config lie about the run.
RESUMABLE = {"max_steps", "resume", "overwrite", "logging_steps", "eval_steps", "save_steps", "save_total_limit",
             "report_to", "push_to_hub", "eval_samples", "eval_examples", "eval_accuracy_samples", "engine",
             "rollout_batch_size", "eval_batch_size", "max_bad_steps", "max_minutes"}


# Names a run writes at the top of its folder, checked before any work: none may be a user's file.
RUN_FILES = ("run_state.json", "metrics.jsonl", "tensorboard", "wandb", "checkpoints", "model.tmp-final")
MODEL_FILES = ("README.md", "adapter_config.json", "adapter_model.safetensors", "config.json", "model.safetensors",
               "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "chat_template.jinja", "posttrain.json")


def _main_rank() -> bool:
    """Whether this process is rank 0 (the launcher's RANK; a plain process is). Known before the
    accelerator exists, which is when the run folder is claimed."""
    return int(os.environ.get("RANK", "0")) == 0


def _read_state(state_file: Path) -> dict:
    """A run's run_state.json; {} when absent; {} and a one-line warning when damaged (the run writes
    it again when it ends)."""
    if not state_file.exists():
        return {}
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
        if isinstance(state, dict) and isinstance(state.get("step"), int) and isinstance(state.get("finished", False), bool):
            return state
    except (OSError, ValueError, UnicodeDecodeError):
        pass
    print(f"warning: {state_file} is damaged; ignoring it (it is written again when the run ends)")
    return {}


def _started(output: Path) -> bool:
    """Whether the run in ``output`` got anywhere: a logged step, a checkpoint or an end."""
    metrics = output / "metrics.jsonl"
    return ((metrics.is_file() and metrics.stat().st_size > 0) or (output / "run_state.json").exists()
            or any(_STEP.fullmatch(p.name) for p in (output / "checkpoints").glob("step-*")))


def prepare_output(run: RunDir, cfg, stage: str, lock: bool) -> dict | None:
    """Claim the run folder before any work (see posttrain.rundir): a new or empty folder, or one a
    posttrain ``stage`` run made, with --resume (continue it) or --overwrite (remove what the run
    wrote, start afresh); ``lock``: take the one-writer lock (the main rank). A run of this command that
    stopped before its first step is started afresh. Returns the final state of an already finished run
    that ``max_steps`` does not extend (when resuming it), else None."""
    output = run.path
    expect = (f"{stage}_config.json", *RUN_FILES, *MODEL_FILES)
    here = inspect(output)
    if here.state == "ours" and here.record.command == stage and not cfg.overwrite and not _started(here.target):
        print(f"note: the {stage} run in {output} stopped before its first step; starting it afresh")
        run.check(overwrite=True, expect=expect)
    else:
        plan = run.check(resume=cfg.resume, overwrite=cfg.overwrite, expect=expect)
        if cfg.resume and plan == "new":
            print(f"note: --resume: nothing to resume in {output} (no run there yet); starting a new run")
    if run.plan == "resume":
        ckpts = output / "checkpoints"
        if ckpts.exists() and not ckpts.is_dir():
            raise PosttrainError(f"--resume: {ckpts} is not a folder; posttrain keeps its checkpoints there. Move it away")
        if ckpts.is_dir():
            check_writable(ckpts, "--resume: checkpoints")
    if lock:
        run.lock()
    if run.plan != "resume":
        return None
    state = _read_state(output / "run_state.json")
    if state.get("finished") and (cfg.max_steps is None or state["step"] >= cfg.max_steps):
        print(f"run in {output} already finished at step {state['step']}; nothing to do "
              f"(pass a larger --max-steps to continue it)")
        run.release()
        return state
    return None


def check_resumed_config(output: Path, saved_name: str, cfg) -> None:
    """A resumed run must train as the interrupted one did: refuse changed options (one line). With
    checkpoints to continue from, the saved options must be there and readable."""
    saved_file = output / saved_name
    has_checkpoints = bool(Checkpoints(output, 0)._done())
    try:
        saved = json.loads(saved_file.read_text(encoding="utf-8")) if saved_file.exists() else None
    except (OSError, ValueError, UnicodeDecodeError):
        saved = "damaged"
    if saved is None and not has_checkpoints:
        return  # nothing to continue from: the run starts from step 0 and writes it
    if not isinstance(saved, dict):
        why = "is missing" if saved is None else "is damaged (not a JSON object)"
        raise PosttrainError(f"--resume: {saved_file} {why}, so posttrain cannot check that this run trains as the "
                             f"interrupted one did; put it back, or start afresh with --overwrite")
    now = json.loads(json.dumps(asdict(cfg), default=str))
    changed = [k for k in now if k not in RESUMABLE and k in saved and saved[k] != now[k]]
    if changed:
        k = changed[0]
        raise PosttrainError(f"--resume: --{k.replace('_', '-')} is {now[k]!r} but the run in {output} used {saved[k]!r}; "
                             f"resume with the same options (only {', '.join(sorted(RESUMABLE - {'resume', 'overwrite'}))} "
                             f"may change) or start a new --output")


def epoch_indices(n: int, step: int, per_rank: int, stream_seed: int, rank: int, world: int) -> list[int]:
    """Indices into ``n`` items for this rank at ``step``: a fresh permutation each epoch (sampling
    without replacement; tiny datasets cycle), sharded by rank, so ``world`` ranks of ``per_rank`` see
    exactly the items one rank of ``world × per_rank`` would. Deterministic: a resumed run sees the
    data an uninterrupted one would."""
    global_per_step = per_rank * world
    steps_per_epoch = max(1, n // global_per_step)
    epoch, i = divmod(step, steps_per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(stream_seed + epoch)).tolist()
    if len(order) < global_per_step:
        order = order * -(-global_per_step // len(order))
    return order[i * global_per_step:(i + 1) * global_per_step][rank::world]


class NonFinite:
    """The one policy for a NaN/inf loss, in every trainer: skip that step (no update), and stop with
    a one-line error after ``max_bad`` such steps in a row."""

    def __init__(self, max_bad: int, is_main: bool = True):
        self.max_bad, self.in_a_row, self.is_main = max_bad, 0, is_main

    def ok(self, finite: bool, step: int, last_checkpoint) -> bool:
        if finite:
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        if self.is_main:
            print(f"warning: non-finite loss at step {step}; step skipped ({self.in_a_row} in a row)")
        if self.in_a_row >= self.max_bad:
            raise PosttrainError(f"{self.in_a_row} steps in a row had NaN/inf loss; stopped. Last good checkpoint: "
                                 f"{last_checkpoint or 'none'}. Lower --learning-rate or check the data and rewards")
        return False


class TrainingRun:
    """The scaffolding SFT and RL share, so that their ``train`` reads as the algorithm: the output
    folder (checked before anything is written), the accelerator, resume, checkpoints, the metrics
    logger and progress bar, graceful stops, the non-finite-loss policy and the final save.

        run = TrainingRun(cfg, "rl")                  # raises, or run.done holds a finished run's state
        model, opt, sched = run.prepare(model, opt, sched, total_steps)   # resumes: run.step
        while run.step < total_steps:
            ... one step of the algorithm ...
            run.end_step(metrics, postfix)            # log, bar, checkpoint, stop on a signal
        return run.finish(model, tokenizer, extra)    # final model, run_state.json, process group
    """

    def __init__(self, cfg, stage: str):
        self.cfg, self.stage = cfg, stage
        self.output = Path(cfg.output)
        self.dir = RunDir(self.output, stage)  # claimed here, locked by the main rank, recorded in prepare
        self.done = prepare_output(self.dir, cfg, stage, lock=_main_rank())
        if self.done is not None:
            return
        if self.dir.plan == "resume":
            check_resumed_config(self.output, f"{stage}_config.json", cfg)
        from posttrain.engine.registry import trained_on
        from posttrain.tasks import check_contamination, make_task

        self.trained_on = trained_on(cfg.model) + [make_task(cfg.task, data_dir=cfg.data_dir).name]
        if getattr(cfg, "eval_steps", 0) and not cfg.validation_size:  # it reports test accuracy as it trains
            check_contamination(self.trained_on[:-1], self.trained_on[-1])
        self.accelerator = make_accelerator(cfg.mixed_precision)
        acc = self.accelerator
        self.device, self.is_main = acc.device, acc.is_main_process
        self.rank, self.world = acc.process_index, acc.num_processes
        self.ckpts = Checkpoints(self.output, cfg.save_total_limit)
        self.nonfinite = NonFinite(cfg.max_bad_steps, self.is_main)
        self.step = 0
        self.last: dict = {}
        self.out_of_time = False

    def log(self, *lines: str) -> None:
        if self.is_main:
            print(*lines)

    def prepare(self, model, optimizer, scheduler, total_steps: int, run_info: dict | None = None):
        """Wrap for the accelerator (DDP/FSDP), resume from the latest intact checkpoint, start the
        logger and write ``{stage}_config.json``. Returns the wrapped objects."""
        acc, resuming = self.accelerator, self.dir.plan == "resume"
        acc.wait_for_everyone()  # every rank has checked the folder before the main one writes
        if self.is_main:
            self.dir.start()  # --overwrite removes what the earlier run wrote, and only that
            report = self.cfg.report_to
            self.dir.own(f"{self.stage}_config.json", "metrics.jsonl", "checkpoints", "run_state.json",
                         *(["tensorboard"] if "tensorboard" in report else []), *(["wandb"] if "wandb" in report else []))
        acc.wait_for_everyone()
        model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
        Checkpoints.only_trainable(acc, model)
        if resuming and self.is_main:
            self.ckpts.clear_unfinished()
        latest, state = self.ckpts.resume(acc, self.log) if resuming else (None, {})
        if resuming and latest is None:
            if _read_state(self.output / "run_state.json"):
                raise PosttrainError(f"--resume: the finished run in {self.output} kept no checkpoint to continue from "
                                     f"(save_steps was 0); start a new --output")
            self.log(f"note: --resume: no checkpoint in {self.output}; the run starts again from step 0")
        if latest is not None:
            self.step = state["step"]
            self.log(f"resumed from {latest} (step {self.step})")
        self.total_steps = total_steps
        self.logger = MetricsLogger(self.output, self.is_main, self.cfg.report_to, config_dict(self.cfg),
                                    resume_step=self.step if latest is not None else None)
        if self.is_main:
            write_json(self.output / f"{self.stage}_config.json", {**config_dict(self.cfg), **(run_info or {})})
        self.bar = tqdm(total=total_steps, initial=self.step, desc=self.stage, disable=not self.is_main, unit="step")
        self.stop = GracefulStop().__enter__()
        return model, optimizer, scheduler

    def running(self) -> bool:
        """Whether another step starts: steps remain and the --max-minutes budget (from process start,
        decided on rank 0 so that every rank stops at the same step) is not spent."""
        if self.step >= self.total_steps:
            return False
        if self.cfg.max_minutes is None:
            return True
        age = process_age_s()
        spent = torch.tensor(float(age is not None and age > 60 * self.cfg.max_minutes and self.is_main), device=self.device)
        if self.accelerator.reduce(spent, "max").item() > 0:
            self.out_of_time = True
            self.log(f"--max-minutes {self.cfg.max_minutes:g} spent: stopping at step {self.step} of {self.total_steps}")
            return False
        return True

    def end_step(self, metrics: dict, postfix: dict | None = None) -> None:
        """After an optimizer step (``self.step`` already advanced): log, checkpoint, honour a stop."""
        step, cfg = self.step, self.cfg
        metrics["time_s"] = process_age_s()  # process age at the step's end: steps per minute as a user lives them
        if self.device.type == "cuda":
            metrics["gpu_mem_peak_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30  # since the process began
        if step % cfg.logging_steps == 0 or step == self.total_steps or any(k.startswith("eval_") for k in metrics):
            self.logger.log(step, metrics)
        if self.is_main:
            self.dir.keep()  # a step was made: a failure from here on leaves the run to --resume
        self.last = metrics
        self.bar.update(1)
        if postfix:
            self.bar.set_postfix(postfix)
        if (cfg.save_steps and step % cfg.save_steps == 0) or self.stop.requested:
            self.ckpts.save(self.accelerator, step, {"step": step, "total_steps": self.total_steps})
        if self.stop.requested:
            self._close()
            raise PosttrainError(f"stopped at step {step}; checkpoint saved. Continue with --resume --output {self.output}")

    def skip_step(self, finite: bool, optimizer) -> bool:
        """The non-finite policy: True when the step's loss was finite on every rank; otherwise the
        gradients are dropped, the step does not count, and a run of bad steps stops the run."""
        finite = self.accelerator.reduce(torch.tensor(float(finite), device=self.device), "min").item() > 0
        if not finite:
            optimizer.zero_grad(set_to_none=True)
        return not self.nonfinite.ok(finite, self.step + 1, None if finite else self.ckpts.latest())

    def finish(self, model, tokenizer, extra: dict) -> dict:
        """Save the final model (a standard HF folder), a last checkpoint (so a larger --max-steps can
        continue the run) and ``run_state.json``; push if asked; close the process group."""
        self._close()
        cfg, acc = self.cfg, self.accelerator
        latest = self.ckpts.latest()
        if cfg.save_steps and (latest is None or int(latest.name.split("-")[1]) != self.step):
            self.ckpts.save(acc, self.step, {"step": self.step, "total_steps": self.total_steps})
        save_final_model(model, tokenizer, self.output, acc, extra={"stage": self.stage, **extra, "base_model": cfg.model,
                                                                    "task": cfg.task, "trained_on": self.trained_on},
                         own=self.dir.own if self.is_main else None)
        final = {"finished": True, "step": self.step, **({"stopped_by_max_minutes": True} if self.out_of_time else {}),
                 **{k: v for k, v in self.last.items() if isinstance(v, (int, float))}}
        if self.is_main:
            write_json(self.output / "run_state.json", final)
        if cfg.push_to_hub and self.is_main:
            push_folder(self.output, cfg.push_to_hub)
        acc.wait_for_everyone()
        self.dir.release()
        acc.end_training()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        return final

    def _close(self) -> None:
        self.bar.close()
        self.logger.close()
        self.stop.__exit__(None, None, None)


MIXED_PRECISION = ("auto", "bf16", "no")
REPORT_TO = ("tensorboard", "wandb", "none")


def make_accelerator(mixed_precision: str = "auto"):
    """Autocast as asked: ``auto`` is bf16 on GPUs and plain fp32 on CPU; ``bf16`` autocasts on CPU
    too (about 1.5× faster training on CPUs with native bf16, AVX512-BF16 or AMX; no faster
    without). Works unchanged under ``accelerate launch`` (DDP/FSDP).

    Our schedules count optimizer steps, whatever the number of ranks, so the scheduler steps once per
    optimizer step (accelerate's default steps it once per rank, which ran the schedule N× too fast
    on N GPUs)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    use_cuda = torch.cuda.is_available()
    precision = ("bf16" if use_cuda else "no") if mixed_precision == "auto" else mixed_precision
    if AcceleratorState._shared_state.get("_mixed_precision", precision) != precision:
        # An earlier stage of this process (the pipeline's) chose another precision; the process group stays.
        AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision=precision, cpu=not use_cuda, step_scheduler_with_optimizer=False)


# ------------------------------------------------------------------------------ shared options --
@dataclass
class TrainerOptions:
    """Options every trainer shares: what to train, the batch shape, LoRA, and the run's plumbing.
    Trainer configs extend it with their own fields."""

    model: str = "models/nano-gsm"
    """Model to train: hub id or local folder (for RL, e.g. a merged SFT model)."""
    task: str = "gsm_symbolic"
    """gsm8k, gsm_symbolic, a .jsonl/.csv/.parquet file, or hf:org/dataset."""
    data_dir: str | None = None
    """Folder with GSM8K train.jsonl/test.jsonl (otherwise the hub is tried)."""
    prompt_style: str = "plain"
    """plain, chat or fewshot (or a template name); SFT targets follow the same template."""
    train_limit: int | None = None
    """Use only the first N training examples (after train_offset)."""
    train_offset: int = 0
    """Skip the first N training examples (e.g. RL on problems an SFT stage did not see)."""
    validation_size: int = 0
    """Hold out the last N problems of the train split as a validation set: evaluations during training
    use them instead of the test split, and they are never trained on (0: evaluate on the test split)."""
    method: str = "lora"
    """lora, qlora (4-bit NF4 base, needs bitsandbytes) or full."""
    per_device_batch_size: int = 4
    """Sequences per micro-batch per device (the seeds' 4)."""
    gradient_accumulation_steps: int = 4
    """Micro-batches per optimizer step; sequences per step = per_device_batch_size × this × ranks."""
    warmup_steps: int | None = None
    """Warm-up steps; overrides warmup_ratio when set."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping threshold (0 disables)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    lora_r: int = 8
    """LoRA rank (seed 000's SFT: 8; its REINFORCE: 16)."""
    lora_alpha: int = 16
    """LoRA scaling alpha."""
    lora_dropout: float = 0.05
    """LoRA dropout."""
    lora_target_modules: list[str] | None = None
    """Modules to adapt; default all attention and MLP projections."""
    dtype: str = "auto"
    """Weights dtype: auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32."""
    mixed_precision: str = "auto"
    """Autocast of training forwards: auto (bf16 on GPU, none on CPU), bf16 (on CPU too: faster where the
    CPU has native bf16, AVX512-BF16 or AMX) or no."""
    seed: int = 42
    """Seed for data order, initialisation, dropout and sampling."""
    logging_steps: int = 1
    """Log metrics every N optimizer steps."""
    save_total_limit: int = 2
    """Checkpoints to keep."""
    resume: bool = False
    """Continue the run in `output` from its latest checkpoint."""
    overwrite: bool = False
    """Start afresh even if `output` holds an earlier run."""
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Where metrics go besides metrics.jsonl: tensorboard, wandb."""
    push_to_hub: str | None = None
    """Push the final adapter/model to this hub repo."""
    trust_remote_code: bool = False
    """Allow model repos to run their own code."""
    engine: str = "auto"
    """Generation engine for rollouts and evaluations during training: fast, hf or auto (one per run)."""
    eval_batch_size: int = 64
    """Held-out problems generated together in the evaluations during training (RL's one engine then
    holds the larger of this and rollout_batch_size rows)."""
    max_bad_steps: int = 3
    """Stop after this many consecutive steps with a NaN/inf loss (each is skipped, no update)."""
    max_minutes: float | None = None
    """Wall-clock budget from process start: no new step starts once it is spent; the model and a
    checkpoint are saved as at a normal end (--resume continues). The learning-rate schedule still
    spans --max-steps."""

    def _check_common(self) -> None:
        require(self, {"lora_r": self.lora_r >= 1, "lora_dropout": 0 <= self.lora_dropout < 1,
                       "logging_steps": self.logging_steps >= 1, "per_device_batch_size": self.per_device_batch_size >= 1,
                       "eval_batch_size": self.eval_batch_size >= 1,
                       "gradient_accumulation_steps": self.gradient_accumulation_steps >= 1,
                       "max_bad_steps": self.max_bad_steps >= 1, "train_limit": self.train_limit is None or self.train_limit >= 1,
                       "train_offset": self.train_offset >= 0, "validation_size": self.validation_size >= 0,
                       "save_steps": getattr(self, "save_steps", 0) >= 0, "eval_steps": getattr(self, "eval_steps", 0) >= 0,
                       "save_total_limit": self.save_total_limit >= 0,
                       "max_minutes": self.max_minutes is None or self.max_minutes > 0,
                       "weight_decay": self.weight_decay >= 0, "warmup_steps": self.warmup_steps is None or self.warmup_steps >= 0,
                       "max_grad_norm": self.max_grad_norm >= 0, "lora_alpha": self.lora_alpha > 0,
                       "lora_target_modules": self.lora_target_modules is None or (bool(self.lora_target_modules)
                                                                                   and all(self.lora_target_modules))})
        from posttrain.engine import ENGINES
        from posttrain.engine.models import DTYPES

        unknown = [r for r in self.report_to if r not in REPORT_TO]
        if unknown:
            raise PosttrainError(f"unknown --report-to {unknown[0]!r}; choose tensorboard, wandb or none")
        if "none" in self.report_to and len(set(self.report_to)) > 1:
            raise PosttrainError(f"--report-to none cannot be combined with {', '.join(r for r in self.report_to if r != 'none')}")
        if self.engine not in ENGINES:
            raise PosttrainError(f"unknown --engine {self.engine!r}; choose one of {', '.join(ENGINES)}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise PosttrainError(f"unknown --dtype {self.dtype!r}; use auto, bf16, fp16 or fp32")
        if self.mixed_precision not in MIXED_PRECISION:
            raise PosttrainError(f"unknown --mixed-precision {self.mixed_precision!r}; choose one of {', '.join(MIXED_PRECISION)}")
        if self.method not in METHODS:
            raise PosttrainError(f"unknown --method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.resume and self.overwrite:
            raise PosttrainError("--resume and --overwrite contradict each other; pick one")
