"""The package's own error types: every problem optimum-olica detects in what it was given raises one of these.

All derive from ``OlicaError``, itself a ``ValueError``, so ``except ValueError`` callers written before these types
existed keep working, and ``except OlicaError`` catches everything the package reports on purpose (a bug shows up as
anything else). Each message names the problem and the fix. Standard-library only: importing it pulls in nothing.
"""

from __future__ import annotations

__all__ = [
    "CalibrationDataError",
    "CheckpointVerificationError",
    "NonFiniteActivationsError",
    "OlicaConfigError",
    "OlicaError",
    "ResumeMismatchError",
]


class OlicaError(ValueError):
    """Base class of the errors optimum-olica raises about its inputs, its recipe or its files."""


class OlicaConfigError(OlicaError):
    """An ``OlicaConfig`` field (or an ``olica_config.json``) has a bad type, value or format version."""


class CalibrationDataError(OlicaError):
    """The calibration data cannot calibrate this model (wrong shape or type, foreign token ids, only padding)."""


class ResumeMismatchError(OlicaError):
    """A checkpoint directory holds the progress of a different run (other model, recipe or calibration data)."""


class CheckpointVerificationError(OlicaError, OSError):
    """A checkpoint (input weights, a just-written output, resume files) is truncated, corrupted or inconsistent.

    Also an ``OSError``: it is a problem with files on disk.
    """


class NonFiniteActivationsError(OlicaError, FloatingPointError):
    """A decoder layer produced NaN or Inf activations on the calibration data (also a ``FloatingPointError``)."""
