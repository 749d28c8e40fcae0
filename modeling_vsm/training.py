"""Training side of VSM: the data collator and a `transformers.Trainer` subclass.

Not remote code: it may import anything the project depends on. The collator turns rows of the
common sample schema (see `modeling_vsm.data`) into model inputs: chat-templated text with the
instruction before the image, labels on the assistant answers only, ground-truth masks drawn on
the model's square frame and boxes normalised to it (cxcywh, as OWL-ViT).
"""

import json
import logging
import math
import re
import shutil
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from hub_cards import attach_model_card, training_from_trainer

from .data import LOC_TOKEN, SEG_TOKEN, sample_mask
from .metrics import EMPTY_UNION_IOU, IGNORE_LABEL, IOU_EPS
from .modeling_vsm import IGNORE_INDEX, LOGIT_THRESHOLD

logger = logging.getLogger(__name__)

LOSS_PARTS = ("ce_loss", "mask_bce_loss", "mask_dice_loss", "mask_iou_loss", "det_loss")
# `--loss-weights ce=1,bce=2,dice=0.5,iou=0,det=0.1` names -> config fields.
LOSS_WEIGHT_FIELDS = {
    "ce": "ce_loss_weight",
    "bce": "bce_loss_weight",
    "dice": "dice_loss_weight",
    "iou": "iou_loss_weight",
    "det": "det_loss_weight",
}


def attach_image(messages: list[dict], processor) -> list[dict]:
    """Puts the image in the first user turn when the text does not place it: AFTER the instruction, or before it
    where the processor says `image_first` (LLaVA-v1 templates: LISA, SEAL).

    docs/design.md: with the instruction first, the LM's states at the image positions have read it,
    which the `"lm"` dense features rely on.
    """
    image_token = processor.image_token
    messages = [dict(message) for message in messages]
    if not any(image_token in message["content"] for message in messages):
        for message in messages:
            if message["role"] == "user":
                text = message["content"]
                image_first = getattr(processor, "image_first", False)
                message["content"] = f"{image_token}\n{text}" if image_first else f"{text}\n{image_token}"
                break
        else:
            raise ValueError("A sample with an image needs a user turn to attach it to.")
    return messages


def with_processor_tokens(messages: list[dict], processor) -> list[dict]:
    """The data's `<SEG>` / `<loc>` answers written with the processor's own tokens (a converted LISA's `[SEG]`,
    SEAL's `[LOC]`). Text is left as is where the processor has no such token (a `<loc>` for LISA)."""
    renames = [(token, own) for token, own in ((SEG_TOKEN, processor.seg_token), (LOC_TOKEN, processor.loc_token))
               if own is not None and own != token]
    if not renames:
        return messages
    messages = [dict(message) for message in messages]
    for message in messages:
        if isinstance(message["content"], str):
            for token, own in renames:
                message["content"] = message["content"].replace(token, own)
    return messages


def learnable_rows(dataset, processor):
    """The rows a model can learn from: one without box heads (no `<loc>` token, e.g. a converted LISA) skips rows
    with box targets, saying how many (a map-style dataset) or that it does (a streamed one)."""
    if processor.loc_token is not None:
        return dataset
    kept = dataset.filter(lambda row: not row.get("boxes"))
    dropped = len(dataset) - len(kept) if hasattr(dataset, "__len__") else None
    if dropped != 0:
        logger.warning(f"This model has no box heads (no <loc> token): {'some' if dropped is None else dropped} rows "
                       "with box targets are left out of training.")
    return kept


def frame_boxes(boxes_xyxy, height: int, width: int, stretched: bool = False) -> torch.Tensor:
    """Pixel xyxy boxes of an (height, width) image -> normalised cxcywh on its square frame, or on the image
    stretched to a square (`stretched`, the "stretch" prediction frame). (m, 4)."""
    boxes = torch.as_tensor(np.asarray(boxes_xyxy, dtype=np.float32).reshape(-1, 4))
    scale = torch.tensor([width, height, width, height], dtype=torch.float32) if stretched else float(max(height, width))
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1) / scale


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """(n, M, M) 0 / 1 / 255 masks on a square grid -> (n, 4) normalised cxcywh boxes around their 1-pixels (an
    empty mask gives a NaN box: the referent is not in the image)."""
    boxes = []
    for mask in masks:
        ys, xs = torch.nonzero(mask == 1, as_tuple=True)
        if len(xs) == 0:
            boxes.append(torch.full((4,), math.nan))
            continue
        x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        boxes.append(torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0]).float() / mask.shape[-1])
    return torch.stack(boxes) if boxes else torch.zeros((0, 4))


