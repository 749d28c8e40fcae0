"""VSM data: the common sample schema, built-in synthetic shapes data, ReasonSeg I/O, data specs.

Every loader returns a `datasets.Dataset` with exactly the columns of `FEATURES`:

- `image`: the image (`datasets.Image`, a PIL image when read).
- `messages`: `[{"role": "user", "content": instruction}, {"role": "assistant", "content": answer}]`.
  The instruction never holds `<image>`; the collator attaches the image to the first user turn.
- `masks`: one entry per `<SEG>` in the answer(s), in order; each entry a list of polygons, each a
  flat `[x0, y0, x1, y1, ...]` in original image pixels (x right, y down). All polygons of one
  entry together form one mask.
- `ignore`: parallel to `masks`: per `<SEG>`, the ignore-region polygons (LISA's label 255).
- `boxes`: one `[x0, y0, x1, y1]` (pixels) per `<loc>` in the answer.
- `is_sentence`, `query_type`, `chance_iou`, `source`, `id`: see `FEATURES`.

The synthetic data (coloured circles, squares and triangles on a plain background, queried by
colour, kind, position, size or a full sentence) is the project's default data: a referent is always
unique under its query, and `chance_iou` records what picking a random object would score, so
per-query-type gIoU can be read against chance.

References:
- LISA (Lai et al. 2023, github.com/dvlab-research/LISA): the question / answer templates
  (`utils/utils.py`) and the ReasonSeg JSON layout and its reading (`utils/data_processing.py`:
  labels containing "ignore" -> 255, label "flag" dropped). Deviation: in `rasterize_mask` ignore
  polygons always win over target polygons (LISA paints polygons largest first, so the smaller wins).
- SEAL / V* (Wu & Xie 2023): `<loc>` box answers.
"""

import io
import json
import logging
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from datasets import Dataset, Features, Image, List, Value, concatenate_datasets
from PIL import Image as PILImage
from PIL import ImageDraw

logger = logging.getLogger(__name__)

SEG_TOKEN = "<SEG>"
LOC_TOKEN = "<loc>"
TARGET_LABEL = 1
IGNORE_LABEL = 255  # LISA: pixels excluded from loss and metrics

FEATURES = Features(
    {
        "image": Image(),
        "messages": List({"role": Value("string"), "content": Value("string")}),
        "masks": List(List(List(Value("float64")))),  # (num_seg, num_polygons, 2 * num_points)
        "ignore": List(List(List(Value("float64")))),  # (num_seg, num_polygons, 2 * num_points)
        "boxes": List(List(Value("float64"), length=4)),  # (num_loc, 4) xyxy pixels
        "is_sentence": Value("bool"),
        "query_type": Value("string"),
        "chance_iou": Value("float64"),
        "source": Value("string"),
        "id": Value("string"),
    }
)
SEGMENTATION_QUERY_TYPES = ("colour", "kind", "position", "size", "sentence")
QUERY_TYPES = SEGMENTATION_QUERY_TYPES + ("loc", "vqa", "reasonseg")

# LISA's templates (utils/utils.py) with `[SEG]` -> `<SEG>` and without the leading "<image>\n".
SHORT_QUESTION_TEMPLATES = (
    "Can you segment {query} in this image?",
    "Please segment {query} in this image.",
    "What is {query} in this image? Please respond with segmentation mask.",
    "What is {query} in this image? Please output segmentation mask.",
)
LONG_QUESTION_TEMPLATES = (
    "{query} Please respond with segmentation mask.",
    "{query} Please output segmentation mask.",
)
SEG_ANSWER_TEMPLATES = (
    "It is <SEG>.",
    "Sure, <SEG>.",
    "Sure, it is <SEG>.",
    "Sure, the segmentation result is <SEG>.",
    "<SEG>.",
)
# The wrapping LISA's ReasonSeg dataset uses for evaluation-style prompts.
REASONSEG_SHORT_TEMPLATE = SHORT_QUESTION_TEMPLATES[3]
REASONSEG_LONG_TEMPLATE = LONG_QUESTION_TEMPLATES[1]

