"""overview.png: the central XY, XZ and YZ slices with the labels overlaid, titled, with a legend.

What the image shows, so that it reads the same for a 30-voxel test volume and a 2,000-voxel
tomogram:

- **Scale.** One scale for all three panels, with square display pixels (one display pixel is
  the finest voxel spacing, so anisotropic voxels are stretched, not squashed). Small volumes
  are enlarged by a whole factor, nearest neighbour (voxels stay crisp blocks) until the
  smallest panel's longer side is at least `min_panel` (256) pixels; large ones are shrunk
  (grey values averaged over the area, labels nearest) until the largest panel fits in
  `max_panel` (1,024) pixels. When the two disagree (a very flat volume) `max_panel` wins.
- **Grey values** are contrast-stretched to the 1st–99th percentile of the three slices;
  labels are blended over them in translucent colours (label *n* takes colour *n* of a
  20-colour palette, repeating after 20).
- **Layout**, as in orthogonal-view tools: XY top left, YZ to its right (Y down, Z across,
  so it shares XY's rows), XZ below it (sharing XY's columns). Each title ("XY z=32", the
  plane and where it cuts) has its own line above its panel, and a column is as wide as
  the widest of its panels and titles, so titles never run into each other or a panel.
- **Legend** under the panels: a colour swatch and "value name" for every named label of the
  model and every other label value that appears in the slices, wrapped to the image width.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .preview import check_label_array
from .stats import check_voxel_size

__all__ = ["label_colour", "render_overview", "write_overview_png"]

_PALETTE = np.array(
    [[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
     [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212],
     [0, 128, 128], [220, 190, 255], [170, 110, 40], [255, 250, 200], [128, 0, 0],
     [170, 255, 195], [128, 128, 0], [255, 215, 180], [0, 0, 128], [128, 128, 128]],
    dtype=np.float32,
)  # fmt: skip
_ALPHA = 0.45
_BACKGROUND = (24, 24, 24)
_TEXT = (230, 230, 230)
_GAP = 8  # between panels, and around the edges
_FONT_PX = 15


def label_colour(value: int) -> tuple[int, int, int]:
    """The overlay colour of label `value` (> 0) in overview.png, as RGB."""
    r, g, b = (int(c) for c in _PALETTE[(int(value) - 1) % len(_PALETTE)])
    return r, g, b


def _font() -> Any:
    from PIL import ImageFont

    try:  # Pillow >= 10.1 ships a scalable default font (needs FreeType)
        return ImageFont.load_default(size=_FONT_PX)
    except (TypeError, OSError, ImportError):  # older Pillow, or no FreeType
        return ImageFont.load_default()


def _zoom(sides: Sequence[tuple[float, float]], min_panel: int, max_panel: int) -> float:
    """One display scale for every panel (module docstring): enlarge by whole factors only."""
    longest = [max(rows, cols, 1.0) for rows, cols in sides]
    cap = max_panel / max(longest)
    if cap < 1:
        return cap
    return float(max(1, min(math.ceil(min_panel / min(longest)), math.floor(cap))))


def _panel(gray: np.ndarray, lab: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resample one slice to (height, width) display pixels and blend the label colours over it."""
    from PIL import Image

    enlarge = height >= gray.shape[0] and width >= gray.shape[1]
    how = Image.Resampling.NEAREST if enlarge else Image.Resampling.BOX
    g = np.asarray(Image.fromarray(gray).resize((width, height), how))
    idx = Image.fromarray(lab.astype(np.int32)).resize((width, height), Image.Resampling.NEAREST)
    rgb, lab = np.repeat(g[..., None].astype(np.float32), 3, axis=2), np.asarray(idx)
    fg = lab > 0
    rgb[fg] = (1 - _ALPHA) * rgb[fg] + _ALPHA * _PALETTE[(lab[fg] - 1) % len(_PALETTE)]
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _grays(slices: list[Any] | None, labels: list[np.ndarray]) -> list[np.ndarray]:
    """Image slices as uint8, stretched to their joint 1st–99th percentile; None: black."""
    if slices is None:
        return [np.zeros(s.shape, np.uint8) for s in labels]
    values = [np.asarray(s, dtype=np.float64) for s in slices]
    finite = np.concatenate([v[np.isfinite(v)] for v in values])
    lo, hi = np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0)
    hi = hi if hi > lo else lo + 1.0
    return [
        np.rint(np.clip(np.nan_to_num((v - lo) / (hi - lo)), 0, 1) * 255).astype(np.uint8)
        for v in values
    ]


def _legend_entries(
    label_slices: list[np.ndarray], label_names: Mapping[int, str] | None
) -> list[tuple[int, str]]:
    """(value, text) for every named label and every other value seen in the slices."""
    names = {int(v): str(n) for v, n in (label_names or {}).items() if int(v) > 0}
    seen = set().union(*(np.unique(s).tolist() for s in label_slices)) - {0}
    return [(v, f"{v} {names[v]}" if v in names else f"{v}") for v in sorted(set(names) | seen)]


