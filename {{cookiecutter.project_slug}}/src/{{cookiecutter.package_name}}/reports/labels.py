"""Where point labels go on a laid-out figure: near their point, over nothing already drawn.

`place_labels` tries offsets around each anchor, nearest first, and keeps the first where the
text stays inside the axes and overlaps no line, error bar, marker (`Obstacles`) or earlier
label; farther offsets get a leader line back to the point, which must cross no marker, label or
other leader. A label with no free place is left out rather than drawn over the data. Everything
is measured in pixels, so it runs after the layout is final.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import product

import numpy as np
from matplotlib.axes import Axes
from matplotlib.cbook import STEP_LOOKUP_MAP
from matplotlib.collections import LineCollection, PathCollection
from matplotlib.text import Annotation, Text
from matplotlib.transforms import Bbox

# Offsets (points) tried for a label, nearest first: beside the point, then farther out with a
# leader line back to it. The text's alignment makes it grow away from the point.
_DIRECTIONS = [(1, 1), (1, -1), (-1, 1), (-1, -1), (0, 1), (0, -1), (1, 0), (-1, 0)]
_RADII = [(4, False), (9, False), (20, True), (32, True), (46, True)]


def place_labels(
    ax: Axes, anchors: Sequence[tuple[float, float]], texts: Sequence[str], fontsize: float = 8
) -> list[Annotation]:
    """Each text near its anchor (data coordinates), in the given order of importance.

    A text goes to the first offset where it stays inside the axes and covers nothing drawn
    (`Obstacles`) and no label placed before it, and where its leader line (farther out) passes
    no marker, label or other leader; a text with no such offset is left out. Call once the
    figure is laid out (`fig.draw_without_rendering()`): placement is in pixels.
    """
    renderer = ax.figure.canvas.get_renderer()
    inside = ax.get_window_extent(renderer)
    obstacles = Obstacles(ax)
    placed: list[Annotation] = []
    leaders: list[np.ndarray] = []
    for (x, y), text in zip(anchors, texts, strict=True):
        anchor = ax.transData.transform((x, y))
        for (radius, leader), (dx, dy) in product(_RADII, _DIRECTIONS):
            scale = radius / math.hypot(dx, dy)
            label = ax.annotate(
                text,
                (x, y),
                xytext=(dx * scale, dy * scale),
                textcoords="offset points",
                ha={1: "left", 0: "center", -1: "right"}[dx],
                va={1: "bottom", 0: "center", -1: "top"}[dy],
                fontsize=fontsize,
                zorder=5,
                arrowprops={"arrowstyle": "-", "color": "0.4", "lw": 0.6, "shrinkA": 1, "shrinkB": 5}
                if leader
                else None,
            )
            label.set_in_layout(False)
            label.update_positions(renderer)
            box = Text.get_window_extent(label, renderer)  # the text alone, not its leader line
            line = _leader(anchor, box) if leader else np.empty((0, 2))
            fits = inside.contains(box.x0, box.y0) and inside.contains(box.x1, box.y1) and not obstacles.hit(box)
            if fits and leader:
                fits = not obstacles.covers(line) and not (len(line) and _crosses(line[0], line[-1], leaders))
            if fits:
                placed.append(label)
                obstacles.add(box, line)
                if len(line):
                    leaders.append(line[[0, -1]])
                break
            label.remove()
    return placed


class Obstacles:
    """Where the axes already show something, in pixels: points along every line and error bar,
    and boxes around every marker. Labels must stay off all of it."""

    def __init__(self, ax: Axes, spacing: float = 2.0):
        points, boxes = [np.empty((0, 2))], [np.empty((0, 4))]
        for line in ax.lines:
            steps = STEP_LOOKUP_MAP[line.get_drawstyle()]  # a step line's corners, as drawn
            xy = line.get_transform().transform(np.column_stack(steps(*line.get_xydata().T)))
            if line.get_linestyle() not in ("None", "", " "):
                points.append(_along(xy, spacing))
            if line.get_marker() not in (None, "None", "", " "):
                boxes.append(_squares(xy, line.get_markersize() * ax.figure.dpi / 72))
        for collection in ax.collections:
            if isinstance(collection, LineCollection):
                for segment in collection.get_segments():
                    points.append(_along(collection.get_transform().transform(segment), spacing))
            elif isinstance(collection, PathCollection):  # scatter: sizes are areas in points^2
                xy = collection.get_offset_transform().transform(collection.get_offsets())
                sizes = np.broadcast_to(np.sqrt(collection.get_sizes()) * ax.figure.dpi / 72, len(xy))
                boxes += [_squares(xy[i : i + 1], sizes[i]) for i in range(len(xy))]
        self.points, self.boxes = np.concatenate(points), np.concatenate(boxes)

    def hit(self, box: Bbox, margin: float = 1.0) -> bool:
        """Whether the box (grown by `margin` pixels) touches a line or overlaps a box."""
        x0, y0, x1, y1 = box.x0 - margin, box.y0 - margin, box.x1 + margin, box.y1 + margin
        b = self.boxes
        crossed = (b[:, 0] <= x1) & (b[:, 2] >= x0) & (b[:, 1] <= y1) & (b[:, 3] >= y0)
        return bool(_inside(self.points, np.array([[x0, y0, x1, y1]])).any() or crossed.any())

    def covers(self, points: np.ndarray) -> bool:
        """Whether any of the pixel points [K, 2] lies in a marker or label box."""
        return bool(_inside(points, self.boxes).any())

    def add(self, box: Bbox, leader: np.ndarray) -> None:
        self.boxes = np.concatenate([self.boxes, [[box.x0, box.y0, box.x1, box.y1]]])
        self.points = np.concatenate([self.points, leader])


def _leader(anchor: np.ndarray, box: Bbox, spacing: float = 2.0, clear: float = 8.0) -> np.ndarray:
    """Pixel points along a leader line from the label's centre to its anchor: the part outside
    the text and more than `clear` pixels from the anchor (its own marker)."""
    centre = np.array([(box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2])
    points = _along(np.array([anchor, centre]), spacing)
    in_text = _inside(points, np.array([[box.x0, box.y0, box.x1, box.y1]]))[:, 0]
    return points[~in_text & (np.hypot(*(points - anchor).T) > clear)]


def _inside(points: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """[K, B] bool: point k [K, 2] lies in box b [B, 4] (x0, y0, x1, y1)."""
    x, y = points[:, None, 0], points[:, None, 1]
    return (x >= boxes[:, 0]) & (x <= boxes[:, 2]) & (y >= boxes[:, 1]) & (y <= boxes[:, 3])


def _crosses(a: np.ndarray, b: np.ndarray, segments: Sequence[np.ndarray]) -> bool:
    """Whether the segment a-b crosses any of the given segments ([2, 2] arrays)."""

    def side(p, q, r):
        return np.sign((q[0] - p[0]) * (r[1] - p[1]) - (q[1] - p[1]) * (r[0] - p[0]))

    return any(side(a, b, c) * side(a, b, d) < 0 and side(c, d, a) * side(c, d, b) < 0 for c, d in segments)


def _along(xy: np.ndarray, spacing: float) -> np.ndarray:
    """Points every `spacing` pixels along the polyline through xy [K, 2]."""
    xy = xy[np.isfinite(xy).all(axis=1)]
    if len(xy) < 2:
        return xy
    pieces = [xy[-1:]]
    for start, end in zip(xy[:-1], xy[1:], strict=True):
        steps = max(1, int(np.hypot(*(end - start)) / spacing))
        pieces.append(start + (end - start) * np.linspace(0, 1, steps, endpoint=False)[:, None])
    return np.concatenate(pieces)


def _squares(xy: np.ndarray, size: float) -> np.ndarray:
    """[K, 4] boxes (x0, y0, x1, y1) of side `size` pixels centred at xy [K, 2]."""
    xy = xy[np.isfinite(xy).all(axis=1)]
    return np.concatenate([xy - size / 2, xy + size / 2], axis=1)
