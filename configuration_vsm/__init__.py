"""VSM configuration, registered with `AutoConfig` under `model_type="vsm"`."""

from transformers import AutoConfig

from .configuration_vsm import DENSE_FEATURE_SOURCES, PRESETS, SINGLE_ENCODER_SOURCES, VSMConfig

AutoConfig.register("vsm", VSMConfig, exist_ok=True)

__all__ = ["VSMConfig", "PRESETS", "DENSE_FEATURE_SOURCES", "SINGLE_ENCODER_SOURCES"]
