"""Loading an MoE model from a directory or the Hugging Face hub."""

from __future__ import annotations

import atexit
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from moeguard.errors import InputError, ModelError, UnsupportedModelError
from moeguard.io import check_output
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


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def load_tokenizer(source: str, *, trust_remote_code: bool = False) -> Any:
    """The tokenizer saved with a model, or None if it has none.

    A local directory that holds tokenizer files whose tokenizer does not load is an
    error (a model written from it would silently lack its tokenizer).
    """
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        present = [name for name in TOKENIZER_FILES if (Path(source) / name).is_file()]
        if present:
            raise ModelError(
                f"{source} has tokenizer files ({', '.join(present)}) but its tokenizer does not load: "
                f"{str(error).splitlines()[0] if str(error) else type(error).__name__}. Fix or remove those files."
            ) from None
        return None


PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def check_weights_format(path: Path, *, allow_pickle_weights: bool) -> None:
    """Refuse a local model whose weights exist only as pickles, unless explicitly allowed.

    Unpickling can run code planted in the file; safetensors cannot.
    """
    has_safetensors = any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file()
    pickles = [name for name in PICKLE_WEIGHTS if (path / name).is_file()]
    if not has_safetensors and pickles and not allow_pickle_weights:
        raise ModelError(
            f"{path} stores its weights only as a pickle ({pickles[0]}), and unpickling a file can run code planted in it; "
            "moeguard loads safetensors only. Convert the checkpoint to safetensors (load it where you trust it and "
            "save_pretrained it again), or pass allow_pickle_weights=True if you trust the file.",
            arguments=("allow_pickle_weights",),
        )


def check_loading_info(name: str, info: dict[str, Any]) -> None:
    """Refuse a checkpoint whose tensors do not match the model: missing weights would be left
    randomly initialised, unexpected ones silently dropped, mismatched ones re-initialised."""
    problems = []
    for key, what in (("missing_keys", "missing"), ("unexpected_keys", "unexpected"), ("mismatched_keys", "of the wrong shape")):
        names = sorted(str(item[0] if isinstance(item, tuple) else item) for item in info.get(key) or ())
        if names:
            shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
            problems.append(f"{len(names)} {what} ({shown})")
    if problems:
        raise ModelError(
            f"the checkpoint in {name} does not match its config: tensors {'; '.join(problems)}. Loading it would "
            "leave weights randomly initialised or drop stored ones; use a complete checkpoint written for this config."
        )


@contextmanager
def read_not_mapped() -> Iterator[None]:
    """Within this block, ``from_pretrained`` reads safetensors shards with ``pread`` into memory it owns,
    one tensor group at a time, instead of memory-mapping them.

    Why: transformers maps every shard and keeps the maps open until loading ends, and
    tensors it does not convert stay views of the map afterwards. The mapped pages are the
    process's resident memory, so a bf16 checkpoint of size S loaded in bf16 peaked at
    about 1.6 S (the maps plus the fused 3-D expert copies) and held 1.4 S after loading.
    Read with ``pread`` and converted sequentially (per-expert tensors freed as each
    fused tensor is built, and reused by the next), the peak is about S plus one layer's
    expert tensors, and nothing stays mapped. Both switches are the ones transformers
    itself uses (its pread backend on platforms without mmap, its sequential loading
    under ``HF_DEACTIVATE_ASYNC_LOAD``); they are restored on exit.
    """
    from safetensors import safe_open
    from transformers import modeling_utils

    if getattr(modeling_utils, "safe_open", None) is not safe_open:  # a transformers that opens files differently
        yield
        return

    def open_with_pread(filename: Any, framework: str, device: Any = "cpu", backend: str | None = None) -> Any:
        return safe_open(filename, framework=framework, device=device, backend="pread" if device == "cpu" else backend)

    previous_async = os.environ.get("HF_DEACTIVATE_ASYNC_LOAD")
    modeling_utils.safe_open = open_with_pread
    os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = "1"
    try:
        yield
    finally:
        modeling_utils.safe_open = safe_open
        if previous_async is None:
            os.environ.pop("HF_DEACTIVATE_ASYNC_LOAD", None)
        else:
            os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = previous_async


