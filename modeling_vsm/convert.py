"""Published LISA and SEAL (V*) checkpoints -> VSM folders (`vsm convert`).

The originals are LLaVA-v1 checkpoints written by transformers 4.31 with `model_type: "llava"`, a name current
transformers gives to its own, different LLaVA: they are read here as published, `config.json` as plain JSON,
weights from `pytorch_model-*.bin` shards (`torch.load(..., weights_only=True)`) or safetensors, the tokenizer
from its sentencepiece model and added tokens. What they hold (LISA's `model/LISA.py`, SEAL's
`VisualSearch/model/VSM.py`, both on LLaVA-v1's `llava_arch.py`):

- both: a Llama (`model.embed_tokens`, `model.layers.N`, `model.norm`, `lm_head`) and its projector
  `model.mm_projector` (one Linear; LLaVA-1.5's `.0` / `.2` with GELU for LISA++). NOT the CLIP tower: it comes from
  `--vision-tower` (`mm_vision_tower`, layer -2 patch features without CLS).
- LISA: Meta's SAM under `model.visual_model.{image_encoder,prompt_encoder,mask_decoder}` (the VSM's "sam" dense
  source) and `model.text_hidden_fcs.0` (`<SEG>` -> SAM prompt). Token `[SEG]`.
- SEAL: OWL-ViT's vision model and heads under `model.owlvit.{vision_model,class_head,box_head,layer_norm}` (the
  "detector" source), `model.visual_projection` (768 -> 256, no bias), a SAM prompt encoder and a mask decoder
  with bilinear upscaling (`model.prompt_encoder`, `model.mask_decoder`) on the 48x48 OWL-ViT grid, and
  `model.text_hidden_fcs_{det,seg}.0`. Token `[LOC]` gives both a box and a mask.

Every source key is used exactly once (or named as dropped: RoPE's `inv_freq` buffers), every VSM weight is filled,
or the conversion stops with an error naming the keys. The result is written to a temporary folder beside the
output and renamed at the end: nothing half-written is left behind.
"""

import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from configuration_vsm import VSMConfig
from configuration_vsm.configuration_vsm import export_remote_code
from processing_vsm.processing_vsm import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD

from . import modeling_vsm as modeling_module
from .modeling_vsm import MODEL_AUTO_MAP, REMOTE_CODE_MODULES, VSMForCausalLM

SOURCES = ("lisa", "seal")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
WEIGHT_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
MAX_SHARD_BYTES = 4 * 2**30
# Modules kept in float32 whatever `--dtype` says (mask decoding in fp32: LISA's masks overflowed in bf16).
FLOAT32_PREFIXES = ("prompt_encoder.", "mask_decoder.")

IMAGE_START, IMAGE_END = "<im_start>", "<im_end>"
SEG_TOKEN = {"lisa": "[SEG]", "seal": "[LOC]"}
NEW_IMAGE_TOKEN = "<image>"  # stands for the image positions (LLaVA-v1 wrote -200 there)
LLAVA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
# LLaVA-v1's conversation (`conv_llava_v1`, separator style TWO): "{system} ", then "USER: {text} " and
# "ASSISTANT: {answer}</s>" turns; a generation prompt ends with "ASSISTANT:". IMAGE_TOKEN is replaced by the token.
LLAVA_V1_CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set messages = messages[1:] -%}"
    "{%- else -%}{%- set system = '" + LLAVA_V1_SYSTEM.replace("'", "\\'") + "' -%}{%- endif -%}"
    "{{- system ~ ' ' -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{- 'USER: ' -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- 'ASSISTANT: ' -}}"
    "{%- else -%}{{- raise_exception('Unknown chat role: ' ~ message['role']) -}}{%- endif -%}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}{%- elif part['type'] == 'image' -%}{{- 'IMAGE_TOKEN' -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{{- eos_token -}}{%- else -%}{{- ' ' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)

