"""Task data: the built-in task suite, user data (JSONL, ``datasets``), the tokenizer, batching."""

from moeguard.data.batching import IGNORE_INDEX, batches, encode_examples, model_inputs, pad_sequences, to_device
from moeguard.data.examples import KINDS, Example, TaskData, data_signature, mixture
from moeguard.data.files import load_hf_dataset, load_jsonl, save_jsonl
from moeguard.data.tasks import BUILTIN_TASKS, SPLITS, TASK_SPECS, load_task, resolve_task_names
from moeguard.data.tokenizer import build_char_tokenizer

__all__ = [
    "BUILTIN_TASKS",
    "IGNORE_INDEX",
    "KINDS",
    "SPLITS",
    "TASK_SPECS",
    "Example",
    "TaskData",
    "batches",
    "build_char_tokenizer",
    "encode_examples",
    "load_hf_dataset",
    "load_jsonl",
    "load_task",
    "data_signature",
    "mixture",
    "model_inputs",
    "pad_sequences",
    "resolve_task_names",
    "save_jsonl",
    "to_device",
]
