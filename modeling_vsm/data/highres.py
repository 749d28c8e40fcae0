"""Large canvases for visual search: one small target among lookalike distractors on a 256-1024 px canvas
(`generate_highres_scene`), the search's geometry (`split_patch`, `leaf_side`, `search_patches`), and the training
rows that teach a VSM to search (`search_row`).

A search row is one patch of a canvas at some level of the search tree, asked SEAL's question "Please locate the
{target} in this image.". When the patch holds the target, the answer's `<loc>` has its box (or its `<SEG>` its
mask: the target cue the search follows); when it does not, the box is `ABSENT_BOX` / the mask is empty, so the box heads
learn that a low score means "not here" and the mask stays dark.
"""

import math
import random
from dataclasses import dataclass

from PIL import Image as PILImage
from PIL import ImageDraw

from .schema import ABSENT_BOX
from .shapes import BACKGROUND_COLOURS, COLOURS, KINDS, MAX_ROTATION_DEGREES, SHAPE_REACH, _shape_polygon

HIGHRES_SIDES = (256, 1024)  # canvas side range, pixels
TARGET_FRACTION = (0.02, 0.08)  # the target's extent over the canvas's short side
SMALL_TARGET_FRACTION = 0.05  # "small": short side <= 5% of the canvas's short side
DISTRACTORS = (3, 8)
DISTRACTOR_FRACTION = (0.02, 0.15)
PLACEMENT_TRIES = 200
# The search's split and leaf rule (SEAL's `visual_search.py`): 4 sub-patches, in rows or columns when one side is at
# least twice the other; a patch whose short side is <= max(ceil(min(W, H) / 4), the minimum) is a leaf. SEAL's
# minimum is its CLIP input (224); a model whose input is under half of that uses twice its input.
SPLIT_ASPECT = 2.0
LEAF_SIZE_SCALE = 4.0
SEAL_INPUT_SIZE = 224
SEARCH_LOCATE_TEMPLATE = "Please locate the {} in this image."
SEARCH_LOC_ANSWER = "It is at <loc>."  # the box of the search's patch
SEARCH_SEG_ANSWER = "It is <SEG>."  # the target cue: where in the patch the target is
SEARCH_PRESENT_SHARE = 0.5  # rows whose patch holds the target
SEARCH_SEG_SHARE = 0.4  # rows that answer with the target cue (<SEG>) instead of the box (<loc>)
PRESENT_FRACTION = 0.5  # a patch holds the target when at least this share of its box lies inside
# A `<loc>` row says "here" only where the target's short side spans at least this many pixels of the model's input;
# a patch holding a target drawn smaller (the whole canvas, for a small target) is a "not here, look closer" row, so
# the search does not stop on a lookalike dot at the top levels and goes down to where the target can be seen.
MIN_VISIBLE_PIXELS = 4.0
# Most patches without the target are empty background, which teaches "any shape is it": the search then stopped on a
# lookalike (same colour or same kind) in 36 of 44 small-target searches. This share of the rows without the target
# shows a lookalike drawn big enough to see, where the patches allow.
HARD_NEGATIVE_SHARE = 0.75
RENDER_SCALE = 2  # a patch is drawn with its long side at most 2x the model's input; the processor brings it down


def split_patch(box) -> list[tuple]:
    """4 non-overlapping sub-patches of `box` (x0, y0, x1, y1): 2x2, or 4 rows / 4 columns when one side is >= twice
    the other; the last row (column) takes the remainder."""
    x0, y0, x1, y1 = box
    width, height = x1 - x0, y1 - y0
    columns, rows = (1, 4) if height >= SPLIT_ASPECT * width else (4, 1) if width >= SPLIT_ASPECT * height else (2, 2)
    step_x, step_y = width // columns, height // rows
    patches = []
    for row in range(rows):
        for column in range(columns):
            left, top = x0 + column * step_x, y0 + row * step_y
            right = x1 if column == columns - 1 else left + step_x
            bottom = y1 if row == rows - 1 else top + step_y
            patches.append((left, top, right, bottom))
    return patches