# ----------------------------------------------------------------------------------------------
# Synthetic scenes

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 230),
    "yellow": (235, 210, 40),
}
KINDS = ("circle", "square", "triangle")
BACKGROUND_COLOURS = ((45, 45, 45), (38, 46, 58), (56, 50, 42), (42, 54, 46))  # dark grey + muted
BACKGROUND_JITTER = 8  # per-channel, per image
MIN_OBJECTS, MAX_OBJECTS = 2, 4
# Sizes, gaps and margins are given at REFERENCE_IMAGE_SIZE and scale with `image_size`.
REFERENCE_IMAGE_SIZE = 64
MIN_IMAGE_SIZE = 32
MIN_OBJECT_SIZE, MAX_OBJECT_SIZE = 10.0, 28.0  # circle diameter, square side, triangle side
OBJECT_GAP = 2.0  # min distance between bounding circles, so objects never overlap
BORDER_MARGIN = 1.0
POSITION_MARGIN = 8.0  # min gap between the extreme centre and the runner-up's
SIZE_RATIO_MARGIN = 1.5  # min area ratio between the extreme object and the runner-up
CIRCLE_VERTICES = 24
# Circumradius / size: circle diameter, square side, equilateral triangle side.
SHAPE_REACH = {"circle": 0.5, "square": 1 / math.sqrt(2), "triangle": 1 / math.sqrt(3)}
MAX_ROTATION_DEGREES = 15.0  # squares and triangles
POLYGON_DECIMALS = 2
MAX_PLACEMENT_TRIES = 60
MAX_SCENE_TRIES = 200
DEFAULT_TASK_MIX = {
    **{query_type: 0.70 / len(SEGMENTATION_QUERY_TYPES) for query_type in SEGMENTATION_QUERY_TYPES},
    "loc": 0.15,
    "vqa": 0.15,
}
SPLIT_INDEX = {"train": 0, "validation": 1, "test": 2}
SPLIT_ALIASES = {"val": "validation", "eval": "validation"}
DEFAULT_SPLIT_SIZES = {"train": 20000, "validation": 500, "test": 500}

COLOUR_PHRASES = ("the {colour} shape", "the {colour} object")
KIND_PHRASES = ("the {kind}",)
POSITION_PHRASES = {
    "left": ("the leftmost shape", "the shape on the far left"),
    "right": ("the rightmost shape", "the shape on the far right"),
    "top": ("the topmost shape", "the highest shape"),
    "bottom": ("the bottom shape", "the lowest shape"),
}
SIZE_PHRASES = {
    "biggest": ("the biggest shape", "the largest shape"),
    "smallest": ("the smallest shape", "the tiniest shape"),
}
SENTENCE_TEMPLATES = (
    "Which shape {desc}?",
    "There is a shape that {desc}; can you segment it?",
    "Find the object in this picture that {desc}.",
    "One of these shapes {desc}. Which one is it?",
)
# Verb phrases completing "the shape that ...", per attribute value.
SENTENCE_DESCRIPTIONS = {
    "colour": {
        "red": ("has the colour of a ripe tomato", "is coloured like a fire truck"),
        "green": ("has the colour of fresh grass", "is coloured like a lime"),
        "blue": ("has the colour of a clear sky", "is coloured like the deep sea"),
        "yellow": ("has the colour of a ripe banana", "is coloured like the sun"),
    },
    "kind": {
        "circle": ("is perfectly round", "has no corners at all"),
        "square": ("has four equal sides", "has four right angles"),
        "triangle": ("has exactly three corners", "has three straight sides"),
    },
    "position": {
        "left": ("sits further left than all the others", "is closest to the left edge of the picture"),
        "right": ("sits further right than all the others", "is closest to the right edge of the picture"),
        "top": ("sits higher than all the others", "is closest to the top edge of the picture"),
        "bottom": ("sits lower than all the others", "is closest to the bottom edge of the picture"),
    },
    "size": {
        "biggest": ("is larger than every other shape", "covers the most area"),
        "smallest": ("is smaller than every other shape", "covers the least area"),
    },
}
LOC_BY_ATTRIBUTE_PROBABILITY = 0.5  # else "the {colour} {kind}"
LOC_QUESTION_TEMPLATES = ("Where is {query}?", "Find {query}.", "Locate {query}.")
LOC_ANSWER_TEMPLATES = ("It is at <loc>.", "Sure, it is at <loc>.", "<loc>.")
COUNT_QUESTIONS = ("How many shapes are there?", "How many objects are in this picture?")
COUNT_ANSWER = "There are {count} shapes."
COLOUR_QUESTION = "What colour is the {kind}?"
COLOUR_ANSWER = "It is {colour}."
KIND_QUESTION = "What shape is the {colour} object?"
KIND_ANSWER = "It is a {kind}."
NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}


