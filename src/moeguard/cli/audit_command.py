"""``moeguard audit``: the whole attack on a model, measured, with a report (the main job)."""

from __future__ import annotations

import argparse
import dataclasses

from moeguard.cli.common import add_config_arguments, add_model_arguments, config_from_args, loading_options, parse_list

# Flags whose names are not the field's.
FLAGS = {"tasks": "--task", "keeps": "--keep", "scope": "--train", "target_retention": "--target"}


def register(subparsers: argparse._SubParsersAction) -> None:
    from moeguard.audit import AuditConfig

    parser = subparsers.add_parser(
        "audit",
        help="how cheaply can a task model be carved out of this MoE? (default: the built-in demo model)",
        description="Run the attack end to end - evaluate, attribute experts per task, sweep pruning in mask mode, "
        "re-align the pruned model by active learning against random selection - and write report.json, a "
        "self-contained report.html and figures/ into --out. Every stage is cached under --out/.cache: rerunning "
        "the same command resumes an interrupted audit. With no arguments it audits the built-in demo model "
        "(trained on first use) on every built-in task.",
    )
    add_model_arguments(parser, required=False, help="model directory or hub id (default: 'demo', the built-in demo model)")
    parser.set_defaults(model="demo")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--task", help="built-in task(s), comma-separated, or 'all' (default: all built-in tasks)")
    source.add_argument("--data", action="append", default=[], help=AuditConfig.__dataclass_fields__["data"].metadata["help"])
    parser.add_argument("--quick", action="store_true", help=AuditConfig.__dataclass_fields__["quick"].metadata["help"])
    add_config_arguments(parser, AuditConfig, presets={"--quick": AuditConfig.quick_preset()}, flags=FLAGS,
                         exclude=("model", "tasks", "data", "quick", "loading"))
    parser.add_argument("--json", action="store_true", help="print report.json's headline rows as JSON")
    parser.set_defaults(run=run, resume_with="", argument_flags={"tasks": "--task"})


def config_from(args: argparse.Namespace):
    """The :class:`AuditConfig` the command line describes (on the ``--quick`` preset when given)."""
    from moeguard.audit import AuditConfig

    base = AuditConfig.quick_preset() if args.quick else AuditConfig()
    return dataclasses.replace(
        config_from_args(args, AuditConfig, base), model=args.model, data=list(args.data), loading=loading_options(args),
        tasks=parse_list(args.task, what="--task") if args.task else None,
    )


def run(args: argparse.Namespace) -> int:
    from moeguard.audit import run_audit
    from moeguard.cli.common import print_json

    report = run_audit(config_from(args), progress=not args.quiet)
    if args.json:
        print_json(report.headline())
    else:
        print(report.describe())
    return 0
