"""`evaluate_segmentation` and `vsm eval`: every query scored, unreadable samples listed, one query per image,
the phrase / sentence breakdown, per-sample records and the gallery."""

import json

import pytest
from datasets import Dataset
from datasets import Image as ImageFeature
from PIL import Image

from conftest import make_tiny_model
from modeling_vsm.data import FEATURES, export_reasonseg, load_synthetic
from modeling_vsm.evaluation import evaluate_segmentation, first_query_per_image, summarize, write_gallery
from modeling_vsm.metrics import reason_seg_iou


@pytest.fixture(scope="module")
def tiny_model():
    return make_tiny_model(seed=0).eval()


def _undecoded_rows(dataset):
    return list(dataset.cast_column("image", ImageFeature(decode=False)))


def _dataset(rows):
    features = FEATURES.copy()
    features["image"] = ImageFeature(decode=False)
    return Dataset.from_list(rows, features=features).cast_column("image", ImageFeature())


def test_every_query_is_scored_and_unreadable_rows_are_listed(tiny_model, tiny_processor):
    rows = _undecoded_rows(load_synthetic("test", num_samples=10))
    broken = next(i for i, row in enumerate(rows) if row["masks"])
    rows[broken]["image"] = {"bytes": b"\x89PNG\r\n\x1a\n not an image", "path": None}
    dataset = _dataset(rows)
    summary, records = evaluate_segmentation(tiny_model, tiny_processor, dataset, batch_size=4, progress=False, max_new_tokens=4)
    assert summary["num_unreadable"] == 1 and summary["unreadable"][0]["id"] == rows[broken]["id"]
    assert summary["unreadable"][0]["index"] == broken and "Error" in summary["unreadable"][0]["error"]
    assert len(records) == len(rows) - 1  # every readable query, mask or not
    num_seg = sum(1 for i, row in enumerate(rows) if row["masks"] and i != broken)
    assert summary["num_samples"] == num_seg == sum("giou" in r for r in records)
    seg = [r for r in records if "giou" in r]
    for record in seg:
        assert {"query", "answer", "giou", "intersection", "union", "emitted", "is_sentence"} <= set(record)
    # The summary is LISA's gIoU / cIoU of the per-sample counts.
    assert summary["giou"] == pytest.approx(sum(r["giou"] for r in seg) / len(seg))
    union = sum(r["union"] for r in seg)
    assert summary["ciou"] == pytest.approx(sum(r["intersection"] for r in seg) / union if union else 1.0)
    breakdown = summary["by_is_sentence"]
    assert set(breakdown) <= {"phrase", "sentence"}
    assert sum(part["num_samples"] for part in breakdown.values()) == summary["num_samples"]
    assert "phrase" not in summary["per_type"] and sum(p["num_samples"] for p in summary["per_type"].values()) == num_seg


def test_summary_matches_reason_seg_iou_on_the_masks():
    import numpy as np

    rng = np.random.default_rng(0)
    predictions = [rng.random((6, 7)) < 0.5 for _ in range(5)]
    references = [(rng.random((6, 7)) < 0.3).astype(np.uint8) for _ in range(5)]
    from modeling_vsm.metrics import intersection_union

    records = []
    for k, (p, r) in enumerate(zip(predictions, references)):
        i, u = intersection_union(p, r)
        records.append({"giou": 0.0, "intersection": i, "union": u, "emitted": True, "chance_iou": None,
                        "query_type": "colour", "is_sentence": bool(k % 2)})
    summary = summarize(records)
    expected = reason_seg_iou(predictions, references)
    assert summary["giou"] == pytest.approx(expected["giou"], abs=1e-12)
    assert summary["ciou"] == pytest.approx(expected["ciou"], abs=1e-12)
    assert summary["by_is_sentence"]["sentence"]["num_samples"] == 2


def test_each_group_reports_the_standard_error_of_its_giou():
    """`giou_stderr` = sample standard deviation of the per-sample IoUs / sqrt(n): how far a type's gIoU on ~70
    queries can move with the split alone; a group of one has none."""
    import numpy as np

    ious = [1.0, 0.0, 0.5, 0.25]
    records = [{"giou": iou, "intersection": int(iou * 8), "union": 8, "emitted": True, "chance_iou": None,
                "query_type": "kind" if k < 3 else "size", "is_sentence": False} for k, iou in enumerate(ious)]
    summary = summarize(records)
    kind = summary["per_type"]["kind"]
    assert kind["giou"] == pytest.approx(0.5, abs=1e-5)
    expected = np.std(ious[:3], ddof=1) / np.sqrt(3)
    assert expected == pytest.approx(0.288675, rel=1e-5)
    assert kind["giou_stderr"] == pytest.approx(expected)
    assert summary["per_type"]["size"]["giou_stderr"] is None


def test_one_query_per_image(tmp_path):
    source = load_synthetic("test", num_samples=12)
    rows = _undecoded_rows(source)
    # Two more queries about the first image, as in ReasonSeg (several `text` entries per image).
    rows = rows[:1] + [dict(rows[0], id=f"{rows[0]['id']}-again-{k}") for k in range(2)] + rows[1:]
    dataset = _dataset(rows)
    kept = first_query_per_image(dataset)
    assert kept == [0] + list(range(3, len(rows)))


def test_gallery_writes_best_and_worst(tiny_model, tiny_processor, tmp_path):
    dataset = load_synthetic("test", num_samples=12)
    records = [{"index": i, "giou": i / 100, "query": "q <b>", "answer": "a"} for i, row in enumerate(dataset) if row["masks"]]
    assert len(records) > 4
    paths = write_gallery(tiny_model, tiny_processor, dataset, records, tmp_path / "gallery", num_cases=4)
    ious = sorted(r["giou"] for r in records)
    assert [p.name.split("_iou")[1] for p in paths] == [f"{v:.2f}.png" for v in ious[:2] + ious[-2:]]
    html = (tmp_path / "gallery" / "index.html").read_text()
    assert all(path.name in html for path in paths) and "q &lt;b&gt;" in html
    assert paths[0].name.startswith("worst") and paths[-1].name.startswith("best")
    assert Image.open(paths[0]).width > Image.open(paths[0]).height  # prediction | reference


def test_vsm_eval_lists_unreadable_files_and_scores_the_rest(tiny_model, tiny_processor, tmp_path, capsys):
    from modeling_vsm.cli import main

    model_dir = tmp_path / "model"
    tiny_model.save_pretrained(model_dir)
    tiny_processor.save_pretrained(model_dir)
    folder = tmp_path / "reasonseg"
    written = export_reasonseg(load_synthetic("test", num_samples=12), folder)
    victim = sorted(folder.glob("*.jpg"))[0]
    victim.write_bytes(b"not a jpeg")
    output = tmp_path / "eval" / "metrics.json"
    assert main(["eval", "--model", str(model_dir), "--data", f"reasonseg:{folder}", "--batch-size", "4",
                 "--max-new-tokens", "4", "--no-swap-test", "--output", str(output)]) == 0
    summary = json.loads(output.read_text())
    assert summary["num_samples"] == written - 1 and summary["num_unreadable"] == 1
    assert victim.stem in summary["skipped_at_load"][0]["where"] + summary["skipped_at_load"][0]["reason"]
    assert summary["data"] == f"reasonseg:{folder}" and summary["one_query_per_image"] is False
    lines = output.with_suffix(".samples.jsonl").read_text().splitlines()
    assert len(lines) == written - 1 and all("giou" in json.loads(line) for line in lines)
    assert (output.parent / "overlays" / "index.html").is_file()
    assert "unreadable: 1" in capsys.readouterr().out