@dataclass(frozen=True)
class SceneObject:
    """One shape of a synthetic scene; `polygon` is flat `[x0, y0, ...]` in pixels."""

    colour: str
    kind: str
    centre: tuple
    polygon: tuple

    @property
    def area(self) -> float:
        return polygon_area(self.polygon)

    @property
    def bbox(self) -> list:
        xs, ys = self.polygon[0::2], self.polygon[1::2]
        return [min(xs), min(ys), max(xs), max(ys)]


def polygon_area(polygon) -> float:
    """Shoelace area of a flat `[x0, y0, x1, y1, ...]` polygon."""
    xs, ys = list(polygon[0::2]), list(polygon[1::2])
    next_xs, next_ys = xs[1:] + xs[:1], ys[1:] + ys[:1]
    return abs(sum(x * ny - nx * y for x, y, nx, ny in zip(xs, ys, next_xs, next_ys))) / 2


def _shape_polygon(kind: str, cx: float, cy: float, size: float, angle: float) -> tuple:
    """Vertices of a shape of extent `size` centred at (cx, cy), rotated by `angle` radians."""
    if kind == "circle":
        offsets = [2 * math.pi * k / CIRCLE_VERTICES for k in range(CIRCLE_VERTICES)]
    elif kind == "square":
        offsets = [math.pi / 4 + math.pi / 2 * k for k in range(4)]
    elif kind == "triangle":  # equilateral, apex up
        offsets = [-math.pi / 2 + 2 * math.pi / 3 * k for k in range(3)]
    else:
        raise ValueError(f"`kind` must be one of {KINDS}, got {kind!r}.")
    radius = SHAPE_REACH[kind] * size
    points = []
    for offset in offsets:
        points += [cx + radius * math.cos(offset + angle), cy + radius * math.sin(offset + angle)]
    return tuple(round(value, POLYGON_DECIMALS) for value in points)


def generate_scene(rng: random.Random, image_size: int = REFERENCE_IMAGE_SIZE) -> tuple:
    """Samples a background colour and 2-4 non-overlapping objects with distinct (colour, kind).

    Returns `(background_rgb, objects)`; objects are placed by rejection sampling, at most
    `MAX_PLACEMENT_TRIES` per object, and a scene that ends with fewer than `MIN_OBJECTS` is redrawn.
    """
    scale = image_size / REFERENCE_IMAGE_SIZE
    base = rng.choice(BACKGROUND_COLOURS)
    background = tuple(c + rng.randint(-BACKGROUND_JITTER, BACKGROUND_JITTER) for c in base)
    combos = [(colour, kind) for colour in COLOURS for kind in KINDS]
    for _ in range(MAX_SCENE_TRIES):
        wanted = rng.randint(MIN_OBJECTS, MAX_OBJECTS)
        objects, placed = [], []  # placed: (centre, bounding radius)
        for colour, kind in rng.sample(combos, wanted):
            for _ in range(MAX_PLACEMENT_TRIES):
                size = rng.uniform(MIN_OBJECT_SIZE, MAX_OBJECT_SIZE) * scale
                angle = 0.0 if kind == "circle" else math.radians(rng.uniform(-1, 1) * MAX_ROTATION_DEGREES)
                reach = SHAPE_REACH[kind] * size  # bounding-circle radius
                low = reach + BORDER_MARGIN * scale
                cx, cy = (round(rng.uniform(low, image_size - low), POLYGON_DECIMALS) for _ in range(2))
                if all(math.dist((cx, cy), centre) >= reach + other + OBJECT_GAP * scale for centre, other in placed):
                    objects.append(SceneObject(colour, kind, (cx, cy), _shape_polygon(kind, cx, cy, size, angle)))
                    placed.append(((cx, cy), reach))
                    break
        if len(objects) >= MIN_OBJECTS:
            return background, tuple(objects)
    raise RuntimeError(f"Could not place {MIN_OBJECTS} objects in {MAX_SCENE_TRIES} tries at image_size={image_size}.")


def render_scene(background: tuple, objects, image_size: int) -> PILImage.Image:
    """Draws the objects with `ImageDraw.polygon` from the same polygons stored in `masks`."""
    image = PILImage.new("RGB", (image_size, image_size), background)
    draw = ImageDraw.Draw(image)
    for obj in objects:
        draw.polygon(list(obj.polygon), fill=COLOURS[obj.colour])
    return image


