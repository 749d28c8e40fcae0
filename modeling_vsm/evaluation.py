"""Inference helpers and the segmentation evaluation used by `vsm train` and `vsm eval`.

gIoU / cIoU follow LISA (docs/evaluation.md, `modeling_vsm.metrics`). Two diagnostics from the
design notes tell grounding from shape-finding: per-query-type gIoU next to its chance level
(the IoU of picking a random object of the scene), and a swap test: the same image with another
sample's instruction must give a different mask (swap IoU near 1.0 means the instruction is ignored).
"""

import hashlib
import logging
import math
from collections import defaultdict

import numpy as np
import torch
from datasets import Image as ImageFeature
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from .data import sample_mask
from .metrics import EMPTY_UNION_IOU, box_metrics, intersection_union, iou_from_counts, seg_emission_rate
from .training import attach_image

logger = logging.getLogger(__name__)

OVERLAY_MIN_SIDE = 256  # small images are upscaled so a person can see the overlay
OVERLAY_ALPHA = 0.5
OVERLAY_COLOURS = ((255, 64, 64), (64, 160, 255), (64, 220, 120), (255, 200, 40))
BOX_COLOUR = (255, 255, 255)
GALLERY_GAP = 8  # pixels between the prediction and the reference panels
GALLERY_COLOURS = ((255, 255, 255),)  # masks whitened: visible on an object of any colour
DEFAULT_MAX_NEW_TOKENS = 24


def prompt_text(processor, messages: list[dict], with_image: bool = True) -> str:
    """The chat-templated prompt of the first user turn, ready for generation."""
    first_user = next((m for m in messages if m["role"] == "user"), None)
    if first_user is None:
        raise ValueError("A prompt needs a user turn.")
    turns = [first_user]
    if with_image:
        turns = attach_image(turns, processor)
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


def first_query_per_image(dataset) -> list[int]:
    """Indices of the first row of each distinct image, in order (LISA's validation scores one query per
    image); rows without an image are all kept. Images are compared by their stored bytes (or path), undecoded."""
    raw = dataset.cast_column("image", ImageFeature(decode=False)).select_columns(["image"])
    seen, keep = set(), []
    for index, row in enumerate(raw):
        image = row["image"]
        if image is None:
            keep.append(index)
            continue
        key = hashlib.sha1(image["bytes"]).hexdigest() if image.get("bytes") else image.get("path")
        if key not in seen:
            seen.add(key)
            keep.append(index)
    return keep


def read_rows(dataset, indices, ids, unreadable: list) -> list[tuple[int, dict]]:
    """`(index, row)` for each index whose row (and image) can be read; the others go to `unreadable`."""
    rows = []
    for index in indices:
        try:
            row = dataset[index]
            if row["image"] is not None:
                row["image"].load()
        except Exception as error:  # PIL and datasets raise many types for a broken image
            unreadable.append({"index": index, "id": ids[index], "error": f"{type(error).__name__}: {error}"})
            continue
        rows.append((index, row))
    return rows


def score_row(index: int, row: dict, result: dict) -> dict:
    """The per-sample record: query, answer and, for a mask query, `giou` (this mask's IoU term), the cIoU parts
    `intersection` / `union` and whether a `<SEG>` was emitted; for a `<loc>` query the boxes."""
    record = {"index": index, "id": row["id"], "query_type": row["query_type"], "is_sentence": bool(row["is_sentence"]),
              "query": next(m["content"] for m in row["messages"] if m["role"] == "user"), "answer": result["text"]}
    if row["masks"]:
        width, height = row["image"].size
        reference = sample_mask(row, 0, height, width)  # (H, W) 0/1/255
        predicted = union_mask(result["masks"])
        emitted = predicted is not None
        intersection, union = intersection_union(predicted if emitted else np.zeros((height, width), bool), reference)
        record.update(emitted=emitted, giou=iou_from_counts([intersection], [union])["giou"],
                      intersection=intersection, union=union, chance_iou=_finite(row.get("chance_iou")))
    elif row["boxes"]:
        predicted_box = result["boxes"][0].tolist() if len(result["boxes"]) else None
        record.update(emitted=predicted_box is not None, pred_box=predicted_box, gt_box=list(row["boxes"][0]))
    return record


