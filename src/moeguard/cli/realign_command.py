"""``moeguard realign``: recover a pruned model's task accuracy by active-learning-driven fine-tuning."""

from __future__ import annotations

import argparse
from pathlib import Path

from moeguard.cli.common import add_model_arguments, describe_choices, load_model, print_json


FIGURE_NAME = "recovery.png"


def register(subparsers: argparse._SubParsersAction) -> None:
    from moeguard.realign import ACQUISITIONS, TRAIN_SCOPES

    parser = subparsers.add_parser(
        "realign",
        help="fine-tune a pruned model on a label budget chosen by active learning; write recovery curves",
        description="Re-align a model written by `moeguard prune`: label a random seed set of the pool, then each round "
        "fine-tune, score the unlabelled pool and label the best batch, until the label budget is spent. "
        "Retention is measured against the unpruned parent named in the model's manifest (or --parent). "
        "Writes OUT/model (the re-aligned model), OUT/history.json and OUT/recovery.png; "
        "state is saved after every round, so an interrupted run continues with --resume.",
    )
    add_model_arguments(parser, help="pruned model directory written by `moeguard prune`")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--task", help="built-in target task (its pool split is labelled, its test split measured)")
    source.add_argument("--data", help="JSONL file of the target task (generate or choice examples) used as the pool")
    parser.add_argument("--test-data", help="JSONL test set for --data (default: hold out --test-fraction of --data)")
    parser.add_argument("--test-fraction", type=float, default=0.2, help="share of --data held out as test set (default 0.2)")
    parser.add_argument("--budget", type=int, required=True, help="number of pool examples that may be labelled")
    parser.add_argument("--seed-size", type=int, help="random labels before the first round (default: budget / rounds)")
    parser.add_argument("--rounds", type=int, default=4, help="fine-tuning rounds (default 4)")
    parser.add_argument("--acquisition", choices=list(ACQUISITIONS), default="random",
                        help="how the next examples are chosen: " + describe_choices(ACQUISITIONS))
    parser.add_argument("--train", choices=list(TRAIN_SCOPES), default="all", dest="scope",
                        help="what is fine-tuned (default all): " + describe_choices(TRAIN_SCOPES))
    parser.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (default 3e-4)")
    parser.add_argument("--steps-per-round", type=int, default=40, help="optimizer steps per round (default 40)")
    parser.add_argument("--batch-size", type=int, default=8, help="training batch size (global, default 8)")
    parser.add_argument("--lora-rank", type=int, default=8, help="LoRA rank with --train lora (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the seed set, the data order and the acquisition")
    parser.add_argument("--pool-size", type=int, default=512, help="pool examples of a built-in --task (default 512)")
    parser.add_argument("--test-size", type=int, default=200, help="test examples of a built-in --task (default 200)")
    parser.add_argument("--other-tasks", default=None,
                        help="built-in tasks whose accuracy is tracked too, comma-separated, or 'none' "
                        "(default: every other built-in task with --task, none with --data)")
    parser.add_argument("--other-size", type=int, default=100, help="test examples per other task (default 100)")
    parser.add_argument("--parent", help="the unpruned model (default: the parent named in the prune manifest)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(run=run, resume_with="--resume")


def realign_data(args: argparse.Namespace):
    """The pool, test set and other tasks the options describe."""
    from moeguard.data import load_task, resolve_task_names
    from moeguard.realign.inputs import builtin_data, file_data

    if args.other_tasks is None:
        names = None if args.task else []
    elif args.other_tasks.strip().lower() == "none":
        names = []
    else:
        names = resolve_task_names(args.other_tasks)
    if args.task:
        return builtin_data(args.task, pool_size=args.pool_size, test_size=args.test_size, other_size=args.other_size,
                            other_tasks=names, seed=args.seed)
    others = [load_task(name, "test", limit=args.other_size) for name in names or []]
    return file_data(args.data, test_path=args.test_data, test_fraction=args.test_fraction, seed=args.seed, others=others)


def run(args: argparse.Namespace) -> int:
    from moeguard.attribution.collect import distributed_world
    from moeguard.realign import RealignConfig, realign
    from moeguard.realign.figures import recovery_figure

    data = realign_data(args)
    config = RealignConfig(
        budget=args.budget, seed_size=args.seed_size, rounds=args.rounds, acquisition=args.acquisition, scope=args.scope,
        lr=args.lr, steps_per_round=args.steps_per_round, batch_size=args.batch_size, seed=args.seed,
        lora_rank=args.lora_rank,
    )
    config.check(len(data.pool))
    parent = args.parent
    if parent == "demo":
        from moeguard.zoo import demo_model_path

        parent = str(demo_model_path())
    result = realign(load_model(args), data, config, parent=parent, out=args.out, resume=args.resume, progress=not args.quiet)
    if distributed_world()[0] != 0:
        return 0  # under a multi-process launcher the first process reports
    recovery_figure({config.acquisition: [result]}, Path(args.out) / FIGURE_NAME)
    if args.json:
        print_json(result.to_dict())
    else:
        print(result.describe())
        print(f"written to {args.out}: {'model/, ' if result.model_dir else ''}history.json, {FIGURE_NAME}")
    return 0