# Source prefix -> VSM prefix, first match wins (None: dropped on purpose).
LLAMA_PREFIXES = (
    ("model.embed_tokens.", "model.language_model.embed_tokens."),
    ("model.layers.", "model.language_model.layers."),
    ("model.norm.", "model.language_model.norm."),
    ("lm_head.", "lm_head."),
)
PROJECTOR_PREFIXES = (
    ("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),  # LLaVA-1.5's mlp2x_gelu (LISA++)
    ("model.mm_projector.2.", "model.multi_modal_projector.linear_2."),
    ("model.mm_projector.", "model.multi_modal_projector.linear_1."),  # LLaVA-v1's single Linear
)
SOURCE_PREFIXES = {
    "lisa": LLAMA_PREFIXES + PROJECTOR_PREFIXES + (
        ("model.visual_model.image_encoder.", "dense_encoder.vision_encoder."),
        ("model.visual_model.prompt_encoder.", "prompt_encoder."),
        ("model.visual_model.mask_decoder.", "mask_decoder."),
        ("model.text_hidden_fcs.0.", "text_hidden_fcs_seg."),
    ),
    "seal": LLAMA_PREFIXES + PROJECTOR_PREFIXES + (
        ("model.owlvit.vision_model.", "dense_encoder.vision_model.vision_model."),
        ("model.owlvit.layer_norm.", "dense_encoder.layer_norm."),
        ("model.owlvit.class_head.", "class_head."),
        ("model.owlvit.box_head.", "box_head."),
        ("model.visual_projection.", "detector_to_dense.0."),
        ("model.prompt_encoder.", "prompt_encoder."),
        ("model.mask_decoder.", "mask_decoder."),
        ("model.text_hidden_fcs_det.0.", "text_hidden_fcs_det."),
        ("model.text_hidden_fcs_seg.0.", "text_hidden_fcs_seg."),
    ),
}
# Keys each source must have (one per part), to tell a LISA folder from a SEAL folder from anything else.
REQUIRED_KEYS = {
    "lisa": ("model.embed_tokens.weight", "lm_head.weight", "model.visual_model.image_encoder.pos_embed",
             "model.visual_model.mask_decoder.iou_token.weight", "model.text_hidden_fcs.0.2.weight"),
    "seal": ("model.embed_tokens.weight", "lm_head.weight", "model.owlvit.vision_model.embeddings.class_embedding",
             "model.owlvit.class_head.dense0.weight", "model.visual_projection.weight",
             "model.mask_decoder.iou_token.weight", "model.text_hidden_fcs_det.0.2.weight"),
}
# Buffers that transformers 4.31 saved and that current models recompute: recognised, then dropped.
DROPPED_SUFFIXES = (".rotary_emb.inv_freq", ".embeddings.position_ids")
# Meta's segment-anything names -> transformers' SamModel names (after the source prefix), in order.
META_SAM_RENAMES = (
    (r"^patch_embed\.proj\.", "patch_embed.projection."),
    (r"^blocks\.", "layers."),
    (r"\.norm(\d)\.", r".layer_norm\1."),
    (r"^neck\.0\.", "neck.conv1."),
    (r"^neck\.1\.", "neck.layer_norm1."),
    (r"^neck\.2\.", "neck.conv2."),
    (r"^neck\.3\.", "neck.layer_norm2."),
    (r"^pe_layer\.positional_encoding_gaussian_matrix$", "shared_embedding.positional_embedding"),
    (r"^point_embeddings\.", "point_embed."),
    (r"^mask_downscaling\.0\.", "mask_embed.conv1."),
    (r"^mask_downscaling\.1\.", "mask_embed.layer_norm1."),
    (r"^mask_downscaling\.3\.", "mask_embed.conv2."),
    (r"^mask_downscaling\.4\.", "mask_embed.layer_norm2."),
    (r"^mask_downscaling\.6\.", "mask_embed.conv3."),
    (r"^transformer\.norm_final_attn\.", "transformer.layer_norm_final_attn."),
    (r"^output_upscaling\.0\.", "upscale_conv1."),  # SEAL's bilinear `Upsample`s keep their inner `.conv.`
    (r"^output_upscaling\.1\.", "upscale_layer_norm."),
    (r"^output_upscaling\.3\.", "upscale_conv2."),
)
TOWER_PREFIX = "model.vision_tower."  # where the CLIPVisionModel's keys go
META_SAM_PREFIXES = ("dense_encoder.vision_encoder.", "prompt_encoder.", "mask_decoder.")
MLP_LAYER = re.compile(r"^(mask_decoder\.(?:output_hypernetworks_mlps\.\d+|iou_prediction_head))\.layers\.(\d+)\.(.*)$")
# Architecture constants the originals hard-code (not recoverable from weight shapes).
SAM_DECODER_HEADS = 8  # segment_anything's TwoWayTransformer(num_heads=8), LISA and SEAL alike
SAM_DECODER_LAYER_NORM_EPS = 1e-5  # its nn.LayerNorm default (transformers' SAM config says 1e-6)
OWLVIT_HEAD_SIZE = 64  # OWL-ViT's attention heads are 64 wide (B/32, B/16: 12 heads of 64)


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message names the problem (one line)."""


@dataclass
class OriginalCheckpoint:
    """A published folder, read: its config.json (plain JSON), weight files and every key's shape."""

    folder: Path
    config: dict
    weight_files: list
    shapes: dict = field(default_factory=dict)  # key -> shape


# ----------------------------------------------------------------------------------------------
# Reading the original
# ----------------------------------------------------------------------------------------------


def resolve_folder(name_or_path, what: str, allow_patterns=None) -> Path:
    """A local folder, or a Hub id downloaded to the cache (`huggingface_hub.snapshot_download`)."""
    path = Path(str(name_or_path)).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ConversionError(f"The {what} {str(name_or_path)!r} is a file, not a folder.")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", str(name_or_path)):
        raise ConversionError(f"The {what} {str(name_or_path)!r} is neither a local folder nor a Hub id (org/name).")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(name_or_path), allow_patterns=allow_patterns))
    except Exception as error:  # offline, unknown repo, gated, ...
        raise ConversionError(f"The {what} {str(name_or_path)!r} is not a local folder and could not be downloaded "
                              f"from the Hub ({type(error).__name__}: {str(error).splitlines()[0][:200]}).") from None


