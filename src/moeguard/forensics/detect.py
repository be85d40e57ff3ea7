"""``detect``: is a suspect MoE carved out of a parent, however it was disguised?

How it decides:

1. **Align the residual spaces** (:mod:`moeguard.forensics.alignment`): the map ``Q``
   with orthonormal columns that best carries the parent's residual stream into the
   suspect's, fitted on token rows (matched by token string) and on residual states
   of the same probe texts. Every function-preserving change of the residual stream
   (permutation, rotation, scaling folded into norms, padding) is undone by it; the
   verdict reports the fit.
2. **Signatures in the parent's space** (:mod:`moeguard.forensics.similarity`): per
   expert, its responses to shared Gaussian probe residuals (each model applies its
   own norm) and its neurons (gate, up and down vectors), mapped by ``Q``. Neither
   changes under neuron permutation or rescaling, expert order, vocabulary order, or
   the residual changes above. Router rows are compared and reported, not scored.
3. **Evidence per layer pair**: the response cosine and the neuron similarity of every
   (suspect expert, parent expert) pair, each standardised against the matrix's own
   background (:func:`~moeguard.forensics.similarity.standardise`) and summed; a linear assignment
   matches experts; the matched mean is standardised against its simulated null
   (:func:`~moeguard.forensics.matching.assignment_null`) into the layer's ``z``.
4. **Model statistic** ``T``: the mean of the layers' ``z`` over layers paired by
   position (equal depth), or over the best monotone layer alignment less its
   selection bias (a suspect with layers dropped). For unrelated experts each ``z`` is
   about ``N(0, 1)`` or below (see :mod:`moeguard.forensics.calibration`), and a mean of
   such scores has a variance of at most 1 however the layers are correlated.
5. **Verdict** against a null (:mod:`moeguard.forensics.calibration`): the built-in one,
   or one measured on independent reference models of the parent's shape. Derived
   when ``p <= alpha``; then matched pairs above the Bonferroni pair threshold are the
   kept set (in the suspect's order), each with the other parent experts it mixes
   (a merged expert: what its neurons keep once its match is taken out,
   :func:`~moeguard.forensics.similarity.mix_components`), and the relation: *carved
   subset* when some parent experts are missing, *same lineage, not a carve* when all are there.

Nothing here is built from copies of the suspect: the background of every layer is the
parent's other experts, which a disguise cannot make the kept ones resemble without
changing what they compute.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from moeguard.errors import InputError
from moeguard.forensics.alignment import CrossProduct, ResidualMap, map_agreement, refined_basis, residual_map
from moeguard.forensics.calibration import BUILTIN_NULL, MIN_REFERENCES, NullCalibration
from moeguard.forensics.matching import (
    alignment_null,
    assignment_null,
    match_experts,
    matched_mean,
    monotone_alignment,
    pair_threshold,
)
from moeguard.forensics.residual import block_norm, norm_gain
from moeguard.forensics.signatures import expert_neurons, expert_responses, layer_hidden_size, router_weight
from moeguard.forensics.similarity import (
    cosine_matrix,
    mix_components,
    neuron_directions,
    neuron_partners,
    neuron_sampling,
    neuron_similarity,
    pair_evidence,
    standardise,
)
from moeguard.forensics.verdict import ExpertMatch, LayerVerdict, ParentRanking, Verdict, format_p
from moeguard.forensics.views import ModelView, open_model
from moeguard.models import MoEModel

log = logging.getLogger("moeguard.forensics")

DEFAULT_ALPHA = 1e-6
DEFAULT_PROBES = 128
# The parent's layer signatures are kept between comparisons up to this size.
PARENT_CACHE_BYTES = 1 << 30
# A layer's unmapped neuron parts are kept (to refine the residual map with) up to this size.
RAW_NEURON_BYTES = 256 << 20
# A merged expert whose router row has at least this cosine with one of the experts it mixes fills that one's slot.
ROUTER_KEPT = 0.9

ModelSource = MoEModel | str | os.PathLike


@dataclass
class LayerSignature:
    """One MoE layer's experts in the parent's residual space (float32, CPU)."""

    responses: torch.Tensor  # [E, B, H_P] answers to the probe residuals
    neurons: torch.Tensor  # [E, n, P, d] unit neuron parts (see similarity.neuron_directions)
    router: torch.Tensor  # [E, H_P] router rows, norm gain folded
    raw: torch.Tensor | None = None  # [E, n, P, H_own] the same neuron parts unmapped (None: too large to keep)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.responses, self.neurons, self.router, self.raw) if t is not None)


@torch.no_grad()
def layer_signature(view: ModelView, layer: int, probes: torch.Tensor, basis: torch.Tensor | None,
                    projection: torch.Tensor | None, *, seed: int = 0) -> LayerSignature:
    """The signature of MoE layer ``layer`` of ``view``; ``probes [B, H_P]`` are residuals in the parent's
    space and ``basis [H_own, H_P]`` maps them into this model's (None: this is the parent, whose neurons
    are all kept; a suspect's are sampled when there are many, with ``seed``)."""
    moe = view.moe
    moe_layer = moe.layers[layer]
    norm = block_norm(moe, moe_layer)
    hidden = layer_hidden_size(moe_layer)
    q = None if basis is None else basis.float()
    inputs = probes if q is None else probes @ q.T
    weight = next(norm.parameters())
    normed = norm(inputs.to(device=weight.device, dtype=weight.dtype))
    gain = norm_gain(norm, hidden)
    with view.experts(layer):
        responses = expert_responses(moe, layer, normed)
        reads, writes = expert_neurons(moe_layer)
    sample = None if q is None else neuron_sampling(writes[0].shape[1], hidden, seed=seed)[0]
    parts = [r * gain for r in reads] + writes
    neurons = neuron_directions(parts, q, projection, sample)
    raw = None
    if sum(p.numel() for p in parts) * 4 <= RAW_NEURON_BYTES:
        raw = neuron_directions(parts, None, None, sample)
    router = router_weight(moe_layer).detach().float().cpu() * gain
    if q is not None:
        responses, router = responses @ q, router @ q
    return LayerSignature(responses, neurons, router, raw)


