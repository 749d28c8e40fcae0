"""Tests of the real-data loaders of modeling_vsm.data: COCO RLE, ReasonSeg (explanations, bad files), refCOCO
(JSON / parquet refs, the pickle converter), LLaVA conversations, mixtures with weights, streaming, on-the-fly
transforms, and the collator on rows of every loader. Every fixture is written by the test in the original format."""

import json
import logging
import pickle
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from datasets import IterableDataset
from PIL import Image

from modeling_vsm.data import (
    EXPLANATORY_QUESTIONS,
    FEATURES,
    IGNORE_LABEL,
    SEG_ANSWER_TEMPLATES,
    SEG_TOKEN,
    compress_rle,
    convert_refs_pickle,
    load_data_spec,
    load_llava,
    load_reasonseg,
    load_refcoco,
    parse_data_weights,
    rasterize_mask,
    rle_decode,
    rle_encode,
    sample_mask,
    split_data_spec,
    with_images,
)

# ---------------------------------------------------------------------------------------------- COCO RLE
# Reference strings written by pycocotools 2.0 (`mask.encode` / `frPyObjects`) for these masks.
SMALL_MASK = np.array([[0, 1, 1, 0, 0, 0, 1], [0, 1, 1, 1, 0, 0, 1], [0, 0, 1, 1, 0, 0, 0],
                       [1, 0, 0, 0, 0, 1, 1], [1, 1, 0, 0, 0, 1, 1]], dtype=np.uint8)
SMALL_COUNTS = "34201N72GN"
BLOB_SIZE = (40, 50)
BLOB_COUNTS = "Rg05P16K4M2N2N2O0O2O000O2O00000001N10001N101N2N2N3L5JY8"
BLOB_AREA = 481
UNCOMPRESSED = {"size": [40, 50], "counts": [5, 10, 1985]}  # 10 pixels of column 0, rows 5..14
UNCOMPRESSED_AS_STRING = "5:Qn1"


def _blob():
    ys, xs = np.mgrid[: BLOB_SIZE[0], : BLOB_SIZE[1]]
    return (((ys - 20) ** 2 + (xs - 30) ** 2) < 150).astype(np.uint8)


def test_rle_matches_pycocotools_strings():
    assert rle_encode(SMALL_MASK) == {"size": [5, 7], "counts": SMALL_COUNTS}
    assert (rle_decode({"size": [5, 7], "counts": SMALL_COUNTS}) == SMALL_MASK).all()
    blob = _blob()
    assert blob.sum() == BLOB_AREA and rle_encode(blob)["counts"] == BLOB_COUNTS
    assert (rle_decode({"size": list(BLOB_SIZE), "counts": BLOB_COUNTS}) == blob).all()
    assert compress_rle(UNCOMPRESSED, 40, 50)["counts"] == UNCOMPRESSED_AS_STRING
    decoded = rle_decode(UNCOMPRESSED)
    assert decoded.sum() == 10 and decoded[5:15, 0].all()
    empty = np.zeros((3, 4), np.uint8)
    assert (rle_decode(rle_encode(empty)) == empty).all() and (rle_decode(rle_encode(1 - empty)) == 1).all()


def test_rle_errors():
    """Counts that do not cover the image exactly are refused, never decoded into memory past (or short of) the mask."""
    with pytest.raises(ValueError, match="cover"):
        rle_decode({"size": [5, 7], "counts": [3, 4]})
    with pytest.raises(ValueError, match="image size"):
        compress_rle({"size": [5, 7], "counts": SMALL_COUNTS}, 7, 5)
    long_string = rle_encode(np.zeros((40, 50), np.uint8))["counts"]  # 2000 pixels
    for counts in ("3 4", long_string, SMALL_COUNTS[:-2], "3"):  # garbage, too long, too short
        with pytest.raises(ValueError, match="COCO RLE|cover"):
            rle_decode({"size": [5, 7], "counts": counts})


def test_rasterize_mask_with_rle_in_a_resized_frame():
    rle = {"size": list(BLOB_SIZE), "counts": BLOB_COUNTS}
    assert (rasterize_mask([], [], *BLOB_SIZE, rles=[rle]) == _blob()).all()
    # the collator's frame: longest side 50 -> 25, pasted top-left in a 25 x 25 square
    frame = rasterize_mask([], [], 25, 25, scale=0.5, rles=[rle])
    assert frame[20:].sum() == 0  # padding below the 20-row image
    assert frame.sum() == pytest.approx(BLOB_AREA / 4, rel=0.15)
    # ignore polygons still win over RLE pixels
    with_ignore = rasterize_mask([], [[25, 15, 35, 15, 35, 25, 25, 25]], *BLOB_SIZE, rles=[rle])
    assert with_ignore[20, 30] == IGNORE_LABEL and with_ignore[12, 30] == 1


