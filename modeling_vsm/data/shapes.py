"""The shapes of the synthetic data: colours, kinds and their polygons, shared by the small scenes (`synthetic`) and
the large search canvases (`highres`)."""

import math

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 230),
    "yellow": (235, 210, 40),
}
KINDS = ("circle", "square", "triangle")
BACKGROUND_COLOURS = ((45, 45, 45), (38, 46, 58), (56, 50, 42), (42, 54, 46))  # dark grey + muted
BACKGROUND_JITTER = 8  # per-channel, per image
CIRCLE_VERTICES = 24
# Circumradius / size: circle diameter, square side, equilateral triangle side.
SHAPE_REACH = {"circle": 0.5, "square": 1 / math.sqrt(2), "triangle": 1 / math.sqrt(3)}
MAX_ROTATION_DEGREES = 15.0  # squares and triangles
POLYGON_DECIMALS = 2


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
