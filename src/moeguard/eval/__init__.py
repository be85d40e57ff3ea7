"""Task metrics for any causal LM, one per task type: generated answers (exact match, normalised match,
token F1, ROUGE-L), multiple-choice log-likelihood, language-modelling loss; lm-eval-harness bridge."""

from moeguard.eval.evaluate import METRICS, TaskResult, evaluate, evaluate_tasks, reference_score, scoring
from moeguard.eval.metrics import (
    bootstrap_mean_interval,
    bootstrap_perplexity_interval,
    bootstrap_ratio_interval,
    perplexity,
    target_log_likelihoods,
    wilson_interval,
)
from moeguard.eval.text_metrics import ANSWER_METRICS, extract_answer, normalize_text, rouge_l, token_f1

__all__ = [
    "ANSWER_METRICS",
    "METRICS",
    "TaskResult",
    "bootstrap_mean_interval",
    "bootstrap_perplexity_interval",
    "bootstrap_ratio_interval",
    "evaluate",
    "evaluate_tasks",
    "extract_answer",
    "normalize_text",
    "perplexity",
    "reference_score",
    "rouge_l",
    "scoring",
    "target_log_likelihoods",
    "token_f1",
    "wilson_interval",
]
