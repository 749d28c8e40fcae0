"""VSM configuration.

A VSM (Visual Search Model, after SEAL / V* and LISA's reasoning segmentation) is a
vision-language model (vision tower + projector + causal LM) whose `<SEG>` and `<loc>` tokens
prompt a SAM mask decoder and OWL-ViT-style box heads. This file is remote code: it imports
only the standard library and transformers, and is copied flat next to every saved model.

References: LISA (Lai et al. 2023), SEAL (Wu & Xie 2023), SAM (Kirillov et al. 2023),
OWL-ViT (Minderer et al. 2022), Janus-Pro (Chen et al. 2025), LLaVA-1.5 (Liu et al. 2023).
"""

import copy
import json
import os
import shutil

from huggingface_hub.dataclasses import strict
from transformers import AddedToken, AutoConfig
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec

DENSE_FEATURE_SOURCES = ("shared", "lm", "detector", "sam")
# Sources whose dense features come from the VLM's own single image-encoder pass.
SINGLE_ENCODER_SOURCES = ("shared", "lm")
VISION_FEATURE_STRATEGIES = ("default", "full")
IMAGE_ATTENTION_MODES = ("causal", "bidirectional", "column_causal")
IMAGE_SCANS = ("row", "column")
# The projector from vision features to LM embeddings: "mlp" is Linear-act-Linear (LLaVA-1.5, Janus-Pro), "linear"
# one Linear (LLaVA-v1, as in LISA and SEAL's VSM).
PROJECTOR_TYPES = ("mlp", "linear")
# The map of image-grid features to the mask decoder's width: "mlp" is Linear-GELU-LayerNorm, "linear" one Linear
# without bias (SEAL's `visual_projection`).
DENSE_PROJECTION_TYPES = ("mlp", "linear")
# How SAM's mask decoder upsamples its grid 4x: "transposed_conv" (SAM's two stride-2 transposed convolutions) or
# "bilinear_conv" (SEAL's: bilinear x2 then a 3x3 convolution, twice).
MASK_UPSCALING_TYPES = ("transposed_conv", "bilinear_conv")

# Special-token ids of the tiny preset: the project's own tokenizer puts its special tokens first
# (see processing_vsm.TINY_SPECIAL_TOKENS), so these ids are fixed by construction.
TINY_PAD_ID, TINY_BOS_ID, TINY_EOS_ID, TINY_IMAGE_ID, TINY_SEG_ID, TINY_LOC_ID = range(6)

# SAM ViT-B/16 at 1024 px (facebook/sam-vit-base config.json); the decoder is the same for every SAM.
SAM_VIT_B = {
    "vision_config": {
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "global_attn_indexes": [2, 5, 8, 11],
        "image_size": 1024,
        "patch_size": 16,
        "output_channels": 256,
    },
    "prompt_encoder_config": {"hidden_size": 256, "image_size": 1024, "patch_size": 16, "mask_input_channels": 16},
    "mask_decoder_config": {
        "hidden_size": 256,
        "mlp_dim": 2048,
        "num_hidden_layers": 2,
        "num_attention_heads": 8,
        "iou_head_depth": 3,
        "iou_head_hidden_dim": 256,
    },
}

# OWL-ViT B/16 at 768 px (google/owlvit-base-patch16 config.json), as used by SEAL's VSM.
OWLVIT_B16 = {
    "vision_config": {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "image_size": 768,
        "patch_size": 16,
    },
    "text_config": {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 8},
    "projection_dim": 512,
}

# SigLIP-L/16 at 384 px, the vision tower of Janus-Pro 1B and 7B
# (deepseek-ai/Janus-Pro-*/config.json "vision_config": siglip_large_patch16_384; 576 patches).
JANUS_SIGLIP_L16_384 = {
    "model_type": "siglip_vision_model",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 384,
    "patch_size": 16,
    "layer_norm_eps": 1e-6,
    "vision_use_head": False,
}

