"""Masks: drawing a mask from polygons and COCO RLEs (`rasterize_mask`, `sample_mask`), COCO run-length encoding
without pycocotools, and the polygon checks of the annotation readers (`polygon_problem`)."""

import numpy as np
from PIL import Image as PILImage
from PIL import ImageDraw

from .schema import IGNORE_LABEL, TARGET_LABEL


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


def rasterize_mask(polygons, ignore_polygons, height: int, width: int, scale=1.0, rles=()) -> np.ndarray:
    """Draws one mask: 1 inside `polygons` and `rles`, 255 (`IGNORE_LABEL`) inside `ignore_polygons` (ignore
    wins), 0 elsewhere.

    Args:
        polygons, ignore_polygons: lists of flat `[x0, y0, x1, y1, ...]` polygons in pixels.
        height, width (`int`): the output frame.
        scale (`float` or `(scale_x, scale_y)`): coordinates are multiplied by it first, to draw
            original-pixel polygons into a resized frame.
        rles: COCO RLEs (`{"size": [h, w], "counts": ...}`) of the original image; each is decoded,
            resized by `scale` (nearest) and pasted at the top-left of the frame, as the image is.

    Returns:
        `np.ndarray` of uint8, (H, W).
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"`height` and `width` must be positive ints, got {height} and {width}.")
    scale_x, scale_y = (scale, scale) if np.isscalar(scale) else scale
    canvas = PILImage.new("L", (int(width), int(height)), 0)
    for rle in rles:
        decoded = rle_decode(rle)  # (h, w)
        size = (max(1, round(decoded.shape[1] * scale_x)), max(1, round(decoded.shape[0] * scale_y)))
        stencil = PILImage.fromarray(decoded * np.uint8(255)).resize(size, PILImage.NEAREST)
        canvas.paste(TARGET_LABEL, (0, 0), mask=stencil)
    draw = ImageDraw.Draw(canvas)
    for label, group, name in ((TARGET_LABEL, polygons, "polygon"), (IGNORE_LABEL, ignore_polygons, "ignore polygon")):
        for polygon in group:
            points = _check_polygon(polygon, name).reshape(-1, 2) * (scale_x, scale_y)  # (P, 2)
            draw.polygon(points.reshape(-1).tolist(), fill=label)
    return np.asarray(canvas, dtype=np.uint8)  # (H, W)


def sample_mask(sample: dict, index: int, height: int, width: int, scale=1.0) -> np.ndarray:
    """Draws the mask of the `index`-th `<SEG>` of a schema row (its polygons, RLEs and ignore polygons);
    `height`, `width` and `scale` as in `rasterize_mask`. Returns uint8 (H, W) of 0 / 1 / 255."""
    def entry(column):
        values = sample.get(column) or []
        return values[index] if index < len(values) else []

    return rasterize_mask(entry("masks"), entry("ignore"), height, width, scale=scale, rles=entry("mask_rles"))


# ----------------------------------------------------------------------------------------------
# COCO run-length encoding (RLE), without pycocotools

RLE_CHAR_OFFSET = 48  # counts are written as ASCII 48..111, 5 data bits per char
RLE_MORE_BIT, RLE_SIGN_BIT, RLE_DATA_BITS = 0x20, 0x10, 5
RLE_DELTA_FROM = 3  # from the 4th run on, a count is stored as the difference to the count two runs back


def rle_string_to_counts(counts: str) -> list[int]:
    """Decodes COCO's compressed RLE string (`maskApi.c`'s LEB128-like format) into run lengths."""
    values, position = [], 0
    while position < len(counts):
        value, shift, more = 0, 0, True
        while more:
            if position >= len(counts):
                raise ValueError("truncated compressed RLE string")
            char = ord(counts[position]) - RLE_CHAR_OFFSET
            if not 0 <= char < 2 * RLE_MORE_BIT:
                raise ValueError(f"invalid character {counts[position]!r} in a compressed RLE string")
            value |= (char & (RLE_MORE_BIT - 1)) << shift
            more = bool(char & RLE_MORE_BIT)
            position, shift = position + 1, shift + RLE_DATA_BITS
            if not more and char & RLE_SIGN_BIT:
                value -= 1 << shift  # sign-extend
        if len(values) >= RLE_DELTA_FROM:
            value += values[-2]
        values.append(value)
    return values


def rle_counts_to_string(counts) -> str:
    """Encodes run lengths as COCO's compressed RLE string (the inverse of `rle_string_to_counts`)."""
    chars = []
    for index, count in enumerate(counts):
        value = int(count) - (int(counts[index - 2]) if index >= RLE_DELTA_FROM else 0)
        more = True
        while more:
            char = value & (RLE_MORE_BIT - 1)
            value >>= RLE_DATA_BITS
            more = value != -1 if char & RLE_SIGN_BIT else value != 0
            chars.append(chr((char | (RLE_MORE_BIT if more else 0)) + RLE_CHAR_OFFSET))
    return "".join(chars)


