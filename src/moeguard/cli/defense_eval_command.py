"""``moeguard defense-eval``: the undefended model vs defended ones, under the same attacks and budgets."""

from __future__ import annotations

import argparse

from moeguard.cli.common import add_model_arguments, parse_int_list, parse_name_list, print_json
from moeguard.defense.evaluation import DefenseEvalSettings
from moeguard.errors import InputError

DEFAULTS = DefenseEvalSettings()


def _floats(text: str, what: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in parse_name_list(text))
    except ValueError:
        raise InputError(f"{what} must be a comma-separated list of numbers, got {text!r}.") from None
    if not values:
        raise InputError(f"{what} is empty; give at least one number.")
    return values


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "defense-eval",
        help="decide whether a defense works: utility, knowledge loss, attack cost over an attacker grid, "
        "adaptive attacks, authorised use",
        description=(
            "Evaluate the undefended model and each defended model with the same data and budgets (see "
            "moeguard.defense.evaluation). Every attack run is saved when it finishes; rerun the same command to "
            "continue an interrupted evaluation. Writes OUT/defense_eval.json, OUT/defense_eval.md and OUT/figures/."
        ),
    )
    add_model_arguments(parser, help="the undefended model (directory, hub id or 'demo')")
    parser.add_argument("--defended", action="append", required=True, metavar="NAME=PATH",
                        help="a defended model and the name it gets in the tables (repeatable)")
    parser.add_argument("--out", required=True, help="output directory (also holds the per-run cache)")
    parser.add_argument("--target-task", default=DEFAULTS.target_task, help="the attacker's task (built-in)")
    parser.add_argument("--tasks", default=",".join(DEFAULTS.tasks), help="tasks whose utility is measured")
    parser.add_argument("--keeps", default=",".join(map(str, DEFAULTS.keeps)), help="keep counts of the knowledge loss")
    parser.add_argument("--attack-keeps", default=",".join(map(str, DEFAULTS.attack_keeps)),
                        help="keep counts the attacker prunes to and re-aligns (each a full grid)")
    parser.add_argument("--criteria", default=",".join(DEFAULTS.criteria))
    parser.add_argument("--scopes", default=",".join(DEFAULTS.scopes), help="what the attacker fine-tunes")
    parser.add_argument("--lrs", default=",".join(f"{lr:g}" for lr in DEFAULTS.lrs))
    parser.add_argument("--seeds", default=",".join(map(str, DEFAULTS.seeds)))
    parser.add_argument("--acquisition", default=DEFAULTS.acquisition)
    parser.add_argument("--budget", type=int, default=DEFAULTS.budget, help="labels per attack run")
    parser.add_argument("--rounds", type=int, default=DEFAULTS.rounds)
    parser.add_argument("--steps-per-round", type=int, default=DEFAULTS.steps_per_round)
    parser.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size)
    parser.add_argument("--pool-size", type=int, default=DEFAULTS.pool_size)
    parser.add_argument("--test-size", type=int, default=DEFAULTS.test_size)
    parser.add_argument("--permit", default=",".join(DEFAULTS.permitted), help="groups the authorised fine-tune trains")
    parser.add_argument("--authorised-steps", type=int, default=DEFAULTS.authorised_steps)
    parser.add_argument("--json", action="store_true", help="print the result as JSON instead of the tables")
    parser.set_defaults(run=run, resume_with="")


def settings_from(args: argparse.Namespace) -> DefenseEvalSettings:
    return DefenseEvalSettings(
        target_task=args.target_task,
        tasks=tuple(parse_name_list(args.tasks)),
        keeps=tuple(parse_int_list(args.keeps, what="--keeps")),
        attack_keeps=tuple(parse_int_list(args.attack_keeps, what="--attack-keeps")),
        criteria=tuple(parse_name_list(args.criteria)),
        scopes=tuple(parse_name_list(args.scopes)),
        lrs=_floats(args.lrs, "--lrs"),
        seeds=tuple(parse_int_list(args.seeds, what="--seeds")),
        acquisition=args.acquisition,
        budget=args.budget,
        rounds=args.rounds,
        steps_per_round=args.steps_per_round,
        batch_size=args.batch_size,
        pool_size=args.pool_size,
        test_size=args.test_size,
        permitted=tuple(parse_name_list(args.permit)),
        authorised_steps=args.authorised_steps,
    )


def run(args: argparse.Namespace) -> int:
    from moeguard.defense.evaluation import evaluate_defenses
    from moeguard.defense.report import markdown_tables, write_report
    from moeguard.models.options import LoadOptions
    from moeguard.zoo import resolve_model_source

    models = {"undefended": args.model}
    for entry in args.defended:
        name, _, path = entry.partition("=")
        if not name or not path or name in models:
            raise InputError(f"--defended {entry!r}: give NAME=PATH with a new name (taken: {', '.join(models)}).")
        models[name] = path
    settings = settings_from(args)
    settings.check()
    loading = LoadOptions(dtype=args.dtype, device=args.device, device_map=args.device_map,
                          trust_remote_code=args.trust_remote_code)
    sources = {name: resolve_model_source(path, progress=not args.quiet) for name, path in models.items()}
    result = evaluate_defenses(sources, settings, args.out, loading=loading, progress=not args.quiet)
    write_report(result, args.out)
    print_json(result.to_dict()) if args.json else print(markdown_tables(result))
    return 0