def leaf_side(width: int, height: int, input_size: int, minimum_size: int | None = None,
              scale: float = LEAF_SIZE_SCALE) -> int:
    """The short side at or under which a patch of a (width, height) image is a leaf of the search."""
    minimum = minimum_size or (SEAL_INPUT_SIZE if 2 * input_size >= SEAL_INPUT_SIZE else 2 * input_size)
    return max(math.ceil(min(width, height) / scale), minimum)


def search_patches(width: int, height: int, leaf: int) -> list[tuple]:
    """Every patch the search could visit, as (box, level): the root (level 1) and the splits down to the leaves."""
    patches, frontier = [], [((0, 0, width, height), 1)]
    while frontier:
        box, level = frontier.pop()
        patches.append((box, level))
        if min(box[2] - box[0], box[3] - box[1]) > leaf:
            frontier += [(child, level + 1) for child in split_patch(box)]
    return patches


@dataclass(frozen=True)
class HighresScene:
    """A canvas: its size, background and shapes `((colour, kind, polygon), ...)`, the target first."""

    width: int
    height: int
    background: tuple
    shapes: tuple

    @property
    def target(self) -> str:
        colour, kind, _ = self.shapes[0]
        return f"{colour} {kind}"

    @property
    def target_box(self) -> list:
        return polygon_box(self.shapes[0][2])

    @property
    def distractor_boxes(self) -> list:
        return [polygon_box(polygon) for _, _, polygon in self.shapes[1:]]

    @property
    def is_small(self) -> bool:
        x0, y0, x1, y1 = self.target_box
        return min(x1 - x0, y1 - y0) <= SMALL_TARGET_FRACTION * min(self.width, self.height)

    def render(self, box=None, max_side: int | None = None) -> tuple[PILImage.Image, float]:
        """The patch `box` (default: the whole canvas) drawn with its long side at most `max_side`; (image, scale)."""
        x0, y0, x1, y1 = box or (0, 0, self.width, self.height)
        scale = min(1.0, max_side / max(x1 - x0, y1 - y0)) if max_side else 1.0
        image = PILImage.new("RGB", (max(1, round((x1 - x0) * scale)), max(1, round((y1 - y0) * scale))), self.background)
        draw = ImageDraw.Draw(image)
        for colour, _, polygon in self.shapes:
            draw.polygon(to_patch(polygon, (x0, y0), scale), fill=COLOURS[colour])
        return image, scale


def polygon_box(polygon) -> list:
    """[x0, y0, x1, y1] around a flat polygon [x0, y0, x1, y1, ...]."""
    xs, ys = polygon[0::2], polygon[1::2]
    return [min(xs), min(ys), max(xs), max(ys)]


def to_patch(polygon, origin, scale: float) -> list:
    """A flat canvas polygon in the pixels of a patch whose top-left is `origin`, drawn at `scale`."""
    return [(value - origin[index % 2]) * scale for index, value in enumerate(polygon)]


def generate_highres_scene(rng: random.Random) -> HighresScene:
    """A canvas of 256-1024 px a side with one small target (a colour and kind no distractor has; its extent 2-8% of
    the short side) among 3-8 distractors that share its colour or its kind."""
    width, height = (rng.randint(*HIGHRES_SIDES) for _ in range(2))
    short = min(width, height)
    colour, kind = rng.choice(list(COLOURS)), rng.choice(KINDS)
    lookalikes = [(c, k) for c in COLOURS for k in KINDS if (c == colour) != (k == kind)]
    wanted = [(colour, kind, rng.uniform(*TARGET_FRACTION))]
    wanted += [(*rng.choice(lookalikes), rng.uniform(*DISTRACTOR_FRACTION)) for _ in range(rng.randint(*DISTRACTORS))]
    shapes, placed = [], []
    for shape_colour, shape_kind, fraction in wanted:
        size = fraction * short
        reach = SHAPE_REACH[shape_kind] * size
        for _ in range(PLACEMENT_TRIES):
            cx, cy = rng.uniform(reach, width - reach), rng.uniform(reach, height - reach)
            if all(math.dist((cx, cy), centre) > reach + other for centre, other in placed):
                angle = 0.0 if shape_kind == "circle" else math.radians(rng.uniform(-1, 1) * MAX_ROTATION_DEGREES)
                shapes.append((shape_colour, shape_kind, _shape_polygon(shape_kind, cx, cy, size, angle)))
                placed.append(((cx, cy), reach))
                break
    return HighresScene(width, height, rng.choice(BACKGROUND_COLOURS), tuple(shapes))