def matched_neuron_rows(suspect: LayerSignature, parent: LayerSignature, evidence: torch.Tensor) -> CrossProduct | None:
    """Paired neuron parts of the matched experts (each suspect neuron with its best parent neuron, signs
    aligned), the suspect's in its own space and the parent's in the parent's, as a :class:`CrossProduct`."""
    if suspect.raw is None or parent.raw is None:
        return None
    rows, cols = match_experts(evidence)
    total = None
    for i, j in zip(rows, cols):
        best, signs = neuron_partners(suspect.neurons[i], parent.neurons[j])
        own = suspect.raw[i].flatten(0, 1)
        theirs = (parent.raw[j][best] * signs.unsqueeze(-1)).flatten(0, 1)
        pairs = CrossProduct.of(own, theirs)
        total = pairs if total is None else total + pairs
    return total


@dataclass
class LayerComparison:
    """A suspect layer against a parent layer."""

    evidence: torch.Tensor  # [Es, Ep] pair evidence
    similarity: torch.Tensor  # [Es, Ep] response cosine
    weight_similarity: torch.Tensor  # [Es, Ep] neuron similarity
    router_similarity: torch.Tensor  # [Es, Ep] router-row cosine (reported, not evidence)
    statistic: float  # matched mean of the evidence
    z: float  # the statistic against its simulated null
    mix_evidence: torch.Tensor  # [Es, Ep] evidence that suspect expert i also mixes in parent expert j (its match: 0)
    mix_weight: torch.Tensor  # [Es, Ep] each parent expert's weight in suspect expert i (see similarity.mix_components)