def _unique_referents(objects, image_size: int) -> dict:
    """Per attribute, the `{value: object index}` that single out one object, e.g. {"colour": {"red": 0}}."""
    scale = image_size / REFERENCE_IMAGE_SIZE
    referents = {"colour": {}, "kind": {}, "position": {}, "size": {}}
    for attribute in ("colour", "kind"):
        values = [getattr(obj, attribute) for obj in objects]
        referents[attribute] = {value: values.index(value) for value in values if values.count(value) == 1}

    bboxes = [obj.bbox for obj in objects]
    # direction -> (centre coordinate, bbox edge, sign): sign +1 means "smallest value wins"
    directions = {"left": (0, 0, 1), "right": (0, 2, -1), "top": (1, 1, 1), "bottom": (1, 3, -1)}
    for direction, (axis, edge, sign) in directions.items():
        centres = [sign * obj.centre[axis] for obj in objects]
        order = sorted(range(len(objects)), key=centres.__getitem__)
        best, runner_up = order[0], order[1]
        edges_agree = all(sign * bboxes[best][edge] < sign * bboxes[i][edge] for i in order[1:])
        if centres[runner_up] - centres[best] >= POSITION_MARGIN * scale and edges_agree:
            referents["position"][direction] = best

    areas = [obj.area for obj in objects]
    order = sorted(range(len(objects)), key=areas.__getitem__)
    if areas[order[-1]] >= SIZE_RATIO_MARGIN * areas[order[-2]]:
        referents["size"]["biggest"] = order[-1]
    if areas[order[1]] >= SIZE_RATIO_MARGIN * areas[order[0]]:
        referents["size"]["smallest"] = order[0]
    return referents


def _referring_phrase(rng: random.Random, attribute: str, value: str) -> str:
    if attribute == "colour":
        return rng.choice(COLOUR_PHRASES).format(colour=value)
    if attribute == "kind":
        return rng.choice(KIND_PHRASES).format(kind=value)
    if attribute == "position":
        return rng.choice(POSITION_PHRASES[value])
    return rng.choice(SIZE_PHRASES[value])


def _segmentation_query(rng, query_type, referents):
    """Returns `(instruction, target index, is_sentence)` or None when the scene has no unique referent."""
    if query_type == "sentence":
        attributes = [attribute for attribute in SENTENCE_DESCRIPTIONS if referents[attribute]]
        if not attributes:
            return None
        attribute = rng.choice(attributes)
        value = rng.choice(sorted(referents[attribute]))
        sentence = rng.choice(SENTENCE_TEMPLATES).format(desc=rng.choice(SENTENCE_DESCRIPTIONS[attribute][value]))
        return rng.choice(LONG_QUESTION_TEMPLATES).format(query=sentence), referents[attribute][value], True
    if not referents[query_type]:
        return None
    value = rng.choice(sorted(referents[query_type]))
    phrase = _referring_phrase(rng, query_type, value)
    return rng.choice(SHORT_QUESTION_TEMPLATES).format(query=phrase), referents[query_type][value], False


def _loc_query(rng, objects, referents):
    """`(question, target index)`: by colour and kind (always unique) or by a unique attribute."""
    attributes = [attribute for attribute in referents if referents[attribute]]
    if attributes and rng.random() < LOC_BY_ATTRIBUTE_PROBABILITY:
        attribute = rng.choice(attributes)
        value = rng.choice(sorted(referents[attribute]))
        phrase, index = _referring_phrase(rng, attribute, value), referents[attribute][value]
    else:
        index = rng.randrange(len(objects))
        phrase = f"the {objects[index].colour} {objects[index].kind}"
    return rng.choice(LOC_QUESTION_TEMPLATES).format(query=phrase), index


def _vqa_query(rng, objects, referents):
    """`(question, answer)` about the count, a unique kind's colour or a unique colour's kind."""
    choices = ["count"] + ["colour"] * bool(referents["kind"]) + ["kind"] * bool(referents["colour"])
    choice = rng.choice(choices)
    if choice == "count":
        return rng.choice(COUNT_QUESTIONS), COUNT_ANSWER.format(count=NUMBER_WORDS[len(objects)])
    if choice == "colour":
        kind = rng.choice(sorted(referents["kind"]))
        colour = objects[referents["kind"][kind]].colour
        return COLOUR_QUESTION.format(kind=kind), COLOUR_ANSWER.format(colour=colour)
    colour = rng.choice(sorted(referents["colour"]))
    kind = objects[referents["colour"][colour]].kind
    return KIND_QUESTION.format(colour=colour), KIND_ANSWER.format(kind=kind)


