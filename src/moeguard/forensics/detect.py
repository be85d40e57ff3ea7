"""``detect``: is a suspect MoE a pruned (and re-aligned) derivative of a parent?

How it decides, per MoE layer pair (suspect layer, parent layer):

1. **Signatures.** Three per expert, each identifying it in a different way:
   its responses ``Y_e = f_e(X)`` to shared Gaussian probe inputs (unchanged by
   anything that leaves the function unchanged: neuron order and scale, weight
   layout, dtype), its weight rows with the hidden axis last (fade only linearly
   under fine-tuning, where responses fade like a product of three matrices), and
   its router row.
2. **Similarity.** For every (suspect expert ``i``, parent expert ``j``) the cosine
   of each signature: ``C`` (responses), ``W`` (weights, when shapes agree), ``R``
   (router rows).
3. **Null by permutation.** An independently trained model is, among everything
   else, a model whose hidden coordinates are labelled arbitrarily. The cosines
   are also computed against ``m - 1`` conjugated copies of the suspect (its hidden
   coordinates cyclically shifted, see :mod:`moeguard.forensics.probes`); each entry
   is standardised against those copies and the signals are summed into pair
   evidence ``Z[i, j]``, roughly ``N(0, 1)`` for unrelated experts.
4. **Matching.** A linear assignment pairs suspect experts with parent experts to
   maximise the total evidence; pairs above a Bonferroni threshold are the
   recovered kept set, in the suspect's order (undoing any re-ordering). The
   layer statistic is the mean evidence of the assignment, recomputed, matching
   included, for every conjugated copy.
5. **Score.** The model statistic ``T`` is the sum of the layer statistics (after
   aligning layers: by position when both models have the same number of MoE
   layers, otherwise by the best monotone alignment, redone for every null
   sample). ``z = (T_0 - mean T_null) / std T_null``; the reported p-value is its
   Gaussian tail and the suspect is called derived when ``p <= alpha`` (default
   1e-6, ``z >= 4.75``). The exact randomisation p-value ``#{T_s >= T_0} / m`` is
   reported beside it.

Models with different hidden sizes cannot be compared (their experts live in
different spaces) and get the status "not comparable".
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from moeguard.errors import InputError
from moeguard.forensics.matching import (
    group_statistics,
    group_test,
    match_experts,
    monotone_alignment,
    pair_threshold,
    z_threshold,
)
from moeguard.forensics.probes import cyclic_shifts, orbit_probes
from moeguard.forensics.signatures import expert_responses, expert_weight_rows, layer_hidden_size, router_rows
from moeguard.forensics.similarity import leave_one_out_z, pair_evidence, response_similarities, row_similarities
from moeguard.forensics.verdict import ExpertMatch, LayerVerdict, Verdict, format_p
from moeguard.models import MoEModel, load_moe

log = logging.getLogger("moeguard.forensics")

DEFAULT_ALPHA = 1e-6
DEFAULT_PROBES = 128
DEFAULT_GROUP_SIZE = 64
DEFAULT_WEIGHT_ROWS = 256


@dataclass
class LayerSignature:
    """What one MoE layer is compared by (all float32, on the CPU)."""

    responses: torch.Tensor  # [E, B, m, H] expert answers to the orbit probes
    weights: torch.Tensor  # [E, K, H] expert weight rows, hidden axis last
    router: torch.Tensor  # [E, H] router rows


@dataclass
class LayerComparison:
    """A suspect layer against a parent layer, under every permutation."""

    statistics: torch.Tensor  # [m]: layer statistic for the comparison (0) and each null sample
    evidence: torch.Tensor  # [Es, Ep] pair evidence of the comparison itself
    similarity: torch.Tensor  # [Es, Ep] response cosine
    weight_similarity: torch.Tensor | None  # [Es, Ep] weight cosine (None: expert shapes differ)
    router_similarity: torch.Tensor  # [Es, Ep] router-row cosine


def layer_signature(moe: MoEModel, layer: int, probes: torch.Tensor, *, max_rows: int | None, seed: int) -> LayerSignature:
    moe_layer = moe.layers[layer]
    return LayerSignature(
        expert_responses(moe, layer, probes),
        expert_weight_rows(moe_layer, max_rows=max_rows, seed=seed),
        router_rows(moe_layer),
    )


def compare_layers(suspect: LayerSignature, parent: LayerSignature, perms: torch.Tensor) -> LayerComparison:
    """Similarities, pair evidence and the layer statistic under every permutation.

    The weight signal is used only when both layers' experts have the same shapes
    (a suspect with narrower experts is compared by responses and router rows).
    """
    responses = response_similarities(suspect.responses, parent.responses, perms)
    routers = row_similarities(suspect.router, parent.router, perms)
    signals = [leave_one_out_z(responses), leave_one_out_z(routers)]
    weights = None
    if suspect.weights.shape[1:] == parent.weights.shape[1:]:
        weights = row_similarities(suspect.weights, parent.weights, perms)
        signals.append(leave_one_out_z(weights))
    evidence = pair_evidence(*signals)
    return LayerComparison(
        group_statistics(evidence),
        evidence[0],
        responses[0],
        weights[0] if weights is not None else None,
        routers[0],
    )


def _as_moe(model: MoEModel | str | os.PathLike, role: str) -> MoEModel:
    if isinstance(model, MoEModel):
        return model
    if isinstance(model, (str, os.PathLike)):
        return load_moe(model)
    raise InputError(f"the {role} must be a MoEModel or a model directory / hub id, got {type(model).__name__}.")


def _describe(moe: MoEModel) -> dict[str, Any]:
    return {
        "source": moe.source,
        "model_type": moe.model_type,
        "moe_layers": moe.num_layers,
        "experts": moe.num_experts,
        "hidden_size": sorted({layer_hidden_size(layer) for layer in moe.layers}),
        "dtype": str(next(moe.model.parameters()).dtype).removeprefix("torch."),
        "fingerprint": moe.fingerprint(),
    }


def _expert_matches(comparison: LayerComparison, threshold: float) -> list[ExpertMatch]:
    rows, cols = match_experts(comparison.evidence)
    candidate = dict(zip(rows, cols))
    matches = []
    for i in range(comparison.evidence.shape[0]):
        j = candidate.get(i)
        if j is None:
            matches.append(ExpertMatch(i, None, None, math.nan, None, math.nan, math.nan))
            continue
        evidence = float(comparison.evidence[i, j])
        matches.append(
            ExpertMatch(
                suspect_expert=i,
                candidate=j,
                parent_expert=j if evidence >= threshold else None,
                similarity=float(comparison.similarity[i, j]),
                weight_similarity=None if comparison.weight_similarity is None else float(comparison.weight_similarity[i, j]),
                router_similarity=float(comparison.router_similarity[i, j]),
                evidence=evidence,
            )
        )
    return matches


def _align(statistics: torch.Tensor) -> tuple[list[list[tuple[int, int]]], torch.Tensor]:
    """Layer pairs per permutation and the model statistic ``T[s]``, from ``statistics [Ls, Lp, m]``.

    Equal layer counts pair layers by position; otherwise the shorter side is mapped
    monotonically into the longer one, separately for every permutation ``s``.
    """
    num_suspect, num_parent, m = statistics.shape
    pairs_per_shift, totals = [], []
    for s in range(m):
        score = statistics[:, :, s]
        if num_suspect == num_parent:
            pairs = [(layer, layer) for layer in range(num_suspect)]
        elif num_suspect < num_parent:
            pairs = list(enumerate(monotone_alignment(score)))
        else:
            pairs = [(suspect, parent) for parent, suspect in enumerate(monotone_alignment(score.T))]
        pairs_per_shift.append(pairs)
        totals.append(sum(float(score[a, b]) for a, b in pairs))
    return pairs_per_shift, torch.tensor(totals, dtype=torch.float64)


def detect(
    parent: MoEModel | str | os.PathLike,
    suspect: MoEModel | str | os.PathLike,
    *,
    alpha: float = DEFAULT_ALPHA,
    probes: int = DEFAULT_PROBES,
    group_size: int = DEFAULT_GROUP_SIZE,
    weight_rows: int | None = DEFAULT_WEIGHT_ROWS,
    seed: int = 0,
    progress: bool = True,
) -> Verdict:
    """Compare ``suspect`` with ``parent`` and decide whether it was carved out of it.

    ``parent`` and ``suspect`` are loaded MoE models or model directories / hub ids.
    ``alpha`` is the false-positive rate the verdict is calibrated to; ``probes``
    the number of probe inputs per expert (rounded up to a multiple of the group
    size); ``group_size`` the number of permutations ``m`` (the comparison itself
    plus ``m - 1`` null samples); ``weight_rows`` how many weight rows per expert
    the weight signal uses (None: all). ``seed`` fixes the probes and the rows.
    See the module docstring for the method.
    """
    if not 0 < alpha < 1:
        raise InputError(f"alpha must be a probability strictly between 0 and 1, got {alpha}.")
    if probes < 1:
        raise InputError(f"probes must be at least 1, got {probes}.")
    if group_size < 3:
        raise InputError(f"group_size must be at least 3 (the comparison plus two null samples), got {group_size}.")
    started = time.perf_counter()
    parent_moe, suspect_moe = _as_moe(parent, "parent"), _as_moe(suspect, "suspect")
    parent_info, suspect_info = _describe(parent_moe), _describe(suspect_moe)
    parent_hidden, suspect_hidden = parent_info["hidden_size"], suspect_info["hidden_size"]
    equal_counts = parent_moe.num_layers == suspect_moe.num_layers

    def verdict(status, reason, layers, test=None, m=0, alignment="position") -> Verdict:
        return Verdict(
            status=status,
            reason=reason,
            z=test.z if test else None,
            p_value=test.p_value if test else None,
            p_exact=test.p_exact if test else None,
            alpha=alpha,
            z_threshold=z_threshold(alpha),
            layer_alignment=alignment,
            layers=layers,
            parent=parent_info,
            suspect=suspect_info,
            probes=probes if m == 0 else m * math.ceil(probes / m),
            group_size=m,
            seconds=time.perf_counter() - started,
        )

    if len(parent_hidden) != 1 or parent_hidden != suspect_hidden:
        reason = (
            f"hidden size {'/'.join(map(str, suspect_hidden))} (suspect) vs {'/'.join(map(str, parent_hidden))} (parent): "
            "the experts act on spaces of different width, so no expert of one can be compared with an expert of the other"
        )
        layers = [LayerVerdict(layer.index, None, "not comparable", reason) for layer in suspect_moe.layers]
        return verdict("not comparable", reason, layers)

    hidden = parent_hidden[0]
    m = min(group_size, hidden)
    perms = cyclic_shifts(hidden, m)
    probe_inputs = orbit_probes(hidden, m, math.ceil(probes / m), seed=seed)
    if equal_counts:
        candidates = [(layer, layer) for layer in range(suspect_moe.num_layers)]
    else:
        candidates = [(s, p) for s in range(suspect_moe.num_layers) for p in range(parent_moe.num_layers)]

    parent_cache: dict[int, LayerSignature] = {}
    suspect_cache: dict[int, LayerSignature] = {}

    def signature(moe: MoEModel, cache: dict[int, LayerSignature], layer: int) -> LayerSignature:
        if layer not in cache:
            cache[layer] = layer_signature(moe, layer, probe_inputs, max_rows=weight_rows, seed=seed)
        return cache[layer]

    comparisons: dict[tuple[int, int], LayerComparison] = {}
    statistics = torch.full((suspect_moe.num_layers, parent_moe.num_layers, m), -math.inf, dtype=torch.float64)
    show = progress and log.isEnabledFor(logging.INFO)
    for s, p in tqdm(candidates, desc="comparing MoE layers", unit="pair", disable=not show):
        comparisons[s, p] = compare_layers(signature(suspect_moe, suspect_cache, s), signature(parent_moe, parent_cache, p), perms)
        statistics[s, p] = comparisons[s, p].statistics
        if equal_counts:  # each layer is used once: keep memory to one layer pair
            parent_cache.clear()
            suspect_cache.clear()

    pairs_per_shift, totals = _align(statistics)
    test = group_test(totals)
    aligned = dict(pairs_per_shift[0])
    layers = []
    for s in range(suspect_moe.num_layers):
        if s not in aligned:
            layers.append(
                LayerVerdict(s, None, "unaligned", f"the parent has fewer MoE layers ({parent_moe.num_layers}); "
                             "this layer was left out of the best monotone alignment")
            )
            continue
        p = aligned[s]
        comparison = comparisons[s, p]
        layer_test = group_test(comparison.statistics)
        threshold = pair_threshold(alpha, comparison.evidence.numel())
        layers.append(
            LayerVerdict(
                suspect_layer=s,
                parent_layer=p,
                status="compared",
                z=layer_test.z,
                p_value=layer_test.p_value,
                pair_threshold=threshold,
                matches=_expert_matches(comparison, threshold),
                similarity=comparison.similarity.float().tolist(),
            )
        )
    status = "derived" if test.p_value <= alpha else "not derived"
    alignment = "position" if equal_counts else "matched"
    reason = "" if equal_counts else (
        f"the suspect has {suspect_moe.num_layers} MoE layers and the parent {parent_moe.num_layers}; "
        "layers were aligned by the best monotone alignment (redone for every null sample)"
    )
    result = verdict(status, reason, layers, test, m, alignment)
    log.info("detect: %s (z = %.1f, p = %s) in %.1f s", status, test.z, format_p(test.p_value), result.seconds)
    return result
