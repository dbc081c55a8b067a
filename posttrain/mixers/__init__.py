"""The mixers registry. Importing this package registers every built-in mixer."""
from posttrain.mixers import amft, chord, constant, relift, sasr  # noqa: F401  (register the mixers)
from posttrain.mixers.base import (
                                   MIXERS,
                                   GroupOutcome,
                                   Mixer,
                                   MixerConfig,
                                   MixPlan,
                                   StepReport,
                                   build_mixer,
                                   register_mixer,
)

__all__ = ["MIXERS", "GroupOutcome", "Mixer", "MixerConfig", "MixPlan", "StepReport", "build_mixer",
           "register_mixer"]
