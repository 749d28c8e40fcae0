"""VSM processor: image processor, tiny tokenizer, chat template and post-processing.

This file is remote code: it is copied flat next to every saved VSM (with its sibling
`configuration_vsm.py`) and imported by `AutoProcessor.from_pretrained(..., trust_remote_code=True)`
in processes that never installed this project. It imports only the standard library, numpy,
PIL, torch, tokenizers, transformers and that sibling.

The "frame". By default every image view (the VLM view and, for SAM / OWL-ViT dense encoders, the dense
view) is built the same way: resize the longest side to S keeping the aspect ratio, rescale to [0, 1],
normalise, and pad bottom / right with zeros to S x S. A mask predicted on any square grid over
the frame therefore maps back to an h x w original by resizing it to (L, L), L = max(h, w), and
cropping [:h, :w]; a box normalised to the frame maps back by multiplying by L. Converted LISA / SEAL
checkpoints keep their own views (`VIEW_MODES`: a CLIP centre crop, a top-left padded square, a stretch) and
map predictions back by their own geometry (`PREDICTION_FRAMES`).
"""

import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.processing_utils import ProcessorMixin


try:
    from .configuration_vsm import VSMConfig, add_vsm_tokens, export_remote_code
except ImportError:
    from configuration_vsm.configuration_vsm import VSMConfig, add_vsm_tokens, export_remote_code


# --- special tokens --------------------------------------------------------------------------

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<pad>", "<s>", "</s>"
IMAGE_TOKEN, SEG_TOKEN, LOC_TOKEN = "<image>", "<SEG>", "<loc>"
USER_TOKEN, ASSISTANT_TOKEN = "<|user|>", "<|assistant|>"
# The tiny tokenizer puts these first, so their ids are their positions here (0..7); they must
# match configuration_vsm's TINY_PAD_ID ... TINY_LOC_ID and the tiny LM's pad / bos / eos ids.
TINY_SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, IMAGE_TOKEN, SEG_TOKEN, LOC_TOKEN, USER_TOKEN, ASSISTANT_TOKEN)
# Tokens that must never be split into several ids (LISA's `[SEG]` was split into two ids by newer tokenizers).
SINGLE_ID_TOKENS = (IMAGE_TOKEN, SEG_TOKEN, LOC_TOKEN)
# Contexts in which each of SINGLE_ID_TOKENS must still be exactly one id ("{}" is the token).
SINGLE_ID_CONTEXTS = ("{}", "a{}.", " {}", "{}{}", "x {} y")
# The tiny LM's vocab_size (configuration_vsm PRESETS["tiny"]["text_config"]["vocab_size"]).
TINY_VOCAB_SIZE = 1024

# Chat template: `<s>`, then per message `<|user|>` + content + "\n", `<|assistant|>` + content +
# `</s>`, or (system) content + "\n". List content is rendered part by part, in the order given,
# with no separators: text as is, an image part as `<image>`. The synthetic data put the
# instruction BEFORE the image ("segment the red shape\n<image>"), so the order is the user's.
VSM_CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{- '<|user|>' -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- '<|assistant|>' -}}"
    "{%- elif message['role'] != 'system' -%}{{- raise_exception('Unknown chat role: ' ~ message['role']) -}}"
    "{%- endif -%}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- elif part['type'] == 'image' -%}{{- '<image>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{{- eos_token -}}{%- else -%}{{- '\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}"
)

# --- image constants -------------------------------------------------------------------------

SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # SAM
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OWL-ViT
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_RESAMPLE = int(Image.Resampling.BICUBIC)
# How a view is cut from the image. "frame": longest side resized to S, padded bottom / right (VSM's). "center_crop":
# shortest side resized to S, the centre S x S kept (CLIP's image processor, LISA's CLIP view). "pad_square": the
# image pasted top-left on a square of the mean colour, then resized to S x S (SEAL's CLIP view). "stretch": resized
# to S x S, aspect not kept (SEAL's OWL-ViT view).
VIEW_MODES = ("frame", "center_crop", "pad_square", "stretch")
# The geometry of predicted masks and boxes, i.e. how they map back to the original image. "frame": the square
# frame (masks resized to L x L, L the longest side, then cropped). "sam": the same frame, the way Meta's SAM
# post-processes (masks upscaled to the dense view's side, cropped to the resized image, resized to the original;
# LISA). "stretch": the stretched square (masks resized straight to the original size, boxes scaled per axis; SEAL).
PREDICTION_FRAMES = ("frame", "sam", "stretch")
MAX_UINT8 = 255
LOGIT_THRESHOLD = 0.0  # a pixel is in a mask where its logit > 0
MAX_UINT16 = 65535
UINT16_TO_UINT8 = MAX_UINT16 / MAX_UINT8  # 257: maps 0..65535 exactly onto 0..255
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
CHANNEL_COUNTS = (1, 3, 4)  # gray, RGB, RGBA
FLOAT_RANGE_TOLERANCE = 1e-3  # float images may overshoot [0, 1] by rounding noise
RGB_CHANNELS = 3


# ============================================================================================
# Image loading: anything -> RGB PIL image
# ============================================================================================


def _open_image_file(path) -> Image.Image:
    """Open an image file; every failure becomes a ValueError naming the path and the reason."""
    name = os.fspath(path)
    if name.startswith(("http://", "https://")):
        raise ValueError(f"Image {name!r} is a URL; VSM does not download images, open it yourself.")
    if not os.path.exists(name):
        raise ValueError(f"Image file {name!r} does not exist.")
    if os.path.isdir(name):
        raise ValueError(f"Image path {name!r} is a directory, not an image file.")
    if os.path.getsize(name) == 0:
        raise ValueError(f"Image file {name!r} is empty (0 bytes).")
    try:
        with Image.open(name) as opened:
            opened.load()
            image = ImageOps.exif_transpose(opened)
    except UnidentifiedImageError:
        raise ValueError(f"Image file {name!r} is not an image format PIL can read.") from None
    except Exception as err:  # truncated / corrupt data raises OSError, SyntaxError, ValueError, ...
        raise ValueError(f"Image file {name!r} is corrupt or truncated: {err}") from None
    return image


