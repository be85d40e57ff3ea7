"""Flags made from settings dataclasses, the one comma-list parser, and library errors in the command's words."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from moeguard.audit import AuditConfig
from moeguard.cli import build_parser
from moeguard.cli.common import add_config_arguments, cli_message, command_flags, config_from_args, parse_list
from moeguard.errors import InputError
from moeguard.fields import setting
from moeguard.realign import RealignConfig


@dataclasses.dataclass
class Inner:
    rate: float = setting(1e-3, "a rate")
    names: tuple[str, ...] = setting(("a", "b"), "some names")


@dataclasses.dataclass
class Outer:
    size: int = setting(8, "a size")
    limit: int | None = setting(None, "an optional limit")
    inner: Inner = dataclasses.field(default_factory=Inner, metadata={"help": "nested"})
    fast: bool = setting(False, "go fast")


def test_flags_help_and_defaults_come_from_the_fields_and_nested_settings_round_trip():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, Outer, presets={"--quick": Outer(size=2)}, flags={"rate": "--lr"})
    help_text = " ".join(parser.format_help().split())
    assert "a size (default 8; --quick: 2)" in help_text and "a rate (default 0.001)" in help_text
    assert "some names (default a,b)" in help_text and "--lr" in help_text and "--fast" in help_text
    assert config_from_args(parser.parse_args([]), Outer) == Outer()
    parsed = config_from_args(parser.parse_args(["--size", "3", "--lr", "0.01", "--names", "x, y", "--limit", "5", "--fast"]),
                              Outer, Outer(size=2))
    assert parsed == Outer(size=3, limit=5, inner=Inner(rate=0.01, names=("x", "y")), fast=True)
    assert config_from_args(parser.parse_args(["--lr", "0.5"]), Outer, Outer(size=2)).size == 2  # the preset is the base


def test_every_command_shows_the_defaults_of_the_code():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    realign = " ".join(commands["realign"].format_help().split())
    for field in dataclasses.fields(RealignConfig):
        default = getattr(RealignConfig(), field.name)
        if default is not None:
            assert f"(default {default:g})" in realign if isinstance(default, float) else f"(default {default})" in realign
    audit = " ".join(commands["audit"].format_help().split())
    quick = AuditConfig.quick_preset()
    assert f"(default {AuditConfig().realign.budget}; --quick: {quick.realign.budget})" in audit


def test_one_parser_reads_every_comma_list():
    assert parse_list("8, 6,,4", int, what="--keep") == [8, 6, 4]
    assert parse_list("1e-3,3e-3", float, what="--lrs") == [1e-3, 3e-3]
    with pytest.raises(InputError, match="--keep must be a comma-separated list of integers, got '8,x'"):
        parse_list("8,x", int, what="--keep")
    with pytest.raises(InputError, match="--keep is empty"):
        parse_list(" , ", int, what="--keep")
    with pytest.raises(InputError, match=r"--criteria 'reap,magic': unknown criteria \['magic'\]; choose from a, reap"):
        parse_list("reap,magic", what="--criteria", choices=("a", "reap"), noun="criteria")


def test_library_errors_name_arguments_and_the_command_line_shows_its_flags():
    error = InputError("budget=2 is too small for 4 rounds; give budget=4 or more, or fewer `rounds`; scope='lora' needs "
                       "peft; pass resume=True; model=/no/such: missing", arguments=("budget", "rounds", "scope", "resume",
                                                                                     "model", "nothing"))
    flags = command_flags(build_parser()._subparsers._group_actions[0].choices["realign"])
    assert cli_message(error, flags) == ("--budget 2 is too small for 4 rounds; give --budget 4 or more, or fewer --rounds; "
                                         "--train lora needs peft; pass --resume; --model /no/such: missing")
    assert str(error).startswith("budget=2 is too small")  # the Python user reads argument names
    assert cli_message(InputError("top_k=3 is more than experts=2"), flags) == "top_k=3 is more than experts=2"
