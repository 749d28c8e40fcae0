"""Tests of modeling_vsm.data: schema, synthetic data, rasterisation, ReasonSeg I/O, data specs."""

import io
import json
import logging
import math
import re

import numpy as np
import pytest
from datasets import Image as ImageFeature
from PIL import Image

from modeling_vsm.data import (
    COLOURS,
    CONFUSABLE_KINDS,
    DEFAULT_SPLIT_SIZES,
    DEFAULT_TASK_MIX,
    FEATURES,
    IGNORE_LABEL,
    KINDS,
    LOC_TOKEN,
    POSITION_MARGIN,
    QUERY_TYPES,
    REASONSEG_LONG_TEMPLATE,
    REASONSEG_SHORT_TEMPLATE,
    SEG_TOKEN,
    SENTENCE_DESCRIPTIONS,
    SEGMENTATION_QUERY_TYPES,
    SIZE_RATIO_MARGIN,
    SPLIT_HARD_KIND_SHARE,
    TRAIN_HARD_KIND_SHARE,
    TRAIN_TASK_MIX,
    export_reasonseg,
    iter_synthetic_samples,
    load_data_spec,
    load_reasonseg,
    load_synthetic,
    make_synthetic_dataset,
    rasterize_mask,
    synthetic_text_corpus,
)

COLUMNS = ["image", "messages", "masks", "ignore", "mask_rles", "boxes", "is_sentence", "query_type", "chance_iou", "source", "id"]
NUM_SAMPLES = 200


@pytest.fixture(scope="module")
def rows():
    return list(iter_synthetic_samples(NUM_SAMPLES, seed=0, include_scene=True))


@pytest.fixture(scope="module")
def dataset():
    return make_synthetic_dataset(NUM_SAMPLES, seed=0)


def _instruction(row):
    return row["messages"][0]["content"]


def _answer(row):
    return row["messages"][1]["content"]