PRESETS = {
    # Trains on 2 CPU cores in minutes: 64 px images, 8x8 patches, a 2-layer 128-wide LM.
    "tiny": {
        "vision_config": {
            "model_type": "siglip_vision_model",
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 64,
            "patch_size": 8,
            "vision_use_head": False,  # VSM reads patch features, never SigLIP's pooled output
        },
        "text_config": {
            "model_type": "llama",
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            # 8 heads of 16 (not 4 of 32): more routes from the instruction to the image positions at the
            # same FLOPs. Measured gain is within seed noise (main job gIoU 0.695 vs 0.676; see the issue note).
            "num_attention_heads": 8,
            "num_key_value_heads": 8,
            "vocab_size": 1024,
            "max_position_embeddings": 512,
            "pad_token_id": TINY_PAD_ID,
            "bos_token_id": TINY_BOS_ID,
            "eos_token_id": TINY_EOS_ID,
            "tie_word_embeddings": False,
        },
        "sam_config": {
            "vision_config": {
                "hidden_size": 32,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "global_attn_indexes": [0],
                "image_size": 64,
                "patch_size": 4,
                "output_channels": 64,
                "window_size": 4,
                "num_pos_feats": 32,  # SAM's positional encoding is 2 * num_pos_feats = the decoder width
            },
            "prompt_encoder_config": {"hidden_size": 64, "image_size": 64, "patch_size": 4, "mask_input_channels": 8},
            "mask_decoder_config": {
                "hidden_size": 64,
                "mlp_dim": 256,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "iou_head_depth": 3,
                "iou_head_hidden_dim": 64,
            },
        },
        "detector_config": {
            "vision_config": {
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "image_size": 64,
                "patch_size": 8,
            },
            "text_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2},
            "projection_dim": 64,
        },
        "image_token_index": TINY_IMAGE_ID,
        "seg_token_index": TINY_SEG_ID,
        "loc_token_index": TINY_LOC_ID,
        "dense_feature_source": "lm",
        # One raster scan in which each patch attends to the columns left of it and its own column down to
        # itself. A causal raster scan alone left "left" / "right" at chance (session 5); a second, column-order
        # copy fixed that at twice the LM positions, and a bidirectional block learned "left" / "right" too late
        # on 2 seeds of 4. This mask gives one copy what the column copy gave with 64 image positions
        # instead of 128: the main job trains 3800 steps in the time of 3000 (7.3 vs 5.8 steps/s), and more
        # steps are what kind (circle vs square, the last thing learned) needs (issue note, session 11).
        "image_scans": ["row"],
        "image_attention": "column_causal",
        # Half the heads see the whole image block (both ways): a shape seen whole, while the column-causal heads
        # keep left / right. Same cost; at 3800 steps, on a 2000-sample test split, kind 0.75-0.79 and cIoU
        # 0.85-0.89 on six seeds (column-causal heads alone: kind 0.73 / 0.77, cIoU 0.84 / 0.86 on two); 6 of 8
        # heads, or a whole-block second layer, lost "left" / "right" on a seed (issue note, session 12).
        "bidirectional_image_heads": 4,
        # A small normalised CNN's per-patch features added to what the LM reads: the tiny SigLIP tower never told a
        # circle from a square, so "the circle" beside a square was a coin flip. With it and the train split's hard
        # kind negatives and kind share, on a 2000-sample test split, seeds 0-5: kind 0.81-0.99 (0.97-0.99 on four),
        # cIoU 0.87-0.98 (before: kind 0.75-0.79, cIoU 0.85-0.89). Seeds 4 / 5 with hard negatives and the old kind
        # share: kind 0.85 / 0.84 with the stem, 0.70 / 0.72 without. About 5% more per step (issue note, session 14).
        "conv_stem_channels": 32,
        # docs/design.md: Dice 2.0 (not LISA's 0.5) was needed for shapes at ~5% foreground.
        "dice_loss_weight": 2.0,
        # The `<loc>` score is what visual search decides on (SEAL's 0.5 "found"): plain BCE (focal alpha 0.5, gamma 0)
        # keeps it a calibrated probability. With OWL-ViT's focal loss (0.25, 2) no patch of the main job's model
        # ever scored above 0.5 (held-out `<loc>` median 0.37; search patches holding the target 0.29, without it
        # 0.17), and the search never stopped (issue 23 note).
        "focal_alpha": 0.5,
        "focal_gamma": 0.0,
        # The 8x8 grid of 8-px patches cannot place a 10-28 px shape's edges to the pixel: the refiner snaps
        # them to the image (measured: held-out gIoU 0.66 -> 0.80 in the main job, colour-only 0.85 -> 0.97).
        "mask_refiner_channels": 16,
        # Dilated, the refiner sees a whole shape (37 px) instead of 11: masks stopped spilling onto part of a
        # neighbour (held-out gIoU 0.84 -> 0.89, seed 0, with both scans; issue note, session 5). Its middle three
        # convolutions run on a 2x pooled grid (dilations 1, 2, 4 there: the same reach) at half the cost: a
        # training step took 0.16 s instead of 0.19 s (issue note, session 7).
        "mask_refiner_depth": 5,
        "mask_refiner_dilations": [1, 1, 2, 4, 1],
        "mask_refiner_stride": 2,
        # The `<SEG>` prompt modulates the refiner: held-out gIoU / cIoU 0.905 / 0.850 vs 0.870 / 0.819 without
        # (seed 0, pooled refiner; issue note, session 7).
        "mask_refiner_prompted": True,
    },
    # Janus-Pro-1B (deepseek-ai/Janus-Pro-1B config.json: language_config hidden 2048, 24 layers,
    # 16 heads, intermediate 5632, vocab 102400; aligner mlp_gelu depth 2 -> 2048).
    "janus-pro-1b": {
        "vision_config": JANUS_SIGLIP_L16_384,
        "text_config": {
            "model_type": "llama",
            "hidden_size": 2048,
            "intermediate_size": 5632,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "num_key_value_heads": 16,
            "vocab_size": 102400,
            "max_position_embeddings": 16384,
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": False,
        },
        "sam_config": SAM_VIT_B,
        "detector_config": OWLVIT_B16,
        "image_token_index": 100581,
        # Janus-Pro's tokenizer fills ~100k of its 102400 embedding rows: the new tokens take spare rows.
        "seg_token_index": 102398,
        "loc_token_index": 102399,
        "dense_feature_source": "shared",
    },
    # Janus-Pro-7B (deepseek-ai/Janus-Pro-7B config.json: language_config hidden 4096, 30 layers,
    # 32 heads, intermediate 11008, vocab 102400; aligner mlp_gelu depth 2 -> 4096).
    "janus-pro-7b": {
        "vision_config": JANUS_SIGLIP_L16_384,
        "text_config": {
            "model_type": "llama",
            "hidden_size": 4096,
            "intermediate_size": 11008,
            "num_hidden_layers": 30,
            "num_attention_heads": 32,
            "num_key_value_heads": 32,
            "vocab_size": 102400,
            "max_position_embeddings": 16384,
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": False,
        },
        "sam_config": SAM_VIT_B,
        "detector_config": OWLVIT_B16,
        "image_token_index": 100581,
        # Janus-Pro's tokenizer fills ~100k of its 102400 embedding rows: the new tokens take spare rows.
        "seg_token_index": 102398,
        "loc_token_index": 102399,
        "dense_feature_source": "shared",
    },
    # LLaVA-1.5-7B (llava-hf/llava-1.5-7b-hf config.json: CLIP ViT-L/14 at 336 px, feature layer -2
    # without CLS; Vicuna-7B hidden 4096, 32 layers, 32 heads, intermediate 11008, vocab 32064).
    "llava-1.5-7b": {
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "image_size": 336,
            "patch_size": 14,
            "projection_dim": 768,
        },
        "text_config": {
            "model_type": "llama",
            "hidden_size": 4096,
            "intermediate_size": 11008,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 32,
            "vocab_size": 32064,
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5,
            "pad_token_id": 32001,
            "tie_word_embeddings": False,
        },
        "sam_config": SAM_VIT_B,
        "detector_config": OWLVIT_B16,
        "image_token_index": 32000,
        # The tokenizer has 32002 tokens (<image> 32000, <pad> 32001): the new tokens take spare rows.
        "seg_token_index": 32002,
        "loc_token_index": 32003,
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "dense_feature_source": "shared",
    },
}


