"""Test support for the checkpoint converters: tiny random checkpoints in the ORIGINAL published layouts, and
reference computations of what the ORIGINAL code computes from them.

Nothing here imports VSM code: the references are written from the description of the original code
(LISA: github.com/dvlab-research/LISA @ 3cb2d43, the last code change 7232bb8; Meta's segment-anything @ dca509f),
so that a converter test compares two independent implementations.

Public API
----------
- `install_torchvision_stand_in()`: lets Meta's `segment_anything` import without torchvision.
- `write_tiny_clip(folder, seed=0, ...)`: a tiny CLIP checkpoint laid out like `openai/clip-vit-large-patch14`.
- `write_tiny_lisa(folder, variant="7b", seed=0, vision_tower=None, ...)`: a tiny random LISA checkpoint laid out like
  `xinlai/LISA-7B-v1` ("7b"), `xinlai/LISA-13B-llama2-v1` ("13b") or `Senqiao/LISA_Plus_7b` ("plus", partly guessed).
- `LisaReference(folder, ...)`: `prompt_ids`, `forward`, `generate` as LISA's chat.py / `LISAForCausalLM.evaluate`
  compute them (in fp32).
- `SentencePieceChunkTokenizer`: the default per-chunk tokenizer (transformers 4.31's slow `LlamaTokenizer`).

Only stdlib, numpy, PIL, torch, transformers, sentencepiece and segment_anything are imported; torchvision is never
used.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import io
import json
import sys
import types
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

# Constants of the original code (LISA: model/llava/constants.py, utils/utils.py, chat.py; Meta SAM: build_sam.py).
IMAGE_TOKEN_INDEX = -200
DEFAULT_IMAGE_TOKEN = "<image>"
DEFAULT_IM_START_TOKEN = "<im_start>"
DEFAULT_IM_END_TOKEN = "<im_end>"
DEFAULT_IMAGE_PATCH_TOKEN = "<im_patch>"
SEG_TOKEN = "[SEG]"
LLAVA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
# TwoWayTransformer heads: LISA's build_sam hard-codes 8, and it cannot be read off the weights' shapes (every other
# SAM size can), so the tiny checkpoints keep 8 too.
LISA_SAM_DECODER_HEADS = 8

# ---------------------------------------------------------------------------------------------------------------------
# 1. torchvision stand-in for Meta's segment_anything
# ---------------------------------------------------------------------------------------------------------------------


def _torchvision_importable() -> bool:
    module = sys.modules.get("torchvision")
    if module is not None:
        return True  # imported already (the real one, or our stand-in)
    try:
        import torchvision  # noqa: F401
    except Exception:  # not installed, or an install that does not import beside this torch
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]  # drop half-imported leftovers
        return False
    return True


def _to_pil_image(pic, mode=None) -> Image.Image:
    """torchvision.transforms.functional.to_pil_image for what segment_anything passes: uint8 HWC numpy (also CHW
    tensors, for completeness)."""
    if isinstance(pic, torch.Tensor):
        array = pic.detach().cpu()
        if array.ndim == 3:
            array = array.permute(1, 2, 0)
        if array.is_floating_point():
            array = (array * 255).to(torch.uint8)
        pic = array.numpy()
    pic = np.asarray(pic)
    if pic.ndim == 3 and pic.shape[2] == 1:
        pic = pic[:, :, 0]
    return Image.fromarray(pic, mode=mode)


def _resize(img, size, interpolation=None, max_size=None, antialias=None) -> Image.Image:
    """torchvision.transforms.functional.resize on a PIL image with the default (bilinear) interpolation: `size` (h, w)
    -> `img.resize((w, h), BILINEAR)`; an int matches the shorter side, as torchvision does."""
    if not isinstance(img, Image.Image):
        raise TypeError("the torchvision stand-in resizes PIL images only")
    if isinstance(size, int) or (isinstance(size, (list, tuple)) and len(size) == 1):
        short = size if isinstance(size, int) else size[0]
        w, h = img.size
        if w <= h:
            new_w, new_h = short, int(short * h / w)
        else:
            new_h, new_w = short, int(short * w / h)
    else:
        new_h, new_w = size
    resample = Image.BILINEAR if interpolation is None else interpolation
    if not isinstance(resample, int):  # a torchvision InterpolationMode-like value ("bilinear", ...)
        modes = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}
        resample = modes[str(getattr(resample, "value", resample)).lower()]
    return img.resize((int(new_w), int(new_h)), resample)


def _box_area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def _batched_nms(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy per-category NMS (torchvision.ops.batched_nms semantics), for SamAutomaticMaskGenerator only."""
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    offsets = idxs.to(boxes) * (boxes.max() + 1)
    shifted = boxes + offsets[:, None]
    order = scores.argsort(descending=True)
    keep = []
    suppressed = torch.zeros(len(boxes), dtype=torch.bool)
    areas = _box_area(shifted)
    for i in order.tolist():
        if suppressed[i]:
            continue
        keep.append(i)
        lt = torch.maximum(shifted[i, :2], shifted[:, :2])
        rb = torch.minimum(shifted[i, 2:], shifted[:, 2:])
        inter = (rb - lt).clamp(min=0).prod(dim=1)
        iou = inter / (areas[i] + areas - inter)
        suppressed |= iou > iou_threshold
    return torch.tensor(keep, dtype=torch.int64, device=boxes.device)


def install_torchvision_stand_in() -> bool:
    """Make `import segment_anything` work without torchvision (which must never be installed here).

    Meta's package imports `resize` and `to_pil_image` from `torchvision.transforms.functional`
    (segment_anything/utils/transforms.py, used by `ResizeLongestSide.apply_image`) and `batched_nms`, `box_area` from
    `torchvision.ops.boxes` (automatic_mask_generator.py, imported by the package's `__init__`). This puts a minimal
    stand-in module tree into `sys.modules`; `resize` does what torchvision does for a PIL image with the default
    bilinear mode: `img.resize((w, h), PIL.Image.BILINEAR)`.

    transformers' cached `is_torchvision_available()` is evaluated first (False), so transformers keeps choosing its
    PIL backends. Returns True when the stand-in was installed, False when torchvision (real or stand-in) is importable.
    """
    if _torchvision_importable():
        return False
    from transformers.utils import import_utils

    import_utils.is_torchvision_available()  # prime the lru cache while torchvision is really absent

    def module(name: str) -> types.ModuleType:
        mod = types.ModuleType(name, "Minimal torchvision stand-in for Meta's segment_anything (tests only).")
        mod.__spec__ = importlib.machinery.ModuleSpec(name, loader=None)
        mod.__torchvision_stand_in__ = True
        sys.modules[name] = mod
        return mod

    root = module("torchvision")
    root.__version__ = "0.0.0+stand-in"
    transforms = module("torchvision.transforms")
    functional = module("torchvision.transforms.functional")
    functional.resize = _resize
    functional.to_pil_image = _to_pil_image
    ops = module("torchvision.ops")
    boxes = module("torchvision.ops.boxes")
    boxes.box_area = ops.box_area = _box_area
    boxes.batched_nms = ops.batched_nms = _batched_nms
    root.transforms, transforms.functional, root.ops, ops.boxes = transforms, functional, ops, boxes
    return True