# ---------------------------------------------------------------------------------------------- ReasonSeg

TRIANGLE = [[1, 1], [10, 1], [5, 9]]


def _shape(label, points):
    return {"label": label, "labels": [label], "shape_type": "polygon", "image_name": "x.jpg", "points": points}


def _write_reasonseg(folder, stem, text, shapes, is_sentence=False, size=(20, 16)):
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (10, 20, 30)).save(folder / f"{stem}.jpg")
    (folder / f"{stem}.json").write_text(json.dumps({"text": text, "is_sentence": is_sentence, "shapes": shapes}))


def test_reasonseg_every_query_and_explanations(tmp_path):
    folder = tmp_path / "val"
    _write_reasonseg(folder, "a", ["the cat", "the dog", "the bird"], [_shape("target", TRIANGLE)])
    _write_reasonseg(folder, "b", ["What can you sit on?"], [_shape("target", TRIANGLE)], is_sentence=True)
    explanations = tmp_path / "explanatory.json"
    explanations.write_text(json.dumps([
        {"image": "b.jpg", "query": "What can you sit on?", "outputs": "A chair is made for sitting."},
        {"image": "zzz.jpg"},  # bad entry: skipped with a warning
    ]))
    plain = load_reasonseg(folder)
    assert plain["id"] == ["reasonseg-a-0", "reasonseg-a-1", "reasonseg-a-2", "reasonseg-b-0"]
    explained = load_reasonseg(folder, explanations=explanations)
    assert explained["messages"][:3] == plain["messages"][:3]  # image a has no explanation
    question, answer = (m["content"] for m in explained[3]["messages"])
    assert any(question == f"What can you sit on? {request}" for request in EXPLANATORY_QUESTIONS)
    assert answer.endswith(" A chair is made for sitting.") and answer.count(SEG_TOKEN) == 1
    assert load_reasonseg(folder, explanations=explanations, explanatory_fraction=0.0)["messages"] == plain["messages"]
    # spec: PATH/<split> folders and PATH/explanatory/<split>.json, as LISA's ReasonSeg layout
    root = tmp_path / "ReasonSeg"
    _write_reasonseg(root / "train", "b", ["What can you sit on?"], [_shape("target", TRIANGLE)], is_sentence=True)
    (root / "explanatory").mkdir()
    (root / "explanatory" / "train.json").write_text(explanations.read_text())
    assert load_data_spec(f"reasonseg:{root}")["messages"] == explained.select([3])["messages"]
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    with pytest.raises(ValueError, match="bad.json.*invalid JSON"):
        load_reasonseg(folder, explanations=bad)


def test_answer_templates_vary_by_seed(tmp_path):
    queries = [f"object {k}" for k in range(30)]
    _write_reasonseg(tmp_path, "a", queries, [_shape("target", TRIANGLE)])
    answers = [load_reasonseg(tmp_path, seed=seed)["messages"] for seed in (0, 0, 1)]
    assert answers[0] == answers[1] and answers[0] != answers[2]
    used = Counter(messages[1]["content"] for messages in answers[0])
    assert set(used) <= set(SEG_ANSWER_TEMPLATES) and len(used) >= 3


def test_reasonseg_polygon_outside_image_and_no_target(tmp_path, caplog):
    _write_reasonseg(tmp_path, "good", ["x"], [_shape("target", TRIANGLE)])
    _write_reasonseg(tmp_path, "outside", ["x"], [_shape("target", [[30, 30], [40, 30], [35, 40]])])
    _write_reasonseg(tmp_path, "only_ignore", ["x"], [_shape("ignore", TRIANGLE)])
    with caplog.at_level(logging.WARNING, logger="modeling_vsm.data"):
        assert load_reasonseg(tmp_path)["id"] == ["reasonseg-good-0"]
    assert "outside.json" in caplog.text and "outside the 20x16 image" in caplog.text
    assert "only_ignore.json" in caplog.text and "no target" in caplog.text and "skipped 2 of 3" in caplog.text


