"""``moeguard verify-watermark``: ask a suspect model or endpoint the key's triggers and judge the matches."""

from __future__ import annotations

import argparse

from moeguard.cli.common import add_config_arguments, add_model_arguments, print_json
from moeguard.watermark.suspects import EndpointOptions
from moeguard.watermark.statistics import DEFAULT_ALPHA, DEFAULT_MIN_MATCHES


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "verify-watermark",
        help="check a suspect model or API endpoint for the expert watermark of a key",
        description=(
            "Send the key's trigger prompts to SUSPECT (a model directory, a hub id, 'demo', or the URL of an "
            "OpenAI-compatible server), count the completions equal to the watermark responses, and report a "
            "p-value against matching by accident. Detected when one task has at least --min-matches triggers answered and a p-value, times the number of tasks, of at most --alpha. Exit code 0 when detected, 1 when not."
        ),
    )
    add_model_arguments(parser, flag="--suspect",
                        help="model directory, hub id, 'demo', or the http(s) URL of an OpenAI-compatible server")
    parser.add_argument("--key", default=None, help="the watermark key (or --key-file, or $MOEGUARD_WATERMARK_KEY)")
    parser.add_argument("--key-file", default=None, help="a file whose first line is the key")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--tasks", default=None, help="built-in tasks the watermark covers ('all' or a,b,c; default: all)")
    what.add_argument("--record", default=None, help="the watermark record harden wrote (needed for watermarks on your own data)")
    parser.add_argument("--only", default=None, help="check only these tasks of the watermark (a,b)")
    parser.add_argument("--triggers-per-task", type=int, default=None, help="triggers per task (default: as embedded, 32)")
    parser.add_argument("--alpha", type=float, default=DEFAULT_ALPHA,
                        help=f"detection threshold on the p-value (default: {DEFAULT_ALPHA:g})")
    parser.add_argument("--min-matches", type=int, default=DEFAULT_MIN_MATCHES,
                        help=f"fewest triggers of one task answered for a detection (default: {DEFAULT_MIN_MATCHES})")
    add_config_arguments(parser, EndpointOptions, flags={"model": "--served-model"})
    parser.add_argument("--out", default=None, help="write the verdict (JSON, no triggers) here")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--json", action="store_true", help="print the verdict as JSON")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from moeguard.cli.common import config_from_args, loading_options, parse_list
    from moeguard.io import write_json
    from moeguard.watermark import Watermark, read_key, verify_watermark
    from moeguard.watermark.triggers import load_watermark_record

    from moeguard.io import check_outputs
    from moeguard.zoo import local_model_path

    served = args.suspect.startswith(("http://", "https://"))
    check_outputs([args.out], inputs=[None if served else local_model_path(args.suspect), args.record, args.key_file],
                  overwrite=args.overwrite)
    key = read_key(args.key, args.key_file)
    record = load_watermark_record(args.record, args.tasks, triggers_per_task=args.triggers_per_task)
    only = parse_list(args.only, what="--only") if args.only else None
    verdict = verify_watermark(args.suspect, Watermark(record, key), alpha=args.alpha, min_matches=args.min_matches,
                               tasks=only, loading=loading_options(args), endpoint=config_from_args(args, EndpointOptions))
    if args.out:
        write_json(args.out, verdict.to_dict())
    if args.json:
        print_json(verdict.to_dict())
    else:
        print(verdict.describe())
    return 0 if verdict.detected else 1
