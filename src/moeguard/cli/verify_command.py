"""``moeguard verify``: write a selective fine-tuning protocol, or check a fine-tune against one."""

from __future__ import annotations

import argparse

from moeguard.cli.common import add_model_arguments, load_model, parse_list, print_json
from moeguard.defense.parameter_groups import GROUPS
from moeguard.defense.protocol import DEFAULT_PERMITTED, Protocol, make_protocol
from moeguard.defense.verify import verify_fine_tune
from moeguard.errors import InputError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "verify",
        help="check that a fine-tuned model changed only what a fine-tuning protocol permits (or write the protocol)",
        description=(
            "With --model: exit 0 if MODEL is a compliant fine-tune of PARENT under the protocol, 1 and a list of "
            "violations (frozen groups changed, experts removed, reordered, added or changed) otherwise. "
            "With --write: write the protocol for PARENT. Weights are loaded in their stored dtype (--dtype auto), "
            "so the hashes describe the checkpoint."
        ),
    )
    add_model_arguments(parser, flag="--parent", help="the released model the protocol pins (directory, hub id or 'demo')")
    parser.add_argument("--model", default=None, help="the fine-tuned model to check")
    parser.add_argument("--protocol", required=True, help="protocol JSON file (read, or written with --write)")
    parser.add_argument("--write", action="store_true", help="write the protocol for --parent instead of checking a model")
    parser.add_argument(
        "--permit",
        default=",".join(DEFAULT_PERMITTED),
        help=f"with --write: comma-separated groups a fine-tune may change (default: {','.join(DEFAULT_PERMITTED)}; "
        f"groups: {', '.join(GROUPS)})",
    )
    parser.add_argument("--protocol-sha256", default=None, metavar="HEX",
                        help="refuse the protocol unless its SHA-256 is this one (the hash published with the model)")
    parser.add_argument("--overwrite", action="store_true", help="with --write: replace an existing protocol file")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(run=run, dtype="auto")


def write_protocol(parent_source: str, path: str, permitted: list[str], args: argparse.Namespace) -> Protocol:
    from moeguard.io import check_output
    from moeguard.zoo import local_model_path

    check_output(path, inputs=[local_model_path(parent_source)], overwrite=args.overwrite)
    protocol = make_protocol(load_model(args, parent_source), permitted)
    protocol.save(path)
    return protocol


def run(args: argparse.Namespace) -> int:
    if args.write:
        if args.model:
            raise InputError("--write writes a protocol for --parent; drop --model (or drop --write to check a model).")
        permitted = parse_list(args.permit, what="--permit")
        protocol = write_protocol(args.parent, args.protocol, permitted, args)
        message = {
            "protocol": args.protocol,
            "sha256": protocol.sha256,
            "parent_fingerprint": protocol.parent_fingerprint,
            "permitted": protocol.permitted,
            "frozen": protocol.frozen,
            "experts_pinned": sum(layer.num_experts for layer in protocol.layers),
        }
        print_json(message) if args.json else print(
            f"wrote {args.protocol}: permitted {', '.join(protocol.permitted)}; frozen {', '.join(protocol.frozen)}; "
            f"{message['experts_pinned']} experts pinned; SHA-256 {protocol.sha256} (publish it, and check with --protocol-sha256)"
        )
        return 0
    if not args.model:
        raise InputError("give --model (the fine-tuned model to check), or --write to write a protocol for --parent.")
    protocol = Protocol.load(args.protocol, expected_sha256=args.protocol_sha256)
    parent = load_model(args, args.parent)
    model = load_model(args, args.model)
    report = verify_fine_tune(model, protocol, parent)
    print_json(report.to_dict()) if args.json else print(report.summary())
    return 0 if report.compliant else 1
