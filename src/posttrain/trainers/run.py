"""The scaffolding every trainer runs in, so that its ``train`` reads as the algorithm: the output folder
(checked before anything is written), the accelerator, resume, checkpoints, the metrics logger and
progress bar, graceful stops on Ctrl-C/SIGTERM, the non-finite-loss policy and the final save."""

from __future__ import annotations

import json
import math
import os
import signal
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from posttrain.config import require
from posttrain.errors import PosttrainError
from posttrain.rundir import RunDir, check_new_folder, inspect
from posttrain.trainers.checkpoints import STEP, Checkpoints, save_final_model
from posttrain.trainers.hub import push_folder
from posttrain.trainers.metrics import MetricsLogger
from posttrain.utils import check_writable, process_age_s, write_json

RUN_CONFIGS = ("sft_config.json", "rl_config.json", "pretrain_config.json")  # the options TrainingRun.prepare saves, by stage
RUN_STATE = "run_state.json"  # written when a run ends: its last step and metrics


@dataclass(kw_only=True)
class RunOptions:
    """Options of the run scaffolding (``TrainingRun``): the output folder, the step budget and the
    step's clipping, logging, checkpoints, resume, stops, mixed precision and the final push. Each
    trainer's config sets the defaults that have none here."""

    output: str
    """Output folder."""
    max_steps: int | None
    """Optimizer steps."""
    max_grad_norm: float = 1.0
    """Gradient clipping threshold (0 disables)."""
    mixed_precision: str = "auto"
    """Autocast of training forwards: auto (bf16 on GPU, none on CPU), bf16 (on CPU too: faster where the
    CPU has native bf16, AVX512-BF16 or AMX, many times slower where it has not) or no."""
    logging_steps: int = 1
    """Log metrics every N optimizer steps."""
    save_steps: int
    """Checkpoint every N steps (0 disables)."""
    save_total_limit: int = 2
    """Checkpoints to keep."""
    resume: bool = False
    """Continue the run in `output` from its latest checkpoint."""
    overwrite: bool = False
    """Start afresh even if `output` holds an earlier run."""
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Where metrics go besides metrics.jsonl: tensorboard, wandb, or none."""
    push_to_hub: str | None = None
    """Push the final adapter/model to this hub repo."""
    max_bad_steps: int = 3
    """Stop after this many consecutive steps with a NaN/inf loss (each is skipped, no update)."""
    max_minutes: float | None = None
    """Wall-clock budget from process start: no new step starts once it is spent; the model and a
    checkpoint are saved as at a normal end (--resume continues). The learning-rate schedule still
    spans --max-steps."""

    def lineage(self) -> dict:
        """What the saved model records of where it comes from, checked before any work; a model trained
        from scratch has none."""
        return {}

    def check_run(self) -> None:
        """One-line errors for run options out of range."""
        require(self, {"logging_steps": self.logging_steps >= 1, "max_bad_steps": self.max_bad_steps >= 1,
                       "save_steps": self.save_steps >= 0, "save_total_limit": self.save_total_limit >= 0,
                       "max_minutes": self.max_minutes is None or self.max_minutes > 0,
                       "max_steps": self.max_steps is None or self.max_steps >= 1, "max_grad_norm": self.max_grad_norm >= 0})
        unknown = [r for r in self.report_to if r not in REPORT_TO]
        if unknown:
            raise PosttrainError(f"unknown --report-to {unknown[0]!r}; choose tensorboard, wandb or none")
        if "none" in self.report_to and len(set(self.report_to)) > 1:
            raise PosttrainError(f"--report-to none cannot be combined with {', '.join(r for r in self.report_to if r != 'none')}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise PosttrainError(f"unknown --mixed-precision {self.mixed_precision!r}; choose one of {', '.join(MIXED_PRECISION)}")
        if self.resume and self.overwrite:
            raise PosttrainError("--resume and --overwrite contradict each other; pick one")


# Options a resumed run may change (the run folder may have moved); any other change would make the saved
# config lie about the run.
RESUMABLE = {"output", "max_steps", "resume", "overwrite", "logging_steps", "eval_steps", "save_steps", "save_total_limit",
             "report_to", "push_to_hub", "eval_samples", "eval_examples", "eval_accuracy_samples", "engine",
             "rollout_batch_size", "eval_batch_size", "max_bad_steps", "max_minutes", "quantized_rollouts", "update_max_tokens"}


# Names a run writes at the top of its folder, checked before any work: none may be a user's file.
RUN_FILES = (RUN_STATE, "metrics.jsonl", "tensorboard", "wandb", "checkpoints", "model.tmp-final")
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
    return ((metrics.is_file() and metrics.stat().st_size > 0) or (output / RUN_STATE).exists()
            or any(STEP.fullmatch(p.name) for p in (output / "checkpoints").glob("step-*")))


def prepare_output(run: RunDir, cfg, stage: str) -> dict | None:
    """Claim the run folder before any work (see posttrain.rundir): a new or empty folder, or one a
    posttrain ``stage`` run made, with --resume (continue it) or --overwrite (remove what the run
    wrote, start afresh); nothing is written (``TrainingRun`` takes the lock after the rest of its checks). A run of this command that
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
    if run.plan != "resume":
        return None
    state = _read_state(output / RUN_STATE)
    if state.get("finished") and (cfg.max_steps is None or state["step"] >= cfg.max_steps):
        print(f"run in {output} already finished at step {state['step']}; nothing to do "
              f"(pass a larger --max-steps to continue it)")
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


