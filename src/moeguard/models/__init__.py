"""The MoE view: discovery, routing capture, expert masking, physical pruning, save/load."""

from moeguard.models.discovery import UNSUPPORTED_FAMILIES, discover_moe_layers
from moeguard.models.fingerprint import fingerprint
from moeguard.models.keep_sets import KeepSets, normalize_keep_sets
from moeguard.models.layers import ExpertTensor, GroupRouting, MoELayer
from moeguard.models.loading import load_moe
from moeguard.models.manifest import MANIFEST_NAME, PruneManifest, RealignRecord
from moeguard.models.moe_model import MoEModel, ParameterCounts
from moeguard.models.prompting import PromptFormat
from moeguard.models.routing import RoutingCapture, RoutingEvent

__all__ = [
    "MANIFEST_NAME",
    "UNSUPPORTED_FAMILIES",
    "ExpertTensor",
    "GroupRouting",
    "KeepSets",
    "MoELayer",
    "MoEModel",
    "ParameterCounts",
    "PromptFormat",
    "PruneManifest",
    "RealignRecord",
    "RoutingCapture",
    "RoutingEvent",
    "discover_moe_layers",
    "fingerprint",
    "load_moe",
    "normalize_keep_sets",
]
