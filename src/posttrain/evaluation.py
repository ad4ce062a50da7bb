"""The evaluation harness: prompts from a task, completions from an engine, grades from the task.

Used by ``posttrain eval``, by the trainers' periodic evaluation and by the pipeline, so every stage
is measured the same way.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from posttrain.config import LoadOptions, StageOptions
from posttrain.engine import ENGINES
from posttrain.engine.base import Engine, SamplingParams
from posttrain.engine.models import DTYPES, resolve_device
from posttrain.rundir import RunDir
from posttrain.tasks.sources import Example
from posttrain.tasks.task import Task
from posttrain.utils import atomic_write, process_age_s, write_json


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a proportion k/n (well-behaved near 0 and 1)."""
    if n == 0:
        return (0.0, 0.0)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass
class EvalResult:
    summary: dict
    """Aggregate metrics (accuracy, strict_accuracy, n, …)."""
    records: list[dict] = field(default_factory=list)
    """One record per question."""

    def save(self, output: str | Path) -> None:
        """Write ``summary.json`` and ``records.jsonl`` (each atomically) into ``output``: a new or
        empty folder, or one an earlier evaluation wrote (see posttrain.rundir); never over a user's files."""
        out = RunDir.open(output, "eval", rerun=True, expect=OUTPUTS)
        try:
            with atomic_write(out.entry("records.jsonl")) as f:
                for r in self.records:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
            write_json(out.entry("summary.json"), self.summary)
        finally:
            out.release()


OUTPUTS = ("records.jsonl", "summary.json")


def evaluate(task: Task, examples: list[Example], engine: Engine, tokenizer, params: SamplingParams,
             progress: bool = True) -> EvalResult:
    """Generate for every example (``params.n`` samples each), grade, aggregate."""
    prompts_text = [task.prompt_text(ex, tokenizer) for ex in examples]
    prompts = task.encode_prompts(examples, tokenizer, prompts_text)
    t0 = time.perf_counter()
    completions = engine.generate(prompts, params, progress=progress)
    elapsed = max(time.perf_counter() - t0, 1e-9)
    k = params.n
    records, lens, reasons = [], [], Counter()
    n_correct = n_strict = n_pass = n_maj = 0
    for i, ex in enumerate(examples):
        group = completions[i * k:(i + 1) * k]
        grades = [task.grade(c.text, ex) for c in group]
        for c in group:
            lens.append(len(c.token_ids))
            reasons[c.finish_reason] += 1
        n_correct += sum(g.correct for g in grades)
        n_strict += sum(g.strict_correct for g in grades)
        n_pass += any(g.correct for g in grades)
        votes = Counter(g.pred for g in grades if g.pred is not None)
        majority = votes.most_common(1)[0][0] if votes else None
        n_maj += bool(majority is not None and task.grade(f"#### {majority}", ex).correct)
        first, g0 = group[0], grades[0]
        rec = {
            "id": ex.id, "question": ex.question, "prompt": prompts_text[i], "generation": first.text,
            "pred": g0.pred, "gold": ex.numeric_answer, "correct": g0.correct, "strict_correct": g0.strict_correct,
            "gen_len": len(first.token_ids), "stopped": first.finish_reason != "length",
            "finish_reason": first.finish_reason,
        }
        if k > 1:
            rec["samples"] = [{"generation": c.text, "pred": g.pred, "correct": g.correct} for c, g in zip(group, grades)]
            rec["pass"] = any(g.correct for g in grades)
            rec["majority"] = majority
        records.append(rec)
    total = max(1, len(completions))
    n = len(examples)
    acc = n_correct / total
    lo, hi = wilson_interval(n_correct, total)
    summary = {
        "n": n,
        "samples_per_question": k,
        "accuracy": acc,
        "strict_accuracy": n_strict / total,
        "ci95": [lo, hi],
        "eos_rate": reasons["eos"] / total,
        "stop_string_rate": reasons["stop"] / total,
        "truncation_rate": reasons["length"] / total,
        "mean_gen_len": statistics.fmean(lens) if lens else 0.0,
        "median_gen_len": statistics.median(lens) if lens else 0.0,
        "generated_tokens": sum(lens),
        "seconds": elapsed,
        "tokens_per_s": sum(lens) / elapsed,
        "engine": engine.name,
        "task": task.name,
        "prompt": task.template.name,
        "max_new_tokens": params.max_new_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
    }
    if k > 1:
        summary[f"pass@{k}"] = n_pass / max(1, n)
        summary[f"maj@{k}"] = n_maj / max(1, n)
    return EvalResult(summary, records)