def fill_shared_targets(masks: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets of a model whose one token gives a mask and a box: a sample with masks and no boxes trains the box
    on each mask's bounding box; one with boxes and no masks gets all-ignore (255) masks (no mask loss)."""
    if len(masks) and not len(boxes):
        return masks, mask_boxes(masks)
    if len(boxes) and not len(masks):
        return torch.full((len(boxes), *masks.shape[-2:]), IGNORE_LABEL, dtype=torch.uint8), boxes
    return masks, boxes


@dataclass
class VSMDataCollator:
    """Batches rows of the common schema for [`VSMForCausalLM`].

    Args:
        processor: a `VSMProcessor` (chat template, tokenizer, image processor).
        mask_size: side of the square frame the ground-truth masks are drawn at (defaults to the
            processor's image size; the model's mask logits are resized to it for the loss).
        train_on_prompt: also compute CE on the user turns (off: LLaVA / LISA train on answers only).
        max_length: the most positions a sample may take (the LM's `max_position_embeddings`, or `--max-length`).
            A longer sample is cut from the end of its text, never inside an image block; one whose `<SEG>` /
            `<loc>` answer would be cut is left out of the batch. `truncated` / `dropped` count them per data
            source, with one warning per source. `None`: no limit.

    Returns `input_ids`, `attention_mask` (right padded), `labels`, `pixel_values`, `original_sizes`,
    `gt_masks` (list of (n_i, M, M) uint8, 0 / 1 / 255) and `gt_boxes` (list of (m_i, 4)).
    """

    processor: object
    mask_size: int | None = None
    train_on_prompt: bool = False
    max_length: int | None = None
    truncated: Counter = field(default_factory=Counter, init=False)
    dropped: Counter = field(default_factory=Counter, init=False)
    _image_span: int | None = field(default=None, init=False, repr=False)

    def __call__(self, samples: list[dict]) -> dict:
        if not samples:
            raise ValueError("VSMDataCollator got an empty batch.")
        processor = self.processor
        mask_size = self.mask_size or processor.image_processor.image_size
        no_masks = torch.zeros((0, mask_size, mask_size), dtype=torch.uint8)
        texts, images, answer_texts, gt_masks, gt_boxes = [], [], [], [], []
        for sample in samples:
            image = sample.get("image")
            mask_polygons, boxes = sample.get("masks") or [], sample.get("boxes") or []
            messages = with_processor_tokens(sample["messages"], processor)
            messages = attach_image(messages, processor) if image is not None else messages
            texts.append(processor.apply_chat_template(messages, tokenize=False))
            answer_texts.append(self.answer_boundaries(messages))
            images.append(image)
            if image is None:
                if mask_polygons or boxes:
                    raise ValueError(f"Sample {sample.get('id', '?')} has masks or boxes but no image.")
                gt_masks.append(no_masks)
                gt_boxes.append(torch.zeros((0, 4)))
                continue
            width, height = image.size
            stretched = processor.image_processor.prediction_frame == "stretch"
            # original pixels -> frame pixels (per axis on a stretched square)
            scale = (mask_size / width, mask_size / height) if stretched else mask_size / max(height, width)
            masks = [sample_mask(sample, k, mask_size, mask_size, scale=scale) for k in range(len(mask_polygons))]
            masks = torch.as_tensor(np.stack(masks)) if masks else no_masks  # (n, M, M)
            boxes = frame_boxes(boxes, height, width, stretched)  # (m, 4)
            if processor.seg_token_id == processor.loc_token_id:  # one token answers a mask and a box (SEAL's [LOC])
                masks, boxes = fill_shared_targets(masks, boxes)
            gt_masks.append(masks)
            gt_boxes.append(boxes)

        label_spans = self.token_spans(answer_texts)
        any_image = any(image is not None for image in images)
        batch = processor(images=images if any_image else None, text=texts, padding=True, padding_side="right", return_tensors="pt")
        labels = torch.full_like(batch["input_ids"], IGNORE_INDEX)
        for row, spans in enumerate(label_spans):
            for start, end in spans:
                labels[row, start:end] = batch["input_ids"][row, start:end]
        labels[batch["attention_mask"] == 0] = IGNORE_INDEX
        self.check_targets(samples, batch["input_ids"], gt_masks, gt_boxes)
        batch["labels"] = labels
        batch["gt_masks"] = gt_masks
        batch["gt_boxes"] = gt_boxes
        batch = dict(batch)
        if self.max_length is not None and batch["input_ids"].shape[1] > self.max_length:
            batch = self.fit_to_max_length(batch, samples, [image is not None for image in images])
        return batch

    def fit_to_max_length(self, batch: dict, samples: list[dict], has_image: list[bool]) -> dict:
        """Cuts every row to `max_length` positions from the end (right padding: the text's end); a row whose cut
        falls inside an image block, or after one of its `<SEG>` / `<loc>` tokens, leaves the batch."""
        processor, limit = self.processor, self.max_length
        input_ids = batch["input_ids"]
        answer_ids = [processor.seg_token_id] + [processor.loc_token_id] * (processor.loc_token_id is not None)
        image_ids = {processor.image_token_id} | {processor.tokenizer.convert_tokens_to_ids(token) for token in
                                                   (processor.image_start_token, processor.image_end_token) if token}
        keep = []
        for row, sample in enumerate(samples):
            length = int(batch["attention_mask"][row].sum())
            source = sample.get("source") or "data"
            if length <= limit:
                keep.append(row)
                continue
            cut_tail = input_ids[row, limit:length]
            cuts_answer = bool(torch.isin(cut_tail, torch.tensor(answer_ids)).any())
            cuts_image = bool(torch.isin(cut_tail, torch.tensor(sorted(image_ids))).any())
            if cuts_answer or cuts_image:
                self.dropped[source] += 1
                if self.dropped[source] == 1:
                    logger.warning(f"{source}: samples longer than {limit} positions whose <SEG> / <loc> answer or image "
                                   "would be cut are left out (counted in train_metrics.json).")
                continue
            self.truncated[source] += 1
            if self.truncated[source] == 1:
                logger.warning(f"{source}: samples longer than {limit} positions are cut to their first {limit} "
                               "(counted in train_metrics.json).")
            keep.append(row)
        if not keep:
            raise ValueError(f"Every sample of this batch is longer than {limit} positions and would lose its image or "
                             "its <SEG> / <loc> answer: raise --max-length or shorten the data.")
        image_rows = torch.cumsum(torch.tensor(has_image), dim=0) - 1  # sample -> its image's row
        kept_images = [int(image_rows[row]) for row in keep if has_image[row]]
        fitted = {}
        for key, value in batch.items():
            if key in ("input_ids", "attention_mask", "labels"):
                fitted[key] = value[keep, :limit]
            elif key in ("pixel_values", "dense_pixel_values", "original_sizes"):
                fitted[key] = value[kept_images]
            elif key in ("gt_masks", "gt_boxes"):
                fitted[key] = [value[row] for row in keep]
            else:
                fitted[key] = value
        return fitted

    def answer_boundaries(self, messages: list[dict]) -> list[tuple[str, str]]:
        """For each text the loss applies to (each assistant answer and its end token): the chat up to its
        start and up to its end, as text; [`token_spans`] turns them into token positions."""
        processor = self.processor
        if self.train_on_prompt:
            return [("", processor.apply_chat_template(messages, tokenize=False))]
        boundaries = []
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prefix = processor.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True)
            upto = processor.apply_chat_template(messages[: index + 1], tokenize=False)
            boundaries.append((prefix, upto))
        return boundaries

    def token_spans(self, boundaries: list[list[tuple[str, str]]]) -> list[list[tuple[int, int]]]:
        """Token spans [start, end) per sample from [`answer_boundaries`]' texts: one tokenizer call for the
        batch. Each `<image>` is counted, not tokenised: its expansion only adds special tokens, which the
        tokenizer keeps whole and never merges with their neighbours (half the collator's time with 128
        image tokens)."""
        processor = self.processor
        image_token = processor.image_token
        texts = [text for sample in boundaries for pair in sample for text in pair]
        ids = processor.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        if self._image_span is None:  # ids of one expanded image (start, image tokens, end)
            expanded = processor.expand_image_tokens(image_token)
            self._image_span = len(processor.tokenizer(expanded, add_special_tokens=False)["input_ids"])
        counts = iter([len(row) + text.count(image_token) * (self._image_span - 1) for row, text in zip(ids, texts)])
        return [[(next(counts), next(counts)) for _ in sample] for sample in boundaries]

    def check_targets(self, samples, input_ids, gt_masks, gt_boxes):
        """One mask per `<SEG>` and one box per `<loc>` in the text, else a clear error naming the sample."""
        seg_id, loc_id = self.processor.seg_token_id, self.processor.loc_token_id  # loc_id None: no box heads
        for row, sample in enumerate(samples):
            num_seg = int((input_ids[row] == seg_id).sum())
            num_loc = 0 if loc_id is None else int((input_ids[row] == loc_id).sum())
            if num_seg != gt_masks[row].shape[0] or num_loc != gt_boxes[row].shape[0]:
                raise ValueError(
                    f"Sample {sample.get('id', row)}: the text has {num_seg} <SEG> and {num_loc} <loc> tokens but "
                    f"{gt_masks[row].shape[0]} masks and {gt_boxes[row].shape[0]} boxes."
                )