@strict
class VSMConfig(PreTrainedConfig):
    r"""
    Configuration of a [`VSMForCausalLM`].

    Args:
        text_config (`dict` or `PreTrainedConfig`, *optional*): the causal LM (Llama-style). Also
            reachable as `language_config` (Janus-Pro's name).
        vision_config (`dict` or `PreTrainedConfig`, *optional*): the VLM's vision tower (SigLIP or CLIP).
        detector_config (`dict` or `OwlViTConfig`, *optional*): OWL-ViT. Gives the `<loc>` query size
            (`text_config.hidden_size`) and, for `dense_feature_source="detector"`, the dense encoder.
        sam_config (`dict` or `SamConfig`, *optional*): SAM. Its prompt encoder and mask decoder turn
            `<SEG>` into masks; its image encoder is built only for `dense_feature_source="sam"`.
        dense_feature_source (`str`): where the mask decoder and box heads read image features, one of
            `"shared"` (VLM vision-tower patches), `"lm"` (LM hidden states at the image positions),
            `"detector"` (OWL-ViT encoder) or `"sam"` (SAM image encoder). See docs/design.md.
        image_token_index, seg_token_index, loc_token_index (`int`): ids of `<image>`, `<SEG>`, `<loc>`. The
            image token may be past the LM's vocabulary (a placeholder, never embedded or generated).
            `loc_token_index=None` builds no box heads (LISA has none); `loc_token_index == seg_token_index` makes one
            token give both a mask and a box (SEAL's `[LOC]`).
        vision_feature_layer (`int`): which vision-tower layer feeds the projector (-1 = last).
        vision_feature_select_strategy (`str`): `"default"` drops a CLS token when the tower has one,
            `"full"` keeps every position.
        projector_type (`str`): `"mlp"` (Linear-act-Linear, the default) or `"linear"` (one Linear, LLaVA-v1).
        projector_hidden_act (`str`): activation between the projector's two linear layers.
        dense_projection_type (`str`): how image-grid features reach the mask decoder's width: `"mlp"`
            (Linear-GELU-LayerNorm, the default) or `"linear"` (one Linear without bias, SEAL's `visual_projection`).
        mask_upscaling (`str`): how the mask decoder upsamples its grid 4x: `"transposed_conv"` (SAM's, the default)
            or `"bilinear_conv"` (SEAL's: bilinear x2 and a 3x3 convolution, twice).
        image_attention (`str`): how the positions of one image attend to each other in the LM. `"causal"`: as
            pretrained. `"bidirectional"`: each sees the whole image (a prefix-LM block, as PaliGemma).
            `"column_causal"` (one raster scan only): each patch sees the columns left of it and its own column
            down to itself, what a causal LM sees of a column-order scan, while the patches stay in raster
            order. Text is causal in every mode.
        bidirectional_image_heads (`int`): how many of each LM layer's attention heads (the first ones) see the
            whole image block both ways whatever `image_attention` says; the others follow it. 0 (the default):
            every head follows `image_attention`. With `"column_causal"` this keeps that mode's sense of left and
            right in some heads while the others see a shape whole.
        image_scans (`list[str]`): the orders in which one image's patch features are fed to the LM, each a
            full copy, one after the other: `"row"` (raster order, as every pretrained VLM) and / or `"column"`
            (column-major). A causal LM finds "before me in the sequence" for free: in raster order that is
            "above me", in column order "left of me". With `["row", "column"]` each image takes twice the LM
            positions and the `"lm"` dense features read both copies of each patch.
        text_hidden_fcs_dropout (`float`): dropout at the end of the `<SEG>` / `<loc>` projections.
        mask_refiner_channels (`int`): width of the mask refiner, a few convolutions over the image pixels and
            the decoded mask that add a residual to the mask logits so its edges follow the image (in the spirit
            of SAM-HQ's high-resolution fusion). 0 (the default) builds no refiner: SAM's decoder as released.
        mask_refiner_depth, mask_refiner_kernel_size (`int`): its number of convolutions and their kernel size.
        mask_refiner_dilations (`list[int]`, *optional*): one dilation per convolution (default: all 1). Growing
            dilations widen its view to whole objects at the same cost, e.g. `[1, 2, 4, 8, 1]`.
        mask_refiner_stride (`int`): > 1 runs the refiner's convolutions between its first and last on a grid
            pooled by this factor, added back upsampled (a U-Net skip): about the same reach at a fraction of the
            cost. 1 (the default): all at full resolution, one after the other.
        mask_refiner_prompted (`bool`): the `<SEG>` prompt scales and shifts the refiner's first features
            (FiLM), so the refiner, which sees the pixels at full resolution, knows what was asked for.
        conv_stem_channels (`int`): width of a small convolutional encoder of the pixels whose per-patch features
            are added to the projected vision features the LM reads (a hybrid stem): strided 3x3 convolutions (half
            this width until the last) down to the patch grid, then `conv_stem_depth` more at this width, each
            with GroupNorm; its output projection starts at zero. A ViT trained from scratch with 8-px patches
            learns the outline of a shape (a circle from a square) slowly, a normalised convolution quickly. 0 (the
            default) builds none: the VLM as pretrained.
        conv_stem_depth (`int`): its 3x3 convolutions on the patch grid (each widens its view by two patches).
        conv_stem_groups (`int`): GroupNorm groups of its convolutions.
        ce_loss_weight, bce_loss_weight, dice_loss_weight, iou_loss_weight, det_loss_weight (`float`):
            weights of the combined loss `ce*CE + bce*BCE + dice*Dice + iou*IoU-pred + det*L_det`
            (LISA / SEAL defaults 1.0, 2.0, 0.5, 0.0, 0.1).
        det_class_weight, det_l1_weight, det_giou_weight (`float`): parts of `L_det` and of its
            Hungarian matching cost (DETR / OWL-ViT: 2, 5, 2).
        focal_alpha, focal_gamma (`float`): the focal loss of the `<loc>` class head.
        dice_scale, loss_eps (`float`): LISA's Dice scale (1000) and epsilon (1e-6).
    """

    model_type = "vsm"
    attribute_map = {"language_config": "text_config"}
    sub_configs_defaults = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="siglip_vision_model"),
        "detector_config": SubConfigSpec(config_class=AutoConfig, model_type="owlvit"),
        "sam_config": SubConfigSpec(config_class=AutoConfig, model_type="sam"),
    }

    text_config: dict | PreTrainedConfig | None = None
    vision_config: dict | PreTrainedConfig | None = None
    detector_config: dict | PreTrainedConfig | None = None
    sam_config: dict | PreTrainedConfig | None = None
    dense_feature_source: str = "shared"
    image_token_index: int = 32000
    seg_token_index: int = 32001
    loc_token_index: int | None = 32002
    vision_feature_layer: int = -1
    vision_feature_select_strategy: str = "default"
    projector_type: str = "mlp"
    projector_hidden_act: str = "gelu"
    dense_projection_type: str = "mlp"
    mask_upscaling: str = "transposed_conv"
    image_attention: str = "causal"
    bidirectional_image_heads: int = 0
    image_scans: list[str] | tuple[str, ...] = ("row",)
    text_hidden_fcs_dropout: float = 0.0
    mask_refiner_channels: int = 0
    mask_refiner_depth: int = 3
    mask_refiner_kernel_size: int = 3
    mask_refiner_dilations: list[int] | None = None
    mask_refiner_stride: int = 1
    mask_refiner_prompted: bool = False
    conv_stem_channels: int = 0
    conv_stem_depth: int = 2
    conv_stem_groups: int = 4
    ce_loss_weight: float = 1.0
    bce_loss_weight: float = 2.0
    dice_loss_weight: float = 0.5
    iou_loss_weight: float = 0.0
    det_loss_weight: float = 0.1
    det_class_weight: float = 2.0
    det_l1_weight: float = 5.0
    det_giou_weight: float = 2.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    dice_scale: float = 1000.0
    loss_eps: float = 1e-6
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        # `language_config` is Janus-Pro's name for the LM sub-config.
        if self.text_config is None and "language_config" in kwargs:
            self.text_config = kwargs.pop("language_config")
        super().__post_init__(**kwargs)
        if self.dense_feature_source not in DENSE_FEATURE_SOURCES:
            raise ValueError(
                f"`dense_feature_source` must be one of {set(DENSE_FEATURE_SOURCES)}, got {self.dense_feature_source!r}."
            )
        if self.vision_feature_select_strategy not in VISION_FEATURE_STRATEGIES:
            raise ValueError(
                "`vision_feature_select_strategy` must be one of "
                f"{set(VISION_FEATURE_STRATEGIES)}, got {self.vision_feature_select_strategy!r}."
            )
        choices_of = {"projector_type": PROJECTOR_TYPES, "dense_projection_type": DENSE_PROJECTION_TYPES,
                      "mask_upscaling": MASK_UPSCALING_TYPES}
        for name, choices in choices_of.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"`{name}` must be one of {set(choices)}, got {getattr(self, name)!r}.")
        if self.image_attention not in IMAGE_ATTENTION_MODES:
            raise ValueError(f"`image_attention` must be one of {set(IMAGE_ATTENTION_MODES)}, got {self.image_attention!r}.")
        num_heads = self.text_config.num_attention_heads
        if not 0 <= self.bidirectional_image_heads <= num_heads:
            raise ValueError(
                f"`bidirectional_image_heads` must be between 0 and the LM's {num_heads} attention heads, got "
                f"{self.bidirectional_image_heads}."
            )
        scans = self.image_scans = list(self.image_scans)
        if not scans or len(set(scans)) != len(scans) or not set(scans) <= set(IMAGE_SCANS):
            raise ValueError(f"`image_scans` must be distinct values among {IMAGE_SCANS}, got {scans!r}.")
        if self.image_attention == "column_causal" and (self.image_scans != ["row"] or self.keeps_cls_token):
            raise ValueError(
                "`image_attention='column_causal'` needs one raster scan of the patch grid alone "
                f"(image_scans=['row'], no CLS position), got image_scans={scans!r}."
            )
        if "column" in self.image_scans and self.keeps_cls_token:
            raise ValueError(
                "`image_scans` with 'column' needs the patch grid alone; this CLIP tower keeps its CLS position "
                "(vision_feature_select_strategy='full'): use 'default'."
            )
        if self.mask_refiner_channels < 0 or self.mask_refiner_depth < 1 or self.mask_refiner_kernel_size % 2 == 0:
            raise ValueError(
                "The mask refiner needs `mask_refiner_channels` >= 0, `mask_refiner_depth` >= 1 and an odd "
                f"`mask_refiner_kernel_size`, got {self.mask_refiner_channels}, {self.mask_refiner_depth}, "
                f"{self.mask_refiner_kernel_size}."
            )
        dilations = self.mask_refiner_dilations
        if dilations is not None and (len(dilations) != self.mask_refiner_depth or min(dilations) < 1):
            raise ValueError(
                f"`mask_refiner_dilations` needs one dilation >= 1 per convolution (mask_refiner_depth="
                f"{self.mask_refiner_depth}), got {dilations}."
            )
        if self.mask_refiner_prompted and self.mask_refiner_depth < 2:
            raise ValueError(
                "`mask_refiner_prompted` needs `mask_refiner_depth` >= 2 (features to modulate before the last "
                f"convolution), got {self.mask_refiner_depth}."
            )
        if self.mask_refiner_stride < 1 or (self.mask_refiner_stride > 1 and self.mask_refiner_depth < 3):
            raise ValueError(
                "`mask_refiner_stride` must be >= 1, and > 1 needs `mask_refiner_depth` >= 3 (a full-resolution "
                f"convolution on each side of the pooled ones), got stride {self.mask_refiner_stride}, depth "
                f"{self.mask_refiner_depth}."
            )
        if self.conv_stem_channels:
            half, groups = self.conv_stem_channels // 2, self.conv_stem_groups
            if self.conv_stem_channels < 0 or self.conv_stem_depth < 0 or groups < 1 or half % groups:
                raise ValueError(
                    "The convolutional stem needs `conv_stem_depth` >= 0 and `conv_stem_channels` / 2 divisible by "
                    f"`conv_stem_groups`, got channels {self.conv_stem_channels}, depth {self.conv_stem_depth}, "
                    f"groups {groups}."
                )
        special_ids = {"image_token_index": self.image_token_index, "seg_token_index": self.seg_token_index}
        if self.loc_token_index is not None:
            special_ids["loc_token_index"] = self.loc_token_index
        if self.image_token_index in (self.seg_token_index, self.loc_token_index):
            raise ValueError(f"`<image>` needs a token id of its own, distinct from `<SEG>` and `<loc>`, got {special_ids}.")
        vocab_size = self.text_config.vocab_size
        for name, token_id in special_ids.items():
            # The image token only marks where image features go (its embedding row is never read): it may lie past
            # the LM's rows, as LLaVA's -200 placeholder does (a converted LISA or SEAL keeps its vocabulary so).
            limit = float("inf") if name == "image_token_index" else vocab_size
            if not 0 <= token_id < limit:
                raise ValueError(f"`{name}`={token_id} is outside the LM vocabulary (vocab_size={vocab_size}).")
        if self.dense_feature_source == "sam":
            sam_width = self.sam_config.vision_config.output_channels
            if sam_width != self.dense_size:
                raise ValueError(
                    f"dense_feature_source='sam': the SAM image encoder gives {sam_width}-wide embeddings "
                    f"(sam_config.vision_config.output_channels) but the mask decoder reads {self.dense_size} "
                    "(sam_config.mask_decoder_config.hidden_size)."
                )

    @property
    def has_box_heads(self) -> bool:
        """Whether the model has `<loc>` box heads (`loc_token_index` is set)."""
        return self.loc_token_index is not None

    @property
    def dense_size(self) -> int:
        """Width of the dense features the mask decoder reads (the SAM prompt / decoder width)."""
        return self.sam_config.mask_decoder_config.hidden_size

    @property
    def prompt_grid_size(self) -> int:
        """Side of the square feature grid the SAM prompt encoder and mask decoder work on."""
        return self.sam_config.prompt_encoder_config.image_embedding_size

    @property
    def num_image_patches(self) -> int:
        """Patches of the vision tower's square grid."""
        return (self.vision_config.image_size // self.vision_config.patch_size) ** 2

    @property
    def keeps_cls_token(self) -> bool:
        """Whether the LM reads the vision tower's CLS position (a CLIP tower with the "full" strategy)."""
        return self.vision_config.model_type == "clip_vision_model" and self.vision_feature_select_strategy == "full"

    @property
    def num_image_tokens(self) -> int:
        """How many LM positions one image takes: its patches (plus CLS when kept), once per scan."""
        return (self.num_image_patches + int(self.keeps_cls_token)) * len(self.image_scans)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "VSMConfig":
        """A config with the shapes of a named preset (random weights, no download).

        `"tiny"` trains on a CPU in minutes; `"janus-pro-1b"`, `"janus-pro-7b"` and `"llava-1.5-7b"`
        carry the published sizes of those models (with SAM ViT-B and OWL-ViT B/16).
        """
        if name not in PRESETS:
            raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(PRESETS)}.")
        kwargs = copy.deepcopy(PRESETS[name])
        kwargs.update(overrides)
        kwargs["sam_config"] = _with_model_type(kwargs["sam_config"], "sam")
        kwargs["detector_config"] = _with_model_type(kwargs["detector_config"], "owlvit")
        return cls(**kwargs)


    @classmethod
    def from_component_configs(
        cls,
        vlm_config,
        sam_config,
        detector_config=None,
        dense_feature_source: str = "shared",
        seg_token_index: int | None = None,
        loc_token_index: int | None = None,
        **overrides,
    ) -> "VSMConfig":
        """A config with the shapes of pretrained components (used by `VSMForCausalLM.from_components`).

        Args:
            vlm_config: a `JanusConfig` (its SigLIP-shaped vision model becomes a `siglip_vision_model`, its
                aligner the projector; the image-generation parts are dropped) or a `LlavaConfig`.
            sam_config: a `SamConfig` (prompt encoder and mask decoder; its image encoder for "sam").
            detector_config: an `OwlViTConfig`; `None` takes OWL-ViT B/16's shapes (only the "detector"
                source reads a detector's weights; the others size the `<loc>` query from it).
            seg_token_index, loc_token_index: ids of `<SEG>` / `<loc>` (default: the two ids after the LM
                vocabulary); the LM vocabulary grows to hold them.
            **overrides: any other `VSMConfig` field (loss weights, ...).
        Mismatched components raise a `ValueError` naming both sides.
        """
        vlm_type = getattr(vlm_config, "model_type", None)
        if vlm_type not in VLM_MODEL_TYPES:
            raise ValueError(
                f"Unknown VLM architecture {vlm_type!r} ({type(vlm_config).__name__}); VSM composes "
                f"{' or '.join(VLM_MODEL_TYPES)} models (JanusForConditionalGeneration, LlavaForConditionalGeneration)."
            )
        sam_type = getattr(sam_config, "model_type", None)
        if sam_type != "sam":
            raise ValueError(f"`sam` must be a SamModel checkpoint (model_type 'sam'), got model_type {sam_type!r}.")
        sam_width = sam_config.vision_config.output_channels
        decoder_width = sam_config.mask_decoder_config.hidden_size
        prompt_width = sam_config.prompt_encoder_config.hidden_size
        if not sam_width == decoder_width == prompt_width:
            raise ValueError(
                f"SAM image embeddings are {sam_width} wide (vision_config.output_channels) but its mask decoder "
                f"reads {decoder_width} (mask_decoder_config.hidden_size) and its prompt encoder {prompt_width}."
            )
        if detector_config is None:
            detector_config = {"model_type": "owlvit", **copy.deepcopy(OWLVIT_B16)}
        detector_type = detector_config.get("model_type") if isinstance(detector_config, dict) else detector_config.model_type
        if detector_type != "owlvit":
            raise ValueError(
                f"`detector` must be an OWL-ViT checkpoint (OwlViTForObjectDetection, model_type 'owlvit'), got "
                f"model_type {detector_type!r}: VSM's box heads are OWL-ViT's."
            )

        text_config = vlm_config.text_config.to_dict()
        if seg_token_index is None or loc_token_index is None:  # ids not known yet: after the vocabulary
            seg_token_index, loc_token_index = text_config["vocab_size"], text_config["vocab_size"] + 1
        text_config["vocab_size"] = max(text_config["vocab_size"], seg_token_index + 1, loc_token_index + 1)
        if vlm_type == "janus":
            vision_config, vlm_fields = _janus_vision_fields(vlm_config)
        else:
            vision_config, vlm_fields = _llava_vision_fields(vlm_config)
        kwargs = {
            "text_config": text_config,
            "vision_config": vision_config,
            "sam_config": sam_config.to_dict(),
            "detector_config": detector_config if isinstance(detector_config, dict) else detector_config.to_dict(),
            "dense_feature_source": dense_feature_source,
            "tie_word_embeddings": bool(getattr(vlm_config, "tie_word_embeddings", False)),
            "seg_token_index": seg_token_index,
            "loc_token_index": loc_token_index,
            **vlm_fields,
        }
        kwargs.update(overrides)
        return cls(**kwargs)


