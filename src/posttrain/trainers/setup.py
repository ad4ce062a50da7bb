"""What a trainer is set up with: its options, the policy to train (LoRA, QLoRA or full), the
optimizer and the learning-rate schedule."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from posttrain.config import LoadOptions, StageOptions, require
from posttrain.engine.projections import QUANTIZED_ROLLOUTS
from posttrain.errors import PosttrainError
from posttrain.trainers.run import RunOptions

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
        from peft import LoraConfig, get_peft_model

        # A 4-bit base is wrapped as it is, as seed 003 and TRL's trainers do: peft's
        # prepare_model_for_kbit_training would upcast embeddings, norms and lm_head to fp32 (+4 GiB on
        # an 8B model) and, through them, every activation the update keeps (about 2x its memory).
        targets = cfg.lora_target_modules or DEFAULT_LORA_TARGETS
        present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        missing = [t for t in targets if t not in present]
        if missing:
            raise PosttrainError(f"LoRA target modules {missing} do not exist in {cfg.model}; set lora_target_modules")
        lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias="none",
                          task_type="CAUSAL_LM", target_modules=targets)
        model = get_peft_model(model, lcfg)
    if cfg.gradient_checkpointing:
        enable_checkpointing(model, cfg.checkpoint_every)
    if cfg.compile_layers:
        compile_layers(model)
    model.train()
    return model


def decoder_layers(model) -> list:
    """The model's repeated decoder blocks (transformers' ``GradientCheckpointingLayer``s), through
    PEFT and other wrappers."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


RECOMPILE_LIMIT = 32
"""Graphs dynamo may keep for the layers' code before it runs them uncompiled (its default is 8)."""


def compile_layers(model, backend: str = "inductor") -> int:
    """torch.compile each decoder layer in place (regional compilation, dynamic shapes), for training.
    The norms, rotary embedding, SiLU and residual adds that PyTorch runs as a few dozen small kernels
    per layer become a few fused ones. The layers share their code, so with full fine-tuning one
    compiled graph (forward and backward) serves every layer and every micro-batch width (the RL batch
    makes widths multiples of 8, which inductor specialises on). Where the embeddings are frozen (LoRA),
    their output is made to require a gradient, so that the first layer's input is like the others'
    and shares their graph (one more backward GEMM per projection of that layer, where a graph of its
    own was one more to compile); a reference pass, without gradients, takes one more. dynamo's limit
    on graphs per code object is raised to ``RECOMPILE_LIMIT`` so that none falls back to running
    uncompiled. Returns the number of layers compiled."""
    import torch._dynamo

    layers = decoder_layers(model)
    if not layers:
        raise PosttrainError("--compile-layers found no decoder layers in this model (transformers' GradientCheckpointingLayer); "
                             "train without it")
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    if not model.get_input_embeddings().weight.requires_grad:
        model.get_input_embeddings().register_forward_hook(_output_requires_grad)
    for layer in layers:
        layer.compile(backend=backend, dynamic=True)
    return len(layers)


def _output_requires_grad(module, inputs, output):
    """Forward hook: the output requires a gradient where gradients are being recorded (transformers'
    ``enable_input_require_grads`` sets it under ``no_grad`` too, which gave a reference pass's first
    layer a graph of its own)."""
    if torch.is_grad_enabled():
        output.requires_grad_(True)


def enable_checkpointing(model, every: int = 1) -> list[bool]:
    """Gradient checkpointing (non-reentrant) on every ``every``-th decoder layer, from the first;
    returns which layers recompute. transformers turns it on for all of them; the others are turned
    back off here, layer by layer."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i % every == 0
    return [layer.gradient_checkpointing for layer in layers]


def load_reference(cfg, tokenizer, device):
    """A frozen reference model for RL's KL penalty (full fine-tuning, or an explicit --ref-model); it must
    share the policy's tokenizer."""
    from posttrain.engine.models import load_model, load_tokenizer

    name = cfg.ref_model or cfg.model
    ref_tok = load_tokenizer(name, cfg.trust_remote_code)
    if ref_tok.get_vocab() != tokenizer.get_vocab():
        raise PosttrainError(f"reference model {name!r} uses a different tokenizer than the policy {cfg.model!r}; "
                             "the KL penalty compares token log-probs, so they must share one")
    ref = load_model(name, cfg.dtype, str(device), cfg.trust_remote_code)
    ref.requires_grad_(False)
    return ref


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