# ---- loss weights -------------------------------------------------------------------------------


def parse_loss_weights(text: str) -> dict:
    """`"ce=1,bce=2"` -> `{"ce_loss_weight": 1.0, "bce_loss_weight": 2.0}` (config field names).

    Names are those of `LOSS_WEIGHT_FIELDS`; a weight must be a finite number >= 0.
    """
    weights = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, has_value, value = (piece.strip() for piece in item.partition("="))
        if not has_value or name not in LOSS_WEIGHT_FIELDS:
            raise ValueError(f"Loss weight {item!r}: expected NAME=VALUE with NAME one of {sorted(LOSS_WEIGHT_FIELDS)}.")
        try:
            weight = float(value)
        except ValueError:
            raise ValueError(f"Loss weight {item!r}: {value!r} is not a number.") from None
        if not (weight >= 0 and weight != float("inf")):
            raise ValueError(f"Loss weight {item!r}: a weight must be a finite number >= 0.")
        weights[LOSS_WEIGHT_FIELDS[name]] = weight
    if not weights:
        raise ValueError(f"No loss weight in {text!r}; write e.g. 'ce=1,bce=2,dice=0.5'.")
    return weights


def set_loss_weights(config, weights: dict) -> None:
    """Overrides the config's loss weights for this run (they are saved with the model, documenting the run)."""
    for field, weight in weights.items():
        setattr(config, field, weight)


