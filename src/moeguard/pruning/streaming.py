"""Streaming prune: remove experts from a safetensors checkpoint one shard at a time.

The model is never loaded. Its structure comes from ``config.json`` (the model is
built on the meta device and its MoE layers discovered as usual); which stored
tensor belongs to which expert comes from transformers' own checkpoint conversion
rules, applied to every stored name exactly as ``from_pretrained`` does:

- a name that converts to a fused expert tensor through ``MergeModulelist`` (the
  per-expert layout Qwen-MoE, OLMoE, DeepSeek-V3 and Mixtral are saved in,
  ``...experts.{i}.gate_proj.weight``) holds one expert, numbered by the ``*`` of
  the rule: kept experts are renumbered ``0..m-1`` in order, the others dropped;
- a name that is only renamed onto an expert-indexed tensor (routers, correction
  biases, GPT-OSS's fused experts and biases) holds every expert along the same
  axis as in memory: it is sliced to the kept ones.

Every other tensor is copied byte for byte. The result is what :meth:`MoEModel.save`
writes after an in-memory :meth:`MoEModel.prune`, tensor for tensor (plus the same
config, generation config, tokenizer and manifest). Anything the
rules cannot account for (a stored name inside an expert or router module that
maps to nothing known, missing expert indices, a conversion other than stacking)
is refused rather than guessed.

Peak memory is one input shard plus its pruned copy. Finished shards are kept in
``.NAME.partial`` beside the output (a :class:`moeguard.runs.Run` keyed by the input
files and the planned writes), so an interrupted run of the same job resumes where it
stopped; another job for the same output is refused until that state is deleted.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

import moeguard
from moeguard.errors import FingerprintMismatchError, InputError, ModelError, MoeGuardError, UnsupportedModelError
from moeguard.io import atomic_dir, check_output, write_json
from moeguard.models.fingerprint import checkpoint_files, combine_digests, short
from moeguard.models.keep_sets import KeepSets, normalize_keep_sets
from moeguard.models.loading import check_model_source, load_tokenizer
from moeguard.models.manifest import MANIFEST_NAME, PruneManifest
from moeguard.models.stored import DTYPES, SafetensorsWriter, StoredFile, StoredTensor, TensorStream, read_header
from moeguard.models.moe_model import MoEModel, ParameterCounts
from moeguard.models.surgery import prune_in_place, shape_mismatches
from moeguard.runs import Run, partial_path

logger = logging.getLogger("moeguard.pruning")

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PROGRESS_NAME = "progress.json"
# Weights in formats the streaming prune does not read (named in its error message).
WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")


# ---------------------------------------------------------------------------- reading a checkpoint


@dataclass(frozen=True)
class Shard:
    """One safetensors file of the checkpoint: its name in the directory and its header."""

    file: str
    stored: StoredFile

    @property
    def tensors(self) -> list[StoredTensor]:
        return self.stored.tensors

    @property
    def metadata(self) -> dict[str, str]:
        return self.stored.metadata


def read_checkpoint(model_dir: Path) -> list[Shard]:
    """The shards of a safetensors checkpoint directory, in file order."""
    files = checkpoint_files(model_dir)
    missing = [path.name for path in files if not path.is_file()]
    if missing:
        raise ModelError(f"{model_dir}: the index names shard(s) {missing} that are not in the directory.")
    if not files:
        other = sorted(p.name for p in model_dir.iterdir() if p.suffix in WEIGHT_SUFFIXES)
        found = f" (it has {', '.join(other[:3])})" if other else ""
        raise ModelError(
            f"{model_dir} has no safetensors weights ({SINGLE_NAME} or {INDEX_NAME}){found}; the streaming prune reads "
            "safetensors only. Prune in memory instead (without `streaming`), or re-save the model with save_pretrained.",
            arguments=("streaming",),
        )
    return [Shard(path.name, read_header(path)) for path in files]


def load_meta_moe(model_dir: str | Path, *, trust_remote_code: bool = False) -> MoEModel:
    """The model of ``model_dir`` built on the meta device from its config (no weights read), as a :class:`MoEModel`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot read the config of {model_dir}: {str(error).splitlines()[0]}") from None
    if getattr(config, "quantization_config", None):
        raise UnsupportedModelError(
            f"{model_dir} is a quantized checkpoint ({config.quantization_config.get('quant_method', 'quantized')}); "
            "its expert tensors come with scales the streaming prune does not rewrite. Prune an unquantized copy."
        )
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except ValueError as error:
        raise UnsupportedModelError(f"{config.model_type}: cannot build a causal LM from this config "
                                    f"({str(error).splitlines()[0]}).") from None
    return MoEModel.from_model(model, source=str(model_dir))


