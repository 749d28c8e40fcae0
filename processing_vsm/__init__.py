"""VSM processor, registered with `AutoProcessor` and `AutoImageProcessor` for `VSMConfig`."""

from transformers import AutoImageProcessor, AutoProcessor

from configuration_vsm import VSMConfig

from .processing_vsm import (
    TINY_SPECIAL_TOKENS,
    VSM_CHAT_TEMPLATE,
    VSMImageProcessor,
    VSMProcessor,
    boxes_to_original,
    build_tiny_tokenizer,
    dense_view_settings,
    export_processor_remote_code,
    masks_to_original,
    tiny_tokenizer_corpus,
    to_rgb_image,
)


# In-memory registrations only: no network, no file system.
AutoProcessor.register(VSMConfig, VSMProcessor, exist_ok=True)
AutoImageProcessor.register(
    VSMConfig, image_processor_classes={"pil": VSMImageProcessor, "torchvision": VSMImageProcessor}, exist_ok=True
)

__all__ = [
    "VSMProcessor",
    "VSMImageProcessor",
    "build_tiny_tokenizer",
    "tiny_tokenizer_corpus",
    "dense_view_settings",
    "export_processor_remote_code",
    "masks_to_original",
    "boxes_to_original",
    "to_rgb_image",
    "VSM_CHAT_TEMPLATE",
    "TINY_SPECIAL_TOKENS",
]