def compare_layers(suspect: LayerSignature, parent: LayerSignature) -> LayerComparison:
    """Similarities, evidence, the layer's z, and what else each matched suspect expert mixes in."""
    responses = cosine_matrix(suspect.responses, parent.responses)
    neurons = neuron_similarity(suspect.neurons, parent.neurons)
    evidence = pair_evidence(standardise(responses), standardise(neurons))
    statistic = matched_mean(evidence)
    z = assignment_null(*evidence.shape, 2).standardise(statistic)
    rows, cols = match_experts(evidence)
    mixes, weights = torch.zeros_like(neurons), torch.zeros_like(neurons)
    for i, j in zip(rows, cols):
        mixes[i], weights[i] = mix_components(suspect.neurons[i], parent.neurons, j)
    unmatched = sorted(set(range(len(neurons))) - set(rows))
    mixes[unmatched] = mixes[rows].median()  # no match, nothing mixed in: the background
    return LayerComparison(evidence, responses, neurons, cosine_matrix(suspect.router, parent.router), statistic, z,
                           standardise(mixes), weights)


@dataclass
class Comparison:
    """A suspect compared with the parent, before calibration."""

    statistic: float | None  # the model statistic T (None: not comparable)
    reason: str
    alignment: ResidualMap | None
    layer_alignment: str
    pairs: list[tuple[int, int]]  # (suspect layer, parent layer) compared in the end
    layers: dict[tuple[int, int], LayerComparison]
    suspect_layers: int
    parent_layers: int
    parent: dict[str, Any]
    suspect: dict[str, Any]
    seconds: float


def describe_model(view: ModelView) -> dict[str, Any]:
    moe = view.moe
    return {
        "source": moe.source,
        "model_type": moe.model_type,
        "moe_layers": moe.num_layers,
        "experts": moe.num_experts,
        "hidden_size": sorted({layer_hidden_size(layer) for layer in moe.layers}),
        "dtype": view.dtype(),
        "fingerprint": view.fingerprint(),
    }


