"""Where trained demo models live: ``$MOEGUARD_CACHE/demo/<key>`` (default ``~/.cache/moeguard``)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from moeguard.errors import ModelError
from moeguard.zoo.card import CARD_JSON
from moeguard.zoo.config import DemoConfig

log = logging.getLogger("moeguard.zoo")

CACHE_ENV = "MOEGUARD_CACHE"


def cache_root() -> Path:
    """moeguard's cache directory: ``$MOEGUARD_CACHE``, else ``~/.cache/moeguard``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "moeguard").expanduser()


def demo_cache_dir(config: DemoConfig | None = None, seed: int = 0) -> Path:
    """The cache directory of the demo model of ``config`` and ``seed`` (which may not exist yet)."""
    return cache_root() / "demo" / (config or DemoConfig()).key(seed)


@contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing), so one process trains a model at a time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - platforms without fcntl train without a lock
        fcntl = None
    with path.open("a") as handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle, fcntl.LOCK_UN)


def demo_model_path(config: DemoConfig | None = None, seed: int = 0, train_if_missing: bool = True, *, progress: bool = True) -> Path:
    """The directory of the cached demo model of ``config`` (default :class:`DemoConfig`) and ``seed``.

    A missing model is trained first (once, even with several processes asking at the
    same time), unless ``train_if_missing=False``, which raises :class:`ModelError`.
    """
    from moeguard.zoo.demo import train_demo

    path = demo_cache_dir(config, seed)
    if (path / CARD_JSON).is_file():
        return path
    if not train_if_missing:
        raise ModelError(
            f"the demo model for this configuration and seed {seed} has not been trained yet (expected at {path}); "
            "run `moeguard zoo path` to train it."
        )
    with exclusive_lock(path.with_name(f".{path.name}.lock")):
        if not (path / CARD_JSON).is_file():
            log.info("the demo model is not in the cache yet; training it once into %s", path)
            train_demo(path, config or DemoConfig(), seed=seed, progress=progress, overwrite=True)
    return path


DEMO_SOURCE = "demo"


def local_model_path(source: str | None) -> str | None:
    """Where ``source`` lives on this machine, without training anything: the cached demo model's
    directory for ``"demo"``, else ``source`` as given (for checks such as an output overlapping it)."""
    return str(demo_cache_dir()) if source == DEMO_SOURCE else source


def resolve_model_source(source: str, *, progress: bool = True) -> str:
    """``source`` as given, or for ``"demo"`` the cached default demo model's directory (trained first if missing)."""
    return str(demo_model_path(progress=progress)) if source == DEMO_SOURCE else source