# ---------------------------------------------------------------------------------------------- refCOCO

IMAGE_SIZES = {1: (40, 30), 2: (50, 40), 3: (40, 30)}  # image id -> (width, height)
SQUARE = [4.0, 4.0, 20.0, 4.0, 20.0, 20.0, 4.0, 20.0]


def _file_name(image_id):
    return f"COCO_train2014_{image_id:012d}.jpg"


def _write_refcoco(folder, refs_format="json", images=True):
    """refer's layout: instances.json (COCO), refs in JSON / parquet, images/ (image 3 is missing)."""
    folder.mkdir(parents=True, exist_ok=True)
    if images:
        (folder / "images").mkdir(exist_ok=True)
        for image_id in (1, 2):
            Image.new("RGB", IMAGE_SIZES[image_id], (90, 90, 90)).save(folder / "images" / _file_name(image_id))
    coco_images = [{"id": i, "file_name": _file_name(i), "width": w, "height": h} for i, (w, h) in IMAGE_SIZES.items()]

    def annotation(ann_id, image_id, segmentation, iscrowd=0):
        return {"id": ann_id, "image_id": image_id, "category_id": 1, "iscrowd": iscrowd, "bbox": [0, 0, 1, 1],
                "area": 1.0, "segmentation": segmentation}

    annotations = [
        annotation(10, 1, [SQUARE]),
        annotation(11, 2, {"size": list(BLOB_SIZE), "counts": BLOB_COUNTS}, iscrowd=1),
        annotation(12, 2, UNCOMPRESSED, iscrowd=1),
        annotation(13, 1, [[1, 1, 5, 5]]),  # 2 points
        annotation(14, 1, [SQUARE, [1, 1, float("nan"), 2, 3, 3]]),  # NaN polygon dropped, square kept
        annotation(15, 3, [SQUARE]),  # image file missing
        annotation(16, 1, [[100, 100, 120, 100, 110, 120]]),  # outside the 40x30 image
    ]
    (folder / "instances.json").write_text(json.dumps({"images": coco_images, "annotations": annotations,
                                                       "categories": [{"id": 1, "name": "thing"}]}))

    def ref(ref_id, ann_id, image_id, split, *sentences):
        return {"ref_id": ref_id, "ann_id": ann_id, "image_id": image_id, "split": split, "category_id": 1,
                "file_name": f"{_file_name(image_id)[:-4]}_{ann_id}.jpg", "sent_ids": list(range(len(sentences))),
                "sentences": [{"tokens": s.split(), "raw": s.capitalize(), "sent": s, "sent_id": k}
                              for k, s in enumerate(sentences)]}

    refs = [
        ref(0, 10, 1, "train", "left square", "grey box"),
        ref(1, 11, 2, "train", "round blob"),
        ref(2, 12, 2, "val", "thin line"),
        ref(3, 13, 1, "train", "two points"),
        ref(4, 14, 1, "train", "square again"),
        ref(5, 15, 3, "train", "no image"),
        ref(6, 99, 1, "train", "no annotation"),
        ref(7, 16, 1, "train", "outside"),
        ref(8, 10, 1, "testA", "person left"),
    ]
    if refs_format == "json":
        (folder / "refs.json").write_text(json.dumps(refs))
    elif refs_format == "parquet":
        pq.write_table(pa.Table.from_pylist(refs), folder / "refs.parquet")
    else:  # refer's original pickle
        with open(folder / "refs(unc).p", "wb") as handle:
            pickle.dump(refs, handle)
    return refs


