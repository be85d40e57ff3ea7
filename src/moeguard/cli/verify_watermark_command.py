"""``moeguard verify-watermark``: ask a suspect model or endpoint the key's triggers and judge the matches."""

from __future__ import annotations

import argparse

from moeguard.cli.common import add_model_arguments, print_json


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "verify-watermark",
        help="check a suspect model or API endpoint for the expert watermark of a key",
        description=(
            "Send the key's trigger prompts to SUSPECT (a model directory, a hub id, 'demo', or the URL of an "
            "OpenAI-compatible server), count the completions equal to the watermark responses, and report a "
            "p-value against matching by accident. Exit code 0 when the watermark is detected at --alpha, 1 when not."
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
    parser.add_argument("--alpha", type=float, default=1e-6, help="detection threshold on the p-value (default: 1e-6)")
    parser.add_argument("--chat", action="store_true", help="use the server's /v1/chat/completions (prompt as the user message)")
    parser.add_argument("--served-model", default=None, help="model name to send to the server (default: the first it lists)")
    parser.add_argument("--api-key-env", default=None, help="environment variable holding the server's API key")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per request to a server (default: 60)")
    parser.add_argument("--out", default=None, help="write the verdict (JSON, no triggers) here")
    parser.add_argument("--json", action="store_true", help="print the verdict as JSON")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from moeguard.cli.common import loading_options, parse_list
    from moeguard.io import write_json
    from moeguard.watermark import Watermark, read_key, verify_watermark
    from moeguard.watermark.triggers import load_watermark_record

    key = read_key(args.key, args.key_file)
    record = load_watermark_record(args.record, args.tasks, triggers_per_task=args.triggers_per_task)
    if args.suspect.startswith(("http://", "https://")):
        options = dict(model=args.served_model, chat=args.chat, api_key_env=args.api_key_env, timeout=args.timeout)
    else:
        options = asdict(loading_options(args))
    only = parse_list(args.only, what="--only") if args.only else None
    verdict = verify_watermark(args.suspect, Watermark(record, key), alpha=args.alpha, tasks=only, **options)
    if args.out:
        write_json(args.out, verdict.to_dict())
    if args.json:
        print_json(verdict.to_dict())
    else:
        print(verdict.describe())
    return 0 if verdict.detected else 1