def evaluate_segmentation(
    model, processor, dataset, batch_size: int = 32, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    swap_test: bool = True, progress: bool = True, one_query_per_image: bool = False, skipped_at_load=None,
):
    """Evaluates every query of `dataset` (common schema), or the first query of each image with
    `one_query_per_image=True` (LISA's validation). Returns (summary dict, per-sample records).

    Summary: `giou`, `ciou`, `num_samples` (segmentation queries scored), `seg_emission_rate`, `per_type`
    ({query type: giou, giou_stderr, ciou, chance_iou, num_samples}), `by_is_sentence` ({"phrase" / "sentence": the same}),
    `chance_iou`, `box_accuracy` / `box_miou` / `num_boxes` for `<loc>` queries, `swap_iou` and
    `swap_num_pairs`, and `num_unreadable` / `unreadable` ([{index, id, error}]): rows whose image could not be
    read, plus `skipped_at_load` (what the data loader skipped), scored as nothing: counted and listed, never
    silently dropped.
    """
    model.eval()
    ids = dataset["id"]
    indices = first_query_per_image(dataset) if one_query_per_image else list(range(len(dataset)))
    records, unreadable, swap_inputs = [], [], []
    for start in tqdm(range(0, len(indices), batch_size), desc="evaluating", disable=not progress):
        rows = read_rows(dataset, indices[start:start + batch_size], ids, unreadable)
        if not rows:
            continue
        results = predict(model, processor, [r["image"] for _, r in rows],
                          [prompt_text(processor, r["messages"]) for _, r in rows], max_new_tokens)
        for (index, row), result in zip(rows, results):
            record = score_row(index, row, result)
            records.append(record)
            if "giou" in record and swap_test:
                swap_inputs.append((index, row["messages"], np.packbits(_or_empty(result["masks"], row["image"]))))

    summary = summarize(records)
    summary["one_query_per_image"] = one_query_per_image
    if swap_test and len(swap_inputs) >= 2:
        summary.update(swap_test_iou(model, processor, dataset, swap_inputs, batch_size, max_new_tokens))
    skipped_at_load = list(skipped_at_load or [])
    summary.update(num_unreadable=len(unreadable) + len(skipped_at_load), unreadable=unreadable, skipped_at_load=skipped_at_load)
    if summary["num_unreadable"]:
        logger.warning("%d samples could not be read (%d at load); they are listed under `unreadable` and "
                       "`skipped_at_load`.", summary["num_unreadable"], len(skipped_at_load))
    return summary, records


def _group_metrics(members) -> dict:
    """gIoU / cIoU of a group of records, the standard error of its gIoU (the spread of the per-sample IoUs over
    sqrt(n); None below 2 samples; ~0.05 for a type scored ~0.7 on ~70 queries) and the mean chance IoU."""
    chances = [r["chance_iou"] for r in members if r["chance_iou"] is not None]
    metrics = iou_from_counts([r["intersection"] for r in members], [r["union"] for r in members])
    per_sample = np.array([r["giou"] for r in members], dtype=np.float64)
    stderr = float(per_sample.std(ddof=1) / np.sqrt(len(members))) if len(members) > 1 else None
    return {"giou": metrics["giou"], "giou_stderr": stderr, "ciou": metrics["ciou"], "num_samples": len(members),
            "chance_iou": float(np.mean(chances)) if chances else None}


def summarize(records) -> dict:
    """The summary of `evaluate_segmentation` from its per-sample records (gIoU / cIoU from their I and U)."""
    seg_records = [r for r in records if "giou" in r]
    summary = {"num_samples": len(seg_records)}
    if seg_records:
        overall = _group_metrics(seg_records)
        summary.update(giou=overall["giou"], ciou=overall["ciou"], chance_iou=overall["chance_iou"],
                       seg_emission_rate=seg_emission_rate(sum(r["emitted"] for r in seg_records), len(seg_records)))
        by_type, by_sentence = defaultdict(list), defaultdict(list)
        for record in seg_records:
            by_type[record["query_type"]].append(record)
            by_sentence["sentence" if record["is_sentence"] else "phrase"].append(record)
        summary["per_type"] = {name: _group_metrics(members) for name, members in sorted(by_type.items())}
        summary["by_is_sentence"] = {name: _group_metrics(members) for name, members in sorted(by_sentence.items())}
    else:
        summary.update(giou=None, ciou=None, chance_iou=None, seg_emission_rate=None)
    box_records = [r for r in records if "gt_box" in r]
    if box_records:
        summary.update(box_metrics([r["pred_box"] for r in box_records], [r["gt_box"] for r in box_records]))
    return summary


