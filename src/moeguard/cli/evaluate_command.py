"""``moeguard evaluate``: score a model on built-in tasks or a data file."""

from __future__ import annotations

import argparse

from moeguard.cli.common import add_model_arguments, load_model, print_json
from moeguard.errors import InputError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate", help="score a model: exact match, multiple-choice accuracy or perplexity, per task"
    )
    add_model_arguments(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--task", help="built-in task name(s), comma-separated, or 'all'")
    source.add_argument("--data", help="a JSONL file in the data contract, or a datasets source (file, directory or hub id)")
    source.add_argument("--lm-eval", metavar="TASKS", help="lm-evaluation-harness task names, comma-separated (needs the lm-eval extra)")
    parser.add_argument("--lm-eval-include", metavar="DIR", help="with --lm-eval: a directory of extra harness task YAML files")
    parser.add_argument("--split", default=None, help="split: train|pool|test for --task (default test); dataset split for --data (default train)")
    parser.add_argument("--columns", default=None, help="for a datasets source: field=column pairs, e.g. prompt=question,answer=solution")
    parser.add_argument("--limit", type=int, default=None, help="evaluate on the first N examples of each task")
    parser.add_argument("--batch-size", type=int, default=64, help="examples per batch (default: 64)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="generation cap (default: longest answer + 3)")
    parser.add_argument("--json", action="store_true", help="print JSON (same numbers) instead of a table")
    parser.add_argument("--per-example", action="store_true", help="with --json: include each example's prediction and correctness")
    parser.set_defaults(run=run, argument_flags={"include_path": "--lm-eval-include"})


def parse_columns(text: str | None) -> dict[str, str] | None:
    """``"prompt=question,answer=solution"`` -> ``{"prompt": "question", "answer": "solution"}``."""
    if not text:
        return None
    mapping = {}
    for part in text.split(","):
        field, sep, column = part.partition("=")
        if not sep or not field.strip() or not column.strip():
            raise InputError(f"--columns takes field=column pairs separated by commas, e.g. prompt=question,answer=solution; got {part!r}.")
        mapping[field.strip()] = column.strip()
    return mapping


def load_datas(args: argparse.Namespace) -> list:
    from moeguard.data import load_hf_dataset, load_jsonl, load_task, resolve_task_names

    if args.task is not None:
        if args.columns:
            raise InputError("--columns applies to --data sources only.")
        split = args.split or "test"
        return [load_task(name, split, limit=args.limit) for name in resolve_task_names(args.task)]
    if args.data.endswith(".jsonl") and args.columns is None:
        return [load_jsonl(args.data).head(args.limit)]
    return [load_hf_dataset(args.data, split=args.split or "train", columns=parse_columns(args.columns), limit=args.limit)]


def format_table(results: dict) -> str:
    rows = [("task", "metric", "value", "95% CI", "n", "seconds")]
    for result in results.values():
        rows.append(
            (result.task, result.metric, f"{result.value:.4f}", f"{result.ci_low:.4f}-{result.ci_high:.4f}", str(result.n), f"{result.seconds:.2f}")
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))) for row in rows)


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
