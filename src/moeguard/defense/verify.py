"""Checking a fine-tuned model against a selective fine-tuning protocol.

A compliant fine-tune changes only permitted groups and keeps every MoE layer, every
expert and their order. The verifier recognises each of the model's experts by its
hash (falling back to its router row, then to the nearest parent expert when the
parent's weights are at hand), so it can say which experts were removed, reordered,
added or changed, and which frozen tensors changed and by how much.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from moeguard.defense.protocol import Protocol, expert_hashes, router_row_hashes
from moeguard.errors import FingerprintMismatchError
from moeguard.models import MoEModel
from moeguard.models.fingerprint import short, tensor_digest
from moeguard.models.layers import MoELayer

VIOLATION_KINDS = (
    "frozen_changed",  # a tensor, expert or router row of a frozen group changed
    "experts_removed",
    "experts_reordered",
    "experts_added",
    "routing_changed",  # top-k differs
    "layers_changed",  # MoE layers missing or added
    "missing_tensor",
    "unexpected_tensor",
    "shape_changed",
)


@dataclass
class Violation:
    """One way the model breaks the protocol."""

    kind: str
    message: str
    group: str | None = None
    tensor: str | None = None
    layer: int | None = None
    experts: list[int] | None = None


@dataclass
class VerificationReport:
    """The verdict: compliant iff there are no violations.

    ``expert_map[l][j]`` is the parent expert the model's j-th expert of MoE layer
    ``l`` was recognised as (None if it matches none); ``changed_permitted`` lists
    what changed inside permitted groups (allowed, shown for information).
    """

    model_fingerprint: str
    parent_fingerprint: str
    permitted: list[str]
    frozen: list[str]
    violations: list[Violation] = field(default_factory=list)
    changed_permitted: list[str] = field(default_factory=list)
    expert_map: list[list[int | None]] = field(default_factory=list)

    @property
    def compliant(self) -> bool:
        return not self.violations

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "compliant": self.compliant}

    def summary(self) -> str:
        head = (
            f"model {short(self.model_fingerprint)} vs parent {short(self.parent_fingerprint)}; "
            f"permitted: {', '.join(self.permitted)}; frozen: {', '.join(self.frozen)}"
        )
        if self.compliant:
            return (
                f"COMPLIANT: {head}\n  {len(self.changed_permitted)} permitted tensor(s) or expert row(s) changed; "
                "every frozen group, expert and expert position is as released."
            )
        lines = [f"NOT COMPLIANT: {head}", f"  {len(self.violations)} violation(s):"]
        lines += [f"  - [{v.kind}] {v.message}" for v in self.violations]
        return "\n".join(lines)


def relative_change(new: torch.Tensor, old: torch.Tensor) -> float:
    """``||new - old|| / ||old||`` in float64 (inf when ``old`` is zero and ``new`` is not)."""
    old64, new64 = old.detach().double().cpu(), new.detach().double().cpu()
    scale = torch.linalg.vector_norm(old64).item()
    diff = torch.linalg.vector_norm(new64 - old64).item()
    return diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))


def _expert_slices(layer: MoELayer, expert: int) -> torch.Tensor:
    return torch.cat([ref.get().detach().select(ref.dim, expert).reshape(-1).double().cpu() for ref in layer.tensors("experts")])


def match_experts(
    model_layer: MoELayer,
    parent_expert_hashes: list[str],
    parent_router_hashes: list[str],
    parent_layer: MoELayer | None,
) -> list[int | None]:
    """For each of the model's experts, the parent expert it is (None if unknown).

    Tried in order: equal expert weights; equal router row; the nearest unclaimed
    parent expert by relative distance (parent weights needed); the same position
    when no expert was removed or added.
    """
    own_experts = expert_hashes(model_layer)
    own_rows = router_row_hashes(model_layer)
    assigned: list[int | None] = [None] * len(own_experts)
    claimed: set[int] = set()

    def claim_equal(own: list[str], parents: list[str]) -> None:
        for j, value in enumerate(own):
            if assigned[j] is not None:
                continue
            candidates = [i for i, h in enumerate(parents) if h == value and i not in claimed]
            if candidates:
                choice = j if j in candidates else candidates[0]
                assigned[j] = choice
                claimed.add(choice)

    claim_equal(own_experts, parent_expert_hashes)
    claim_equal(own_rows, parent_router_hashes)
    unmatched = [j for j, i in enumerate(assigned) if i is None]
    if unmatched and parent_layer is not None:
        free = [i for i in range(parent_layer.num_experts) if i not in claimed]
        parent_vectors = {i: _expert_slices(parent_layer, i) for i in free}
        for j in unmatched:
            mine = _expert_slices(model_layer, j)
            distances = {i: relative_change(mine, v) for i, v in parent_vectors.items() if v.shape == mine.shape}
            if distances:
                best = min(distances, key=distances.get)
                assigned[j] = best
                claimed.add(best)
                del parent_vectors[best]
    elif unmatched and len(own_experts) == len(parent_expert_hashes):
        for j in unmatched:
            if j not in claimed:
                assigned[j] = j
                claimed.add(j)
    return assigned


def verify_fine_tune(model: MoEModel, protocol: Protocol, parent: MoEModel | None = None) -> VerificationReport:
    """Check ``model`` against ``protocol`` (``parent``, if given, must be the model it pins).

    The protocol must be self-consistent; with the parent, everything in it but the
    permitted groups must also be what the parent gives (see
    :mod:`moeguard.defense.protocol`), changed tensors are reported with their
    relative change and changed experts are recognised by distance; without it, by
    hashes only.
    """
    protocol.check_consistent()
    if parent is not None and parent.fingerprint() != protocol.parent_fingerprint:
        raise FingerprintMismatchError(
            f"the protocol was written for the model with fingerprint {short(protocol.parent_fingerprint)} "
            f"({protocol.parent_model}), but the parent given has {short(parent.fingerprint())}; pass the released "
            "model the protocol was written for."
        )
    if parent is not None:
        protocol.check_derived_from(parent)
    frozen = set(protocol.frozen)
    report = VerificationReport(model.fingerprint(), protocol.parent_fingerprint, list(protocol.permitted), protocol.frozen)
    parent_layers = {layer.path: layer for layer in parent.layers} if parent is not None else {}
    model_layers = {layer.path: layer for layer in model.layers}

    for index, record in enumerate(protocol.layers):
        layer = model_layers.get(record.path)
        if layer is None:
            report.violations.append(
                Violation("layers_changed", f"MoE layer {index} ({record.path}) is missing from the model.", layer=index)
            )
            report.expert_map.append([])
            continue
        report.expert_map.append(_check_layer(report, index, record, layer, parent_layers.get(record.path), frozen))
    for path in sorted(set(model_layers) - {record.path for record in protocol.layers}):
        report.violations.append(Violation("layers_changed", f"the model has an MoE layer {path} the released model has not."))

    _check_tensors(report, model, protocol, parent, frozen)
    return report


def _check_layer(
    report: VerificationReport,
    index: int,
    record: Any,
    layer: MoELayer,
    parent_layer: MoELayer | None,
    frozen: set[str],
) -> list[int | None]:
    where = f"MoE layer {index} ({record.path})"
    if layer.top_k != record.top_k:
        report.violations.append(
            Violation("routing_changed", f"{where}: tokens use top-{layer.top_k} experts, released with top-{record.top_k}.", layer=index)
        )
    assigned = match_experts(layer, record.expert_hashes, record.router_row_hashes, parent_layer)
    known = [i for i in assigned if i is not None]
    removed = sorted(set(range(record.num_experts)) - set(known))
    if removed:
        report.violations.append(
            Violation(
                "experts_removed",
                f"{where}: parent experts {removed} were removed ({layer.num_experts} of {record.num_experts} "
                f"remain: parent experts {known}).",
                group="experts",
                layer=index,
                experts=removed,
            )
        )
    added = [j for j, i in enumerate(assigned) if i is None]
    if added:
        report.violations.append(
            Violation(
                "experts_added",
                f"{where}: model experts {added} match no released expert (the layer has {layer.num_experts} experts, "
                f"released with {record.num_experts}).",
                group="experts",
                layer=index,
                experts=added,
            )
        )
    if any(a >= b for a, b in zip(known, known[1:])):
        moved = [f"position {j} holds parent expert {i}" for j, i in enumerate(assigned) if i is not None and i != j]
        report.violations.append(
            Violation(
                "experts_reordered",
                f"{where}: experts were reordered ({'; '.join(moved[:8])}{' ...' if len(moved) > 8 else ''}).",
                group="experts",
                layer=index,
                experts=[i for i in assigned if i is not None],
            )
        )
    own_experts = expert_hashes(layer)
    own_rows = router_row_hashes(layer)
    for j, i in enumerate(assigned):
        if i is None:
            continue
        for group, own, released in (
            ("experts", own_experts, record.expert_hashes),
            ("router", own_rows, record.router_row_hashes),
        ):
            if own[j] == released[i]:
                continue
            label = f"{where}: {'expert' if group == 'experts' else 'router row of expert'} {i}"
            if group in frozen:
                size = ""
                if parent_layer is not None and group == "experts":
                    size = f" (relative change {relative_change(_expert_slices(layer, j), _expert_slices(parent_layer, i)):.3g})"
                report.violations.append(
                    Violation("frozen_changed", f"{label} changed, but the {group} group is frozen{size}.", group=group, layer=index, experts=[i])
                )
            else:
                report.changed_permitted.append(label)
    return assigned


def _check_tensors(
    report: VerificationReport, model: MoEModel, protocol: Protocol, parent: MoEModel | None, frozen: set[str]
) -> None:
    state = model.model.state_dict()
    parent_state = parent.model.state_dict() if parent is not None else {}
    # Expert-indexed tensors are checked expert by expert (they change shape when experts go).
    per_expert = {ref.name for layer in model.layers for ref in layer.expert_tensors}
    per_expert |= {name for name in protocol.groups.get("experts", [])}
    for name, released in protocol.tensor_hashes.items():
        group = protocol.group_of(name)
        tensor = state.get(name)
        if tensor is None:
            kind = "frozen_changed" if group in frozen else "missing_tensor"
            report.violations.append(Violation(kind, f"tensor {name} ({group}) is missing from the model.", group=group, tensor=name))
            continue
        if name in per_expert:
            continue
        if list(tensor.shape) != protocol.tensor_shapes[name]:
            report.violations.append(
                Violation(
                    "shape_changed",
                    f"tensor {name} ({group}) has shape {list(tensor.shape)}, released as {protocol.tensor_shapes[name]}.",
                    group=group,
                    tensor=name,
                )
            )
            continue
        if tensor_digest(name, tensor) == released:
            continue
        if group in frozen:
            size = f" (relative change {relative_change(tensor, parent_state[name]):.3g})" if name in parent_state else ""
            report.violations.append(
                Violation("frozen_changed", f"tensor {name} changed, but the {group} group is frozen{size}.", group=group, tensor=name)
            )
        else:
            report.changed_permitted.append(name)
    for name in state:
        if name not in protocol.tensor_hashes:
            report.violations.append(
                Violation("unexpected_tensor", f"tensor {name} is not part of the released model.", tensor=name)
            )
