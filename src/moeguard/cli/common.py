"""What every command shares: the model and loading options, flags made from settings dataclasses,
the one comma-list parser, and error messages in the command line's own words.

Settings dataclasses (:class:`~moeguard.realign.RealignConfig`, ``AuditConfig``,
``DefenseEvalSettings``, ``HardenSettings``, :class:`~moeguard.models.options.LoadOptions`)
declare each field's help with :func:`moeguard.fields.setting`; :func:`add_config_arguments`
makes one flag per field from it, with the default (and a preset's, e.g. ``--quick``) in
the help, and :func:`config_from_args` builds the dataclass back. Library errors name the
function arguments they are about (``MoeGuardError.arguments``); :func:`cli_message`
shows them as this command's flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from moeguard.errors import InputError, MoeGuardError
from moeguard.models.options import LoadOptions

MODEL_HELP = "model directory or hub id ('demo' = the built-in demo model, trained on first use)"


# ---------------------------------------------------------------- values
def parse_list(
    text: str, item: Callable[[str], Any] = str, *, what: str, choices: Sequence[str] | None = None, noun: str = "values"
) -> list[Any]:
    """``"8,6,4"`` -> ``[8, 6, 4]``: ``item`` converts each part (empty parts are dropped), ``choices`` (names,
    or a registry) limits them; a clear error names the flag ``what``."""
    parts = [part.strip() for part in str(text).split(",") if part.strip()]
    if not parts:
        raise InputError(f"{what} is empty; give at least one value (comma-separated).")
    try:
        values = [item(part) for part in parts]
    except ValueError:
        kind = {int: "integers", float: "numbers"}.get(item, "values")
        raise InputError(f"{what} must be a comma-separated list of {kind}, got {text!r}.") from None
    unknown = [value for value in values if choices is not None and value not in choices]
    if unknown:
        raise InputError(f"{what} {text!r}: unknown {noun} {unknown}; choose from {', '.join(choices)}.")
    return values


def task_names(text: str) -> list[str]:
    """Built-in task names from ``"a,b"``, ``"all"`` or ``"none"`` (no task)."""
    from moeguard.data import resolve_task_names

    return [] if text.strip().lower() == "none" else resolve_task_names(text)


def describe_choices(table: Mapping[str, Any]) -> str:
    """``"name: help; name: help"`` of a registry (criteria, acquisition functions, scopes, defenses; or names
    mapped to their help, as the metrics)."""
    return "; ".join(f"{name}: {entry if isinstance(entry, str) else entry.help}" for name, entry in table.items())


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2)
    sys.stdout.write("\n")


# ---------------------------------------------------------------- flags from settings dataclasses
def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _shown(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(_shown(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def _item_type(hint: Any) -> tuple[Any, str | None]:
    """``(item type, "list" / "tuple" / None)`` of a field's type hint, ``X | None`` unwrapped."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    container = typing.get_origin(hint)
    if container in (list, tuple):
        return typing.get_args(hint)[0], container.__name__
    return hint, None


