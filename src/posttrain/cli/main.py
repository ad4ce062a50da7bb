"""The ``posttrain`` command: the parser built from the subcommands (``cli.commands``) and the one-line
error handling. Each subcommand is a thin layer over the library."""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from posttrain.errors import PosttrainError


class _Parser(argparse.ArgumentParser):
    """Usage mistakes in one line, like every other error (``--help`` still prints the usage)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser, with the flags of the command ``argv`` names (its first word that is a command), or
    of every command when ``argv`` is None. A command's flags come from its config class, whose module
    imports what the command needs (torch, for most): only the command that runs pays for it, so
    ``posttrain grade``, ``--help`` or a mistyped flag of ``posttrain data`` answer without importing torch."""
    from posttrain import __version__
    from posttrain.cli.commands import COMMANDS

    parser = _Parser(
        prog="posttrain",
        description="Post-train causal LMs on grade-school math: eval, sft, rl, pipeline.",
    )
    parser.add_argument("--version", action="version", version=f"posttrain {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = None if argv is None else next((a for a in argv if a in COMMANDS), "")
    for name, (fn, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if chosen is None or name == chosen:
            fn.configure(p)
        p.set_defaults(_run=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    from posttrain.startup import enable_bytecode_cache

    enable_bytecode_cache()  # before torch and transformers are imported (see posttrain.startup)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Library warnings a user can do nothing about, printed before any one-line error: peft 0.21 reads
    # transformers' deprecated ``is_gradient_checkpointing`` whenever it wraps a model, and torch's
    # weights-only unpickler comments on the protocol of a pickle it is about to refuse.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        rc = args._run(args)
        return int(rc or 0)
    except PosttrainError as e:
        after_failure()
        print(f"posttrain {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        after_failure()
        print(f"posttrain {args.command}: interrupted", file=sys.stderr)
        return 130
    except BaseException:
        after_failure()
        raise


def after_failure() -> None:
    """After a failure: a new run leaves nothing behind (see posttrain.rundir; not imported: no run
    folder was opened), and open progress bars end before the error line, which comes last."""
    if "posttrain.rundir" in sys.modules:
        sys.modules["posttrain.rundir"].discard_provisional()
    if "tqdm" in sys.modules:
        for bar in list(getattr(sys.modules["tqdm"].tqdm, "_instances", ())):
            bar.close()


if __name__ == "__main__":
    sys.exit(main())