def test_load_refcoco_splits_masks_and_rle(tmp_path, caplog):
    _write_refcoco(tmp_path)
    with caplog.at_level(logging.WARNING, logger="modeling_vsm.data"):
        train = load_refcoco(tmp_path, split="train")
    assert train.features == FEATURES
    assert train["id"] == ["refcoco-0-0", "refcoco-0-1", "refcoco-1-0", "refcoco-4-0"]
    first = train[0]
    assert first["image"].size == (40, 30) and first["masks"] == [[SQUARE]] and first["mask_rles"] == [[]]
    assert "left square" in first["messages"][0]["content"] and first["messages"][1]["content"].count(SEG_TOKEN) == 1
    assert set(train["source"]) == {"refcoco"} and not any(train["is_sentence"])
    blob_row = train[2]
    assert blob_row["masks"] == [[]] and blob_row["mask_rles"] == [[{"size": list(BLOB_SIZE), "counts": BLOB_COUNTS}]]
    assert (sample_mask(blob_row, 0, *BLOB_SIZE) == _blob()).all()
    assert train[3]["masks"] == [[SQUARE]]  # the NaN polygon was dropped
    log = caplog.text
    assert "refs.json" in log and "skipped 4 of 7" in log and "1 x missing image PATH" in log
    for reason in ("fewer than 3", "missing image", "annotation 99", "outside the 40x30 image", "NaN"):
        assert reason in log, reason
    validation = load_refcoco(tmp_path, split="validation")
    assert validation["id"] == ["refcoco-2-0"]
    assert validation[0]["mask_rles"] == [[{"size": [40, 50], "counts": UNCOMPRESSED_AS_STRING}]]
    assert load_refcoco(tmp_path, split="testA")["id"] == ["refcoco-8-0"]
    with pytest.raises(ValueError, match="testB.*'testA', 'train', 'val'"):
        load_refcoco(tmp_path, split="testB")


def test_refcoco_parquet_spec_image_dir_and_plus_in_folder_name(tmp_path):
    json_folder, parquet_folder = tmp_path / "json", tmp_path / "refcoco+"
    _write_refcoco(json_folder)
    _write_refcoco(parquet_folder, refs_format="parquet", images=False)
    from_json = load_refcoco(json_folder, name="refcoco+")  # the name keys the seeded templates
    spec = f"refcoco:{parquet_folder}@{json_folder / 'images'}+synthetic"
    assert split_data_spec(spec) == [f"refcoco:{parquet_folder}@{json_folder / 'images'}", "synthetic"]
    mixed = load_data_spec(spec, num_samples=3)
    from_parquet = mixed.filter(lambda row: row["source"] != "synthetic")
    assert set(from_parquet["source"]) == {"refcoco+"} and len(mixed) == 3 + 3
    assert from_parquet["masks"] == from_json["masks"][:3] and from_parquet["mask_rles"] == from_json["mask_rles"][:3]
    assert from_parquet["messages"] == from_json["messages"][:3]  # same seed, same templates
    with pytest.raises(FileNotFoundError, match="image folder"):
        load_refcoco(parquet_folder)  # no images/ beside it and no @IMAGE_DIR


