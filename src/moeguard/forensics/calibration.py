"""The null distribution of the model statistic: built in, or measured on independent reference models.

The model statistic ``T`` of a comparison is the mean of its layers' scores ``z``, each
the layer's matched evidence standardised against its simulated null (independent
Gaussian similarities, the same standardisation, the same matching): were every
similarity between the two models' experts unrelated noise, each ``z`` would be about
``N(0, 1)``, and a mean of unit-variance scores has variance at most 1 whatever the
correlation between layers. The **built-in null** takes ``T ~ N(0, 1)``.

Independently trained models are not unrelated noise: trained on the same data they
learn a few similar experts. The evidence floor of
:func:`moeguard.forensics.similarity.standardise` keeps that small excess from counting
as strong evidence, which makes their scores fall below the simulated null rather
than above it; ``benchmarks/bench_detect.py`` measures the built-in null's
false-positive rate on independently trained models. A verdict can instead be
**calibrated on reference models** - independent models of the parent's shape that
the user supplies: ``T_1 .. T_n`` from comparing each with the parent the same way. With
their mean ``m`` and standard deviation ``s`` the calibrated score is

    z = (T - m) / (s sqrt(1 + 1/n)),

Student-t with ``n - 1`` degrees of freedom when ``T`` and the references share a normal
null (a prediction interval), so the threshold at ``alpha`` widens for small reference
sets instead of pretending to know the tail.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from scipy.stats import norm, t

from moeguard.errors import DataError, InputError
from moeguard.io import read_json, write_json

MIN_REFERENCES = 3
CALIBRATION_FORMAT = "moeguard-detect-calibration/1"


@dataclass
class NullCalibration:
    """What a model statistic ``T`` is measured against (see the module docstring)."""

    kind: Literal["built-in", "reference"]
    statistics: list[float] = field(default_factory=list)  # reference statistics T_1..T_n
    references: list[str] = field(default_factory=list)  # where they came from
    parent_fingerprint: str | None = None  # the parent they were compared with
    settings: dict[str, Any] = field(default_factory=dict)  # detector settings they were computed with

    def __post_init__(self) -> None:
        if self.kind == "reference" and len(self.statistics) < MIN_REFERENCES:
            raise InputError(
                f"calibration needs at least {MIN_REFERENCES} reference models, got {len(self.statistics)}; "
                "pass more independent models of the parent's shape (20-30 give thresholds close to the built-in one)."
            )

    @property
    def count(self) -> int:
        return len(self.statistics)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.statistics) if self.statistics else 0.0

    @property
    def std(self) -> float:
        return max(statistics.stdev(self.statistics), 1e-12) if self.count > 1 else 1.0

    def z(self, statistic: float) -> float:
        if self.kind == "built-in":
            return statistic
        return (statistic - self.mean) / (self.std * math.sqrt(1 + 1 / self.count))

    def p_value(self, statistic: float) -> float:
        score = self.z(statistic)
        return float(norm.sf(score)) if self.kind == "built-in" else float(t.sf(score, self.count - 1))

    def z_threshold(self, alpha: float) -> float:
        return float(norm.isf(alpha)) if self.kind == "built-in" else float(t.isf(alpha, self.count - 1))

    def describe(self) -> str:
        if self.kind == "built-in":
            return "built-in null (unrelated experts: T ~ N(0, 1) or below)"
        return (f"{self.count} reference models (their T: mean {self.mean:.2f}, sd {self.std:.2f}; "
                f"Student-t with {self.count - 1} degrees of freedom)")

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": CALIBRATION_FORMAT,
            "kind": self.kind,
            "statistics": list(self.statistics),
            "references": list(self.references),
            "parent_fingerprint": self.parent_fingerprint,
            "settings": dict(self.settings),
            "mean": self.mean if self.count else None,
            "std": self.std if self.count > 1 else None,
        }

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "NullCalibration":
        """Read a calibration written by :meth:`save`, checking every field."""
        data = read_json(path, what="detect calibration")

        def bad(what: str) -> DataError:
            return DataError(f"{path}: {what}; write it again with `moeguard detect ... --save-calibration`.")

        if not isinstance(data, dict) or data.get("format") != CALIBRATION_FORMAT:
            raise bad(f"not a moeguard detect calibration (format should be {CALIBRATION_FORMAT!r})")
        values = data.get("statistics")
        if not isinstance(values, list) or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            raise bad("field 'statistics' must be a list of finite numbers")
        references = data.get("references")
        if not isinstance(references, list) or not all(isinstance(r, str) for r in references):
            raise bad("field 'references' must be a list of strings")
        fingerprint = data.get("parent_fingerprint")
        if fingerprint is not None and not isinstance(fingerprint, str):
            raise bad("field 'parent_fingerprint' must be a string")
        settings = data.get("settings")
        if not isinstance(settings, dict):
            raise bad("field 'settings' must be an object")
        if data.get("kind") != "reference":
            raise bad("field 'kind' must be 'reference' (the built-in null needs no file)")
        return cls("reference", [float(v) for v in values], references, fingerprint, settings)


BUILTIN_NULL = NullCalibration("built-in")