def _to_unit_float(array: np.ndarray) -> np.ndarray:
    """Pixel values of any supported dtype -> float32 in [0, 1].

    bool: False/True; uint8: /255; uint16: /65535; float: must already be in [0, 1]; other
    integer dtypes (e.g. int64 from `torch.randint`) are read on the 8-bit scale when their values
    fit in 0..255, else on the 16-bit scale.
    """
    if array.dtype == np.bool_:
        return array.astype(np.float32)
    if array.dtype == np.uint8:
        return array.astype(np.float32) / MAX_UINT8
    if array.dtype == np.uint16:
        return array.astype(np.float32) / MAX_UINT16
    if np.issubdtype(array.dtype, np.floating):
        values = array.astype(np.float32)
        if not np.isfinite(values).all():
            raise ValueError("Float image contains NaN or infinite values.")
        low, high = float(values.min()), float(values.max())
        if low < -FLOAT_RANGE_TOLERANCE or high > 1 + FLOAT_RANGE_TOLERANCE:
            raise ValueError(
                f"Float images must have values in [0, 1], got [{low:g}, {high:g}] "
                "(divide 0..255 data by 255 first, or pass it as uint8)."
            )
        return np.clip(values, 0.0, 1.0)
    if np.issubdtype(array.dtype, np.integer):
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > MAX_UINT16:
            raise ValueError(f"Integer images must have values in 0..{MAX_UINT16}, got {low}..{high}.")
        scale = MAX_UINT8 if high <= MAX_UINT8 else MAX_UINT16
        return array.astype(np.float32) / scale
    raise ValueError(f"Unsupported image dtype {array.dtype}; use uint8, uint16, bool or float in [0, 1].")


def _array_to_pil(array: np.ndarray, channels_last_first: bool = True) -> Image.Image:
    """HxW, HxWx1, HxWx3 or HxWx4 array (also CxHxW) -> RGB PIL image; alpha is composited onto black.

    `channels_last_first`: for 3-D arrays, try the HxWxC reading before CxHxW (numpy); False tries
    CxHxW first (torch tensors).
    """
    if array.size == 0:
        raise ValueError(f"Image array is empty (shape {tuple(array.shape)}).")
    if array.ndim == 3:
        last, first = array.shape[-1] in CHANNEL_COUNTS, array.shape[0] in CHANNEL_COUNTS
        if first and (not channels_last_first or not last):
            array = np.moveaxis(array, 0, -1)  # (C, H, W) -> (H, W, C)
        elif not last:
            raise ValueError(
                f"Cannot read an image of shape {tuple(array.shape)}: expected HxW, HxWx1, HxWx3, HxWx4 "
                "(or CxHxW with C in 1, 3, 4)."
            )
        if array.shape[-1] == 1:
            array = array[..., 0]
    elif array.ndim != 2:
        raise ValueError(f"Cannot read an image of shape {tuple(array.shape)}: expected 2 or 3 dimensions.")

    if array.dtype == np.uint8 and array.ndim == 2:
        return Image.fromarray(np.ascontiguousarray(array), mode="L").convert("RGB")
    if array.dtype == np.uint8 and array.shape[-1] == RGB_CHANNELS:
        return Image.fromarray(np.ascontiguousarray(array), mode="RGB")

    values = _to_unit_float(array)  # (H, W) or (H, W, C) in [0, 1]
    if values.ndim == 2:
        values = np.repeat(values[..., None], RGB_CHANNELS, axis=-1)
    elif values.shape[-1] == len(IMAGENET_MEAN) + 1:  # RGBA: composite onto black
        values = values[..., :RGB_CHANNELS] * values[..., RGB_CHANNELS:]
    return Image.fromarray(np.round(values * MAX_UINT8).astype(np.uint8), mode="RGB")


