"""Visual search (SEAL's, `modeling_vsm.search`): the patch geometry, the batched search against one patch per
forward, the CLI with its JSON and overlay, and bad input."""

import json

import numpy as np
import pytest
from PIL import Image

from conftest import make_tiny_model
from modeling_vsm.search import SearchSettings, context_phrase, draw_search, split_patch, visual_search


def noise(width, height, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("box, grid", [((0, 0, 101, 99), (2, 2)), ((10, 0, 50, 400), (1, 4)), ((0, 5, 403, 105), (4, 1))])
def test_patches_split_in_four_without_overlap(box, grid):
    patches = split_patch(box)
    columns, rows = grid
    assert len(patches) == 4 == columns * rows
    area = sum((x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in patches)
    assert area == (box[2] - box[0]) * (box[3] - box[1])  # they tile the patch
    assert len({x0 for x0, _, _, _ in patches}) == columns and len({y0 for _, y0, _, _ in patches}) == rows
    assert max(x1 for *_, x1, _ in patches) == box[2] and max(y1 for *_, y1 in patches) == box[3]  # remainder last


def test_context_phrase_takes_the_place_after_seals_words():
    answer = "The red car is most likely to appear on the street near the shop."
    assert context_phrase(answer, "red car") in ("street near the shop", "the street")  # plain fallback / spaCy
    assert context_phrase("The cup is most likely to appear in the kitchen.", "cup") in ("kitchen", "the kitchen")
    assert context_phrase("Kitchen shelves.", "cup") in ("Kitchen shelves", "Kitchen")  # no mark: the answer (SEAL)


@pytest.fixture(scope="module")
def tiny(tiny_processor):
    return make_tiny_model(seed=2).eval(), tiny_processor


def test_batched_search_visits_the_same_patches_and_finds_the_same_box(tiny):
    model, processor = tiny
    image = noise(360, 220)
    settings = {"confidence_high": 0.999, "minimum_size": 60}  # a random model never clears it: the whole search runs
    batched = visual_search(model, processor, image, "the red circle", **settings)
    single = visual_search(model, processor, image, "the red circle", batch_children=False, **settings)
    assert batched["path"] == single["path"] and batched["box"] == single["box"] and batched["score"] == single["score"]
    assert len(batched["path"]) > 5 and batched["num_calls"] < single["num_calls"]
    levels = [step["level"] for step in batched["path"]]
    assert levels[0] == 1 and max(levels) >= 3  # best-first over every level
    assert batched["settings"]["confidence_high"] == 0.999 and batched["settings"]["smallest_size"] == 60
    assert batched["success"] == (batched["score"] >= 0.3)
    x0, y0, x1, y1 = batched["box"]
    assert 0 <= x0 <= x1 <= 360 and 0 <= y0 <= y1 <= 220


def test_a_confident_root_ends_the_search_at_once_with_every_instance(tiny):
    from modeling_vsm.metrics import box_iou

    model, processor = tiny
    result = visual_search(model, processor, noise(300, 200), "the red circle", confidence_high=0.0)
    assert len(result["path"]) == 1 and result["success"] and result["box"] is not None
    # SEAL returns every root box above the threshold; one per instance: overlapping patch boxes are suppressed.
    boxes = result["boxes"]
    assert boxes[0] == {"box": result["box"], "score": result["score"]} and len(boxes) > 1
    assert [found["score"] for found in boxes] == sorted((found["score"] for found in boxes), reverse=True)
    pairs = box_iou(np.array([found["box"] for found in boxes]), np.array([found["box"] for found in boxes]))
    assert (pairs[~np.eye(len(boxes), dtype=bool)] <= 0.5).all()
    fewer = visual_search(model, processor, noise(300, 200), "the red circle", confidence_high=0.0, boxes_nms_iou=0.0)
    assert len(fewer["boxes"]) <= len(boxes)
    deeper = visual_search(model, processor, noise(360, 220), "the red circle", confidence_high=0.999, minimum_size=60)
    assert deeper["boxes"] == [{"box": deeper["box"], "score": deeper["score"]}]  # not found at the root: one box


def test_distinct_boxes_keep_the_best_of_each_overlapping_group():
    from modeling_vsm.search import distinct_boxes

    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60], [0, 0, 10, 10]], dtype=float)
    scores = np.array([0.9, 0.95, 0.7, 0.2])
    kept = distinct_boxes(scores, boxes, threshold=0.5, nms_iou=0.5)
    assert kept == [{"box": [1.0, 1.0, 11.0, 11.0], "score": 0.95}, {"box": [50.0, 50.0, 60.0, 60.0], "score": 0.7}]
    assert distinct_boxes(scores, boxes, threshold=0.99, nms_iou=0.5) == []


