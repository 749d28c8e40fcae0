"""VSM metrics: LISA's gIoU / cIoU for reasoning segmentation, box accuracy for `<loc>`, `<SEG>` emission rate.

Definitions (docs/evaluation.md, after LISA's `validate` in train_ds.py and `intersectionAndUnionGPU`
in utils/utils.py, github.com/dvlab-research/LISA):
- a prediction is `logits > 0` (or a bool mask); reference pixels labelled 255 are left out of both
  the intersection I and the union U;
- gIoU: the plain mean over masks of I / (U + 1e-5), a mask whose union is empty counting 1.0
  (LISA divides the sum by N + 1e-5, a relative difference under 1e-5);
- cIoU: sum of I over all masks / sum of U (1.0 when every union is empty).
Box IoU as in torchvision's `box_iou` (xyxy, pairwise), written with numpy.

The same gIoU / cIoU is packaged as a local `evaluate` module (it calls `reason_seg_iou`):
`evaluate.load(EVALUATE_MODULE_PATH)` works offline.
"""

from pathlib import Path

import numpy as np

IGNORE_LABEL = 255
IOU_EPS = 1e-5  # LISA's smoothing of the per-mask IoU
EMPTY_UNION_IOU = 1.0  # a mask with nothing predicted and nothing to find is right
BOX_IOU_THRESHOLD = 0.5
REFERENCE_VALUES = (0, 1, IGNORE_LABEL)
EVALUATE_MODULE_PATH = str(Path(__file__).with_name("evaluate_modules") / "vsm_reason_seg")


def _to_numpy(array, name: str) -> np.ndarray:
    """numpy view of a numpy array, torch tensor (any device) or nested list."""
    if hasattr(array, "detach"):  # torch.Tensor, without importing torch
        array = array.detach().cpu()
        if str(array.dtype) == "torch.bfloat16":
            array = array.float()
        array = array.numpy()
    try:
        return np.asarray(array)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} is not array-like: {error}") from None


def intersection_union(prediction, reference) -> tuple:
    """Foreground intersection and union of one mask, ignoring reference pixels labelled 255.

    Args:
        prediction: (H, W) bool mask or float logits (foreground where > 0).
        reference: (H, W) with 1 = foreground, 0 = background, 255 = ignore.

    Returns:
        `(intersection, union)` pixel counts as ints.
    """
    prediction = _to_numpy(prediction, "prediction")
    reference = _to_numpy(reference, "reference")
    if prediction.shape != reference.shape:
        raise ValueError(f"prediction and reference shapes differ: {prediction.shape} vs {reference.shape}.")
    if prediction.ndim != 2:
        raise ValueError(f"masks must be 2-D (H, W), got shape {prediction.shape}.")
    if not np.isin(reference, REFERENCE_VALUES).all():
        found = np.setdiff1d(np.unique(reference), REFERENCE_VALUES)[:5].tolist()
        raise ValueError(f"reference values must be 0, 1 or {IGNORE_LABEL}, found {found}.")
    predicted = prediction if prediction.dtype == bool else prediction > 0  # (H, W)
    valid = reference != IGNORE_LABEL  # (H, W)
    target = reference == 1  # (H, W)
    intersection = int((predicted & target & valid).sum())
    union = int(((predicted | target) & valid).sum())
    return intersection, union


def reason_seg_iou(predictions, references) -> dict:
    """gIoU and cIoU over all masks, as LISA reports them on ReasonSeg.

    Args:
        predictions: list of (H, W) bool masks or float logits (numpy or torch).
        references: list of (H, W) masks with values 0, 1 and 255 (ignore), same shapes pairwise.

    Returns:
        `{"giou": float, "ciou": float, "num_masks": int}`.
    """
    predictions, references = list(predictions), list(references)
    if len(predictions) != len(references):
        raise ValueError(f"Got {len(predictions)} predictions but {len(references)} references.")
    if not predictions:
        raise ValueError("`predictions` and `references` are empty: nothing to score.")
    intersections, unions = [], []
    for index, (prediction, reference) in enumerate(zip(predictions, references)):
        try:
            intersection, union = intersection_union(prediction, reference)
        except ValueError as error:
            raise ValueError(f"Mask {index}: {error}") from None
        intersections.append(intersection)
        unions.append(union)
    return iou_from_counts(intersections, unions)


