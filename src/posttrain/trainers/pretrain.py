"""Pretraining a small Llama-architecture base model from scratch on raw GSM-style text.

This is how the offline default model ``models/nano-gsm`` is made. Its corpus is *raw text*, not the
pipeline's prompt format: procedural problems from reasoning-gym's ``gsm_symbolic`` written as
documents of two kinds, as a web crawl would hold them:

* worked problems: the question, then its solution, ending "The answer is N." or, as GSM8K's own
  files do, in the answer line "#### N" (the layout our prompts ask for; ``####`` is one token);
* problem sets: several questions in a row, one per line, no solutions.

So the base model can solve problems, but given a question it does not know it is being *asked* one:
a question followed by a newline is as often followed by another question as by a solution. Teaching it to answer, in a format, is what
SFT is for; RL then sharpens what SFT taught.
"""

from __future__ import annotations

import gzip
import json
import math
import random
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

from posttrain.config import require
from posttrain.errors import PosttrainError
from posttrain.rundir import atomic_folder, check_new_folder
from posttrain.trainers.run import RunOptions, TrainingRun
from posttrain.trainers.setup import build_scheduler
from posttrain.utils import atomic_write, seed_everything, write_json

SAVE_DTYPES = ("bf16", "fp32")


@dataclass(kw_only=True)
class PretrainConfig(RunOptions):
    # Options declared in RunOptions appear below only to set pretraining's default (and, with a
    # docstring, its wording of them).
    output: str = "models/nano-gsm"
    """Folder for the model (HF format: config, safetensors, tokenizer); the run itself (metrics.jsonl,
    checkpoints/, its config and state) goes to OUTPUT.logs."""
    corpus: str = "runs/pretrain_corpus.jsonl.gz"
    """Corpus file (one JSON string per line, gzip ok); built from gsm_symbolic if it does not exist."""
    corpus_only: bool = False
    """Build the corpus file and stop."""
    num_docs: int = 150000
    """Documents to build when the corpus is generated."""
    problem_set_share: float = 0.4
    """Share of documents that are problem sets (questions without solutions)."""
    marker_share: float = 0.0
    """Share of worked problems that end in the answer line "#### N" (the others: "The answer is N.")."""
    data_seed: int = 2024
    """Seed of the procedural problems in the corpus (kept apart from the evaluation streams)."""
    vocab_size: int = 2048
    """BPE vocabulary size (digits are always one token each)."""
    hidden_size: int = 256
    """Model width."""
    num_layers: int = 8
    """Decoder layers."""
    num_heads: int = 4
    """Attention heads."""
    num_kv_heads: int = 2
    """Key/value heads (grouped-query attention)."""
    intermediate_size: int = 768
    """MLP width."""
    seq_len: int = 512
    """Training sequence length (documents are concatenated with EOS and cut into rows)."""
    batch_size: int = 64
    """Rows per step."""
    max_steps: int = 4000
    learning_rate: float = 3e-3
    """Peak learning rate."""
    warmup_steps: int = 200
    """Linear warm-up steps before the cosine decay."""
    weight_decay: float = 0.1
    """AdamW weight decay."""
    seed: int = 0
    """Seed for initialisation and data order."""
    save_dtype: str = "bf16"
    """Dtype of the saved weights (bf16 keeps the committed model small)."""
    logging_steps: int = 50
    save_steps: int = 500
    report_to: list[str] = field(default_factory=list)

    def __post_init__(self):
        require(self, {"num_docs": self.num_docs >= 1, "data_seed": self.data_seed >= 0, "vocab_size": self.vocab_size >= 1,
                       "hidden_size": self.hidden_size >= 1, "num_layers": self.num_layers >= 1, "num_heads": self.num_heads >= 1,
                       "num_kv_heads": self.num_kv_heads >= 1, "intermediate_size": self.intermediate_size >= 1,
                       "seq_len": self.seq_len >= 2, "batch_size": self.batch_size >= 1, "max_steps": self.max_steps >= 1,
                       "learning_rate": self.learning_rate > 0, "warmup_steps": self.warmup_steps >= 0,
                       "weight_decay": self.weight_decay >= 0, "seed": self.seed >= 0, "max_bad_steps": self.max_bad_steps >= 1,
                       "logging_steps": self.logging_steps >= 1}, "pretrain")
        if self.save_dtype not in SAVE_DTYPES:
            raise PosttrainError(f"unknown --save-dtype {self.save_dtype!r}; choose one of {', '.join(SAVE_DTYPES)}")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise PosttrainError("hidden_size must divide by num_heads, and num_heads by num_kv_heads")
        if not 0 <= self.problem_set_share < 1:
            raise PosttrainError("problem_set_share must be in [0, 1)")
        if not 0 <= self.marker_share <= 1:
            raise PosttrainError("marker_share must be in [0, 1]")
        self.check_run()

    @property
    def run_folder(self) -> Path:
        """Where the run keeps its metrics, checkpoints, config and state: beside the model folder."""
        return Path(str(self.output) + ".logs")


