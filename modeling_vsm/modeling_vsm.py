"""VSM: a vision-language model whose `<SEG>` and `<loc>` tokens become masks and boxes.

The VLM (vision tower + projector + causal LM, shaped like LLaVA / Janus-Pro) reads an image
and an instruction and answers in text. The LM hidden state that predicts a `<SEG>` token is
projected by `text_hidden_fcs_seg` into a SAM prompt and decoded by SAM's prompt encoder and
mask decoder (LISA); the one that predicts `<loc>` is projected by `text_hidden_fcs_det` into
the query of OWL-ViT's class and box heads (SEAL's VSM). The dense image features both heads
read come from `config.dense_feature_source` (docs/design.md).

References: LISA (Lai et al. 2023, arXiv:2308.00692), SEAL / V* (Wu & Xie 2023,
arXiv:2312.14135), SAM (Kirillov et al. 2023), OWL-ViT (Minderer et al. 2022), DETR's
Hungarian matching (Carion et al. 2020), LLaVA (Liu et al. 2023), Janus-Pro (Chen et al. 2025).
Deviations: the mask decoder may read the VLM's own features ("shared") or the LM's hidden
states at the image positions ("lm"), so one image-encoder pass serves text and masks.

This file is remote code: it is copied flat next to every saved model, so it imports only the
standard library, torch, transformers and its sibling `configuration_vsm`.
"""

import copy
import gc
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.generation.utils import GenerateDecoderOnlyOutput
from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPast, BaseModelOutputWithPooling
from transformers.models.owlvit.modeling_owlvit import (
    OwlViTBoxPredictionHead,
    OwlViTClassPredictionHead,
    OwlViTVisionModel,
)
from transformers.models.sam.modeling_sam import SamMaskDecoder, SamPositionalEmbedding, SamPromptEncoder
from transformers.utils import ModelOutput, logging

try:
    from .configuration_vsm import VSMConfig, add_vsm_tokens, export_remote_code
except ImportError:
    from configuration_vsm.configuration_vsm import VSMConfig, add_vsm_tokens, export_remote_code

logger = logging.get_logger(__name__)

IGNORE_INDEX = -100  # label of positions that carry no text loss
MASK_IGNORE_VALUE = 255  # LISA / ReasonSeg: pixels excluded from the mask losses and metrics
LOGIT_THRESHOLD = 0.0  # a pixel is in the mask when its logit > 0
BOX_BIAS_EPS = 1e-4  # OWL-ViT's epsilon in the inverse-sigmoid box bias
SAM_MASK_UPSCALE = 4  # SAM's mask decoder upsamples its grid twice by 2
SAM_POSITIONAL_SCALE = 1.0
CPU_MASK_DECODE_BYTES = 4 * 2**20  # on a CPU, image-embedding copies per mask-decoder call (a cache's worth)
TORCH_DEFAULT_INIT_TYPES = (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)
REMOTE_CODE_MODULES = ("configuration_vsm", "modeling_vsm", "processing_vsm")
MODEL_AUTO_MAP = {
    "AutoConfig": "configuration_vsm.VSMConfig",
    "AutoModel": "modeling_vsm.VSMForCausalLM",
    "AutoModelForCausalLM": "modeling_vsm.VSMForCausalLM",
}
EMBEDDING_KEYS = ("model.language_model.embed_tokens.weight", "lm_head.weight")
# The KV cache's keyword and output field: `cache` from transformers 5.24 on, `past_key_values` before.
CACHE_NAME = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"
# State-dict maps of `from_components`: (source prefix, VSM prefix or None = dropped), first match wins.
JANUS_KEY_MAP = (
    ("model.vision_model.", "model.vision_tower."),
    ("model.aligner.fc1.", "model.multi_modal_projector.linear_1."),
    ("model.aligner.hidden_layers.0.", "model.multi_modal_projector.linear_2."),
    ("model.language_model.", "model.language_model."),
    ("lm_head.", "lm_head."),
    ("model.vqmodel.", None),  # image generation: dropped
    ("model.generation_", None),
)
JANUS_RENAMES = ((".self_attn.projection_layer.", ".self_attn.out_proj."),)  # Janus vision layer -> SigLIP's
LLAVA_KEY_MAP = (
    ("model.vision_tower.", "model.vision_tower."),
    ("model.multi_modal_projector.", "model.multi_modal_projector."),
    ("model.language_model.", "model.language_model."),
    ("lm_head.", "lm_head."),
)
SAM_KEY_MAP = (
    ("shared_image_embedding.", "prompt_encoder.shared_embedding."),  # tied to the prompt encoder's in SamModel
    ("prompt_encoder.", "prompt_encoder."),
    ("mask_decoder.", "mask_decoder."),
)
SAM_ENCODER_KEY_MAP = (("vision_encoder.", "dense_encoder.vision_encoder."),)
DETECTOR_KEY_MAP = (
    ("owlvit.vision_model.", "dense_encoder.vision_model.vision_model."),
    ("layer_norm.", "dense_encoder.layer_norm."),
    ("class_head.", "class_head."),
    ("box_head.", "box_head."),
    ("owlvit.", None),  # the text tower and projections: dropped
)


# ----------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------


