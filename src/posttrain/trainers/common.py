"""What every trainer needs: model set-up (LoRA/QLoRA/full), optimizer and schedule, rank-aware
logging, atomic checkpoints with resume, and graceful stops on Ctrl-C/SIGTERM."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from posttrain.config import require
from posttrain.errors import PosttrainError
from posttrain.utils import atomic_dir, write_json

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

    def __init__(self, output: Path, is_main: bool, report_to: list[str], run_config: dict, resume: bool):
        self.is_main = is_main
        self.path = output / "metrics.jsonl"
        self.tb = self.wandb = None
        if not is_main:
            return
        output.mkdir(parents=True, exist_ok=True)
        if not resume and self.path.exists():
            self.path.unlink()
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
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------- checkpoints --
class Checkpoints:
    """``OUTPUT/checkpoints/step-N`` folders written atomically (temp folder, then rename).

    Each holds the accelerate state (model, optimizer, scheduler, RNG) and ``trainer_state.json``.
    A kill during a save leaves only a hidden temp folder, never a broken ``step-N``.
    """

    def __init__(self, output: Path, keep: int):
        self.root = output / "checkpoints"
        self.keep = keep

    def latest(self) -> Path | None:
        if not self.root.exists():
            return None
        done = [p for p in self.root.glob("step-*") if (p / "trainer_state.json").exists()]
        return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)

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
        if accelerator.is_main_process:
            write_json(tmp / "trainer_state.json", state)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
            self._rotate()
        accelerator.wait_for_everyone()
        return target

    def load(self, accelerator, path: Path) -> dict:
        accelerator.load_state(str(path), strict=False)
        return json.loads((path / "trainer_state.json").read_text())

    def _rotate(self) -> None:
        if self.keep <= 0:
            return
        done = sorted((p for p in self.root.glob("step-*") if (p / "trainer_state.json").exists()),
                      key=lambda p: int(p.name.split("-")[1]))
        for old in done[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)


def save_final_model(model, tokenizer, output: Path, accelerator, extra: dict | None = None) -> None:
    """A standard HF folder in ``output``: PEFT adapter (LoRA) or full model, plus the tokenizer."""
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    state_dict = accelerator.get_state_dict(model)  # gathers full weights under FSDP
    if accelerator.is_main_process:
        with atomic_dir(output / "model.tmp-final") as tmp:
            unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            if extra:
                write_json(tmp / "posttrain.json", extra)
        final = output / "model.tmp-final"
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


# ----------------------------------------------------------------------------------- evaluation --
def accuracy_eval(model, tokenizer, task: Task, examples, max_new_tokens: int, accelerator) -> dict:
    """Greedy accuracy through the evaluation harness; problems sharded across ranks."""
    from posttrain.engine import SamplingParams, make_engine
    from posttrain.evaluation import evaluate

    unwrapped = accelerator.unwrap_model(model)
    unwrapped.eval()
    shard = examples[accelerator.process_index::accelerator.num_processes]
    engine = make_engine("auto", unwrapped, tokenizer, batch_size=32)
    res = evaluate(task, shard, engine, tokenizer, SamplingParams(max_new_tokens, stop=task.stop_strings), progress=False)
    unwrapped.train()
    from accelerate.utils import gather_object

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
def prepare_output(output: Path, resume: bool, overwrite: bool) -> dict | None:
    """Check the output folder before a run. Returns the final state of an already finished run
    (when resuming it), else None. Refuses to mix a new run into an old one's folder."""
    state_file = output / "run_state.json"
    if output.exists() and any(output.iterdir()) and not (resume or overwrite):
        raise PosttrainError(f"{output} already holds a run; pass --resume to continue it or --overwrite to start afresh")
    if resume and state_file.exists():
        state = json.loads(state_file.read_text())
        if state.get("finished"):
            print(f"run in {output} already finished at step {state['step']}; nothing to do")
            return state
    if overwrite and output.exists():
        shutil.rmtree(output)
    return None


def make_accelerator():
    """bf16 autocast on GPUs; plain fp32 on CPU. Works unchanged under ``accelerate launch`` (DDP/FSDP)."""
    from accelerate import Accelerator

    use_cuda = torch.cuda.is_available()
    return Accelerator(mixed_precision="bf16" if use_cuda else "no", cpu=not use_cuda)


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
    """Use only the first N training examples."""
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

    def _check_common(self) -> None:
        require(self, {"lora_r": self.lora_r >= 1, "lora_dropout": 0 <= self.lora_dropout < 1,
                       "logging_steps": self.logging_steps >= 1, "per_device_batch_size": self.per_device_batch_size >= 1,
                       "gradient_accumulation_steps": self.gradient_accumulation_steps >= 1})
        if self.method not in METHODS:
            raise PosttrainError(f"unknown --method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.resume and self.overwrite:
            raise PosttrainError("--resume and --overwrite contradict each other; pick one")
