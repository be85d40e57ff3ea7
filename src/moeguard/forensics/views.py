"""Models as the detector reads them: in memory, or a safetensors checkpoint read one MoE layer at a time.

The detector needs a model's non-expert weights (embeddings, head, norms, the first
attention block, the routers) for the whole comparison, but each MoE layer's expert
weights only while that layer is compared. :class:`CheckpointView` builds the model
from its config with parameters on the meta device (buffers such as rotary
frequencies are computed as usual), loads the non-expert tensors from the
safetensors files, and reads a layer's expert tensors when :meth:`ModelView.experts`
is entered, dropping them again on exit: peak memory is the non-expert weights plus
one layer's experts. Which stored tensor belongs where comes from transformers' own
checkpoint conversion rules (per-expert tensors are stacked and concatenated as
``from_pretrained`` does; see :mod:`moeguard.pruning.streaming`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moeguard.errors import InputError, ModelError, UnsupportedModelError
from moeguard.models import MoEModel, load_moe
from moeguard.models.fingerprint import checkpoint_files, checkpoint_fingerprint
from moeguard.models.loading import check_model_source, load_tokenizer
from moeguard.pruning.streaming import ExpertSlice, map_expert_tensors, read_checkpoint


class ModelView:
    """A model whose weights are all in memory."""

    def __init__(self, moe: MoEModel) -> None:
        self.moe = moe

    @contextmanager
    def experts(self, layer: int) -> Iterator[None]:
        """The experts of MoE layer ``layer`` are in memory inside the block."""
        yield

    def fingerprint(self) -> str:
        return self.moe.fingerprint()

    def dtype(self) -> str:
        return str(self.moe.layers[0].expert_parameters()[0].dtype).removeprefix("torch.")


def _set_tensor(model: nn.Module, name: str, tensor: torch.Tensor | None) -> None:
    """Replace parameter or buffer ``name`` of ``model`` (None: back to an empty meta tensor of the same shape)."""
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    table = owner._parameters if attr in owner._parameters else owner._buffers
    if tensor is None:
        current = table[attr]
        tensor = torch.empty(current.shape, dtype=current.dtype, device="meta")
    table[attr] = nn.Parameter(tensor, requires_grad=False) if table is owner._parameters else tensor


class CheckpointView(ModelView):
    """A safetensors checkpoint directory with each MoE layer's experts read on demand (see the module docstring)."""

    def __init__(self, model_dir: str | Path, *, dtype: torch.dtype | None = None, trust_remote_code: bool = False) -> None:
        from accelerate import init_empty_weights
        from safetensors import safe_open
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        self.model_dir = Path(model_dir)
        try:
            config = AutoConfig.from_pretrained(self.model_dir, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as error:
            raise ModelError(f"cannot read the config of {model_dir}: {str(error).splitlines()[0]}") from None
        if getattr(config, "quantization_config", None):
            raise UnsupportedModelError(f"{model_dir} is a quantized checkpoint; compare an unquantized copy.")
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        model.eval()
        moe = MoEModel.from_model(model, load_tokenizer(str(self.model_dir), trust_remote_code=trust_remote_code),
                                  source=str(self.model_dir))
        super().__init__(moe)
        self.target_dtype = dtype
        self._fingerprint: str | None = None
        shards = read_checkpoint(self.model_dir)
        stored = [tensor for shard in shards for tensor in shard.tensors]
        self.file_of = {tensor.name: self.model_dir / shard.file for shard in shards for tensor in shard.tensors}
        mapped = map_expert_tensors(moe, stored)
        expert_targets = {ref.name: (layer.index, ref) for layer in moe.layers for ref in layer.tensors("experts")}
        # Lazy: the routed experts' tensors. Everything else (routers included) is loaded now.
        self.pieces: dict[int, dict[str, list[Any]]] = {}
        state = model.state_dict()
        conversions = get_model_conversion_mapping(model)
        renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
        converters = [c for c in conversions if isinstance(c, WeightConverter)]
        self.converters = {pattern: c for c in converters for pattern in c.source_patterns}
        eager: dict[str, list[tuple[str, Any]]] = {}
        for tensor in stored:
            entry = mapped.get(tensor.name)
            if entry is not None and entry.target in expert_targets:
                layer = expert_targets[entry.target][0]
                self.pieces.setdefault(layer, {}).setdefault(entry.target, []).append((tensor.name, entry))
                continue
            if entry is not None:
                target = entry.target
            else:
                target, pattern = rename_source_key(tensor.name, renamings, converters, model.base_model_prefix, state)
                if target not in state and tensor.name in state:
                    target, pattern = tensor.name, None
                if pattern is not None:
                    raise UnsupportedModelError(
                        f"{model_dir}: stored tensor {tensor.name} is converted by a transformers rule outside the experts; "
                        "load this model in memory and pass it to detect() instead."
                    )
            if target not in state:
                raise UnsupportedModelError(f"{model_dir}: stored tensor {tensor.name} maps to nothing in the model ({target}).")
            eager.setdefault(target, []).append((tensor.name, entry))
        for target, sources in eager.items():
            if len(sources) != 1:
                raise UnsupportedModelError(f"{model_dir}: {len(sources)} stored tensors load into {target}; the layout is not understood.")
            name = sources[0][0]
            with safe_open(str(self.file_of[name]), framework="pt") as handle:
                value = handle.get_tensor(name)
            _set_tensor(model, target, self._cast(value))
        if getattr(config, "tie_word_embeddings", False):
            model.tie_weights()
        missing = [n for n, p in model.named_parameters() if p.device.type == "meta" and n not in expert_targets]
        if missing:
            raise ModelError(f"{model_dir}: the checkpoint stores no tensor for {missing[:3]}; it does not match its config.")

    def _cast(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.target_dtype is not None and tensor.is_floating_point():
            return tensor.to(self.target_dtype)
        return tensor

    def _assemble(self, target: str, sources: list[tuple[str, Any]]) -> torch.Tensor:
        from safetensors import safe_open

        if len(sources) == 1 and isinstance(sources[0][1], ExpertSlice):
            name = sources[0][0]
            with safe_open(str(self.file_of[name]), framework="pt") as handle:
                return handle.get_tensor(name)
        by_pattern: dict[str, dict[int, str]] = {}
        for name, piece in sources:
            by_pattern.setdefault(piece.pattern, {})[piece.expert] = name
        converter = self.converters[next(iter(by_pattern))]
        operations = list(converter.operations)
        stacked = []
        for pattern in converter.source_patterns:
            names = by_pattern[pattern]
            tensors = []
            for expert in sorted(names):
                with safe_open(str(self.file_of[names[expert]]), framework="pt") as handle:
                    tensors.append(handle.get_tensor(names[expert]))
            stacked.append(torch.stack(tensors, dim=operations[0].dim))
        return stacked[0] if len(stacked) == 1 else torch.cat(stacked, dim=operations[1].dim)

    @contextmanager
    def experts(self, layer: int) -> Iterator[None]:
        targets = self.pieces.get(layer, {})
        state_shapes = {name: tuple(t.shape) for name, t in self.moe.model.state_dict().items() if name in targets}
        try:
            for target, sources in targets.items():
                tensor = self._assemble(target, sources)
                if tuple(tensor.shape) != state_shapes[target]:
                    raise UnsupportedModelError(
                        f"{self.model_dir}: the stored experts of {target} assemble to {tuple(tensor.shape)}, "
                        f"the model expects {state_shapes[target]}."
                    )
                _set_tensor(self.moe.model, target, self._cast(tensor))
            yield
        finally:
            for target in targets:
                _set_tensor(self.moe.model, target, None)

    def fingerprint(self) -> str:
        """The checkpoint's fingerprint (its stored tensors, read one at a time; computed once)."""
        if self._fingerprint is None:
            self._fingerprint = checkpoint_fingerprint(self.model_dir)
        return self._fingerprint

    def dtype(self) -> str:
        dtypes = {str(t.dtype).removeprefix("torch.") for t in self.moe.model.parameters() if t.device.type != "meta"}
        return "/".join(sorted(dtypes))


@contextmanager
def open_model(source: MoEModel | str | os.PathLike, role: str, *, dtype: torch.dtype | None = None) -> Iterator[ModelView]:
    """The view of ``source``: as is for a loaded model, read lazily for a local safetensors checkpoint,
    loaded with :func:`moeguard.models.load_moe` otherwise (hub ids)."""
    if isinstance(source, MoEModel):
        yield ModelView(source)
        return
    if not isinstance(source, (str, os.PathLike)):
        raise InputError(f"the {role} must be a MoEModel or a model directory / hub id, got {type(source).__name__}.")
    name, is_local = check_model_source(source)
    if is_local and checkpoint_files(name):
        yield CheckpointView(name, dtype=dtype)
        return
    yield ModelView(load_moe(name, **({"dtype": dtype} if dtype is not None else {})))
