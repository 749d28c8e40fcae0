"""Tests of modeling_vsm.metrics against hand-computed cases and a brute-force reimplementation."""

import numpy as np
import pytest
import torch

from modeling_vsm.metrics import (
    box_iou,
    box_metrics,
    intersection_union,
    reason_seg_iou,
    seg_emission_rate,
)


def _brute_force(predictions, references):
    """LISA's definitions, one pixel at a time."""
    ious, total_i, total_u = [], 0, 0
    for prediction, reference in zip(predictions, references):
        i = u = 0
        for p, r in zip(np.asarray(prediction).reshape(-1), np.asarray(reference).reshape(-1)):
            if r == 255:
                continue
            p = bool(p) if isinstance(p, (bool, np.bool_)) else p > 0
            i += int(p and r == 1)
            u += int(p or r == 1)
        ious.append(1.0 if u == 0 else i / (u + 1e-5))
        total_i, total_u = total_i + i, total_u + u
    return sum(ious) / len(ious), (1.0 if total_u == 0 else total_i / total_u)


def test_hand_computed():
    reference = np.zeros((4, 4), dtype=np.uint8)
    reference[0, :3] = 1  # 3 target pixels
    prediction = np.zeros((4, 4), dtype=bool)
    prediction[0, 1:4] = True  # 2 overlap, union 4
    assert intersection_union(prediction, reference) == (2, 4)
    result = reason_seg_iou([prediction], [reference])
    assert result["giou"] == pytest.approx(2 / (4 + 1e-5))
    assert result["ciou"] == pytest.approx(0.5)
    assert result["num_masks"] == 1


def test_ignore_pixels_leave_both_counts():
    reference = np.array([[1, 1, 255, 255]], dtype=np.uint8)
    prediction = np.array([[True, False, True, False]])
    assert intersection_union(prediction, reference) == (1, 2)  # the predicted ignore pixel is not in U
    all_ignore = np.full((3, 3), 255, dtype=np.uint8)
    result = reason_seg_iou([np.ones((3, 3), dtype=bool)], [all_ignore])
    assert result == {"giou": 1.0, "ciou": 1.0, "num_masks": 1}


def test_empty_prediction():
    empty = np.zeros((5, 5), dtype=bool)
    assert reason_seg_iou([empty], [np.zeros((5, 5))])["giou"] == 1.0
    target = np.zeros((5, 5))
    target[2, 2] = 1
    result = reason_seg_iou([empty], [target])
    assert result["giou"] == 0.0 and result["ciou"] == 0.0


def test_giou_is_plain_mean_and_ciou_pools():
    big_ref = np.zeros((10, 10))
    big_ref[:5] = 1  # 50 pixels, predicted exactly
    small_ref = np.zeros((10, 10))
    small_ref[0, 0] = 1  # 1 pixel, missed
    result = reason_seg_iou([big_ref > 0, np.zeros((10, 10), bool)], [big_ref, small_ref])
    assert result["giou"] == pytest.approx((50 / (50 + 1e-5) + 0.0) / 2)
    assert result["ciou"] == pytest.approx(50 / 51)


def test_logits_are_thresholded_at_zero_and_torch_accepted():
    logits = torch.tensor([[-1.0, 0.0, 0.5, 3.0]])
    reference = torch.tensor([[0, 1, 1, 1]], dtype=torch.uint8)
    assert intersection_union(logits, reference) == (2, 3)  # 0.0 is not foreground
    assert intersection_union(logits.to(torch.bfloat16), reference) == (2, 3)
    numpy_result = reason_seg_iou([logits.numpy()], [reference.numpy()])
    assert reason_seg_iou([logits], [reference]) == numpy_result


def test_matches_brute_force_on_random_masks():
    rng = np.random.default_rng(0)
    predictions, references = [], []
    for k in range(12):
        height, width = rng.integers(3, 12, size=2)
        reference = (rng.random((height, width)) < 0.3).astype(np.uint8)
        reference[rng.random((height, width)) < 0.1] = 255
        prediction = rng.normal(size=(height, width)) if k % 2 else rng.random((height, width)) < 0.4
        predictions.append(prediction)
        references.append(reference)
    predictions.append(np.zeros((4, 4), bool))  # empty union
    references.append(np.zeros((4, 4), np.uint8))
    result = reason_seg_iou(predictions, references)
    giou, ciou = _brute_force(predictions, references)
    assert result["giou"] == pytest.approx(giou, abs=1e-12)
    assert result["ciou"] == pytest.approx(ciou, abs=1e-12)
    assert result["num_masks"] == len(predictions)


def test_reason_seg_iou_errors():
    mask = np.zeros((4, 4))
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        reason_seg_iou([mask, mask], [mask])
    with pytest.raises(ValueError, match="empty"):
        reason_seg_iou([], [])
    with pytest.raises(ValueError, match=r"Mask 1: .*\(4, 4\) vs \(4, 5\)"):
        reason_seg_iou([mask, mask], [mask, np.zeros((4, 5))])
    bad = mask.copy()
    bad[0, 0] = 2
    with pytest.raises(ValueError, match=r"0, 1 or 255, found \[2"):
        reason_seg_iou([mask], [bad])