# ---- what trains --------------------------------------------------------------------------------

TRAINABLE_CHOICES = ("heads", "lora", "qlora", "full")
# The pretrained backbones (under `VSMForCausalLM` or its `model`): frozen by `--trainable heads`, learning-rate
# part "lm". `dense_encoder`: the SAM / OWL-ViT image encoder of the "sam" / "detector" dense sources.
BACKBONE_MODULES = ("vision_tower", "language_model", "lm_head", "dense_encoder")
# The projections between parts: learning-rate part "projector". Every other module (SAM's prompt encoder and
# mask decoder, the mask refiner, the convolutional stem, the box / class heads, and any head added later) is part
# "heads".
PROJECTOR_MODULES = ("multi_modal_projector", "text_hidden_fcs_seg", "text_hidden_fcs_det", "vision_to_dense", "lm_to_dense",
                     "detector_to_dense")
PARAMETER_PARTS = ("lm", "projector", "heads")
# LoRA on the LM's attention and MLP projections only (not the vision tower's, which has q/k/v/o too).
LORA_TARGET_MODULES = r".*\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
LORA_DEFAULTS = {"rank": 16, "alpha": 32, "dropout": 0.05}
# QLoRA quantises the LM's linear layers only: every module whose path does not start with `model.language_model.`
# stays in full precision (a regex for transformers' `llm_int8_skip_modules`, matched from the start of the path).
QUANTIZATION_SKIP_MODULES = (r"(?!model\.language_model\.).*",)


def parameter_part(name: str) -> str:
    """The learning-rate part of a parameter (plain or peft-wrapped name): "lm", "projector" or "heads"."""
    components = set(name.split("."))
    if components & set(PROJECTOR_MODULES):
        return "projector"
    if components & set(BACKBONE_MODULES):
        return "lm"
    return "heads"


def full_modules(model) -> list[str]:
    """Names of the modules outside the backbones (projections and heads), which `heads`, `lora` and `qlora`
    train in full."""
    names = [name for name, _ in model.named_children() if name not in BACKBONE_MODULES + ("model",)]
    return names + [name for name, _ in model.model.named_children() if name not in BACKBONE_MODULES]


def new_token_ids(config) -> list[int]:
    """The rows of the token embeddings that VSM adds to a VLM: `<SEG>` and `<loc>`."""
    return sorted({config.seg_token_index, config.loc_token_index} - {None})


