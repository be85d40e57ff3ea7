"""``moeguard audit``: the whole attack on a model, measured, with a report (the main job)."""

from __future__ import annotations

import argparse

from moeguard.cli.common import add_model_arguments, parse_int_list
from moeguard.errors import InputError


def register(subparsers: argparse._SubParsersAction) -> None:
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
    source.add_argument("--data", action="append", default=[],
                        help="JSONL task file (prompt/answer or choice lines; repeat for several tasks); a held-out "
                        "share is the test set, the rest the attacker's pool")
    parser.add_argument("--compare", help="a defended version of the model, audited the same way side by side")
    parser.add_argument("--budget", type=int, help="labels the re-aligning attacker may use per run (default 64; quick 24)")
    parser.add_argument("--quick", action="store_true", help="a smaller, faster audit (about 3 minutes on the demo model)")
    parser.add_argument("--out", default="audit", help="output directory (default: ./audit)")
    parser.add_argument("--keep", help="experts per layer to sweep, comma-separated (default: 100/75/50/37.5/25%% of them)")
    parser.add_argument("--criteria", help="attribution criteria to attack with (default: frequency,reap, plus ablation for models with at most "
                        "256 routed experts in all; quick: frequency)")
    parser.add_argument("--acquisition", help="active-learning acquisition function (default: entropy)")
    parser.add_argument("--train", dest="scope", help="what re-alignment trains: router, experts, attention, all, lora (default: all)")
    parser.add_argument("--rounds", type=int, help="active-learning rounds per run (default 4; quick 3)")
    parser.add_argument("--steps-per-round", type=int, help="optimizer steps per round (default 25; quick 12)")
    parser.add_argument("--lr", type=float, help="re-alignment learning rate (default 1e-3)")
    parser.add_argument("--test-size", type=int, help="test examples per task (default 100; quick 40)")
    parser.add_argument("--target", type=float, help="accuracy share the attacker must keep (default 0.9)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, the seed sets and the random baselines")
    parser.add_argument("--json", action="store_true", help="print report.json's headline rows as JSON")
    parser.set_defaults(run=run, resume_with="")


def config_from_args(args: argparse.Namespace):
    from moeguard.audit import AuditConfig
    from moeguard.data import resolve_task_names

    overrides = {
        "model": args.model, "data": list(args.data), "compare": args.compare, "out": args.out, "seed": args.seed,
        "dtype": args.dtype, "device": args.device, "device_map": args.device_map, "trust_remote_code": args.trust_remote_code,
    }
    if args.task:
        overrides["tasks"] = resolve_task_names(args.task)
    for name, field in (("budget", "budget"), ("acquisition", "acquisition"), ("scope", "scope"), ("rounds", "rounds"),
                        ("steps_per_round", "steps_per_round"), ("lr", "lr"), ("test_size", "test_size"),
                        ("target", "target_retention")):
        if getattr(args, name) is not None:
            overrides[field] = getattr(args, name)
    if args.keep:
        overrides["keeps"] = parse_int_list(args.keep, what="--keep")
    if args.criteria:
        names = tuple(part.strip() for part in args.criteria.split(",") if part.strip())
        if not names:
            raise InputError(f"--criteria is empty ({args.criteria!r}); name at least one criterion, e.g. frequency.")
        overrides["criteria"] = names
    return AuditConfig.quick_preset(**overrides) if args.quick else AuditConfig(**overrides)


def run(args: argparse.Namespace) -> int:
    from moeguard.audit import run_audit
    from moeguard.cli.common import print_json

    report = run_audit(config_from_args(args), progress=not args.quiet)
    if args.json:
        print_json(report.headline())
    else:
        print(report.describe())
    return 0
