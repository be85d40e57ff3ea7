"""The built-in demo MoE: a stock transformers MoE trained locally on the task suite, cached."""

from moeguard.zoo.cache import (
    CACHE_ENV,
    DEMO_SOURCE,
    cache_root,
    demo_cache_dir,
    demo_model_path,
    local_model_path,
    resolve_model_source,
)
from moeguard.zoo.card import CARD_JSON
from moeguard.zoo.config import TINY_DEMO, TINY_TYPES_DEMO, DemoConfig
from moeguard.zoo.demo import build_demo_model, train_demo

__all__ = [
    "CACHE_ENV",
    "CARD_JSON",
    "DEMO_SOURCE",
    "TINY_DEMO",
    "TINY_TYPES_DEMO",
    "DemoConfig",
    "build_demo_model",
    "cache_root",
    "demo_cache_dir",
    "demo_model_path",
    "local_model_path",
    "resolve_model_source",
    "train_demo",
]