class VSMTrainableRows(nn.Module):
    """A frozen embedding (or LM head) whose rows `token_ids` train as a (k, D) parameter of their own, `rows`: the
    optimizer keeps state for k rows, not for the vocabulary (Adam: 2 x 4 bytes per weight, 3.4 GB for the two
    102400-row matrices of Janus-Pro-1B). [`fold_token_rows`] writes the rows back and removes the wrapper.

    Its state dict is the plain layer's (`weight`, the trained rows written in), so checkpoints saved while it is in
    place load as plain models, and load back into it. `rows` may be shared with another wrapper: a tied LM head
    reads the embedding's rows."""

    def __init__(self, layer: nn.Module, token_ids: list[int], rows: nn.Parameter | None = None):
        super().__init__()
        self.layer = layer.requires_grad_(False)
        self.register_buffer("token_ids", torch.tensor(token_ids, device=layer.weight.device), persistent=False)
        self.rows = rows if rows is not None else nn.Parameter(layer.weight[token_ids].detach().clone())  # (k, D)
        self.rows._vsm_trainable_rows = len(token_ids)
        self.register_state_dict_post_hook(self._folded_state)
        self.register_load_state_dict_pre_hook(self._unfolded_state)

    @staticmethod
    def _folded_state(module, state_dict, prefix, local_metadata):
        weight = state_dict.pop(prefix + "layer.weight").detach().clone()
        weight[module.token_ids] = state_dict.pop(prefix + "rows").detach().to(weight.dtype)
        state_dict[prefix + "weight"] = weight

    @staticmethod
    def _unfolded_state(module, state_dict, prefix, *args):
        if prefix + "weight" in state_dict:
            weight = state_dict.pop(prefix + "weight")
            state_dict[prefix + "layer.weight"] = weight
            state_dict[prefix + "rows"] = weight[module.token_ids.to(weight.device)]

    @property
    def weight(self):
        return self.layer.weight

    def forward(self, inputs):
        rows = self.rows.to(self.layer.weight.dtype)
        if isinstance(self.layer, nn.Embedding):  # ids (B, T) -> (B, T, D): the trained rows where the ids are theirs
            match = (inputs[..., None] == self.token_ids).to(rows.dtype)  # (B, T, k)
            return torch.where(match.sum(-1, keepdim=True) > 0, match @ rows, self.layer(inputs))
        logits = self.layer(inputs)  # (B, T, D) -> (B, T, V): the trained rows' columns
        return logits.index_copy(-1, self.token_ids, F.linear(inputs, rows).to(logits.dtype))


def train_token_rows(model, token_ids: list[int]) -> None:
    """Makes only the rows `token_ids` of the input and output embeddings trainable (wrapped in
    [`VSMTrainableRows`]); a tied LM head shares the embedding's rows."""
    embedding = VSMTrainableRows(model.get_input_embeddings(), token_ids)
    model.set_input_embeddings(embedding)
    head = model.get_output_embeddings()
    tied = head.weight is embedding.weight
    model.set_output_embeddings(VSMTrainableRows(head, token_ids, rows=embedding.rows if tied else None))


def fold_token_rows(model) -> None:
    """Writes trained rows back into the embedding and LM head weights and removes the wrappers: a plain model
    again, whose state dict has the original keys. A model without wrappers is left as it is."""
    for get, set_ in ((model.get_input_embeddings, model.set_input_embeddings),
                      (model.get_output_embeddings, model.set_output_embeddings)):
        wrapper = get()
        if isinstance(wrapper, VSMTrainableRows):
            with torch.no_grad():
                wrapper.layer.weight[wrapper.token_ids] = wrapper.rows.to(wrapper.layer.weight.dtype)
            set_(wrapper.layer)


def freeze_for_heads(model) -> None:
    """`--trainable heads` (the "Modified LISA" recipe): every backbone (vision tower, LM) frozen; the
    projections, the mask / box heads and the `<SEG>` / `<loc>` token rows train."""
    model.requires_grad_(False)
    for name in full_modules(model):
        (getattr(model, name, None) or getattr(model.model, name)).requires_grad_(True)
    train_token_rows(model, new_token_ids(model.config))


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; the trained token rows count as trainable, once (copies of rows)."""
    if hasattr(model, "get_nb_trainable_parameters"):  # peft: also unpacks 4-bit weights
        return tuple(int(n) for n in model.get_nb_trainable_parameters())
    trainable = total = 0
    for param in model.parameters():
        total += 0 if hasattr(param, "_vsm_trainable_rows") else param.numel()
        trainable += param.numel() if param.requires_grad else 0
    return trainable, total


def lora_config(model, rank: int = LORA_DEFAULTS["rank"], alpha: int = LORA_DEFAULTS["alpha"],
                dropout: float = LORA_DEFAULTS["dropout"]):
    """peft `LoraConfig`: LoRA on the LM's projections; the projectors and heads trained in full
    (`modules_to_save`) and the new token rows of `embed_tokens` / `lm_head` (`trainable_token_indices`)."""
    from peft import LoraConfig

    token_ids = new_token_ids(model.config)
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=LORA_TARGET_MODULES,
        modules_to_save=full_modules(model),
        trainable_token_indices={"embed_tokens": token_ids, "lm_head": token_ids},
    )


def apply_lora(model, quantized: bool = False, **lora_kwargs):
    """Wraps `model` in a peft LoRA model (`lora_config`). `quantized`: a 4-bit model from `load_quantized`."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return get_peft_model(model, lora_config(model, **lora_kwargs))