def find_weight_files(folder: Path) -> list:
    """The weight files of a folder: the shards its index lists (all must exist), or its single file."""
    for index_name in WEIGHT_INDEX_FILES:
        index_path = folder / index_name
        if index_path.is_file():
            weight_map = json.loads(index_path.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
            missing = [name for name in files if not (folder / name).is_file()]
            if missing:
                raise ConversionError(f"{index_path} lists shards that are not in {folder}: {missing}.")
            return [folder / name for name in files]
    for name in SINGLE_WEIGHT_FILES:
        if (folder / name).is_file():
            return [folder / name]
    raise ConversionError(f"{folder} holds no weights: expected an index ({', '.join(WEIGHT_INDEX_FILES)}) with its "
                          f"shards, or {' or '.join(SINGLE_WEIGHT_FILES)}.")


def iter_weights(path: Path):
    """(key, tensor) of one weight file. `.bin` files are read with `weights_only=True` (nothing else is
    unpickled), memory-mapped where their format allows."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                yield key, handle.get_tensor(key)
        return
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # a legacy (non-zip) file cannot be memory-mapped
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ConversionError(f"Cannot read {path} as a weights-only checkpoint: {str(error).splitlines()[0][:200]}") from None
    yield from state.items()


def read_checkpoint(folder: Path) -> OriginalCheckpoint:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ConversionError(f"{folder} has no config.json.")
    config = json.loads(config_path.read_text())  # never AutoConfig: "llava" resolves to another class
    checkpoint = OriginalCheckpoint(folder, config, find_weight_files(folder))
    for path in checkpoint.weight_files:
        checkpoint.shapes.update(weight_shapes(path))
    return checkpoint


def weight_shapes(path: Path) -> dict:
    """key -> shape of one weight file, without reading the weights (safetensors' header; a memory-mapped `.bin`)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    return {key: tuple(tensor.shape) for key, tensor in iter_weights(path)}


# ----------------------------------------------------------------------------------------------
# Key maps
# ----------------------------------------------------------------------------------------------


def check_layout(source: str, shapes: dict) -> None:
    """Raises naming the missing or unknown keys when the weights are not the `source` layout."""
    missing = [key for key in REQUIRED_KEYS[source] if key not in shapes]
    if missing:
        others = [name for name in SOURCES if name != source and all(key in shapes for key in REQUIRED_KEYS[name])]
        hint = f" It looks like a {others[0].upper()} checkpoint: use --from {others[0]}." if others else ""
        raise ConversionError(f"Not a {source.upper()} checkpoint: missing {missing}.{hint}")
    unknown = sorted(key for key in shapes if vsm_key(source, key, shapes) is None and not key.endswith(DROPPED_SUFFIXES))
    if unknown:
        raise ConversionError(f"Not a {source.upper()} checkpoint: {len(unknown)} unknown keys, e.g. {unknown[:5]}.")


def vsm_key(source: str, key: str, shapes: dict) -> str | None:
    """The VSM key of a source key, or None when no rule places it."""
    if key.endswith(DROPPED_SUFFIXES):
        return None
    rule = next(((prefix, new) for prefix, new in SOURCE_PREFIXES[source] if key.startswith(prefix)), None)
    if rule is None:
        return None
    prefix, new_prefix = rule
    new_key = new_prefix + key[len(prefix):]
    sam_prefix = next((p for p in META_SAM_PREFIXES if new_key.startswith(p)), None)
    if sam_prefix is not None:
        rest = new_key[len(sam_prefix):]
        for pattern, replacement in META_SAM_RENAMES:
            rest = re.sub(pattern, replacement, rest)
        new_key = sam_prefix + rest
        new_key = _sam_mlp_key(new_key, source, shapes)
    return new_key


def _sam_mlp_key(key: str, source: str, shapes: dict) -> str:
    """Meta's `MLP.layers.{0..n-1}` -> transformers' `SamFeedForward` (`proj_in`, `layers.{0..n-3}`, `proj_out`)."""
    match = MLP_LAYER.match(key)
    if match is None:
        return key
    mlp, index, rest = match.group(1), int(match.group(2)), match.group(3)
    source_mlp = {"lisa": "model.visual_model.", "seal": "model."}[source] + mlp + ".layers."
    depth = 1 + max(int(k[len(source_mlp):].split(".")[0]) for k in shapes if k.startswith(source_mlp))
    name = "proj_in" if index == 0 else "proj_out" if index == depth - 1 else f"layers.{index - 1}"
    return f"{mlp}.{name}.{rest}"


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


def text_config(original: dict, vocab_size: int) -> dict:
    """The Llama of a LLaVA-v1 config.json."""
    return {
        "model_type": "llama",
        "hidden_size": original["hidden_size"],
        "intermediate_size": original["intermediate_size"],
        "num_hidden_layers": original["num_hidden_layers"],
        "num_attention_heads": original["num_attention_heads"],
        "num_key_value_heads": original.get("num_key_value_heads", original["num_attention_heads"]),
        "hidden_act": original.get("hidden_act", "silu"),
        "max_position_embeddings": original.get("max_position_embeddings", 2048),
        "rms_norm_eps": original.get("rms_norm_eps", 1e-6),
        "rope_theta": original.get("rope_theta", 10000.0),
        "vocab_size": vocab_size,
        "pad_token_id": original.get("pad_token_id", 0),
        "bos_token_id": original.get("bos_token_id", 1),
        "eos_token_id": original.get("eos_token_id", 2),
        "tie_word_embeddings": bool(original.get("tie_word_embeddings", False)),
    }


def sam_config(shapes: dict, encoder_prefix: str | None, prompt_prefix: str, decoder_prefix: str,
               prompt_image_size: int | None = None) -> dict:
    """A `SamConfig` from the shapes of Meta-named SAM weights (ViT-H, -L or -B; SEAL's decoder-only SAM with
    `encoder_prefix=None` and its prompt grid of `prompt_image_size` pixels)."""
    gaussian = shapes[prompt_prefix + "pe_layer.positional_encoding_gaussian_matrix"]  # (2, num_pos_feats)
    width = shapes[prompt_prefix + "no_mask_embed.weight"][1]
    vision = {"num_pos_feats": gaussian[1], "output_channels": width}
    patch_size = 16
    if encoder_prefix is not None:
        _, grid, _, hidden = shapes[encoder_prefix + "pos_embed"]
        patch_size = shapes[encoder_prefix + "patch_embed.proj.weight"][-1]
        depth = _count(shapes, encoder_prefix + "blocks.")
        rel_pos = [shapes[f"{encoder_prefix}blocks.{i}.attn.rel_pos_h"] for i in range(depth)]  # (2 * side - 1, head)
        sides = [(rows + 1) // 2 for rows, _ in rel_pos]
        window_sizes = {side for side in sides if side != grid}
        vision.update(
            hidden_size=hidden, num_hidden_layers=depth, num_attention_heads=hidden // rel_pos[0][1],
            image_size=grid * patch_size, patch_size=patch_size,
            mlp_dim=shapes[encoder_prefix + "blocks.0.mlp.lin1.weight"][0],
            output_channels=shapes[encoder_prefix + "neck.0.weight"][0],
            qkv_bias=encoder_prefix + "blocks.0.attn.qkv.bias" in shapes,
            global_attn_indexes=[i for i, side in enumerate(sides) if side == grid],
            window_size=window_sizes.pop() if window_sizes else 0,
        )
        prompt_image_size = grid * patch_size
    decoder_layers = _count(shapes, decoder_prefix + "transformer.layers.")
    cross_width = shapes[decoder_prefix + "transformer.layers.0.cross_attn_token_to_image.q_proj.weight"][0]
    return {
        "model_type": "sam",
        "vision_config": vision,
        "prompt_encoder_config": {
            "hidden_size": width, "image_size": prompt_image_size, "patch_size": patch_size,
            "mask_input_channels": shapes[prompt_prefix + "mask_downscaling.6.weight"][1],
            "num_point_embeddings": _count(shapes, prompt_prefix + "point_embeddings."),
        },
        "mask_decoder_config": {
            "hidden_size": width,
            "mlp_dim": shapes[decoder_prefix + "transformer.layers.0.mlp.lin1.weight"][0],
            "num_hidden_layers": decoder_layers,
            "num_attention_heads": SAM_DECODER_HEADS,
            "attention_downsample_rate": width // cross_width,
            "num_multimask_outputs": shapes[decoder_prefix + "mask_tokens.weight"][0] - 1,
            "iou_head_depth": _count(shapes, decoder_prefix + "iou_prediction_head.layers."),
            "iou_head_hidden_dim": shapes[decoder_prefix + "iou_prediction_head.layers.0.weight"][0],
            "layer_norm_eps": SAM_DECODER_LAYER_NORM_EPS,
        },
    }


def owlvit_config(shapes: dict, prefix: str = "model.owlvit.") -> dict:
    """An `OwlViTConfig` from the shapes of SEAL's OWL-ViT weights (its vision model and heads; the text tower is
    not in the checkpoint, only its width, the `<loc>` query's, matters)."""
    vision = prefix + "vision_model."
    hidden = shapes[vision + "embeddings.class_embedding"][0]
    patch_size = shapes[vision + "embeddings.patch_embedding.weight"][-1]
    grid = math.isqrt(shapes[vision + "embeddings.position_embedding.weight"][0] - 1)
    query_size = shapes[prefix + "class_head.dense0.weight"][0]
    return {
        "model_type": "owlvit",
        "vision_config": {
            "hidden_size": hidden, "intermediate_size": shapes[vision + "encoder.layers.0.mlp.fc1.weight"][0],
            "num_hidden_layers": _count(shapes, vision + "encoder.layers."),
            "num_attention_heads": max(1, hidden // OWLVIT_HEAD_SIZE), "image_size": grid * patch_size,
            "patch_size": patch_size,
        },
        "text_config": {"hidden_size": query_size, "intermediate_size": 4 * query_size, "num_hidden_layers": 1,
                        "num_attention_heads": 1},
        "projection_dim": query_size,
    }


def _count(shapes: dict, prefix: str) -> int:
    """How many numbered children `prefix{0,1,...}.` the keys have."""
    return len({key[len(prefix):].split(".")[0] for key in shapes if key.startswith(prefix)})


# ----------------------------------------------------------------------------------------------
# The vision tower and the tokenizer
# ----------------------------------------------------------------------------------------------


def read_vision_tower(name_or_path, mm_hidden_size: int):
    """The CLIP tower (`CLIPVisionModel`, from a CLIPModel or CLIPVisionModel checkpoint) and its folder; its width
    must be the projector's input."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    folder = resolve_folder(name_or_path, "vision tower",
                            allow_patterns=["*.json", "*.safetensors", "pytorch_model*.bin"])
    try:
        vision = CLIPVisionConfig.from_pretrained(folder)
    except Exception as error:
        raise ConversionError(f"The vision tower {str(name_or_path)!r} has no CLIP config: {str(error).splitlines()[0][:200]}") from None
    if vision.hidden_size != mm_hidden_size:
        raise ConversionError(f"The vision tower {str(name_or_path)!r} is {vision.hidden_size} wide, but the checkpoint's "
                              f"projector reads {mm_hidden_size} (mm_hidden_size): pass the tower it was trained with.")
    from transformers.utils import logging as transformers_logging

    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # a CLIPModel checkpoint's text side is listed as unexpected: dropped on purpose
    try:
        tower = CLIPVisionModel.from_pretrained(folder, dtype=torch.float32)
    except Exception as error:
        raise ConversionError(f"Cannot load the vision tower {str(name_or_path)!r}: {str(error).splitlines()[0][:200]}") from None
    finally:
        transformers_logging.set_verbosity(verbosity)
    return folder, tower


def tower_weights(tower) -> dict:
    """VSM key -> tensor of the CLIP tower's weights."""
    return {TOWER_PREFIX + key: value for key, value in tower.state_dict().items()}


def read_tokenizer(folder: Path, seg_token: str):
    """The checkpoint's tokenizer, with every id it had, as a fast tokenizer that gives the original's ids; `<image>`
    (the image positions' placeholder, LLaVA-v1's -200) comes after the checkpoint's ids: never embedded (image
    features replace it) nor generated, so the LM keeps the original's rows.

    A folder with transformers 4.31's files (`tokenizer.model`, `added_tokens.json`) gets 4.31's tokenization
    ([`llava_v1_tokenizer`]); a folder with a `tokenizer.json` alone keeps that file's."""
    from transformers import AddedToken, PreTrainedTokenizerFast

    from .convert_tokenizer import llava_v1_tokenizer

    try:
        if (folder / "tokenizer.model").is_file():
            tokenizer = llava_v1_tokenizer(folder, image_token=NEW_IMAGE_TOKEN)
        elif (folder / "tokenizer.json").is_file():
            tokenizer = PreTrainedTokenizerFast.from_pretrained(folder, padding_side="left")
            if NEW_IMAGE_TOKEN in tokenizer.get_vocab():
                raise ValueError(f"it already has a {NEW_IMAGE_TOKEN} token, which VSM adds for the image positions")
            tokenizer.add_tokens([AddedToken(NEW_IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
        else:
            raise ValueError("it has neither tokenizer.model (with added_tokens.json) nor tokenizer.json")
    except (OSError, ValueError) as error:
        raise ConversionError(f"Cannot read the tokenizer in {folder}: {str(error).splitlines()[0][:200]}") from None
    if seg_token not in tokenizer.get_vocab():
        raise ConversionError(f"The tokenizer in {folder} has no {seg_token} token: is this the fine-tuned checkpoint's folder?")
    return tokenizer


# ----------------------------------------------------------------------------------------------
# Conversion
# ----------------------------------------------------------------------------------------------


def convert(source: str, checkpoint, output_dir, vision_tower=None, dtype: str = "float32") -> Path:
    """Converts a published LISA or SEAL checkpoint into a VSM folder and returns its path.

    Args:
        source: `"lisa"` (LISA-7B-v1, -explanatory, LISA-13B-llama2-v1, LISA++) or `"seal"` (SEAL's seal_vsm_7b).
        checkpoint: the original folder, or its Hub id.
        output_dir: where the VSM goes; it must not exist or be empty.
        vision_tower: the CLIP tower's folder or Hub id (default: the checkpoint's `mm_vision_tower`); its width must
            be the checkpoint's `mm_hidden_size`.
        dtype: `"float32"` or `"bfloat16"` for the saved weights (SAM's prompt encoder and mask decoder stay float32).

    Raises a `ConversionError` naming the problem; then nothing is left in `output_dir`.
    """
    if source not in SOURCES:
        raise ConversionError(f"--from must be one of {list(SOURCES)}, got {source!r}.")
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype must be one of {list(DTYPES)}, got {dtype!r}.")
    output_dir = Path(output_dir)
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise ConversionError(f"The output folder {output_dir} exists and is not empty: choose a new one.")
    folder = resolve_folder(checkpoint, "checkpoint")
    original = read_checkpoint(folder)
    check_layout(source, original.shapes)
    tower_name = vision_tower or original.config.get("mm_vision_tower") or original.config.get("vision_tower")
    if not tower_name:
        raise ConversionError("The checkpoint's config.json names no vision tower (mm_vision_tower): pass --vision-tower.")
    tower_folder, tower = read_vision_tower(tower_name, original.config.get("mm_hidden_size", 1024))
    tokenizer = read_tokenizer(folder, SEG_TOKEN[source])
    tokenizer.model_max_length = original.config.get("max_position_embeddings", tokenizer.model_max_length)
    image_token = NEW_IMAGE_TOKEN
    config = build_config(source, original.config, original.shapes, tower.config,
                          tokenizer.convert_tokens_to_ids(image_token), tokenizer.convert_tokens_to_ids(SEG_TOKEN[source]))
    tower_state = tower_weights(tower)
    plan = plan_weights(source, original.shapes, config, {key: tuple(v.shape) for key, v in tower_state.items()})

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        write_weights(staging, plan, original, tower_state, DTYPES[dtype])
        config.converted_from = {"source": source, "checkpoint": str(checkpoint), "vision_tower": str(tower_name),
                                 "license": source_license(folder) or "other"}
        config.base_models = {"vlm": str(checkpoint), "sam": str(checkpoint),
                              "detector": str(checkpoint) if source == "seal" else None}
        config.save_pretrained(staging)
        export_remote_code(staging, modeling_module.__file__, REMOTE_CODE_MODULES, "config.json", MODEL_AUTO_MAP)
        write_generation_config(staging, config)
        build_processor(source, original, tokenizer, image_token, config, tower_folder).save_pretrained(staging)
        write_model_card(staging, config, output_dir.name)
        if output_dir.exists():
            output_dir.rmdir()  # empty, checked above
        os.replace(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output_dir


def build_config(source: str, original_config: dict, shapes: dict, vision_config, image_token_index: int,
                 seg_token_index: int) -> VSMConfig:
    """The VSM config of a checkpoint: the Llama from its config.json, SAM's and OWL-ViT's sizes from its weights'
    shapes, the CLIP tower's config, and the ids of `<image>` and `[SEG]` / `[LOC]`."""
    select_feature = original_config.get("mm_vision_select_feature", "patch")
    common = {
        "text_config": text_config(original_config, shapes["model.embed_tokens.weight"][0]),
        "vision_config": vision_config.to_dict(),
        "image_token_index": image_token_index,
        "seg_token_index": seg_token_index,
        "vision_feature_layer": original_config.get("mm_vision_select_layer", -2),
        "vision_feature_select_strategy": "default" if select_feature == "patch" else "full",
        "projector_type": "mlp" if "model.mm_projector.2.weight" in shapes else "linear",
        "projector_hidden_act": "gelu",
        "tie_word_embeddings": bool(original_config.get("tie_word_embeddings", False)),
    }
    if source == "lisa":
        sam = sam_config(shapes, "model.visual_model.image_encoder.", "model.visual_model.prompt_encoder.",
                         "model.visual_model.mask_decoder.")
        return VSMConfig(**common, sam_config=sam, dense_feature_source="sam", loc_token_index=None)
    detector = owlvit_config(shapes)
    sam = sam_config(shapes, None, "model.prompt_encoder.", "model.mask_decoder.",
                     prompt_image_size=detector["vision_config"]["image_size"])
    return VSMConfig(**common, sam_config=sam, detector_config=detector, dense_feature_source="detector",
                     loc_token_index=seg_token_index, dense_projection_type="linear", mask_upscaling="bilinear_conv")


@dataclass
class WeightPlan:
    """Where each source key goes (`targets`: source key -> VSM key) and the VSM's keys and shapes (`expected`)."""

    targets: dict
    expected: dict


def plan_weights(source: str, shapes: dict, config: VSMConfig, vision_shapes: dict | None = None) -> WeightPlan:
    """Maps every source key (`shapes`: key -> shape) and checks the result against the VSM built on the meta device:
    each source key used once (or a named dropped buffer), each VSM weight filled once, the CLIP tower's from
    `--vision-tower` (`vision_shapes`: VSM key -> shape; checked here when given, else while writing)."""
    with torch.device("meta"):
        expected = {key: tuple(value.shape) for key, value in VSMForCausalLM(config).state_dict().items()}
    targets = {key: vsm_key(source, key, shapes) for key in shapes}
    targets = {key: target for key, target in targets.items() if target is not None}
    if vision_shapes is not None:  # the tower's weights, under their VSM keys
        shapes = {**shapes, **vision_shapes}
        targets.update({key: key for key in vision_shapes})
    filled, problems = {}, []
    for key, target in targets.items():
        if target in filled:
            problems.append(f"{key} and {filled[target]} both map to {target}")
        filled[target] = key
        if target not in expected:
            problems.append(f"{key} -> {target} has no place in the VSM")
        elif expected[target] != tuple(shapes[key]):
            problems.append(f"{key} {tuple(shapes[key])} -> {target} {expected[target]}")
    missing = [key for key in expected if key not in filled and (vision_shapes is not None or not key.startswith(TOWER_PREFIX))]
    if missing:
        problems.append(f"VSM weights no source key fills: {missing[:5]}")
    if problems:
        raise ConversionError(f"The {source.upper()} checkpoint does not map onto the VSM: {'; '.join(problems[:5])}.")
    return WeightPlan(targets, expected)


def write_weights(folder: Path, plan: WeightPlan, original: OriginalCheckpoint, tower_state: dict, dtype) -> None:
    """Streams the mapped weights into safetensors shards (one source shard in memory at a time) plus their index,
    then the CLIP tower's (`tower_state`: VSM key -> tensor)."""
    from safetensors.torch import save_file

    shards, current, current_bytes = [], {}, 0
    written = set()

    def flush():
        nonlocal current, current_bytes
        if current:
            name = f"model-{len(shards) + 1:05d}.safetensors"
            save_file(current, str(folder / name), metadata={"format": "pt"})
            shards.append((name, list(current)))
            current, current_bytes = {}, 0

    def add(key, tensor):
        nonlocal current_bytes
        target_dtype = torch.float32 if key.startswith(FLOAT32_PREFIXES) else dtype
        tensor = tensor.to(target_dtype) if tensor.is_floating_point() else tensor
        current[key] = tensor.contiguous()
        current_bytes += tensor.numel() * tensor.element_size()
        written.add(key)
        if current_bytes >= MAX_SHARD_BYTES:
            flush()

    for path in original.weight_files:
        for key, tensor in iter_weights(path):
            if key in plan.targets:
                add(plan.targets[key], tensor)
    for key, tensor in tower_state.items():
        add(key, tensor)
    flush()
    missing = [key for key in plan.expected if key not in written]
    if missing:  # the plan checked the keys: only a checkpoint changed while it was read gets here
        raise ConversionError(f"{len(missing)} VSM weights were not written, e.g. {missing[:5]}.")
    if len(shards) == 1:
        os.replace(folder / shards[0][0], folder / "model.safetensors")
        return
    total = sum((folder / name).stat().st_size for name, _ in shards)
    weight_map = {key: name for name, keys in shards for key in keys}
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_generation_config(folder: Path, config: VSMConfig) -> None:
    """The original's special ids; decoding keeps the KV cache (the originals re-ran the whole sequence at each step:
    the same tokens, slower)."""
    from transformers import GenerationConfig

    text = config.text_config
    GenerationConfig(bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id,
                     pad_token_id=text.pad_token_id).save_pretrained(folder)


def build_processor(source: str, original: OriginalCheckpoint, tokenizer, image_token: str, config: VSMConfig,
                    tower_folder: Path):
    """The original's two image views, its tokens and its `llava_v1` chat template (image before the question).

    LISA: the CLIP view is CLIP's centre crop; SAM's view is the longest side at 1024 (bilinear), ImageNet-normalised,
    padded bottom / right; masks are post-processed as Meta's SAM does. SEAL: the CLIP view is the image pasted
    top-left on a square of the mean colour; OWL-ViT's view is the image stretched to 768 x 768 (bicubic), and
    masks and boxes map back per axis."""
    from PIL import Image

    from processing_vsm import VSMImageProcessor, VSMProcessor

    clip = {"image_mean": CLIP_MEAN, "image_std": CLIP_STD, "resample": int(Image.Resampling.BICUBIC)}
    preprocessor_path = tower_folder / "preprocessor_config.json"
    if preprocessor_path.is_file():
        settings = json.loads(preprocessor_path.read_text())
        clip.update({key: settings[key] for key in clip if settings.get(key) is not None})
    if source == "lisa":
        views = {"image_view": "center_crop", "dense_image_size": config.sam_config.vision_config.image_size,
                 "dense_image_mean": IMAGENET_MEAN, "dense_image_std": IMAGENET_STD,
                 "dense_resample": int(Image.Resampling.BILINEAR), "dense_view": "frame", "prediction_frame": "sam"}
    else:
        views = {"image_view": "pad_square", "dense_image_size": config.detector_config.vision_config.image_size,
                 "dense_image_mean": CLIP_MEAN, "dense_image_std": CLIP_STD,
                 "dense_resample": int(Image.Resampling.BICUBIC), "dense_view": "stretch", "prediction_frame": "stretch"}
    image_processor = VSMImageProcessor(image_size=config.vision_config.image_size, **clip, **views)
    start_end = bool(original.config.get("mm_use_im_start_end", False))
    return VSMProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=LLAVA_V1_CHAT_TEMPLATE.replace("IMAGE_TOKEN", image_token),
        num_image_tokens=config.num_image_tokens,
        image_token=image_token,
        seg_token=SEG_TOKEN[source],
        loc_token=SEG_TOKEN[source] if source == "seal" else None,
        image_start_token=IMAGE_START if start_end else None,
        image_end_token=IMAGE_END if start_end else None,
        image_first=True,
    )


def source_license(folder: Path) -> str | None:
    """The `license:` of the original folder's model card front matter, if it has one."""
    readme = folder / "README.md"
    if not readme.is_file():
        return None
    match = re.match(r"^---\s*\n(.*?)\n---", readme.read_text(errors="replace"), re.DOTALL)
    found = re.search(r"^license:\s*(\S+)", match.group(1), re.MULTILINE) if match else None
    return found.group(1).strip("'\"") if found else None


def write_model_card(folder: Path, config: VSMConfig, name: str) -> None:
    """README.md naming the source checkpoint, its license and the vision tower (`config.converted_from`)."""
    from hub_cards import count_parameters, render_model_card

    card = render_model_card(config, name, num_parameters=count_parameters(folder))
    (folder / "README.md").write_text(card)