@torch.no_grad()
def rounded_away(model, lr: float) -> tuple[float, torch.dtype] | None:
    """(share of the trainable 16-bit weights that an optimizer step of ``lr`` cannot change, their
    dtype), or None when no trainable weight is 16-bit. An AdamW step is at most about ``lr``; a weight
    keeps its value under any step below half its unit in the last place, which is at least
    ``|w| · eps / 4`` (bf16: eps 2^-7). So full fine-tuning on bf16 weights at a usual learning rate
    (2e-6) leaves almost every weight as it is: 96% of weights drawn from N(0, 0.02) never move
    (``tests/test_rl.py``), where fp32 weights take every step."""
    params = [p for p in model.parameters() if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16)]
    if not params:
        return None
    dtype = params[0].dtype
    bound = 4 * lr / torch.finfo(dtype).eps
    kept = sum(int((piece.abs() > bound).sum()) for p in params for piece in p.detach().reshape(-1).split(1 << 24))  # bounded temporaries
    return kept / sum(p.numel() for p in params), dtype


def warn_rounded_away(model, lr: float, say) -> None:
    """Say, in one line, when most trainable weights cannot take a step of ``lr`` in their dtype."""
    lost = rounded_away(model, lr)
    if lost is not None and lost[0] > 0.5:
        name = {torch.bfloat16: "bf16", torch.float16: "fp16"}[lost[1]]
        say(f"warning: {lost[0]:.0%} of the trainable weights are {name} values too large for a step of lr {lr:g} to change "
            f"(the step rounds away): full fine-tuning would leave them as they are; train with --dtype fp32 "
            "(compute stays bf16 under --mixed-precision auto on a GPU) or a larger learning rate, or LoRA")


def build_scheduler(optimizer, kind: str, warmup_steps: int, total_steps: int):
    from transformers import get_scheduler

    kinds = ("cosine", "linear", "constant", "constant_with_warmup")
    if kind not in kinds:
        raise PosttrainError(f"unknown lr_scheduler {kind!r}; choose one of {', '.join(kinds)}")
    return get_scheduler(kind, optimizer, num_warmup_steps=warmup_steps, num_training_steps=max(1, total_steps))


def warmup_steps_for(total_steps: int, warmup_ratio: float, warmup_steps: int | None) -> int:
    return int(warmup_steps) if warmup_steps is not None else int(round(warmup_ratio * total_steps))