def _as_bytes(value):
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, dict):
        return {_as_bytes(k): _as_bytes(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_as_bytes(v) for v in value]
    return value


def test_refcoco_pickle_needs_the_explicit_converter(tmp_path, caplog):
    refs = _write_refcoco(tmp_path, refs_format="pickle")
    with pytest.raises(ValueError, match=r"pickle refs\(unc\).p.*vsm convert-refs"):
        load_refcoco(tmp_path)
    with caplog.at_level(logging.WARNING, logger="modeling_vsm.data"):
        assert convert_refs_pickle(tmp_path / "refs(unc).p", tmp_path / "refs.json") == len(refs)
    assert "trust" in caplog.text
    converted = json.loads((tmp_path / "refs.json").read_text())
    assert [r["ref_id"] for r in converted] == [r["ref_id"] for r in refs]
    assert converted[0]["sentences"][0] == {"sent_id": 0, "sent": "left square", "raw": "Left square"}
    assert load_refcoco(tmp_path)["id"][:2] == ["refcoco-0-0", "refcoco-0-1"]
    other = tmp_path / "other"
    assert convert_refs_pickle(tmp_path / "refs(unc).p", other / "refs.parquet") == len(refs)
    assert pq.read_table(other / "refs.parquet").to_pylist() == converted
    # refer's pickles come from Python 2: their str are read back as bytes, and decoded
    with open(other / "refs(py2).p", "wb") as handle:
        pickle.dump(_as_bytes(refs), handle, protocol=2)
    assert convert_refs_pickle(other / "refs(py2).p", other / "py2.json") == len(refs)
    assert json.loads((other / "py2.json").read_text()) == converted
    with pytest.raises(ValueError, match=r"\.json or \.parquet"):
        convert_refs_pickle(tmp_path / "refs(unc).p", tmp_path / "refs.p2")


def test_refcoco_bad_files(tmp_path):
    _write_refcoco(tmp_path)
    (tmp_path / "refs.parquet").write_bytes(b"PAR1 broken")
    with pytest.raises(ValueError, match="several refs files"):
        load_refcoco(tmp_path)
    with pytest.raises(ValueError, match="refs.parquet: unreadable parquet"):
        load_refcoco(tmp_path / "refs.parquet")
    (tmp_path / "instances.json").write_text("{broken")
    with pytest.raises(ValueError, match="instances.json.*invalid JSON"):
        load_refcoco(tmp_path / "refs.json")
    empty = tmp_path / "empty"
    _write_refcoco(empty)
    refs = json.loads((empty / "refs.json").read_text())
    (empty / "refs.json").write_text(json.dumps([r for r in refs if r["ref_id"] in (3, 5, 6, 7)]))
    with pytest.raises(ValueError, match="No usable sample.*refs.json.*4 of 4 items"):
        load_refcoco(empty)


# ---------------------------------------------------------------------------------------------- LLaVA


def _turns(*values):
    return [{"from": ("human", "gpt")[k % 2], "value": value} for k, value in enumerate(values)]


def _write_llava(folder, suffix=".json"):
    (folder / "images" / "coco").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (24, 18), (1, 2, 3)).save(folder / "images" / "coco" / "1.jpg")
    entries = [
        {"id": "multi", "image": "coco/1.jpg", "conversations": _turns("<image>\nWhat is shown?", "A box.",
                                                                        "What colour is it?", "Dark grey.")},
        {"id": "text", "conversations": _turns("Say hi.", "Hi.")},
        {"id": "after", "image": "coco/1.jpg",
         "conversations": _turns("Describe the image.\n<image>", "Grey.\n  def f():\n    pass")},
        {"id": "missing", "image": "coco/2.jpg", "conversations": _turns("<image>\nHi?", "Hi.")},
        {"id": "order", "image": "coco/1.jpg", "conversations": [{"from": "gpt", "value": "Hi."}]},
        {"id": "keys", "image": "coco/1.jpg"},
        {"id": "seg", "image": "coco/1.jpg", "conversations": _turns("<image>\nSegment it.", "It is <SEG>.")},
        {"id": "two", "image": "coco/1.jpg", "conversations": _turns("<image>\n<image>\nCompare.", "Same.")},
        {"id": "noimage", "conversations": _turns("<image>\nWhat is it?", "A box.")},
    ]
    path = folder / f"llava_mix{suffix}"
    if suffix == ".jsonl":
        path.write_text("\n".join([json.dumps(entry) for entry in entries] + ["{not json"]) + "\n")
    else:
        path.write_text(json.dumps(entries))
    return path


def test_load_llava_conversations(tmp_path, caplog):
    path = _write_llava(tmp_path)
    with caplog.at_level(logging.WARNING, logger="modeling_vsm.data"):
        data = load_llava(path, image_dir=tmp_path / "images")
    assert data.features == FEATURES
    assert data["id"] == ["llava-0-multi", "llava-1-text", "llava-2-after"]
    multi, text, after = data
    assert [m["role"] for m in multi["messages"]] == ["user", "assistant", "user", "assistant"]
    assert multi["messages"][0]["content"] == "What is shown?" and multi["messages"][3]["content"] == "Dark grey."
    assert multi["image"].size == (24, 18) and text["image"] is None
    assert after["messages"][0]["content"] == "Describe the image."
    assert after["messages"][1]["content"] == "Grey.\n  def f():\n    pass"  # code keeps its indentation
    assert all(row["masks"] == [] and row["boxes"] == [] and row["source"] == "llava" for row in data)
    log = caplog.text
    assert "llava_mix.json" in log and "skipped 6 of 9" in log
    for reason in ("missing image", "alternate", "conversations", "<SEG>", "2 <image> placeholders", "no `image`"):
        assert reason in log, reason
    # the spec form: PATH@IMAGE_DIR; a folder of <split>.jsonl; with_images keeps the rows an eval can score
    assert load_data_spec(f"llava:{path}@{tmp_path / 'images'}")["id"] == data["id"]
    assert with_images(data)["id"] == ["llava-0-multi", "llava-2-after"]
    split_folder = tmp_path / "splits"
    split_folder.mkdir()
    _write_llava(split_folder, ".jsonl").rename(split_folder / "validation.jsonl")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="modeling_vsm.data"):
        from_folder = load_data_spec(f"llava:{split_folder}@{tmp_path / 'images'}", split="validation")
    assert from_folder["messages"] == data["messages"] and "invalid JSON line" in caplog.text
    with pytest.raises(FileNotFoundError, match="train.json"):
        load_data_spec(f"llava:{split_folder}", split="train")


