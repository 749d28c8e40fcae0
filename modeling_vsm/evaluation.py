"""Inference helpers and the segmentation evaluation used by `vsm train` and `vsm eval`.

gIoU / cIoU follow LISA (DESIGN.md section 5, `modeling_vsm.metrics`). Two diagnostics from the
design notes tell grounding from shape-finding: per-query-type gIoU next to its chance level
(the IoU of picking a random object of the scene), and a swap test: the same image with another
sample's instruction must give a different mask (swap IoU near 1.0 means the instruction is ignored).
"""

import math
from collections import defaultdict

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from .data import rasterize_mask
from .metrics import box_metrics, intersection_union, reason_seg_iou
from .training import attach_image

OVERLAY_MIN_SIDE = 256  # small images are upscaled so a person can see the overlay
OVERLAY_ALPHA = 0.5
OVERLAY_COLOURS = ((255, 64, 64), (64, 160, 255), (64, 220, 120), (255, 200, 40))
BOX_COLOUR = (255, 255, 255)
DEFAULT_MAX_NEW_TOKENS = 24


def prompt_text(processor, messages: list[dict], with_image: bool = True) -> str:
    """The chat-templated prompt of the first user turn, ready for generation."""
    first_user = next((m for m in messages if m["role"] == "user"), None)
    if first_user is None:
        raise ValueError("A prompt needs a user turn.")
    turns = [first_user]
    if with_image:
        turns = attach_image(turns, processor.image_token)
    return processor.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)


@torch.no_grad()
def predict(model, processor, images, prompts, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> list[dict]:
    """Generates answers, masks and boxes for a batch of images and chat-templated prompts.

    Returns one dict per sample: `text`, `masks` (bool (n, h, w) at the original size), `boxes`
    ((m, 4) xyxy pixels), `scores` ((m,)), as `VSMProcessor.post_process_generation`.
    """
    inputs = processor(images=images, text=prompts, padding=True, padding_side="left", return_tensors="pt")
    original_sizes = inputs.pop("original_sizes")
    inputs = {k: v.to(model.device) if torch.is_tensor(v) else v for k, v in inputs.items()}
    outputs = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, return_dict_in_generate=True)
    return processor.post_process_generation(outputs, target_sizes=original_sizes.tolist())


def union_mask(masks) -> np.ndarray | None:
    """One (h, w) bool mask from (n, h, w) predicted masks; None when none was emitted."""
    masks = masks.cpu().numpy() if torch.is_tensor(masks) else np.asarray(masks)
    return masks.any(axis=0) if masks.shape[0] else None


def evaluate_segmentation(
    model, processor, dataset, batch_size: int = 32, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    swap_test: bool = True, progress: bool = True,
):
    """Evaluates every query of `dataset` (common schema). Returns (summary dict, per-sample records).

    Summary: `giou`, `ciou`, `num_samples` (segmentation queries), `seg_emission_rate`, `per_type`
    ({type: giou, ciou, chance_iou, num_samples}), `chance_iou`, `box_accuracy` / `box_miou` /
    `num_boxes` for `<loc>` queries, `swap_iou` and `swap_num_pairs`.
    """
    model.eval()
    records, seg_predictions, seg_references, box_predictions, box_targets = [], [], [], [], []
    seg_rows = []
    for start in tqdm(range(0, len(dataset), batch_size), desc="evaluating", disable=not progress):
        rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        results = predict(model, processor, [r["image"] for r in rows], [prompt_text(processor, r["messages"]) for r in rows], max_new_tokens)
        for row, result in zip(rows, results):
            record = {"id": row["id"], "query_type": row["query_type"], "is_sentence": bool(row["is_sentence"]),
                      "query": row["messages"][0]["content"], "answer": result["text"]}
            if row["masks"]:
                width, height = row["image"].size
                reference = rasterize_mask(row["masks"][0], (row["ignore"] or [[]])[0], height, width)
                predicted = union_mask(result["masks"])
                emitted = predicted is not None
                predicted = predicted if emitted else np.zeros((height, width), dtype=bool)
                intersection, union = intersection_union(predicted, reference)
                record.update(emitted=emitted, iou=reason_seg_iou([predicted], [reference])["giou"],
                              intersection=intersection, union=union,
                              chance_iou=_finite(row.get("chance_iou")))
                seg_predictions.append(predicted)
                seg_references.append(reference)
                seg_rows.append(row)
            elif row["boxes"]:
                predicted_box = result["boxes"][0].tolist() if len(result["boxes"]) else None
                box_predictions.append(predicted_box)
                box_targets.append(list(row["boxes"][0]))
                record.update(emitted=predicted_box is not None, pred_box=predicted_box, gt_box=list(row["boxes"][0]))
            records.append(record)

    summary = summarize(records, seg_predictions, seg_references, box_predictions, box_targets)
    if swap_test and len(seg_rows) >= 2:
        summary.update(swap_test_iou(model, processor, seg_rows, seg_predictions, batch_size, max_new_tokens))
    return summary, records


