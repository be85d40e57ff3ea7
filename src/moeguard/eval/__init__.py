"""Task metrics for any causal LM: exact match (greedy generation), multiple choice, perplexity."""

from moeguard.eval.evaluate import METRICS, TaskResult, evaluate, evaluate_tasks
from moeguard.eval.metrics import bootstrap_perplexity_interval, perplexity, target_log_likelihoods, wilson_interval

__all__ = [
    "METRICS",
    "TaskResult",
    "bootstrap_perplexity_interval",
    "evaluate",
    "evaluate_tasks",
    "perplexity",
    "target_log_likelihoods",
    "wilson_interval",
]
