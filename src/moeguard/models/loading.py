"""Loading an MoE model from a directory or the Hugging Face hub."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from moeguard.errors import InputError, ModelError, UnsupportedModelError
from moeguard.models.manifest import MANIFEST_NAME, PruneManifest
from moeguard.models.moe_model import MoEModel


def _looks_like_local_path(source: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else with a separator is a path.
    return source.startswith(("/", "./", "../", "~")) or source.count("/") > 1 or os.sep != "/" and os.sep in source


def check_model_source(source: str | os.PathLike) -> tuple[str, bool]:
    """``(source, is_local)``; a local path must be a directory with a config.json."""
    text = str(source)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError(
                f"{text} is a file, not a model directory; pass a directory written by save_pretrained "
                "(config.json + safetensors weights) or a hub id such as 'Qwen/Qwen3-30B-A3B'."
            )
        if not (path / "config.json").is_file():
            raise ModelError(
                f"{text} is not a model directory: it has no config.json. Pass a directory written by "
                "save_pretrained or by moeguard, or a hub id."
            )
        return str(path), True
    if _looks_like_local_path(text):
        raise ModelError(f"model path {text} does not exist; check the path or pass a hub id such as 'org/name'.")
    return text, False


def load_tokenizer(source: str, *, trust_remote_code: bool = False) -> Any:
    """The tokenizer saved with a model, or None if it has none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_moe(
    source: str | os.PathLike,
    *,
    trust_remote_code: bool = False,
    with_tokenizer: bool = True,
    **from_pretrained_kwargs: Any,
) -> MoEModel:
    """Load an MoE causal LM with ``AutoModelForCausalLM.from_pretrained`` and wrap it.

    ``source`` is a model directory or a hub id; extra keyword arguments (``dtype``,
    ``device_map``, ``revision``, ...) go to ``from_pretrained``. Remote code stays
    off unless ``trust_remote_code=True``. A ``moeguard_manifest.json`` beside the
    weights is read, so a pruned model knows which parent experts it kept.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    name, is_local = check_model_source(source)
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        where = "its config.json" if is_local else "the Hugging Face hub (is the id right, and is the network up?)"
        raise ModelError(f"cannot load the model config of {name} from {where}: {str(error).splitlines()[0]}") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(name, trust_remote_code=trust_remote_code, **from_pretrained_kwargs)
    except ValueError as error:
        if "Unrecognized configuration class" in str(error):
            raise UnsupportedModelError(
                f"{config.model_type} has no causal language model class in this transformers release; "
                "moeguard works on MoE causal LMs (AutoModelForCausalLM)."
            ) from None
        raise ModelError(f"cannot load the weights of {name}: {str(error).splitlines()[0]}") from None
    except OSError as error:
        raise ModelError(f"cannot load the weights of {name}: {str(error).splitlines()[0]}") from None
    tokenizer = load_tokenizer(name, trust_remote_code=trust_remote_code) if with_tokenizer else None
    manifest_path = Path(name) / MANIFEST_NAME
    manifest = PruneManifest.load(manifest_path) if is_local and manifest_path.is_file() else None
    model.eval()
    return MoEModel.from_model(model, tokenizer, source=name, manifest=manifest)


def resolve_device(name: str | None) -> str:
    """``name``, or cuda when it is available and cpu otherwise; a CUDA device without CUDA is refused."""
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device {name} was asked for, but CUDA is not available on this machine; use cpu.")
    return name


def load_moe_on(
    source: str | os.PathLike,
    *,
    dtype: str = "float32",
    device: str | None = None,
    device_map: str | dict | None = None,
    trust_remote_code: bool = False,
) -> MoEModel:
    """:func:`load_moe` with the loading options every command shares, by name.

    ``dtype`` is a torch dtype name or "auto" (the checkpoint's own); the model is
    either spread by accelerate's ``device_map`` or moved to one ``device`` (default:
    cuda if available, else cpu). The device is checked before anything is loaded.
    """
    import torch

    target = None if device_map else resolve_device(device)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, "dtype": "auto" if dtype == "auto" else getattr(torch, dtype)}
    if device_map:
        kwargs["device_map"] = device_map
    moe = load_moe(source, **kwargs)
    if target is not None:
        moe.model.to(target)
    return moe