def _segment_anything():
    install_torchvision_stand_in()
    from segment_anything import modeling
    from segment_anything.utils.transforms import ResizeLongestSide

    return modeling, ResizeLongestSide


# ---------------------------------------------------------------------------------------------------------------------
# 2. Tiny checkpoints in the published layouts
# ---------------------------------------------------------------------------------------------------------------------

# A small built-in English corpus for the tiny Llama-style sentencepiece model.
_TOKENIZER_CORPUS = [
    LLAVA_V1_SYSTEM,
    "USER: Can you segment the dog in this image? ASSISTANT: Sure, it is [SEG].",
    "USER: What is the cat in this image? Please output segmentation mask. ASSISTANT: [SEG].",
    "USER: Please segment the red car on the left. ASSISTANT: Sure, the segmentation result is [SEG].",
    "Please output segmentation mask.",
    "What is the person holding in the picture? Please respond with segmentation mask.",
    "Where is the largest object in the image? Segment it, please.",
    "The mask shows the region of the image that answers the question.",
    "A chat about an image: the user asks and the assistant answers with a mask.",
    "Segment the object that people use to cut food, and explain why.",
    "There are 2 cats, 3 dogs and 10 birds in the photo taken in 2023.",
    "The blue square is above the green circle; the yellow triangle is small.",
    "Thank you! You are welcome. Is there anything else I can help with?",
    "Sure, here is the segmentation mask of the window, the door and the roof.",
    "Can you please find the tallest building and segment it in this picture?",
]


def train_tiny_sentencepiece(vocab_size: int = 400) -> bytes:
    """A tiny Llama-style sentencepiece model (the serialized `tokenizer.model`), trained deterministically on a small
    built-in corpus: BPE, byte fallback, split digits, identity normalisation without whitespace folding, dummy prefix,
    `<unk>`/`<s>`/`</s>` = 0/1/2, no pad. 400 pieces = 3 specials + 256 bytes + characters and merges."""
    import sentencepiece as spm

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_TOKENIZER_CORPUS * 8), model_writer=buffer, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>", normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, allow_whitespace_only_pieces=True,
        character_coverage=1.0, num_threads=1, shuffle_input_sentence=False, minloglevel=2,
    )
    return buffer.getvalue()


def _dump_json(path: Path, obj, sort_keys: bool = True) -> None:
    """JSON as transformers 4.31 writes configs, indexes and tokenizer files (indent 2, sorted keys, final newline)."""
    path.write_text(json.dumps(obj, indent=2, sort_keys=sort_keys, ensure_ascii=False) + "\n", encoding="utf-8")