def swap_test_iou(model, processor, dataset, swap_inputs, batch_size, max_new_tokens) -> dict:
    """Runs each scored image with the NEXT scored sample's instruction; reports the mean IoU between the mask
    for the own instruction and the mask for the swapped one (1.0 = the instruction is ignored).

    `swap_inputs`: (dataset index, messages, own union mask packed with `np.packbits`) per scored sample."""
    ious = []
    for start in range(0, len(swap_inputs), batch_size):
        chunk = range(start, min(start + batch_size, len(swap_inputs)))
        images = [dataset[swap_inputs[k][0]]["image"] for k in chunk]
        prompts = [prompt_text(processor, swap_inputs[(k + 1) % len(swap_inputs)][1]) for k in chunk]
        for k, image, result in zip(chunk, images, predict(model, processor, images, prompts, max_new_tokens)):
            swapped = _or_empty(result["masks"], image)  # (H, W)
            own = np.unpackbits(swap_inputs[k][2], count=swapped.size).reshape(swapped.shape).astype(bool)
            union = (own | swapped).sum()
            ious.append(float((own & swapped).sum() / union) if union else EMPTY_UNION_IOU)
    return {"swap_iou": float(np.mean(ious)), "swap_num_pairs": len(ious)}


def _or_empty(masks, image) -> np.ndarray:
    """The union of predicted masks, or an all-False (H, W) mask for `image` when none was emitted."""
    predicted = union_mask(masks)
    return predicted if predicted is not None else np.zeros((image.height, image.width), dtype=bool)


def draw_overlay(image: Image.Image, masks=None, boxes=None, colours=OVERLAY_COLOURS) -> Image.Image:
    """The image with each mask blended in a colour (`colours`, in turn) and each xyxy box outlined, upscaled
    when small."""
    canvas = image.convert("RGB")
    scale = max(1, math.ceil(OVERLAY_MIN_SIDE / max(canvas.size)))
    if masks is not None:
        masks = masks.cpu().numpy() if torch.is_tensor(masks) else np.asarray(masks)
        pixels = np.asarray(canvas, dtype=np.float32)
        for index, mask in enumerate(masks):
            colour = np.array(colours[index % len(colours)], dtype=np.float32)
            pixels[mask.astype(bool)] = (1 - OVERLAY_ALPHA) * pixels[mask.astype(bool)] + OVERLAY_ALPHA * colour
        canvas = Image.fromarray(pixels.round().astype(np.uint8))
    canvas = canvas.resize((canvas.width * scale, canvas.height * scale), Image.NEAREST)
    if boxes is not None:
        draw = ImageDraw.Draw(canvas)
        for box in (boxes.tolist() if torch.is_tensor(boxes) else boxes):
            draw.rectangle([coordinate * scale for coordinate in box], outline=BOX_COLOUR, width=max(1, scale // 2))
    return canvas


def write_gallery(model, processor, dataset, records, out_dir, num_cases: int = 8) -> list:
    """PNGs of the `num_cases // 2` worst and best scored samples (prediction | reference, side by side) and an
    `index.html` listing them with query, answer and gIoU. Returns the PNG paths."""
    from html import escape
    from pathlib import Path

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scored = sorted((r for r in records if "giou" in r), key=lambda r: r["giou"])
    half = num_cases // 2
    chosen = scored if len(scored) <= 2 * half else scored[:half] + scored[-half:]  # worst first
    paths, table = [], []
    for rank, record in enumerate(chosen):
        label = "worst" if rank < len(chosen) // 2 else "best"
        row = dataset[record["index"]]
        result = predict(model, processor, [row["image"]], [prompt_text(processor, row["messages"])])[0]
        width, height = row["image"].size
        reference = sample_mask(row, 0, height, width) == 1  # (H, W)
        left = draw_overlay(row["image"], result["masks"], result["boxes"], colours=GALLERY_COLOURS)
        right = draw_overlay(row["image"], reference[None], colours=GALLERY_COLOURS)
        panel = Image.new("RGB", (left.width + GALLERY_GAP + right.width, left.height), (255, 255, 255))
        panel.paste(left, (0, 0))
        panel.paste(right, (left.width + GALLERY_GAP, 0))
        path = out_dir / f"{label}_{rank:02d}_iou{record['giou']:.2f}.png"
        panel.save(path)
        paths.append(path)
        table.append(f"<tr><td>{label}</td><td>{record['giou']:.3f}</td><td>{escape(record['query'])}</td>"
                     f"<td>{escape(record['answer'])}</td><td><img src=\"{path.name}\"></td></tr>")
    (out_dir / "index.html").write_text(
        "<!doctype html><meta charset=\"utf-8\"><title>VSM evaluation: best and worst cases</title>\n"
        "<p>Left: the prediction (masks and boxes); right: the reference mask.</p>\n<table border=\"1\">\n"
        "<tr><th>case</th><th>gIoU</th><th>query</th><th>answer</th><th>prediction | reference</th></tr>\n"
        + "\n".join(table) + "\n</table>\n", encoding="utf-8")
    return paths


def _finite(value):
    return float(value) if value is not None and math.isfinite(float(value)) else None
