"""Training side of VSM: the data collator and a `transformers.Trainer` subclass.

Not remote code: it may import anything the project depends on. The collator turns rows of the
common sample schema (see `modeling_vsm.data`) into model inputs: chat-templated text with the
instruction before the image, labels on the assistant answers only, ground-truth masks drawn on
the model's square frame and boxes normalised to it (cxcywh, as OWL-ViT).
"""

import logging
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
from transformers import Trainer

from .data import rasterize_mask
from .modeling_vsm import IGNORE_INDEX

logger = logging.getLogger(__name__)

LOSS_PARTS = ("ce_loss", "mask_bce_loss", "mask_dice_loss", "mask_iou_loss", "det_loss")


def attach_image(messages: list[dict], image_token: str) -> list[dict]:
    """Puts the image in the first user turn, AFTER the instruction when the text does not place it.

    DESIGN.md section 1: with the instruction first, the LM's states at the image positions have read it,
    which the `"lm"` dense features rely on.
    """
    messages = [dict(message) for message in messages]
    if not any(image_token in message["content"] for message in messages):
        for message in messages:
            if message["role"] == "user":
                message["content"] = f"{message['content']}\n{image_token}"
                break
        else:
            raise ValueError("A sample with an image needs a user turn to attach it to.")
    return messages


def frame_boxes(boxes_xyxy, height: int, width: int) -> torch.Tensor:
    """Pixel xyxy boxes of an (height, width) image -> normalised cxcywh on its square frame. (m, 4)."""
    boxes = torch.as_tensor(np.asarray(boxes_xyxy, dtype=np.float32).reshape(-1, 4))
    side = float(max(height, width))
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1) / side


@dataclass
class VSMDataCollator:
    """Batches rows of the common schema for [`VSMForCausalLM`].

    Args:
        processor: a `VSMProcessor` (chat template, tokenizer, image processor).
        mask_size: side of the square frame the ground-truth masks are drawn at (defaults to the
            processor's image size; the model's mask logits are resized to it for the loss).
        train_on_prompt: also compute CE on the user turns (off: LLaVA / LISA train on answers only).

    Returns `input_ids`, `attention_mask` (right padded), `labels`, `pixel_values`, `original_sizes`,
    `gt_masks` (list of (n_i, M, M) uint8, 0 / 1 / 255) and `gt_boxes` (list of (m_i, 4)).
    """

    processor: object
    mask_size: int | None = None
    train_on_prompt: bool = False

    def __call__(self, samples: list[dict]) -> dict:
        if not samples:
            raise ValueError("VSMDataCollator got an empty batch.")
        processor = self.processor
        image_token = processor.image_token
        mask_size = self.mask_size or processor.image_processor.image_size
        no_masks = torch.zeros((0, mask_size, mask_size), dtype=torch.uint8)
        texts, images, label_spans, gt_masks, gt_boxes = [], [], [], [], []
        for sample in samples:
            image = sample.get("image")
            mask_polygons, boxes = sample.get("masks") or [], sample.get("boxes") or []
            messages = attach_image(sample["messages"], image_token) if image is not None else sample["messages"]
            texts.append(processor.apply_chat_template(messages, tokenize=False))
            label_spans.append(self.answer_spans(messages))
            images.append(image)
            if image is None:
                if mask_polygons or boxes:
                    raise ValueError(f"Sample {sample.get('id', '?')} has masks or boxes but no image.")
                gt_masks.append(no_masks)
                gt_boxes.append(torch.zeros((0, 4)))
                continue
            width, height = image.size
            scale = mask_size / max(height, width)  # original pixels -> frame pixels
            ignore_polygons = list(sample.get("ignore") or [])
            ignore_polygons += [[]] * (len(mask_polygons) - len(ignore_polygons))
            masks = [
                rasterize_mask(polygons, ignore, mask_size, mask_size, scale=scale)
                for polygons, ignore in zip(mask_polygons, ignore_polygons)
            ]
            gt_masks.append(torch.as_tensor(np.stack(masks)) if masks else no_masks)  # (n, M, M)
            gt_boxes.append(frame_boxes(boxes, height, width))  # (m, 4)

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
        return dict(batch)

    def answer_spans(self, messages: list[dict]) -> list[tuple[int, int]]:
        """Token spans [start, end) of the text the loss applies to (each assistant answer and its end token)."""
        processor = self.processor
        if self.train_on_prompt:
            return [(0, self.token_count(processor.apply_chat_template(messages, tokenize=False)))]
        spans = []
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prefix = processor.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True)
            upto = processor.apply_chat_template(messages[: index + 1], tokenize=False)
            spans.append((self.token_count(prefix), self.token_count(upto)))
        return spans

    def token_count(self, text: str) -> int:
        expanded = text.replace(self.processor.image_token, self.processor.image_token * self.processor.num_image_tokens)
        return len(self.processor.tokenizer(expanded, add_special_tokens=False)["input_ids"])

    def check_targets(self, samples, input_ids, gt_masks, gt_boxes):
        """One mask per `<SEG>` and one box per `<loc>` in the text, else a clear error naming the sample."""
        seg_id = self.processor.tokenizer.convert_tokens_to_ids(self.processor.seg_token)
        loc_id = self.processor.tokenizer.convert_tokens_to_ids(self.processor.loc_token)
        for row, sample in enumerate(samples):
            num_seg, num_loc = int((input_ids[row] == seg_id).sum()), int((input_ids[row] == loc_id).sum())
            if num_seg != gt_masks[row].shape[0] or num_loc != gt_boxes[row].shape[0]:
                raise ValueError(
                    f"Sample {sample.get('id', row)}: the text has {num_seg} <SEG> and {num_loc} <loc> tokens but "
                    f"{gt_masks[row].shape[0]} masks and {gt_boxes[row].shape[0]} boxes."
                )


class VSMTrainer(Trainer):
    """`Trainer` for VSM: exact gradient accumulation for every loss part, and each part logged.

    Every loss part is a sum over the accumulated batch divided by that batch's total (text tokens,
    masks, boxes), so `gradient_accumulation_steps=2` with batch 2 equals batch 4.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.args.remove_unused_columns:
            raise ValueError("VSMTrainer needs `TrainingArguments(remove_unused_columns=False)`: the collator reads raw rows.")
        self._loss_part_sums = defaultdict(float)
        self._loss_part_steps = 0
        self._target_counts = {}

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._target_counts = {
            "num_masks_in_batch": sum(int(m.shape[0]) for batch in batch_samples for m in batch.get("gt_masks", [])),
            "num_boxes_in_batch": sum(int(b.shape[0]) for batch in batch_samples for b in batch.get("gt_boxes", [])),
        }
        return batch_samples, num_items_in_batch

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        counts = self._target_counts if (model.training and num_items_in_batch is not None) else {}
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
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict, *args, **kwargs):
        if "loss" in logs and self._loss_part_steps:
            # Parts are normalised per accumulated batch: scale back to a per-optimizer-step mean.
            steps = self._loss_part_steps / max(self.args.gradient_accumulation_steps, 1)
            for name, total in self._loss_part_sums.items():
                logs[name] = round(total / max(steps, 1.0), 4)
            self._loss_part_sums.clear()
            self._loss_part_steps = 0
        super().log(logs, *args, **kwargs)