# ---------------------------------------------------------------------------- stored names -> experts


@dataclass(frozen=True)
class ExpertSlice:
    """A stored tensor that holds every expert of MoE layer ``layer`` along ``axis``."""

    layer: int
    axis: int
    target: str  # the in-memory tensor it loads into


@dataclass(frozen=True)
class ExpertPiece:
    """A stored tensor of one expert; ``span`` locates the expert number in the stored name."""

    layer: int
    expert: int
    span: tuple[int, int]
    target: str
    pattern: str  # the conversion rule's source pattern (one piece per expert and pattern)


def _index_regex(source_pattern: str) -> re.Pattern[str]:
    """A regex for a conversion rule's source pattern whose ``*`` captures the expert number."""
    escaped = re.escape(source_pattern.removeprefix("^")).replace(r"\*", r"(\d+)")
    return re.compile(escaped + (r"(?!\w)" if re.search(r"\w$", source_pattern) else ""))


def _stacking_dim(converter: Any) -> int | None:
    """The axis a converter stacks per-expert tensors along, if it only stacks and concatenates."""
    from transformers.core_model_loading import Concatenate, MergeModulelist

    operations = list(getattr(converter, "operations", []))
    if not operations or not isinstance(operations[0], MergeModulelist):
        return None
    if not all(isinstance(op, Concatenate) and op.dim != operations[0].dim for op in operations[1:]):
        return None
    return operations[0].dim


