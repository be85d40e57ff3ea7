"""Expert attribution: which experts a task needs, measured several ways.

``collect_attribution`` runs a model over task batches and sums routing statistics
(:class:`Attribution`, saved as JSON + safetensors); ``scores`` turns them into a
``[moe_layers, experts]`` score per criterion; ``summary`` measures specialisation
(effective experts, overlap between tasks, stability); ``figures`` draws heatmaps.
"""

from moeguard.attribution.collect import collect_attribution
from moeguard.attribution.record import TOKEN_MODES, Attribution, check_fingerprint
from moeguard.attribution.run import AttributionRun, attribute
from moeguard.attribution.scores import CRITERIA, DEFAULT_CRITERIA, Criterion, available_criteria, scores
from moeguard.attribution.summary import Specialisation, overlap, specialisation, stability

__all__ = [
    "CRITERIA",
    "DEFAULT_CRITERIA",
    "TOKEN_MODES",
    "Attribution",
    "AttributionRun",
    "Criterion",
    "Specialisation",
    "attribute",
    "available_criteria",
    "check_fingerprint",
    "collect_attribution",
    "overlap",
    "scores",
    "specialisation",
    "stability",
]