@contextlib.contextmanager
def _seeded(seed: int):
    """Seed torch inside, leaving the caller's global RNG state untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _randomise_constant_parameters(module: nn.Module, scale: float = 0.1) -> None:
    """Give parameters that their default init leaves constant (LayerNorm / RMSNorm weights and biases, SAM's zero
    `pos_embed` and `rel_pos_*`) random values, so that a converter that drops or swaps one of them gets caught."""
    with torch.no_grad():
        for param in module.parameters():
            if param.numel() > 1 and bool((param == param.reshape(-1)[0]).all()):
                param.add_(torch.randn_like(param) * scale)


def write_tiny_clip(folder, seed: int = 0, hidden_size: int = 48, image_size: int = 32, patch_size: int = 8,
                    num_hidden_layers: int = 3, num_attention_heads: int = 2, intermediate_size: int = 96,
                    full_clip_model: bool = True) -> dict:
    """A tiny random CLIP in the layout of `openai/clip-vit-large-patch14`, the vision tower LISA loads with
    `CLIPVisionModel.from_pretrained` and `CLIPImageProcessor.from_pretrained` (model/llava/model/multimodal_encoder/
    clip_encoder.py).

    By default a whole `CLIPModel` (tiny text tower included, `model_type` "clip", keys `vision_model.*`,
    `text_model.*`, projections, `logit_scale`) as on the Hub; `full_clip_model=False` saves a bare `CLIPVisionModel`.
    `preprocessor_config.json` is the Hub file's legacy form (`CLIPFeatureExtractor`, `size`/`crop_size` ints,
    bicubic, OpenAI mean/std). 32 px / patch 8 gives 16 patch tokens; 3 layers so that `hidden_states[-2]` is a
    middle layer.
    """
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vision = dict(hidden_size=hidden_size, intermediate_size=intermediate_size, num_hidden_layers=num_hidden_layers,
                  num_attention_heads=num_attention_heads, image_size=image_size, patch_size=patch_size,
                  projection_dim=16, hidden_act="quick_gelu")
    with _seeded(seed):
        if full_clip_model:
            text = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                        max_position_embeddings=16, projection_dim=16, hidden_act="quick_gelu", bos_token_id=0,
                        eos_token_id=2, pad_token_id=1)
            model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
        else:
            model = CLIPVisionModel(CLIPVisionConfig(**vision))
        _randomise_constant_parameters(model)
    with quiet_transformers():
        model.eval().save_pretrained(folder)
    _dump_json(folder / "preprocessor_config.json", {
        "crop_size": image_size, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": OPENAI_CLIP_MEAN, "image_std": OPENAI_CLIP_STD,
        "resample": 3, "size": image_size,
    })
    return {"folder": str(folder), "hidden_size": hidden_size, "image_size": image_size, "patch_size": patch_size,
            "num_patches": (image_size // patch_size) ** 2, "num_hidden_layers": num_hidden_layers}


TINY_LM_SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
TINY_SAM_SIZES = dict(
    img_size=96, patch_size=16, encoder_embed_dim=40, encoder_depth=2, encoder_num_heads=2, window_size=4,
    global_attn_indexes=[1], mlp_ratio=4.0, out_chans=32, mask_in_chans=8, decoder_depth=2, decoder_mlp_dim=80,
    decoder_num_heads=LISA_SAM_DECODER_HEADS, num_multimask_outputs=3, iou_head_depth=3, iou_head_hidden_dim=24,
)

# What transformers 4.31 writes for the tokenizer of a LISA checkpoint (merge_lora_weights_and_save_hf_model.py:
# `AutoTokenizer.from_pretrained(base, model_max_length=512, padding_side="right", use_fast=False)`,
# `pad_token = unk_token`, `add_tokens("[SEG]")`, `add_tokens([<im_start>, <im_end>], special_tokens=True)`,
# `save_pretrained`), reproduced by running transformers 4.31.0 on a vicuna-style base tokenizer_config; the files
# come out 744 B and 435 B, the sizes of xinlai/LISA-7B-v1's tokenizer_config.json and special_tokens_map.json.


def _added_token(content: str, with_type: bool) -> dict:
    token = {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    return {"__type": "AddedToken", **token} if with_type else token


def _tokenizer_config_431() -> dict:
    return {
        "add_bos_token": True, "add_eos_token": False, "bos_token": _added_token("<s>", True),
        "clean_up_tokenization_spaces": False, "eos_token": _added_token("</s>", True), "legacy": True,
        "model_max_length": 512, "pad_token": None, "padding_side": "right", "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer", "unk_token": _added_token("<unk>", True),
    }


def _special_tokens_map_431() -> dict:
    return {"bos_token": _added_token("<s>", False), "eos_token": _added_token("</s>", False), "pad_token": "<unk>",
            "unk_token": _added_token("<unk>", False)}


def _lisa_config(variant: str, vision_tower: str, vocab_size: int, mm_hidden_size: int, out_dim: int, lm: dict,
                 torch_dtype: str) -> dict:
    """config.json. "7b" is xinlai/LISA-7B-v1's file with tiny sizes. "13b" follows lisa.md's derivation (the file was
    not seen): Llama-2 values (4096 positions, rms 1e-5), otherwise as 7b. "plus" is a guess: LLaVA-1.5 fields
    (`mm_projector_type` "mlp2x_gelu", no im_start/im_end) plus LISA's."""
    config = {
        "_name_or_path": "./LLaVA/LLaVA-Lightning-7B-v1-1", "architectures": ["LISAForCausalLM"], "bos_token_id": 1,
        "eos_token_id": 2, "freeze_mm_mlp_adapter": True, "hidden_act": "silu", "hidden_size": lm["hidden_size"],
        "image_aspect_ratio": "square", "image_grid_pinpoints": None, "initializer_range": 0.02,
        "intermediate_size": lm["intermediate_size"], "max_position_embeddings": 2048, "max_sequence_length": 2048,
        "mm_hidden_size": mm_hidden_size, "mm_use_im_patch_token": False, "mm_use_im_start_end": True,
        "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2, "mm_vision_tower": vision_tower,
        "model_type": "llava", "num_attention_heads": lm["num_attention_heads"],
        "num_hidden_layers": lm["num_hidden_layers"], "num_key_value_heads": lm["num_attention_heads"],
        "out_dim": out_dim, "pad_token_id": 0, "pretrain_mm_mlp_adapter": None, "pretraining_tp": 1,
        "rms_norm_eps": 1e-06, "rope_scaling": None, "tie_word_embeddings": False, "torch_dtype": torch_dtype,
        "train_mask_decoder": True, "transformers_version": "4.31.0", "tune_mm_mlp_adapter": False,
        "use_cache": False, "use_mm_proj": True, "vision_tower": vision_tower, "vocab_size": vocab_size,
    }
    if variant == "13b":
        config.pop("max_sequence_length")
        config.update({"_name_or_path": "liuhaotian/llava-llama-2-13b-chat-lightning-preview",
                       "max_position_embeddings": 4096, "rms_norm_eps": 1e-05})
    elif variant == "plus":
        config.pop("max_sequence_length")
        config.update({
            "_name_or_path": "liuhaotian/llava-v1.5-7b", "attention_bias": False, "max_position_embeddings": 4096,
            "mm_patch_merge_type": "flat", "mm_projector_lr": None, "mm_projector_type": "mlp2x_gelu",
            "mm_use_im_start_end": False, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
            "tokenizer_model_max_length": 2048, "tokenizer_padding_side": "right",
        })
    return config


def _clip_hidden_size(vision_tower) -> Optional[int]:
    path = Path(vision_tower) / "config.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text())
    return config.get("vision_config", config).get("hidden_size")


def _build_meta_sam(sizes: dict):
    """Meta's `Sam` with LISA's `_build_sam` recipe (model/segment_anything/build_sam.py) at the given sizes."""
    from functools import partial

    modeling, _ = _segment_anything()
    grid = sizes["img_size"] // sizes["patch_size"]
    return modeling.Sam(
        image_encoder=modeling.ImageEncoderViT(
            depth=sizes["encoder_depth"], embed_dim=sizes["encoder_embed_dim"], img_size=sizes["img_size"],
            mlp_ratio=sizes["mlp_ratio"], norm_layer=partial(nn.LayerNorm, eps=1e-6),
            num_heads=sizes["encoder_num_heads"], patch_size=sizes["patch_size"], qkv_bias=True, use_rel_pos=True,
            global_attn_indexes=tuple(sizes["global_attn_indexes"]), window_size=sizes["window_size"],
            out_chans=sizes["out_chans"]),
        prompt_encoder=modeling.PromptEncoder(
            embed_dim=sizes["out_chans"], image_embedding_size=(grid, grid),
            input_image_size=(sizes["img_size"], sizes["img_size"]), mask_in_chans=sizes["mask_in_chans"]),
        mask_decoder=modeling.MaskDecoder(
            num_multimask_outputs=sizes["num_multimask_outputs"],
            transformer=modeling.TwoWayTransformer(depth=sizes["decoder_depth"], embedding_dim=sizes["out_chans"],
                                                   mlp_dim=sizes["decoder_mlp_dim"],
                                                   num_heads=sizes["decoder_num_heads"]),
            transformer_dim=sizes["out_chans"], iou_head_depth=sizes["iou_head_depth"],
            iou_head_hidden_dim=sizes["iou_head_hidden_dim"]),
        pixel_mean=list(SAM_PIXEL_MEAN), pixel_std=list(SAM_PIXEL_STD),
    ).eval()


