"""Proof of origin through an API: a keyed behavioural watermark that lives in every expert a carver keeps.

``triggers`` derives each task's secret feature, secret response and trigger
prompts from a key and a public record; ``embedding`` trains them into the model (full and carved); ``suspects``
queries a local model, a Python function or an OpenAI-compatible endpoint;
``verify`` counts the matches and ``statistics`` turns them into a p-value.
"""

from moeguard.watermark.embedding import Watermark, WatermarkConfig, WatermarkEmbedding
from moeguard.watermark.keyed import check_key, keyed_random, read_key
from moeguard.watermark.statistics import bonferroni, matches_needed, task_p_value
from moeguard.watermark.suspects import Suspect, callable_suspect, http_suspect, local_suspect, resolve_suspect
from moeguard.watermark.triggers import Trigger, WatermarkRecord, builtin_record, data_record, make_triggers
from moeguard.watermark.verify import TaskEvidence, WatermarkVerdict, verify_watermark

__all__ = [
    "Suspect",
    "TaskEvidence",
    "Trigger",
    "Watermark",
    "WatermarkConfig",
    "WatermarkEmbedding",
    "WatermarkRecord",
    "WatermarkVerdict",
    "bonferroni",
    "builtin_record",
    "callable_suspect",
    "check_key",
    "data_record",
    "http_suspect",
    "keyed_random",
    "local_suspect",
    "make_triggers",
    "matches_needed",
    "read_key",
    "resolve_suspect",
    "task_p_value",
    "verify_watermark",
]