def add_config_arguments(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    defaults: Any = None,
    presets: Mapping[str, Any] | None = None,
    flags: Mapping[str, str] | None = None,
    exclude: Sequence[str] = (),
    prefix: str = "",
) -> None:
    """One flag per field of the dataclass ``cls`` (nested dataclasses flattened, their flags unprefixed).

    The help is the field's, with its default from ``defaults`` (default: ``cls()``) and
    from each preset (``{"--quick": AuditConfig.quick_preset()}``). ``flags`` renames
    (``{"scope": "--train"}``); ``exclude`` skips fields the command handles itself. A flag
    not given on the command line leaves the field to :func:`config_from_args`'s base.
    """
    defaults = defaults if defaults is not None else cls()
    presets = presets or {}
    flags = flags or {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in exclude or "help" not in f.metadata:
            continue
        default = getattr(defaults, f.name)
        if dataclasses.is_dataclass(default):
            add_config_arguments(parser, type(default), defaults=default,
                                 presets={k: getattr(v, f.name) for k, v in presets.items()}, flags=flags, exclude=exclude,
                                 prefix=f"{prefix}{f.name}.")
            continue
        item, container = _item_type(hints[f.name])
        help_text = f.metadata["help"]
        choices = f.metadata.get("choices")
        if isinstance(choices, Mapping):
            help_text += ": " + describe_choices(choices)
        shown = [f"default {_shown(default)}"] + [f"{name}: {_shown(getattr(p, f.name))}" for name, p in presets.items()
                                                  if getattr(p, f.name) != default]
        if default is None or default == []:
            shown = shown[1:]
        if shown:
            help_text += f" ({'; '.join(shown)})"
        kwargs: dict[str, Any] = {"dest": f"{prefix}{f.name}", "default": argparse.SUPPRESS,
                                  "help": help_text.replace("%", "%%"), "metavar": f.name.upper()}
        if item is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif container is not None:
            what = flags.get(f.name, _flag(f.name))
            kwargs["type"] = lambda text, item=item, container=container, what=what: (
                (tuple if container == "tuple" else list)(parse_list(text, item, what=what)))
            kwargs["metavar"] = f"{f.name.upper()},..."
        else:
            kwargs["type"] = item
            if choices is not None and not isinstance(choices, Mapping):
                kwargs["choices"] = list(choices)
        parser.add_argument(flags.get(f.name, _flag(f.name)), **kwargs)


def config_from_args(args: argparse.Namespace, cls: type, base: Any = None, *, prefix: str = "") -> Any:
    """``base`` (default ``cls()``) with every field given on the command line replaced."""
    base = base if base is not None else cls()
    given = vars(args)
    changes = {}
    for f in dataclasses.fields(cls):
        value = getattr(base, f.name)
        if dataclasses.is_dataclass(value):
            changes[f.name] = config_from_args(args, type(value), value, prefix=f"{prefix}{f.name}.")
        elif f"{prefix}{f.name}" in given:
            changes[f.name] = given[f"{prefix}{f.name}"]
    return dataclasses.replace(base, **changes)


# ---------------------------------------------------------------- user task data
def add_dataset_arguments(parser: argparse.ArgumentParser, source: argparse._MutuallyExclusiveGroup | None = None) -> None:
    """``--hf-dataset`` (in ``source``, the command's group of task sources, if given) with its field flags
    (:class:`moeguard.data.files.DatasetSource`, ``--split`` left to the command), and ``--metric`` /
    ``--answer-pattern``, how the answers of a generation task given by file or dataset are scored."""
    from moeguard.data.files import DatasetSource
    from moeguard.eval import METRICS

    field = DatasetSource.__dataclass_fields__["hf_dataset"]
    (source or parser).add_argument("--hf-dataset", metavar="NAME", help=field.metadata["help"])
    add_config_arguments(parser, DatasetSource, exclude=("hf_dataset", "split"))
    parser.add_argument("--metric", choices=list(METRICS),
                        help="how generated answers of --data / --hf-dataset are scored (default: the file's header, else "
                        "exact_match): " + describe_choices(METRICS))
    parser.add_argument("--answer-pattern", metavar="REGEX",
                        help="extract the answer from a generation with this regular expression (its group 'answer', else "
                        "its first group, else the match) before it is scored")


def user_task(args: argparse.Namespace, *, split: str = "train", limit: int | None = None):
    """The task ``--data`` (a JSONL file) or ``--hf-dataset`` (with its field flags) gives, scored as ``--metric`` /
    ``--answer-pattern`` say; None when neither is given."""
    from moeguard.data import load_jsonl
    from moeguard.data.files import DatasetSource

    scoring = {"metric": args.metric, "answer_pattern": args.answer_pattern}
    if getattr(args, "hf_dataset", None):
        source = dataclasses.replace(config_from_args(args, DatasetSource), hf_dataset=args.hf_dataset, split=split)
        return source.load(limit=limit, **scoring)
    data = getattr(args, "data", None)
    if data:
        return load_jsonl(data, **scoring).head(limit)
    if any(value is not None for value in scoring.values()):
        raise InputError("--metric and --answer-pattern score the answers of --data or --hf-dataset; built-in tasks "
                         "declare their own metric.")
    return None


# ---------------------------------------------------------------- the model
def add_model_arguments(parser: argparse.ArgumentParser, *, flag: str = "--model", required: bool = True,
                        help: str | None = None) -> None:
    """``--model`` (or ``flag``) plus the loading options (:class:`LoadOptions`) every model-taking command shares."""
    parser.add_argument(flag, required=required, help=help or MODEL_HELP)
    if not any(action.dest == "dtype" for action in parser._actions):
        for f in dataclasses.fields(LoadOptions):
            default = f.default
            help_text = f.metadata["help"] + (f" (default {_shown(default)})" if default not in (None, False) else "")
            kwargs: dict[str, Any] = {"default": default, "help": help_text}
            if f.type in (bool, "bool"):
                kwargs["action"] = "store_true"
            elif "choices" in f.metadata:
                kwargs["choices"] = list(f.metadata["choices"])
            parser.add_argument(_flag(f.name), **kwargs)


def loading_options(args: argparse.Namespace) -> LoadOptions:
    """The loading options the command line gave."""
    return LoadOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(LoadOptions)})


def load_model(args: argparse.Namespace, source: str | None = None):
    """Load the model named by ``--model`` (or ``source``; 'demo' is the built-in one) with the loading options."""
    from moeguard.zoo import resolve_model_source

    return loading_options(args).load(resolve_model_source(source or args.model, progress=not args.quiet))


# ---------------------------------------------------------------- errors in the command line's words
def command_flags(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Argument name -> this command's flag, for every option of ``parser`` (and ``argument_flags`` it declares)."""
    flags: dict[str, str] = {}
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            long = next((o for o in action.option_strings if o.startswith("--")), action.option_strings[0])
            flags.setdefault(action.dest.rsplit(".", 1)[-1], long)
    flags.update(parser.get_default("argument_flags") or {})
    return flags


def _as_flag_value(flag: str, value: str) -> str:
    tail = value[-1] if value[-1] in ":." else ""
    value = value[: len(value) - len(tail)].strip("'\"")
    return f"{flag}{tail}" if value == "True" else f"{flag} {value}{tail}"


def cli_message(error: MoeGuardError, flags: Mapping[str, str]) -> str:
    """The error's message with the arguments it names (``name=value``, `` `name` ``) written as flags."""
    text = str(error)
    for name in getattr(error, "arguments", ()):
        flag = flags.get(name)
        if flag is None:
            continue
        text = text.replace(f"`{name}`", flag)
        text = re.sub(rf"\b{name}=('[^']*'|\"[^\"]*\"|[^\s,;()]+)", lambda m: _as_flag_value(flag, m.group(1)), text)
    return text