# VLM families `from_component_configs` knows how to map (transformers model_type).
VLM_MODEL_TYPES = ("janus", "llava")
# The tokens a VSM adds to a pretrained VLM's tokenizer.
SEG_TOKEN, LOC_TOKEN = "<SEG>", "<loc>"


def add_vsm_tokens(tokenizer) -> tuple[int, int]:
    """Adds `<SEG>` and `<loc>` to a pretrained VLM's tokenizer as special tokens (one id each in any
    context, never normalised) unless it has them; returns their ids (seg, loc). Deterministic, so the
    model and the processor built from the same tokenizer agree on the ids."""
    vocab = tokenizer.get_vocab()
    missing = [token for token in (SEG_TOKEN, LOC_TOKEN) if token not in vocab]
    tokenizer.add_tokens([AddedToken(token, special=True, normalized=False) for token in missing], special_tokens=True)
    return tokenizer.convert_tokens_to_ids(SEG_TOKEN), tokenizer.convert_tokens_to_ids(LOC_TOKEN)


def _janus_vision_fields(vlm_config):
    """Janus-Pro's vision model is SigLIP's architecture (same layers, `projection_layer` named `out_proj`
    there) and its aligner is Linear-act-Linear: the VSM builds them as `siglip_vision_model` + projector."""
    vision = vlm_config.vision_config
    text_size = vlm_config.text_config.hidden_size
    unsupported = {
        "depth == 2 (aligner Linear-act-Linear)": vision.depth == 2,
        f"projection_dim == text hidden_size ({text_size})": vision.projection_dim == text_size,
        "use_qk_norm False": not vision.use_qk_norm,
        "attention_bias True": vision.attention_bias,
    }
    failed = [name for name, ok in unsupported.items() if not ok]
    if failed:
        raise ValueError(f"This Janus vision config cannot map onto the VSM's SigLIP tower + projector: needs {failed}.")
    image_size = vision.image_size if isinstance(vision.image_size, int) else vision.image_size[0]
    patch_size = vision.patch_size if isinstance(vision.patch_size, int) else vision.patch_size[0]
    vision_config = {
        "model_type": "siglip_vision_model",
        "hidden_size": vision.hidden_size,
        "intermediate_size": int(vision.hidden_size * vision.mlp_ratio),
        "num_hidden_layers": vision.num_hidden_layers,
        "num_attention_heads": vision.num_attention_heads,
        "num_channels": vision.num_channels,
        "image_size": image_size,
        "patch_size": patch_size,
        "hidden_act": vision.hidden_act,
        "layer_norm_eps": vision.layer_norm_eps,
        "attention_dropout": vision.attention_dropout,
        "vision_use_head": False,
    }
    fields = {
        "image_token_index": vlm_config.image_token_id,
        "vision_feature_layer": -1,  # Janus reads the post-layernorm last layer
        "vision_feature_select_strategy": "default",
        "projector_hidden_act": vision.hidden_act,  # Janus's aligner uses the vision activation
    }
    return vision_config, fields