@dataclass(kw_only=True)
class TrainerOptions(RunOptions, LoadOptions, StageOptions):
    """Options every post-training trainer shares: what to train, the data, the batch shape, the
    optimizer and schedule, LoRA, the evaluations during training, and the run's options
    (``RunOptions``). Trainer configs extend it with their own fields and set the defaults that have
    none here."""

    HELP = {  # the trainers' wording of the shared options
        "model": "Model to train: hub id or local folder (for RL, e.g. a merged SFT model).",
        "data_dir": "Folder with GSM8K train.jsonl/test.jsonl (otherwise the hub is tried).",
        "prompt_style": "plain, chat or fewshot (or a template name); SFT targets follow the same template.",
        "dtype": "Weights dtype: auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32.",
        "trust_remote_code": "Allow model repos to run their own code.",
    }

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
    learning_rate: float
    """Peak learning rate."""
    lr_scheduler: str
    """cosine, linear, constant or constant_with_warmup."""
    warmup_ratio: float
    """Share of steps spent warming up."""
    warmup_steps: int | None = None
    """Warm-up steps; overrides warmup_ratio when set."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    checkpoint_every: int = 1
    """With gradient_checkpointing: recompute every N-th decoder layer only (1: all of them). N = 3
    keeps about two thirds of the activation memory for a third of the recomputation."""
    compile_layers: bool = False
    """torch.compile each decoder layer for training (with full fine-tuning, one compiled graph that
    every layer and every micro-batch shape shares; LoRA adds a few). Pays at the first step, then each
    forward and backward is faster: on an H200, GRPO on Qwen2.5-0.5B (64 completions × ≤ 256 tokens,
    full fine-tuning) compiled for 14-21 s, then took 0.30-0.44 s an update instead of 0.37-0.59 s
    (worth it from about 200 steps); with LoRA on the Llama-3.2-1B shape, 114 s, then 0.45 s instead of
    0.66 s (BENCHMARKS.md). Not with gradient_checkpointing."""
    lora_r: int = 8
    """LoRA rank (seed 000's SFT: 8; its REINFORCE: 16)."""
    lora_alpha: int = 16
    """LoRA scaling alpha."""
    lora_dropout: float = 0.05
    """LoRA dropout."""
    lora_target_modules: list[str] | None = None
    """Modules to adapt; default all attention and MLP projections."""
    seed: int = 42
    """Seed for data order, initialisation, dropout and sampling."""
    engine: str = "auto"
    """Generation engine for rollouts and evaluations during training: fast, hf or auto (one per run)."""
    quantized_rollouts: str = "auto"
    """How the fast engine serves a QLoRA policy's 4-bit base: dequantized (a bf16 copy, merged at each
    sync), transient (that copy built for each rollout and freed before the update), 4bit (straight from
    the 4-bit weights, the adapter as its own low-rank product) or auto (the copy kept when it leaves a
    quarter of the GPU's memory free, else transient when the copy fits beside the rollout's KV cache,
    else 4bit)."""
    eval_steps: int
    """Evaluate accuracy on held-out problems every N steps (0 disables)."""
    eval_batch_size: int = 64
    """Held-out problems generated together in the evaluations during training (RL's one engine then
    holds the larger of this and rollout_batch_size rows)."""

    def lineage(self) -> dict:
        """The base model, the task and all the trained model has seen (the base's training data, then
        this task). Refuses evaluations during training on a test split the base was trained on."""
        from posttrain.engine.registry import trained_on
        from posttrain.tasks import check_contamination, make_task

        seen = trained_on(self.model) + [make_task(self.task, data_dir=self.data_dir).name]
        if self.eval_steps and not self.validation_size:  # it reports test accuracy as it trains
            check_contamination(seen[:-1], seen[-1])
        return {"base_model": self.model, "task": self.task, "trained_on": seen}

    def _check_common(self) -> None:
        self.check_run()
        require(self, {"lora_r": self.lora_r >= 1, "lora_dropout": 0 <= self.lora_dropout < 1,
                       "per_device_batch_size": self.per_device_batch_size >= 1, "eval_batch_size": self.eval_batch_size >= 1,
                       "gradient_accumulation_steps": self.gradient_accumulation_steps >= 1,
                       "checkpoint_every": self.checkpoint_every >= 1,
                       "train_limit": self.train_limit is None or self.train_limit >= 1,
                       "train_offset": self.train_offset >= 0, "validation_size": self.validation_size >= 0,
                       "eval_steps": self.eval_steps >= 0, "weight_decay": self.weight_decay >= 0,
                       "warmup_steps": self.warmup_steps is None or self.warmup_steps >= 0, "lora_alpha": self.lora_alpha > 0,
                       "lora_target_modules": self.lora_target_modules is None or (bool(self.lora_target_modules)
                                                                                   and all(self.lora_target_modules))})
        from posttrain.engine import ENGINES
        from posttrain.engine.models import DTYPES

        if self.engine not in ENGINES:
            raise PosttrainError(f"unknown --engine {self.engine!r}; choose one of {', '.join(ENGINES)}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise PosttrainError(f"unknown --dtype {self.dtype!r}; use auto, bf16, fp16 or fp32")
        if self.method not in METHODS:
            raise PosttrainError(f"unknown --method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.compile_layers and self.gradient_checkpointing:
            raise PosttrainError("--compile-layers and --gradient-checkpointing do not go together yet: choose one "
                                 "(checkpointing saves memory, compiling saves time)")
        if self.quantized_rollouts not in QUANTIZED_ROLLOUTS:
            raise PosttrainError(f"unknown --quantized-rollouts {self.quantized_rollouts!r}; choose one of {', '.join(QUANTIZED_ROLLOUTS)}")