def _chance_iou(objects, target: int, image_size: int) -> float:
    """Mean IoU between the target's mask and each object's mask (a random pick's expected IoU)."""
    masks = [rasterize_mask([obj.polygon], [], image_size, image_size) == TARGET_LABEL for obj in objects]
    ious = [(masks[target] & mask).sum() / max((masks[target] | mask).sum(), 1) for mask in masks]
    return float(np.mean(ious))


def _check_task_mix(task_mix) -> dict:
    task_mix = DEFAULT_TASK_MIX if task_mix is None else dict(task_mix)
    allowed = SEGMENTATION_QUERY_TYPES + ("loc", "vqa")
    unknown = sorted(set(task_mix) - set(allowed))
    if unknown:
        raise ValueError(f"`task_mix` keys must be among {allowed}, got {unknown}.")
    if any(weight < 0 for weight in task_mix.values()) or sum(task_mix.values()) <= 0:
        raise ValueError(f"`task_mix` weights must be >= 0 with a positive sum, got {task_mix}.")
    return task_mix


def _png_bytes(image: PILImage.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _row(
    image,
    instruction,
    answer,
    *,
    query_type,
    chance_iou,
    source,
    sample_id,
    masks=(),
    ignore=None,
    boxes=(),
    is_sentence=False,
):
    """One schema row; `ignore` defaults to no ignore region per mask."""
    return {
        "image": image,
        "messages": [{"role": "user", "content": instruction}, {"role": "assistant", "content": answer}],
        "masks": [list(mask) for mask in masks],
        "ignore": [[] for _ in masks] if ignore is None else [list(region) for region in ignore],
        "boxes": [list(box) for box in boxes],
        "is_sentence": is_sentence,
        "query_type": query_type,
        "chance_iou": chance_iou,
        "source": source,
        "id": sample_id,
    }


def iter_synthetic_samples(
    num_samples: int,
    seed: int = 0,
    image_size: int = REFERENCE_IMAGE_SIZE,
    task_mix=None,
    include_scene: bool = False,
):
    """Yields synthetic rows (image as `{"bytes": png, "path": None}`); sample `i` depends only on `(seed, i)`.

    With `include_scene=True` each row also carries `"scene": (background, objects)`, for checks.
    """
    if not isinstance(num_samples, int) or num_samples < 0:
        raise ValueError(f"`num_samples` must be a non-negative int, got {num_samples!r}.")
    if not isinstance(image_size, int) or image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"`image_size` must be an int >= {MIN_IMAGE_SIZE}, got {image_size!r}.")
    task_mix = _check_task_mix(task_mix)
    task_types, task_weights = list(task_mix), list(task_mix.values())
    for index in range(num_samples):
        rng = random.Random(f"vsm-synthetic/{seed}/{index}")
        query_type = rng.choices(task_types, weights=task_weights)[0]
        for _ in range(MAX_SCENE_TRIES):  # redraw until the scene supports the query type
            background, objects = generate_scene(rng, image_size)
            referents = _unique_referents(objects, image_size)
            if query_type in ("loc", "vqa"):
                break
            query = _segmentation_query(rng, query_type, referents)
            if query is not None:
                break
        else:
            raise RuntimeError(f"No scene supported query type {query_type!r} in {MAX_SCENE_TRIES} tries.")

        image = {"bytes": _png_bytes(render_scene(background, objects, image_size)), "path": None}
        common = {"source": "synthetic", "sample_id": f"synthetic-{seed}-{index}", "query_type": query_type}
        if query_type == "loc":
            question, target = _loc_query(rng, objects, referents)
            answer = rng.choice(LOC_ANSWER_TEMPLATES)
            row = _row(image, question, answer, boxes=[objects[target].bbox], chance_iou=math.nan, **common)
        elif query_type == "vqa":
            question, answer = _vqa_query(rng, objects, referents)
            row = _row(image, question, answer, chance_iou=math.nan, **common)
        else:
            instruction, target, is_sentence = query
            row = _row(
                image,
                instruction,
                rng.choice(SEG_ANSWER_TEMPLATES),
                masks=[[list(objects[target].polygon)]],
                is_sentence=is_sentence,
                chance_iou=_chance_iou(objects, target, image_size),
                **common,
            )
        if include_scene:
            row["scene"] = (background, objects)
        yield row