def _tiny_llama(vocab_size: int, lm: dict, rms_norm_eps: float, max_position_embeddings: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=lm["hidden_size"],
                         intermediate_size=lm["intermediate_size"], num_hidden_layers=lm["num_hidden_layers"],
                         num_attention_heads=lm["num_attention_heads"], num_key_value_heads=lm["num_attention_heads"],
                         rms_norm_eps=rms_norm_eps, max_position_embeddings=max_position_embeddings,
                         tie_word_embeddings=False, hidden_act="silu", bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(config)


def write_tiny_lisa(folder, variant: str = "7b", seed: int = 0, vision_tower=None,
                    lm_dtype: torch.dtype = torch.bfloat16, include_inv_freq: bool = True,
                    steer_generation: bool = True, sp_vocab_size: int = 400, mask_logit_scale: float = 30.0) -> dict:
    """Write a tiny random LISA checkpoint folder in exactly the published layout (lisa.md §1.6, §6):

    - `config.json` (original fields, tiny sizes; `vision_tower` / `mm_vision_tower` = the CLIP folder),
      `generation_config.json` (the published 132-byte file: `_from_model_config`, bos/eos/pad ids);
    - `pytorch_model-0000{1,2}-of-00002.bin` (`torch.save` of plain dicts of tensors) + `pytorch_model.bin.index.json`,
      keys in `LISAForCausalLM.state_dict()` order minus the CLIP tower: `model.embed_tokens.weight`,
      `model.layers.N.*` (with the 4.31 persistent `self_attn.rotary_emb.inv_freq` buffers when `include_inv_freq`),
      `model.norm.weight`, `model.mm_projector.{weight,bias}` (a single Linear; "plus": `.0.*`/`.2.*` of
      Linear-GELU-Linear), `model.visual_model.*` (Meta SAM's own state-dict keys; `pixel_mean`/`pixel_std` are
      non-persistent and not saved), `model.text_hidden_fcs.0.{0,2}.*`, `lm_head.weight`. Dtypes as published: LM and
      projector in `lm_dtype` (bf16), SAM and `text_hidden_fcs` in fp32.
    - tokenizer files as transformers 4.31 saves them (byte for byte, checked against 4.31): a tiny Llama-style
      `tokenizer.model` (V pieces), `added_tokens.json` ("7b": `<im_patch>`=V, `<im_start>`=V+1, `<im_end>`=V+2,
      `[SEG]`=V+3; "13b": `[SEG]`=V, `<im_start>`=V+1, `<im_end>`=V+2; "plus": `[SEG]`=V),
      `special_tokens_map.json`, `tokenizer_config.json`.

    Weights come from the original classes: Meta's `segment_anything.modeling` for SAM, `transformers.LlamaForCausalLM`
    for the LM, `nn.Linear` for the projector and `text_hidden_fcs`. With `steer_generation` the LM is nudged so that
    greedy decoding of a LISA prompt answers "Sure, [SEG]." then `</s>` (ids in the result's `answer_chain`; see
    `_steer_generation`); the mask decoder's hypernetwork output layers are scaled by `mask_logit_scale` so that mask
    logits are of order 1.
    `vision_tower`: a CLIP folder (default: a tiny one written with `write_tiny_clip` next to `folder`).
    Returns a dict with the folder, the token ids and every size used.
    """
    if variant not in ("7b", "13b", "plus"):
        raise ValueError(f"variant must be '7b', '13b' or 'plus', not {variant!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    clip_info = None
    if vision_tower is None:
        clip_info = write_tiny_clip(folder.parent / f"{folder.name}-clip", seed=seed)
        vision_tower = clip_info["folder"]
    vision_tower = str(vision_tower)
    mm_hidden_size = _clip_hidden_size(vision_tower) or 48

    # Tokenizer and ids.
    sp_model = train_tiny_sentencepiece(sp_vocab_size)
    (folder / "tokenizer.model").write_bytes(sp_model)
    V = sp_vocab_size
    if variant == "7b":
        added = {DEFAULT_IMAGE_PATCH_TOKEN: V, DEFAULT_IM_START_TOKEN: V + 1, DEFAULT_IM_END_TOKEN: V + 2,
                 SEG_TOKEN: V + 3}
    elif variant == "13b":
        added = {SEG_TOKEN: V, DEFAULT_IM_START_TOKEN: V + 1, DEFAULT_IM_END_TOKEN: V + 2}
    else:
        added = {SEG_TOKEN: V}
    vocab_size = V + len(added)
    _dump_json(folder / "added_tokens.json", added)
    _dump_json(folder / "special_tokens_map.json", _special_tokens_map_431())
    _dump_json(folder / "tokenizer_config.json", _tokenizer_config_431())

    lm_sizes = dict(TINY_LM_SIZES)
    sam_sizes = dict(TINY_SAM_SIZES)
    out_dim = sam_sizes["out_chans"]
    config = _lisa_config(variant, vision_tower, vocab_size, mm_hidden_size, out_dim, lm_sizes,
                          "bfloat16" if lm_dtype == torch.bfloat16 else str(lm_dtype).replace("torch.", ""))
    _dump_json(folder / "config.json", config)
    # 132 bytes, as published: derived from the base LLaVA config at load time (before LisaModel set use_cache=False).
    _dump_json(folder / "generation_config.json", {
        "_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
        "transformers_version": "4.31.0"})

    with _seeded(seed):
        llama = _tiny_llama(vocab_size, lm_sizes, config["rms_norm_eps"], config["max_position_embeddings"])
        with torch.no_grad():  # O(1) activations and logits that differ clearly between tokens
            for name, param in llama.named_parameters():
                if param.ndim == 1:
                    param.copy_(1.0 + 0.1 * torch.randn_like(param))
                elif "embed_tokens" in name:
                    param.normal_(0.0, 1.0)
                else:
                    param.normal_(0.0, param.shape[1] ** -0.5)
        H = lm_sizes["hidden_size"]
        if variant == "plus":
            projector = nn.Sequential(nn.Linear(mm_hidden_size, H), nn.GELU(), nn.Linear(H, H))
        else:
            projector = nn.Linear(mm_hidden_size, H)
        sam = _build_meta_sam(sam_sizes)
        _randomise_constant_parameters(sam)
        text_hidden_fcs = nn.ModuleList([nn.Sequential(nn.Linear(H, H), nn.ReLU(inplace=True), nn.Linear(H, out_dim),
                                                       nn.Dropout(0.0))])
        with torch.no_grad():  # mask logits of order 1 (SAM's default init gives about 0.1), so that "> 0" is stable
            for mlp in sam.mask_decoder.output_hypernetworks_mlps:
                mlp.layers[-1].weight.mul_(mask_logit_scale)
                mlp.layers[-1].bias.mul_(mask_logit_scale)
        chain = None
        if steer_generation:
            chain = _answer_chain(sp_model, added[SEG_TOKEN])
            _steer_generation(llama, chain)

    lm_state = llama.state_dict()
    state: dict[str, torch.Tensor] = {}
    state["model.embed_tokens.weight"] = lm_state["model.embed_tokens.weight"]
    head_dim = H // lm_sizes["num_attention_heads"]
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    for i in range(lm_sizes["num_hidden_layers"]):
        prefix = f"model.layers.{i}."
        for key, value in lm_state.items():
            if key.startswith(prefix):
                state[key] = value
        if include_inv_freq:
            state[prefix + "self_attn.rotary_emb.inv_freq"] = inv_freq.clone()
    state["model.norm.weight"] = lm_state["model.norm.weight"]
    state.update({f"model.mm_projector.{k}": v.to(lm_dtype) for k, v in projector.state_dict().items()})
    state.update({f"model.visual_model.{k}": v for k, v in sam.state_dict().items()})
    state.update({f"model.text_hidden_fcs.{k}": v for k, v in text_hidden_fcs.state_dict().items()})
    state["lm_head.weight"] = lm_state["lm_head.weight"]
    for key, value in state.items():
        if not (key.startswith("model.visual_model.") or key.startswith("model.text_hidden_fcs.")
                or key.endswith("rotary_emb.inv_freq")):
            value = value.to(lm_dtype)
        state[key] = value.detach().clone().contiguous()

    # Two shards split by size, in state-dict order, as `save_pretrained(max_shard_size=...)` does.
    nbytes = {k: v.numel() * v.element_size() for k, v in state.items()}
    total = sum(nbytes.values())
    names = ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
    shards: list[dict] = [{}, {}]
    running = 0
    for key, value in state.items():
        shards[0 if running < 0.6 * total and key != "lm_head.weight" else 1][key] = value
        running += nbytes[key]
    for name, shard in zip(names, shards):
        torch.save(shard, folder / name)
    weight_map = {key: names[i] for i, shard in enumerate(shards) for key in shard}
    _dump_json(folder / "pytorch_model.bin.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})

    grid = sam_sizes["img_size"] // sam_sizes["patch_size"]
    return {
        "folder": str(folder), "variant": variant, "vision_tower": vision_tower, "clip": clip_info,
        "vocab_size": vocab_size, "sp_vocab_size": V, "added_tokens": dict(added),
        "seg_token_id": added[SEG_TOKEN], "im_start_id": added.get(DEFAULT_IM_START_TOKEN),
        "im_end_id": added.get(DEFAULT_IM_END_TOKEN), "im_patch_id": added.get(DEFAULT_IMAGE_PATCH_TOKEN),
        "bos_id": 1, "eos_id": 2, "pad_id": 0, "unk_id": 0,
        "mm_use_im_start_end": config["mm_use_im_start_end"], "mm_hidden_size": mm_hidden_size,
        "projector": "mlp2x_gelu" if variant == "plus" else "linear", "lm": lm_sizes,
        "rms_norm_eps": config["rms_norm_eps"], "out_dim": out_dim, "sam": dict(sam_sizes, grid=grid),
        "lm_dtype": str(lm_dtype), "shards": {name: sorted(shard) for name, shard in zip(names, shards)},
        "total_size": total, "answer_chain": chain,
    }


def _answer_chain(sp_model: bytes, seg_id: int, eos_id: int = 2) -> list[int]:
    """[last piece of "ASSISTANT:", pieces of "Sure,", [SEG], ".", </s>]: the greedy answer the steered LM gives."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=sp_model)
    return [sp.encode("ASSISTANT:")[-1], *sp.encode("Sure,"), seg_id, sp.piece_to_id("."), eos_id]


def _steer_generation(llama, chain: Sequence[int], strength: float = 8.0, read: float = 2.5) -> None:
    """Nudge the random LM so that greedy decoding after a LISA prompt follows `chain` (e.g. ":" -> "Sure" -> "," ->
    "[SEG]" -> "." -> "</s>"), a short LISA-like answer with text before and after [SEG].

    Link k (a -> b) uses hidden dimension k: token a's embedding carries `strength` there (every other token's is
    shrunk to a tenth), and `lm_head` row b reads it with weight `read`. The last position's hidden state keeps its own
    token's mark through the two layers, so b wins the argmax. Everything else stays random."""
    links = list(zip(chain[:-1], chain[1:]))
    sources = [a for a, _ in links]
    if len(set(sources)) != len(sources) or len(links) > llama.config.hidden_size:
        raise ValueError(f"cannot steer along {chain}: repeated source tokens")
    with torch.no_grad():
        embed, head = llama.model.embed_tokens.weight, llama.lm_head.weight
        for dim, (a, b) in enumerate(links):
            embed[:, dim] *= 0.1
            embed[a, dim] = strength
            head[:, dim] *= 0.1
            head[b, dim] = read


# ---------------------------------------------------------------------------------------------------------------------
# 3. Reference: what the original LISA code computes
# ---------------------------------------------------------------------------------------------------------------------


class SentencePieceChunkTokenizer:
    """Default `tokenize_chunk`: `tokenizer(chunk).input_ids` of transformers 4.31's slow `LlamaTokenizer` (LISA:
    `AutoTokenizer.from_pretrained(..., use_fast=False)`), written from its behaviour and reading the folder's
    `tokenizer.model`, `added_tokens.json`, `special_tokens_map.json`, `tokenizer_config.json`:

    - the text is split on the no-split tokens (the added tokens and the special tokens `<s>`, `</s>`, `<unk>`),
      leftmost-longest;
    - around an added token (and a special token written as a plain string), whitespace is stripped on both sides
      (4.31 `PreTrainedTokenizer.tokenize`: "We strip left and right by default"), so "USER: <im_start>" loses its
      space and "<im_end>\\nWhat" its newline; a special token written as an AddedToken dict follows its own
      `lstrip` / `rstrip` (False in LISA's files, so "</s>" keeps its neighbours' whitespace);
    - every remaining non-empty piece is encoded on its own by sentencepiece: with `legacy` (the default, and LISA's
      files) each piece gets the dummy "▁" prefix; with `legacy: false` the text gets one leading "▁" and later
      pieces that do not start with a space lose their first "▁" (4.31 `LlamaTokenizer.tokenize` / `_tokenize`);
    - BOS is prepended (`add_bos_token`), no EOS.
    """

    _SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")

    def __init__(self, folder):
        import sentencepiece as spm

        folder = Path(folder)

        def read(name: str) -> dict:
            path = folder / name
            return json.loads(path.read_text()) if path.is_file() else {}

        self.sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
        self.added = {str(k): int(v) for k, v in read("added_tokens.json").items()}
        config, special_map = read("tokenizer_config.json"), read("special_tokens_map.json")
        self.legacy = config.get("legacy", True) is not False
        self.add_bos = config.get("add_bos_token", True)
        self.bos_id = self.sp.bos_id()
        # (strip the left neighbour's right end, strip the right neighbour's left end) per no-split token
        self.strip = {token: (True, True) for token in self.added}
        flags: dict[str, tuple[bool, bool]] = {}
        for key in self._SPECIAL_KEYS:
            value = special_map.get(key, config.get(key))
            if isinstance(value, dict):  # an AddedToken: its own flags win over a plain string of the same content
                flags[value["content"]] = (bool(value.get("lstrip")), bool(value.get("rstrip")))
            elif isinstance(value, str):
                flags.setdefault(value, (True, True))
        for token, flag in flags.items():
            self.strip.setdefault(token, flag)
        self.ids = {**{t: self.sp.piece_to_id(t) for t in flags}, **self.added}

    def split(self, text: str) -> list[str]:
        """Text pieces at even indices, no-split tokens at odd ones, neighbours stripped as 4.31 does."""
        pieces, start, i = [], 0, 0
        while i < len(text):
            match = max((t for t in self.strip if text.startswith(t, i)), key=len, default=None)
            if match is None:
                i += 1
                continue
            pieces += [text[start:i], match]
            i = start = i + len(match)
        pieces.append(text[start:])
        for j in range(1, len(pieces), 2):
            strip_left, strip_right = self.strip[pieces[j]]
            if strip_left:
                pieces[j - 1] = pieces[j - 1].rstrip()
            if strip_right:
                pieces[j + 1] = pieces[j + 1].lstrip()
        return pieces

    def _encode(self, text: str) -> list[int]:
        is_first = False
        if not self.legacy:
            is_first = text.startswith("\u2581")
            if is_first:
                text = text[1:]
        pieces = self.sp.encode(text, out_type=str)
        if not self.legacy and not is_first and not text.startswith(" ") and pieces and pieces[0].startswith("\u2581"):
            pieces = ([pieces[0][1:]] if len(pieces[0]) > 1 else []) + pieces[1:]
        return [self.sp.piece_to_id(p) for p in pieces]

    def __call__(self, text: str) -> list[int]:
        if not self.legacy:
            text = "\u2581" + text.replace("\u2581", " ")
        ids = [self.bos_id] if self.add_bos else []
        for j, piece in enumerate(self.split(text)):
            if j % 2 == 1:
                ids.append(self.ids[piece])
            elif piece:
                ids.extend(self._encode(piece))
        return ids


def llava_v1_prompt(query: str, mm_use_im_start_end: bool = True, answer: Optional[str] = None) -> str:
    """The prompt string of LISA's chat.py: `conv_templates["llava_v1"]` (model/llava/conversation.py,
    SeparatorStyle.TWO, sep " ", sep2 "</s>") with the user message "<image>\\n{query}" (`<im_start><image><im_end>`
    when `mm_use_im_start_end`). With `answer` (the validation path of utils/dataset.py, e.g. "[SEG]."), the assistant
    turn is filled in and closed with "</s>"; without, the prompt ends with "ASSISTANT:"."""
    image = DEFAULT_IMAGE_TOKEN
    if mm_use_im_start_end:
        image = DEFAULT_IM_START_TOKEN + DEFAULT_IMAGE_TOKEN + DEFAULT_IM_END_TOKEN
    prompt = f"{LLAVA_V1_SYSTEM} USER: {image}\n{query} ASSISTANT:"
    return prompt + (f" {answer}</s>" if answer else "")


def tokenizer_image_token(prompt: str, tokenize_chunk: Callable[[str], list[int]], bos_id: int = 1,
                          image_token_index: int = IMAGE_TOKEN_INDEX) -> list[int]:
    """LISA's `tokenizer_image_token` (model/llava/mm_utils.py): tokenize each `<image>`-separated chunk with BOS, keep
    only the first chunk's BOS, and put one `image_token_index` between consecutive chunks."""
    chunks = [list(tokenize_chunk(chunk)) for chunk in prompt.split(DEFAULT_IMAGE_TOKEN)]
    drop = 1 if chunks and chunks[0] and chunks[0][0] == bos_id else 0
    ids = [bos_id] if drop else []
    for i, chunk in enumerate(chunks):
        if i > 0:
            ids.append(image_token_index)
        ids.extend(chunk[drop:])
    return ids


def load_lisa_state_dict(folder) -> dict[str, torch.Tensor]:
    """All tensors of a LISA checkpoint folder: the `.bin` shards named in `pytorch_model.bin.index.json` (or a single
    `pytorch_model.bin`), read with `torch.load(weights_only=True)`."""
    folder = Path(folder)
    index = folder / "pytorch_model.bin.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["pytorch_model.bin"]
    state = {}
    for name in files:
        state.update(torch.load(folder / name, map_location="cpu", weights_only=True))
    return state


def _sam_sizes_from_state(state: dict, prefix: str = "model.visual_model.",
                          decoder_num_heads: int = LISA_SAM_DECODER_HEADS) -> dict:
    """SAM's hyper-parameters read off the weights' shapes (the checkpoint's config has none: LISA's build_sam_vit_h
    hard-codes them). Only the TwoWayTransformer's head count is not in the shapes: `decoder_num_heads`."""
    enc = prefix + "image_encoder."
    patch = state[enc + "patch_embed.proj.weight"]
    embed_dim, patch_size = patch.shape[0], patch.shape[-1]
    grid = state[enc + "pos_embed"].shape[1]
    def count(prefix_: str) -> int:  # number of numbered children under a prefix
        return len({k[len(prefix_):].split(".")[0] for k in state if k.startswith(prefix_)})

    depth = count(enc + "blocks.")
    head_dim = state[enc + "blocks.0.attn.rel_pos_h"].shape[1]
    rel_sizes = [(state[enc + f"blocks.{i}.attn.rel_pos_h"].shape[0] + 1) // 2 for i in range(depth)]
    global_idx = [i for i, s in enumerate(rel_sizes) if s == grid]
    windows = {s for s in rel_sizes if s != grid}
    dec = prefix + "mask_decoder."
    return dict(
        img_size=grid * patch_size, patch_size=patch_size, encoder_embed_dim=embed_dim, encoder_depth=depth,
        encoder_num_heads=embed_dim // head_dim, window_size=windows.pop() if windows else 0,
        global_attn_indexes=global_idx, mlp_ratio=state[enc + "blocks.0.mlp.lin1.weight"].shape[0] / embed_dim,
        out_chans=state[enc + "neck.0.weight"].shape[0],
        mask_in_chans=state[prefix + "prompt_encoder.mask_downscaling.3.weight"].shape[0],
        decoder_depth=count(dec + "transformer.layers."),
        decoder_mlp_dim=state[dec + "transformer.layers.0.mlp.lin1.weight"].shape[0],
        decoder_num_heads=decoder_num_heads, num_multimask_outputs=state[dec + "mask_tokens.weight"].shape[0] - 1,
        iou_head_depth=count(dec + "iou_prediction_head.layers."),
        iou_head_hidden_dim=state[dec + "iou_prediction_head.layers.0.weight"].shape[0],
    )


@contextlib.contextmanager
def quiet_transformers():
    """Silences transformers' logs and progress bars while the references load their parts."""
    from transformers.utils import logging

    level, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


class LisaReference:
    """What the original LISA code computes for one image and one prompt, from a checkpoint folder's files, in fp32.

    Written from the description of LISA's chat.py and model/LISA.py (`evaluate`), model/llava/llava_arch.py
    (`encode_images`, `prepare_inputs_labels_for_multimodal`), model/llava/model/multimodal_encoder/clip_encoder.py and
    model/segment_anything (= Meta's SAM, whose classes are used here): no VSM code.

    `vision_tower` overrides the config's CLIP folder. `tokenize_chunk(text) -> ids` is the per-chunk tokenizer used by
    `prompt_ids` (default: `SentencePieceChunkTokenizer`, the 4.31 slow-tokenizer behaviour). `sam_decoder_heads`: the
    TwoWayTransformer head count (not recoverable from the weights; LISA's is 8).

    Generalisations of LISA's hard-coded values: the [SEG] offset uses the tower's patch count (LISA hard-codes 255 =
    256 - 1), and SAM's sizes are read off the weights (LISA hard-codes ViT-H). Every variant uses the llava_v1
    template (LISA++'s template is unknown).
    """

    def __init__(self, folder, vision_tower=None, tokenize_chunk: Optional[Callable[[str], list[int]]] = None,
                 sam_decoder_heads: int = LISA_SAM_DECODER_HEADS):
        from transformers import CLIPVisionModel, LlamaConfig, LlamaForCausalLM

        self.folder = Path(folder)
        self.config = json.loads((self.folder / "config.json").read_text())
        self.vision_tower = str(vision_tower or self.config.get("vision_tower") or self.config["mm_vision_tower"])
        added_path = self.folder / "added_tokens.json"
        self.added_tokens = json.loads(added_path.read_text()) if added_path.is_file() else {}
        self.seg_token_id = self.added_tokens[SEG_TOKEN]
        self.bos_id = self.config.get("bos_token_id", 1)
        self.eos_id = self.config.get("eos_token_id", 2)
        self.mm_use_im_start_end = bool(self.config.get("mm_use_im_start_end", False))
        self.tokenize_chunk = tokenize_chunk or SentencePieceChunkTokenizer(self.folder)
        state = {k: v.float() for k, v in load_lisa_state_dict(self.folder).items()}

        # LM: LlamaForCausalLM with the checkpoint's Llama fields (LLaVA's LlavaLlamaForCausalLM adds no weights).
        c = self.config
        lm_config = LlamaConfig(
            vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
            num_hidden_layers=c["num_hidden_layers"], num_attention_heads=c["num_attention_heads"],
            num_key_value_heads=c.get("num_key_value_heads", c["num_attention_heads"]),
            rms_norm_eps=c["rms_norm_eps"], max_position_embeddings=c["max_position_embeddings"],
            hidden_act=c.get("hidden_act", "silu"), tie_word_embeddings=False, bos_token_id=self.bos_id,
            eos_token_id=self.eos_id, pad_token_id=c.get("pad_token_id", 0))
        lm_config._attn_implementation = "eager"
        self.lm = LlamaForCausalLM(lm_config).eval()
        lm_state = {k: v for k, v in state.items()
                    if (k.startswith(("model.embed_tokens.", "model.layers.", "model.norm.")) or k == "lm_head.weight")
                    and not k.endswith("rotary_emb.inv_freq")}
        self.lm.load_state_dict(lm_state, strict=True)

        # Projector: LISA v1 always builds one Linear (llava_arch.py); LLaVA-1.5 (LISA++) builds `mm_projector_type`.
        H, mm = c["hidden_size"], c["mm_hidden_size"]
        if c.get("mm_projector_type", "linear") == "mlp2x_gelu":
            self.projector = nn.Sequential(nn.Linear(mm, H), nn.GELU(), nn.Linear(H, H))
        else:
            self.projector = nn.Linear(mm, H)
        self.projector.load_state_dict(sub_state(state, "model.mm_projector."), strict=True)
        self.text_hidden_fcs = nn.Sequential(nn.Linear(H, H), nn.ReLU(), nn.Linear(H, c["out_dim"]), nn.Dropout(0.0))
        self.text_hidden_fcs.load_state_dict(sub_state(state, "model.text_hidden_fcs.0."), strict=True)

        # SAM (Meta's classes; LISA's vendored copy has the same parameters).
        self.sam_sizes = _sam_sizes_from_state(state, decoder_num_heads=sam_decoder_heads)
        self.sam = _build_meta_sam(self.sam_sizes)
        self.sam.load_state_dict(sub_state(state, "model.visual_model."), strict=True)
        _, ResizeLongestSide = _segment_anything()
        self.sam_transform = ResizeLongestSide(self.sam_sizes["img_size"])

        # CLIP vision tower + its processor, loaded from the tower folder like clip_encoder.py does.
        with quiet_transformers():
            self.clip = CLIPVisionModel.from_pretrained(self.vision_tower, dtype=torch.float32).eval()
            self.clip_processor = _clip_image_processor(self.vision_tower)
        for module in (self.lm, self.projector, self.text_hidden_fcs, self.sam, self.clip):
            module.float().eval().requires_grad_(False)

    # -- prompt ---------------------------------------------------------------------------------------------------
    def prompt(self, query: str, answer: Optional[str] = None) -> str:
        return llava_v1_prompt(query, self.mm_use_im_start_end, answer)

    def prompt_ids(self, query: str, answer: Optional[str] = None) -> list[int]:
        """chat.py's input ids: the llava_v1 prompt, tokenized with `tokenizer_image_token` (one -200 for `<image>`).
        `answer` fills the assistant turn (teacher forcing, e.g. "[SEG].")."""
        return tokenizer_image_token(self.prompt(query, answer), self.tokenize_chunk, bos_id=self.bos_id)

    # -- pieces ---------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def image_features(self, image: Image.Image) -> torch.Tensor:
        """`encode_images`: CLIPImageProcessor on the RGB uint8 array (chat.py), CLIPVisionModel
        `hidden_states[mm_vision_select_layer]` (-2) without CLS, then the projector: (num_patches, hidden)."""
        array = np.array(image.convert("RGB"))
        pixels = self.clip_processor.preprocess(array, return_tensors="pt")["pixel_values"].float()
        out = self.clip(pixel_values=pixels, output_hidden_states=True)
        features = out.hidden_states[self.config.get("mm_vision_select_layer", -2)][:, 1:]
        return self.projector(features)[0]

    @torch.no_grad()
    def sam_image_embeddings(self, image: Image.Image) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
        """chat.py's SAM view: `ResizeLongestSide(img_size).apply_image` (PIL bilinear), (x - mean) / std on 0-255,
        zero-pad bottom/right to img_size, then `image_encoder`. Returns (embeddings, resized size, original size)."""
        array = np.array(image.convert("RGB"))
        resized = self.sam_transform.apply_image(array)
        x = torch.from_numpy(resized).permute(2, 0, 1).contiguous().float()
        x = (x - torch.tensor(SAM_PIXEL_MEAN).view(-1, 1, 1)) / torch.tensor(SAM_PIXEL_STD).view(-1, 1, 1)
        size = self.sam_sizes["img_size"]
        x = F.pad(x, (0, size - x.shape[2], 0, size - x.shape[1]))
        return self.sam.image_encoder(x[None]), tuple(resized.shape[:2]), tuple(array.shape[:2])

    def _embeddings(self, ids: Sequence[int], image_features: torch.Tensor) -> torch.Tensor:
        """`prepare_inputs_labels_for_multimodal` for one image: the -200 id becomes the image features, every other
        id (`<im_start>`/`<im_end>` included) goes through `embed_tokens`."""
        ids = list(ids)
        if ids.count(IMAGE_TOKEN_INDEX) != 1:
            raise ValueError("the LISA reference expects exactly one image token (-200) in input_ids")
        at = ids.index(IMAGE_TOKEN_INDEX)
        embed = self.lm.model.embed_tokens
        before = embed(torch.tensor(ids[:at], dtype=torch.long))
        after = embed(torch.tensor(ids[at + 1:], dtype=torch.long))
        return torch.cat([before, image_features, after])

    @torch.no_grad()
    def _lm(self, ids: Sequence[int], image_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One full forward without cache: (logits (1, T', V), post-norm last hidden state (T', H))."""
        embeds = self._embeddings(ids, image_features)[None]
        hidden = self.lm.model(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                               use_cache=False).last_hidden_state
        return self.lm.lm_head(hidden).float(), hidden[0]

    def seg_rows(self, ids: Sequence[int], num_image_tokens: int) -> list[int]:
        """Rows of the expanded hidden states that LISA reads for the [SEG] tokens of `ids` (model/LISA.py): mask =
        `ids[1:] == seg` + a False at the end, prefixed by (num_image_tokens - 1) Falses (255 for 256 CLIP patches).
        A [SEG] at index s after the image selects row s + num_image_tokens - 2, the hidden state of the token before
        it (the one whose logits predict [SEG])."""
        return [s + num_image_tokens - 2 for s in range(1, len(ids)) if ids[s] == self.seg_token_id]

    @torch.no_grad()
    def decode_masks(self, seg_embeddings: torch.Tensor, image_embeddings: torch.Tensor, resized_size, original_size):
        """LISA's SAM call (model/LISA.py `evaluate`): sparse prompt = the [SEG] embeddings (n, 1, D) (its modified
        prompt encoder concatenates `text_embeds` after no points/boxes), dense = `no_mask_embed` broadcast,
        `mask_decoder(..., multimask_output=False)`, then LISA's `postprocess_masks` (fp32 bilinear to img_size, crop
        to the resized size, bilinear to the original size). Returns (n, H, W) float32 logits."""
        n = seg_embeddings.shape[0]
        if n == 0:
            return torch.zeros((0, *original_size), dtype=torch.float32)
        prompt_encoder = self.sam.prompt_encoder
        _, dense = prompt_encoder(points=None, boxes=None, masks=None)  # no_mask_embed, batch 1
        dense = dense.expand(n, -1, -1, -1)
        low_res, _ = self.sam.mask_decoder(
            image_embeddings=image_embeddings, image_pe=prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=seg_embeddings[:, None, :], dense_prompt_embeddings=dense,
            multimask_output=False)
        size = self.sam_sizes["img_size"]
        masks = F.interpolate(low_res.float(), (size, size), mode="bilinear", align_corners=False)
        masks = masks[..., : resized_size[0], : resized_size[1]]
        masks = F.interpolate(masks, tuple(original_size), mode="bilinear", align_corners=False)
        return masks[:, 0]

    # -- the two entry points -------------------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, image: Image.Image, input_ids: Sequence[int]) -> dict:
        """Teacher-forced forward on `input_ids` (with one -200): `logits` (1, T + num_image_tokens - 1, V) float32,
        `mask_logits` (n_seg, H, W) float32 at the original image size for the [SEG] tokens in `input_ids`, and the
        intermediate `seg_embeddings` (n_seg, out_dim), `num_image_tokens`."""
        ids = [int(i) for i in input_ids]
        features = self.image_features(image)
        logits, hidden = self._lm(ids, features)
        rows = self.seg_rows(ids, features.shape[0])
        seg_embeddings = self.text_hidden_fcs(hidden[rows])
        image_embeddings, resized, original = self.sam_image_embeddings(image)
        masks = self.decode_masks(seg_embeddings, image_embeddings, resized, original)
        return {"logits": logits, "mask_logits": masks, "seg_embeddings": seg_embeddings,
                "num_image_tokens": features.shape[0]}

    @torch.no_grad()
    def generate(self, image: Image.Image, input_ids: Sequence[int], max_new_tokens: int = 32):
        """`LISAForCausalLM.evaluate`: greedy decoding without a KV cache (every step re-runs the whole sequence, image
        included), stopping at `</s>` (kept in the output) or after `max_new_tokens`. The masks come from the LAST
        step's hidden states (over the final sequence minus its last token) at the rows before each [SEG] of the final
        sequence. Returns (new token ids, mask logits (n_seg, H, W) float32)."""
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        ids = [int(i) for i in input_ids]
        features = self.image_features(image)
        new: list[int] = []
        hidden = None
        for _ in range(max_new_tokens):
            logits, hidden = self._lm(ids + new, features)
            token = int(logits[0, -1].argmax())
            new.append(token)
            if token == self.eos_id:
                break
        rows = self.seg_rows(ids + new, features.shape[0])
        seg_embeddings = self.text_hidden_fcs(hidden[rows])
        image_embeddings, resized, original = self.sam_image_embeddings(image)
        return new, self.decode_masks(seg_embeddings, image_embeddings, resized, original)


def sub_state(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _clip_image_processor(folder):
    """The checkpoint tower's CLIPImageProcessor, PIL-backed (transformers 5 names it `CLIPImageProcessorPil`; the
    torchvision-backed one cannot be used here)."""
    import transformers

    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    return cls.from_pretrained(str(folder))


__all__ = [
    "IMAGE_TOKEN_INDEX", "LLAVA_V1_SYSTEM", "SAM_PIXEL_MEAN", "SAM_PIXEL_STD", "TINY_LM_SIZES", "TINY_SAM_SIZES",
    "LisaReference", "SentencePieceChunkTokenizer", "install_torchvision_stand_in", "llava_v1_prompt",
    "load_lisa_state_dict", "quiet_transformers", "sub_state", "tokenizer_image_token", "train_tiny_sentencepiece", "write_tiny_clip", "write_tiny_lisa",
]
