"""How much dearer an attack became: the multiplier of a cost against the undefended model's."""

from __future__ import annotations

import math


def cost_multiplier(defended: float, undefended: float) -> float:
    """``defended / undefended`` (inf when the undefended attack was free and the defended one is not)."""
    if undefended > 0:
        return defended / undefended
    return math.inf if defended > 0 else 1.0