def load_causal_lm(
    source: str | os.PathLike,
    *,
    trust_remote_code: bool = False,
    with_tokenizer: bool = True,
    allow_pickle_weights: bool = False,
    **from_pretrained_kwargs: Any,
) -> tuple[Any, Any]:
    """``(model in eval mode, tokenizer or None)``: any causal LM, MoE or dense, loaded with
    ``AutoModelForCausalLM.from_pretrained``.

    ``source`` is a model directory or a hub id; extra keyword arguments (``dtype``,
    ``device_map``, ``revision``, ...) go to ``from_pretrained``. Remote code stays
    off unless ``trust_remote_code=True``; weights are read from safetensors only
    unless ``allow_pickle_weights=True`` (a pickle can run code when it is loaded).
    Every stored tensor must match the model: a missing, unexpected or mismatched
    tensor is an error naming it. Without ``device_map`` the safetensors files are read,
    not memory-mapped (:func:`read_not_mapped`), so the loaded model holds no file pages.
    """
    from pickle import UnpicklingError

    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForCausalLM

    name, is_local = check_model_source(source)
    if is_local:
        check_weights_format(Path(name), allow_pickle_weights=allow_pickle_weights)
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        where = "its config.json" if is_local else "the Hugging Face hub (is the id right, and is the network up?)"
        raise ModelError(f"cannot load the model config of {name} from {where}: {str(error).splitlines()[0]}") from None
    kwargs = {"use_safetensors": None if allow_pickle_weights else True, **from_pretrained_kwargs}
    # Offloaded weights (device_map) are better served by the maps: their pages can be dropped and re-read.
    reading = read_not_mapped() if kwargs.get("device_map") is None else nullcontext()
    try:
        with reading:
            model, info = AutoModelForCausalLM.from_pretrained(
                name, trust_remote_code=trust_remote_code, output_loading_info=True, ignore_mismatched_sizes=True,
                **kwargs,
            )
    except ValueError as error:
        if "Unrecognized configuration class" in str(error):
            raise UnsupportedModelError(
                f"{config.model_type} has no causal language model class in this transformers release; "
                "moeguard works on causal LMs (AutoModelForCausalLM)."
            ) from None
        raise ModelError(f"cannot load the weights of {name}: {str(error).splitlines()[0]}") from None
    except OSError as error:
        hint = "" if allow_pickle_weights else " (moeguard reads safetensors weights only unless pickles are allowed)"
        raise ModelError(f"cannot load the weights of {name}: {str(error).splitlines()[0]}{hint}") from None
    except (SafetensorError, UnpicklingError, EOFError) as error:
        raise ModelError(
            f"cannot read the weights of {name}: {str(error).splitlines()[0] or type(error).__name__}. The weight files "
            "are damaged or not what their names say (truncated download?); copy or download them again."
        ) from None
    check_loading_info(name, info)
    model.eval()
    return model, load_tokenizer(name, trust_remote_code=trust_remote_code) if with_tokenizer else None


def load_moe(source: str | os.PathLike, **options: Any) -> MoEModel:
    """Load an MoE causal LM with :func:`load_causal_lm` (same options) and wrap it.

    A ``moeguard_manifest.json`` beside the weights is read and checked against the
    model, so a pruned model knows which parent experts it kept.
    """
    model, tokenizer = load_causal_lm(source, **options)
    name, is_local = check_model_source(source)
    manifest_path = Path(name) / MANIFEST_NAME
    manifest = PruneManifest.load(manifest_path) if is_local and manifest_path.is_file() else None
    return MoEModel.from_model(model, tokenizer, source=name, manifest=manifest)