@dataclass
class Detector:
    """Compares suspects with one parent (``parent`` a :class:`ModelView`); the parent's signatures are reused."""

    parent: ModelView
    probes: int = DEFAULT_PROBES
    seed: int = 0
    progress: bool = True
    _cache: dict[int, LayerSignature] = field(default_factory=dict, repr=False)
    _parent_info: dict[str, Any] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.probes < 8:
            raise InputError(f"`probes` must be at least 8, got {self.probes}.", arguments=("probes",))
        hidden = {layer_hidden_size(layer) for layer in self.parent.moe.layers}
        if len(hidden) != 1:
            raise InputError(f"the parent's MoE layers read hidden states of different widths {sorted(hidden)}.")
        self.hidden = hidden.pop()
        generator = torch.Generator().manual_seed(self.seed)
        self.probe_residuals = torch.randn(self.probes, self.hidden, generator=generator)
        self.projection = neuron_sampling(0, self.hidden, seed=self.seed + 1)[1]

    @property
    def settings(self) -> dict[str, Any]:
        return {"probes": self.probes, "seed": self.seed}

    def parent_info(self) -> dict[str, Any]:
        if self._parent_info is None:
            self._parent_info = describe_model(self.parent)
        return self._parent_info

    def _parent_signature(self, layer: int) -> LayerSignature:
        if layer in self._cache:
            return self._cache[layer]
        signature = layer_signature(self.parent, layer, self.probe_residuals, None, self.projection)
        if signature.nbytes() * self.parent.moe.num_layers <= PARENT_CACHE_BYTES:
            self._cache[layer] = signature
        return signature

    def compare(self, suspect: ModelView) -> Comparison:
        """Align, compare every layer pair that can correspond, and compute the model statistic."""
        started = time.perf_counter()
        parent_moe, suspect_moe = self.parent.moe, suspect.moe
        suspect_info = describe_model(suspect)
        alignment = residual_map(suspect_moe, parent_moe, seed=self.seed)
        num_suspect, num_parent = suspect_moe.num_layers, parent_moe.num_layers

        def result(statistic, reason, layer_alignment="position", pairs=(), layers=None) -> Comparison:
            return Comparison(statistic, reason, alignment, layer_alignment, list(pairs), layers or {}, num_suspect,
                              num_parent, self.parent_info(), suspect_info, time.perf_counter() - started)

        if alignment is None:
            return result(None, "the models share no tokens (or too few to pair their spaces) and their residual streams have different widths "
                                "(suspect " + "/".join(map(str, suspect_info["hidden_size"])) + f", parent {self.hidden}), "
                                "so nothing pairs their spaces; give both models their tokenizers")
        equal_depth = num_suspect == num_parent
        candidates = [(s, s) for s in range(num_suspect)] if equal_depth else [
            (s, p) for s in range(num_suspect) for p in range(num_parent)]
        layers, neuron_rows = self._compare_pairs(suspect, candidates, {s: alignment.basis for s, _ in candidates})
        if equal_depth:
            pairs, layer_alignment, reason = candidates, "position", ""
        else:
            scores = torch.tensor([[layers[s, p].z for p in range(num_parent)] for s in range(num_suspect)])
            if num_suspect <= num_parent:
                pairs = list(enumerate(monotone_alignment(scores)))
            else:
                pairs = [(s, p) for p, s in enumerate(monotone_alignment(scores.T))]
            layer_alignment = "matched"
            reason = (f"the suspect has {num_suspect} MoE layers and the parent {num_parent}; layers were paired by the "
                      "best monotone alignment (its selection bias removed)")
        layers.update(self._refine(suspect, alignment, pairs, neuron_rows))
        total = sum(layers[pair].z for pair in pairs)
        if not equal_depth:
            # The best alignment's total, less what the best of unrelated layers would reach.
            total -= alignment_null(num_suspect, num_parent).mean
        return result(total / len(pairs), reason, layer_alignment, pairs, layers)

    def _compare_pairs(self, suspect: ModelView, pairs: list[tuple[int, int]], bases: dict[int, torch.Tensor]
                       ) -> tuple[dict[tuple[int, int], LayerComparison], dict[tuple[int, int], CrossProduct | None]]:
        """Every (suspect layer, parent layer) pair compared with suspect layer ``s`` mapped by ``bases[s]``, and
        the paired neuron rows of its matched experts. A suspect layer's signature is kept only while needed."""
        remaining = {s: sum(1 for t, _ in pairs if t == s) for s, _ in pairs}
        cache: dict[int, LayerSignature] = {}
        layers, neuron_rows = {}, {}
        show = self.progress and log.isEnabledFor(logging.INFO)
        for s, p in tqdm(pairs, desc="comparing MoE layers", unit="pair", disable=not show):
            if s not in cache:
                cache[s] = layer_signature(suspect, s, self.probe_residuals, bases[s], self.projection, seed=self.seed)
            parent = self._parent_signature(p)
            layers[s, p] = compare_layers(cache[s], parent)
            neuron_rows[s, p] = matched_neuron_rows(cache[s], parent, layers[s, p].evidence)
            remaining[s] -= 1
            if not remaining[s]:
                del cache[s]
        return layers, neuron_rows

    def _refine(self, suspect: ModelView, alignment: ResidualMap, pairs: list[tuple[int, int]],
                neuron_rows: dict[tuple[int, int], CrossProduct | None]) -> dict[tuple[int, int], LayerComparison]:
        """The aligned layer pairs compared again, each suspect layer through a map refined with the matched
        neurons of the *other* layers (cross-fitting: a layer's own chance matches never pull the map toward
        themselves, so unrelated models gain nothing, while a derivative's layers share one true map).

        Token rows drift when the attacker fine-tunes embeddings; thousands of neuron parts of the matched
        experts pin the map down again. Needs a Procrustes fit, two aligned layers and neuron parts small
        enough to keep (see ``RAW_NEURON_BYTES``); otherwise nothing is refined.
        """
        rows = [neuron_rows[pair] for pair in pairs]
        if alignment.cross is None or len(pairs) < 2 or any(r is None for r in rows):
            return {}
        bases = {}
        for s, _ in pairs:
            others = [neuron_rows[pair] for pair in pairs if pair[0] != s]
            bases[s] = refined_basis(alignment, sum(others[1:], others[0]))
        agreement = sum(map_agreement(alignment.basis, basis) for basis in bases.values()) / len(bases)
        alignment.refined = (f"refined per layer with the matched neurons of the other layers (cross-fitted; "
                             f"agreement with the token map {agreement:.3f})")
        return self._compare_pairs(suspect, pairs, bases)[0]

    def calibrate(self, references: Sequence[ModelSource], *, dtype: torch.dtype | None = None) -> NullCalibration:
        """The null measured on independent ``references`` (each opened, compared and released in turn)."""
        if len(references) < MIN_REFERENCES:
            raise InputError(f"calibration needs at least {MIN_REFERENCES} reference models, got {len(references)}; pass more "
                             "independent models of the parent's shape (20-30 give thresholds close to the built-in one).")
        statistics, names = [], []
        for reference in references:
            with open_model(reference, "reference", dtype=dtype) as view:
                comparison = self.compare(view)
            if comparison.statistic is None:
                raise InputError(f"reference {view.moe.source} cannot be compared with the parent: {comparison.reason}.")
            statistics.append(comparison.statistic)
            names.append(str(view.moe.source))
            log.info("calibration: reference %s gives T = %.2f", names[-1], statistics[-1])
        return NullCalibration("reference", statistics, names, self.parent_info()["fingerprint"], self.settings)

    def verdict(self, comparison: Comparison, *, alpha: float = DEFAULT_ALPHA,
                calibration: NullCalibration = BUILTIN_NULL) -> Verdict:
        """The calibrated verdict of a :class:`Comparison`."""
        check_alpha(alpha)
        if calibration.kind == "reference":
            self._check_calibration(calibration)
        info = {"kind": calibration.kind, "description": calibration.describe(), "count": calibration.count,
                "mean": calibration.mean, "std": calibration.std}
        alignment = comparison.alignment.to_dict() | {"description": comparison.alignment.describe()} if comparison.alignment else {}
        common = dict(alpha=alpha, z_threshold=calibration.z_threshold(alpha), calibration=info, alignment=alignment,
                      layer_alignment=comparison.layer_alignment, parent=comparison.parent, suspect=comparison.suspect,
                      probes=self.probes, seconds=comparison.seconds)
        if comparison.statistic is None:
            layers = [LayerVerdict(s, None, "not comparable", comparison.reason) for s in range(comparison.suspect_layers)]
            return Verdict("not comparable", "not comparable", comparison.reason, None, None, statistic=None,
                           layers=layers, closeness=None, **common)
        z, p = calibration.z(comparison.statistic), calibration.p_value(comparison.statistic)
        derived = p <= alpha
        aligned = dict(comparison.pairs)
        layers = []
        for s in range(comparison.suspect_layers):
            if s not in aligned:
                layers.append(LayerVerdict(s, None, "unaligned", f"the parent has fewer MoE layers "
                                           f"({comparison.parent_layers}); this layer was left out of the alignment"))
                continue
            layer = comparison.layers[s, aligned[s]]
            threshold = pair_threshold(alpha, layer.evidence.numel())
            layers.append(LayerVerdict(
                suspect_layer=s, parent_layer=aligned[s], status="compared", z=layer.z, pair_threshold=threshold,
                parent_experts=layer.evidence.shape[1], matches=expert_matches(layer, threshold if derived else math.inf),
                similarity=layer.similarity.float().tolist(),
            ))
        matched = [m for lv in layers for m in lv.matches if m.parent_expert is not None]
        closeness = sum((m.similarity + m.weight_similarity) / 2 for m in matched) / len(matched) if matched else None
        carved = comparison.parent_layers > len(comparison.pairs) or any(
            lv.status == "compared" and len(lv.kept) < lv.parent_experts for lv in layers)
        relation = ("carved subset" if carved else "same lineage, not a carve") if derived else "independent"
        return Verdict("derived" if derived else "not derived", relation, comparison.reason, z, p, statistic=comparison.statistic,
                       layers=layers, closeness=closeness, **common)

    def _check_calibration(self, calibration: NullCalibration) -> None:
        fingerprint = self.parent_info()["fingerprint"]
        if calibration.parent_fingerprint not in (None, fingerprint):
            raise InputError(f"the calibration was measured against another parent (fingerprint "
                             f"{calibration.parent_fingerprint[:12]}, this parent {fingerprint[:12]}); calibrate again.")
        if calibration.settings and calibration.settings != self.settings:
            raise InputError(f"the calibration was measured with settings {calibration.settings}, this comparison uses "
                             f"{self.settings}; use the same `probes` and `seed` or calibrate again.", arguments=("probes", "seed"))