def _llava_vision_fields(vlm_config):
    """LLaVA's vision tower is built as is; its projector is the VSM's (`linear_1`, act, `linear_2`)."""
    if not isinstance(vlm_config.vision_feature_layer, int):
        raise ValueError(
            f"LLaVA vision_feature_layer={vlm_config.vision_feature_layer!r}: the VSM projector reads one layer (an int)."
        )
    if not getattr(vlm_config, "multimodal_projector_bias", True):
        raise ValueError("LLaVA multimodal_projector_bias=False: the VSM projector's linear layers have biases.")
    fields = {
        "image_token_index": vlm_config.image_token_id,
        "vision_feature_layer": vlm_config.vision_feature_layer,
        "vision_feature_select_strategy": vlm_config.vision_feature_select_strategy,
        "projector_hidden_act": vlm_config.projector_hidden_act,
    }
    return vlm_config.vision_config.to_dict(), fields


def remote_code_path(module_name: str, anchor_file: str) -> str | None:
    """Where `<module_name>.py` is: beside `anchor_file` (a saved model folder, where the modules lie
    flat) or in its package folder (this repository's layout, `<root>/<name>/<name>.py`)."""
    here = os.path.dirname(os.path.abspath(anchor_file))
    for candidate in (os.path.join(here, f"{module_name}.py"), os.path.join(os.path.dirname(here), module_name, f"{module_name}.py")):
        if os.path.isfile(candidate):
            return candidate
    return None


