"""The result of a comparison: a verdict, its score, and what matched what."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

VerdictStatus = Literal["derived", "not derived", "not comparable"]
LayerStatus = Literal["compared", "not comparable", "unaligned"]


@dataclass
class ExpertMatch:
    """Suspect expert ``suspect_expert`` and the parent expert it was matched to.

    ``candidate`` is the parent expert the assignment gave it (None when the suspect
    layer has more experts than the parent's); ``parent_expert`` is the candidate
    when the match is significant (``evidence`` at or above the layer's pair
    threshold) and None otherwise. ``similarity`` is the cosine of the two experts'
    responses, ``weight_similarity`` that of their weights (None when the expert
    shapes differ), ``router_similarity`` that of their router rows, ``evidence`` the
    combined z-score of the pair against the permutation null.
    """

    suspect_expert: int
    candidate: int | None
    parent_expert: int | None
    similarity: float
    weight_similarity: float | None
    router_similarity: float
    evidence: float


@dataclass
class LayerVerdict:
    """One suspect MoE layer: the parent layer it was aligned to, its test, its matches."""

    suspect_layer: int
    parent_layer: int | None
    status: LayerStatus
    reason: str = ""
    z: float | None = None
    p_value: float | None = None
    pair_threshold: float | None = None
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


@dataclass
class Verdict:
    """Is the suspect a (pruned, re-aligned) derivative of the parent?

    ``z`` is the model statistic in units of its permutation-null spread and
    ``p_value`` its Gaussian tail probability; the suspect is called derived when
    ``p_value <= alpha`` (equivalently ``z >= z_threshold``). ``p_exact`` is the exact
    randomisation p-value, whose resolution is ``1 / group_size``.
    """

    status: VerdictStatus
    reason: str
    z: float | None
    p_value: float | None
    p_exact: float | None
    alpha: float
    z_threshold: float
    layer_alignment: str  # "position" or "matched"
    layers: list[LayerVerdict]
    parent: dict[str, Any]
    suspect: dict[str, Any]
    probes: int
    group_size: int
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
        return _rounded(data)

    def summary(self) -> str:
        """A few lines for a terminal."""
        head = {
            "derived": "DERIVED: the suspect was carved out of the parent",
            "not derived": "NOT DERIVED: no evidence that the suspect comes from the parent",
            "not comparable": "NOT COMPARABLE",
        }[self.status]
        lines = [head]
        if self.z is not None:
            lines.append(
                f"  score z = {self.z:.1f} (threshold {self.z_threshold:.2f}), p = {format_p(self.p_value)} "
                f"(alpha {self.alpha:g}; exact randomisation p = {self.p_exact:.3g})"
            )
        if self.reason:
            lines.append(f"  {self.reason}")
        if self.status == "not comparable":
            return "\n".join(lines)
        for lv in self.layers:
            where = f"suspect layer {lv.suspect_layer:>2}"
            if lv.status != "compared":
                lines.append(f"  {where}: {lv.status} ({lv.reason})")
                continue
            matched = sum(m.parent_expert is not None for m in lv.matches)
            sims = [m.similarity for m in lv.matches if m.parent_expert is not None]
            sim_text = f", similarity {min(sims):.3f}..{max(sims):.3f}" if sims else ""
            lines.append(
                f"  {where} -> parent layer {lv.parent_layer:>2}: z = {lv.z:6.1f}, "
                f"{matched}/{len(lv.matches)} experts matched{sim_text}, kept {lv.kept}"
            )
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