def iou_from_counts(intersections, unions) -> dict:
    """gIoU and cIoU from per-mask intersection and union pixel counts (what `reason_seg_iou` reduces masks to).

    Returns:
        `{"giou": float, "ciou": float, "num_masks": int}`.
    """
    intersections, unions = np.asarray(intersections, dtype=np.int64), np.asarray(unions, dtype=np.int64)
    if intersections.shape != unions.shape or intersections.ndim != 1:
        raise ValueError(f"Got {intersections.shape} intersections but {unions.shape} unions; both must be (N,).")
    if not intersections.size:
        raise ValueError("No masks: nothing to score.")
    if (intersections < 0).any() or (intersections > unions).any():
        raise ValueError("Each intersection must be between 0 and its union.")
    per_mask_iou = np.where(unions == 0, EMPTY_UNION_IOU, intersections / (unions + IOU_EPS))  # (N,)
    total_union = int(unions.sum())
    ciou = EMPTY_UNION_IOU if total_union == 0 else int(intersections.sum()) / total_union
    return {"giou": float(per_mask_iou.mean()), "ciou": float(ciou), "num_masks": int(intersections.size)}


def _check_boxes(boxes, name: str) -> np.ndarray:
    boxes = _to_numpy(boxes, name).astype(np.float64)
    boxes = boxes[None] if boxes.ndim == 1 else boxes  # (N, 4)
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"{name} must have shape (N, 4) or (4,) in xyxy, got {boxes.shape}.")
    if not np.isfinite(boxes).all():
        raise ValueError(f"{name} has non-finite coordinates.")
    if (boxes[:, 2] < boxes[:, 0]).any() or (boxes[:, 3] < boxes[:, 1]).any():
        raise ValueError(f"{name} must be xyxy with x1 >= x0 and y1 >= y0.")
    return boxes


def box_iou(boxes_a, boxes_b) -> np.ndarray:
    """Pairwise IoU of xyxy boxes: (N, 4) and (M, 4) -> (N, M). A (4,) box counts as (1, 4).

    Two boxes with zero union (degenerate, same point) have IoU 0.
    """
    boxes_a, boxes_b = _check_boxes(boxes_a, "boxes_a"), _check_boxes(boxes_b, "boxes_b")
    area_a = (boxes_a[:, 2] - boxes_a[:, 0]) * (boxes_a[:, 3] - boxes_a[:, 1])  # (N,)
    area_b = (boxes_b[:, 2] - boxes_b[:, 0]) * (boxes_b[:, 3] - boxes_b[:, 1])  # (M,)
    top_left = np.maximum(boxes_a[:, None, :2], boxes_b[None, :, :2])  # (N, M, 2)
    bottom_right = np.minimum(boxes_a[:, None, 2:], boxes_b[None, :, 2:])  # (N, M, 2)
    intersection = np.clip(bottom_right - top_left, 0, None).prod(-1)  # (N, M)
    union = area_a[:, None] + area_b[None, :] - intersection  # (N, M)
    return np.divide(intersection, union, out=np.zeros_like(intersection), where=union > 0)


def box_metrics(pred_boxes, gt_boxes) -> dict:
    """Scores one predicted box per ground-truth box (xyxy pixels); a missing prediction (None) has IoU 0.

    Returns:
        `{"box_accuracy": fraction with IoU >= 0.5, "box_miou": mean IoU, "num_boxes": int}`.
    """
    pred_boxes, gt_boxes = list(pred_boxes), list(gt_boxes)
    if len(pred_boxes) != len(gt_boxes):
        raise ValueError(f"Got {len(pred_boxes)} predicted boxes but {len(gt_boxes)} ground-truth boxes.")
    if not gt_boxes:
        raise ValueError("`pred_boxes` and `gt_boxes` are empty: nothing to score.")
    ious = []
    for index, (pred, gt) in enumerate(zip(pred_boxes, gt_boxes)):
        if gt is None:
            raise ValueError(f"gt_boxes[{index}] is None: every ground-truth box must be given.")
        ious.append(0.0 if pred is None else float(box_iou(pred, gt)[0, 0]))
    ious = np.asarray(ious)
    return {
        "box_accuracy": float((ious >= BOX_IOU_THRESHOLD).mean()),
        "box_miou": float(ious.mean()),
        "num_boxes": len(ious),
    }


def seg_emission_rate(num_emitted: int, num_prompts: int) -> float:
    """Fraction of segmentation prompts for which the model emitted at least one `<SEG>`."""
    if num_prompts <= 0:
        raise ValueError(f"`num_prompts` must be positive, got {num_prompts}.")
    if not 0 <= num_emitted <= num_prompts:
        raise ValueError(f"`num_emitted` must be between 0 and num_prompts={num_prompts}, got {num_emitted}.")
    return num_emitted / num_prompts