def export_remote_code(save_directory, anchor_file: str, module_names, json_name: str, auto_map: dict, nested_auto_maps=None):
    """Makes a saved folder load with `trust_remote_code=True` where this project is not installed:
    copies the flat modules into it and merges `auto_map` into its `json_name` (and, for each key of
    `nested_auto_maps`, into that nested dict, which is where `AutoImageProcessor` looks)."""
    save_directory = str(save_directory)
    for name in module_names:
        source, target = remote_code_path(name, anchor_file), os.path.join(save_directory, f"{name}.py")
        if source is not None and not (os.path.exists(target) and os.path.samefile(source, target)):
            shutil.copyfile(source, target)
    path = os.path.join(save_directory, json_name)
    with open(path, encoding="utf-8") as handle:
        content = json.load(handle)
    content["auto_map"] = {**content.get("auto_map", {}), **auto_map}
    for key, nested_map in (nested_auto_maps or {}).items():
        if isinstance(content.get(key), dict):
            content[key]["auto_map"] = {**content[key].get("auto_map", {}), **nested_map}
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(content, indent=2, sort_keys=True) + "\n")


def _with_model_type(sub_config, model_type: str):
    if isinstance(sub_config, dict):
        return {"model_type": model_type, **sub_config}
    return sub_config


__all__ = ["VSMConfig", "DENSE_FEATURE_SOURCES", "SINGLE_ENCODER_SOURCES", "add_vsm_tokens", "export_remote_code"]
