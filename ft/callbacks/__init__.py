"""Callbacks that observe a run and log through the Trainer's loggers (never change state)."""

from ft.callbacks.curves import ActivationCurves
from ft.callbacks.nearest import NearestWords
from ft.callbacks.progress import StepProgress
from ft.callbacks.temperature import TemperatureSchedule

__all__ = ["ActivationCurves", "NearestWords", "StepProgress", "TemperatureSchedule"]