MIXED_PRECISION = ("auto", "bf16", "no")
REPORT_TO = ("tensorboard", "wandb", "none")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), as oneDNN sees it."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def make_accelerator(mixed_precision: str = "auto"):
    """Autocast as asked: ``auto`` is bf16 on GPUs and plain fp32 on CPU; ``bf16`` autocasts on CPU
    too (about 1.5× faster training on CPUs with native bf16, AVX512-BF16 or AMX; without it bf16 is
    emulated: an SFT step of the default pipeline took 74 s instead of about 3 on a 2-core AVX2 EPYC,
    so a line says so). Works unchanged under ``accelerate launch`` (DDP/FSDP).

    Our schedules count optimizer steps, whatever the number of ranks, so the scheduler steps once per
    optimizer step (accelerate's default steps it once per rank, which ran the schedule N× too fast
    on N GPUs)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    use_cuda = torch.cuda.is_available()
    precision = ("bf16" if use_cuda else "no") if mixed_precision == "auto" else mixed_precision
    if precision == "bf16" and not use_cuda and not cpu_has_native_bf16():
        print(f"mixed precision bf16 on a CPU without native bf16 ({torch.backends.cpu.get_cpu_capability()}): "
              "emulated and many times slower than fp32; --mixed-precision auto trains in fp32 here")
    if AcceleratorState._shared_state.get("_mixed_precision", precision) != precision:
        # An earlier stage of this process (the pipeline's) chose another precision; the process group stays.
        AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision=precision, cpu=not use_cuda, step_scheduler_with_optimizer=False)


class TrainingRun:
    """The scaffolding SFT and RL share, so that their ``train`` reads as the algorithm: the output
    folder (checked before anything is written), the accelerator, resume, checkpoints, the metrics
    logger and progress bar, graceful stops, the non-finite-loss policy and the final save.

        run = TrainingRun(cfg, "rl")                  # raises, or run.done holds a finished run's state
        model, opt, sched = run.prepare(model, opt, sched, total_steps)   # resumes: run.step
        while run.running():
            ... the algorithm's forward and backward ...
            run.optimizer_step(finite, metrics, evaluate, postfix)   # step, log, evaluate, checkpoint, stop
        return run.save_and_close(model, tokenizer, extra)   # final model, run_state.json, process group
    """

    def __init__(self, cfg: RunOptions, stage: str, folder: Path | None = None):
        """``folder``: the run's own folder (checkpoints, metrics, state); by default ``cfg.output``, where
        the final model also goes."""
        self.cfg, self.stage = cfg, stage
        self.output = Path(folder if folder is not None else cfg.output)
        self.model_dir = Path(cfg.output)
        self.dir = RunDir(self.output, stage)  # claimed here, locked by the main rank, recorded in prepare
        if self.model_dir.resolve() != self.output.resolve():  # a model folder of its own: save_model writes it whole
            check_new_folder(self.model_dir, stage, replace=True)  # (rundir.atomic_folder(model_dir, stage, replace=True))
        self.done = prepare_output(self.dir, cfg, stage)
        if self.done is not None:
            return
        if self.dir.plan == "resume":
            check_resumed_config(self.output, f"{stage}_config.json", cfg)
        self.lineage = cfg.lineage()  # checks the task: every input checked before the folder is locked (and made)
        if _main_rank():
            self.dir.lock()  # one writer per run folder; checks the folder again under the lock
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
            self.dir.own(f"{self.stage}_config.json", "metrics.jsonl", "checkpoints", RUN_STATE,
                         *(["tensorboard"] if "tensorboard" in report else []), *(["wandb"] if "wandb" in report else []))
        acc.wait_for_everyone()
        model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
        Checkpoints.only_trainable(acc, model)
        if resuming and self.is_main:
            self.ckpts.clear_unfinished()
        latest, state = self.ckpts.resume(acc, self.log) if resuming else (None, {})
        if resuming and latest is None:
            if _read_state(self.output / RUN_STATE):
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
        self.bar = tqdm(total=total_steps, initial=self.step, desc=self.stage, unit="step",  # TQDM_DISABLE=1 hides it too
                        **({} if self.is_main else {"disable": True}))
        self.stop = GracefulStop().__enter__()
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
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

    def optimizer_step(self, finite: bool, metrics: Callable[[], dict], evaluate: Callable[[], dict] | None = None,
                       postfix: Callable[[dict], dict] | None = None) -> bool:
        """The tail of every optimizer step, after the backward. A step whose loss or gradients were not
        finite on every rank is skipped (``skip_step``: no update, it does not count) and False returned.
        Otherwise: clip the gradients (``max_grad_norm``), step the optimizer and the schedule, zero the
        gradients, count the step; then the step's ``metrics()`` with ``lr`` and ``grad_norm``, the
        results of ``evaluate()`` at evaluation steps, and ``end_step`` (log, bar with ``postfix(metrics)``,
        checkpoint, stop on a signal)."""
        cfg = self.cfg
        grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None
        # A finite loss can still have non-finite gradients (an overflow in backward): never step on those.
        if self.skip_step(finite and (grad_norm is None or math.isfinite(float(grad_norm)))):
            return False
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        record = metrics()
        record["lr"] = self.scheduler.get_last_lr()[0]
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        if evaluate is not None and self.evaluating():
            record.update(evaluate())
        self.end_step(record, postfix(record) if postfix else None)
        return True

    def evaluating(self) -> bool:
        """Whether the step just taken ends with an evaluation: every ``eval_steps`` and at the last step."""
        return bool(self.cfg.eval_steps) and (self.step % self.cfg.eval_steps == 0 or self.step == self.total_steps)

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
            raise PosttrainError(f"stopped at step {step}; checkpoint saved. Continue with --resume --output {self.model_dir}")

    def skip_step(self, finite: bool) -> bool:
        """The non-finite policy: False when the step's loss was finite on every rank; otherwise (True)
        the gradients are dropped, the step does not count, and a run of bad steps stops the run."""
        finite = self.accelerator.reduce(torch.tensor(float(finite), device=self.device), "min").item() > 0
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)
        return not self.nonfinite.ok(finite, self.step + 1, None if finite else self.ckpts.latest())

    def save_and_close(self, model, tokenizer, extra: dict, save_model: Callable[[], None] | None = None) -> dict:
        """Save the final model (a standard HF folder with ``extra`` and the lineage in posttrain.json, or
        as ``save_model()`` writes it), a last checkpoint (so a larger --max-steps can continue the run)
        and ``run_state.json``; push the model if asked; close the process group."""
        self._close()
        cfg, acc = self.cfg, self.accelerator
        latest = self.ckpts.latest()
        if cfg.save_steps and (latest is None or int(latest.name.split("-")[1]) != self.step):
            self.ckpts.save(acc, self.step, {"step": self.step, "total_steps": self.total_steps})
        if save_model is None:  # into the run's own folder, each name recorded before it is written
            own = self.dir.own if self.is_main and self.model_dir.resolve() == self.output.resolve() else None
            save_final_model(model, tokenizer, self.model_dir, acc, extra={"stage": self.stage, **extra, **self.lineage}, own=own)
        else:
            save_model()
        final = {"finished": True, "step": self.step, **({"stopped_by_max_minutes": True} if self.out_of_time else {}),
                 **{k: v for k, v in self.last.items() if isinstance(v, (int, float))}}
        if self.is_main:
            write_json(self.output / RUN_STATE, final)
        if cfg.push_to_hub and self.is_main:
            push_folder(self.model_dir, cfg.push_to_hub)
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
