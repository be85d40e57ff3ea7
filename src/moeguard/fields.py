"""Settings as dataclass fields that carry their help text.

The command line builds its flags, their help and their defaults from these fields
(:func:`moeguard.cli.common.add_config_arguments`), so the help cannot drift from the code.
"""

from __future__ import annotations

from dataclasses import field
from typing import Any


def setting(default: Any, help: str, **metadata: Any) -> Any:
    """A dataclass field with ``default`` and its ``help`` (and e.g. ``choices``: a registry of names)."""
    return field(default=default, metadata={"help": help, **metadata})