@dataclass
class VSMCausalLMOutput(ModelOutput):
    """
    Output of [`VSMForCausalLM.forward`].

    Args:
        loss: the weighted sum `ce*CE + bce*BCE + dice*Dice + iou*IoU + det*L_det` (when targets are given).
        logits: (B, T, V) next-token scores.
        cache (transformers >= 5.24; `past_key_values` before): the LM's KV cache.
        pred_masks: one tensor per sample, (n_i, H_m, W_m) mask logits on the square image frame (the
            image resized by its longest side and padded bottom / right), one per `<SEG>` in `input_ids`.
        pred_boxes: one tensor per sample, (m_i, 4) boxes, normalised (cx, cy, w, h) on the same frame,
            one per `<loc>` in `input_ids`.
        box_scores: one tensor per sample, (m_i,) the box's probability.
        patch_boxes, patch_box_scores: one tensor per sample, (m_i, P, 4) and (m_i, P): the box and probability
            every one of the P image patches gives each `<loc>` (OWL-ViT's per-patch predictions; `pred_boxes` /
            `box_scores` are the best patch's; None when the batch has no `<loc>`). Visual search returns every root
            box above its threshold from them.
        iou_predictions: one tensor per sample, (n_i,) SAM's predicted IoU of each mask.
        ce_loss, mask_bce_loss, mask_dice_loss, mask_iou_loss, det_loss: the unweighted loss parts.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    if CACHE_NAME == "cache":
        cache: object | None = None
    else:
        past_key_values: object | None = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None
    pred_masks: list | None = None
    pred_boxes: list | None = None
    box_scores: list | None = None
    patch_boxes: list | None = None
    patch_box_scores: list | None = None
    iou_predictions: list | None = None
    ce_loss: torch.FloatTensor | None = None
    mask_bce_loss: torch.FloatTensor | None = None
    mask_dice_loss: torch.FloatTensor | None = None
    mask_iou_loss: torch.FloatTensor | None = None
    det_loss: torch.FloatTensor | None = None


@dataclass
class VSMGenerateOutput(GenerateDecoderOnlyOutput):
    """`GenerateDecoderOnlyOutput` plus the masks and boxes of every emitted `<SEG>` / `<loc>`.

    `pred_masks[i]` is (n_i, H_m, W_m) mask logits on the square frame (n_i = 0 when sequence i emitted
    no `<SEG>`), `pred_boxes[i]` (m_i, 4) normalised cxcywh, `box_scores[i]` (m_i,), `prompt_length` the column
    where the generated answer starts in `sequences`, and `sequences_per_sample` how many sequences each prompt
    returned (`num_return_sequences`; each sample's in a row).
    """

    pred_masks: list | None = None
    pred_boxes: list | None = None
    box_scores: list | None = None
    prompt_length: int | None = None
    sequences_per_sample: int | None = None


# ----------------------------------------------------------------------------------------------
# Small modules
# ----------------------------------------------------------------------------------------------


class VSMMultiModalProjector(nn.Module):
    """Vision features -> LM embeddings: Linear-act-Linear (LLaVA-1.5's projector; Janus-Pro's aligner, whose
    `fc1` / `hidden_layers.0` are `linear_1` / `linear_2` here), or `linear_1` alone for
    `config.projector_type="linear"` (LLaVA-v1's `mm_projector`, as in LISA and SEAL's VSM)."""

    def __init__(self, config):
        super().__init__()
        vision_size, text_size = config.vision_config.hidden_size, config.text_config.hidden_size
        self.linear_1 = nn.Linear(vision_size, text_size)
        self.act = self.linear_2 = None
        if config.projector_type == "mlp":
            self.act = ACT2FN[config.projector_hidden_act]
            self.linear_2 = nn.Linear(text_size, text_size)

    def forward(self, image_features):
        projected = self.linear_1(image_features)
        return projected if self.linear_2 is None else self.linear_2(self.act(projected))


class VSMTokenProjection(nn.Sequential):
    """LISA's `text_hidden_fcs`: Linear-ReLU-Linear-Dropout from the LM width to a head's width."""

    def __init__(self, in_size: int, out_size: int, dropout: float):
        super().__init__(nn.Linear(in_size, in_size), nn.ReLU(), nn.Linear(in_size, out_size), nn.Dropout(dropout))


class VSMDenseProjection(nn.Sequential):
    """Image-grid features -> the mask decoder width: Linear-GELU-LayerNorm (`vision_to_dense`), or for
    `config.dense_projection_type="linear"` one Linear without bias (SEAL's `visual_projection`)."""

    def __init__(self, in_size: int, out_size: int, projection_type: str = "mlp"):
        if projection_type == "linear":
            super().__init__(nn.Linear(in_size, out_size, bias=False))
        else:
            super().__init__(nn.Linear(in_size, out_size), nn.GELU(), nn.LayerNorm(out_size))


class VSMBilinearUpsample(nn.Module):
    """Bilinear x2 (computed in float32) then a 3x3 convolution: SEAL's `Upsample`, in place of one of SAM's
    stride-2 transposed convolutions."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)

    def forward(self, features):  # (B, C, h, w) -> (B, C_out, 2h, 2w)
        upsampled = F.interpolate(features.float(), scale_factor=2.0, mode="bilinear", align_corners=False)
        return self.conv(upsampled.to(features.dtype))


class VSMMaskDecoder(SamMaskDecoder):
    """SAM's mask decoder; with `upscaling="bilinear_conv"` its two transposed convolutions are
    [`VSMBilinearUpsample`]s (SEAL's VSM decodes 192 px masks from a 48x48 grid that way)."""

    def __init__(self, config, upscaling: str = "transposed_conv"):
        super().__init__(config)
        if upscaling == "bilinear_conv":
            width = self.hidden_size
            self.upscale_conv1 = VSMBilinearUpsample(width, width // 4)
            self.upscale_conv2 = VSMBilinearUpsample(width // 4, width // 8)


class VSMMaskRefiner(nn.Module):
    """Sharpens decoded masks against the image: `depth` convolutions over [mask probability, pixels] add a
    residual to the mask logits, so a mask decoded from a coarse grid gets the image's edges (in the spirit of
    SAM-HQ's fusion of high-resolution features). The last convolution starts at zero: the identity.

    It reads the decoder's masks detached and the loss supervises both: the decoder learns WHICH object as
    without a refiner (trained through the refiner, from scratch, it settled on every object's outline), and
    the refiner only learns to follow the edges.

    With `config.mask_refiner_stride` > 1 the convolutions between the first and the last read a grid pooled by
    that factor, and their output comes back upsampled onto the first one's (a U-Net skip): the same reach for
    a fraction of the work. With `config.mask_refiner_prompted` the `<SEG>` prompt scales and shifts the first
    convolution's channels (FiLM, starting at the identity), so the refiner knows what was asked for."""

    def __init__(self, config):
        super().__init__()
        channels, kernel_size = config.mask_refiner_channels, config.mask_refiner_kernel_size
        dilations = config.mask_refiner_dilations or [1] * config.mask_refiner_depth
        self.stride = config.mask_refiner_stride

        def conv(in_channels, out_channels, dilation):  # same size out
            padding = dilation * (kernel_size // 2)
            return nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation)

        in_channels = 1 + config.vision_config.num_channels
        layers = []
        for dilation in dilations[:-1]:
            layers += [conv(in_channels, channels, dilation), nn.GELU()]
            in_channels = channels
        self.layers = nn.Sequential(*layers)  # conv, act, conv, act, ...
        self.residual = conv(in_channels, 1, dilations[-1])
        self.residual._vsm_zero_init = True
        self.prompt_film = None
        if config.mask_refiner_prompted:
            prompt_size = config.sam_config.mask_decoder_config.hidden_size
            self.prompt_film = nn.Linear(prompt_size, 2 * channels)
            self.prompt_film._vsm_zero_init = True

    def forward(self, mask_logits, pixel_values, prompts=None):
        """mask_logits (K, M, M), pixel_values (K, C, S, S) of each mask's image, prompts (K, D_prompt) the
        `<SEG>` prompts (read when `mask_refiner_prompted`) -> refined logits (K, R, R) at the finer of the two
        resolutions, R = max(M, S): a coarse decoder grid still gets the image's edges."""
        size = max(mask_logits.shape[-1], pixel_values.shape[-1])
        if mask_logits.shape[-1] != size:
            mask_logits = F.interpolate(mask_logits[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]
        if pixel_values.shape[-1] != size:
            pixel_values = F.interpolate(pixel_values, size=(size, size), mode="bilinear", align_corners=False)
        features = torch.cat([mask_logits.sigmoid()[:, None], pixel_values], dim=1)  # (K, 1 + C, R, R)
        # Channels-last: oneDNN's convolutions with few channels run 2x faster forward and backward on a CPU.
        features = features.contiguous(memory_format=torch.channels_last)
        first, context = self.layers[:2], self.layers[2:]
        features = first(features)  # (K, channels, R, R)
        if self.prompt_film is not None:
            if prompts is None:
                raise ValueError("This mask refiner is prompted (config.mask_refiner_prompted): pass the `<SEG>` prompts.")
            scale, shift = self.prompt_film(prompts.to(features.dtype))[:, :, None, None].chunk(2, dim=1)  # (K, channels, 1, 1)
            features = features * (1 + scale) + shift
        if self.stride > 1:
            pooled = F.avg_pool2d(features, self.stride, ceil_mode=True)  # (K, channels, R / stride, R / stride)
            features = features + F.interpolate(context(pooled), size=(size, size), mode="bilinear", align_corners=False)
        else:
            features = context(features)
        return mask_logits + self.residual(features)[:, 0]


class VSMConvStem(nn.Module):
    """A small convolutional encoder of the pixels whose per-patch features are added to the projected vision
    features the LM reads (a hybrid stem). Stride-2 3x3 convolutions bring the image down to the vision tower's
    patch grid, `conv_stem_depth` more 3x3 convolutions widen each cell's view to whole objects, GroupNorm after
    each; the last 1x1 projection to the LM width starts at zero, so the model starts as without it.

    Why: the outline of a shape (a circle or a square) is what a convolution sees and a linear patch embedding
    does not. Trained from scratch with direct supervision, the tiny SigLIP tower (8-px patches) told circles from
    squares at chance after 1500 steps, where a small GroupNorm convolutional encoder reached 0.95 in 250 (issue
    note, session 14)."""

    def __init__(self, config):
        super().__init__()
        channels, groups = config.conv_stem_channels, config.conv_stem_groups
        vision = config.vision_config
        num_strided = max(1, int(math.log2(vision.patch_size)))
        self.grid_side = vision.image_size // vision.patch_size
        widths = [channels // 2] * (num_strided - 1) + [channels] * (1 + config.conv_stem_depth)
        layers, in_channels = [], vision.num_channels
        for index, width in enumerate(widths):
            stride = 2 if index < num_strided else 1
            layers += [nn.Conv2d(in_channels, width, 3, stride=stride, padding=1), nn.GroupNorm(groups, width), nn.GELU()]
            in_channels = width
        self.layers = nn.Sequential(*layers)
        self.out = nn.Conv2d(channels, config.text_config.hidden_size, 1)
        self.out._vsm_zero_init = True

    def forward(self, pixel_values):
        """(B, C, S, S) images -> (B, N, D_lm) features of the vision tower's N patches, in raster order."""
        features = self.out(self.layers(pixel_values.contiguous(memory_format=torch.channels_last)))  # (B, D, S/2^n, S/2^n)
        if features.shape[-1] != self.grid_side:  # patches that are not 2^n pixels (CLIP's 14)
            features = F.interpolate(features, size=(self.grid_side, self.grid_side), mode="bilinear", align_corners=False)
        return features.flatten(2).transpose(1, 2)


class VSMDetectorEncoder(nn.Module):
    """OWL-ViT's image side (SEAL's VSM dense encoder): its vision transformer, then OWL-ViT's `image_embedder`
    (post-layernorm, patches times the class token, `layer_norm`). (B, 3, S, S) -> (B, g, g, D_det), the patch
    embeddings OWL-ViT's class and box heads read. Names follow `OwlViTForObjectDetection` (`owlvit.vision_model`,
    `layer_norm`) so its weights map one to one."""

    def __init__(self, config):
        super().__init__()
        vision_config = config.detector_config.vision_config
        self.vision_model = OwlViTVisionModel(vision_config)
        self.layer_norm = nn.LayerNorm(vision_config.hidden_size, eps=vision_config.layer_norm_eps)

    def forward(self, pixel_values):
        hidden = self.vision_model(pixel_values=pixel_values, return_dict=True).last_hidden_state  # (B, 1 + P, D)
        embeds = self.vision_model.vision_model.post_layernorm(hidden)
        embeds = self.layer_norm(embeds[:, 1:] * embeds[:, :1])  # (B, P, D): each patch times the class token
        grid_side = int(round(embeds.shape[1] ** 0.5))
        return embeds.view(embeds.shape[0], grid_side, grid_side, -1)


# ----------------------------------------------------------------------------------------------
# Losses (pure functions)
# ----------------------------------------------------------------------------------------------


def token_mask(input_ids: torch.Tensor, token_index: int | None) -> torch.BoolTensor:
    """Where `input_ids` is `token_index`: (B, T) bool; all False for None (`loc_token_index` of a model without
    box heads)."""
    if token_index is None:
        return torch.zeros_like(input_ids, dtype=torch.bool)
    return input_ids == token_index


def scan_image_grid(features: torch.Tensor, scan: str) -> torch.Tensor:
    """(B, N, D) patch features of a square grid, raster order -> the `scan` order ("row" or "column").
    The column scan is a transpose of the grid, so the same call also maps it back to raster order."""
    if scan == "row":
        return features
    batch, num_patches, width = features.shape
    side = math.isqrt(num_patches)
    return features.view(batch, side, side, width).transpose(1, 2).reshape(batch, num_patches, width)


def mask_losses(mask_logits, target, scale: float, eps: float):
    """LISA's per-mask BCE and Dice, ignoring pixels labelled 255.

    mask_logits: (N, H, W) float; target: (N, H, W) with values 0 / 1 / 255.
    Returns the per-mask BCE (N,) and Dice (N,) losses.
    """
    valid = (target != MASK_IGNORE_VALUE).float()
    target = (target == 1).float()
    bce = F.binary_cross_entropy_with_logits(mask_logits, target, reduction="none")
    bce = (bce * valid).flatten(1).sum(-1) / valid.flatten(1).sum(-1).clamp(min=1.0)  # (N,)
    probs = (mask_logits.sigmoid() * valid).flatten(1)  # (N, HW)
    target = (target * valid).flatten(1)
    numerator = 2 * (probs / scale * target).sum(-1)
    denominator = (probs / scale).sum(-1) + (target / scale).sum(-1)
    dice = 1 - (numerator + eps) / (denominator + eps)  # (N,)
    return bce, dice


def mask_iou(pred_mask, target):
    """IoU of boolean predictions (N, H, W) with 0 / 1 / 255 targets, per mask (N,); empty union -> 1."""
    valid = target != MASK_IGNORE_VALUE
    pred, truth = pred_mask & valid, (target == 1) & valid
    intersection = (pred & truth).flatten(1).sum(-1).float()
    union = (pred | truth).flatten(1).sum(-1).float()
    return torch.where(union > 0, intersection / union.clamp(min=1.0), torch.ones_like(union))


def box_cxcywh_to_xyxy(boxes):
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def generalized_box_iou(boxes_a, boxes_b):
    """Pairwise GIoU of xyxy boxes (N, 4) x (M, 4) -> (N, M) (Rezatofighi et al. 2019)."""
    area_a = (boxes_a[:, 2] - boxes_a[:, 0]).clamp(min=0) * (boxes_a[:, 3] - boxes_a[:, 1]).clamp(min=0)
    area_b = (boxes_b[:, 2] - boxes_b[:, 0]).clamp(min=0) * (boxes_b[:, 3] - boxes_b[:, 1]).clamp(min=0)
    top_left = torch.max(boxes_a[:, None, :2], boxes_b[None, :, :2])
    bottom_right = torch.min(boxes_a[:, None, 2:], boxes_b[None, :, 2:])
    intersection = (bottom_right - top_left).clamp(min=0).prod(-1)
    union = area_a[:, None] + area_b[None, :] - intersection
    iou = intersection / union.clamp(min=torch.finfo(union.dtype).eps)
    hull = (torch.max(boxes_a[:, None, 2:], boxes_b[None, :, 2:]) - torch.min(boxes_a[:, None, :2], boxes_b[None, :, :2]))
    hull_area = hull.clamp(min=0).prod(-1)
    return iou - (hull_area - union) / hull_area.clamp(min=torch.finfo(hull_area.dtype).eps)


def hungarian_match(cost):
    """Minimum-cost assignment of the rows of `cost` (K, P), K <= P, to distinct columns: (K,) column indices.

    One row takes its cheapest column; several go to scipy's `linear_sum_assignment` (the matcher of DETR-style
    losses), imported here only: inference and remote-code loading need nothing but torch and transformers."""
    num_rows, num_cols = cost.shape
    assert num_rows <= num_cols, "hungarian_match needs at most as many rows as columns"
    if num_rows == 1:
        return cost.argmin(dim=1)
    from scipy.optimize import linear_sum_assignment

    rows, columns = linear_sum_assignment(cost.detach().cpu().numpy())  # rows come back sorted, every row matched
    return torch.as_tensor(columns, dtype=torch.long)


def sigmoid_focal_loss(logits, targets, alpha: float, gamma: float):
    """Per-element focal loss (Lin et al. 2017), summed over the last dimension."""
    probs = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = probs * targets + (1 - probs) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    return (alpha_t * loss).sum(-1)


def detection_loss(class_logits, pred_boxes, target_boxes, config):
    """Hungarian-matched OWL-ViT / DETR loss of ONE `<loc>` query over the patches of its image.

    class_logits: (P,) logits of each patch for the query; pred_boxes: (P, 4) normalised cxcywh;
    target_boxes: (K, 4) normalised cxcywh, every instance the query refers to; K = 0 when the referent is not in the
    image: then every patch is a negative and there is no box loss (the score learns "not here").
    Returns the weighted sum `class*focal + l1*L1 + giou*(1 - GIoU)`, each part averaged over K.
    """
    num_targets = target_boxes.shape[0]
    if num_targets == 0:
        negatives = torch.zeros_like(class_logits)
        return config.det_class_weight * sigmoid_focal_loss(class_logits, negatives, config.focal_alpha, config.focal_gamma)
    with torch.no_grad():
        probs = class_logits.float().sigmoid()
        class_cost = -probs[None, :].expand(num_targets, -1)  # (K, P)
        l1_cost = torch.cdist(target_boxes.float(), pred_boxes.float(), p=1)
        giou_cost = -generalized_box_iou(box_cxcywh_to_xyxy(target_boxes.float()), box_cxcywh_to_xyxy(pred_boxes.float()))
        cost = config.det_class_weight * class_cost + config.det_l1_weight * l1_cost + config.det_giou_weight * giou_cost
        matched_patches = hungarian_match(cost.cpu()).to(class_logits.device)  # (K,)
    class_targets = torch.zeros_like(class_logits)
    class_targets[matched_patches] = 1.0
    focal = sigmoid_focal_loss(class_logits, class_targets, config.focal_alpha, config.focal_gamma) / num_targets
    matched_boxes = pred_boxes[matched_patches]
    l1 = F.l1_loss(matched_boxes, target_boxes, reduction="sum") / num_targets
    giou = torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(matched_boxes), box_cxcywh_to_xyxy(target_boxes)))
    giou_loss = (1 - giou).sum() / num_targets
    return config.det_class_weight * focal + config.det_l1_weight * l1 + config.det_giou_weight * giou_loss


def compute_box_bias(grid_height: int, grid_width: int, device=None):
    """OWL-ViT's box bias: each patch's box starts centred on the patch with the patch's size. (HW, 4)."""
    ys, xs = torch.meshgrid(
        torch.arange(1, grid_height + 1, dtype=torch.float32, device=device) / grid_height,
        torch.arange(1, grid_width + 1, dtype=torch.float32, device=device) / grid_width,
        indexing="ij",
    )
    centres = torch.stack([xs, ys], dim=-1).view(-1, 2).clamp(0.0, 1.0)
    centre_bias = torch.log(centres + BOX_BIAS_EPS) - torch.log1p(-centres + BOX_BIAS_EPS)
    sizes = torch.tensor([1.0 / grid_width, 1.0 / grid_height], device=device).expand_as(centres)
    size_bias = torch.log(sizes + BOX_BIAS_EPS) - torch.log1p(-sizes + BOX_BIAS_EPS)
    return torch.cat([centre_bias, size_bias], dim=-1)


# ----------------------------------------------------------------------------------------------
# Loading on a device / quantised
# ----------------------------------------------------------------------------------------------

# bitsandbytes quantises only the LM's decoder layers: a pattern (transformers matches skip entries as regexes
# from the start of a module name) for every module outside `model.language_model`, i.e. the vision tower,
# projector, dense encoders, SAM prompt encoder and mask decoder, `<SEG>` / `<loc>` heads and `lm_head`.
FULL_PRECISION_UNDER_QUANTIZATION = [r"(?!model\.language_model\.)[^.]+"]
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def device_available(device: torch.device) -> bool:
    """Whether this machine has `device` (its type, and its index when one is given)."""
    if device.type in ("cpu", "meta"):
        return True
    if device.type == "mps":
        return torch.backends.mps.is_available()
    backend = getattr(torch, device.type, None)  # torch.cuda, torch.xpu, ...
    if backend is None or not getattr(backend, "is_available", lambda: False)():
        return False
    return device.index is None or device.index < backend.device_count()


def check_device_map(device_map) -> None:
    """Raises a ValueError naming the device when `device_map` asks for one this machine does not have."""
    if device_map is None:
        return
    targets = device_map.values() if isinstance(device_map, dict) else [device_map]
    for target in targets:
        if target == "disk" or target in DEVICE_MAP_STRATEGIES:
            continue  # accelerate places the model on the devices that exist
        device = torch.device("cuda", target) if isinstance(target, int) else torch.device(target)
        if not device_available(device):
            raise ValueError(
                f"device_map={device_map!r} asks for device {str(device)!r}, which this machine does not have "
                f"(torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}); use device_map='auto' or 'cpu'."
            )


def with_quantization_defaults(quantization_config):
    """A bitsandbytes config that names no `llm_int8_skip_modules` gets `FULL_PRECISION_UNDER_QUANTIZATION`;
    any other config is returned as given."""
    if isinstance(quantization_config, dict):
        is_bnb = quantization_config.get("load_in_4bit") or quantization_config.get("load_in_8bit")
        if is_bnb and quantization_config.get("llm_int8_skip_modules") is None:
            return {**quantization_config, "llm_int8_skip_modules": list(FULL_PRECISION_UNDER_QUANTIZATION)}
        return quantization_config
    method = getattr(quantization_config, "quant_method", None)
    if getattr(method, "value", method) == "bitsandbytes" and quantization_config.llm_int8_skip_modules is None:
        quantization_config = copy.deepcopy(quantization_config)
        quantization_config.llm_int8_skip_modules = list(FULL_PRECISION_UNDER_QUANTIZATION)
    return quantization_config


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------


class VSMPreTrainedModel(PreTrainedModel):
    config_class = VSMConfig
    config: VSMConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = [
        "LlamaDecoderLayer",
        "SiglipEncoderLayer",
        "CLIPEncoderLayer",
        "VSMMultiModalProjector",
        "SamTwoWayTransformer",
        "SamVisionLayer",  # the "sam" source's image encoder
        "OwlViTEncoderLayer",  # the "detector" source's image encoder
    ]
    _skip_keys_device_placement = ["past_key_values", "cache"]  # the KV cache, by either name
    _keep_in_fp32_modules = ["prompt_encoder", "mask_decoder", "mask_refiner"]
    # Mask decoding and its sigmoid stay in fp32 under bf16 too (LISA's masks overflowed in bf16).
    _keep_in_fp32_modules_strict = ["prompt_encoder", "mask_decoder", "mask_refiner"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module):
        if getattr(module, "_vsm_zero_init", False):
            init.zeros_(module.weight)
            init.zeros_(module.bias)
            return
        if getattr(module, "_vsm_torch_default_init", False) and isinstance(module, TORCH_DEFAULT_INIT_TYPES):
            # SAM's reference decoder trains from PyTorch's default init. With the 0.02-normal init its
            # hypernetwork product (mask token MLP x upscaled embedding) starts at ~0 and stalls.
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                fan_in = module.weight[0].numel() if not isinstance(module, nn.ConvTranspose2d) else module.weight[:, 0].numel()
                init.uniform_(module.bias, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
            return
        super()._init_weights(module)
        if isinstance(module, SamPositionalEmbedding):
            # SAM's reference `PositionEmbeddingRandom(scale=1.0)`: smooth Fourier features. (transformers
            # draws them with std = vision hidden size / 2, which aliases into noise on a small grid.)
            init.normal_(module.positional_embedding, std=SAM_POSITIONAL_SCALE)


class VSMModel(VSMPreTrainedModel):
    """Vision tower + projector + LM: image features are spliced in at the `<image>` positions."""

    def __init__(self, config: VSMConfig):
        super().__init__(config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = VSMMultiModalProjector(config)
        self.conv_stem = VSMConvStem(config) if config.conv_stem_channels else None
        if self.conv_stem is not None:
            for module in self.conv_stem.layers:
                module._vsm_torch_default_init = True
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_image_features(self, pixel_values: torch.Tensor) -> BaseModelOutputWithPooling:
        """Runs the vision tower ONCE. (B, 3, S, S) -> `last_hidden_state` (B, N, D_vision), the selected
        layer's patch features, and `pooler_output` (B, N * len(image_scans), D_lm), those features projected for
        the LM, once per scan order."""
        layer = self.config.vision_feature_layer
        vision_outputs = self.vision_tower(pixel_values, output_hidden_states=layer != -1, return_dict=True)
        patch_features = vision_outputs.last_hidden_state if layer == -1 else vision_outputs.hidden_states[layer]
        has_cls = self.config.vision_config.model_type == "clip_vision_model"
        if has_cls and self.config.vision_feature_select_strategy == "default":
            patch_features = patch_features[:, 1:]  # drop CLS
        projected = self.multi_modal_projector(patch_features)  # (B, N, D_lm) in raster order
        if self.conv_stem is not None:  # added to the patches (after a CLS position kept by "full")
            stem = self.conv_stem(pixel_values.to(projected.dtype))  # (B, N_patches, D_lm)
            projected = torch.cat([projected[:, : -stem.shape[1]], projected[:, -stem.shape[1] :] + stem], dim=1)
        lm_features = torch.cat([scan_image_grid(projected, scan) for scan in self.config.image_scans], dim=1)
        return BaseModelOutputWithPooling(last_hidden_state=patch_features, pooler_output=lm_features)

    def get_placeholder_mask(self, input_ids: torch.LongTensor, image_features: torch.Tensor) -> torch.BoolTensor:
        """(B, T) mask of the `<image>` positions, checked against the number of image features."""
        image_mask = input_ids == self.config.image_token_index
        num_tokens, num_features = int(image_mask.sum()), image_features.shape[0] * image_features.shape[1]
        if num_tokens != num_features:
            raise ValueError(
                f"Image features and image tokens do not match, tokens: {num_tokens}, features: {num_features} "
                f"({image_features.shape[0]} images x {image_features.shape[1]} tokens each). Each `<image>` in the "
                "text must be expanded to the processor's `num_image_tokens` and come with exactly one image."
            )
        return image_mask

    def image_block_attention_mask(self, input_ids, attention_mask, dtype) -> torch.Tensor:
        """(B, 1 or H, T, T) additive mask for teacher forcing and the prefill (no cache yet): text causal, padding
        masked, and inside each `<image>` block `config.image_attention`'s pattern ("bidirectional": all of the
        block; "column_causal": the columns left of a patch and its own column down to it), except in the first
        `config.bidirectional_image_heads` heads, which see all of the block."""
        length = input_ids.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).tril()[None]  # (1, T, T)
        is_image = input_ids == self.config.image_token_index  # (B, T)
        image_order = is_image.long().cumsum(1) - 1  # (B, T) running count of image positions
        image_index = image_order // self.config.num_image_tokens  # (B, T) which image
        same_image = is_image[:, :, None] & is_image[:, None, :] & (image_index[:, :, None] == image_index[:, None, :])
        whole_block = causal | same_image  # (B, T, T)
        if self.config.image_attention == "column_causal":
            side = math.isqrt(self.config.num_image_patches)
            patch = image_order % self.config.num_image_tokens  # (B, T) raster index inside its image
            row, column = patch // side, patch % side
            query_row, query_column = row[:, :, None], column[:, :, None]  # (B, T, 1)
            key_row, key_column = row[:, None, :], column[:, None, :]  # (B, 1, T)
            left_or_above = (key_column < query_column) | ((key_column == query_column) & (key_row <= query_row))
            allowed = torch.where(same_image, left_or_above, causal)  # (B, T, T)
        elif self.config.image_attention == "bidirectional":
            allowed = whole_block
        else:
            allowed = causal.expand_as(whole_block)
        allowed = allowed[:, None]  # (B, 1, T, T)
        num_whole_block_heads = self.config.bidirectional_image_heads
        if num_whole_block_heads:
            num_heads = self.config.text_config.num_attention_heads
            allowed = torch.cat(
                [whole_block[:, None].expand(-1, num_whole_block_heads, -1, -1),
                 allowed.expand(-1, num_heads - num_whole_block_heads, -1, -1)],
                dim=1,
            )  # (B, H, T, T)
        if attention_mask is not None:
            allowed = allowed & attention_mask[:, None, None, :].bool()
        return torch.zeros(allowed.shape, dtype=dtype, device=input_ids.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        mm_encoder_outputs: dict | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        past_key_values=None,
        **kwargs,
    ):
        """Returns the LM output plus `image_outputs` (the vision features of this call, or None). The KV cache
        comes as `cache` or, transformers < 5.24's name, `past_key_values`."""
        cache = past_key_values if cache is None else cache
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`.")
        if inputs_embeds is None:
            # The image placeholder's row is never read (the image features replace it; its id may be past the rows).
            placeholder = input_ids == self.config.image_token_index
            inputs_embeds = self.get_input_embeddings()(input_ids.masked_fill(placeholder, 0))  # (B, T, D)

        image_outputs = (mm_encoder_outputs or {}).get("image")
        if image_outputs is None and pixel_values is not None:
            image_outputs = self.get_image_features(pixel_values.to(self.vision_tower.dtype))
        if image_outputs is not None:
            if input_ids is None:
                raise ValueError("Images need `input_ids` to locate the `<image>` tokens.")
            image_features = image_outputs.pooler_output.to(inputs_embeds.device, inputs_embeds.dtype)  # (B_img, N, D)
            image_mask = self.get_placeholder_mask(input_ids, image_features)
            inputs_embeds = inputs_embeds.masked_scatter(image_mask.unsqueeze(-1), image_features)
        elif input_ids is not None and bool((input_ids == self.config.image_token_index).any()):
            if cache is None or cache.get_seq_length() == 0:
                raise ValueError("The text has `<image>` tokens but no image was given (`pixel_values` is None).")

        needs_block_mask = self.config.image_attention != "causal" or self.config.bidirectional_image_heads > 0
        if needs_block_mask and image_outputs is not None and input_ids.shape[1] > 1:
            attention_mask = self.image_block_attention_mask(input_ids, attention_mask, inputs_embeds.dtype)
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            **{CACHE_NAME: cache},
            **kwargs,
        )
        outputs.image_outputs = image_outputs
        return outputs


class VSMForCausalLM(VSMPreTrainedModel, GenerationMixin):
    """The VSM: [`VSMModel`] + LM head + `<SEG>` mask head (SAM) + `<loc>` box head (OWL-ViT).

    `forward` teacher-forces a conversation and, given `labels`, `gt_masks` and / or `gt_boxes`,
    returns the combined loss; `generate` is `GenerationMixin.generate` and, with
    `return_dict_in_generate=True`, also returns the masks and boxes of every emitted `<SEG>` / `<loc>`.
    """

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    # Trainer passes `num_items_in_batch` and then leaves gradient-accumulation scaling to us.
    accepts_loss_kwargs = True
    # A callable `(model, save_directory=...) -> str` set by the training side (`hub_cards.attach_model_card`):
    # `save_pretrained` then writes its result as README.md. None: no card is written.
    model_card = None

    def __init__(self, config: VSMConfig):
        super().__init__(config)
        source, projection_type = config.dense_feature_source, config.dense_projection_type
        text_size, dense_size = config.text_config.hidden_size, config.dense_size
        query_size = config.detector_config.text_config.hidden_size
        self.model = VSMModel(config)
        self.lm_head = nn.Linear(text_size, config.text_config.vocab_size, bias=False)
        self.text_hidden_fcs_seg = VSMTokenProjection(text_size, dense_size, config.text_hidden_fcs_dropout)
        self.text_hidden_fcs_det = self.class_head = self.box_head = None  # `<loc>` heads, when it has them
        if config.has_box_heads:
            self.text_hidden_fcs_det = VSMTokenProjection(text_size, query_size, config.text_hidden_fcs_dropout)
        # Only the modules of the configured source exist (no dead weights in a checkpoint).
        box_feature_size = dense_size
        if source == "shared":
            self.vision_to_dense = VSMDenseProjection(config.vision_config.hidden_size, dense_size, projection_type)
        elif source == "lm":
            self.lm_to_dense = VSMDenseProjection(text_size * len(config.image_scans), dense_size, projection_type)
        elif source == "sam":
            self.dense_encoder = AutoModel.from_config(config.sam_config.vision_config)  # SamVisionModel, (B, D, g, g)
        else:  # "detector": OWL-ViT's encoder; its heads read its raw patch embeddings, the mask decoder a projection
            self.dense_encoder = VSMDetectorEncoder(config)
            box_feature_size = config.detector_config.vision_config.hidden_size
            self.detector_to_dense = VSMDenseProjection(box_feature_size, dense_size, projection_type)  # SEAL's visual_projection

        sam_config = copy.deepcopy(config.sam_config)
        sam_config.mask_decoder_config._attn_implementation = config._attn_implementation or "eager"
        self.prompt_encoder = SamPromptEncoder(sam_config)
        self.mask_decoder = VSMMaskDecoder(sam_config.mask_decoder_config, config.mask_upscaling)
        for module in self.mask_decoder.modules():
            module._vsm_torch_default_init = True
        self.mask_refiner = VSMMaskRefiner(config) if config.mask_refiner_channels else None
        if self.mask_refiner is not None:
            for module in self.mask_refiner.layers.modules():
                module._vsm_torch_default_init = True
        if config.has_box_heads:  # OWL-ViT heads reading `box_feature_size`-wide patch features, `query_size`-wide queries
            head_config = copy.deepcopy(config.detector_config)
            head_config.vision_config.hidden_size = box_feature_size
            self.class_head = OwlViTClassPredictionHead(head_config)
            self.box_head = OwlViTBoxPredictionHead(head_config)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    # ---- dense features -----------------------------------------------------------------------

    def get_dense_encoder_outputs(self, dense_pixel_values: torch.Tensor) -> BaseModelOutput:
        """Runs the separate dense encoder ("sam" / "detector") ONCE on the processor's dense view.

        (B_img, 3, S_d, S_d) -> `last_hidden_state` (B_img, g, g, D): SAM's image embeddings (D = 256 for
        ViT-B, 64x64 at 1024 px) or OWL-ViT's patch embeddings (D = 768 for B/16, 48x48 at 768 px).
        """
        source = self.config.dense_feature_source
        if source not in ("sam", "detector"):
            raise ValueError(
                f"`dense_pixel_values` was given but dense_feature_source={source!r} has no dense encoder "
                "(it reads the VLM's own features); drop it or use a processor of this model."
            )
        pixel_values = dense_pixel_values.to(next(self.dense_encoder.parameters()).dtype)
        if source == "sam":
            embeddings = self.dense_encoder(pixel_values=pixel_values, return_dict=True).last_hidden_state  # (B, D, g, g)
            grid = embeddings.permute(0, 2, 3, 1)  # (B, g, g, D)
        else:
            grid = self.dense_encoder(pixel_values)  # (B, g, g, D_det)
        return BaseModelOutput(last_hidden_state=grid)

    def get_dense_features(self, input_ids, image_outputs, last_hidden_state, dense_outputs=None):
        """Image-grid features for the mask decoder (and, except for "detector", the box heads), from the
        configured source. `dense_outputs` is [`get_dense_encoder_outputs`]' result ("sam" / "detector").

        Returns (B_img, g, g, D_dense) on the source's own grid (the mask decoder resizes it to its grid).
        """
        source = self.config.dense_feature_source
        if source in ("sam", "detector"):
            if dense_outputs is None:
                raise ValueError(
                    f"dense_feature_source={source!r} needs the dense view in this call (`dense_pixel_values`, "
                    "made by the processor of this model)."
                )
            grid = dense_outputs.last_hidden_state  # (B_img, g, g, D)
            return grid if source == "sam" else self.detector_to_dense(grid)
        if source == "shared":
            if image_outputs is None:
                raise ValueError("dense_feature_source='shared' needs the image in this call (`pixel_values`).")
            features = self.vision_to_dense(image_outputs.last_hidden_state)  # (B_img, N, D_dense)
        else:  # "lm": the LM's states at the image positions have read the instruction before them
            image_mask = input_ids == self.config.image_token_index  # (B, T)
            num_images = int(image_mask.any(dim=1).sum())
            image_states = last_hidden_state[image_mask].view(num_images, -1, last_hidden_state.shape[-1])
            # (B_img, S * N, D) -> (B_img, N, S * D): each patch's states from every scan, back in raster order
            scans = image_states.chunk(len(self.config.image_scans), dim=1)
            image_states = torch.cat(
                [scan_image_grid(states, scan) for states, scan in zip(scans, self.config.image_scans)], dim=-1
            )
            features = self.lm_to_dense(image_states)  # (B_img, N, D_dense)
        grid_side = int(round(features.shape[1] ** 0.5))
        features = features[:, -grid_side * grid_side :]  # drop a CLS position if the tower kept one
        return features.view(features.shape[0], grid_side, grid_side, -1)

    def get_image_wide_positional_embeddings(self, device, dtype):
        """SAM's dense positional encoding of the prompt grid, (1, D_dense, G, G)."""
        size = self.config.prompt_grid_size
        grid = torch.ones((size, size), device=device, dtype=dtype)
        y_embed = (grid.cumsum(dim=0) - 0.5) / size
        x_embed = (grid.cumsum(dim=1) - 0.5) / size
        positional_embedding = self.prompt_encoder.shared_embedding(torch.stack([x_embed, y_embed], dim=-1))
        return positional_embedding.permute(2, 0, 1).unsqueeze(0)

    # ---- heads --------------------------------------------------------------------------------

    def decode_masks(self, grid_features, prompt_states, image_index, pixel_values=None):
        """SAM mask decoding of K prompts (kept in fp32: LISA's masks overflowed in bf16), then the mask refiner if any.

        grid_features: (B_img, g, g, D_dense); prompt_states: (K, D_lm) LM states that predicted `<SEG>`;
        image_index: (K,) the image each prompt belongs to; pixel_values: (B_img, C, S, S) the images, read
        by the refiner. Returns mask logits (K, M, M) (M = [`pred_mask_side`]), IoU predictions (K,) and the
        decoder's own mask logits before the refiner (K, 4G, 4G; the same tensor without a refiner), which the
        loss also supervises.
        """
        decoder_dtype = self.mask_decoder.iou_token.weight.dtype
        sparse_prompts = self.text_hidden_fcs_seg(prompt_states).to(decoder_dtype)[:, None, None, :]  # (K, 1, 1, D)
        decoder_masks, iou_predictions = self.predict_masks(grid_features, sparse_prompts, image_index)
        if self.mask_refiner is None:
            return decoder_masks, iou_predictions, decoder_masks
        if pixel_values is None:
            raise ValueError("This VSM refines masks against the image: pass `pixel_values` with the `<SEG>` prompts.")
        pixels = pixel_values[image_index].to(decoder_masks.device, decoder_masks.dtype)
        refined = self.mask_refiner(decoder_masks.detach(), pixels, prompts=sparse_prompts[:, 0, 0])
        return refined, iou_predictions, decoder_masks

    def pred_mask_side(self) -> int:
        """Side of `pred_masks`: SAM's 4G, or the image's side when the refiner works at that finer resolution."""
        side = SAM_MASK_UPSCALE * self.config.prompt_grid_size
        return side if self.mask_refiner is None else max(side, self.config.vision_config.image_size)

    def predict_masks(self, grid_features, sparse_prompts, image_index):
        """SAM's mask decoder on K sparse prompt embeddings (K, 1, n, D_dense) (a `<SEG>` projection has n = 1,
        a SAM box prompt n = 2), each over image `image_index[k]` of `grid_features` (B_img, g, g, D_dense).
        Returns mask logits (K, 4G, 4G) and IoU predictions (K,), in fp32."""
        decoder_dtype = self.mask_decoder.iou_token.weight.dtype
        size = self.config.prompt_grid_size
        image_embeddings = grid_features.permute(0, 3, 1, 2).to(decoder_dtype)  # (B_img, D, g, g)
        if image_embeddings.shape[-1] != size:
            image_embeddings = F.interpolate(image_embeddings, size=(size, size), mode="bilinear", align_corners=False)
        sparse_prompts = sparse_prompts.to(decoder_dtype)
        num_prompts = sparse_prompts.shape[0]
        dense_prompts = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(num_prompts, -1, size, size)
        positional = self.get_image_wide_positional_embeddings(image_embeddings.device, decoder_dtype)
        masks, iou_predictions = [], []
        prompt_ids = torch.arange(num_prompts, device=image_index.device)
        for chunk in prompt_ids.split(self.mask_decode_chunk_size(image_embeddings, num_prompts)):
            chunk_masks, chunk_ious = self.mask_decoder(
                image_embeddings=image_embeddings[image_index[chunk]],  # (k, D, G, G)
                image_positional_embeddings=positional.expand(len(chunk), -1, -1, -1),
                sparse_prompt_embeddings=sparse_prompts[chunk],
                dense_prompt_embeddings=dense_prompts[chunk],
                multimask_output=False,
            )
            masks.append(chunk_masks[:, 0, 0])
            iou_predictions.append(chunk_ious[:, 0, 0])
        if not masks:  # no prompts
            empty = positional.new_zeros((0, SAM_MASK_UPSCALE * size, SAM_MASK_UPSCALE * size), dtype=torch.float32)
            return empty, empty[:, 0, 0]
        return torch.cat(masks).float(), torch.cat(iou_predictions).float()  # (K, 4G, 4G), (K,)

    def mask_decode_chunk_size(self, image_embeddings, num_prompts: int) -> int:
        """How many prompts one `SamMaskDecoder` call takes. The decoder works on its own copy of the (D, G, G)
        image embedding for every prompt: on a GPU one call for all prompts is fastest; on a CPU, copies that
        overflow the cache cost more than the per-call overhead saves (8 prompts at 256x64x64 took 0.52 s in one
        call, 0.31 s in 8 calls on 2 cores), so a call takes as many as fit in `CPU_MASK_DECODE_BYTES`."""
        if image_embeddings.device.type != "cpu":
            return max(num_prompts, 1)
        per_prompt = image_embeddings[0].numel() * image_embeddings.element_size()
        return max(1, min(num_prompts, CPU_MASK_DECODE_BYTES // per_prompt))

    def predict_boxes(self, grid_features, query_embeds, image_index):
        """OWL-ViT class and box heads for K queries (K, D_q) (a `<loc>` projection or an OWL-ViT text embedding),
        each over image `image_index[k]` of the box features `grid_features` (B_img, g, g, D).

        Returns per-patch class logits (K, P) and boxes (K, P, 4), normalised cxcywh on the frame.
        """
        num_images, grid_h, grid_w, _ = grid_features.shape
        patch_features = grid_features.reshape(num_images, grid_h * grid_w, -1)  # (B_img, P, D)
        box_bias = compute_box_bias(grid_h, grid_w, device=patch_features.device)
        all_boxes = (self.box_head(patch_features) + box_bias.to(patch_features.dtype)).sigmoid()  # (B_img, P, 4)
        patch_features, all_boxes = patch_features[image_index], all_boxes[image_index]  # (K, P, D), (K, P, 4)
        class_logits, _ = self.class_head(patch_features, query_embeds[:, None, :].to(patch_features.dtype), None)
        return class_logits[..., 0].float(), all_boxes.float()  # (K, P), (K, P, 4)

    def select_boxes(self, class_logits, boxes):
        """The best patch of each query: boxes (K, 4) and scores (K,)."""
        best = class_logits.argmax(dim=-1)  # (K,)
        rows = torch.arange(best.shape[0], device=best.device)
        return boxes[rows, best], class_logits[rows, best].sigmoid()

    def run_heads(self, input_ids, image_outputs, last_hidden_state, seg_prompts, loc_prompts, strict=True,
                  dense_outputs=None, pixel_values=None):
        """Masks and boxes for `<SEG>` / `<loc>` prompts, each given as (rows (K,), states (K, D_lm)).
        `dense_outputs`: the separate dense encoder's output ("sam" / "detector" sources); `pixel_values`:
        the images (B_img, C, S, S), read by the mask refiner.

        Returns per-sample lists `pred_masks`, `iou_predictions`, `pred_boxes`, `box_scores`, `patch_boxes`,
        `patch_box_scores` and, for the loss, the flat per-patch `class_logits` (K_loc, P) and `all_boxes`
        (K_loc, P, 4). A prompt in a sample without an image raises (`strict`) or is dropped.
        """
        batch_size = input_ids.shape[0]
        seg_rows, seg_states = seg_prompts
        loc_rows, loc_states = loc_prompts
        mask_side = self.pred_mask_side()
        heads = {
            "pred_masks": [last_hidden_state.new_zeros((0, mask_side, mask_side), dtype=torch.float32)] * batch_size,
            "iou_predictions": [last_hidden_state.new_zeros((0,), dtype=torch.float32)] * batch_size,
            "pred_boxes": [last_hidden_state.new_zeros((0, 4), dtype=torch.float32)] * batch_size,
            "box_scores": [last_hidden_state.new_zeros((0,), dtype=torch.float32)] * batch_size,
            "patch_boxes": None,
            "patch_box_scores": None,
            "decoder_masks": None,
            "class_logits": None,
            "all_boxes": None,
        }
        if seg_rows.numel() == 0 and loc_rows.numel() == 0:
            return heads
        image_mask = input_ids == self.config.image_token_index
        row_to_image = torch.cumsum(image_mask.any(dim=1).long(), dim=0) - 1  # (B,) image index of each row
        row_to_image[~image_mask.any(dim=1)] = -1
        for rows in (seg_rows, loc_rows):
            if strict and (row_to_image[rows] < 0).any():
                bad_row = int(rows[row_to_image[rows] < 0][0])
                raise ValueError(f"Sample {bad_row} has a `<SEG>` / `<loc>` token but no `<image>`.")
        seg_keep, loc_keep = row_to_image[seg_rows] >= 0, row_to_image[loc_rows] >= 0
        seg_rows, seg_states, loc_rows, loc_states = seg_rows[seg_keep], seg_states[seg_keep], loc_rows[loc_keep], loc_states[loc_keep]
        if seg_rows.numel() == 0 and loc_rows.numel() == 0:
            return heads
        grid = self.get_dense_features(input_ids, image_outputs, last_hidden_state, dense_outputs)  # (B_img, g, g, D)
        # OWL-ViT's heads read its raw patch embeddings; every other source's heads read the mask decoder's grid.
        box_grid = dense_outputs.last_hidden_state if self.config.dense_feature_source == "detector" else grid
        if seg_rows.numel():
            masks, ious, decoder_masks = self.decode_masks(grid, seg_states, row_to_image[seg_rows], pixel_values)
            counts = torch.bincount(seg_rows, minlength=batch_size).tolist()
            heads["pred_masks"], heads["iou_predictions"] = list(masks.split(counts)), list(ious.split(counts))
            heads["decoder_masks"] = list(decoder_masks.split(counts)) if self.mask_refiner is not None else None
        if loc_rows.numel():
            queries = self.text_hidden_fcs_det(loc_states)  # (K, D_q)
            class_logits, all_boxes = self.predict_boxes(box_grid, queries, row_to_image[loc_rows])
            boxes, scores = self.select_boxes(class_logits, all_boxes)
            counts = torch.bincount(loc_rows, minlength=batch_size).tolist()
            heads["pred_boxes"], heads["box_scores"] = list(boxes.split(counts)), list(scores.split(counts))
            heads["patch_boxes"] = list(all_boxes.split(counts))  # (m_i, P, 4)
            heads["patch_box_scores"] = list(class_logits.sigmoid().split(counts))  # (m_i, P)
            heads["class_logits"], heads["all_boxes"] = class_logits, all_boxes
        return heads

    # ---- forward ------------------------------------------------------------------------------

    def prompt_positions(self, input_ids, token_index):
        """(rows, positions) of the hidden states that PREDICT `token_index` (the token before it),
        LISA's convention, so teacher-forced training and generation read the same state."""
        predicts_token = torch.zeros_like(input_ids, dtype=torch.bool)
        predicts_token[:, :-1] = token_mask(input_ids[:, 1:], token_index)
        return predicts_token.nonzero(as_tuple=True)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        gt_masks=None,
        gt_boxes=None,
        dense_pixel_values: torch.Tensor | None = None,
        mm_encoder_outputs: dict | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        num_items_in_batch=None,
        num_masks_in_batch=None,
        num_boxes_in_batch=None,
        past_key_values=None,
        **kwargs,
    ) -> VSMCausalLMOutput:
        r"""
        Args:
            input_ids: (B, T) token ids; each `<image>` already expanded to `config.num_image_tokens` ids.
            pixel_values: (B_img, 3, S, S), one image per sample that has `<image>` tokens, in order.
            labels: (B, T) target ids, `-100` where no text loss applies.
            gt_masks: per sample, a (n_i, H, W) tensor (0 / 1, 255 = ignore) on the square frame, one mask
                per `<SEG>` in `input_ids` (n_i may be 0); or a (B, n, H, W) tensor. `None` = no mask loss.
            gt_boxes: per sample, a (m_i, 4) tensor of normalised cxcywh boxes on the frame, one per `<loc>`
                (or a list of m_i (k, 4) tensors when a `<loc>` refers to k instances); a NaN box: that `<loc>`'s
                referent is not in the image (its patches are all negatives). `None` = no box loss.
            dense_pixel_values: (B_img, 3, S_d, S_d) the processor's dense view, for the "sam" / "detector"
                sources (their separate encoder reads it); `mm_encoder_outputs["dense"]` may carry its output.
            num_items_in_batch, num_masks_in_batch, num_boxes_in_batch: totals over an accumulated batch
                (set by [`VSMTrainer`]); each loss part is then a sum divided by its total, so gradient
                accumulation is exact. Left `None`, each part is a mean over this call.
            cache / past_key_values: the LM's KV cache (`past_key_values` is its name before transformers 5.24).
        """
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            past_key_values=past_key_values,  # VSMModel.forward takes either name
            inputs_embeds=inputs_embeds,
            mm_encoder_outputs=mm_encoder_outputs,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            **kwargs,
        )
        last_hidden_state = outputs.last_hidden_state  # (B, T, D_lm)
        logit_positions = self.logit_positions(last_hidden_state.shape[1], logits_to_keep, last_hidden_state.device)
        keep_all = isinstance(logits_to_keep, int) and logits_to_keep == 0
        logits = self.lm_head(last_hidden_state if keep_all else last_hidden_state[:, logit_positions])  # (B, T_kept, V)

        heads = None
        has_targets = gt_masks is not None or gt_boxes is not None
        dense_outputs = (mm_encoder_outputs or {}).get("dense")
        if pixel_values is None:  # generation keeps the images next to their encoder outputs
            pixel_values = (mm_encoder_outputs or {}).get("pixel_values")
        if dense_outputs is None and dense_pixel_values is not None:
            dense_outputs = self.get_dense_encoder_outputs(dense_pixel_values)
        if input_ids is not None and (outputs.image_outputs is not None or has_targets):
            seg_rows, seg_positions = self.prompt_positions(input_ids, self.config.seg_token_index)
            loc_rows, loc_positions = self.prompt_positions(input_ids, self.config.loc_token_index)
            heads = self.run_heads(
                input_ids,
                outputs.image_outputs,
                last_hidden_state,
                seg_prompts=(seg_rows, last_hidden_state[seg_rows, seg_positions]),
                loc_prompts=(loc_rows, last_hidden_state[loc_rows, loc_positions]),
                dense_outputs=dense_outputs,
                pixel_values=pixel_values,
            )
        heads = heads or {}

        loss = ce_loss = bce_loss = dice_loss = iou_loss = det_loss = None
        if labels is not None or gt_masks is not None or gt_boxes is not None:
            ce_loss = self.text_loss(logits, labels, logit_positions, num_items_in_batch)
            bce_loss, dice_loss, iou_loss = self.seg_loss(
                heads.get("pred_masks"), heads.get("iou_predictions"), gt_masks, num_masks_in_batch,
                decoder_masks=heads.get("decoder_masks"),
            )
            det_loss = self.box_loss(heads, input_ids, gt_boxes, num_boxes_in_batch)
            config = self.config
            loss = (
                config.ce_loss_weight * ce_loss
                + config.bce_loss_weight * bce_loss
                + config.dice_loss_weight * dice_loss
                + config.iou_loss_weight * iou_loss
                + config.det_loss_weight * det_loss
            )
            if self.training and torch.distributed.is_available() and torch.distributed.is_initialized():
                # Heads that got no prompt this step still take part in the graph (DDP waits for them). One
                # process skips it: these are ~15% of the ops of a tiny training step.
                loss = loss + 0.0 * sum(p.sum() for p in self.head_parameters())

        return VSMCausalLMOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{CACHE_NAME: getattr(outputs, CACHE_NAME)},
            pred_masks=heads.get("pred_masks"),
            pred_boxes=heads.get("pred_boxes"),
            box_scores=heads.get("box_scores"),
            patch_boxes=heads.get("patch_boxes"),
            patch_box_scores=heads.get("patch_box_scores"),
            iou_predictions=heads.get("iou_predictions"),
            ce_loss=ce_loss,
            mask_bce_loss=bce_loss,
            mask_dice_loss=dice_loss,
            mask_iou_loss=iou_loss,
            det_loss=det_loss,
        )

    def head_parameters(self):
        """Parameters of the modules that only `<SEG>` / `<loc>` prompts reach."""
        modules = [self.text_hidden_fcs_seg, self.text_hidden_fcs_det, self.mask_decoder, self.prompt_encoder]
        modules += [self.class_head, self.box_head]
        source_modules = ("vision_to_dense", "lm_to_dense", "dense_encoder", "detector_to_dense")
        modules += [getattr(self, name, None) for name in source_modules]
        modules = [module for module in modules if module is not None]
        return [p for module in modules for p in module.parameters() if p.requires_grad]

    # ---- losses -------------------------------------------------------------------------------

    @staticmethod
    def logit_positions(length: int, logits_to_keep, device) -> torch.Tensor:
        """The positions `lm_head` runs on: all (0), the last `logits_to_keep` (int) or the given ones (1-D
        tensor; [`VSMTrainer`] passes the positions that predict a labelled token, the CE is unchanged)."""
        if isinstance(logits_to_keep, torch.Tensor):
            return logits_to_keep.to(device)
        return torch.arange(length - logits_to_keep if logits_to_keep else 0, length, device=device)

    def text_loss(self, logits, labels, logit_positions, num_items_in_batch=None):
        """Next-token cross-entropy over labelled positions: a sum divided by `num_items_in_batch`
        (or by this batch's labelled-token count). `logits` (B, T_kept, V) are those of `logit_positions`."""
        if labels is None:
            return logits.new_zeros(())
        next_positions = logit_positions + 1  # the label each logit predicts; none after the last position
        targets = labels.new_full((labels.shape[0], next_positions.shape[0]), IGNORE_INDEX)
        in_range = next_positions < labels.shape[1]
        targets[:, in_range] = labels[:, next_positions[in_range].to(labels.device)]
        shift_logits = logits.float().reshape(-1, logits.shape[-1])
        shift_labels = targets.reshape(-1).to(shift_logits.device)
        total = F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")
        count = num_items_in_batch if num_items_in_batch is not None else (shift_labels != IGNORE_INDEX).sum()
        count = torch.as_tensor(count, device=total.device, dtype=total.dtype)
        return total / count.clamp(min=1.0)

    def seg_loss(self, pred_masks, iou_predictions, gt_masks, num_masks_in_batch=None, decoder_masks=None):
        """LISA's BCE + Dice per mask (plus SAM's IoU-prediction MSE), summed and divided by the
        number of masks; samples without masks add nothing. Returns (bce, dice, iou).

        With a mask refiner, `decoder_masks` (the masks before it) add their own BCE + Dice: the decoder is
        trained on them, the refiner (which reads them detached) on `pred_masks`."""
        zero = self.lm_head.weight.new_zeros((), dtype=torch.float32)
        if gt_masks is None:
            return zero, zero, zero
        gt_masks = list(gt_masks)
        num_samples = len(pred_masks) if pred_masks is not None else 0
        predicted, targets, iou_preds, unrefined = [], [], [], []
        for row, target in enumerate(gt_masks):
            num_targets = 0 if target is None else int(target.shape[0])
            num_predicted = pred_masks[row].shape[0] if row < num_samples else 0
            if num_targets != num_predicted:
                raise ValueError(
                    f"Sample {row} has {num_predicted} `<SEG>` token(s) in its input but {num_targets} ground-truth "
                    "mask(s); give one mask per `<SEG>`."
                )
            if num_targets:
                predicted.append(pred_masks[row])
                targets.append(target.to(pred_masks[row].device))
                iou_preds.append(iou_predictions[row])
                unrefined.append(None if decoder_masks is None else decoder_masks[row])
        if pred_masks is not None and len(gt_masks) != num_samples:
            raise ValueError(f"`gt_masks` has {len(gt_masks)} entries for a batch of {num_samples} samples.")
        if not predicted:
            return zero, zero, zero
        bce_total, dice_total, iou_total = zero, zero, zero
        # Masks whose targets share a size are scored together: one set of ops per size, not one per sample.
        rows_by_size = {}
        for index, target in enumerate(targets):
            rows_by_size.setdefault(tuple(target.shape[-2:]), []).append(index)
        for size, indices in rows_by_size.items():
            target = torch.cat([targets[i] for i in indices])  # (N, H, W)
            logits = torch.cat([predicted[i] for i in indices])  # (N, h, w)
            logits = F.interpolate(logits[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]  # (N, H, W)
            bce, dice = mask_losses(logits, target, self.config.dice_scale, self.config.loss_eps)
            if decoder_masks is not None:
                decoder_logits = torch.cat([unrefined[i] for i in indices])[:, None]  # (N, 1, h', w')
                decoder_logits = F.interpolate(decoder_logits, size=size, mode="bilinear", align_corners=False)[:, 0]
                decoder_bce, decoder_dice = mask_losses(decoder_logits, target, self.config.dice_scale, self.config.loss_eps)
                bce, dice = bce + decoder_bce, dice + decoder_dice
            actual_iou = mask_iou(logits.detach() > LOGIT_THRESHOLD, target)
            iou_pred = torch.cat([iou_preds[i] for i in indices])  # (N,)
            bce_total = bce_total + bce.sum()
            dice_total = dice_total + dice.sum()
            iou_total = iou_total + F.mse_loss(iou_pred, actual_iou, reduction="sum")
        count = sum(t.shape[0] for t in targets) if num_masks_in_batch is None else num_masks_in_batch
        count = max(float(count), 1.0)
        return bce_total / count, dice_total / count, iou_total / count

    def box_loss(self, heads, input_ids, gt_boxes, num_boxes_in_batch=None):
        """Hungarian-matched detection loss summed over `<loc>` queries, divided by their number."""
        zero = self.lm_head.weight.new_zeros((), dtype=torch.float32)
        if gt_boxes is None:
            return zero
        loc_rows, _ = self.prompt_positions(input_ids, self.config.loc_token_index)
        queries_per_row = torch.bincount(loc_rows, minlength=input_ids.shape[0]).tolist()
        if len(gt_boxes) != input_ids.shape[0]:
            raise ValueError(f"`gt_boxes` has {len(gt_boxes)} entries for a batch of {input_ids.shape[0]} samples.")
        targets = []
        for row, boxes in enumerate(gt_boxes):
            per_query = [] if boxes is None else [b.reshape(-1, 4) for b in boxes]
            per_query = [b[~b.isnan().any(-1)] for b in per_query]  # a NaN box: the referent is not in the image
            if len(per_query) != queries_per_row[row]:
                raise ValueError(
                    f"Sample {row} has {queries_per_row[row]} `<loc>` token(s) but {len(per_query)} ground-truth box(es)."
                )
            targets.extend(per_query)
        if not targets:
            return zero
        total = zero
        for class_logits, boxes, target in zip(heads["class_logits"], heads["all_boxes"], targets):
            total = total + detection_loss(class_logits, boxes, target.to(boxes.device, boxes.dtype), self.config)
        count = len(targets) if num_boxes_in_batch is None else num_boxes_in_batch
        return total / max(float(count), 1.0)

    # ---- generation ---------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, input_ids=None, pixel_values=None, attention_mask=None, mm_encoder_outputs=None,
                 dense_pixel_values=None, **kwargs):
        """`GenerationMixin.generate`, plus masks and boxes.

        With `return_dict_in_generate=True` the result is a [`VSMGenerateOutput`] whose `pred_masks`,
        `pred_boxes` and `box_scores` hold one entry per sample for every `<SEG>` / `<loc>` emitted (empty
        when none was). The image goes through the vision tower once (and `dense_pixel_values`, for the
        "sam" / "detector" sources, through the dense encoder once, before the first step); the KV cache stays on.
        """
        generation_config = kwargs.get("generation_config")
        want_dict = kwargs.pop("return_dict_in_generate", None)
        if want_dict is None:
            want_dict = bool(generation_config is not None and generation_config.return_dict_in_generate)
        want_hidden = kwargs.pop("output_hidden_states", None)
        if want_hidden is None:
            want_hidden = bool(generation_config is not None and generation_config.output_hidden_states)
        if want_dict and input_ids is not None:
            self.warn_if_follow_up_question(input_ids)
        if pixel_values is not None and mm_encoder_outputs is None:
            mm_encoder_outputs = {"image": self.model.get_image_features(pixel_values.to(self.model.vision_tower.dtype))}
        if pixel_values is not None:
            mm_encoder_outputs = {**mm_encoder_outputs, "pixel_values": pixel_values}  # read by the mask refiner
        if dense_pixel_values is not None:
            mm_encoder_outputs = {**(mm_encoder_outputs or {}), "dense": self.get_dense_encoder_outputs(dense_pixel_values)}
        outputs = super().generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            mm_encoder_outputs=mm_encoder_outputs,
            return_dict_in_generate=True,
            output_hidden_states=want_dict,  # the heads read them; plain sequences need none (no overhead)
            **kwargs,
        )
        if not want_dict:
            return outputs.sequences
        prompt_length = input_ids.shape[1]
        pred_masks, pred_boxes, box_scores = self._heads_for_generated(input_ids, outputs, mm_encoder_outputs or {})
        return VSMGenerateOutput(
            sequences=outputs.sequences,
            scores=outputs.scores,
            logits=outputs.logits,
            attentions=outputs.attentions,
            hidden_states=outputs.hidden_states if want_hidden else None,
            **{CACHE_NAME: getattr(outputs, CACHE_NAME)},
            pred_masks=pred_masks,
            pred_boxes=pred_boxes,
            box_scores=box_scores,
            prompt_length=prompt_length,
            sequences_per_sample=outputs.sequences.shape[0] // input_ids.shape[0],
        )

    def warn_if_follow_up_question(self, input_ids) -> None:
        """Warns when `"lm"` dense features would answer a follow-up question: a prompt that already holds a
        `<SEG>` / `<loc>` answer asks again after the image, whose positions read only the text before it."""
        if self.config.dense_feature_source != "lm":
            return
        answered = token_mask(input_ids, self.config.seg_token_index) | token_mask(input_ids, self.config.loc_token_index)
        if bool(answered.any()):
            logger.warning(
                "dense_feature_source='lm': the prompt already holds a <SEG> / <loc> answer, so this asks a follow-up "
                "question. The image positions read only the text before the image (the first question): masks and "
                "boxes answered now come from features that never read the new question, and tend to repeat the "
                "first answer's object. Ask each segmentation or box question in its own conversation."
            )

    def _heads_for_generated(self, input_ids, outputs, encoder_outputs: dict):
        """Runs the heads on the states that predicted each generated `<SEG>` / `<loc>` of each returned sequence.

        Every decoding mode returns R = B x `num_return_sequences` sequences, each sample's in a row. The state that
        predicted generated token k of sequence r is the last position of step k's final layer, in the row of the
        beam that chose it (`beam_indices[r, k]`: the kept beam, not a discarded one); without beams, row r."""
        sequences = outputs.sequences
        prompt_length = input_ids.shape[1]
        generated = sequences[:, prompt_length:]  # (R, K)
        num_returned = sequences.shape[0] // input_ids.shape[0]
        beam_indices = getattr(outputs, "beam_indices", None)
        if beam_indices is None:
            beam_indices = torch.arange(sequences.shape[0], device=sequences.device)[:, None].expand_as(generated)
        rows = beam_indices[:, : generated.shape[1]].clamp(min=0)  # -1 after a beam ended: never a `<SEG>` there
        step_states = torch.stack(
            [outputs.hidden_states[k][-1][rows[:, k], -1] for k in range(generated.shape[1])], dim=1
        )  # (R, K, D)
        seg_rows, seg_steps = token_mask(generated, self.config.seg_token_index).nonzero(as_tuple=True)
        loc_rows, loc_steps = token_mask(generated, self.config.loc_token_index).nonzero(as_tuple=True)
        encoder_outputs = self.expand_image_inputs(input_ids, encoder_outputs, num_returned)  # one set per sequence
        heads = self.run_heads(
            input_ids.repeat_interleave(num_returned, dim=0),
            encoder_outputs.get("image"),
            outputs.hidden_states[0][-1][rows[:, 0]],  # (R, P, D) the prompt's final states, read by the "lm" source
            seg_prompts=(seg_rows, step_states[seg_rows, seg_steps]),
            loc_prompts=(loc_rows, step_states[loc_rows, loc_steps]),
            strict=False,
            dense_outputs=encoder_outputs.get("dense"),
            pixel_values=encoder_outputs.get("pixel_values"),
        )
        return heads["pred_masks"], heads["pred_boxes"], heads["box_scores"]

    def expand_image_inputs(self, input_ids, encoder_outputs: dict, expand_size: int) -> dict:
        """The per-image encoder outputs (`"image"`, `"dense"`, `"pixel_values"`) of a batch whose samples are each
        repeated `expand_size` times in a row, as `GenerationMixin` repeats `input_ids` for beams and returned
        sequences: each copy gets its sample's images, in order. New objects: the inputs are left as they were."""
        if expand_size == 1 or not encoder_outputs:
            return encoder_outputs
        images_per_sample = (input_ids == self.config.image_token_index).sum(dim=1) // self.config.num_image_tokens
        firsts = torch.cumsum(images_per_sample, dim=0) - images_per_sample
        index = torch.cat([
            torch.arange(first, first + count, device=input_ids.device).repeat(expand_size)
            for first, count in zip(firsts.tolist(), images_per_sample.tolist())
        ])  # (B_img * expand_size,)

        def select(value):
            if torch.is_tensor(value):
                return value[index.to(value.device)]
            if isinstance(value, ModelOutput):
                return type(value)(**{key: select(field) for key, field in value.items()})
            return value

        return {key: select(value) for key, value in encoder_outputs.items()}

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        """`GenerationMixin`'s expansion for beams and returned sequences, with the VSM's own encoder outputs
        expanded alongside (transformers' own helper knows only `pooler_output` and `config.image_token_id`)."""
        encoder_outputs = model_kwargs.pop("mm_encoder_outputs", None)
        expanded_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs
        )
        if encoder_outputs is not None:
            model_kwargs["mm_encoder_outputs"] = self.expand_image_inputs(input_ids, encoder_outputs, expand_size)
        return expanded_ids, model_kwargs

    # ---- building from pretrained components --------------------------------------------------

    @classmethod
    def from_components(cls, vlm, sam, detector=None, dense_feature_source: str = "shared", tokenizer=None,
                        dtype=None, **config_overrides) -> "VSMForCausalLM":
        """Composes a VSM from pretrained transformers checkpoints, copying their weights exactly.

        Args:
            vlm: Hub id or local folder (or a loaded model) of a `JanusForConditionalGeneration` (Janus-Pro: its
                SigLIP-shaped vision model, aligner and Llama LM; the image-generation parts are dropped) or a
                `LlavaForConditionalGeneration` (vision tower, projector, LM).
            sam: the same for a `SamModel`: its prompt encoder and mask decoder (and, for "sam", its image encoder).
            detector: the same for an `OwlViTForObjectDetection`: for "detector", its vision encoder and class / box
                heads; the other sources only take its query size (`None`: OWL-ViT B/16's shapes).
            dense_feature_source: `"shared"`, `"lm"`, `"detector"` or `"sam"` (docs/design.md).
            tokenizer: the VLM's tokenizer (default: loaded from `vlm`); `<SEG>` / `<loc>` are added to it.
            dtype: dtype the components are loaded in and the VSM is built in (default float32).
            **config_overrides: other [`VSMConfig`] fields (loss weights, ...).

        The `<SEG>` / `<loc>` rows of the input embeddings and `lm_head` start as the mean of the rows of the
        tokens the tokenizer had. Build the matching processor with `VSMProcessor.from_components`.

        Memory: one component is loaded at a time and its weights become the VSM's as they are (no copy; the VSM is
        built on the meta device), so building holds about one model's bytes (or the largest component's, with its
        dropped parts), not the components plus a second, randomly initialised model.
        """
        from transformers import AutoTokenizer, JanusForConditionalGeneration, LlavaForConditionalGeneration
        from transformers import OwlViTForObjectDetection, SamModel

        load_kwargs = {"dtype": dtype} if dtype is not None else {}

        def load_config(source):
            return source.config if isinstance(source, PreTrainedModel) else AutoConfig.from_pretrained(source)

        def load(source, model_class):
            return source if isinstance(source, PreTrainedModel) else model_class.from_pretrained(source, **load_kwargs)

        if dense_feature_source == "detector" and detector is None:
            raise ValueError("dense_feature_source='detector' needs a `detector` (an OwlViTForObjectDetection checkpoint).")
        vlm_config, sam_config = load_config(vlm), load_config(sam)
        detector_config = load_config(detector) if detector is not None else None
        # Check the parts fit together before loading any weights (raises naming both sides).
        VSMConfig.from_component_configs(vlm_config, sam_config, detector_config, dense_feature_source, **config_overrides)
        if tokenizer is None:
            if isinstance(vlm, PreTrainedModel):
                raise ValueError("Pass `tokenizer=` with a loaded `vlm` (or pass its folder / Hub id).")
            tokenizer = AutoTokenizer.from_pretrained(vlm)
        known_tokens = min(len(tokenizer), vlm_config.text_config.vocab_size)
        seg_token_index, loc_token_index = add_vsm_tokens(tokenizer)
        config = VSMConfig.from_component_configs(
            vlm_config, sam_config, detector_config, dense_feature_source, seg_token_index, loc_token_index,
            **config_overrides,
        )
        vlm_class = JanusForConditionalGeneration if vlm_config.model_type == "janus" else LlavaForConditionalGeneration
        vlm_map = JANUS_KEY_MAP if vlm_config.model_type == "janus" else LLAVA_KEY_MAP
        sam_map = SAM_KEY_MAP + (SAM_ENCODER_KEY_MAP if dense_feature_source == "sam" else (("vision_encoder.", None),))
        parts = [(vlm, vlm_class, vlm_map, "vlm", JANUS_RENAMES if vlm_config.model_type == "janus" else ()),
                 (sam, SamModel, sam_map, "sam", ())]
        if dense_feature_source == "detector":
            parts.append((detector, OwlViTForObjectDetection, DETECTOR_KEY_MAP, "detector", ()))
        # One component in memory at a time, largest first: its weights are taken as they are (no copy) and the rest
        # of it (Janus's image-generation parts, SAM's image encoder, OWL-ViT's text tower) is freed before the next.
        state = {}
        for source, model_class, key_map, component, renames in parts:
            component_model = load(source, model_class)
            mapped = _map_state_dict(component_model.state_dict(), key_map, component, renames)
            owned = not isinstance(source, PreTrainedModel)  # a model the caller passed keeps its own tensors
            state.update(mapped if owned else {key: value.clone() for key, value in mapped.items()})
            del component_model, mapped
            gc.collect()
        for key in EMBEDDING_KEYS:
            state[key] = _with_new_token_rows(state[key], config.text_config.vocab_size, known_tokens,
                                              (seg_token_index, loc_token_index))

        with torch.device("meta"):  # the VSM's keys and shapes, no weight allocated
            own = {key: tuple(value.shape) for key, value in cls(config).state_dict().items()}
        wrong_shape = {k: (tuple(v.shape), own[k]) for k, v in state.items() if k in own and tuple(v.shape) != own[k]}
        unexpected = sorted(set(state) - set(own))
        taken_prefixes = tuple(new for _, _, key_map, _, _ in parts for _, new in key_map if new is not None)
        missing = sorted(k for k in own if k.startswith(taken_prefixes) and k not in state)
        if unexpected or missing or wrong_shape:
            raise ValueError(
                f"The components do not map onto the VSM: unexpected {unexpected[:5]}, missing {missing[:5]}, "
                f"shape (component, VSM) {dict(list(wrong_shape.items())[:5])}."
            )
        # Built on the meta device and filled with the components' tensors themselves; the VSM's own new modules
        # (the `<SEG>` / `<loc>` projections, dense projection, ...) are initialised as `cls(config)` would.
        verbosity = logging.get_verbosity()
        logging.set_verbosity_error()  # the new modules are "missing" from the components, as they should be
        try:
            model = cls.from_pretrained(None, config=config, state_dict=state, dtype=dtype or torch.float32)
        finally:
            logging.set_verbosity(verbosity)
        return model.eval()

    # ---- loading ------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained`, after two checks: a `device_map` naming a device this machine lacks
        raises a ValueError that names it, and a bitsandbytes `quantization_config` without
        `llm_int8_skip_modules` quantises only the LM's decoder layers (`FULL_PRECISION_UNDER_QUANTIZATION`)."""
        check_device_map(kwargs.get("device_map"))
        if kwargs.get("quantization_config") is not None:
            kwargs["quantization_config"] = with_quantization_defaults(kwargs["quantization_config"])
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)

    # ---- saving -------------------------------------------------------------------------------

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Saves weights (safetensors) and config, then the flat remote-code modules and `auto_map`, so
        the folder loads with `trust_remote_code=True` where this project is not installed."""
        if kwargs.get("push_to_hub"):
            raise ValueError("Save to a folder first, then upload it (`vsm push`): push_to_hub here would skip the remote code.")
        kwargs.setdefault("safe_serialization", True)
        super().save_pretrained(save_directory, *args, **kwargs)
        export_remote_code(save_directory, __file__, REMOTE_CODE_MODULES, "config.json", MODEL_AUTO_MAP)
        if self.model_card is not None and kwargs.get("is_main_process", True):
            with open(os.path.join(save_directory, "README.md"), "w", encoding="utf-8") as handle:
                handle.write(self.model_card(self, save_directory=save_directory))


def _map_state_dict(state_dict, key_map, component: str, renames=()) -> dict:
    """Renames a component's weights to the VSM's by `key_map` ((prefix, new prefix or None = drop), first
    match wins) and `renames` (substring pairs); a key no prefix matches is an error naming it."""
    mapped = {}
    for key, value in state_dict.items():
        target = next(((prefix, new) for prefix, new in key_map if key.startswith(prefix)), None)
        if target is None:
            raise ValueError(f"The {component} checkpoint has a weight the VSM cannot place: {key!r}.")
        prefix, new_prefix = target
        if new_prefix is None:
            continue
        new_key = new_prefix + key[len(prefix) :]
        for old, new in renames:
            new_key = new_key.replace(old, new)
        mapped[new_key] = value
    return mapped


def _with_new_token_rows(weight, vocab_size: int, known_tokens: int, new_ids) -> torch.Tensor:
    """(V_old, D) embedding or LM-head rows -> (vocab_size, D), rows `new_ids` set to the mean of the first
    `known_tokens` rows (the tokens the tokenizer had); other rows kept (rows added to grow the matrix too). When the
    matrix has its rows already (spare rows, as Janus-Pro's), it is changed in place: no second copy."""
    mean_row = weight[:known_tokens].float().mean(dim=0).to(weight.dtype)  # (D,)
    if weight.shape[0] != vocab_size:
        grown = mean_row.expand(vocab_size, -1).clone()
        grown[: weight.shape[0]] = weight[:vocab_size]
        weight = grown
    weight[list(new_ids)] = mean_row
    return weight


__all__ = ["VSMForCausalLM", "VSMModel", "VSMPreTrainedModel", "VSMCausalLMOutput", "VSMGenerateOutput"]