def expert_matches(layer: LayerComparison, threshold: float) -> list[ExpertMatch]:
    """Every suspect expert's assigned parent expert, significant when its evidence reaches ``threshold``.

    A significant expert also lists every parent expert it mixes (``mixes``): its match,
    and each other one whose mix evidence (see
    :func:`~moeguard.forensics.similarity.mix_components`) reaches the threshold, with
    their shares ``c_k / sum c`` - several for an expert merged from several. The slot
    it fills (``parent_expert``) is its match, unless another of the experts it mixes
    kept its router row (router cosine at least ``ROUTER_KEPT`` and the highest): when a
    kept expert was averaged with removed ones at an equal or larger weight, the router
    row still says whose slot it is. A re-initialised router leaves the match.
    """
    rows, cols = match_experts(layer.evidence)
    candidate = dict(zip(rows, cols))
    matches = []
    for i in range(layer.evidence.shape[0]):
        j = candidate.get(i)
        if j is None:
            matches.append(ExpertMatch(i, None, None, math.nan, math.nan, math.nan, math.nan))
            continue
        evidence = float(layer.evidence[i, j])
        significant = evidence >= threshold
        slot, mixes = j, []
        if significant:
            parts = [j] + [k for k in range(layer.evidence.shape[1]) if k != j and float(layer.mix_evidence[i, k]) >= threshold]
            total = sum(float(layer.mix_weight[i, k]) for k in parts) or 1.0
            mixes = sorted(([k, float(layer.mix_weight[i, k]) / total] for k in parts), key=lambda pair: -pair[1])
            router_owner = max(parts, key=lambda k: float(layer.router_similarity[i, k]))
            taken = set(cols) - {j}
            if float(layer.router_similarity[i, router_owner]) >= ROUTER_KEPT and router_owner not in taken:
                slot = router_owner
        matches.append(ExpertMatch(
            suspect_expert=i,
            candidate=j,
            parent_expert=slot if significant else None,
            similarity=float(layer.similarity[i, slot]),
            weight_similarity=float(layer.weight_similarity[i, slot]),
            router_similarity=float(layer.router_similarity[i, slot]),
            evidence=float(layer.evidence[i, slot]),
            mixes=mixes,
        ))
    return matches