def _final_line(cot: str, answer: str, marker: bool) -> str:
    body = cot.rsplit("####", 1)[0].strip()
    return f"{body}\n#### {answer}" if marker else f"{body}\nThe answer is {answer}."


def build_corpus(num_docs: int, problem_set_share: float, seed: int, exclude: set[str], marker_share: float = 0.0) -> list[str]:
    """Raw-text documents from gsm_symbolic (questions in ``exclude`` never appear)."""
    try:
        import reasoning_gym
    except ImportError:
        raise PosttrainError("building the corpus needs reasoning-gym: pip install reasoning-gym") from None
    rng = random.Random(seed)
    ds = reasoning_gym.create_dataset("gsm_symbolic", seed=seed, size=num_docs * 3)
    items = iter(ds)
    suffix = " Give the result as your final answer. Do not include units."
    docs = []
    bar = tqdm(total=num_docs, desc="corpus", unit="doc")

    def next_item():
        while True:
            it = next(items)
            q = str(it["question"]).replace(suffix, "").strip()
            if q not in exclude:
                return q, str(it["metadata"].get("answer_cot", "")), str(it["answer"])

    try:
        while len(docs) < num_docs:
            if rng.random() < problem_set_share:
                qs = [next_item()[0] for _ in range(rng.randint(2, 4))]
                docs.append("\n".join(qs))
            else:
                q, cot, ans = next_item()
                docs.append(f"{q}\n{_final_line(cot, ans, rng.random() < marker_share)}")
            bar.update(1)
    except StopIteration:
        pass
    bar.close()
    return docs


def load_corpus(path: Path) -> list[str]:
    """The documents of a corpus file (one JSON string per line, gzip ok); one-line errors naming the
    file and line for anything else."""
    if not path.is_file():
        raise PosttrainError(f"--corpus {path} is not a file")
    docs = []
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    doc = json.loads(line)
                except ValueError as e:
                    raise PosttrainError(f"{path}:{lineno}: malformed JSON ({getattr(e, 'msg', e)}); each line must be a "
                                         "JSON string (a document)") from None
                if not isinstance(doc, str):
                    raise PosttrainError(f"{path}:{lineno}: expected a JSON string (a document), got {type(doc).__name__}")
                docs.append(doc)
    except UnicodeDecodeError:
        raise PosttrainError(f"{path} is not UTF-8 text; give a corpus of JSON strings, one per line") from None
    except (gzip.BadGzipFile, EOFError, OSError) as e:
        raise PosttrainError(f"{path} is not a gzip file, or a damaged one ({type(e).__name__}); check the corpus") from None
    return docs