def test_small_and_extreme_images_give_clear_results(tiny):
    model, processor = tiny
    small = visual_search(model, processor, noise(40, 30), "the red circle")  # smaller than the input: one-shot
    assert len(small["path"]) == 1 and small["path"][0]["cue"] == "leaf"
    # A 10000 x 100 strip: its short side is already a leaf's (SEAL's rule: short side <= smallest_size), so one look;
    # a lower `minimum_size` splits it into 4 columns first (`test_patches_split_in_four_without_overlap`).
    strip = visual_search(model, processor, noise(10000, 100), "the red circle", confidence_high=0.999)
    assert len(strip["path"]) == 1 and strip["settings"]["smallest_size"] == 128  # 2 x the tiny 64-px input
    x0, y0, x1, y1 = strip["box"]
    assert 0 <= x0 <= x1 <= 10000 and 0 <= y0 <= y1 <= 100


def test_bad_input_is_named(tiny, tiny_processor):
    model, processor = tiny
    with pytest.raises(ValueError, match="target is empty"):
        visual_search(model, processor, noise(80, 80), "   ")
    with pytest.raises(ValueError, match="Unknown search setting"):
        visual_search(model, processor, noise(80, 80), "x", confidence=0.2)
    with pytest.raises(ValueError, match="verify_zoom .* >= 1"):
        visual_search(model, processor, noise(80, 80), "x", verify_zoom=0.5)
    no_boxes = make_tiny_model(loc_token_index=None).eval()
    with pytest.raises(ValueError, match="no box heads"):
        visual_search(no_boxes, processor, noise(80, 80), "x")
    assert SearchSettings().confidence_high == 0.5 and SearchSettings().confidence_low == 0.3  # SEAL's defaults


