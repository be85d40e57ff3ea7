"""``moeguard sweep``: the knowledge-loss sweep over criteria and keep counts, in mask mode."""

from __future__ import annotations

import argparse
from pathlib import Path

from moeguard.attribution import CRITERIA, DEFAULT_CRITERIA, TOKEN_MODES
from moeguard.cli.common import (
    add_dataset_arguments,
    add_model_arguments,
    describe_choices,
    load_model,
    parse_list,
    print_json,
    task_names,
    user_task,
)
from moeguard.errors import InputError


TABLE_NAME, FIGURE_NAME = "sweep.csv", "knowledge_loss.png"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sweep",
        help="accuracy kept on a task and lost on the others as experts are pruned, per criterion (mask mode)",
        description="Evaluate every (criterion, keep) plan in mask mode: target task accuracy, every other built-in "
        "task's accuracy and perplexity, against random and least-used baselines. Writes sweep.json, sweep.csv and "
        "knowledge_loss.png into --out; rerunning the same command continues an interrupted sweep.",
    )
    add_model_arguments(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--task", help="built-in task name, or a JSONL file (then it is also the attribution data unless "
                        "--attribution)")
    add_dataset_arguments(parser, source)
    parser.add_argument("--split", default="train", help="split of --hf-dataset (default train)")
    parser.add_argument("--out", required=True, help="output directory (resumable)")
    parser.add_argument("--attribution", help="attribution JSON of --task on this model (default: computed on the task's train split)")
    parser.add_argument("--criteria", default=",".join(DEFAULT_CRITERIA),
                        help=f"criteria to sweep, comma-separated (default {','.join(DEFAULT_CRITERIA)}): "
                        + describe_choices(CRITERIA))
    parser.add_argument("--tokens", choices=TOKEN_MODES, default="all",
                        help="tokens the attribution counts when it is computed here: all, prompt or answer")
    parser.add_argument("--attribution-samples", type=int, default=256,
                        help="training examples the attribution is computed on (default: 256)")
    parser.add_argument("--keep", help="experts kept per layer, comma-separated (default: 100/75/50/37.5/25%% of the experts)")
    parser.add_argument("--baseline-criterion", choices=[c for c, entry in CRITERIA.items() if not entry.baseline], default="frequency",
                        help="criterion whose least-used experts form the least-used baseline")
    parser.add_argument("--random-seeds", default="0", help="seeds of the random baseline, averaged (e.g. 0,1,2)")
    parser.add_argument("--other-tasks", default="all",
                        help="built-in tasks whose accuracy measures knowledge lost: 'all', 'none' or a list")
    parser.add_argument("--limit", type=int, default=100, help="test examples per task (default: 100)")
    parser.add_argument("--perplexity-data", help="JSONL of {\"text\": ...} lines (default: the evaluated tasks' text)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.set_defaults(run=run, resume_with="")


def run(args: argparse.Namespace) -> int:
    from moeguard.attribution import Attribution
    from moeguard.data import BUILTIN_TASKS, load_jsonl
    from moeguard.io import atomic_write_text, check_output
    from moeguard.pruning.figures import knowledge_loss_figure
    from moeguard.pruning.sweep import RESULT_NAME, rows_to_csv, run_sweep
    from moeguard.zoo import local_model_path

    criteria = parse_list(args.criteria, what="--criteria", choices=CRITERIA, noun="criteria")
    keeps = parse_list(args.keep, int, what="--keep") if args.keep else None
    random_seeds = parse_list(args.random_seeds, int, what="--random-seeds")
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be a positive integer, got {args.batch_size}.")
    task_file = args.task if args.task and args.task not in BUILTIN_TASKS and Path(args.task).suffix else None
    check_output(args.out, inputs=[local_model_path(args.model), args.attribution, task_file, args.hf_dataset,
                                   args.perplexity_data], directory=True, resumable=True)
    if args.hf_dataset:
        task = user_task(args, split=args.split)
    elif task_file:
        task = load_jsonl(task_file, metric=args.metric, answer_pattern=args.answer_pattern)
    else:
        user_task(args)  # refuses --metric / --answer-pattern for built-in tasks
        task = args.task
    others = task_names(args.other_tasks)
    perplexity_data = load_jsonl(args.perplexity_data) if args.perplexity_data else None
    if args.attribution:
        Attribution.load(args.attribution)  # a bad attribution is reported before the model is loaded
    moe = load_model(args)
    result = run_sweep(
        moe,
        task,
        out_dir=args.out,
        attribution=args.attribution,
        criteria=criteria,
        keeps=keeps,
        baseline_criterion=args.baseline_criterion,
        random_seeds=random_seeds,
        other_tasks=others,
        limit=args.limit,
        perplexity_data=perplexity_data,
        attribution_limit=args.attribution_samples,
        tokens=args.tokens,
        batch_size=args.batch_size,
        progress=not args.quiet,
    )
    out = Path(args.out)
    atomic_write_text(out / TABLE_NAME, rows_to_csv(result.rows()))
    knowledge_loss_figure(result, out / FIGURE_NAME)
    if args.json:
        print_json(result.to_dict())
    else:
        print(result.describe())
        print(f"wrote {out / RESULT_NAME}, {out / TABLE_NAME}, {out / FIGURE_NAME}")
    return 0
