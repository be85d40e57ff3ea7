"""How a model is loaded and prompted: the options every command and the audit share, as one object."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

from moeguard.fields import setting
from moeguard.models.loading import load_causal_lm_on, load_moe_on
from moeguard.models.moe_model import MoEModel
from moeguard.models.prompting import CHAT_TEMPLATE_MODES, PromptFormat

DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class LoadOptions:
    """Where and how a model's weights are loaded (see :func:`moeguard.models.loading.load_moe_on`), and
    how its prompts are written (:class:`PromptFormat`)."""

    dtype: str = setting("auto", "weight dtype to load ('auto': the checkpoint's own, so a bfloat16 checkpoint "
                                 "takes the memory of its files, not twice that in float32)", choices=DTYPES)
    device: str | None = setting(None, "device to run on (cpu, cuda, cuda:1, ...; default: cuda if available)")
    device_map: str | None = setting(None, "from_pretrained device_map, e.g. 'auto' to spread a large model over devices")
    max_memory: str | None = setting(None, "memory the weights may take per device with device_map, e.g. 'cpu=8GiB' or "
                                           "'0=20GiB,cpu=64GiB'; what does not fit is offloaded to disk")
    offload_folder: str | None = setting(None, "where weights offloaded to disk are kept (default: a temporary "
                                               "directory, removed at exit)")
    trust_remote_code: bool = setting(False, "allow code from the model repository")
    allow_pickle_weights: bool = setting(False, "load weights stored as pickles (pytorch_model.bin) when a model has no "
                                                "safetensors; unpickling can run code planted in the file")
    chat_template: str = setting("auto", "write prompts through the tokenizer's chat template: auto (when it has one), "
                                 "on (required) or off", choices=CHAT_TEMPLATE_MODES)
    system_prompt: str | None = setting(None, "system message of every prompt (without a chat template: a first "
                                        "paragraph)")

    @property
    def prompt_format(self) -> PromptFormat:
        return PromptFormat(self.chat_template, self.system_prompt)

    def load(self, source: str | os.PathLike) -> MoEModel:
        """Load the model at ``source`` (a directory or hub id) with these options."""
        moe = load_moe_on(source, **self.weight_options())
        moe.prompt_format = self.prompt_format
        return moe

    def load_causal_lm(self, source: str | os.PathLike) -> tuple[Any, Any]:
        """``(model, tokenizer)`` of any causal LM at ``source``, MoE or dense, with these options (its prompts
        are the caller's to write)."""
        return load_causal_lm_on(source, **self.weight_options())

    def weight_options(self) -> dict[str, Any]:
        """The options of the loader (all but how prompts are written)."""
        return {k: v for k, v in asdict(self).items() if k not in ("chat_template", "system_prompt")}