def accuracy_eval(engine, tokenizer, task, examples, max_new_tokens: int, accelerator) -> dict:
    """Greedy accuracy through the evaluation harness, on the run's own engine (whose weights the
    caller has synced); problems sharded across ranks."""
    from accelerate.utils import gather_object

    shard = examples[accelerator.process_index::accelerator.num_processes]
    was_training = engine.model.training
    engine.model.eval()
    res = evaluate(task, shard, engine, tokenizer, SamplingParams(max_new_tokens, stop=task.stop_strings), progress=False)
    engine.model.train(was_training)
    records = gather_object(res.records)
    n = max(1, len(records))
    return {"eval_accuracy": sum(r["correct"] for r in records) / n,
            "eval_strict_accuracy": sum(r["strict_correct"] for r in records) / n}


def format_summary(summary: dict) -> str:
    """A small aligned table of the headline metrics."""
    rows = [
        ("n", f"{summary['n']}"),
        ("accuracy (flexible)", f"{summary['accuracy']:.4f}  [95% CI {summary['ci95'][0]:.3f}-{summary['ci95'][1]:.3f}]"),
        ("strict accuracy", f"{summary['strict_accuracy']:.4f}"),
    ]
    for key in summary:
        if key.startswith(("pass@", "maj@")):
            rows.append((key, f"{summary[key]:.4f}"))
    rows += [
        ("EOS-stop rate", f"{summary['eos_rate']:.1%}"),
        ("truncation rate", f"{summary['truncation_rate']:.1%}"),
        ("gen length mean/median", f"{summary['mean_gen_len']:.1f} / {summary['median_gen_len']:.0f}"),
        ("tokens/s", f"{summary['tokens_per_s']:.1f}  ({summary['engine']} engine, {summary['seconds']:.1f}s)"),
    ]
    if summary.get("first_token_s_from_process_start") and summary.get("done_s_from_process_start"):
        rows.append(("from process start", f"first token {summary['first_token_s_from_process_start']:.1f}s, "
                                           f"done {summary['done_s_from_process_start']:.1f}s"))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"  {name:<{width}}  {value}" for name, value in rows)