def quantization_config(device: torch.device):
    """4-bit NF4 for the LM's linear layers (QLoRA); vision tower, projectors, SAM and heads stay un-quantised."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
        llm_int8_skip_modules=list(QUANTIZATION_SKIP_MODULES),
    )


def check_4bit_support(device: torch.device) -> None:
    """Raises a clear error when bitsandbytes is missing or cannot run a 4-bit layer on `device`."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ImportError("--trainable qlora needs bitsandbytes and peft: pip install 'vsm[lora]'.") from None
    try:
        layer = bnb.nn.Linear4bit(8, 8, compute_dtype=torch.float32, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(torch.randn(8, 8), requires_grad=False, quant_type="nf4")
        layer = layer.to(device)
        layer(torch.randn(2, 8, device=device))
    except Exception as error:  # bitsandbytes raises many types for an unsupported backend
        raise RuntimeError(f"bitsandbytes cannot run 4-bit layers on {device}: {type(error).__name__}: {error}") from None


def load_quantized(path, device: torch.device):
    """A saved VSM folder with its LM in 4-bit NF4 (QLoRA's base), everything else in fp32."""
    from .modeling_vsm import VSMForCausalLM

    check_4bit_support(device)
    return VSMForCausalLM.from_pretrained(path, quantization_config=quantization_config(device),
                                          device_map={"": device}, dtype=torch.float32)


def name_adapter_base(adapter_dir, base_dir) -> None:
    """Makes a saved adapter load the way peft users load one, `AutoPeftModelForCausalLM.from_pretrained(ADAPTER,
    trust_remote_code=True)`, from any working directory: `adapter_config.json` names its base by absolute path and
    says `task_type: CAUSAL_LM` (peft's own mapping to `AutoModelForCausalLM`, which loads the VSM's remote code)
    instead of an `auto_mapping` that imports this project's package (outside peft's import allowlist)."""
    path = Path(adapter_dir) / "adapter_config.json"
    config = json.loads(path.read_text())
    config.pop("auto_mapping", None)
    config["task_type"] = "CAUSAL_LM"
    config["base_model_name_or_path"] = str(Path(base_dir).resolve())
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def merge_adapter(base_model, adapter_dir):
    """A plain `VSMForCausalLM` with the LoRA adapter, its modules and token rows merged in (full precision)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base_model, str(adapter_dir)).merge_and_unload()


# ---- checkpoints --------------------------------------------------------------------------------

# Written into `checkpoint-N/` after every file of it (all processes) is on disk. A folder without it was
# cut off while saving and is never resumed from.
CHECKPOINT_COMPLETE_FILE = "vsm_checkpoint_complete.json"


def checkpoint_folders(folder) -> list[tuple[int, Path]]:
    """`(step, path)` of every `checkpoint-N` folder in `folder`, by step."""
    pattern = re.compile(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)")
    found = []
    for path in Path(folder).iterdir() if Path(folder).is_dir() else []:
        match = pattern.fullmatch(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def is_complete_checkpoint(path) -> bool:
    return Path(path, CHECKPOINT_COMPLETE_FILE).is_file()


def latest_checkpoint(folder) -> Path | None:
    """The complete checkpoint with the highest step in `folder` (half-written ones are skipped)."""
    complete = [path for _, path in checkpoint_folders(folder) if is_complete_checkpoint(path)]
    return complete[-1] if complete else None


def resolve_resume(resume, folder) -> Path | None:
    """`--resume`: "latest" (the newest complete checkpoint in `folder`), a checkpoint path, or None."""
    if resume in (None, False, ""):
        return None
    if resume is True or resume == "latest":
        found = latest_checkpoint(folder)
        if found is None:
            raise FileNotFoundError(f"--resume latest: no complete checkpoint in {folder}")
        return found
    path = Path(resume)
    if not path.is_dir():
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint folder")
    if not is_complete_checkpoint(path):
        raise ValueError(f"--resume {resume}: the checkpoint is incomplete (no {CHECKPOINT_COMPLETE_FILE}; the run "
                         "stopped while saving it); resume from an earlier one or use --resume latest")
    return path


# ---- evaluation during training -----------------------------------------------------------------


def teacher_forced_mask_stats(pred_masks, gt_masks) -> torch.Tensor:
    """Per sample: (intersection, union, summed per-mask IoU, number of masks) of the masks decoded at the
    gold answer's `<SEG>` tokens, on the targets' frame, pixels labelled 255 left out. (B, 4) float64."""
    stats = torch.zeros(len(gt_masks), 4, dtype=torch.float64)
    for row, (logits, target) in enumerate(zip(pred_masks, gt_masks)):
        if target.shape[0] == 0:
            continue
        logits = F.interpolate(logits[:, None].float(), size=target.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        valid = target != IGNORE_LABEL
        predicted, truth = (logits > LOGIT_THRESHOLD) & valid, (target == 1) & valid  # (n, H, W)
        intersection = (predicted & truth).flatten(1).sum(-1).double()  # (n,)
        union = (predicted | truth).flatten(1).sum(-1).double()
        iou = torch.where(union > 0, intersection / (union + IOU_EPS), torch.full_like(union, EMPTY_UNION_IOU))
        stats[row] = torch.stack([intersection.sum(), union.sum(), iou.sum(), torch.tensor(float(target.shape[0]))]).cpu()
    return stats


def teacher_forced_mask_metrics(eval_prediction) -> dict:
    """`compute_metrics` for [`VSMTrainer`]: gIoU and cIoU (LISA's definitions) over the eval set's masks."""
    stats = np.asarray(eval_prediction.predictions, dtype=np.float64).reshape(-1, 4)
    intersection, union, iou_sum, num_masks = stats.sum(0)
    if num_masks == 0:
        return {"num_masks": 0}
    ciou = intersection / union if union > 0 else EMPTY_UNION_IOU
    return {"giou": float(iou_sum / num_masks), "ciou": float(ciou), "num_masks": int(num_masks)}


# ---- the trainer --------------------------------------------------------------------------------


def label_predicting_positions(labels: torch.Tensor) -> torch.Tensor:
    """(T_kept,) the positions whose next token is labelled in some row of `labels` (B, T)."""
    return ((labels[:, 1:] != IGNORE_INDEX).any(dim=0)).nonzero()[:, 0]


class VSMTrainer(Trainer):
    """`Trainer` for VSM.

    - Exact gradient accumulation for every loss part: each is a sum over the accumulated batch divided
      by that batch's total (text tokens, masks, boxes), so `gradient_accumulation_steps=2` with batch 2
      equals batch 4. Under DDP the totals are summed over processes too, so N processes of batch b equal
      one process of batch N*b (`average_tokens_across_devices`, on by default).
    - Each loss part is logged (`ce_loss`, `mask_bce_loss`, ...), as a mean per optimizer step.
    - Evaluation is teacher-forced and generation-free: the masks decoded at the `<SEG>` of the gold
      answer, scored with gIoU / cIoU (`eval_giou`, `eval_ciou`) next to `eval_loss`.
    - One learning rate per part (`learning_rates={"lm": ..., "projector": ..., "heads": ...}`, absolute
      rates; a part left out uses `args.learning_rate`). See `parameter_part`.
    - Checkpoints are marked complete once fully written; resuming ("latest" or `True`) takes the newest
      complete one, and half-written ones are removed.
    """

    def __init__(self, *args, learning_rates: dict | None = None, **kwargs):
        kwargs.setdefault("compute_metrics", teacher_forced_mask_metrics)
        super().__init__(*args, **kwargs)
        if self.args.remove_unused_columns:
            raise ValueError("VSMTrainer needs `TrainingArguments(remove_unused_columns=False)`: the collator reads raw rows.")
        unknown = set(learning_rates or {}) - set(PARAMETER_PARTS)
        if unknown:
            raise ValueError(f"`learning_rates` has unknown parts {sorted(unknown)}; use {list(PARAMETER_PARTS)}.")
        self.learning_rates = {part: float(lr) for part, lr in (learning_rates or {}).items() if lr is not None}
        self._loss_part_sums = defaultdict(float)
        self._loss_part_steps = 0
        self._target_counts = {}

    @property
    def _counts_are_global(self) -> bool:
        """Whether loss denominators are totals over every process (then each process's loss is scaled by
        the number of processes, since DDP averages gradients)."""
        return self.args.average_tokens_across_devices and self.args.world_size > 1

    # ---- optimizer ----------------------------------------------------------------------------

    def create_optimizer(self, model=None):
        """One parameter group per (part, decay): the part's learning rate, no decay on norms, biases and
        gradient-masked token rows."""
        if self.optimizer is not None:
            return self.optimizer
        model = self.model if model is None else model
        decay_names = set(self.get_decay_parameter_names(model))
        groups = {}
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            part = parameter_part(name)
            decays = name in decay_names and not hasattr(param, "_vsm_trainable_rows")
            group = groups.setdefault((part, decays), {
                "params": [],
                "lr": self.learning_rates.get(part, self.args.learning_rate),
                "weight_decay": self.args.weight_decay if decays else 0.0,
            })
            group["params"].append(param)
        if self.optimizer_cls_and_kwargs is not None:
            optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
        else:
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        self.optimizer = optimizer_cls(list(groups.values()), **optimizer_kwargs)
        return self.optimizer

    # ---- loss ---------------------------------------------------------------------------------

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        counts = torch.tensor(
            [
                sum(int(m.shape[0]) for batch in batch_samples for m in batch.get("gt_masks", [])),
                sum(int(b.shape[0]) for batch in batch_samples for b in batch.get("gt_boxes", [])),
            ],
            dtype=torch.float32,
            device=device,
        )
        if self._counts_are_global:
            counts = self.accelerator.gather(counts).view(-1, 2).sum(0)  # (2,) over the global batch
        self._target_counts = {"num_masks_in_batch": counts[0], "num_boxes_in_batch": counts[1]}
        return batch_samples, num_items_in_batch

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        training = model.training and num_items_in_batch is not None
        counts = self._target_counts if training else {}
        if model.training and inputs.get("labels") is not None and "logits_to_keep" not in inputs:
            # lm_head only where a labelled token is predicted (never over the image): same CE, less work.
            inputs = {**inputs, "logits_to_keep": label_predicting_positions(inputs["labels"])}
        outputs = model(**inputs, num_items_in_batch=num_items_in_batch, **counts)
        loss = outputs.loss
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"Non-finite loss at step {self.state.global_step}: "
                + ", ".join(f"{name}={float(getattr(outputs, name)):.4g}" for name in LOSS_PARTS)
            )
        if model.training:
            for name in LOSS_PARTS:
                self._loss_part_sums[name] += float(getattr(outputs, name).detach())
            self._loss_part_steps += 1
        if training and self._counts_are_global:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients over processes
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict, *args, **kwargs):
        if "loss" in logs and self._loss_part_steps:
            parts = torch.tensor([self._loss_part_sums[name] for name in LOSS_PARTS], device=self.args.device)
            if self.args.world_size > 1:  # a process's parts are its share of the global sums (or its own mean)
                parts = self.accelerator.reduce(parts, "sum" if self._counts_are_global else "mean")
            # Parts are normalised per accumulated batch: scale back to a per-optimizer-step mean.
            steps = self._loss_part_steps / max(self.args.gradient_accumulation_steps, 1)
            for name, total in zip(LOSS_PARTS, parts.tolist()):
                logs[name] = round(total / max(steps, 1.0), 4)
            self._loss_part_sums.clear()
            self._loss_part_steps = 0
        super().log(logs, *args, **kwargs)

    # ---- evaluation ---------------------------------------------------------------------------

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Teacher-forced: the loss and, per sample, `teacher_forced_mask_stats` (B, 4) as predictions."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        stats = teacher_forced_mask_stats(outputs.pred_masks, inputs["gt_masks"]).to(loss.device)
        return loss.detach(), stats, stats[:, 3]

    # ---- checkpoints --------------------------------------------------------------------------

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        self.accelerator.wait_for_everyone()  # every process has written its part (RNG states)
        if self.args.should_save:
            folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            (folder / CHECKPOINT_COMPLETE_FILE).write_text(json.dumps({"global_step": self.state.global_step}))

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """`Trainer.train`; `resume_from_checkpoint` may be "latest" / `True` (the newest COMPLETE checkpoint
        in `output_dir`) or a path, which must be complete."""
        resume = resolve_resume(resume_from_checkpoint, self.args.output_dir)
        if resume is not None and self.args.should_save:
            for step, path in checkpoint_folders(self.args.output_dir):
                if not is_complete_checkpoint(path):
                    logger.warning(f"removing {path}: a checkpoint left half-written by an interrupted run")
                    shutil.rmtree(path)
        self.accelerator.wait_for_everyone()
        result = super().train(str(resume) if resume is not None else None, *args, **kwargs)
        # From now on `save_pretrained` of the trained model also writes its model card (README.md).
        attach_model_card(self.model, training=training_from_trainer(self))
        return result
