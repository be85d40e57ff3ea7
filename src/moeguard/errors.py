"""Errors a user can act on.

Every error moeguard raises on bad input is a :class:`MoeGuardError` whose message says
what is wrong and how to fix it. The command line prints the message without a
traceback; anything else that escapes is a bug.
"""

from __future__ import annotations


class MoeGuardError(Exception):
    """Base class: a problem with the user's input, model or environment.

    ``arguments`` names the function arguments the message speaks of, written there as
    ``name=value`` or `` `name` ``; the command line shows them as its own flags.
    """

    def __init__(self, message: str = "", *, arguments: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.arguments = tuple(arguments)


class InputError(MoeGuardError, ValueError):
    """An argument or option has a value moeguard cannot use."""


class DataError(InputError):
    """A data file or dataset is malformed; the message names file, line and field."""


class ModelError(MoeGuardError):
    """A model path or checkpoint cannot be loaded or written."""


class UnsupportedModelError(ModelError):
    """The model is not a Mixture-of-Experts model moeguard can handle."""


class PlanError(InputError):
    """A set of experts to keep is invalid for the model (too few, out of range, infeasible)."""


class FingerprintMismatchError(MoeGuardError):
    """A file produced for one model is being used with a different one."""


class ResumeError(InputError):
    """Saved work cannot be continued: it was started with other settings, data, weights or code."""


class TrainingDivergedError(MoeGuardError):
    """A training run diverged (a non-finite loss or weights): not bad input, but settings to change (the
    learning rate, usually). The run's unfinished state is discarded, so a rerun starts afresh."""


class InternalError(RuntimeError):
    """An invariant of moeguard itself was broken: a bug to report, never the user's input."""
