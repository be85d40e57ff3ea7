"""``moeguard harden``: fine-tune an MoE with a defense, then write it with its fine-tuning protocol."""

from __future__ import annotations

import argparse
from pathlib import Path

from moeguard.cli.common import add_config_arguments, add_model_arguments, config_from_args, describe_choices, load_model, parse_list, print_json
from moeguard.defense.attacker import ATTACKER_TRAINABLES
from moeguard.defense.harden import HardenSettings
from moeguard.defense.objective import METHODS, DefenseConfig
from moeguard.defense.protocol import DEFAULT_PERMITTED
from moeguard.watermark.triggers import DEFAULT_TRIGGERS_PER_TASK


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "harden",
        help="fine-tune an MoE with entangled expert training and/or simulated-attacker training",
        description=(
            "Fine-tune MODEL on its tasks with the defense objective (see README, Defenses), evaluate every task "
            "before and after, and write the hardened model with a selective fine-tuning protocol "
            "(moeguard_protocol.json) and harden_report.json to --out. Rerun the same command to resume."
        ),
    )
    add_model_arguments(parser)
    budgets = "; ".join(f"{name} hardens with " + ", ".join(f"{k} {v:g}" for k, v in m.harden.items())
                        for name, m in METHODS.items() if m.harden)
    parser.add_argument("--method", default="entangle",
                        help="the defense (default entangle), or several joined by '+' (e.g. entangle+watermark): "
                        + describe_choices(METHODS) + (f" ({budgets} unless given below)" if budgets else ""))
    parser.add_argument("--tasks", default="all", help="built-in tasks the model must stay good at ('all' or a,b,c)")
    parser.add_argument("--data", action="append", default=[], metavar="JSONL",
                        help="a task of your own (JSONL, one task per file; repeatable), instead of --tasks")
    parser.add_argument("--strength", type=float, default=1.0, help="multiply every term's weight (default: 1)")
    terms = DefenseConfig()
    parser.add_argument("--margin", type=float, default=None, help=f"gamma = L(full) + margin, nats (default: {terms.margin:g})")
    parser.add_argument("--keep-counts", default=None, help="subset sizes to defend against, comma-separated "
                        f"(default: {','.join(map(str, terms.keep_counts))})")
    parser.add_argument("--attacker-trainables", choices=ATTACKER_TRAINABLES, default=None,
                        help=f"what the simulated attacker fine-tunes (default: {terms.attacker_trainables})")
    add_config_arguments(parser, HardenSettings)
    parser.add_argument("--key", default=None, help="watermark key (or --key-file, or $MOEGUARD_WATERMARK_KEY); keep it secret")
    parser.add_argument("--key-file", default=None, help="a file whose first line is the watermark key")
    parser.add_argument("--triggers-per-task", type=int, default=None,
                        help=f"watermark triggers per task verification asks (default: {DEFAULT_TRIGGERS_PER_TASK})")
    parser.add_argument("--watermark-record", default=None,
                        help="where to write the watermark record verification needs besides the key "
                        "(default: <out>.watermark.json beside --out, not inside the released model)")
    parser.add_argument("--train-examples", type=int, default=4000, help="training examples per built-in task")
    parser.add_argument("--eval-examples", type=int, default=200, help="test examples per task for the before/after check")
    parser.add_argument("--permit", default=",".join(DEFAULT_PERMITTED),
                        help="groups the written protocol lets an authorised fine-tune change")
    parser.add_argument("--out", required=True, help="directory of the hardened model")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(run=run, resume_with="")


def run(args: argparse.Namespace) -> int:
    from moeguard.defense.harden import harden_to_directory, load_defense_tasks, method_settings
    from moeguard.defense.objective import defense_config
    from moeguard.io import check_output
    from moeguard.zoo import local_model_path

    check_output(args.out, inputs=[local_model_path(args.model), *args.data], overwrite=args.overwrite, directory=True)

    overrides = {}
    if args.margin is not None:
        overrides["margin"] = args.margin
    if args.keep_counts is not None:
        overrides["keep_counts"] = tuple(parse_list(args.keep_counts, int, what="--keep-counts"))
    if args.attacker_trainables is not None:
        overrides["attacker_trainables"] = args.attacker_trainables
    config = defense_config(args.method, strength=args.strength, **overrides)
    settings = config_from_args(args, HardenSettings, method_settings(args.method))
    train_tasks, test_tasks = load_defense_tasks(args.tasks, args.data, train_examples=args.train_examples,
                                                 eval_examples=args.eval_examples, seed=settings.seed)
    watermark, record_path = None, None
    if config.watermark:
        watermark = watermark_of(args, train_tasks)
        record_path = Path(args.watermark_record or f"{Path(args.out)}.watermark.json")
    moe = load_model(args)
    permitted = parse_list(args.permit, what="--permit")
    report = harden_to_directory(
        moe, train_tasks, test_tasks, config, settings, out=args.out, permitted=permitted, overwrite=args.overwrite,
        method=args.method, watermark=watermark, progress=not args.quiet,
    )
    if watermark is not None:
        watermark.record.save(record_path)
    if args.json:
        print_json(report)
        return 0
    print(f"hardened {args.model} with {args.method} ({', '.join(config.active_terms)}) in {report['harden']['wall_seconds']:.0f}s "
          f"-> {args.out}")
    for task, before, after in zip(report["tasks"], report["accuracy_before"], report["accuracy_after"]):
        print(f"  {task:<12} accuracy {before:.3f} -> {after:.3f}")
    print(f"  protocol: {args.out}/moeguard_protocol.json (permitted: {', '.join(permitted)})")
    if watermark is not None:
        verdict = report["watermark"]["verdict"]
        print(f"  watermark: {verdict['matches']}/{verdict['triggers']} triggers answered, p = {verdict['p_value']:.3g}; "
              f"record {record_path} (keep it with the key; it holds nothing secret, but publish only the model)")
    return 0


def watermark_of(args: argparse.Namespace, train_tasks):
    """The watermark of the key on the tasks hardened: built-in generation tasks by name (a trigger asks for a
    generated response; the other tasks are hardened without one), data files by their format."""
    from moeguard.watermark import Watermark, builtin_record, data_record, read_key
    from moeguard.watermark.triggers import generation_tasks

    count = args.triggers_per_task or DEFAULT_TRIGGERS_PER_TASK
    key = read_key(args.key, args.key_file)
    if args.data:
        return Watermark(data_record(train_tasks, triggers_per_task=count), key)
    return Watermark(builtin_record(generation_tasks([task.name for task in train_tasks]), triggers_per_task=count), key)
