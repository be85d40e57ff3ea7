"""``moeguard evaluate``: score a model on built-in tasks or a data file."""

from __future__ import annotations

import argparse

from moeguard.cli.common import add_dataset_arguments, add_model_arguments, load_model, print_json, user_task
from moeguard.errors import InputError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate", help="score a model per task: generated answers (exact match, ROUGE-L, ...), multiple-choice accuracy, "
        "language-modelling loss and perplexity"
    )
    add_model_arguments(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--task", help="built-in task name(s), comma-separated, or 'all'")
    source.add_argument("--data", help="a JSONL file in the data contract (an optional first line declares the metric)")
    source.add_argument("--lm-eval", metavar="TASKS", help="lm-evaluation-harness task names, comma-separated (needs the lm-eval extra)")
    add_dataset_arguments(parser, source)
    parser.add_argument("--lm-eval-include", metavar="DIR", help="with --lm-eval: a directory of extra harness task YAML files")
    parser.add_argument("--split", default=None, help="split: train|pool|test for --task (default test); dataset split for "
                        "--hf-dataset (default train)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate on the first N examples of each task")
    parser.add_argument("--batch-size", type=int, default=64, help="examples per batch (default: 64)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="generation cap (default: longest answer + 3)")
    parser.add_argument("--json", action="store_true", help="print JSON (same numbers) instead of a table")
    parser.add_argument("--per-example", action="store_true", help="with --json: include each example's prediction and correctness")
    parser.set_defaults(run=run, argument_flags={"include_path": "--lm-eval-include"})


def load_datas(args: argparse.Namespace) -> list:
    from moeguard.data import load_task, resolve_task_names

    if args.task is not None:
        user_task(args)  # refuses --metric / --answer-pattern for built-in tasks
        return [load_task(name, args.split or "test", limit=args.limit) for name in resolve_task_names(args.task)]
    return [user_task(args, split=args.split or "train", limit=args.limit)]


def format_table(results: dict) -> str:
    """One row per task: its metric, value and interval (a language-modelling loss also as a perplexity, with the
    unigram entropy it is compared with)."""
    rows = [("task", "metric", "value", "95% CI", "n", "seconds", "")]
    for result in results.values():
        note = f"perplexity {result.perplexity:.4f}, unigram {result.reference:.4f}" if result.perplexity is not None else ""
        rows.append((result.task, result.metric, f"{result.value:.4f}", f"{result.ci_low:.4f}-{result.ci_high:.4f}",
                     str(result.n), f"{result.seconds:.2f}", note))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) if i < 2 or i == 6 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
                     .rstrip() for row in rows)


def run_harness(args: argparse.Namespace) -> int:
    from moeguard.eval.lm_eval_bridge import run_lm_eval

    tasks = [task.strip() for task in args.lm_eval.split(",") if task.strip()]
    moe = load_model(args)
    results = run_lm_eval(moe, tasks, include_path=args.lm_eval_include, limit=args.limit, batch_size=args.batch_size)
    if args.json:
        print_json({"model": moe.source, "fingerprint": moe.fingerprint(), "lm_eval": results})
        return 0
    for task, metrics in results.items():
        for metric, value in metrics.items():
            print(f"{task:<24} {metric:<24} {value:.4f}")
    return 0


def run(args: argparse.Namespace) -> int:
    from moeguard.eval import evaluate_tasks

    if args.limit is not None and args.limit < 1:
        raise InputError(f"--limit must be a positive integer, got {args.limit}.")
    if args.lm_eval_include and not args.lm_eval:
        raise InputError("--lm-eval-include applies to --lm-eval only.")
    if args.lm_eval:
        return run_harness(args)
    datas = load_datas(args)
    moe = load_model(args)
    results = evaluate_tasks(moe, None, datas, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    if args.json:
        print_json({"model": moe.source, "fingerprint": moe.fingerprint(), "results": {name: r.to_dict(per_example=args.per_example) for name, r in results.items()}})
    else:
        print(format_table(results))
    return 0
