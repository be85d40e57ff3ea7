"""``moeguard zoo``: train the built-in demo MoE, or print where the cached one is."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    from moeguard.zoo import DemoConfig

    default = DemoConfig()
    parser = subparsers.add_parser("zoo", help="the built-in demo MoE: train one, or find (and first train) the cached one")
    commands = parser.add_subparsers(dest="zoo_command", metavar="SUBCOMMAND", required=True)

    train = commands.add_parser("train", help="train a demo MoE from scratch on the built-in tasks into a model directory")
    train.add_argument("--out", required=True, type=Path, help="output model directory")
    train.add_argument("--seed", type=int, default=0, help="seed for data and weights (default: 0)")
    train.add_argument("--experts", type=int, help=f"experts per MoE layer (default: {default.experts})")
    train.add_argument("--top-k", type=int, help=f"experts per token (default: {default.top_k})")
    train.add_argument("--layers", type=int, help=f"decoder layers, all MoE (default: {default.layers})")
    train.add_argument("--hidden", type=int, help=f"model width (default: {default.hidden})")
    train.add_argument("--steps", type=int, help=f"training steps (default: {default.steps})")
    train.add_argument("--tasks", help="comma-separated built-in tasks to train on (default: all)")
    train.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    train.add_argument("--defense", help="train defended from scratch with this `moeguard harden` method (e.g. entangle)")
    train.add_argument("--defense-strength", type=float, default=1.0, help="multiply the defense terms' weights (default: 1)")
    train.add_argument("--key", default=None, help="watermark key for --defense watermark (or --key-file, $MOEGUARD_WATERMARK_KEY)")
    train.add_argument("--key-file", default=None, help="a file whose first line is the watermark key")
    train.set_defaults(run=run_train, resume_with="")

    path = commands.add_parser("path", help="print the cached default demo model's directory, training it first if needed")
    path.add_argument("--seed", type=int, default=0, help="seed of the demo model (default: 0)")
    path.set_defaults(run=run_path, resume_with="")


def config_from_args(args: argparse.Namespace):
    from moeguard.data import resolve_task_names
    from moeguard.zoo import DemoConfig

    overrides = {
        field: getattr(args, name)
        for field, name in (("experts", "experts"), ("top_k", "top_k"), ("layers", "layers"), ("hidden", "hidden"), ("steps", "steps"))
        if getattr(args, name) is not None
    }
    if args.tasks:
        overrides["tasks"] = tuple(resolve_task_names(args.tasks))
    return dataclasses.replace(DemoConfig(), **overrides)


def run_train(args: argparse.Namespace) -> int:
    from moeguard.io import check_output, read_json
    from moeguard.zoo import CARD_JSON, train_demo

    check_output(args.out, overwrite=args.overwrite, directory=True)
    config = config_from_args(args)
    extra_loss = None
    if args.defense:
        from moeguard.defense.harden import demo_defense_loss

        from moeguard.defense.objective import method_config
        from moeguard.watermark import read_key

        key = read_key(args.key, args.key_file) if method_config(args.defense).watermark else None
        extra_loss = demo_defense_loss(config, args.defense, seed=args.seed, strength=args.defense_strength, key=key)
    out = train_demo(args.out, config, seed=args.seed, extra_loss=extra_loss, progress=not args.quiet,
                     overwrite=args.overwrite)
    card = read_json(out / CARD_JSON, what="demo card")
    for task, result in card["accuracy"].items():
        print(f"{task:<10} exact match {result['value']:.3f}  (95% CI {result['ci_low']:.3f}-{result['ci_high']:.3f}, n={result['n']})")
    print(f"trained in {card['training']['wall_seconds']:.0f} s; model written to {out}")
    return 0


def run_path(args: argparse.Namespace) -> int:
    from moeguard.zoo import demo_model_path

    print(demo_model_path(seed=args.seed, progress=not args.quiet))
    return 0