def rle_decode(rle) -> np.ndarray:
    """A COCO RLE (`{"size": [h, w], "counts": str or [int, ...]}`) -> (h, w) uint8 mask of 0 / 1.

    Runs alternate 0, 1, 0, ... (the first counts zeros) over the pixels in column-major order.
    """
    height, width = (int(v) for v in rle["size"])
    counts = rle["counts"]
    counts = rle_string_to_counts(counts) if isinstance(counts, str) else [int(c) for c in counts]
    if any(c < 0 for c in counts) or sum(counts) != height * width:
        raise ValueError(
            f"RLE counts cover {sum(counts)} pixels (or are negative); the size {height}x{width} needs {height * width}"
        )
    values = np.arange(len(counts)) % 2  # 0, 1, 0, ...
    return np.repeat(values.astype(np.uint8), counts).reshape(width, height).T  # (h, w)


def rle_encode(mask) -> dict:
    """(h, w) mask -> COCO RLE with compressed counts."""
    mask = np.asarray(mask).astype(bool)
    pixels = mask.flatten(order="F")
    changes = np.flatnonzero(pixels[1:] != pixels[:-1]) + 1
    bounds = np.concatenate([[0], changes, [pixels.size]])
    counts = np.diff(bounds).tolist()
    if pixels.size and pixels[0]:
        counts = [0] + counts  # runs start with zeros
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": rle_counts_to_string(counts)}


def compress_rle(rle, height: int, width: int) -> dict:
    """Checks a COCO RLE against its image size and returns it with compressed `counts`."""
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise ValueError("an RLE must be a dict with `size` and `counts`")
    if [int(v) for v in rle["size"]] != [height, width]:
        raise ValueError(f"RLE size {list(rle['size'])} differs from the image size {[height, width]}")
    counts = rle["counts"].decode("ascii") if isinstance(rle["counts"], bytes) else rle["counts"]
    rle_decode({"size": [height, width], "counts": counts})  # validates the counts
    return {"size": [height, width], "counts": counts if isinstance(counts, str) else rle_counts_to_string(counts)}


# ----------------------------------------------------------------------------------------------
# Polygon checks of the annotation readers


def polygon_problem(points, height: int | None = None, width: int | None = None) -> str | None:
    """What is wrong with a polygon (flat or `[[x, y], ...]`) for a (height, width) image, or None.

    Fewer than 3 points, NaN / infinite coordinates, or lying entirely outside the image are problems;
    a polygon that crosses the border is fine (drawing clips it).
    """
    try:
        flat = np.asarray(points, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        return "unreadable points"
    if flat.size % 2:
        return f"an odd number of coordinates ({flat.size})"
    if flat.size < 6:
        return f"{flat.size // 2} points, fewer than 3"
    if not np.isfinite(flat).all():
        return "NaN or infinite coordinates"
    if height is not None and width is not None:
        xs, ys = flat[0::2], flat[1::2]
        if xs.max() < 0 or ys.max() < 0 or xs.min() > width or ys.min() > height:
            return f"entirely outside the {width}x{height} image"
    return None