def _pil_to_rgb(image: Image.Image) -> Image.Image:
    """A PIL image of any mode -> RGB. Alpha is composited onto black; 16-bit is scaled to 8-bit."""
    mode = image.mode
    if mode == "RGB":
        return image
    if image.width == 0 or image.height == 0:
        raise ValueError(f"Image is empty (size {image.size}).")
    if mode in SIXTEEN_BIT_MODES:
        # PIL's own convert("L") clips 16-bit values at 255 (a white image); scale them instead.
        values = np.asarray(image).astype(np.float64) / UINT16_TO_UINT8
        return _array_to_pil(np.clip(np.round(values), 0, MAX_UINT8).astype(np.uint8))
    if mode == "F":
        values = np.asarray(image, dtype=np.float32)
        if not np.isfinite(values).all():
            raise ValueError("Float (mode F) image contains NaN or infinite values.")
        # F images in [0, 1] are scaled by 255; others are read on the 0..255 scale.
        if values.size and values.max() > 1 + FLOAT_RANGE_TOLERANCE:
            values = values / MAX_UINT8
        return _array_to_pil(np.clip(values, 0.0, 1.0))
    if mode in ALPHA_MODES or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, MAX_UINT8))
        return Image.alpha_composite(black, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as err:
        raise ValueError(f"Cannot convert a PIL image of mode {mode!r} to RGB: {err}") from None


def to_rgb_image(image) -> Image.Image:
    """Any supported image input -> an RGB PIL image.

    Accepts a PIL image of any mode, a numpy array (HxW, HxWx1, HxWx3, HxWx4; uint8, uint16, bool or
    float in [0, 1]), a torch tensor (CxHxW or HxWxC, same dtypes), or a file path (str / Path).
    """
    if isinstance(image, (str, os.PathLike)):
        image = _open_image_file(image)
    if isinstance(image, Image.Image):
        return _pil_to_rgb(image)
    if isinstance(image, torch.Tensor):
        tensor = image.detach().cpu()
        if tensor.dtype in (torch.bfloat16, torch.float16):
            tensor = tensor.float()
        return _array_to_pil(tensor.numpy(), channels_last_first=False)
    if isinstance(image, np.ndarray):
        return _array_to_pil(image)
    raise ValueError(
        f"Unsupported image type {type(image).__name__}: "
        "pass a PIL image, a numpy array, a torch tensor or a file path."
    )


def _is_image(obj) -> bool:
    return isinstance(obj, (Image.Image, np.ndarray, torch.Tensor, str, os.PathLike))


def _as_image_list(images) -> list:
    """A single image, a list of images, or a 4-D (B, ...) array / tensor -> a flat list."""
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        return list(images)
    if _is_image(images):
        return [images]
    if isinstance(images, (list, tuple)):
        return list(images)
    raise ValueError(f"Unsupported `images` type {type(images).__name__}.")


# ============================================================================================
# Image processor
# ============================================================================================


class VSMImageProcessor(BaseImageProcessor):
    r"""
    Builds the VLM view (`pixel_values`) and, optionally, a dense view (`dense_pixel_values`, for
    SAM / OWL-ViT dense encoders) of each image, both on the same "frame" geometry: longest side
    resized to the view size keeping the aspect ratio (each side >= 1 px), rescaled to [0, 1],
    normalised, zero-padded bottom / right to a square. `original_sizes` (h, w) lets
    [`VSMProcessor.post_process_generation`] map masks and boxes back.

    Args:
        image_size (`int`): side of the VLM view (the vision tower's input, 64 for the tiny preset).
        image_mean, image_std (`float` or 3 floats): normalisation of the VLM view (SigLIP: 0.5, 0.5).
        dense_image_size (`int`, *optional*): side of the dense view; `None` builds no dense view.
        dense_image_mean, dense_image_std (3 floats): normalisation of the dense view (default
            ImageNet's, as SAM uses; OWL-ViT uses CLIP's).
        resample (`int`): PIL resampling filter (default bicubic).
        image_view, dense_view (`str`): how each view is cut from the image, one of `VIEW_MODES` (default
            `"frame"` for both; a converted LISA reads a `"center_crop"` CLIP view, SEAL a `"pad_square"` CLIP view
            and a `"stretch"` OWL-ViT view).
        dense_resample (`int`, *optional*): PIL filter of the dense view (default: `resample`; SAM's is bilinear).
        prediction_frame (`str`): the geometry of predicted masks and boxes, one of `PREDICTION_FRAMES` (default
            `"frame"`); `post_process_generation` maps them back to the original image by it.
    """

    model_input_names = ["pixel_values", "dense_pixel_values", "original_sizes"]
    # Constructor arguments, also accepted by `preprocess` as per-call overrides.
    SETTINGS = (
        "image_size",
        "image_mean",
        "image_std",
        "dense_image_size",
        "dense_image_mean",
        "dense_image_std",
        "resample",
        "image_view",
        "dense_view",
        "dense_resample",
    )

    def __init__(
        self,
        image_size: int = 64,
        image_mean=SIGLIP_MEAN,
        image_std=SIGLIP_STD,
        dense_image_size: int | None = None,
        dense_image_mean=IMAGENET_MEAN,
        dense_image_std=IMAGENET_STD,
        resample: int = DEFAULT_RESAMPLE,
        image_view: str = "frame",
        dense_view: str = "frame",
        dense_resample: int | None = None,
        prediction_frame: str = "frame",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.image_view = _check_choice("image_view", image_view, VIEW_MODES)
        self.dense_view = _check_choice("dense_view", dense_view, VIEW_MODES)
        self.prediction_frame = _check_choice("prediction_frame", prediction_frame, PREDICTION_FRAMES)
        self.dense_resample = None if dense_resample is None else int(dense_resample)
        self.image_size = _check_size("image_size", image_size)
        self.image_mean = _check_channels("image_mean", image_mean)
        self.image_std = _check_channels("image_std", image_std, positive=True)
        self.dense_image_size = None if dense_image_size is None else _check_size("dense_image_size", dense_image_size)
        self.dense_image_mean = _check_channels("dense_image_mean", dense_image_mean)
        self.dense_image_std = _check_channels("dense_image_std", dense_image_std, positive=True)
        self.resample = int(resample)

    def __call__(self, images, return_tensors="pt", **kwargs) -> BatchFeature:
        return self.preprocess(images, return_tensors=return_tensors, **kwargs)

    def preprocess(self, images, return_tensors="pt", **kwargs) -> BatchFeature:
        """
        Args:
            images: one image or a list of images (PIL, numpy, torch, or file paths); see `to_rgb_image`.
            return_tensors (`str`, *optional*): `"pt"` (default), `"np"`, or `None` for lists.
            **kwargs: per-call overrides of the constructor arguments (e.g. `image_size=...`).

        Returns:
            `BatchFeature` with `pixel_values` (B, 3, S, S) float32, `original_sizes` (B, 2) int64 (h, w),
            and `dense_pixel_values` (B, 3, S_d, S_d) when `dense_image_size` is set.
        """
        unknown = set(kwargs) - set(self.SETTINGS)
        if unknown:
            raise ValueError(f"Unknown image processor argument(s) {sorted(unknown)}; valid: {list(self.SETTINGS)}.")
        settings = {name: getattr(self, name) for name in self.SETTINGS}
        settings.update(kwargs)
        image_list = _as_image_list(images)
        if not image_list:
            raise ValueError("`images` is empty: pass at least one image.")

        for name in ("image_view", "dense_view"):
            _check_choice(name, settings[name], VIEW_MODES)
        dense_resample = settings["resample"] if settings["dense_resample"] is None else settings["dense_resample"]
        view = (settings["image_view"], settings["image_size"], settings["image_mean"], settings["image_std"],
                settings["resample"])
        dense_view = (settings["dense_view"], settings["dense_image_size"], settings["dense_image_mean"],
                      settings["dense_image_std"], dense_resample)
        pixel_values, dense_pixel_values, original_sizes = [], [], []
        for image in image_list:
            rgb = to_rgb_image(image)
            original_sizes.append((rgb.height, rgb.width))
            pixel_values.append(_to_view(rgb, *view))
            if settings["dense_image_size"] is not None:
                dense_pixel_values.append(_to_view(rgb, *dense_view))
        data = {
            "pixel_values": np.stack(pixel_values),  # (B, 3, S, S)
            "original_sizes": np.asarray(original_sizes, dtype=np.int64),  # (B, 2) as (h, w)
        }
        if dense_pixel_values:
            data["dense_pixel_values"] = np.stack(dense_pixel_values)  # (B, 3, S_d, S_d)
        return BatchFeature(data=data, tensor_type=return_tensors)


def _check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {set(choices)}, got {value!r}.")
    return value


def _check_size(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
    return int(value)


def _check_channels(name: str, value, positive: bool = False) -> list[float]:
    values = [float(value)] * RGB_CHANNELS if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) != RGB_CHANNELS or (positive and min(values) <= 0):
        condition = " > 0" if positive else ""
        raise ValueError(f"`{name}` must be one float or {RGB_CHANNELS} floats{condition}, got {value!r}.")
    return values


def resized_longest_side(height: int, width: int, size: int) -> tuple[int, int]:
    """(h, w) after resizing the longest side to `size` keeping the aspect ratio; each side >= 1."""
    scale = size / max(height, width)
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def resized_shortest_side(height: int, width: int, size: int) -> tuple[int, int]:
    """(h, w) after resizing the shortest side to `size` keeping the aspect ratio (CLIP's image processor: the
    longer side is truncated, never rounded)."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def _to_view(image: Image.Image, mode: str, size: int, mean, std, resample: int) -> np.ndarray:
    """RGB PIL image -> (3, size, size) float32 view (`VIEW_MODES`): cut, rescaled to [0, 1], normalised; the
    frame's padding is zero after normalisation."""
    height, width = image.height, image.width
    if mode == "pad_square":  # top-left on a square of the mean colour (as 8-bit values, truncated)
        fill = tuple(int(channel * MAX_UINT8) for channel in mean)
        square = Image.new("RGB", (max(height, width),) * 2, fill)
        square.paste(image, (0, 0))
        image, height, width = square, square.height, square.width
    if mode == "frame":
        height, width = resized_longest_side(height, width, size)
    elif mode == "center_crop":
        height, width = resized_shortest_side(height, width, size)
    else:  # "stretch", and the padded square
        height, width = size, size
    if (height, width) != (image.height, image.width):
        image = image.resize((width, height), resample=resample)
    if mode == "center_crop":
        top, left = (height - size) // 2, (width - size) // 2
        image = image.crop((left, top, left + size, top + size))
        height, width = size, size
    pixels = np.asarray(image, dtype=np.float32) / MAX_UINT8  # (h', w', 3) in [0, 1]
    pixels = (pixels - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    frame = np.zeros((RGB_CHANNELS, size, size), dtype=np.float32)
    frame[:, :height, :width] = pixels.transpose(2, 0, 1)
    return frame


# ============================================================================================
# The tiny tokenizer
# ============================================================================================

_GENERAL_TEXT = """\
You are a helpful assistant. Please answer the question about the image.
Look at the picture and describe what you see. Can you find the object in this photo?
Please output the segmentation mask. Please segment the object. Sure, here it is.
What is in the image? Describe the scene in detail. Answer with a short sentence.
Is there a person in the picture? Yes, there is. No, there is not. I do not know.
Where is the dog? The dog is on the left of the car. The cat is under the table.
Find the thing that people use to sit on. Find the part that can hold water.
Which object would you use to cut paper? Which one is the tallest? What is this used for?
Show me the region of the image that answers the question. Point to the answer.
The man is standing next to a tree. A woman is holding an umbrella in the rain.
There is a cup on the table, a book near the window, and a lamp beside the bed.
Count the objects and tell me the number. Give the location of the target.
This is a simple image with a few coloured shapes on a plain background.
The background is dark and the shapes are bright. Each shape has one colour.
Segment the target and explain why. Because it is the only one with that colour.
I think the answer is the second one from the left. It looks like a small box.
Please identify the item, then output its mask and its bounding box.
Thank you. You are welcome. Let me look again. Here is my answer.
The road, the sky, the water, the grass, the building, the window, the door, the wall.
food, fruit, apple, banana, lemon, orange, grape, tomato, carrot, bread, cake, pizza.
animal, bird, horse, sheep, cow, elephant, bear, zebra, giraffe, fish, mouse.
vehicle, bicycle, motorcycle, airplane, bus, train, truck, boat, traffic light, sign.
chair, couch, bed, table, toilet, laptop, phone, keyboard, clock, vase, scissors, bottle.
first second third fourth fifth last next previous above below behind front inside outside.
near far close between around across along over under on in at by with without from to.
can could would should will may might must do does did is are was were be been being have has had.
what which who whom whose where when why how this that these those it its they them their.
a an the and or but not no yes all any each every some many much more most few less least.
very really quite only also just still even again once twice always never often sometimes.
Please respond with segmentation mask. Please output segmentation mask. Locate the shape. Find it.
Find the object in this picture that has the colour of fresh grass. It is coloured like a lime.
There is a shape that is coloured like a fire truck; can you segment it? It is like the deep sea.
One of these shapes is perfectly round. Which one is it? It has no corners at all.
It has four equal sides and four right angles. It has exactly three corners and three straight sides.
It sits further left than all the others. It is closest to the left edge of the picture.
It sits higher than all the others; the other one sits lower. It is coloured like the sun.
It is larger than every other shape. It covers the most area. It covers the least area.
the shape on the far left, the shape on the far right, the highest shape, the lowest shape, the tiniest shape.
How many objects are in this picture? What shape is the red object? It is a circle. It is a square.
make made take took see saw look looked find found show shown give given tell told ask asked.
"""

_COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black", "grey")
_SHAPES = ("circle", "square", "triangle", "shape", "object")
_POSITIONS = ("left", "leftmost", "right", "rightmost", "top", "topmost", "bottom", "upper", "lower", "middle")
_SIZES = ("big", "bigger", "biggest", "large", "larger", "largest", "small", "smaller", "smallest")
_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_COLOUR_HINTS = {
    "red": "a ripe tomato",
    "green": "fresh grass",
    "blue": "the clear sky",
    "yellow": "a ripe banana",
    "purple": "a grape",
    "orange": "an orange",
    "white": "snow",
    "black": "the night",
    "grey": "an elephant",
}


def tiny_tokenizer_corpus() -> list[str]:
    """The built-in, deterministic text the tiny tokenizer is trained on (general + shapes domain)."""
    lines = _GENERAL_TEXT.splitlines()
    answers = (
        "It is <SEG>.",
        "Sure, the segmentation result is <SEG>.",
        "Sure, it is <SEG>.",
        "It is at <loc>.",
        "The box is <loc>.",
    )
    for colour in _COLOURS:
        for shape in _SHAPES:
            lines += [
                f"segment the {colour} {shape}",
                f"Please segment the {colour} {shape}. Please output the segmentation mask.",
                f"Where is the {colour} {shape}? It is at <loc>.",
                f"What colour is the {shape}? The {shape} is {colour}.",
                f"Can you segment the {colour} {shape} in this image? {answers[len(lines) % len(answers)]}",
            ]
        lines.append(f"Which shape has the colour of {_COLOUR_HINTS[colour]}? The {colour} one. It is <SEG>.")
    for position in _POSITIONS:
        for shape in _SHAPES:
            lines += [f"segment the {position} {shape}", f"the {shape} on the {position}", f"The {position} {shape}."]
    for size in _SIZES:
        for shape in _SHAPES:
            lines += [f"segment the {size} {shape}", f"Which {shape} is {size}? The {size} {shape} is <SEG>."]
    for index, number in enumerate(_NUMBERS):
        verb, noun = ("is", "shape") if index == 1 else ("are", "shapes")
        lines += [
            "How many shapes are there?",
            f"There {verb} {number} {noun}.",
            f"{number.capitalize()} {noun} {verb} in the image.",
            str(index),
        ]
    lines += ["There are three shapes.", "What colour is the circle?", "Which shape has the colour of a ripe banana?"]
    lines += [" ".join(str(digit) for digit in range(10)), "0.5 1.0 2.0 10 20 50 100 %"]
    lines += ["( ) [ ] { } : ; , . ! ? ' \" - _ / \\"]
    return lines


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Train the tiny preset's byte-level BPE tokenizer offline, deterministically.

    The special tokens come first, with ids 0..7: `<pad>`, `<s>`, `</s>`, `<image>`, `<SEG>`,
    `<loc>`, `<|user|>`, `<|assistant|>`; the vocabulary has at most 1024 entries (the tiny LM's
    vocab_size). Byte-level BPE encodes any text. `tokenizer("...")` prepends `<s>` (Llama-like);
    the processor and the chat template add it themselves and tokenize with `add_special_tokens=False`.
    """
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=list(TINY_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=1,
        show_progress=False,
    )
    backend.train_from_iterator(tiny_tokenizer_corpus(), trainer=trainer)
    bos_id = backend.token_to_id(BOS_TOKEN)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, bos_id)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=[IMAGE_TOKEN, SEG_TOKEN, LOC_TOKEN, USER_TOKEN, ASSISTANT_TOKEN],
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = VSM_CHAT_TEMPLATE
    for expected_id, token in enumerate(TINY_SPECIAL_TOKENS):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id != expected_id:
            raise RuntimeError(f"Tiny tokenizer gave {token!r} id {token_id}, not {expected_id}.")
    if len(tokenizer) > TINY_VOCAB_SIZE:
        raise RuntimeError(f"Tiny tokenizer has {len(tokenizer)} tokens, more than {TINY_VOCAB_SIZE}.")
    return tokenizer


# ============================================================================================
# Processor
# ============================================================================================


class VSMProcessor(ProcessorMixin):
    r"""
    Processor of a VSM: a [`VSMImageProcessor`] and a tokenizer, plus the chat template.

    Args:
        image_processor ([`VSMImageProcessor`]): builds `pixel_values`, `original_sizes`
            (and `dense_pixel_values`).
        tokenizer ([`PreTrainedTokenizerFast`]): must encode `<image>`, `<SEG>` and `<loc>` as one id each.
        chat_template (`str`, *optional*): Jinja template; defaults to the tokenizer's, else the VSM template.
        num_image_tokens (`int`): LM positions one image takes; each `<image>` in the text is expanded
            into this many `<image>` ids.
        image_token, seg_token, loc_token (`str`): the special tokens (`image_token` is the VLM's own, e.g.
            Janus-Pro's `<image_placeholder>`). `loc_token=None` for a model without box heads (LISA); the same
            token as `seg_token` where one token gives a mask and a box (SEAL's `[LOC]`).
        image_start_token, image_end_token (`str`, *optional*): tokens around each expanded image (Janus-Pro's
            `<begin_of_image>` / `<end_of_image>`, LLaVA-v1's `<im_start>` / `<im_end>`); `None` for none.
        image_first (`bool`): where an image goes in a user turn whose text does not place it: before the
            instruction (`"<image>\n{instruction}"`, LLaVA / LISA / SEAL) or, by default, after it (VSM's "lm" dense
            features read the instruction from the image positions).
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template=None,
        num_image_tokens: int | None = None,
        image_token: str = IMAGE_TOKEN,
        seg_token: str = SEG_TOKEN,
        loc_token: str = LOC_TOKEN,
        image_start_token: str | None = None,
        image_end_token: str | None = None,
        image_first: bool = False,
        **kwargs,
    ):
        if chat_template is None:
            chat_template = getattr(tokenizer, "chat_template", None) or VSM_CHAT_TEMPLATE
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)
        if num_image_tokens is None:
            raise ValueError("`num_image_tokens` is required (e.g. `VSMConfig.num_image_tokens`).")
        self.num_image_tokens = _check_size("num_image_tokens", num_image_tokens)
        self.image_token, self.seg_token, self.loc_token = image_token, seg_token, loc_token
        self.image_start_token, self.image_end_token = image_start_token, image_end_token
        self.image_first = bool(image_first)
        self.image_token_id = self._single_token_id("image_token", image_token)
        self.seg_token_id = self._single_token_id("seg_token", seg_token)
        self.loc_token_id = None if loc_token is None else self._single_token_id("loc_token", loc_token)

    def _single_token_id(self, name: str, token: str) -> int:
        """The id of `token`, checking that it stays ONE id in every context (LISA's `[SEG]` was split into two ids by newer tokenizers)."""
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            raise ValueError(f"`{name}` {token!r} is not in the tokenizer's vocabulary; add it as a special token.")
        for context in SINGLE_ID_CONTEXTS:
            text = context.format(token, token) if context.count("{}") == 2 else context.format(token)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if ids.count(token_id) != text.count(token):
                raise ValueError(
                    f"The tokenizer splits `{name}` {token!r}: {text!r} encodes to {ids} "
                    f"({self.tokenizer.convert_ids_to_tokens(ids)}); it must be one id ({token_id}) in any context. "
                    "Add it with `tokenizer.add_special_tokens(...)`."
                )
        return token_id

    # ----------------------------------------------------------------------------------------
    def __call__(
        self,
        images=None,
        text=None,
        padding=True,
        padding_side=None,
        return_tensors="pt",
        videos=None,
        audio=None,
        **kwargs,
    ) -> BatchFeature:
        """
        Tokenize chat-templated text and preprocess images.

        Args:
            images: per sample, one image, a list of images, or `None` (text-only). For a single text,
                a list of images all belong to it; for a batch, pass one entry per sample.
            text (`str` or `list[str]`): already chat-templated, one `<image>` where each image goes.
            padding: tokenizer padding (default `True`: pad to the longest).
            padding_side (`str`, *optional*): `"left"` (default, for batched generation) or `"right"`.
            return_tensors (`str`, *optional*): `"pt"` (default), `"np"` or `None`.
            **kwargs: image processor overrides (its constructor arguments) and tokenizer arguments.

        Returns:
            `BatchFeature` with `input_ids`, `attention_mask`, `pixel_values`, `original_sizes` (and
            `dense_pixel_values` when the image processor builds a dense view).
        """
        if videos is not None or audio is not None:
            raise ValueError("VSMProcessor handles images and text only; got `videos` or `audio`.")
        if text is None and images is None:
            raise ValueError("Pass `text`, `images`, or both.")
        image_kwargs = dict(kwargs.pop("images_kwargs", {}))
        text_kwargs = dict(kwargs.pop("text_kwargs", {}))
        image_keys = set(getattr(self.image_processor, "SETTINGS", ()))
        for key in list(kwargs):
            (image_kwargs if key in image_keys else text_kwargs)[key] = kwargs.pop(key)

        texts = None
        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            if not texts or not all(isinstance(sample, str) for sample in texts):
                raise ValueError("`text` must be a string or a non-empty list of strings.")
        per_sample = self._images_per_sample(images, len(texts) if texts is not None else None)

        data = {}
        flat_images = [image for sample in per_sample for image in sample]
        if flat_images:
            data.update(self.image_processor(flat_images, return_tensors=None, **image_kwargs))
        if texts is not None:
            data.update(self._tokenize(texts, per_sample, padding, padding_side, text_kwargs))
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _images_per_sample(self, images, batch_size: int | None) -> list[list]:
        """Normalise `images` into one list of images per text sample."""
        if images is None:
            return [[] for _ in range(batch_size or 0)]
        if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
            images = list(images)
        if _is_image(images):
            images = [images]
        if not isinstance(images, (list, tuple)):
            raise ValueError(f"Unsupported `images` type {type(images).__name__}.")
        nested = any(isinstance(entry, (list, tuple)) for entry in images)
        if batch_size is None:  # images only
            return [_as_image_list(entry) for entry in images if entry is not None]
        if nested:
            if len(images) != batch_size:
                raise ValueError(f"Got {len(images)} image lists for {batch_size} text samples; pass one per sample.")
            return [[] if entry is None else _as_image_list(entry) for entry in images]
        if batch_size == 1:
            return [[image for image in images if image is not None]]
        if len(images) != batch_size:
            raise ValueError(
                f"Got {len(images)} images for {batch_size} text samples: pass one image (or None) per sample, "
                "or a list of image lists."
            )
        return [[] if image is None else [image] for image in images]

    def expand_image_tokens(self, text: str) -> str:
        """Each `image_token` in `text` -> `num_image_tokens` of them (between the image start / end tokens)."""
        one_image = (self.image_start_token or "") + self.image_token * self.num_image_tokens + (self.image_end_token or "")
        return text.replace(self.image_token, one_image)

    def _tokenize(self, texts, per_sample, padding, padding_side, text_kwargs) -> dict:
        expanded = []
        for index, (sample, sample_images) in enumerate(zip(texts, per_sample)):
            num_tokens = sample.count(self.image_token)
            if num_tokens != len(sample_images):
                raise ValueError(
                    f"Sample {index} has {num_tokens} {self.image_token} token(s) but {len(sample_images)} image(s); "
                    f"put exactly one {self.image_token} in the text for each image (the chat template does this "
                    'for each {"type": "image"} part).'
                )
            expanded.append(self.expand_image_tokens(sample))
        text_kwargs.setdefault("add_special_tokens", False)  # the chat template writes `<s>`
        text_kwargs.pop("return_tensors", None)
        encoding = self.tokenizer(
            expanded, padding=padding, padding_side=padding_side or "left", return_tensors=None, **text_kwargs
        )
        for index, (ids, sample_images) in enumerate(zip(encoding["input_ids"], per_sample)):
            found, expected = ids.count(self.image_token_id), len(sample_images) * self.num_image_tokens
            if found != expected:
                raise ValueError(
                    f"Sample {index} has {found} {self.image_token} ids after tokenization, expected {expected} "
                    "(was it truncated?)."
                )
        return dict(encoding)

    # ----------------------------------------------------------------------------------------
    def batch_decode(self, sequences, skip_special_tokens: bool = True, **kwargs) -> list[str]:
        """Decode token ids; drops every special token (`<image>`, `<SEG>`, `<loc>`, roles, ...) by default."""
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens, **kwargs)

    def decode(self, token_ids, skip_special_tokens: bool = True, **kwargs) -> str:
        """Decode token ids; drops every special token by default."""
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens, **kwargs)

    def decode_answer(self, token_ids) -> str:
        """Decode an answer keeping `<SEG>` and `<loc>` (so one sees where masks / boxes came from)."""
        if isinstance(token_ids, torch.Tensor):
            token_ids = token_ids.tolist()
        kept = {self.seg_token_id, self.loc_token_id} - {None}
        dropped = set(self.tokenizer.all_special_ids) - kept
        return self.tokenizer.decode([i for i in token_ids if i not in dropped], skip_special_tokens=False)

    def post_process_generation(self, outputs, target_sizes=None) -> list[dict]:
        """
        Turn `model.generate(..., return_dict_in_generate=True)` output into per-image results.

        Args:
            outputs: has `sequences` (B, T); `prompt_length` (int, the answer's first column, 0 if absent);
                `pred_masks` (B tensors (n_i, h, w) of mask logits on the square frame); `pred_boxes`
                (B tensors (m_i, 4), cxcywh normalised to the frame); `box_scores` (B tensors (m_i,)).
            target_sizes: (h, w) of each original image, a list or a (B, 2) tensor (e.g. the
                processor's `original_sizes`). Required. With k sequences returned per sample
                (`num_return_sequences`, `outputs.sequences_per_sample`), the B sizes serve each sample's k.

        Returns:
            One dict per returned sequence: `text` (the answer; special tokens dropped EXCEPT `<SEG>` and `<loc>`,
            which are kept so a user sees where masks and boxes came from), `masks` (bool (n_i, h, w)
            at the original size, logits > 0), `boxes` (float (m_i, 4) xyxy in original pixels),
            `scores` (float (m_i,)).
        """
        sequences = _get_output(outputs, "sequences")
        if sequences is None:
            raise ValueError("`outputs` has no `sequences`; call generate with `return_dict_in_generate=True`.")
        batch_size = len(sequences)
        if target_sizes is None:
            raise ValueError("`target_sizes` is required: the (h, w) of each original image (e.g. `original_sizes`).")
        if hasattr(target_sizes, "tolist"):
            target_sizes = target_sizes.tolist()
        try:
            sizes = [tuple(int(v) for v in size) for size in target_sizes]
        except TypeError:  # e.g. one (h, w) pair instead of a list of them
            sizes = []
        per_sample = int(_get_output(outputs, "sequences_per_sample") or 1)  # `num_return_sequences` of generate
        if per_sample > 1 and len(sizes) * per_sample == batch_size:
            sizes = [size for size in sizes for _ in range(per_sample)]
        if len(sizes) != batch_size or any(len(size) != 2 or min(size) < 1 for size in sizes):
            raise ValueError(
                f"`target_sizes` must hold {batch_size} (h, w) pairs of positive ints, got {target_sizes!r}."
            )
        prompt_length = int(_get_output(outputs, "prompt_length") or 0)
        pred_masks = _per_sample(_get_output(outputs, "pred_masks"), batch_size, "pred_masks")
        pred_boxes = _per_sample(_get_output(outputs, "pred_boxes"), batch_size, "pred_boxes")
        box_scores = _per_sample(_get_output(outputs, "box_scores"), batch_size, "box_scores")

        results = []
        for index, (height, width) in enumerate(sizes):
            boxes, scores = pred_boxes[index], box_scores[index]
            if boxes is not None and scores is None and len(boxes):
                raise ValueError(f"`outputs` has pred_boxes but no box_scores for sample {index}.")
            scores = torch.zeros(0) if scores is None else torch.as_tensor(scores).detach().cpu().float().flatten()
            results.append(
                {
                    "text": self.decode_answer(sequences[index][prompt_length:]),
                    "masks": self.post_process_masks(pred_masks[index], height, width) > LOGIT_THRESHOLD,
                    "boxes": boxes_to_original(boxes, height, width, self.image_processor.prediction_frame),
                    "scores": scores,
                }
            )
        return results

    def post_process_masks(self, mask_logits, height: int, width: int) -> torch.Tensor:
        """(n, g, g) mask logits of one image, in the image processor's `prediction_frame` -> float32 (n, height,
        width) mask logits at the original size (a pixel is in the mask where its logit > 0)."""
        images = self.image_processor
        return masks_to_original(mask_logits, height, width, images.prediction_frame, images.dense_image_size)

    # ----------------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str = "tiny", **config_overrides) -> "VSMProcessor":
        """The processor of a preset, built offline. Only `"tiny"` can be (its tokenizer is trained
        here); the real presets' processors come from their checkpoints (`from_components`)."""
        if name != "tiny":
            raise ValueError(
                f"Only the 'tiny' preset's processor can be built offline, got {name!r}; build the others from "
                "their pretrained checkpoints (VSMForCausalLM.from_components)."
            )
        config = VSMConfig.from_preset(name, **config_overrides)
        image_processor = VSMImageProcessor(
            image_size=config.vision_config.image_size,
            image_mean=SIGLIP_MEAN,
            image_std=SIGLIP_STD,
            **dense_view_settings(config),
        )
        tokenizer = build_tiny_tokenizer()
        return cls(image_processor=image_processor, tokenizer=tokenizer, num_image_tokens=config.num_image_tokens)

    @classmethod
    def from_components(cls, vlm, sam=None, detector=None, dense_feature_source: str = "shared",
                        **config_overrides) -> "VSMProcessor":
        """The processor of `VSMForCausalLM.from_components(vlm=..., sam=..., detector=..., ...)`.

        Reuses the VLM's own tokenizer (with `<SEG>` / `<loc>` added, as the model's `from_components` adds
        them: same ids), chat template, image token (and Janus-Pro's image start / end tokens) and its image
        processor's normalisation and resampling, at the vision tower's size on the VSM frame (longest side
        resized, padded bottom / right, so masks map back to the original). The dense view for "sam" /
        "detector" follows SAM's / OWL-ViT's normalisation at their encoders' sizes.

        Args:
            vlm: Hub id or folder of a Janus-Pro or LLaVA checkpoint with its processor.
            sam, detector: Hub ids or folders of the SAM / OWL-ViT checkpoints (their configs size the dense view;
                `None` takes SAM ViT-B's / OWL-ViT B/16's shapes).
        """
        from transformers import AutoConfig, AutoProcessor

        vlm_config = AutoConfig.from_pretrained(vlm)
        sam_config = AutoConfig.from_pretrained(sam) if sam is not None else VSMConfig.from_preset("janus-pro-1b").sam_config
        detector_config = AutoConfig.from_pretrained(detector) if detector is not None else None
        # Check the parts fit together first (raises naming both sides).
        VSMConfig.from_component_configs(vlm_config, sam_config, detector_config, dense_feature_source, **config_overrides)
        vlm_processor = AutoProcessor.from_pretrained(vlm)
        tokenizer = vlm_processor.tokenizer
        seg_token_index, loc_token_index = add_vsm_tokens(tokenizer)
        config = VSMConfig.from_component_configs(
            vlm_config, sam_config, detector_config, dense_feature_source, seg_token_index, loc_token_index,
            **config_overrides,
        )
        vlm_images = vlm_processor.image_processor
        image_processor = VSMImageProcessor(
            image_size=config.vision_config.image_size,
            image_mean=vlm_images.image_mean,
            image_std=vlm_images.image_std,
            resample=int(getattr(vlm_images, "resample", None) or DEFAULT_RESAMPLE),
            **dense_view_settings(config),
        )
        return cls(
            image_processor=image_processor,
            tokenizer=tokenizer,
            chat_template=getattr(vlm_processor, "chat_template", None) or tokenizer.chat_template,
            num_image_tokens=config.num_image_tokens,
            image_token=tokenizer.convert_ids_to_tokens(config.image_token_index),
            image_start_token=getattr(vlm_processor, "image_start_token", None),
            image_end_token=getattr(vlm_processor, "image_end_token", None),
        )

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """Save the processor, copy this module and `configuration_vsm.py` next to it, and write the
        `auto_map` so that `AutoProcessor.from_pretrained(folder, trust_remote_code=True)` works where
        this project is not installed."""
        push_keys = ("repo_id", "commit_message", "token", "private")
        push_kwargs = {key: kwargs.pop(key) for key in push_keys if key in kwargs}
        files = super().save_pretrained(save_directory, push_to_hub=False, **kwargs)
        export_processor_remote_code(save_directory)
        if push_to_hub:
            repo_id = push_kwargs.pop("repo_id", os.path.basename(os.path.normpath(str(save_directory))))
            self.push_to_hub(repo_id, **push_kwargs)
        return files


def dense_view_settings(config) -> dict:
    """Image processor arguments of the dense view a config needs: SAM at its encoder size with
    ImageNet normalisation, OWL-ViT with CLIP's; none for the single-encoder sources."""
    source = config.dense_feature_source
    if source == "sam":
        return {
            "dense_image_size": config.sam_config.vision_config.image_size,
            "dense_image_mean": IMAGENET_MEAN,
            "dense_image_std": IMAGENET_STD,
        }
    if source == "detector":
        return {
            "dense_image_size": config.detector_config.vision_config.image_size,
            "dense_image_mean": CLIP_MEAN,
            "dense_image_std": CLIP_STD,
        }
    return {}


def _get_output(outputs, name: str):
    if isinstance(outputs, dict):
        return outputs.get(name)
    return getattr(outputs, name, None)


def _per_sample(values, batch_size: int, name: str) -> list:
    if values is None:
        return [None] * batch_size
    if len(values) != batch_size:
        raise ValueError(f"`outputs.{name}` has {len(values)} entries for {batch_size} sequences.")
    return list(values)


def masks_to_original(mask_logits, height: int, width: int, prediction_frame: str = "frame",
                      dense_image_size: int | None = None) -> torch.Tensor:
    """(n, g, g) mask logits -> float32 (n, height, width) mask logits of the original image (bilinear, in float32).

    `prediction_frame` (`PREDICTION_FRAMES`): "frame" resizes to (L, L), L = max(height, width), and crops
    [:height, :width]; "sam" resizes to (S, S), S = `dense_image_size`, crops the resized image and resizes that to
    the original (Meta's `Sam.postprocess_masks`); "stretch" resizes straight to (height, width).
    """
    if mask_logits is None or len(mask_logits) == 0:
        return torch.zeros((0, height, width), dtype=torch.float32)
    logits = torch.as_tensor(mask_logits).detach().float().cpu()
    if logits.ndim == 2:
        logits = logits[None]
    logits = logits[:, None]  # (n, 1, g, g)

    def resize(values, size):
        return F.interpolate(values, size=size, mode="bilinear", align_corners=False)

    if prediction_frame == "stretch":
        return resize(logits, (height, width))[:, 0]
    if prediction_frame == "sam":
        if dense_image_size is None:
            raise ValueError("prediction_frame='sam' needs the dense view's size (`dense_image_size`).")
        resized_height, resized_width = resized_longest_side(height, width, dense_image_size)
        upscaled = resize(logits, (dense_image_size, dense_image_size))[..., :resized_height, :resized_width]
        return resize(upscaled, (height, width))[:, 0]
    side = max(height, width)
    return resize(logits, (side, side))[:, 0, :height, :width]  # (n, height, width)


def boxes_to_original(boxes, height: int, width: int, prediction_frame: str = "frame") -> torch.Tensor:
    """(m, 4) cxcywh boxes normalised to the prediction frame -> float (m, 4) xyxy in original pixels: times L =
    max(height, width) on the square frame, times (width, height) on the stretched square ("stretch")."""
    if boxes is None or len(boxes) == 0:
        return torch.zeros((0, 4), dtype=torch.float32)
    cxcywh = torch.as_tensor(boxes).detach().float().cpu().reshape(-1, 4)
    center, size = cxcywh[:, :2], cxcywh[:, 2:]
    if prediction_frame == "stretch":
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    else:
        scale = float(max(height, width))
    xyxy = torch.cat([center - size / 2, center + size / 2], dim=-1) * scale
    upper = torch.tensor([width, height, width, height], dtype=torch.float32)
    return torch.minimum(xyxy.clamp(min=0), upper)


# ============================================================================================
# Remote-code export
# ============================================================================================

PROCESSOR_AUTO_MAP = {
    "AutoProcessor": "processing_vsm.VSMProcessor",
    "AutoImageProcessor": "processing_vsm.VSMImageProcessor",
}
PROCESSOR_MODULES = ("configuration_vsm", "processing_vsm")


def export_processor_remote_code(save_directory) -> None:
    """Copies `processing_vsm.py` and `configuration_vsm.py` flat into `save_directory` and writes the
    `AutoProcessor` / `AutoImageProcessor` auto_map into its processor_config.json (transformers 5.x
    nests the image processor there, and `AutoImageProcessor` reads the nested dict)."""
    export_remote_code(save_directory, __file__, PROCESSOR_MODULES, "processor_config.json", PROCESSOR_AUTO_MAP,
                       nested_auto_maps={"image_processor": {"AutoImageProcessor": PROCESSOR_AUTO_MAP["AutoImageProcessor"]}})


__all__ = [
    "VSMImageProcessor",
    "VSMProcessor",
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
