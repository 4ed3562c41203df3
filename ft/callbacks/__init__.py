"""Callbacks that observe a run and log through the Trainer's loggers (never change state)."""

from ft.callbacks.curves import ActivationCurves
from ft.callbacks.nearest import NearestWords

__all__ = ["ActivationCurves", "NearestWords"]
