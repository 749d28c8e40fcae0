"""VSM model, registered with `AutoModel` / `AutoModelForCausalLM` under `model_type="vsm"`.

`VSMTrainer` and `VSMDataCollator` (training side, never exported as remote code) load lazily.
"""

from transformers import AutoModel, AutoModelForCausalLM

from configuration_vsm import VSMConfig

from .modeling_vsm import VSMCausalLMOutput, VSMForCausalLM, VSMGenerateOutput, VSMModel, VSMPreTrainedModel

AutoModel.register(VSMConfig, VSMForCausalLM, exist_ok=True)
AutoModelForCausalLM.register(VSMConfig, VSMForCausalLM, exist_ok=True)

_LAZY = {"VSMTrainer": ".training", "VSMDataCollator": ".training"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "VSMForCausalLM",
    "VSMModel",
    "VSMPreTrainedModel",
    "VSMCausalLMOutput",
    "VSMGenerateOutput",
    "VSMTrainer",
    "VSMDataCollator",
]
