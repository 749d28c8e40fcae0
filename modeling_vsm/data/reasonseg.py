"""ReasonSeg (LISA's format: `*.json` + same-stem images, optional explanations): reading (`load_reasonseg`) and
writing (`export_reasonseg`)."""

import io
import json
import math
import random
import re
from pathlib import Path

import numpy as np
from PIL import Image as PILImage

from .masks import polygon_problem
from .reading import SkipLog, _read_json, _read_json_list
from .schema import (
    LONG_QUESTION_TEMPLATES,
    REASONSEG_LONG_TEMPLATE,
    REASONSEG_SHORT_TEMPLATE,
    SEG_ANSWER_TEMPLATES,
    SHORT_QUESTION_TEMPLATES,
    _check_answer_templates,
    _row,
    _rows_to_dataset,
)


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")
EXPORT_JPEG_QUALITY = 95
REASONSEG_REQUIRED_KEYS = ("text", "is_sentence", "shapes")
REASONSEG_EXPLANATORY_DIR = "explanatory"  # LISA: ReasonSeg/explanatory/train.json
# Appended to a query whose image has an explanation (LISA's explanatory ReasonSeg answers).
EXPLANATORY_QUESTIONS = (
    "Please output the segmentation mask and explain why.",
    "Please output the segmentation mask and give the reason.",
    "Please segment it and explain your answer.",
)


def _unwrap_query(instruction: str, is_sentence: bool):
    """Inverts LISA's question templates: returns `(query, is_sentence)` for the ReasonSeg `text`."""
    for template in LONG_QUESTION_TEMPLATES if is_sentence else SHORT_QUESTION_TEMPLATES:
        match = re.fullmatch(re.escape(template).replace(re.escape("{query}"), "(.+)"), instruction)
        if match:
            return match.group(1), is_sentence
    return instruction, True  # used verbatim, as a sentence