@dataclass(kw_only=True)
class EvalConfig(LoadOptions, StageOptions):
    HELP = {"model": "Hub id or local folder of the model to evaluate."}

    split: str = "test"
    """Which split to evaluate."""
    limit: int | None = None
    """Evaluate only the first N problems."""
    fewshot: int = 0
    """Worked examples before each question (fewshot style; 5 when the style is fewshot and this is 0)."""
    max_new_tokens: int = 300
    """Most tokens generated per answer (the seed's 300)."""
    batch_size: int = 16
    """Prompts generated together."""
    num_samples: int = 1
    """Samples per question; > 1 reports pass@k and maj@k (needs temperature > 0)."""
    temperature: float = 0.0
    """0 = greedy (the default for evaluation); > 0 samples."""
    top_p: float = 1.0
    """Nucleus sampling threshold when sampling."""
    stop: list[str] | None = None
    """Stop strings (repeatable); defaults to the prompt template's own."""
    engine: str = "auto"
    """fast (ours), hf (HF generate) or auto (fast where supported)."""
    device: str = "auto"
    """auto, cpu, cuda or cuda:N."""
    seed: int = 0
    """Sampling seed."""
    output: str | None = None
    """Folder for summary.json and records.jsonl."""
    show_samples: int = 3
    """How many sample generations to print."""

    def __post_init__(self):
        from posttrain.errors import PosttrainError

        for name in ("batch_size", "num_samples", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise PosttrainError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.limit is not None and self.limit < 1:
            raise PosttrainError(f"--limit must be >= 1, got {self.limit}")
        if self.num_samples > 1 and self.temperature == 0:
            raise PosttrainError("--num-samples > 1 needs sampling: set --temperature > 0 (e.g. 0.7)")
        if self.show_samples < 0:
            raise PosttrainError(f"--show-samples must be >= 0, got {self.show_samples}")
        if self.engine not in ENGINES:
            raise PosttrainError(f"unknown --engine {self.engine!r}; choose one of {', '.join(ENGINES)}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise PosttrainError(f"unknown --dtype {self.dtype!r}; use auto, bf16, fp16 or fp32")
        resolve_device(self.device)  # an unusable --device is said before any loading

    def sampling(self, task: Task) -> SamplingParams:
        stop = self.stop if self.stop is not None else task.stop_strings
        return SamplingParams(self.max_new_tokens, self.temperature, self.top_p, self.num_samples, list(stop), self.seed)


def _direct_plan(cfg: EvalConfig):
    """``engine.direct.plan`` for ``cfg.model`` when it resolves to a folder (not a GGUF file, which
    transformers dequantizes), else None."""
    from posttrain.engine.direct import plan
    from posttrain.engine.registry import resolve_model

    src = resolve_model(cfg.model)
    if src.gguf_file:
        return None
    return plan(src.path, engine=cfg.engine, trust_remote_code=cfg.trust_remote_code)


def run_eval(cfg: EvalConfig, model=None, tokenizer=None, progress: bool = True) -> EvalResult:
    """Load (unless given) the model, evaluate ``cfg.task``, save to ``cfg.output`` if set."""
    from posttrain.engine import kernels, load_model, load_tokenizer, make_engine, resolve_dtype
    from posttrain.engine.registry import trained_on
    from posttrain.tasks import check_contamination, make_task

    phases = {"imports_and_setup": process_age_s()}  # process age at each phase's end
    if cfg.device != "cpu":
        kernels.hash_triton_in_background()  # while the tokenizer and the model load
    if cfg.output:  # before any work: the results may be written there (they are, once complete)
        RunDir(cfg.output, "eval").check(rerun=True, expect=OUTPUTS)
    task = make_task(cfg.task, prompt_style=cfg.prompt_style, fewshot=cfg.fewshot, data_dir=cfg.data_dir)
    check_contamination(trained_on(cfg.model), task.name, cfg.split)
    examples = task.examples(cfg.split, cfg.limit)
    params = cfg.sampling(task)
    # A plain Llama / Qwen2 folder loads without transformers (whose import alone costs seconds), else through it.
    loader = "transformers" if model is None else "given"
    direct = _direct_plan(cfg) if model is None and tokenizer is None else None
    if direct:  # the weights go to the device in a thread while the tokenizer loads (reads and copies let go of the GIL)
        loader, dev = "direct", resolve_device(cfg.device)
        pool = ThreadPoolExecutor(1, thread_name_prefix="posttrain-weights")
        try:
            weights = pool.submit(direct.model, resolve_dtype(cfg.dtype, dev), dev)
            tokenizer = direct.tokenizer()
            if tokenizer is None:  # one this module cannot tell it would build as transformers does
                loader, tokenizer = "direct model, transformers tokenizer", load_tokenizer(cfg.model, cfg.trust_remote_code)
            phases["task_and_tokenizer"] = process_age_s()
            model = weights.result()
        finally:
            pool.shutdown(wait=False, cancel_futures=True)  # an error here is said without waiting for the weights
    else:
        if tokenizer is None:
            tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
        phases["task_and_tokenizer"] = process_age_s()
        if model is None:
            model = load_model(cfg.model, cfg.dtype, cfg.device, cfg.trust_remote_code)
    phases["model"] = process_age_s()
    engine = make_engine(cfg.engine, model, tokenizer, cfg.batch_size)
    result = evaluate(task, examples, engine, tokenizer, params, progress=progress)
    result.summary["model"] = cfg.model
    result.summary["loader"] = loader
    # From process start, as a user waits: when each phase ended, the first token, the end.
    result.summary["first_token_s_from_process_start"] = engine.first_token_s
    result.summary["phases_end_s_from_process_start"] = phases
    result.summary["done_s_from_process_start"] = process_age_s()
    if cfg.output:
        result.save(cfg.output)
    return result
