"""moeguard: audit and harden Mixture-of-Experts models against unauthorized compression."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("moeguard")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+local"

from moeguard.errors import (  # noqa: E402
    DataError,
    FingerprintMismatchError,
    InputError,
    InternalError,
    ModelError,
    MoeGuardError,
    PlanError,
    ResumeError,
    TrainingDivergedError,
    UnsupportedModelError,
)

__all__ = [
    "__version__",
    "DataError",
    "FingerprintMismatchError",
    "InputError",
    "InternalError",
    "ModelError",
    "MoeGuardError",
    "PlanError",
    "ResumeError",
    "TrainingDivergedError",
    "UnsupportedModelError",
]