def _safe_stem(sample_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", sample_id)


def export_reasonseg(dataset, out_dir) -> int:
    """Writes the single-mask segmentation samples of `dataset` in ReasonSeg's layout: `<id>.jpg` and `<id>.json`.

    The JSON holds `text` (the query, with LISA's question template removed when it matches one),
    `is_sentence` and `shapes` (`label` "target" or "ignore", polygon `points` as `[[x, y], ...]`).
    Samples without exactly one mask are skipped. Returns the number of samples written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = 0
    for sample in dataset:
        if len(sample["masks"]) != 1:
            continue
        stem = _safe_stem(sample["id"])
        image_name = f"{stem}.jpg"
        instruction = next(m["content"] for m in sample["messages"] if m["role"] == "user")
        query, is_sentence = _unwrap_query(instruction, sample["is_sentence"])
        shapes = []
        ignore = sample["ignore"][0] if sample["ignore"] else []
        for label, polygons in (("target", sample["masks"][0]), ("ignore", ignore)):
            for polygon in polygons:
                points = [[float(x), float(y)] for x, y in zip(polygon[0::2], polygon[1::2])]
                shape = {"label": label, "labels": [label], "shape_type": "polygon", "image_name": image_name}
                shapes.append({**shape, "points": points})
        sample["image"].convert("RGB").save(out_dir / image_name, format="JPEG", quality=EXPORT_JPEG_QUALITY)
        with open(out_dir / f"{stem}.json", "w", encoding="utf-8") as f:
            json.dump({"text": [query], "is_sentence": bool(is_sentence), "shapes": shapes}, f)
        written += 1
    return written


def _read_reasonseg_json(json_path: Path):
    """Parses one ReasonSeg JSON into `(queries, is_sentence, targets, ignores, image path, image bytes)`;
    raises ValueError naming the problem."""
    annotation = _read_json(json_path)
    if not isinstance(annotation, dict):
        raise ValueError("the JSON is not an object")
    missing = [key for key in REASONSEG_REQUIRED_KEYS if key not in annotation]
    if missing:
        raise ValueError(f"missing keys {missing}")
    queries = [annotation["text"]] if isinstance(annotation["text"], str) else annotation["text"]
    if not isinstance(queries, list) or not queries or not all(isinstance(q, str) and q.strip() for q in queries):
        raise ValueError("`text` must be a non-empty list of non-empty strings")
    if not isinstance(annotation["shapes"], list):
        raise ValueError("`shapes` must be a list")

    candidates = [json_path.with_suffix(ext) for ext in IMAGE_EXTENSIONS]
    image_path = next((candidate for candidate in candidates if candidate.is_file()), None)
    if image_path is None:
        raise ValueError(f"no image {json_path.stem}{{{','.join(IMAGE_EXTENSIONS)}}}")
    image_bytes = image_path.read_bytes()
    try:
        with PILImage.open(io.BytesIO(image_bytes)) as image:
            image.load()
            width, height = image.size
    except Exception as error:  # PIL raises many types for broken files
        raise ValueError(f"unreadable image {image_path.name} ({type(error).__name__})") from None

    targets, ignores = [], []
    for k, shape in enumerate(annotation["shapes"]):
        label = str(shape.get("label", "")).lower() if isinstance(shape, dict) else ""
        if label == "flag":  # LISA: meaningless deprecated annotations
            continue
        if not isinstance(shape, dict) or "points" not in shape:
            raise ValueError(f"shape {k} has no `points`")
        problem = polygon_problem(shape["points"], height, width)
        if problem:
            raise ValueError(f"shape {k}: {problem}")
        (ignores if "ignore" in label else targets).append(np.asarray(shape["points"], dtype=np.float64).reshape(-1).tolist())
    if not targets:
        raise ValueError("no target polygon")
    return queries, bool(annotation["is_sentence"]), targets, ignores, image_path, image_bytes


def read_explanations(path) -> dict:
    """Reads a ReasonSeg explanation file (LISA's `explanatory/<split>.json`: a list of `{"image": file name,
    "query": text, "outputs": explanation}`) into `{image file name: explanation}`. Bad entries are skipped
    with a counted warning; an unreadable file raises ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ReasonSeg explanation file not found: {str(path)!r}")
    items = _read_json_list(path, "ReasonSeg explanation file", "a JSON list")
    explanations, skips = {}, SkipLog("ReasonSeg explanation")
    for index, item in enumerate(items):
        if not isinstance(item, dict) or not all(isinstance(item.get(key), str) for key in ("image", "outputs")):
            skips.skip(f"{path} item {index}", "missing `image` or `outputs` string")
            continue
        explanations[Path(item["image"]).name] = item["outputs"].strip()
    skips.report(path, len(items))
    return explanations


def _reasonseg_rows(folder, answer_templates, seed, explanations, explanatory_fraction):
    json_paths = sorted(Path(folder).glob("*.json"))
    skips, num_rows = SkipLog("ReasonSeg file"), 0
    for json_path in json_paths:
        try:
            queries, is_sentence, targets, ignores, image_path, image_bytes = _read_reasonseg_json(json_path)
        except (ValueError, OSError) as error:
            skips.skip(json_path, str(error))
            continue
        image = {"bytes": image_bytes, "path": None}
        explanation = explanations.get(image_path.name)
        for k, query in enumerate(queries):
            query = query.strip()
            rng = random.Random(f"vsm-reasonseg/{seed}/{json_path.stem}/{k}")  # independent of skips and order
            answer = rng.choice(answer_templates)
            if explanation and rng.random() < explanatory_fraction:
                instruction = f"{query} {rng.choice(EXPLANATORY_QUESTIONS)}"
                answer = f"{answer} {explanation}"
            else:
                template = REASONSEG_LONG_TEMPLATE if is_sentence else REASONSEG_SHORT_TEMPLATE
                instruction = template.format(query=query)
            num_rows += 1
            yield _row(
                image,
                instruction,
                answer,
                masks=[targets],
                ignore=[ignores],
                is_sentence=is_sentence,
                query_type="reasonseg",
                chance_iou=math.nan,
                source="reasonseg",
                sample_id=f"reasonseg-{json_path.stem}-{k}",
            )
    skips.report(folder, len(json_paths))
    skips.fail_if_empty(num_rows, folder, len(json_paths))


def load_reasonseg(
    path,
    answer_templates=SEG_ANSWER_TEMPLATES,
    seed: int = 0,
    explanations=None,
    explanatory_fraction: float = 1.0,
    streaming: bool = False,
):
    """Reads a ReasonSeg folder (`*.json` + same-stem `.jpg`/`.png`/`.jpeg`): one sample per query, every
    query of every image.

    Short phrases become "What is {query} in this image? Please output segmentation mask.", sentences
    get " Please output segmentation mask." appended (LISA). All target polygons of a file form one
    mask; labels containing "ignore" go to `ignore`; label "flag" is dropped. A broken file (invalid
    JSON, missing keys, missing or unreadable image, no target, a polygon with < 3 points, NaN
    coordinates or entirely outside the image) is skipped with a counted warning naming it.

    Args:
        answer_templates: answers with one `<SEG>`, one drawn per query (seeded by `seed`, the file and
            the query index, so a query keeps its answer whatever else is in the folder).
        explanations (`str` or `Path`, *optional*): an explanation file (see `read_explanations`). A query
            of an image that has an explanation then asks for one ("... Please output the segmentation
            mask and explain why.") and the answer is the `<SEG>` answer followed by the explanation.
        explanatory_fraction (`float`): the share of such queries (drawn by seed) that get the explanatory
            form; the rest keep the plain one.
        streaming (`bool`): return an `IterableDataset` that reads the files lazily.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"ReasonSeg folder not found: {str(path)!r}")
    if not 0.0 <= explanatory_fraction <= 1.0:
        raise ValueError(f"`explanatory_fraction` must be in [0, 1], got {explanatory_fraction}.")
    explanations = read_explanations(explanations) if explanations is not None else {}
    return _rows_to_dataset(
        _reasonseg_rows, streaming, folder=folder, answer_templates=_check_answer_templates(answer_templates),
        seed=seed, explanations=explanations, explanatory_fraction=explanatory_fraction,
    )