def share_inside(box, patch) -> float:
    """The share of `box`'s area inside `patch` (both x0, y0, x1, y1)."""
    width = min(box[2], patch[2]) - max(box[0], patch[0])
    height = min(box[3], patch[3]) - max(box[1], patch[1])
    area = (box[2] - box[0]) * (box[3] - box[1])
    return max(width, 0) * max(height, 0) / area if area > 0 else 0.0


def visible_size(target_box, patch, image_size: int) -> float:
    """The target's short side in pixels of the model's input when `patch` is brought down to it (longest side)."""
    short = min(target_box[2] - target_box[0], target_box[3] - target_box[1])
    return short * image_size / max(patch[2] - patch[0], patch[3] - patch[1])


def search_row(rng: random.Random, image_size: int) -> dict:
    """One training row of the search (module docstring): `image` (PIL), `instruction`, `answer`, and the answer's
    `masks` or `boxes` (pixels of the image; an empty mask `[[]]` or `[ABSENT_BOX]` when the patch does not hold
    the target, and for a box also when the target is drawn under `MIN_VISIBLE_PIXELS` there)."""
    scene = generate_highres_scene(rng)
    target_box, distractor_boxes = scene.target_box, scene.distractor_boxes
    patches = search_patches(scene.width, scene.height, leaf_side(scene.width, scene.height, image_size))
    holding = [(box, level) for box, level in patches if share_inside(target_box, box) >= PRESENT_FRACTION]
    without = [(box, level) for box, level in patches if share_inside(target_box, box) == 0.0]
    answers_mask = rng.random() < SEARCH_SEG_SHARE
    if not answers_mask:  # the target cue points wherever the target is; a box only where it can be seen
        seen = [(box, level) for box, level in holding if visible_size(target_box, box, image_size) >= MIN_VISIBLE_PIXELS]
        without = without + [patch for patch in holding if patch not in seen]
        holding = seen
    present = bool(holding) and (not without or rng.random() < SEARCH_PRESENT_SHARE)
    candidates = holding if present else without
    if not present:
        lookalikes = [(patch, level) for patch, level in without if any(
            share_inside(box, patch) >= PRESENT_FRACTION and visible_size(box, patch, image_size) >= MIN_VISIBLE_PIXELS
            for box in distractor_boxes)]
        if lookalikes and rng.random() < HARD_NEGATIVE_SHARE:
            candidates = lookalikes
    level = rng.choice(sorted({level for _, level in candidates}))  # every level as often
    box = rng.choice([patch for patch, patch_level in candidates if patch_level == level])
    image, scale = scene.render(box, RENDER_SCALE * image_size)
    row = {"image": image, "instruction": SEARCH_LOCATE_TEMPLATE.format(scene.target)}
    if answers_mask:
        polygon = to_patch(scene.shapes[0][2], box[:2], scale)
        row.update(answer=SEARCH_SEG_ANSWER, masks=[[polygon] if present else []])
    else:
        x0, y0, x1, y1 = to_patch(target_box, box[:2], scale)
        clipped = [max(x0, 0), max(y0, 0), min(x1, image.width), min(y1, image.height)]  # on the drawn patch
        row.update(answer=SEARCH_LOC_ANSWER, boxes=[clipped if present else ABSENT_BOX])
    return row