def save_corpus(path: Path, docs: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as raw:
        with gzip.GzipFile(fileobj=raw, mode="wb") as f:
            for d in docs:
                f.write((json.dumps(d) + "\n").encode("utf-8"))


def pipeline_test_questions() -> set[str]:
    """Questions of the default evaluation stream, kept out of the pretraining corpus."""
    from posttrain.tasks.sources import GSMSymbolic

    return {e.question for e in GSMSymbolic().load("test")}


class RowOrder:
    """The corpus rows of each step: windows of ``per_step`` rows through a permutation, a fresh one
    (the next from ``seed``'s generator) each time the window wraps. Any step's rows follow from the
    step alone, so a resumed run reads the rows an uninterrupted one would."""

    def __init__(self, n_rows: int, per_step: int, seed: int):
        self.n_rows, self.per_step = n_rows, per_step
        self.generator = torch.Generator().manual_seed(seed)
        self.order = torch.randperm(n_rows, generator=self.generator)
        self.step = 0  # the step self.order serves

    def _start(self, step: int) -> int:
        return (step * self.per_step) % max(1, self.n_rows - self.per_step + 1)

    def rows(self, step: int) -> torch.Tensor:
        """Row indices of ``step`` (0-based), for every rank; steps may repeat but never go back."""
        if step < self.step:
            raise ValueError(f"RowOrder serves steps in order: asked for {step} after {self.step}")
        for s in range(self.step + 1, step + 1):
            if self._start(s) < self.per_step:
                self.order = torch.randperm(self.n_rows, generator=self.generator)
        self.step = step
        start = self._start(step)
        return self.order[start:start + self.per_step]


def train(cfg: PretrainConfig) -> dict:
    """Pretrain; returns the final metrics. The model goes to ``cfg.output``, the run (metrics,
    checkpoints: resumable, stopped gracefully by Ctrl-C/SIGTERM) to ``cfg.run_folder``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from posttrain.tokenization import train_bpe_tokenizer

    out = Path(cfg.output)
    check_new_folder(out, "pretrain", replace=True)  # before hours of training, not after: only an earlier pretrain's
    corpus_path = Path(cfg.corpus)
    if cfg.corpus_only:
        return {"documents": len(_corpus(cfg, corpus_path))}
    run = TrainingRun(cfg, "pretrain", folder=cfg.run_folder)
    if run.done is not None:
        return run.done
    docs = _corpus(cfg, corpus_path)
    if not docs:
        raise PosttrainError(f"corpus {corpus_path} is empty")

    acc = run.accelerator
    seed_everything(cfg.seed)
    t0 = time.perf_counter()
    tokenizer = train_bpe_tokenizer(docs[:40000], vocab_size=cfg.vocab_size)
    ids = tokenizer(docs, add_special_tokens=False)["input_ids"]
    stream = torch.tensor([t for doc in ids for t in ([tokenizer.bos_token_id] + doc + [tokenizer.eos_token_id])])
    n_rows = len(stream) // cfg.seq_len
    rows = stream[: n_rows * cfg.seq_len].view(n_rows, cfg.seq_len)
    run.log(f"tokenizer: {len(tokenizer)} tokens; corpus: {len(docs)} docs, {len(stream):,} tokens, {n_rows} rows "
            f"({time.perf_counter() - t0:.1f}s)")

    mcfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=max(1024, cfg.seq_len), rope_theta=10000.0, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(mcfg)
    model.config.use_cache = False
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.learning_rate, betas=(0.9, 0.95))
    scheduler = build_scheduler(optimizer, "cosine", cfg.warmup_steps, cfg.max_steps)
    model, optimizer, scheduler = run.prepare(model, optimizer, scheduler, cfg.max_steps,
                                              {"parameters": n_params, "corpus_tokens": int(len(stream))})
    per_step = cfg.batch_size * run.world
    order = RowOrder(n_rows, per_step, cfg.seed)
    model.train()
    while run.running():
        batch = rows[order.rows(run.step)][run.rank::run.world].to(run.device)
        with acc.autocast():
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        acc.backward(loss)
        loss_val = loss.item()
        run.optimizer_step(math.isfinite(loss_val), partial(dict, loss=loss_val), postfix=progress)
    elapsed = time.perf_counter() - t0
    final_loss = run.last.get("loss", float("nan"))

    def save_model():
        if not run.is_main:
            return
        unwrapped = acc.unwrap_model(model)
        unwrapped.config.use_cache = True
        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[cfg.save_dtype]
        unwrapped.generation_config.eos_token_id = tokenizer.eos_token_id
        unwrapped.generation_config.pad_token_id = tokenizer.pad_token_id
        with atomic_folder(out, "pretrain", replace=True) as tmp:
            unwrapped.to(dtype).save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            write_json(tmp / "pretrain.json", {
                "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}, "parameters": n_params,
                "tokens_seen": run.step * per_step * cfg.seq_len, "corpus_tokens": int(len(stream)),
                "final_loss": final_loss, "seconds": elapsed,
                "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"})
        print(f"saved {out} ({n_params / 1e6:.2f}M parameters, final loss {final_loss:.3f}, {elapsed:.0f}s)")

    final = run.save_and_close(model, tokenizer, {}, save_model=save_model)
    return {**final, "parameters": n_params, "final_loss": final_loss, "seconds": elapsed}


def _corpus(cfg: PretrainConfig, path: Path) -> list[str]:
    """The corpus file's documents, built (and written) first if the file does not exist."""
    if path.exists():
        return load_corpus(path)
    docs = build_corpus(cfg.num_docs, cfg.problem_set_share, cfg.data_seed, pipeline_test_questions(), cfg.marker_share)
    save_corpus(path, docs)
    print(f"wrote {len(docs)} documents to {path}")
    return docs


def progress(metrics: dict) -> dict:
    """The progress bar's figures for a step."""
    return {"loss": f"{metrics['loss']:.3f}"}