def _dataset_from_rows(rows) -> Dataset:
    columns = {name: [] for name in FEATURES}
    for row in rows:
        for name in FEATURES:
            columns[name].append(row[name])
    return Dataset.from_dict(columns, features=FEATURES)


def make_synthetic_dataset(
    num_samples: int, seed: int = 0, image_size: int = REFERENCE_IMAGE_SIZE, task_mix=None
) -> Dataset:
    """Builds `num_samples` synthetic shape samples (deterministic by `seed`), in memory.

    Args:
        num_samples (`int`): number of rows.
        seed (`int`): sample `i` is drawn from `random.Random(f"vsm-synthetic/{seed}/{i}")`, so a
            smaller dataset is a prefix of a larger one with the same seed.
        image_size (`int`): square image side in pixels; object sizes scale with it.
        task_mix (`dict`, *optional*): weights over `colour`, `kind`, `position`, `size`, `sentence`,
            `loc`, `vqa` (normalised; missing keys get 0). Defaults to `DEFAULT_TASK_MIX`
            (70% segmentation spread evenly, 15% `<loc>`, 15% VQA).
    """
    return _dataset_from_rows(iter_synthetic_samples(num_samples, seed, image_size, task_mix))


def _canonical_split(split: str) -> str:
    split = SPLIT_ALIASES.get(split, split)
    if split not in SPLIT_INDEX:
        raise ValueError(f"`split` must be one of {sorted(SPLIT_INDEX) + sorted(SPLIT_ALIASES)}, got {split!r}.")
    return split


def load_synthetic(
    split: str = "train", num_samples: int | None = None, seed: int = 0, image_size: int = REFERENCE_IMAGE_SIZE
) -> Dataset:
    """The synthetic data of one split: splits draw from disjoint seeds `seed * 3 + {train: 0, validation: 1, test: 2}`.

    `num_samples` defaults to `DEFAULT_SPLIT_SIZES[split]` (20000 train, 500 validation / test).
    """
    split = _canonical_split(split)
    num_samples = DEFAULT_SPLIT_SIZES[split] if num_samples is None else num_samples
    return make_synthetic_dataset(num_samples, seed=seed * len(SPLIT_INDEX) + SPLIT_INDEX[split], image_size=image_size)


def synthetic_text_corpus() -> list:
    """Every instruction and answer template of the synthetic data and the ReasonSeg wrapping, filled
    with every word it can take: a deterministic corpus to train the tiny tokenizer on."""
    phrases = [p.format(colour=c) for p in COLOUR_PHRASES for c in COLOURS]
    phrases += [p.format(kind=k) for p in KIND_PHRASES for k in KINDS]
    phrases += [p for table in (POSITION_PHRASES, SIZE_PHRASES) for options in table.values() for p in options]
    phrases += [f"the {c} {k}" for c in COLOURS for k in KINDS]
    corpus = [t.format(query=p) for t in SHORT_QUESTION_TEMPLATES for p in phrases]
    corpus += [t.format(query=p) for t in LOC_QUESTION_TEMPLATES for p in phrases]
    descriptions = [d for table in SENTENCE_DESCRIPTIONS.values() for options in table.values() for d in options]
    sentences = [t.format(desc=d) for t in SENTENCE_TEMPLATES for d in descriptions]
    corpus += [t.format(query=s) for t in LONG_QUESTION_TEMPLATES for s in sentences]
    corpus += list(SEG_ANSWER_TEMPLATES) + list(LOC_ANSWER_TEMPLATES) + list(COUNT_QUESTIONS)
    corpus += [COUNT_ANSWER.format(count=word) for word in NUMBER_WORDS.values()]
    corpus += [COLOUR_QUESTION.format(kind=k) for k in KINDS] + [COLOUR_ANSWER.format(colour=c) for c in COLOURS]
    corpus += [KIND_QUESTION.format(colour=c) for c in COLOURS] + [KIND_ANSWER.format(kind=k) for k in KINDS]
    return corpus


# ----------------------------------------------------------------------------------------------
# Rasterisation