def check_alpha(alpha: float) -> None:
    if not 0 < alpha < 1:
        raise InputError(f"`alpha` must be a probability strictly between 0 and 1, got {alpha}.", arguments=("alpha",))


def detect(
    parent: ModelSource,
    suspect: ModelSource,
    *,
    alpha: float = DEFAULT_ALPHA,
    probes: int = DEFAULT_PROBES,
    references: Sequence[ModelSource] = (),
    calibration: NullCalibration | None = None,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    progress: bool = True,
) -> Verdict:
    """Compare ``suspect`` with ``parent`` and decide whether it was derived from it.

    ``parent`` and ``suspect`` are loaded models or model directories (a local
    safetensors checkpoint is read one MoE layer of experts at a time) / hub ids.
    ``alpha`` is the false-positive rate the verdict is calibrated to; ``probes`` the
    number of probe residuals per expert; ``seed`` fixes the probes. The null is the
    built-in one unless ``references`` (independent models of the parent's shape,
    compared one at a time) or a saved ``calibration`` are given. ``dtype`` casts
    models read from disk. See the module docstring for the method.
    """
    check_alpha(alpha)
    if calibration is not None and references:
        raise InputError("give either reference models or a saved calibration, not both.")
    with ExitStack() as stack:
        parent_view = stack.enter_context(open_model(parent, "parent", dtype=dtype))
        detector = Detector(parent_view, probes=probes, seed=seed, progress=progress)
        if references:
            calibration = detector.calibrate(references, dtype=dtype)
        suspect_view = stack.enter_context(open_model(suspect, "suspect", dtype=dtype))
        result = detector.verdict(detector.compare(suspect_view), alpha=alpha, calibration=calibration or BUILTIN_NULL)
    log.info("detect: %s (z = %s, p = %s) in %.1f s", result.status, "n/a" if result.z is None else f"{result.z:.1f}",
             format_p(result.p_value), result.seconds)
    return result