def render_overview(
    image: np.ndarray | None,
    labels: np.ndarray,
    *,
    voxel_size: Sequence[float],
    label_names: Mapping[int, str] | None = None,
    min_panel: int = 256,
    max_panel: int = 1024,
) -> Any:
    """The overview as a PIL RGB image (see the module docstring); `image` None: black."""
    from PIL import Image, ImageDraw

    check_label_array(labels)
    vs = check_voxel_size(voxel_size)
    if image is not None and tuple(image.shape) != tuple(labels.shape):
        raise ValueError(f"image shape {tuple(image.shape)} != labels shape {labels.shape}")
    zc, yc, xc = (n // 2 for n in labels.shape)

    def cut(array: Any, which: str) -> np.ndarray:
        if which == "XY":
            return np.asarray(array[zc])
        if which == "XZ":
            return np.asarray(array[:, yc])
        yz: np.ndarray = np.asarray(array[:, :, xc]).T  # YZ with Y down, like XY's rows
        return yz

    names = ("XY", "XZ", "YZ")
    titles = (f"XY z={zc}", f"XZ y={yc}", f"YZ x={xc}")
    spacing = ((vs[1], vs[2]), (vs[0], vs[2]), (vs[1], vs[0]))  # of rows and columns
    lab_slices = [cut(labels, n) for n in names]
    grays = _grays(None if image is None else [cut(image, n) for n in names], lab_slices)
    px = min(vs)  # one display pixel (before zooming) is the finest voxel spacing
    sides = [
        (s.shape[0] * r / px, s.shape[1] * c / px)
        for s, (r, c) in zip(lab_slices, spacing, strict=True)
    ]
    zoom = _zoom(sides, min_panel, max_panel)
    xy, xz, yz = (
        _panel(g, s, max(1, round(rows * zoom)), max(1, round(cols * zoom)))
        for g, s, (rows, cols) in zip(grays, lab_slices, sides, strict=True)
    )

    font = _font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def text_width(text: str) -> int:
        left, _, right, _ = probe.textbbox((0, 0), text, font=font)
        return int(right - left)

    line = int(probe.textbbox((0, 0), "XYZg", font=font)[3]) + 6
    # XY top left, YZ to its right (same rows), XZ below it (same columns): each panel's
    # title on its own line above it, each column as wide as its widest panel or title.
    left_width = max(xy.shape[1], text_width(titles[0]), text_width(titles[1]))
    right_x = _GAP + left_width + _GAP
    right_width = max(yz.shape[1], text_width(titles[2]))
    places = [  # (title, panel, x, y of the title)
        (titles[0], xy, _GAP, _GAP),
        (titles[1], xz, _GAP, _GAP + line + xy.shape[0] + _GAP),
        (titles[2], yz, right_x, _GAP),
    ]
    panels_bottom = max(y + line + p.shape[0] for _, p, _, y in places)

    entries = _legend_entries(lab_slices, label_names) or [(0, "no labels in these slices")]
    swatch = line - 6
    items = [(v, text, swatch + 6 + text_width(text)) for v, text in entries]
    width = max(right_x + right_width + _GAP, max(w for *_, w in items) + 2 * _GAP)
    rows: list[list[tuple[int, str, int]]] = [[]]
    used = _GAP
    for item in items:
        if rows[-1] and used + item[2] > width - _GAP:
            rows.append([])
            used = _GAP
        rows[-1].append(item)
        used += item[2] + 2 * _GAP

    height = panels_bottom + _GAP + len(rows) * line + _GAP
    canvas = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for title, panel, x, y in places:
        draw.text((x, y), title, fill=_TEXT, font=font)
        canvas.paste(Image.fromarray(panel), (x, y + line))
    y = panels_bottom + _GAP
    for row in rows:
        x = _GAP
        for value, text, item_width in row:
            if value > 0:
                draw.rectangle([x, y + 3, x + swatch - 1, y + 2 + swatch], fill=label_colour(value))
            draw.text((x + swatch + 6, y), text, fill=_TEXT, font=font)
            x += item_width + 2 * _GAP
        y += line
    return canvas


def write_overview_png(
    path: str | os.PathLike[str],
    image: np.ndarray | None,
    labels: np.ndarray,
    *,
    voxel_size: Sequence[float],
    label_names: Mapping[int, str] | None = None,
    min_panel: int = 256,
    max_panel: int = 1024,
) -> Path:
    """Write the overview (central XY, XZ, YZ slices, labels overlaid, legend) as a PNG."""
    canvas = render_overview(
        image,
        labels,
        voxel_size=voxel_size,
        label_names=label_names,
        min_panel=min_panel,
        max_panel=max_panel,
    )
    canvas.save(os.fspath(path), format="PNG")
    return Path(path)