def _check_polygon(polygon, name: str) -> np.ndarray:
    points = np.asarray(polygon, dtype=np.float64).reshape(-1)
    if points.size % 2:
        raise ValueError(f"{name} must be a flat [x0, y0, x1, y1, ...] list, got {points.size} values.")
    if points.size < 6:
        raise ValueError(f"{name} needs at least 3 points, got {points.size // 2}.")
    if not np.isfinite(points).all():
        raise ValueError(f"{name} has non-finite coordinates.")
    return points


def rasterize_mask(polygons, ignore_polygons, height: int, width: int, scale=1.0) -> np.ndarray:
    """Draws one mask: 1 inside `polygons`, 255 (`IGNORE_LABEL`) inside `ignore_polygons` (ignore wins), 0 elsewhere.

    Args:
        polygons, ignore_polygons: lists of flat `[x0, y0, x1, y1, ...]` polygons in pixels.
        height, width (`int`): the output frame.
        scale (`float` or `(scale_x, scale_y)`): coordinates are multiplied by it first, to draw
            original-pixel polygons into a resized frame.

    Returns:
        `np.ndarray` of uint8, (H, W).
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"`height` and `width` must be positive ints, got {height} and {width}.")
    scale_x, scale_y = (scale, scale) if np.isscalar(scale) else scale
    canvas = PILImage.new("L", (int(width), int(height)), 0)
    draw = ImageDraw.Draw(canvas)
    for label, group, name in ((TARGET_LABEL, polygons, "polygon"), (IGNORE_LABEL, ignore_polygons, "ignore polygon")):
        for polygon in group:
            points = _check_polygon(polygon, name).reshape(-1, 2) * (scale_x, scale_y)  # (P, 2)
            draw.polygon(points.reshape(-1).tolist(), fill=label)
    return np.asarray(canvas, dtype=np.uint8)  # (H, W)


# ----------------------------------------------------------------------------------------------
# ReasonSeg (LISA) format

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")
EXPORT_JPEG_QUALITY = 95
REASONSEG_REQUIRED_KEYS = ("text", "is_sentence", "shapes")


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
    """Parses one ReasonSeg JSON into `(queries, is_sentence, targets, ignores, image bytes)`; raises ValueError."""
    raw = json_path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("cp1252")  # as LISA's reader falls back to
    try:
        annotation = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"invalid JSON ({error})") from None
    if not isinstance(annotation, dict):
        raise ValueError("the JSON is not an object")
    missing = [key for key in REASONSEG_REQUIRED_KEYS if key not in annotation]
    if missing:
        raise ValueError(f"missing keys {missing}")
    queries = [annotation["text"]] if isinstance(annotation["text"], str) else annotation["text"]
    if not isinstance(queries, list) or not queries or not all(isinstance(q, str) and q.strip() for q in queries):
        raise ValueError("`text` must be a non-empty list of non-empty strings")

    targets, ignores = [], []
    for k, shape in enumerate(annotation["shapes"]):
        label = str(shape.get("label", "")).lower() if isinstance(shape, dict) else ""
        if label == "flag":  # LISA: meaningless deprecated annotations
            continue
        try:
            points = np.asarray(shape["points"], dtype=np.float64)  # (P, 2)
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"shape {k} has no readable `points`") from None
        if points.ndim != 2 or points.shape[1] != 2:
            raise ValueError(f"shape {k} `points` must be [[x, y], ...], got shape {points.shape}")
        if len(points) < 3:
            raise ValueError(f"shape {k} has {len(points)} points, fewer than 3")
        if not np.isfinite(points).all():
            raise ValueError(f"shape {k} has NaN or infinite coordinates")
        (ignores if "ignore" in label else targets).append(points.reshape(-1).tolist())

    candidates = [json_path.with_suffix(ext) for ext in IMAGE_EXTENSIONS]
    image_path = next((candidate for candidate in candidates if candidate.is_file()), None)
    if image_path is None:
        raise ValueError(f"no image {json_path.stem}{{{','.join(IMAGE_EXTENSIONS)}}}")
    image_bytes = image_path.read_bytes()
    try:
        with PILImage.open(io.BytesIO(image_bytes)) as image:
            image.load()
    except Exception as error:  # PIL raises many types for broken files
        raise ValueError(f"unreadable image {image_path.name} ({type(error).__name__})") from None
    return queries, bool(annotation["is_sentence"]), targets, ignores, image_bytes


def load_reasonseg(path, answer_templates=SEG_ANSWER_TEMPLATES, seed: int = 0) -> Dataset:
    """Reads a ReasonSeg folder (`*.json` + same-stem `.jpg`/`.png`/`.jpeg`): one sample per query.

    Short phrases become "What is {query} in this image? Please output segmentation mask.", sentences
    get " Please output segmentation mask." appended (LISA). All target polygons of a file form one
    mask; labels containing "ignore" go to `ignore`. A broken file (invalid JSON, missing keys, missing
    or unreadable image, a polygon with < 3 points or NaN coordinates) is skipped with a warning.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"ReasonSeg folder not found: {str(path)!r}")
    answer_templates = tuple(answer_templates)
    if not answer_templates or any(t.count(SEG_TOKEN) != 1 for t in answer_templates):
        raise ValueError(
            f"`answer_templates` must be non-empty strings with exactly one {SEG_TOKEN}, got {answer_templates}."
        )
    rng = random.Random(seed)
    json_paths = sorted(folder.glob("*.json"))
    rows, skipped = [], 0
    for json_path in json_paths:
        try:
            queries, is_sentence, targets, ignores, image_bytes = _read_reasonseg_json(json_path)
        except (ValueError, OSError) as error:
            logger.warning("Skipping ReasonSeg file %s: %s.", json_path, error)
            skipped += 1
            continue
        image = {"bytes": image_bytes, "path": None}
        for k, query in enumerate(queries):
            query = query.strip()
            template = REASONSEG_LONG_TEMPLATE if is_sentence else REASONSEG_SHORT_TEMPLATE
            rows.append(
                _row(
                    image,
                    template.format(query=query),
                    rng.choice(answer_templates),
                    masks=[targets],
                    ignore=[ignores],
                    is_sentence=is_sentence,
                    query_type="reasonseg",
                    chance_iou=math.nan,
                    source="reasonseg",
                    sample_id=f"reasonseg-{json_path.stem}-{k}",
                )
            )
    if skipped:
        logger.warning("ReasonSeg %s: skipped %d of %d JSON files.", folder, skipped, len(json_paths))
    if not rows:
        raise ValueError(
            f"No usable ReasonSeg sample in {str(path)!r} ({len(json_paths)} JSON files, {skipped} skipped)."
        )
    return _dataset_from_rows(rows)


