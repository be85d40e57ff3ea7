"""Secret keys and the random streams derived from them.

Every random choice the watermark makes (trigger inputs, which characters a trigger
changes, the responses) comes from a stream seeded by ``HMAC-SHA256(key, label)``,
so the same key and label always give the same choices, on any machine, and two
keys give independent ones. Streams are labelled by what they choose (e.g.
``"prompt|reverse|7"``), so trigger ``i`` of a task does not depend on how many
triggers there are.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import random
from pathlib import Path

from moeguard.errors import InputError

# A new version changes the triggers a key derives (recorded with every watermark).
KEYED_STREAM_VERSION = 1
MIN_KEY_LENGTH = 8
KEY_ENV = "MOEGUARD_WATERMARK_KEY"


def check_key(key: str) -> str:
    """``key`` itself, or an InputError if it is too short to be a secret."""
    if not isinstance(key, str) or len(key) < MIN_KEY_LENGTH:
        raise InputError(
            f"a watermark key must be a string of at least {MIN_KEY_LENGTH} characters; make one with "
            "`python -c \"import secrets; print(secrets.token_hex(16))\"` and keep it secret."
        )
    return key


def read_key(key: str | None = None, key_file: str | os.PathLike | None = None) -> str:
    """The key given directly, else the first line of ``key_file``, else ``$MOEGUARD_WATERMARK_KEY``."""
    if key is not None and key_file is not None:
        raise InputError("give the watermark key once: either `key` or `key_file`, not both.", arguments=("key", "key_file"))
    if key_file is not None:
        path = Path(key_file)
        if not path.is_file():
            raise InputError(f"key file {path} does not exist.")
        lines = path.read_text(encoding="utf-8").splitlines()
        key = lines[0].strip() if lines else ""
    elif key is None:
        key = os.environ.get(KEY_ENV)
        if key is None:
            raise InputError(f"the watermark needs a key: pass `key` or `key_file`, or set ${KEY_ENV}.",
                             arguments=("key", "key_file"))
    return check_key(key)


def keyed_random(key: str, label: str) -> random.Random:
    """The random stream of ``label`` under ``key``: a ``random.Random`` seeded with
    ``HMAC-SHA256(key, "moeguard-watermark|v<version>|" + label)``.

    Seeding with bytes is reproducible across Python versions and platforms, so the
    same key and label give the same draws everywhere; without the key the seed, and
    so every draw, is unpredictable.
    """
    message = f"moeguard-watermark|v{KEYED_STREAM_VERSION}|{label}".encode()
    return random.Random(hmac.new(check_key(key).encode(), message, hashlib.sha256).digest())
