"""The mixers registry. Importing this package registers every built-in mixer."""
from posttrain.mixers.base import MIXERS, Mixer, MixerConfig, build_mixer, register_mixer
from posttrain.mixers import chord, constant  # noqa: F401  (register "chord", "constant")

__all__ = ["MIXERS", "Mixer", "MixerConfig", "build_mixer", "register_mixer"]
