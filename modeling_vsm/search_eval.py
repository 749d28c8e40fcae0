"""The search benchmark (`vsm eval --task search`): SEAL's visual search against one `<loc>` look at the whole image,
on the same images, in the same run.

Data: `synthetic-highres` (built in: a large canvas, 256-1024 px a side, with one small target among distractors of
the same colours and kinds; the target's short side is 2-8% of the image's; never trained on: the train split's
search patches come from another random stream) or `search:PATH` (a folder with
`targets.json`: `[{"image": "a.jpg", "target": "the red car", "box": [x0, y0, x1, y1]}, ...]`, boxes in pixels).
A search (or a one-shot look) succeeds when its box overlaps the target's at IoU >= 0.5. The report gives, for both,
the success rate (over all targets and over the small ones: short side <= 5% of the image's), mean model calls and
seconds per search, and the batched search's speed-up over one patch per forward: whole searches (every patch down
to the leaves, no score stops them) of the first few images, timed both ways.
"""

import json
import math
import random
import time
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from .data.highres import SMALL_TARGET_FRACTION, generate_highres_scene
from .search import SearchSettings, VisualSearch

SUCCESS_IOU = 0.5
SPEEDUP_SAMPLES = 6  # whole searches timed both ways for the batched speed-up


def highres_scenes(num_samples: int, seed: int = 0) -> list[dict]:
    """Large canvases with one small target among lookalikes (`modeling_vsm.data.highres`), drawn whole. Rows: `image`
    (PIL), `target` ("red circle"), `box` (pixels), `small` (bool)."""
    rng = random.Random(f"vsm-highres/{seed}")
    rows = []
    for index in range(num_samples):
        scene = generate_highres_scene(rng)
        rows.append({"id": f"highres-{seed}-{index}", "image": scene.render()[0], "target": scene.target,
                     "box": scene.target_box, "small": scene.is_small})
    return rows


def load_search_folder(folder) -> list[dict]:
    """Rows of a folder with `targets.json` (see the module docstring); a missing file or field is named."""
    folder = Path(folder)
    path = folder / "targets.json"
    if not path.is_file():
        raise ValueError(f"{folder} has no targets.json (a list of {{'image', 'target', 'box'}}).")
    rows = []
    for index, entry in enumerate(json.loads(path.read_text())):
        missing = [key for key in ("image", "target", "box") if key not in entry]
        if missing or len(entry.get("box", [])) != 4:
            raise ValueError(f"{path} entry {index}: needs 'image', 'target' and a 4-number 'box', missing {missing}.")
        image = Image.open(folder / entry["image"]).convert("RGB")
        box = [float(v) for v in entry["box"]]
        rows.append({"id": entry.get("id", str(index)), "image": image, "target": entry["target"], "box": box,
                     "small": min(box[2] - box[0], box[3] - box[1]) <= SMALL_TARGET_FRACTION * min(image.size)})
    return rows


def box_iou(a, b) -> float:
    if a is None or b is None:
        return 0.0
    width, height = min(a[2], b[2]) - max(a[0], b[0]), min(a[3], b[3]) - max(a[1], b[1])
    intersection = max(width, 0.0) * max(height, 0.0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - intersection
    return intersection / union if union > 0 else 0.0


def one_shot(model, processor, image, target, settings: SearchSettings) -> dict:
    """One `<loc>` look at the whole image (the search's root, without going further)."""
    started = time.perf_counter()
    search = VisualSearch(model, processor, settings)
    found = search.locate(image, [(0, 0, *image.size)], target)[0]
    return {"box": found["box"], "score": found["score"], "num_calls": search.num_calls,
            "seconds": time.perf_counter() - started}


def evaluate_search(model, processor, rows: list[dict], settings: SearchSettings | None = None) -> dict:
    """Search and one-shot on every row; the report of the module docstring, and one record per row."""
    settings = settings or SearchSettings()
    model.eval()
    records = []
    for row in tqdm(rows, desc="search vs one-shot"):
        result = VisualSearch(model, processor, settings).run(row["image"], row["target"])
        look = one_shot(model, processor, row["image"], row["target"], settings)
        records.append({"id": row["id"], "target": row["target"], "box": row["box"], "small": row["small"],
                        "search_iou": box_iou(result["box"], row["box"]), "search_calls": result["num_calls"],
                        "search_seconds": result["seconds"], "search_patches": len(result["path"]),
                        "one_shot_iou": box_iou(look["box"], row["box"]), "one_shot_seconds": look["seconds"]})

    def summary(kind, subset):
        if not subset:
            return None
        return {"success_rate": sum(r[f"{kind}_iou"] >= SUCCESS_IOU for r in subset) / len(subset),
                "mean_seconds": sum(r[f"{kind}_seconds"] for r in subset) / len(subset),
                **({"mean_calls": sum(r["search_calls"] for r in subset) / len(subset),
                    "mean_patches": sum(r["search_patches"] for r in subset) / len(subset)} if kind == "search" else
                   {"mean_calls": 1.0})}

    small = [r for r in records if r["small"]]
    timed = rows[:SPEEDUP_SAMPLES]
    seconds = {True: 0.0, False: 0.0}
    for row in timed:  # whole searches (no score stops them): the same patches both ways, side by side per image
        for batched in (True, False):
            timed_settings = {**settings.__dict__, "batch_children": batched, "confidence_high": math.inf}
            started = time.perf_counter()
            VisualSearch(model, processor, SearchSettings(**timed_settings)).run(row["image"], row["target"])
            seconds[batched] += time.perf_counter() - started
    report = {
        "num_samples": len(records),
        "num_small": len(small),
        "success_iou": SUCCESS_IOU,
        "search": summary("search", records),
        "one_shot": summary("one_shot", records),
        "search_small": summary("search", small),
        "one_shot_small": summary("one_shot", small),
        "batched_speedup": round(seconds[False] / seconds[True], 3) if seconds[True] > 0 else None,
        "batched_speedup_samples": len(timed),
        "settings": settings.__dict__,
    }
    return report, records


__all__ = ["highres_scenes", "load_search_folder", "evaluate_search", "box_iou"]
