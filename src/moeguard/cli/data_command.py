"""``moeguard data``: the built-in tasks, and exporting them in the JSONL contract."""

from __future__ import annotations

import argparse
from pathlib import Path

from moeguard.cli.common import print_json


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="list the built-in tasks or export one as JSONL")
    commands = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)

    listing = commands.add_parser("list", help="list the built-in tasks with an example of each")
    listing.add_argument("--json", action="store_true", help="print JSON instead of text")
    listing.set_defaults(run=run_list)

    export = commands.add_parser("export", help="write a built-in task's split in the JSONL contract")
    export.add_argument("--task", required=True, help="built-in task name (see `moeguard data list`)")
    export.add_argument("--split", choices=("train", "pool", "test"), default="test", help="which split (default: test)")
    export.add_argument("--out", required=True, type=Path, help="output JSONL file")
    export.add_argument("--limit", type=int, default=None, help="number of examples (default: the split's standard size)")
    export.add_argument("--seed", type=int, default=0, help="seed of the example stream (default: 0)")
    export.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    export.set_defaults(run=run_export)


def shown(example) -> str:
    """One example as a line: prompt + answer, prompt + [choices] -> the right one, or the text."""
    if example.kind == "lm":
        return example.text
    if example.kind == "choice":
        return f"{example.prompt} {list(example.choices)} -> {example.target}"
    return f"{example.prompt}{example.answer}"


def run_list(args: argparse.Namespace) -> int:
    from moeguard.data import BUILTIN_TASKS, TASK_SPECS, load_task
    from moeguard.data.task_types import check_metric
    from moeguard.data.tasks import DEFAULT_SIZES

    rows = []
    for name in BUILTIN_TASKS:
        data = load_task(name, "test", limit=1)
        rows.append({"task": name, "kind": data.kind, "metric": check_metric(data.kind, data.metric, name),
                     "skill": TASK_SPECS[name].skill, "example": data.examples[0].to_json(),
                     "shown": shown(data.examples[0])})
    if args.json:
        print_json({"tasks": [{k: v for k, v in row.items() if k != "shown"} for row in rows], "split_sizes": DEFAULT_SIZES})
        return 0
    width, skill = max(len(row["task"]) for row in rows), max(len(row["skill"]) for row in rows)
    for row in rows:
        print(f"{row['task']:<{width}}  {row['kind']:<8}  {row['metric']:<15}  {row['skill']:<{skill}}  e.g. {row['shown']}")
    sizes = ", ".join(f"{split} {size:,}" for split, size in DEFAULT_SIZES.items())
    print(f"\nsplits (disjoint prompts): {sizes} examples per task by default")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from moeguard.data import load_task, save_jsonl
    from moeguard.io import check_output

    check_output(args.out, overwrite=args.overwrite)
    data = load_task(args.task, args.split, limit=args.limit, seed=args.seed)
    path = save_jsonl(data, args.out, overwrite=args.overwrite)
    print(f"wrote {len(data)} {data.kind} examples of {args.task} ({args.split}) to {path}")
    return 0