# ----------------------------------------------------------------------------------------------
# Data specs


def _load_synthetic_spec(argument, split, seed, num_samples, image_size):
    if argument:
        raise ValueError(f"The `synthetic` data spec takes no argument, got 'synthetic:{argument}'.")
    return load_synthetic(split, num_samples=num_samples, seed=seed, image_size=image_size)


def _load_reasonseg_spec(argument, split, seed, num_samples, image_size):
    if not argument:
        raise ValueError("The `reasonseg` data spec needs a folder: 'reasonseg:PATH'.")
    folder = Path(argument)
    for name in (split, SPLIT_ALIASES.get(split, split), *(alias for alias, s in SPLIT_ALIASES.items() if s == split)):
        if (folder / name).is_dir():
            folder = folder / name
            break
    dataset = load_reasonseg(folder, seed=seed)
    return dataset if num_samples is None else dataset.select(range(min(num_samples, len(dataset))))


# prefix -> loader(argument, split, seed, num_samples, image_size); add refcoco / llava here.
DATA_SPEC_LOADERS = {"synthetic": _load_synthetic_spec, "reasonseg": _load_reasonseg_spec}
DATA_SPEC_SEPARATOR = "+"


def load_data_spec(
    spec: str,
    split: str = "train",
    seed: int = 0,
    num_samples: int | None = None,
    image_size: int = REFERENCE_IMAGE_SIZE,
) -> Dataset:
    """Loads a data spec: `synthetic`, `reasonseg:PATH` (uses `PATH/<split>` when it exists), or
    `spec1+spec2` (concatenated; `num_samples` applies to each part)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"`spec` must be a non-empty string such as 'synthetic', got {spec!r}.")
    parts = []
    for part in spec.split(DATA_SPEC_SEPARATOR):
        prefix, _, argument = part.strip().partition(":")
        if prefix not in DATA_SPEC_LOADERS:
            raise ValueError(f"Unknown data spec {part!r} in {spec!r}: known prefixes are {sorted(DATA_SPEC_LOADERS)}.")
        dataset = DATA_SPEC_LOADERS[prefix](argument, split, seed, num_samples, image_size)
        parts.append(dataset if dataset.features == FEATURES else dataset.cast(FEATURES))
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)
