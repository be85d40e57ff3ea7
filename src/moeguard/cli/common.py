"""Arguments and helpers shared by several commands."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from moeguard.errors import InputError

DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_model_arguments(parser: argparse.ArgumentParser, *, flag: str = "--model", required: bool = True, help: str | None = None) -> None:
    """``--model`` plus the loading options every model-taking command shares."""
    parser.add_argument(
        flag,
        required=required,
        help=help or "model directory or hub id ('demo' = the built-in demo model, trained on first use)",
    )
    if not any(action.dest == "dtype" for action in parser._actions):
        parser.add_argument("--dtype", choices=DTYPES, default="float32", help="weight dtype to load (default: float32)")
        parser.add_argument("--device", default=None, help="device to run on (cpu, cuda, cuda:1, ...; default: cuda if available)")
        parser.add_argument("--device-map", default=None, help="from_pretrained device_map, e.g. 'auto' to spread a large model")
        parser.add_argument("--trust-remote-code", action="store_true", help="allow code from the model repository (off by default)")


def load_model(args: argparse.Namespace, source: str | None = None):
    """Load the model named by ``--model`` (or ``source``) with the shared options."""
    from moeguard.models.loading import load_moe_on
    from moeguard.zoo import resolve_model_source

    return load_moe_on(resolve_model_source(source or args.model), dtype=args.dtype, device=args.device,
                       device_map=args.device_map, trust_remote_code=args.trust_remote_code)


def describe_choices(table: dict[str, Any]) -> str:
    """``"name: help; name: help"`` of a registry (criteria, acquisition functions, scopes, defenses)."""
    return "; ".join(f"{name}: {entry.help}" for name, entry in table.items())


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2)
    sys.stdout.write("\n")


def parse_int_list(text: str, *, what: str) -> list[int]:
    """``"8,6,4"`` -> ``[8, 6, 4]`` with a clear error."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise InputError(f"{what} must be a comma-separated list of integers, got {text!r}.") from None
    if not values:
        raise InputError(f"{what} is empty; give at least one integer.")
    return values


def parse_name_list(text: str) -> list[str]:
    """``"router, attention"`` -> ``["router", "attention"]`` (empty parts dropped)."""
    return [part.strip() for part in text.split(",") if part.strip()]
