"""``moeguard realign``: recover a pruned model's task accuracy by active-learning-driven fine-tuning."""

from __future__ import annotations

import argparse
from pathlib import Path

from moeguard.cli.common import (
    add_config_arguments,
    add_dataset_arguments,
    add_model_arguments,
    config_from_args,
    load_model,
    print_json,
    task_names,
    user_task,
)

FIGURE_NAME = "recovery.png"


def register(subparsers: argparse._SubParsersAction) -> None:
    from moeguard.realign import RealignConfig

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
    source.add_argument("--data", help="JSONL file of the target task (prompt/answer, choice or text lines) used as the pool")
    add_dataset_arguments(parser, source)
    parser.add_argument("--split", default="train", help="split of --hf-dataset (default train)")
    parser.add_argument("--test-data", help="JSONL test set for --data (default: hold out --test-fraction of --data)")
    parser.add_argument("--test-fraction", type=float, default=0.2,
                        help="share of --data or --hf-dataset held out as test set (default 0.2)")
    add_config_arguments(parser, RealignConfig, flags={"scope": "--train", "target_retention": "--target"})
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


def realign_data(args: argparse.Namespace, config):
    """The pool, test set and other tasks the options describe."""
    from moeguard.data import load_task
    from moeguard.errors import InputError
    from moeguard.realign.inputs import builtin_data, file_data, held_out

    names = task_names(args.other_tasks) if args.other_tasks is not None else None if args.task else []
    if args.task:
        user_task(args)  # refuses --metric / --answer-pattern for built-in tasks
        return builtin_data(args.task, pool_size=args.pool_size, test_size=args.test_size, other_size=args.other_size,
                            other_tasks=names, seed=config.seed)
    others = [load_task(name, "test", limit=args.other_size) for name in names or []]
    if args.hf_dataset:
        if args.test_data:
            raise InputError("--test-data goes with --data; a dataset's test set is held out of it (--test-fraction).")
        return held_out(user_task(args, split=args.split), test_fraction=args.test_fraction, seed=config.seed, others=others)
    return file_data(args.data, test_path=args.test_data, test_fraction=args.test_fraction, seed=config.seed, others=others,
                     metric=args.metric, answer_pattern=args.answer_pattern)


def run(args: argparse.Namespace) -> int:
    from moeguard.distributed import is_main, process_group_from_environment
    from moeguard.io import check_output
    from moeguard.realign import RealignConfig, realign
    from moeguard.realign.figures import recovery_figure
    from moeguard.zoo import local_model_path, resolve_model_source

    check_output(args.out, inputs=[local_model_path(args.model), local_model_path(args.parent), args.data, args.test_data],
                 directory=True, resumable=True)
    config = config_from_args(args, RealignConfig)
    data = realign_data(args, config)
    config.check(len(data.pool))
    parent = resolve_model_source(args.parent, progress=not args.quiet) if args.parent else None
    with process_group_from_environment():  # joined before loading, so each process loads onto its own device
        result = realign(load_model(args), data, config, parent=parent, out=args.out, resume=args.resume,
                         progress=not args.quiet)
        if not is_main():
            return 0  # under a multi-process launcher the first process reports
    recovery_figure({config.acquisition: [result]}, Path(args.out) / FIGURE_NAME)
    if args.json:
        print_json(result.to_dict())
    else:
        print(result.describe())
        print(f"written to {args.out}: {'model/, ' if result.model_dir else ''}history.json, {FIGURE_NAME}")
    return 0