def _image(row):
    return np.asarray(Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB"))


# ---------------------------------------------------------------------------------------------- schema


def test_schema(dataset):
    assert dataset.column_names == COLUMNS
    assert dataset.features == FEATURES
    sample = dataset[0]
    assert isinstance(sample["image"], Image.Image) and sample["image"].size == (64, 64)
    assert [m["role"] for m in sample["messages"]] == ["user", "assistant"]
    for sample in dataset:
        answer = sample["messages"][1]["content"]
        assert len(sample["masks"]) == answer.count(SEG_TOKEN) == len(sample["ignore"])
        assert len(sample["boxes"]) == answer.count(LOC_TOKEN)
        assert "<image>" not in sample["messages"][0]["content"]
        assert sample["query_type"] in QUERY_TYPES and sample["source"] == "synthetic"
    assert len(set(dataset["id"])) == len(dataset)


def test_determinism_by_seed(rows):
    again = list(iter_synthetic_samples(NUM_SAMPLES, seed=0, include_scene=True))
    other = list(iter_synthetic_samples(NUM_SAMPLES, seed=1, include_scene=True))
    assert [r["image"]["bytes"] for r in again] == [r["image"]["bytes"] for r in rows]
    assert [r["masks"] for r in again] == [r["masks"] for r in rows]
    assert [r["messages"] for r in again] == [r["messages"] for r in rows]
    assert sum(a["image"]["bytes"] == b["image"]["bytes"] for a, b in zip(rows, other)) == 0
    # a smaller dataset is a prefix of a larger one with the same seed
    prefix = make_synthetic_dataset(10, seed=0)
    assert prefix["masks"] == [r["masks"] for r in rows[:10]]


def test_every_query_type_and_default_mix(rows):
    counts = {t: sum(r["query_type"] == t for r in rows) for t in QUERY_TYPES}
    for query_type in SEGMENTATION_QUERY_TYPES + ("loc", "vqa"):
        assert counts[query_type] > 0, query_type
    seg_fraction = sum(counts[t] for t in SEGMENTATION_QUERY_TYPES) / len(rows)
    expected = sum(DEFAULT_TASK_MIX[t] for t in SEGMENTATION_QUERY_TYPES)
    assert abs(seg_fraction - expected) < 0.1
    assert all(r["is_sentence"] == (r["query_type"] == "sentence") for r in rows)


def test_task_mix_override_and_errors():
    only_loc = make_synthetic_dataset(20, task_mix={"loc": 1.0})
    assert set(only_loc["query_type"]) == {"loc"}
    with pytest.raises(ValueError, match="task_mix"):
        make_synthetic_dataset(5, task_mix={"caption": 1.0})
    with pytest.raises(ValueError, match="task_mix"):
        make_synthetic_dataset(5, task_mix={"loc": 0.0})
    with pytest.raises(ValueError, match="image_size"):
        make_synthetic_dataset(5, image_size=8)
    with pytest.raises(ValueError, match="num_samples"):
        make_synthetic_dataset(-1)


# ---------------------------------------------------------------------------------------------- referents


def _target(row):
    """The scene object whose polygon is the row's mask or box."""
    _, objects = row["scene"]
    if row["masks"]:
        matches = [obj for obj in objects if [list(obj.polygon)] == row["masks"][0]]
    else:
        matches = [obj for obj in objects if obj.bbox == row["boxes"][0]]
    assert len(matches) == 1
    return matches[0], objects


def _check_position(target, objects, direction):
    axis, sign = {"left": (0, 1), "right": (0, -1), "top": (1, 1), "bottom": (1, -1)}[direction]
    others = [sign * obj.centre[axis] for obj in objects if obj is not target]
    assert min(others) - sign * target.centre[axis] >= POSITION_MARGIN


def _check_size(target, objects, extreme):
    others = [obj.area for obj in objects if obj is not target]
    if extreme == "biggest":
        assert target.area >= SIZE_RATIO_MARGIN * max(others)
    else:
        assert min(others) >= SIZE_RATIO_MARGIN * target.area


def _check_attribute(target, objects, attribute, value):
    if attribute in ("colour", "kind"):
        assert getattr(target, attribute) == value
        assert sum(getattr(obj, attribute) == value for obj in objects) == 1
    elif attribute == "position":
        _check_position(target, objects, value)
    else:
        _check_size(target, objects, value)


PHRASE_VALUES = {
    "position": {"leftmost": "left", "far left": "left", "rightmost": "right", "far right": "right",
                 "topmost": "top", "highest": "top", "bottom": "bottom", "lowest": "bottom"},
    "size": {"biggest": "biggest", "largest": "biggest", "smallest": "smallest", "tiniest": "smallest"},
}


def _phrase_value(text, attribute):
    if attribute == "colour":
        values = [c for c in COLOURS if re.search(rf"\b{c}\b", text)]
    elif attribute == "kind":
        values = [k for k in KINDS if re.search(rf"\b{k}\b", text)]
    else:
        values = sorted({v for word, v in PHRASE_VALUES[attribute].items() if word in text})
    assert len(values) == 1, (text, attribute, values)
    return values[0]


def test_segmentation_referent_is_unique(rows):
    checked = 0
    for row in rows:
        query_type, text = row["query_type"], _instruction(row)
        if query_type in ("colour", "kind", "position", "size"):
            target, objects = _target(row)
            _check_attribute(target, objects, query_type, _phrase_value(text, query_type))
            checked += 1
        elif query_type == "sentence":
            target, objects = _target(row)
            found = [
                (attribute, value)
                for attribute, table in SENTENCE_DESCRIPTIONS.items()
                for value, descriptions in table.items()
                if any(description in text for description in descriptions)
            ]
            assert len(found) == 1, text
            _check_attribute(target, objects, *found[0])
            checked += 1
    assert checked > NUM_SAMPLES // 2


def test_loc_boxes_and_vqa_answers(rows):
    number_words = {"two": 2, "three": 3, "four": 4}
    for row in rows:
        text, answer = _instruction(row), _answer(row)
        if row["query_type"] == "loc":
            target, objects = _target(row)
            x0, y0, x1, y1 = row["boxes"][0]
            assert x0 < x1 and y0 < y1 and 0 <= x0 and x1 <= 64 and 0 <= y0 and y1 <= 64
            if f"the {target.colour} {target.kind}" not in text:  # then a unique attribute phrase
                words = {**PHRASE_VALUES, "colour": COLOURS, "kind": KINDS}
                attribute = next(a for a in ("position", "size", "colour", "kind") if any(w in text for w in words[a]))
                _check_attribute(target, objects, attribute, _phrase_value(text, attribute))
        elif row["query_type"] == "vqa":
            _, objects = row["scene"]
            assert row["masks"] == [] and row["boxes"] == []
            if text.startswith("How many"):
                assert number_words[answer.split()[2]] == len(objects)
            elif text.startswith("What colour"):
                kind = _phrase_value(text, "kind")
                (obj,) = [o for o in objects if o.kind == kind]
                assert answer == f"It is {obj.colour}."
            else:
                colour = _phrase_value(text, "colour")
                (obj,) = [o for o in objects if o.colour == colour]
                assert answer == f"It is a {obj.kind}."


def test_masks_match_drawn_pixels(rows):
    for row in rows:
        if not row["masks"]:
            continue
        target, objects = _target(row)
        mask = rasterize_mask(row["masks"][0], row["ignore"][0], 64, 64)  # (H, W)
        pixels = _image(row)  # (H, W, 3)
        assert mask.sum() > 0
        assert (pixels[mask == 1] == COLOURS[target.colour]).all()
        if sum(obj.colour == target.colour for obj in objects) == 1:  # the colour occurs nowhere else
            assert ((pixels == COLOURS[target.colour]).all(-1) == (mask == 1)).all()


def test_chance_iou(rows):
    for row in rows:
        if row["masks"]:
            _, objects = row["scene"]
            assert 0 < row["chance_iou"] < 1
            assert row["chance_iou"] == pytest.approx(1 / len(objects))  # objects never overlap
        else:
            assert math.isnan(row["chance_iou"])


def test_load_synthetic_splits():
    train = load_synthetic("train", num_samples=30)
    validation = load_synthetic("validation", num_samples=30)
    test = load_synthetic("test", num_samples=30)
    assert not set(train["id"]) & set(validation["id"]) and not set(validation["id"]) & set(test["id"])
    train_images = {r["image"]["bytes"] for r in train.cast_column("image", ImageFeature(decode=False))}
    validation_images = {r["image"]["bytes"] for r in validation.cast_column("image", ImageFeature(decode=False))}
    assert not train_images & validation_images
    assert load_synthetic("val", num_samples=3)["id"] == validation["id"][:3]
    assert DEFAULT_SPLIT_SIZES["train"] == 20000 and DEFAULT_SPLIT_SIZES["validation"] == 500
    with pytest.raises(ValueError, match="split"):
        load_synthetic("dev")


def test_train_split_over_samples_colour_and_held_out_splits_weigh_types_equally():
    def colour_share(rows):
        segmentation = [t for t in rows["query_type"] if t in SEGMENTATION_QUERY_TYPES]
        return segmentation.count("colour") / len(segmentation)

    train = load_synthetic("train", num_samples=600)
    validation = load_synthetic("validation", num_samples=600)
    expected_train = TRAIN_TASK_MIX["colour"] / sum(TRAIN_TASK_MIX[t] for t in SEGMENTATION_QUERY_TYPES)
    assert colour_share(train) == pytest.approx(expected_train, abs=0.06)
    assert colour_share(validation) == pytest.approx(1 / len(SEGMENTATION_QUERY_TYPES), abs=0.06)
    # an explicit mix wins over the split's
    assert set(load_synthetic("train", num_samples=10, task_mix={"vqa": 1.0})["query_type"]) == {"vqa"}
    streamed = load_synthetic("test", num_samples=3, task_mix={"loc": 1.0}, streaming=True)
    assert [row["query_type"] for row in streamed] == ["loc"] * 3


def test_hard_kind_share_asks_for_a_circle_or_square_beside_the_other_kind():
    def share_with_confusable_shape(rows):
        def hard(row):
            target = next(kind for kind in KINDS if kind in row["messages"][0]["content"])
            return CONFUSABLE_KINDS.get(target) in [obj.kind for obj in row["scene"][1]]
        return sum(map(hard, rows)) / len(rows)

    only_kind = {"kind": 1.0}
    assert share_with_confusable_shape(list(iter_synthetic_samples(150, task_mix=only_kind, include_scene=True))) < 0.6
    hard = list(iter_synthetic_samples(150, task_mix=only_kind, hard_kind_share=1.0, include_scene=True))
    assert share_with_confusable_shape(hard) == 1.0
    # the train split trains on hard negatives; the held-out splits keep the scenes' own share
    assert SPLIT_HARD_KIND_SHARE["train"] == TRAIN_HARD_KIND_SHARE > 0.5
    assert SPLIT_HARD_KIND_SHARE["validation"] == SPLIT_HARD_KIND_SHARE["test"] == 0
    train = load_synthetic("train", num_samples=60, task_mix=only_kind)
    assert train["messages"] == make_synthetic_dataset(60, task_mix=only_kind, hard_kind_share=TRAIN_HARD_KIND_SHARE)["messages"]
    assert train["messages"] != make_synthetic_dataset(60, task_mix=only_kind)["messages"]
    with pytest.raises(ValueError, match="hard_kind_share"):
        make_synthetic_dataset(5, hard_kind_share=1.5)


def test_larger_image_size():
    row = next(iter_synthetic_samples(5, image_size=128, task_mix={"colour": 1.0}))
    assert Image.open(io.BytesIO(row["image"]["bytes"])).size == (128, 128)
    assert max(row["masks"][0][0]) > 0


def test_text_corpus_covers_generated_words(rows):
    corpus = synthetic_text_corpus()
    assert corpus == synthetic_text_corpus() and all(isinstance(text, str) and text for text in corpus)
    vocabulary = set(" ".join(corpus).split())
    for row in rows:
        for message in row["messages"]:
            assert set(message["content"].split()) <= vocabulary, message["content"]


# ---------------------------------------------------------------------------------------------- rasterisation


def test_rasterize_mask():
    square = [2, 2, 6, 2, 6, 6, 2, 6]
    mask = rasterize_mask([square], [], 8, 10)
    assert mask.shape == (8, 10) and mask.dtype == np.uint8
    assert set(np.unique(mask)) == {0, 1}
    assert mask[4, 4] == 1 and mask[0, 0] == 0 and mask[4, 8] == 0
    # ignore wins where it overlaps the target
    both = rasterize_mask([square], [[4, 4, 9, 4, 9, 7, 4, 7]], 8, 10)
    assert both[5, 5] == IGNORE_LABEL and both[5, 8] == IGNORE_LABEL and both[3, 3] == 1
    # scale draws original-pixel polygons into a resized frame
    assert (rasterize_mask([square], [], 16, 20, scale=2.0)[::2, ::2] == mask).mean() > 0.9
    assert rasterize_mask([square], [], 16, 20, scale=2.0).sum() == pytest.approx(4 * mask.sum(), rel=0.3)
    assert rasterize_mask([square], [], 8, 20, scale=(2.0, 1.0))[4, 10] == 1
    with pytest.raises(ValueError, match="2"):
        rasterize_mask([[0, 0, 3, 3]], [], 8, 8)
    with pytest.raises(ValueError, match="flat"):
        rasterize_mask([[0, 0, 3, 3, 5]], [], 8, 8)
    with pytest.raises(ValueError, match="height"):
        rasterize_mask([square], [], 0, 8)


# ---------------------------------------------------------------------------------------------- ReasonSeg


def _write_reasonseg(folder, stem, text, shapes, is_sentence=False, image=True):
    folder.mkdir(parents=True, exist_ok=True)
    if image:
        Image.new("RGB", (20, 16), (10, 20, 30)).save(folder / f"{stem}.jpg")
    (folder / f"{stem}.json").write_text(json.dumps({"text": text, "is_sentence": is_sentence, "shapes": shapes}))


def _shape(label, points):
    return {"label": label, "labels": [label], "shape_type": "polygon", "points": points}


TRIANGLE = [[1, 1], [10, 1], [5, 9]]


def test_reasonseg_round_trip(tmp_path, dataset):
    written = export_reasonseg(dataset, tmp_path)
    segmentation = dataset.filter(lambda s: len(s["masks"]) == 1)
    assert written == len(segmentation) == len(list(tmp_path.glob("*.json"))) == len(list(tmp_path.glob("*.jpg")))
    loaded = load_reasonseg(tmp_path)
    assert len(loaded) == written and loaded.features == FEATURES
    assert set(loaded["query_type"]) == {"reasonseg"} and set(loaded["source"]) == {"reasonseg"}
    assert all(math.isnan(c) for c in loaded["chance_iou"])
    by_id = {f"reasonseg-{s['id']}-0": s for s in segmentation}
    for sample in loaded:
        original = by_id[sample["id"]]
        assert np.allclose(np.asarray(sample["masks"][0][0]), np.asarray(original["masks"][0][0]), atol=1e-6)
        assert sample["is_sentence"] == original["is_sentence"]
        query = json.loads((tmp_path / f"{original['id']}.json").read_text())["text"][0]
        assert query in original["messages"][0]["content"]  # the query is the original minus LISA's wrapper
        template = REASONSEG_LONG_TEMPLATE if sample["is_sentence"] else REASONSEG_SHORT_TEMPLATE
        assert sample["messages"][0]["content"] == template.format(query=query)
        assert sample["image"].size == original["image"].size
        assert SEG_TOKEN in sample["messages"][1]["content"]
    # instructions already in LISA's evaluation wrapping come back unchanged
    same = [s for s in loaded if s["messages"][0]["content"] == by_id[s["id"]]["messages"][0]["content"]]
    assert len(same) > 0


def test_load_reasonseg_queries_labels_and_ignore(tmp_path):
    shapes = [_shape("target", TRIANGLE), _shape("target", [[12, 2], [18, 2], [18, 8]]),
              _shape("ignore", [[1, 10], [5, 10], [5, 14]]), _shape("flag", [[0, 0], [1, 0], [1, 1]])]
    _write_reasonseg(tmp_path, "img1", ["the cat", "the dog"], shapes)
    _write_reasonseg(tmp_path, "img2", ["The thing you sit on."], [_shape("target", TRIANGLE)], is_sentence=True)
    loaded = load_reasonseg(tmp_path)
    assert len(loaded) == 3
    first = loaded[0]
    assert first["messages"][0]["content"] == "What is the cat in this image? Please output segmentation mask."
    assert loaded[1]["messages"][0]["content"] == "What is the dog in this image? Please output segmentation mask."
    assert loaded[2]["messages"][0]["content"] == "The thing you sit on. Please output segmentation mask."
    assert len(first["masks"]) == 1 and len(first["masks"][0]) == 2  # two target polygons, one mask
    assert first["ignore"] == [[[1.0, 10.0, 5.0, 10.0, 5.0, 14.0]]]
    mask = rasterize_mask(first["masks"][0], first["ignore"][0], 16, 20)
    assert set(np.unique(mask)) == {0, 1, IGNORE_LABEL}
    assert load_reasonseg(tmp_path, seed=0)["messages"] == loaded["messages"]
    with pytest.raises(ValueError, match="answer_templates"):
        load_reasonseg(tmp_path, answer_templates=["no token"])


def test_load_reasonseg_skips_bad_items(tmp_path, caplog):
    _write_reasonseg(tmp_path, "good", ["the cat"], [_shape("target", TRIANGLE)])
    _write_reasonseg(tmp_path, "two_points", ["x"], [_shape("target", [[1, 1], [5, 5]])])
    _write_reasonseg(tmp_path, "nan", ["x"], [_shape("target", [[1, 1], [float("nan"), 5], [3, 3]])])
    _write_reasonseg(tmp_path, "no_image", ["x"], [_shape("target", TRIANGLE)], image=False)
    (tmp_path / "invalid.json").write_text("{not json")
    (tmp_path / "invalid.jpg").write_bytes(b"")
    (tmp_path / "missing_keys.json").write_text(json.dumps({"text": ["x"]}))
    Image.new("RGB", (4, 4)).save(tmp_path / "missing_keys.png")
    _write_reasonseg(tmp_path, "broken_image", ["x"], [_shape("target", TRIANGLE)], image=False)
    (tmp_path / "broken_image.jpg").write_bytes(b"not an image")
    with caplog.at_level(logging.WARNING, logger="modeling_vsm.data"):
        loaded = load_reasonseg(tmp_path)
    assert loaded["id"] == ["reasonseg-good-0"]
    log = caplog.text
    for stem in ("two_points", "nan", "no_image", "invalid", "missing_keys", "broken_image"):
        assert f"{stem}.json" in log, stem
    assert "fewer than 3" in log and "NaN" in log and "missing keys" in log and "invalid JSON" in log
    assert "skipped 6 of 7" in log


def test_load_reasonseg_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_reasonseg(tmp_path / "nowhere")
    _write_reasonseg(tmp_path, "bad", ["x"], [_shape("target", [[1, 1]])])
    with pytest.raises(ValueError, match=re.escape(str(tmp_path))):
        load_reasonseg(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="No usable"):
        load_reasonseg(empty)


# ---------------------------------------------------------------------------------------------- data specs


def test_load_data_spec(tmp_path):
    synthetic = load_data_spec("synthetic", split="validation", num_samples=12)
    assert synthetic["id"] == load_synthetic("validation", num_samples=12)["id"]
    _write_reasonseg(tmp_path / "val", "a", ["the cat"], [_shape("target", TRIANGLE)])
    _write_reasonseg(tmp_path / "train", "b", ["the dog", "the bird"], [_shape("target", TRIANGLE)])
    assert load_data_spec(f"reasonseg:{tmp_path}", split="validation")["id"] == ["reasonseg-a-0"]
    assert len(load_data_spec(f"reasonseg:{tmp_path}", split="train")) == 2
    assert len(load_data_spec(f"reasonseg:{tmp_path}/train", split="train", num_samples=1)) == 1
    mixed = load_data_spec(f"synthetic+reasonseg:{tmp_path}", split="train", num_samples=5)
    assert len(mixed) == 5 + 2 and mixed.features == FEATURES
    assert set(mixed["source"]) == {"synthetic", "reasonseg"}
    with pytest.raises(ValueError, match="reasonseg.*synthetic|synthetic.*reasonseg"):
        load_data_spec("coco:/data")
    with pytest.raises(ValueError, match="spec"):
        load_data_spec("")