def calibrate(
    parent: ModelSource,
    references: Sequence[ModelSource],
    *,
    probes: int = DEFAULT_PROBES,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    progress: bool = True,
) -> NullCalibration:
    """The null of ``parent``'s comparisons measured on independent ``references`` (see
    :mod:`moeguard.forensics.calibration`); save it with ``.save(path)`` and pass it to
    :func:`detect` as ``calibration`` to reuse it."""
    with open_model(parent, "parent", dtype=dtype) as view:
        return Detector(view, probes=probes, seed=seed, progress=progress).calibrate(references, dtype=dtype)


def rank_parents(
    parents: Sequence[ModelSource],
    suspect: ModelSource,
    *,
    alpha: float = DEFAULT_ALPHA,
    probes: int = DEFAULT_PROBES,
    references: Sequence[ModelSource] = (),
    seed: int = 0,
    dtype: torch.dtype | None = None,
    progress: bool = True,
) -> ParentRanking:
    """Compare ``suspect`` with each candidate parent (one in memory at a time) and rank them.

    The most likely parent is the derived candidate whose experts the suspect's are
    closest to; every other derived candidate is reported as *same lineage, not a
    carve* (it shares the suspect's ancestry, but the suspect was not carved from it).
    ``references`` calibrate every candidate's verdict.
    """
    if len(parents) < 1:
        raise InputError("rank_parents needs at least one candidate parent.")
    check_alpha(alpha)
    verdicts, names = [], []
    with open_model(suspect, "suspect", dtype=dtype) as suspect_view:
        for parent in parents:
            with open_model(parent, "parent", dtype=dtype) as parent_view:
                detector = Detector(parent_view, probes=probes, seed=seed, progress=progress)
                calibration = detector.calibrate(references, dtype=dtype) if references else BUILTIN_NULL
                verdicts.append(detector.verdict(detector.compare(suspect_view), alpha=alpha, calibration=calibration))
                names.append(str(parent_view.moe.source))
    ranking = sorted(range(len(verdicts)), key=lambda i: (
        not verdicts[i].derived, -(verdicts[i].closeness or 0.0), -(verdicts[i].z if verdicts[i].z is not None else -math.inf)))
    for index in ranking[1:]:
        if verdicts[index].derived:
            verdicts[index].relation = "same lineage, not a carve"
            best = verdicts[ranking[0]]
            verdicts[index].reason = (f"candidate {names[ranking[0]]} is closer (closeness {best.closeness:.3f} vs "
                                      f"{verdicts[index].closeness:.3f}): the suspect shares this parent's lineage but was carved from the other")
    return ParentRanking(names, verdicts, ranking)