def test_box_iou():
    a = np.array([[0, 0, 2, 2], [0, 0, 1, 1]])
    b = np.array([[1, 1, 3, 3], [0, 0, 2, 2], [5, 5, 6, 6]])
    iou = box_iou(a, b)
    assert iou.shape == (2, 3)
    expected = np.array([[1 / 7, 1.0, 0.0], [0.0, 0.25, 0.0]])
    assert np.allclose(iou, expected)
    assert box_iou([0, 0, 2, 2], torch.tensor([0.0, 0.0, 2.0, 2.0]))[0, 0] == 1.0
    assert box_iou([1, 1, 1, 1], [1, 1, 1, 1])[0, 0] == 0.0  # degenerate: no union
    with pytest.raises(ValueError, match="boxes_a"):
        box_iou([[0, 0, 1]], [[0, 0, 1, 1]])
    with pytest.raises(ValueError, match="x1 >= x0"):
        box_iou([[2, 0, 1, 1]], [[0, 0, 1, 1]])


def test_box_metrics():
    gt = [[0, 0, 2, 2], [0, 0, 2, 2], [0, 0, 2, 2]]
    pred = [[0, 0, 2, 2], [1, 1, 3, 3], None]
    result = box_metrics(pred, gt)
    assert result["box_accuracy"] == pytest.approx(1 / 3)
    assert result["box_miou"] == pytest.approx((1 + 1 / 7 + 0) / 3)
    assert result["num_boxes"] == 3
    with pytest.raises(ValueError, match="2 predicted boxes but 1"):
        box_metrics([None, None], [[0, 0, 1, 1]])
    with pytest.raises(ValueError, match="empty"):
        box_metrics([], [])


def test_seg_emission_rate():
    assert seg_emission_rate(3, 4) == 0.75
    assert seg_emission_rate(0, 5) == 0.0
    with pytest.raises(ValueError, match="num_prompts"):
        seg_emission_rate(0, 0)
    with pytest.raises(ValueError, match="num_emitted"):
        seg_emission_rate(5, 4)


def test_empty_target_and_all_ignore_hand_computed():
    nothing_to_find = np.zeros((3, 4), dtype=np.uint8)
    prediction = np.zeros((3, 4), dtype=bool)
    prediction[0, :2] = True  # 2 false positives, nothing to find: I = 0, U = 2
    assert intersection_union(prediction, nothing_to_find) == (0, 2)
    assert reason_seg_iou([prediction], [nothing_to_find]) == {"giou": 0.0, "ciou": 0.0, "num_masks": 1}
    all_ignore = np.full((3, 4), 255, dtype=np.uint8)
    # [all ignore, empty prediction on empty target, the miss above]: unions 0, 0, 2 -> gIoU (1 + 1 + 0) / 3, cIoU 0 / 2
    result = reason_seg_iou([prediction, np.zeros((3, 4), bool), prediction], [all_ignore, nothing_to_find, nothing_to_find])
    assert result["giou"] == pytest.approx(2 / 3) and result["ciou"] == 0.0


def test_masks_must_be_two_dimensional():
    with pytest.raises(ValueError, match=r"Mask 0: masks must be 2-D \(H, W\), got shape \(2, 3, 3\)"):
        reason_seg_iou([np.zeros((2, 3, 3))], [np.zeros((2, 3, 3))])


def test_evaluate_module_loads_offline_and_matches(tmp_path, monkeypatch):
    evaluate = pytest.importorskip("evaluate")
    from modeling_vsm.metrics import EVALUATE_MODULE_PATH

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    metric = evaluate.load(EVALUATE_MODULE_PATH, cache_dir=str(tmp_path / "cache"))
    rng = np.random.default_rng(3)
    predictions, references = [], []
    for k in range(6):
        height, width = rng.integers(2, 9, size=2)
        reference = (rng.random((height, width)) < 0.4).astype(np.uint8)
        reference[rng.random((height, width)) < 0.2] = 255
        predictions.append(rng.random((height, width)) < 0.5 if k < 3 else rng.normal(size=(height, width)))
        references.append(reference)
    expected = reason_seg_iou(predictions, references)
    for prediction, reference in zip(predictions[:3], references[:3]):
        metric.add(prediction=prediction, reference=reference)
    metric.add_batch(predictions=predictions[3:], references=references[3:])  # one dtype per batch (Arrow)
    result = metric.compute()
    assert result["num_masks"] == expected["num_masks"] == 6
    assert result["giou"] == pytest.approx(expected["giou"], abs=1e-12)  # logits pass as float32: same sign
    assert result["ciou"] == pytest.approx(expected["ciou"], abs=1e-12)
    bad = np.zeros((2, 2), dtype=np.uint8)
    bad[0, 0] = 7
    with pytest.raises(ValueError, match=r"0, 1 or 255, found \[7\]"):
        metric.compute(predictions=[np.zeros((2, 2))], references=[bad])


def test_iou_from_counts_is_reason_seg_iou_on_counts():
    from modeling_vsm.metrics import iou_from_counts

    assert iou_from_counts([2, 0, 0], [4, 0, 3]) == {"giou": pytest.approx((2 / (4 + 1e-5) + 1.0 + 0.0) / 3),
                                                    "ciou": pytest.approx(2 / 7), "num_masks": 3}
    with pytest.raises(ValueError, match="between 0 and its union"):
        iou_from_counts([3], [2])
    with pytest.raises(ValueError, match="No masks"):
        iou_from_counts([], [])
    with pytest.raises(ValueError, match=r"\(2,\) intersections but \(1,\) unions"):
        iou_from_counts([1, 1], [2])