def test_cli_search_writes_the_result_and_the_overlay(tiny, tmp_path, capsys):
    from modeling_vsm.cli import main

    model, processor = tiny
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    noise(320, 180).save(tmp_path / "scene.png")
    output, overlay = tmp_path / "search.json", tmp_path / "search.png"
    assert main(["search", "--model", str(tmp_path / "model"), "--image", str(tmp_path / "scene.png"), "--target",
                 "the red circle", "--minimum-size", "60", "--output", str(output), "--overlay", str(overlay)]) == 0
    result = json.loads(output.read_text())
    assert {"box", "score", "boxes", "success", "path", "num_calls", "seconds", "settings"} <= set(result)
    assert Image.open(overlay).size == (320, 180)
    assert main(["search", "--model", str(tmp_path / "model"), "--image", str(tmp_path / "none.png"), "--target", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_highres_scenes_hide_one_small_target_among_lookalikes():
    from modeling_vsm.search_eval import highres_scenes

    from modeling_vsm.data import COLOURS

    rows = highres_scenes(6, seed=1)
    again = highres_scenes(6, seed=1)
    assert [(r["target"], r["box"]) for r in rows] == [(r["target"], r["box"]) for r in again]  # deterministic
    assert rows[0]["image"].tobytes() == again[0]["image"].tobytes()
    for row in rows:
        width, height = row["image"].size
        assert 256 <= width <= 1024 and 256 <= height <= 1024
        x0, y0, x1, y1 = row["box"]
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
        assert min(x1 - x0, y1 - y0) <= 0.08 * min(width, height)
        colour = row["target"].split()[0]  # "red circle": SEAL's template adds "the"
        centre = row["image"].getpixel((int((x0 + x1) / 2), int((y0 + y1) / 2)))
        assert centre == COLOURS[colour]  # the target is drawn where its box says


def test_vsm_eval_search_reports_search_and_one_shot(tiny, tmp_path):
    from modeling_vsm.cli import main

    model, processor = tiny
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    output = tmp_path / "search.json"
    assert main(["eval", "--task", "search", "--model", str(tmp_path / "model"), "--data", "synthetic-highres",
                 "--num-samples", "2", "--output", str(output)]) == 0
    report = json.loads(output.read_text())
    assert report["num_samples"] == 2 and report["data"] == "synthetic-highres"
    for name in ("search", "one_shot"):
        assert 0 <= report[name]["success_rate"] <= 1 and report[name]["mean_calls"] >= 1
    assert report["search"]["mean_calls"] >= report["one_shot"]["mean_calls"] and report["batched_speedup"] > 0
    assert len(output.with_suffix(".samples.jsonl").read_text().splitlines()) == 2


def test_search_patches_cover_every_level_down_to_the_leaves():
    from modeling_vsm.data import leaf_side, search_patches

    leaf = leaf_side(1024, 700, input_size=64)
    assert leaf == 175  # ceil(700 / 4) > 2 x 64
    patches = search_patches(1024, 700, leaf)
    assert patches[0] == ((0, 0, 1024, 700), 1)
    assert len(patches) == 1 + 4 + 16  # 1024 x 700 -> 512 x 350 -> 256 x 175, a leaf
    leaves = [box for box, level in patches if level == 3]
    assert all(min(x1 - x0, y1 - y0) <= leaf for x0, y0, x1, y1 in leaves)
    assert sum((x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in leaves) == 1024 * 700
    assert leaf_side(300, 250, input_size=336) == 224  # SEAL's CLIP minimum


def test_search_rows_say_where_the_target_is_and_when_it_is_not_there():
    """The train split's search rows: a patch of a large canvas and SEAL's question; with the target, its box or mask
    on the target's pixels; without it (or, for a box, with it too small to see), a NaN box or an empty mask."""
    import math

    from modeling_vsm.data import COLOURS, SEARCH_LOCATE_TEMPLATE, iter_synthetic_samples, sample_mask
    from modeling_vsm.data.highres import MIN_VISIBLE_PIXELS

    rows = list(iter_synthetic_samples(60, seed=3, task_mix={"search": 1}))
    kinds = {"present box": 0, "absent box": 0, "present mask": 0, "absent mask": 0}
    shape_colours = np.array(list(COLOURS.values()))
    visible, absent_with_a_shape = [], []
    for row in rows:
        image = Image.open(__import__("io").BytesIO(row["image"]["bytes"])).convert("RGB")
        to_input = 64 / max(image.size)  # the drawn patch's pixels -> the model's input pixels
        shape_pixels = (np.asarray(image)[:, :, None] == shape_colours).all(-1).any(-1).sum() * to_input ** 2
        assert max(image.size) <= 2 * 64  # drawn at most twice the model's input
        question, answer = row["messages"][0]["content"], row["messages"][1]["content"]
        target = question[len("Please locate the "):-len(" in this image.")]
        assert question == SEARCH_LOCATE_TEMPLATE.format(target) and row["query_type"] == "search"
        colour = COLOURS[target.split()[0]]
        if "<loc>" in answer:
            (box,) = row["boxes"]
            if all(math.isnan(v) for v in box):
                kinds["absent box"] += 1
                absent_with_a_shape.append(shape_pixels >= MIN_VISIBLE_PIXELS ** 2)
                continue
            kinds["present box"] += 1
            x0, y0, x1, y1 = box
            visible.append(min(x1 - x0, y1 - y0) * to_input)
            assert 0 <= x0 < x1 <= image.size[0] and 0 <= y0 < y1 <= image.size[1]
            inside = np.asarray(image.crop((int(x0), int(y0), math.ceil(x1), math.ceil(y1))))
            assert (inside == colour).all(-1).any()  # the target's colour inside its box
        else:
            mask = sample_mask(row, 0, image.size[1], image.size[0])
            kinds["present mask" if mask.any() else "absent mask"] += 1
            if mask.any():
                assert (np.asarray(image)[mask == 1] == colour).all(-1).mean() > 0.9
            else:
                absent_with_a_shape.append(shape_pixels >= MIN_VISIBLE_PIXELS ** 2)
    assert all(count >= 5 for count in kinds.values()), kinds
    # "Here" only where the target can be seen at the model's input (a box cut by the patch's edge may be smaller);
    # "not here" mostly on a lookalike, not on empty background (hard negatives).
    assert np.mean(np.array(visible) >= MIN_VISIBLE_PIXELS) >= 0.8
    assert np.mean(absent_with_a_shape) >= 0.6


def test_an_absent_target_pushes_every_patch_down_and_trains_no_box():
    import torch

    from modeling_vsm.modeling_vsm import detection_loss

    config = make_tiny_model(seed=0).config
    logits = torch.tensor([2.0, -1.0, 0.5], requires_grad=True)
    boxes = torch.rand(3, 4, requires_grad=True)
    loss = detection_loss(logits, boxes, torch.zeros((0, 4)), config)
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    assert (logits.grad > 0).all()  # gradient descent lowers every patch's score
    assert boxes.grad is None or not boxes.grad.any()


def test_collated_absent_boxes_train_with_a_finite_loss(tiny_processor):
    import torch

    from modeling_vsm.data import iter_synthetic_samples
    from modeling_vsm.training import VSMDataCollator

    rows = [row for row in iter_synthetic_samples(40, seed=3, task_mix={"search": 1}) if "<loc>" in row["messages"][1]["content"]]
    for row in rows:
        row["image"] = Image.open(__import__("io").BytesIO(row["image"]["bytes"]))
    batch = VSMDataCollator(tiny_processor)(rows[:6])
    absent = [bool(boxes.isnan().all()) for boxes in batch["gt_boxes"]]
    assert any(absent) and not all(absent)
    model = make_tiny_model(seed=0)
    outputs = model(**batch)
    assert torch.isfinite(outputs.loss) and outputs.det_loss > 0
    outputs.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.class_head.parameters())


def test_the_search_names_the_target_once_whatever_its_article(tiny):
    model, processor = tiny
    image = noise(300, 200, seed=4)
    settings = {"confidence_high": 0.999, "minimum_size": 80}
    assert (visual_search(model, processor, image, "the red circle", **settings)["path"]
            == visual_search(model, processor, image, "red circle", **settings)["path"])


class ScriptedLocate:
    """A stand-in for `VisualSearch.locate` over a scene of 14 px things: a patch that shows a thing under a fifth
    of its side sees it coarsely, where every thing scores as the target; closer, only the target does."""

    def __init__(self, things: dict):
        self.things = things  # name -> (box, score seen coarsely, score seen close)

    def install(self, monkeypatch):
        from modeling_vsm.search import VisualSearch

        def locate(search, image, boxes, query):
            search.num_calls += 1
            return self(boxes)

        monkeypatch.setattr(VisualSearch, "locate", locate)

    def __call__(self, boxes):
        results = []
        for crop in boxes:
            width, height = crop[2] - crop[0], crop[3] - crop[1]
            heatmap, patch_boxes, patch_scores = np.zeros((height, width)), [], []
            for box, coarse, close in self.things.values():
                if box[0] >= crop[0] and box[1] >= crop[1] and box[2] <= crop[2] and box[3] <= crop[3]:
                    close_enough = (box[2] - box[0]) >= 0.2 * min(width, height)
                    patch_boxes.append(box)
                    patch_scores.append(close if close_enough else coarse)
                    heatmap[box[1] - crop[1]:box[3] - crop[1], box[0] - crop[0]:box[2] - crop[0]] = 10.0
            order = np.argsort(-np.array(patch_scores)) if patch_scores else []
            patch_boxes, patch_scores = np.array(patch_boxes, float).reshape(-1, 4)[order], np.array(patch_scores)[order]
            results.append({"score": float(patch_scores[0]) if len(patch_scores) else 0.0,
                            "box": tuple(patch_boxes[0]) if len(patch_boxes) else None,
                            "patch_boxes": patch_boxes, "patch_scores": patch_scores, "heatmap": heatmap})
        return results


def test_verify_zoom_looks_again_and_passes_over_lookalikes(tiny, monkeypatch):
    model, processor = tiny
    lookalike, target = (40, 40, 54, 54), (340, 330, 354, 344)
    ScriptedLocate({"lookalike": (lookalike, 0.95, 0.1), "target": (target, 0.9, 0.9)}).install(monkeypatch)
    image = noise(400, 400)
    seal = visual_search(model, processor, image, "red circle")
    assert seal["box"] == list(lookalike) and len(seal["path"]) == 1  # SEAL stops on the first box above 0.5
    verified = visual_search(model, processor, image, "red circle", verify_zoom=4.0)
    assert verified["box"] == list(target) and verified["boxes"] == [{"box": list(target), "score": 0.9}]
    checks = verified["path"][0]["zoom_checks"]
    assert [check["score"] for check in checks] == [0.1, 0.9]  # both looked at again, in one batched call
    assert all(check["crop"][2] - check["crop"][0] == 64 for check in checks)  # 4 x 14 px, at least the input (64)
    assert verified["num_calls"] == 2
    assert verified["settings"]["verify_zoom"] == 4.0
    overlay = np.asarray(draw_search(image, verified))
    x0, y0, x1, _ = checks[0]["crop"]
    assert (overlay[y0, x0:x1] == 255).all()  # the crops looked at again are drawn


def test_verify_zoom_goes_on_when_every_box_is_a_lookalike(tiny, monkeypatch):
    model, processor = tiny
    ScriptedLocate({"lookalike": ((40, 40, 54, 54), 0.95, 0.1)}).install(monkeypatch)
    result = visual_search(model, processor, noise(400, 400), "red circle", verify_zoom=4.0, minimum_size=100)
    assert len(result["path"]) > 1 and not result["success"]  # rejected at every level, down to the leaves
    assert result["score"] == 0.1 and all("zoom_checks" in step for step in result["path"] if step["score"] == 0.1)