def map_expert_tensors(moe: MoEModel, stored: Sequence[StoredTensor]) -> dict[str, ExpertSlice | ExpertPiece]:
    """Which stored tensors hold experts, and how (see the module docstring).

    ``moe`` is the model the checkpoint is for (on the meta device is enough).
    Stored names not in the result hold no expert. Raises
    :class:`UnsupportedModelError` for anything the conversion rules leave unclear,
    and when some expert of some expert tensor is stored nowhere.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    model = moe.model
    state = model.state_dict()
    expert_refs = {ref.name: (layer, ref) for layer in moe.layers for ref in layer.expert_tensors if ref.name in state}
    conversions = get_model_conversion_mapping(model)
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    by_pattern = {pattern: c for c in converters for pattern in c.source_patterns}
    prefix = model.base_model_prefix

    result: dict[str, ExpertSlice | ExpertPiece] = {}
    stored_prefixes: set[str] = set()  # stored module paths of experts and routers, for the leftover check
    for tensor in stored:
        # As from_pretrained does: rename, then at most one converter; fall back to the name as stored.
        target, pattern = rename_source_key(tensor.name, renamings, converters, prefix, state)
        if target not in state and tensor.name in state:
            target, pattern = rename_source_key(tensor.name, [], [], prefix, state)
        if target not in expert_refs:
            continue
        layer, ref = expert_refs[target]
        in_memory = tuple(state[target].shape)
        if pattern is None:
            if tensor.shape != in_memory:
                raise UnsupportedModelError(
                    f"stored tensor {tensor.name} {tensor.shape} loads into {target} {in_memory} with a different "
                    "shape; the streaming prune cannot tell which axis holds the experts."
                )
            result[tensor.name] = ExpertSlice(layer.index, ref.dim, target)
            stored_prefixes.add(tensor.name.rsplit(".", 1)[0] + ".")
            continue
        dim = _stacking_dim(by_pattern[pattern])
        match = _index_regex(pattern).search(tensor.name)
        if dim != ref.dim or match is None or len(tensor.shape) != len(in_memory) - 1:
            raise UnsupportedModelError(
                f"stored tensor {tensor.name} is converted into {target} by a transformers rule "
                f"({type(by_pattern[pattern]).__name__} {pattern!r}) other than stacking one tensor per expert along "
                f"the expert axis; the streaming prune cannot slice it. Prune in memory instead (without `streaming`).",
                arguments=("streaming",),
            )
        span = match.span(1)
        result[tensor.name] = ExpertPiece(layer.index, int(match.group(1)), span, target, pattern)
        stored_prefixes.add(tensor.name[: span[0]])
    _check_leftovers(stored, result, stored_prefixes)
    _check_complete(moe, expert_refs, result)
    return result


def _check_leftovers(stored: Sequence[StoredTensor], mapped: dict[str, Any], prefixes: set[str]) -> None:
    leftovers = [t.name for t in stored if t.name not in mapped and any(t.name.startswith(p) for p in prefixes)]
    if leftovers:
        raise UnsupportedModelError(
            f"stored tensor(s) {leftovers[:3]} sit inside an expert or router module but map to no expert tensor "
            "of the model (quantization scales or an unknown layout?); the streaming prune would leave them wrong."
        )


def _check_complete(moe: MoEModel, expert_refs: dict[str, Any], mapped: dict[str, ExpertSlice | ExpertPiece]) -> None:
    slices = {entry.target for entry in mapped.values() if isinstance(entry, ExpertSlice)}
    pieces: dict[tuple[str, str], list[int]] = {}
    for entry in mapped.values():
        if isinstance(entry, ExpertPiece):
            pieces.setdefault((entry.target, entry.pattern), []).append(entry.expert)
    for target, (layer, _) in expert_refs.items():
        found = [numbers for (name, _), numbers in pieces.items() if name == target]
        if target in slices and not found:
            continue
        if not found:
            raise UnsupportedModelError(
                f"the checkpoint stores no tensor for {target} (MoE layer {layer.index}) under any name transformers "
                "would load into it; the streaming prune cannot account for every expert."
            )
        for numbers in found:
            if sorted(numbers) != list(range(layer.num_experts)):
                raise UnsupportedModelError(
                    f"the stored experts of {target} are numbered {sorted(numbers)[:10]}..., expected exactly "
                    f"0..{layer.num_experts - 1}; the checkpoint does not match its config."
                )


# ---------------------------------------------------------------------------- the plan of writes


@dataclass(frozen=True)
class TensorWrite:
    """What becomes of one stored tensor: copied, sliced to ``index`` along ``axis``, or renamed to ``name``."""

    source: str
    name: str
    axis: int | None = None
    index: tuple[int, ...] | None = None


def plan_writes(
    stored: Sequence[StoredTensor], mapped: dict[str, ExpertSlice | ExpertPiece], kept: Sequence[list[int] | None]
) -> list[TensorWrite]:
    """The writes that prune ``stored`` to the kept experts (``kept[l]`` None = layer keeps all)."""
    writes = []
    for tensor in stored:
        entry = mapped.get(tensor.name)
        layer_kept = kept[entry.layer] if entry is not None else None
        if entry is None or layer_kept is None:
            writes.append(TensorWrite(tensor.name, tensor.name))
        elif isinstance(entry, ExpertSlice):
            writes.append(TensorWrite(tensor.name, tensor.name, entry.axis, tuple(layer_kept)))
        elif entry.expert in layer_kept:
            start, end = entry.span
            renamed = f"{tensor.name[:start]}{layer_kept.index(entry.expert)}{tensor.name[end:]}"
            writes.append(TensorWrite(tensor.name, renamed))
    names = [w.name for w in writes]
    if len(set(names)) != len(names):
        raise UnsupportedModelError("renumbering the kept experts would give two stored tensors the same name; "
                                    "the checkpoint's expert naming is not understood.")
    return writes


def written(tensor: StoredTensor, write: TensorWrite) -> StoredTensor:
    """The stored tensor ``write`` produces from ``tensor`` (name, shape and size; the data is not read)."""
    if write.axis is None or write.index is None:
        return StoredTensor(write.name, tensor.dtype, tensor.shape, tensor.nbytes)
    shape = list(tensor.shape)
    nbytes = tensor.nbytes // shape[write.axis] * len(write.index)
    shape[write.axis] = len(write.index)
    return StoredTensor(write.name, tensor.dtype, tuple(shape), nbytes)


def output_file_names(count: int) -> list[str]:
    """``model.safetensors`` for one shard, ``model-0000i-of-0000n.safetensors`` for several (as save_pretrained)."""
    if count == 1:
        return [SINGLE_NAME]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


# ---------------------------------------------------------------------------- the prune


@dataclass
class StreamingPruneResult:
    """What a streaming prune wrote and measured."""

    out_dir: Path
    manifest: PruneManifest
    before: ParameterCounts
    after: ParameterCounts
    shards: int
    bytes_written: int
    resumed_shards: int = 0


def _run_key(shards: Sequence[Shard], writes: dict[str, list[TensorWrite]], model_dir: Path) -> str:
    """Identifies one prune job: the input files (name, size, mtime) and every planned write."""
    digest = hashlib.sha256()
    for shard in shards:
        stat = (model_dir / shard.file).stat()
        digest.update(f"{shard.file}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
        for write in writes[shard.file]:
            digest.update(f"{write.source}>{write.name}|{write.axis}|{write.index}\n".encode())
    return digest.hexdigest()


def _kept_ranges(tensor: StoredTensor, index: Sequence[int]) -> list[tuple[int, int]]:
    """Byte ranges of a tensor holding the experts ``index`` along its first axis (adjacent ranges merged)."""
    row = tensor.nbytes // tensor.shape[0]
    ranges: list[tuple[int, int]] = []
    for expert in index:
        if ranges and ranges[-1][1] == expert * row:
            ranges[-1] = (ranges[-1][0], (expert + 1) * row)
        else:
            ranges.append((expert * row, (expert + 1) * row))
    return ranges


def _prune_shard(path: Path, shard: Shard, writes: Sequence[TensorWrite], out_path: Path) -> dict[str, str]:
    """Stream one shard and write its pruned copy; return the digests of the tensors read.

    Copied and renamed tensors pass through as bytes, as do experts sliced along the
    first axis (kept rows are byte ranges); a slice along another axis is gathered and
    cut in memory (routers and biases: small). Memory: the read-ahead buffers.
    """
    by_source = {w.source: w for w in writes}
    outputs = [written(t, by_source[t.name]) for t in shard.tensors if t.name in by_source]
    stream = TensorStream(shard.stored)
    ranges: list[tuple[int, int]] = []
    gathered = bytearray()
    writer = SafetensorsWriter(out_path, outputs, shard.metadata or {"format": "pt"}) if outputs else None
    try:
        for tensor, position, piece in stream:
            write = by_source.get(tensor.name)
            if writer is None or write is None:
                continue
            end = position + len(piece)
            if write.index is None:
                writer.write(piece)
            elif write.axis == 0:
                if position == 0:
                    ranges = _kept_ranges(tensor, write.index)
                for first, last in ranges:
                    if first < end and last > position:
                        writer.write(piece[max(first, position) - position : min(last, end) - position])
            else:
                gathered += piece
                if end == tensor.nbytes:
                    full = torch.frombuffer(gathered, dtype=DTYPES[tensor.dtype]) if tensor.nbytes else torch.empty(0)
                    full = full.to(DTYPES[tensor.dtype]).view(tensor.shape)
                    writer.write_tensor(full.index_select(write.axis, torch.tensor(write.index, dtype=torch.long)))
                    gathered = bytearray()
    except BaseException as error:
        if writer is not None:
            writer.__exit__(type(error), error, None)
        if isinstance(error, (OSError, EOFError)):
            raise ModelError(f"cannot read {path}: {error}. The shard is damaged or truncated; copy or download it "
                             "again.") from None
        raise
    if writer is not None:
        writer.close()
    return stream.digests


def _save_side_files(model_dir: Path, out_dir: Path, trust_remote_code: bool) -> None:
    """What ``MoEModel.save`` writes beside the weights: the generation config and the tokenizer.

    Nothing else is copied: a model card or other notes describe the parent, not the pruned model.
    """
    from transformers import GenerationConfig

    if (model_dir / "generation_config.json").is_file():
        GenerationConfig.from_pretrained(model_dir).save_pretrained(out_dir)
    tokenizer = load_tokenizer(str(model_dir), trust_remote_code=trust_remote_code)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


def streaming_prune(
    model_dir: str | Path,
    keep: KeepSets,
    out_dir: str | Path,
    *,
    selection: dict[str, Any] | None = None,
    expected_fingerprint: str | None = None,
    overwrite: bool = False,
    trust_remote_code: bool = False,
    progress: bool = True,
) -> StreamingPruneResult:
    """Prune the safetensors checkpoint in ``model_dir`` to ``keep`` without loading it.

    ``keep`` maps MoE layer -> kept experts, one count for all pruned layers (as
    :meth:`MoEModel.prune`). Writes shards, index, updated config, generation
    config, tokenizer and the manifest, whose parent fingerprint is the checkpoint
    fingerprint computed while reading. With ``expected_fingerprint`` (an
    attribution's checkpoint fingerprint) a different parent is refused before the
    output appears.
    """
    source, is_local = check_model_source(model_dir)
    if not is_local:
        raise InputError(
            f"{source} is not a local directory; the streaming prune reads a checkpoint from disk. Download it first "
            "(e.g. `huggingface-cli download ORG/NAME --local-dir DIR`) and pass the directory."
        )
    model_dir = Path(source)
    out_dir = check_output(out_dir, inputs=[model_dir], overwrite=overwrite, directory=True)

    moe = load_meta_moe(model_dir, trust_remote_code=trust_remote_code)
    shards = read_checkpoint(model_dir)
    stored = [tensor for shard in shards for tensor in shard.tensors]
    keep_sets = normalize_keep_sets(moe.layers, keep, physical=True)
    kept = [k if k is not None else list(range(layer.num_experts)) for k, layer in zip(keep_sets, moe.layers)]
    parent_num_experts = moe.num_experts
    mapped = map_expert_tensors(moe, stored)
    writes = {shard.file: plan_writes(shard.tensors, mapped, keep_sets) for shard in shards}
    before = moe.parameter_counts()

    # The pruned model, still on the meta device: its config is the one to write, and the
    # written names and shapes must be exactly what it loads.
    prune_in_place(moe.model, moe.layers, keep_sets)
    problems = shape_mismatches(moe.model)
    if problems:
        raise UnsupportedModelError(f"{moe.model_type}: after pruning, the config does not describe the model "
                                    f"({'; '.join(problems[:3])}).")
    planned = [written(t, w) for shard in shards for t, w in _pairs(shard.tensors, writes[shard.file])]
    map_expert_tensors(moe, planned)  # every pruned expert tensor is fully and consistently stored
    after = moe.parameter_counts()

    non_empty = [shard for shard in shards if writes[shard.file]]
    out_names = dict(zip((s.file for s in non_empty), output_file_names(len(non_empty))))
    partial = partial_path(out_dir)
    run = Run.open(partial, "streaming prune", {"job": _run_key(shards, writes, model_dir)},
                   labels={"job": "input files or kept experts"})
    state = run.load_json(PROGRESS_NAME) or {"shards": {}}
    resumed = len(state["shards"])
    if resumed:
        logger.info("resuming the streaming prune: %d shard(s) already written", resumed)
    try:
        bar = tqdm(shards, desc="streaming prune", unit="shard", disable=None if progress else True)
        for shard in bar:
            out_name = out_names.get(shard.file)
            if shard.file in state["shards"] and (out_name is None or (partial / out_name).is_file()):
                continue
            digests = _prune_shard(model_dir / shard.file, shard, writes[shard.file], partial / (out_name or "unused"))
            state["shards"][shard.file] = digests
            run.save_json(PROGRESS_NAME, state)
            logger.debug("pruned %s -> %s", shard.file, out_name)
        bar.close()

        digests = {name: digest for shard_digests in state["shards"].values() for name, digest in shard_digests.items()}
        parent_fingerprint = combine_digests(digests)
        if expected_fingerprint is not None and expected_fingerprint != parent_fingerprint:
            raise FingerprintMismatchError(
                f"the attribution was computed on checkpoint {short(expected_fingerprint)}, but {model_dir} is "
                f"checkpoint {short(parent_fingerprint)}: its stored tensors differ. Use the model the attribution "
                "was made with, or run `moeguard attribute` on this one."
            )
        manifest = _manifest(model_dir, parent_fingerprint, parent_num_experts, kept, moe, selection)
        bytes_written = 0
        with atomic_dir(out_dir, overwrite=overwrite) as tmp:
            weight_map = {}
            for shard in non_empty:
                name = out_names[shard.file]
                (partial / name).rename(tmp / name)
                bytes_written += (tmp / name).stat().st_size
                weight_map.update({w.name: name for w in writes[shard.file]})
            if len(non_empty) > 1:
                _write_index(tmp / INDEX_NAME, weight_map, planned)
            moe.model.config.save_pretrained(tmp)
            _save_side_files(model_dir, tmp, trust_remote_code)
            write_json(tmp / MANIFEST_NAME, manifest.to_dict())
    except MoeGuardError:
        run.remove()
        raise
    run.remove()
    logger.info("streaming prune of %s: %d shards, %.1f MB written to %s", model_dir, len(non_empty), bytes_written / 1e6, out_dir)
    return StreamingPruneResult(out_dir, manifest, before, after, len(non_empty), bytes_written, resumed)


def _manifest(
    model_dir: Path, fingerprint: str, parent_num_experts: list[int], kept: list[list[int]], moe: MoEModel,
    selection: dict[str, Any] | None,
) -> PruneManifest:
    """The manifest of a streaming prune; a parent that was itself pruned passes its own on as lineage."""
    lineage = []
    if (model_dir / MANIFEST_NAME).is_file():
        previous = PruneManifest.load(model_dir / MANIFEST_NAME)
        lineage = [previous.to_dict()] + previous.lineage
    return PruneManifest(
        parent_fingerprint=fingerprint,
        parent_model=str(model_dir),
        parent_num_experts=parent_num_experts,
        kept=kept,
        layer_paths=[layer.path for layer in moe.layers],
        selection=dict(selection or {}),
        moeguard_version=moeguard.__version__,
        lineage=lineage,
        parent_fingerprint_kind="checkpoint",
    )


def _write_index(path: Path, weight_map: dict[str, str], planned: Sequence[StoredTensor]) -> None:
    """``model.safetensors.index.json`` as save_pretrained writes it."""
    metadata = {"total_parameters": sum(math.prod(t.shape) for t in planned), "total_size": sum(t.nbytes for t in planned)}
    write_json(path, {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))})


def _pairs(tensors: Sequence[StoredTensor], writes: Sequence[TensorWrite]) -> list[tuple[StoredTensor, TensorWrite]]:
    by_name = {t.name: t for t in tensors}
    return [(by_name[w.source], w) for w in writes]
