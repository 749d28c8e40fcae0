"""Masks: drawing a mask from polygons and COCO RLEs (`rasterize_mask`, `sample_mask`), COCO run-length encoding
through pycocotools, and the polygon checks of the annotation readers (`polygon_problem`)."""

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
# COCO run-length encoding (RLE), through pycocotools (the format's reference implementation)


def _pycocotools_mask():
    try:
        from pycocotools import mask as coco_mask
    except ImportError as error:  # a dependency of the data side (`pip install -e .`); remote code never needs it
        raise ImportError("COCO RLE masks need pycocotools: pip install pycocotools") from error
    return coco_mask


def rle_encode(mask) -> dict:
    """(h, w) mask -> COCO RLE with compressed counts (a str)."""
    encoded = _pycocotools_mask().encode(np.asfortranarray(np.asarray(mask).astype(bool).astype(np.uint8)))
    return {"size": [int(v) for v in encoded["size"]], "counts": encoded["counts"].decode("ascii")}


def rle_decode(rle) -> np.ndarray:
    """A COCO RLE (`{"size": [h, w], "counts": str or [int, ...]}`) -> (h, w) uint8 mask of 0 / 1.

    The counts must cover exactly h x w pixels. pycocotools refuses counts past the end but leaves a short mask's
    tail undefined, so a compressed string is checked by encoding the decoded mask again: the string must come back
    (COCO's encoders, pycocotools' included, write exactly that one string for a mask).
    """
    coco_mask = _pycocotools_mask()
    height, width = (int(v) for v in rle["size"])
    counts = rle["counts"]
    counts = counts.decode("ascii") if isinstance(counts, bytes) else counts
    if not isinstance(counts, str):
        counts = np.asarray(counts, dtype=np.int64)
        if (counts < 0).any() or counts.sum() != height * width:
            raise ValueError(f"RLE counts cover {int(counts.sum())} pixels (or are negative); the size "
                             f"{height}x{width} needs {height * width}")
        encoded = coco_mask.frPyObjects({"size": [height, width], "counts": counts.tolist()}, height, width)
        return coco_mask.decode(encoded)
    try:
        decoded = coco_mask.decode({"size": [height, width], "counts": counts.encode("ascii")})
    except (ValueError, UnicodeEncodeError) as error:
        raise ValueError(f"RLE counts {counts[:40]!r} are not a COCO RLE of a {height}x{width} mask ({error})") from None
    if decoded.max(initial=0) > 1 or rle_encode(decoded)["counts"] != counts:
        raise ValueError(f"RLE counts {counts[:40]!r} do not cover the {height}x{width} pixels exactly")
    return decoded


def compress_rle(rle, height: int, width: int) -> dict:
    """Checks a COCO RLE against its image size and returns it with compressed `counts`."""
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise ValueError("an RLE must be a dict with `size` and `counts`")
    if [int(v) for v in rle["size"]] != [height, width]:
        raise ValueError(f"RLE size {list(rle['size'])} differs from the image size {[height, width]}")
    counts = rle["counts"].decode("ascii") if isinstance(rle["counts"], bytes) else rle["counts"]
    decoded = rle_decode({"size": [height, width], "counts": counts})  # validates the counts
    return {"size": [height, width], "counts": counts if isinstance(counts, str) else rle_encode(decoded)["counts"]}


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