def resolve_device(name: str | None) -> str:
    """``name``, or this process's default device (:func:`moeguard.distributed.process_device`: its own
    GPU under a multi-process launcher, else cuda if available, else cpu); a CUDA device without CUDA is refused."""
    import torch

    from moeguard.distributed import process_device

    if name is None:
        return process_device()
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device {name} was asked for, but CUDA is not available on this machine; use cpu.")
    return name


def parse_max_memory(text: str) -> dict[int | str, int | str]:
    """``"cpu=8GiB,0=20GiB"`` -> ``{"cpu": "8GiB", 0: "20GiB"}`` (accelerate's ``max_memory``; a plain number
    or ``NB`` is bytes)."""
    budget: dict[int | str, int | str] = {}
    for item in text.split(","):
        device, sep, amount = item.strip().partition("=")
        device, amount = device.strip(), amount.strip()
        if not sep or not device or not re.fullmatch(r"\d+(\.\d+)?\s*([KMGT]i?)?B?", amount, re.IGNORECASE):
            raise InputError(
                f"max_memory takes DEVICE=AMOUNT pairs separated by commas (e.g. 'cpu=8GiB' or '0=20GiB,cpu=64GiB'); "
                f"got {item.strip()!r}.", arguments=("max_memory",),
            )
        plain = amount.upper().removesuffix("B").strip()
        budget[int(device) if device.isdigit() else device] = int(plain) if plain.isdigit() else amount
    return budget


def loading_options(
    source: str | os.PathLike,
    *,
    dtype: str = "auto",
    device: str | None = None,
    device_map: str | dict | None = None,
    max_memory: str | None = None,
    offload_folder: str | None = None,
    trust_remote_code: bool = False,
    allow_pickle_weights: bool = False,
) -> tuple[dict[str, Any], str | None]:
    """``(from_pretrained keyword arguments, the device to move to or None)`` of the shared loading options
    (see :func:`load_moe_on`)."""
    import torch

    if (max_memory or offload_folder) and not device_map:
        raise InputError("max_memory and offload_folder apply to a model spread by device_map; pass device_map='auto'.",
                         arguments=("device_map",))
    target = None if device_map else resolve_device(device)
    kwargs: dict[str, Any] = {
        "trust_remote_code": trust_remote_code,
        "allow_pickle_weights": allow_pickle_weights,
        "dtype": "auto" if dtype == "auto" else getattr(torch, dtype),
    }
    if device_map:
        kwargs["device_map"] = device_map
        if max_memory:
            kwargs["max_memory"] = parse_max_memory(max_memory)
            if offload_folder is None:
                offload_folder = tempfile.mkdtemp(prefix="moeguard-offload.")
                atexit.register(shutil.rmtree, offload_folder, True)
            else:
                check_output(offload_folder, inputs=[source], directory=True, resumable=True)
            kwargs["offload_folder"] = str(offload_folder)
    return kwargs, target


def load_moe_on(source: str | os.PathLike, **options: Any) -> MoEModel:
    """:func:`load_moe` with the loading options every command shares, by name.

    ``dtype`` is a torch dtype name or "auto" (the checkpoint's own); the model is
    either spread by accelerate's ``device_map`` (with ``max_memory`` per device;
    what does not fit goes to ``offload_folder``, by default a temporary directory
    removed at exit) or moved to one ``device`` (default: cuda if available, else
    cpu). The device is checked before anything is loaded.
    """
    kwargs, target = loading_options(source, **options)
    moe = load_moe(source, **kwargs)
    if target is not None:
        moe.model.to(target)
    return moe


def load_causal_lm_on(source: str | os.PathLike, **options: Any) -> tuple[Any, Any]:
    """:func:`load_causal_lm` (any causal LM, MoE or dense) with the loading options of :func:`load_moe_on`."""
    kwargs, target = loading_options(source, **options)
    model, tokenizer = load_causal_lm(source, **kwargs)
    if target is not None:
        model.to(target)
    return model, tokenizer