def test_llava_bad_files(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"id": 1,')
    with pytest.raises(ValueError, match="broken.json.*invalid JSON"):
        load_llava(path)
    path.write_text(json.dumps([{"id": "x", "image": "gone.jpg", "conversations": _turns("Hi?", "Hi.")}]))
    with pytest.raises(ValueError, match="No usable sample.*broken.json.*1 of 1 items"):
        load_llava(path)
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        load_data_spec(f"llava:{tmp_path / 'nowhere.json'}")


# ---------------------------------------------------------------------------------------------- mixtures


@pytest.fixture()
def reasonseg_folder(tmp_path):
    folder = tmp_path / "reasonseg"
    for k in range(3):
        _write_reasonseg(folder, f"img{k}", [f"thing {k}", f"other {k}"], [_shape("target", TRIANGLE)])
    return folder


def test_weighted_mixture_proportions_and_seed(reasonseg_folder):
    spec = f"synthetic+reasonseg:{reasonseg_folder}"
    mixed = load_data_spec(spec, weights="3,1", num_samples=240, seed=0)
    sources = Counter(mixed["source"])
    # every part seen (the 6 ReasonSeg rows oversampled), synthetic exhausted, 3:1 kept
    assert sources["synthetic"] == 240 and set(mixed.filter(lambda r: r["source"] == "reasonseg")["id"]) == {
        f"reasonseg-img{k}-{q}" for k in range(3) for q in range(2)}
    assert sources["synthetic"] / len(mixed) == pytest.approx(0.75, abs=0.06)
    assert load_data_spec(spec, weights=[3, 1], num_samples=240, seed=0)["id"] == mixed["id"]
    assert load_data_spec(spec, weights=[3, 1], num_samples=240, seed=1)["id"] != mixed["id"]
    concatenated = load_data_spec(spec, num_samples=240)
    assert len(concatenated) == 240 + 6
    with pytest.raises(ValueError, match="2 data weights for 1 data specs"):
        load_data_spec("synthetic", weights=[1, 2], num_samples=4)
    with pytest.raises(ValueError, match="> 0"):
        parse_data_weights("1,0")
    with pytest.raises(ValueError, match="numbers"):
        parse_data_weights("a,b")


def test_three_way_mixture_and_streaming(tmp_path, reasonseg_folder, tiny_processor):
    from modeling_vsm.training import VSMDataCollator

    refcoco, llava = tmp_path / "refcoco", _write_llava(tmp_path)
    _write_refcoco(refcoco)
    spec = f"reasonseg:{reasonseg_folder}+refcoco:{refcoco}+llava:{llava}@{tmp_path / 'images'}"
    mixed = load_data_spec(spec, weights="9,3,1", seed=0)
    assert set(mixed["source"]) == {"reasonseg", "refcoco", "llava"}
    stream = load_data_spec(spec, weights="9,3,1", seed=0, streaming=True)
    assert isinstance(stream, IterableDataset) and stream.features == FEATURES
    rows = list(stream.take(12))
    assert {row["source"] for row in rows} >= {"reasonseg", "refcoco"}
    assert all(row["image"] is None or isinstance(row["image"], Image.Image) for row in rows)
    batch = VSMDataCollator(tiny_processor)(rows[:6])
    assert batch["input_ids"].shape[0] == 6 and len(batch["gt_masks"]) == 6
    streamed = list(load_data_spec(f"reasonseg:{reasonseg_folder}", streaming=True))
    assert [row["id"] for row in streamed] == load_reasonseg(reasonseg_folder)["id"]


def test_transform_applied_on_the_fly(reasonseg_folder):
    calls = []

    def shout(row):
        calls.append(row["id"])
        assert isinstance(row["image"], Image.Image)  # images are decoded before the transform
        row["messages"] = [{**m, "content": m["content"].upper()} for m in row["messages"]]
        return row

    data = load_data_spec(f"reasonseg:{reasonseg_folder}", transform=shout)
    assert calls == []
    row = data[1]
    assert row["messages"][0]["content"].isupper() and calls == ["reasonseg-img0-1"]
    stream = load_data_spec(f"reasonseg:{reasonseg_folder}", transform=shout, streaming=True)
    assert next(iter(stream))["messages"][1]["content"].isupper()


# ---------------------------------------------------------------------------------------------- the collator


def test_collator_takes_rows_of_every_loader(tmp_path, reasonseg_folder, tiny_processor):
    from modeling_vsm.training import VSMDataCollator

    _write_refcoco(tmp_path / "refcoco")
    refcoco = load_refcoco(tmp_path / "refcoco")
    llava = load_llava(_write_llava(tmp_path), image_dir=tmp_path / "images")
    rows = [load_reasonseg(reasonseg_folder)[0], refcoco[0], refcoco[2], llava[0], llava[1],
            load_data_spec("synthetic", num_samples=1)[0]]
    collator = VSMDataCollator(tiny_processor)
    batch = collator(rows)
    size = collator.mask_size or tiny_processor.image_processor.image_size
    assert [m.shape[0] for m in batch["gt_masks"]] == [1, 1, 1, 0, 0, len(rows[5]["masks"])]
    # the RLE blob (50 x 40 image) drawn on the square frame matches its decoded, resized mask
    blob_frame = batch["gt_masks"][2][0].numpy()
    expected = rasterize_mask([], [], size, size, scale=size / 50, rles=refcoco[2]["mask_rles"][0])
    assert (blob_frame == expected).all() and blob_frame.sum() > 0
    labels = batch["labels"]
    assert all((labels[row] != -100).any() for row in range(len(rows)))  # every row has answer tokens
    seg_id = tiny_processor.tokenizer.convert_tokens_to_ids(SEG_TOKEN)
    assert int((batch["input_ids"][3:5] == seg_id).sum()) == 0  # LLaVA rows: CE only
    assert torch.is_tensor(batch["pixel_values"])


# ---------------------------------------------------------------------------------------------- command line


def test_cli_convert_refs_and_data_weights(tmp_path, reasonseg_folder, caplog, capsys):
    from modeling_vsm.cli import main

    refs = _write_refcoco(tmp_path / "refcoco", refs_format="pickle")
    output = tmp_path / "refcoco" / "refs.json"
    with caplog.at_level(logging.WARNING, logger="modeling_vsm.data"):
        assert main(["convert-refs", "--input", str(tmp_path / "refcoco" / "refs(unc).p"), "--output", str(output)]) == 0
    assert "trust" in caplog.text and len(json.loads(output.read_text())) == len(refs)
    out_dir = tmp_path / "run"
    common = ["train", "--output-dir", str(out_dir), "--max-steps", "2", "--batch-size", "2", "--train-samples", "6",
              "--no-eval", "--save-steps", "0"]
    assert main([*common, "--data", "synthetic", "--data-weights", "1,0"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and "finite and > 0" in errors[0]
    spec = f"synthetic+refcoco:{tmp_path / 'refcoco'}+reasonseg:{reasonseg_folder}"
    assert main([*common, "--data", spec, "--data-weights", "2,1,1"]) == 0
    log = json.loads((out_dir / "train_log.json").read_text())
    assert log["metrics"]["train_steps"] == 2 and log["metrics"]["data"] == spec
    streamed_dir = tmp_path / "streamed"
    streamed = [*common[:2], str(streamed_dir), *common[3:]]
    assert main([*streamed, "--data", spec, "--data-weights", "2,1,1", "--streaming"]) == 0
    assert json.loads((streamed_dir / "train_log.json").read_text())["metrics"]["train_steps"] == 2


def test_cli_eval_reads_every_spec(tmp_path, tiny_processor):
    from conftest import make_tiny_model

    from modeling_vsm.cli import main

    model_dir = tmp_path / "model"
    make_tiny_model().save_pretrained(model_dir)
    tiny_processor.save_pretrained(model_dir)
    _write_refcoco(tmp_path / "refcoco")
    llava = _write_llava(tmp_path)
    output = tmp_path / "eval" / "metrics.json"
    spec = f"refcoco:{tmp_path / 'refcoco'}+llava:{llava}@{tmp_path / 'images'}"
    assert main(["eval", "--model", str(model_dir), "--data", spec, "--split", "train", "--batch-size", "4",
                 "--max-new-tokens", "4", "--no-swap-test", "--output", str(output)]) == 0
    summary = json.loads(output.read_text())
    records = [json.loads(line) for line in output.with_suffix(".samples.jsonl").read_text().splitlines()]
    assert summary["num_samples"] == 4  # the refCOCO sentences are scored
    assert {r["id"] for r in records} == {"refcoco-0-0", "refcoco-0-1", "refcoco-1-0", "refcoco-4-0",
                                          "llava-0-multi", "llava-2-after"}  # the text-only row is left out
