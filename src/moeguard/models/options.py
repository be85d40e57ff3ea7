"""How a model is loaded: the options every command and the audit share, as one object."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from moeguard.fields import setting
from moeguard.models.loading import load_moe_on
from moeguard.models.moe_model import MoEModel

DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class LoadOptions:
    """Where and how a model's weights are loaded (see :func:`moeguard.models.loading.load_moe_on`)."""

    dtype: str = setting("float32", "weight dtype to load ('auto': the checkpoint's own)", choices=DTYPES)
    device: str | None = setting(None, "device to run on (cpu, cuda, cuda:1, ...; default: cuda if available)")
    device_map: str | None = setting(None, "from_pretrained device_map, e.g. 'auto' to spread a large model over devices")
    trust_remote_code: bool = setting(False, "allow code from the model repository")
    allow_pickle_weights: bool = setting(False, "load weights stored as pickles (pytorch_model.bin) when a model has no "
                                                "safetensors; unpickling can run code planted in the file")

    def load(self, source: str | os.PathLike) -> MoEModel:
        """Load the model at ``source`` (a directory or hub id) with these options."""
        return load_moe_on(source, **asdict(self))