def summarize(records, seg_predictions, seg_references, box_predictions, box_targets) -> dict:
    seg_records = [r for r in records if "iou" in r]
    summary = {"num_samples": len(seg_records)}
    if seg_records:
        summary.update({k: v for k, v in reason_seg_iou(seg_predictions, seg_references).items() if k != "num_masks"})
        summary["seg_emission_rate"] = sum(r["emitted"] for r in seg_records) / len(seg_records)
        chances = [r["chance_iou"] for r in seg_records if r["chance_iou"] is not None]
        summary["chance_iou"] = float(np.mean(chances)) if chances else None
        groups = defaultdict(list)
        for record, predicted, reference in zip(seg_records, seg_predictions, seg_references):
            groups[record["query_type"]].append((record, predicted, reference))
            groups["sentence_queries" if record["is_sentence"] else "phrase_queries"].append((record, predicted, reference))
        summary["per_type"] = {}
        for name, members in sorted(groups.items()):
            metrics = reason_seg_iou([m[1] for m in members], [m[2] for m in members])
            chances = [m[0]["chance_iou"] for m in members if m[0]["chance_iou"] is not None]
            summary["per_type"][name] = {
                "giou": metrics["giou"], "ciou": metrics["ciou"], "num_samples": len(members),
                "chance_iou": float(np.mean(chances)) if chances else None,
            }
    else:
        summary.update(giou=None, ciou=None, seg_emission_rate=None)
    if box_targets:
        summary.update(box_metrics(box_predictions, box_targets))
    return summary


def swap_test_iou(model, processor, seg_rows, own_predictions, batch_size, max_new_tokens) -> dict:
    """Runs each image with the NEXT sample's instruction; reports the mean IoU between the mask for
    the own instruction and the mask for the swapped one (1.0 = the instruction is ignored)."""
    ious = []
    for start in range(0, len(seg_rows), batch_size):
        indices = list(range(start, min(start + batch_size, len(seg_rows))))
        images = [seg_rows[i]["image"] for i in indices]
        prompts = [prompt_text(processor, seg_rows[(i + 1) % len(seg_rows)]["messages"]) for i in indices]
        results = predict(model, processor, images, prompts, max_new_tokens)
        for i, result in zip(indices, results):
            swapped = union_mask(result["masks"])
            own = own_predictions[i]
            if swapped is None:
                swapped = np.zeros_like(own)
            union = (own | swapped).sum()
            ious.append(float((own & swapped).sum() / union) if union else 1.0)
    return {"swap_iou": float(np.mean(ious)), "swap_num_pairs": len(ious)}


def draw_overlay(image: Image.Image, masks=None, boxes=None) -> Image.Image:
    """The image with each mask blended in a colour and each xyxy box outlined, upscaled when small."""
    canvas = image.convert("RGB")
    scale = max(1, math.ceil(OVERLAY_MIN_SIDE / max(canvas.size)))
    if masks is not None:
        masks = masks.cpu().numpy() if torch.is_tensor(masks) else np.asarray(masks)
        pixels = np.asarray(canvas, dtype=np.float32)
        for index, mask in enumerate(masks):
            colour = np.array(OVERLAY_COLOURS[index % len(OVERLAY_COLOURS)], dtype=np.float32)
            pixels[mask.astype(bool)] = (1 - OVERLAY_ALPHA) * pixels[mask.astype(bool)] + OVERLAY_ALPHA * colour
        canvas = Image.fromarray(pixels.round().astype(np.uint8))
    canvas = canvas.resize((canvas.width * scale, canvas.height * scale), Image.NEAREST)
    if boxes is not None:
        draw = ImageDraw.Draw(canvas)
        for box in (boxes.tolist() if torch.is_tensor(boxes) else boxes):
            draw.rectangle([coordinate * scale for coordinate in box], outline=BOX_COLOUR, width=max(1, scale // 2))
    return canvas


def _finite(value):
    return float(value) if value is not None and math.isfinite(float(value)) else None
