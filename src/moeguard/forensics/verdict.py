"""The result of a comparison: a verdict, its score, the relation, and what matched what."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

VerdictStatus = Literal["derived", "not derived", "not comparable"]
Relation = Literal["carved subset", "same lineage, not a carve", "independent", "not comparable"]
LayerStatus = Literal["compared", "not comparable", "unaligned"]

RELATION_TEXT = {
    "carved subset": "the suspect keeps a subset of the parent's experts: carved out of the parent (or out of a model of its lineage)",
    "same lineage, not a carve": "the suspect's experts come from the parent's lineage, but none of the parent's experts were removed",
    "independent": "no evidence that the suspect comes from the parent",
    "not comparable": "the two models cannot be compared",
}


@dataclass
class ExpertMatch:
    """Suspect expert ``suspect_expert`` and the parent expert it was matched to.

    ``candidate`` is the parent expert the assignment gave it (None when the suspect
    layer has more experts than the parent's); ``parent_expert`` is the candidate
    when the match is significant (``evidence`` at or above the layer's pair
    threshold) and None otherwise. ``similarity`` is the cosine of the two experts'
    responses, ``weight_similarity`` their neuron similarity (see
    :func:`moeguard.forensics.similarity.neuron_similarity`),
    ``router_similarity`` that of their router rows, all in the parent's residual
    space; ``evidence`` the combined score of the pair in units of the layer's
    background. ``mixes`` lists every parent expert this one matches significantly, as
    ``[parent expert, share]`` by share (one entry for a kept expert, several for one
    merged from several; shares from the neuron similarities).
    """

    suspect_expert: int
    candidate: int | None
    parent_expert: int | None
    similarity: float
    weight_similarity: float
    router_similarity: float
    evidence: float
    mixes: list[list[float]] = field(default_factory=list)


@dataclass
class LayerVerdict:
    """One suspect MoE layer: the parent layer it was aligned to, its score, its matches."""

    suspect_layer: int
    parent_layer: int | None
    status: LayerStatus
    reason: str = ""
    z: float | None = None
    pair_threshold: float | None = None
    parent_experts: int | None = None
    matches: list[ExpertMatch] = field(default_factory=list)
    # Response cosine of every (suspect expert, parent expert) pair, for figures.
    similarity: list[list[float]] = field(default_factory=list, repr=False)

    @property
    def kept(self) -> list[int]:
        """The recovered kept set: parent experts with a significant match, sorted."""
        return sorted(m.parent_expert for m in self.matches if m.parent_expert is not None)

    @property
    def order(self) -> list[int | None]:
        """The parent expert of each suspect expert, in the suspect's order."""
        return [m.parent_expert for m in self.matches]

    @property
    def merged(self) -> dict[int, list[int]]:
        """Suspect experts that mix several parent experts: suspect expert -> parent experts, largest share first."""
        return {m.suspect_expert: [int(j) for j, _ in m.mixes] for m in self.matches if len(m.mixes) > 1}


@dataclass
class Verdict:
    """Is the suspect a (pruned, re-aligned, disguised) derivative of the parent?

    ``statistic`` is the model statistic ``T`` (about ``N(0, 1)`` for unrelated
    experts); ``z`` is ``T`` on the scale of ``calibration`` (the built-in null, or
    reference models), ``p_value`` its tail probability; the suspect is called derived
    when ``p_value <= alpha`` (equivalently ``z >= z_threshold``). ``relation`` says
    what kind of derivative it is, ``closeness`` how close its matched experts are to
    the parent's (mean of response and weight similarity, 1.0 for an untouched copy).
    ``alignment`` describes how the residual spaces were mapped onto each other.
    """

    status: VerdictStatus
    relation: Relation
    reason: str
    z: float | None
    p_value: float | None
    alpha: float
    z_threshold: float
    statistic: float | None
    calibration: dict[str, Any]
    alignment: dict[str, Any]
    layer_alignment: str  # "position" or "matched"
    layers: list[LayerVerdict]
    parent: dict[str, Any]
    suspect: dict[str, Any]
    probes: int
    closeness: float | None
    seconds: float

    @property
    def derived(self) -> bool:
        return self.status == "derived"

    def kept_sets(self) -> dict[int, list[int]]:
        """Recovered kept set per parent MoE layer (only layers that were compared)."""
        return {lv.parent_layer: lv.kept for lv in self.layers if lv.status == "compared" and lv.parent_layer is not None}

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["derived"] = self.derived
        for layer, layer_data in zip(self.layers, data["layers"]):
            layer_data["kept"] = layer.kept
            layer_data["merged"] = {str(k): v for k, v in layer.merged.items()}
        return _rounded(data)

    def headline(self) -> str:
        return {
            "derived": "DERIVED: the suspect comes from the parent",
            "not derived": "NOT DERIVED: no evidence that the suspect comes from the parent",
            "not comparable": "NOT COMPARABLE",
        }[self.status]

    def summary(self) -> str:
        """A few lines for a terminal."""
        lines = [self.headline()]
        if self.z is not None:
            lines.append(
                f"  score z = {self.z:.1f} (threshold {self.z_threshold:.2f}), p = {format_p(self.p_value)} "
                f"(alpha {self.alpha:g}; null: {self.calibration.get('description', '')})"
            )
        if self.status == "derived":
            closeness = f"; closeness {self.closeness:.3f} (1.000 = untouched experts)" if self.closeness is not None else ""
            lines.append(f"  relation: {self.relation}: {RELATION_TEXT[self.relation]}{closeness}")
        if self.alignment:
            lines.append(f"  residual spaces: {self.alignment.get('description', '')}")
        if self.reason:
            lines.append(f"  {self.reason}")
        if self.status == "not comparable":
            return "\n".join(lines)
        for lv in self.layers:
            where = f"suspect layer {lv.suspect_layer:>2}"
            if lv.status != "compared":
                lines.append(f"  {where}: {lv.status} ({lv.reason})")
                continue
            matched = [m for m in lv.matches if m.parent_expert is not None]
            sims = [m.similarity for m in matched]
            sim_text = f", similarity {min(sims):.3f}..{max(sims):.3f}" if sims else ""
            merged = "".join(f"; expert {s} mixes {mix}" for s, mix in lv.merged.items()) if matched else ""
            lines.append(
                f"  {where} -> parent layer {lv.parent_layer:>2}: z = {lv.z:6.1f}, "
                f"{len(matched)}/{len(lv.matches)} experts matched{sim_text}, kept {lv.kept}{merged}"
            )
        return "\n".join(lines)


@dataclass
class ParentRanking:
    """A suspect compared with several candidate parents; ``ranking`` orders them, most likely parent first.

    Derived candidates come first, by closeness (the one whose experts the suspect's
    are closest to is the one it was most likely carved from), then the others by z.
    """

    candidates: list[str]
    verdicts: list[Verdict]
    ranking: list[int]

    @property
    def best(self) -> Verdict | None:
        first = self.verdicts[self.ranking[0]] if self.ranking else None
        return first if first is not None and first.derived else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "candidates": self.candidates,
            "ranking": [self.candidates[i] for i in self.ranking],
            "best": self.candidates[self.ranking[0]] if self.best is not None else None,
            "verdicts": [v.to_dict() for v in self.verdicts],
        }

    def summary(self) -> str:
        lines = ["candidate parents, most likely first:"]
        for rank, index in enumerate(self.ranking, 1):
            v = self.verdicts[index]
            score = f"z = {v.z:.1f}" if v.z is not None else "no score"
            closeness = f", closeness {v.closeness:.3f}" if v.closeness is not None and v.derived else ""
            lines.append(f"  {rank}. {self.candidates[index]}: {v.status} ({score}{closeness}), {v.relation}")
        if self.best is not None:
            lines += ["", f"against {self.candidates[self.ranking[0]]}:", self.best.summary()]
        return "\n".join(lines)


def format_p(p: float | None) -> str:
    if p is None:
        return "n/a"
    return "< 1e-300" if p == 0 else f"{p:.3g}"


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        # Significant digits, not decimals: p-values far below 1e-6 must survive.
        return value if not math.isfinite(value) else float(f"{value:.6g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value
