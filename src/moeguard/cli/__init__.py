"""The ``moeguard`` command line: a thin layer over the Python API.

Each command lives in its own module with a ``register(subparsers)`` function that
adds its parser and sets ``run`` (``args -> exit code``) and, for a command whose
interrupted work can be continued, ``resume_with``: "" when running the same command
again resumes it, or the flag that must be added (``--resume``). Errors a user can fix
(:class:`moeguard.errors.MoeGuardError`) are printed without a traceback, in the words
of the command's flags; a bug of moeguard (:class:`moeguard.errors.InternalError`) with
its traceback and a request to report it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import shlex
import signal
import sys
import threading
import traceback
from collections.abc import Iterator

# Nothing heavy at import time (torch, transformers): ``moeguard`` must answer Ctrl-C from its first instant.
from moeguard import __version__
from moeguard.errors import InternalError, MoeGuardError

COMMAND_MODULES = [
    "moeguard.cli.audit_command",
    "moeguard.cli.inspect_command",
    "moeguard.cli.data_command",
    "moeguard.cli.evaluate_command",
    "moeguard.cli.zoo_command",
    "moeguard.cli.verify_command",
    "moeguard.cli.detect_command",
    "moeguard.cli.verify_watermark_command",
    "moeguard.cli.harden_command",
    "moeguard.cli.defense_eval_command",
    "moeguard.cli.prune_command",
    "moeguard.cli.sweep_command",
    "moeguard.cli.attribute_command",
    "moeguard.cli.realign_command",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moeguard",
        description="Audit and harden Mixture-of-Experts models against unauthorized compression.",
    )
    parser.add_argument("--version", action="version", version=f"moeguard {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only print results and errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="print debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    _remember_parsers(parser)
    return parser


def _remember_parsers(parser: argparse.ArgumentParser) -> None:
    """Every (sub)command's parser knows itself, so an error can be worded with the flags of the command that ran."""
    parser.set_defaults(command_parser=parser)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                _remember_parsers(child)


def configure_logging(quiet: bool, verbose: bool) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("moeguard")
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False
    # transformers and datasets are chatty at INFO; their warnings still show.
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error() if not verbose else hf_logging.set_verbosity_warning()


def resume_hint(args: argparse.Namespace, argv: list[str]) -> str:
    """What to do after Ctrl-C: the command that continues the interrupted work, when there is one."""
    resume_with = getattr(args, "resume_with", None)
    if resume_with is None:
        return "interrupted."
    words = ["moeguard", *argv]
    if resume_with and resume_with not in argv:
        words.append(resume_with)
    return f"interrupted; finished work is kept. To resume, run: {shlex.join(words)}"


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[list[int]]:
    """Within the block Ctrl-C is noted (in the yielded list) instead of raised.

    Start-up imports torch and transformers, seconds in which Ctrl-C is likely; an
    interrupt there would break an import half-way and end in a traceback, so it is
    acted on once the imports are done.
    """
    noted: list[int] = []
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield noted
        return
    previous = signal.signal(signal.SIGINT, lambda number, frame: noted.append(number))
    try:
        yield noted
    finally:
        signal.signal(signal.SIGINT, previous)


def main(argv: list[str] | None = None) -> int:
    # Idle OpenMP threads sleep instead of spinning (before torch loads): on a machine
    # shared with other work, spinning threads stall every parallel region, which made
    # evaluation and training steps 10x slower on a busy 2-core machine.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    argv = list(sys.argv[1:] if argv is None else argv)
    with interrupts_deferred() as interrupted:
        parser = build_parser()
        args = parser.parse_args(argv)
        if getattr(args, "run", None):
            configure_logging(args.quiet, args.verbose)
    if interrupted:
        print("moeguard: interrupted before any work started.", file=sys.stderr)
        return 130
    if not getattr(args, "run", None):
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        return int(args.run(args) or 0)
    except MoeGuardError as error:
        from moeguard.cli.common import cli_message, command_flags

        print(f"moeguard {args.command}: error: {cli_message(error, command_flags(args.command_parser))}", file=sys.stderr)
        return 2
    except InternalError as error:
        traceback.print_exc()
        print(f"moeguard {args.command}: internal error (a bug in moeguard, please report it with the traceback above): "
              f"{error}", file=sys.stderr)
        return 3
    except OSError as error:  # the file system refused (permissions, disk full, ...): say which file and why
        where = f" {error.filename}" if error.filename else ""
        print(f"moeguard {args.command}: error: cannot access{where}: {error.strerror or error}.", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"moeguard {args.command}: {resume_hint(args, argv)}", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
