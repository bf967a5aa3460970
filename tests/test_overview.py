"""Tests for cryomamba.overview: overview.png is readable at any size, titled, with a legend."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cryomamba import artifacts
from cryomamba.overview import label_colour, render_overview, write_overview_png

BACKGROUND = (24, 24, 24)


def _tiny() -> tuple[np.ndarray, np.ndarray]:
    lab = np.zeros((10, 20, 30), np.uint8)
    lab[:, 8:12, 10:20] = 1
    lab[5, 2:4, 2:4] = 3
    image = np.random.default_rng(0).normal(size=lab.shape).astype(np.float32)
    return image, lab


def _tinted(rgb: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    """Pixels whose hue leans towards `colour` (label overlays are 45 % colour over grey)."""
    c = np.array(colour, float) - np.mean(colour)
    px = rgb.astype(float) - rgb.astype(float).mean(axis=2, keepdims=True)
    return (px @ c) / (np.linalg.norm(c) ** 2) > 0.25


def _boxes(rgb: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Bounding boxes (top, left, bottom, right) of the connected non-background regions."""
    from scipy import ndimage

    mask = (rgb != BACKGROUND).any(axis=2)
    found, _ = ndimage.label(mask)
    return [(s[0].start, s[1].start, s[0].stop, s[1].stop) for s in ndimage.find_objects(found)]


def test_a_small_volume_is_enlarged_to_readable_panels(tmp_path):
    image, lab = _tiny()
    path = write_overview_png(tmp_path / "o.png", image, lab, voxel_size=(20.0, 10.0, 10.0))
    with Image.open(path) as png:
        assert png.format == "PNG" and png.mode == "RGB"
        rgb = np.asarray(png)
    # one whole zoom factor for every panel, chosen so the smallest panel is >= 256 px:
    # XY 20x30 voxels, XZ 10 planes of 20 Å = 20 display rows x 30, YZ 20 x 20 -> x13
    panels = [b for b in _boxes(rgb) if b[2] - b[0] >= 200]
    sizes = sorted((bottom - top, right - left) for top, left, bottom, right in panels)
    assert sizes == [(260, 260), (260, 390), (260, 390)]
    assert rgb.shape[0] > 2 * 260 and rgb.shape[1] > 390 + 260


def test_a_large_volume_is_shrunk_to_max_panel():
    lab = np.zeros((40, 3000, 1500), np.uint8)
    canvas = render_overview(None, lab, voxel_size=(10.0, 10.0, 10.0), max_panel=600)
    panels = [b for b in _boxes(np.asarray(canvas)) if b[2] - b[0] >= 100]
    assert max(bottom - top for top, _, bottom, _ in panels) == 600  # 3000 rows of XY and YZ
    assert canvas.size[0] < 1000 and canvas.size[1] < 800


def test_panels_are_laid_out_as_orthogonal_views_with_the_overlay_in_place(tmp_path):
    image, lab = _tiny()
    rgb = np.asarray(render_overview(image, lab, voxel_size=(20.0, 10.0, 10.0)))
    panels = sorted(b for b in _boxes(rgb) if b[2] - b[0] >= 200)
    (xy_t, xy_l, xy_b, xy_r), (xz_t, xz_l, _, xz_r) = panels[0], panels[2]
    (yz_t, yz_l, yz_b, _) = panels[1]
    assert (xy_l, xy_r) == (xz_l, xz_r) and xz_t > xy_b  # XZ below XY, same columns
    assert (yz_t, yz_b) == (xy_t, xy_b) and yz_l > xy_r  # YZ right of XY, same rows
    red = _tinted(rgb, label_colour(1))
    xy = red[xy_t:xy_b, xy_l:xy_r]  # label 1: y 8..12 of 20 and x 10..20 of 30
    assert xy[130, 195] and not xy[20, 20] and not xy[130, 20]
    assert red[xz_t : xz_t + 260, xz_l + 195].all()  # every plane of XZ at x = 15 is tinted


def test_titles_never_collide_with_each_other_or_the_panels():
    for shape in [(4, 4, 4), (64, 2, 2), (2, 64, 2), (2, 2, 64), (300, 40, 500)]:
        lab = np.zeros(shape, np.uint8)
        rgb = np.asarray(render_overview(None, lab, voxel_size=(10.0, 10.0, 10.0)))
        boxes = _boxes(rgb)
        for i, a in enumerate(boxes):
            for b in boxes[i + 1 :]:
                overlap = a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]
                assert not overlap, (shape, a, b)


def test_the_legend_names_every_label_in_its_colour(tmp_path):
    image, lab = _tiny()
    names = {1: "membrane", 2: "particle"}
    rgb = np.asarray(render_overview(image, lab, voxel_size=(10.0, 10.0, 10.0), label_names=names))
    panels_bottom = max(b[2] for b in _boxes(rgb) if b[2] - b[0] >= 200)
    legend = rgb[panels_bottom:].reshape(-1, 3)
    colours = {tuple(int(c) for c in px) for px in legend}
    # named labels (even absent ones: 2) and unnamed labels present in the slices (3)
    assert {label_colour(1), label_colour(2), label_colour(3)} <= colours
    assert len({label_colour(v) for v in (1, 2, 3)}) == 3
    assert label_colour(4) not in colours
    assert label_colour(21) == label_colour(1)  # the palette repeats after 20


def test_without_labels_or_image_it_still_draws(tmp_path):
    lab = np.zeros((6, 7, 9), np.uint8)
    path = write_overview_png(tmp_path / "o.png", None, lab, voxel_size=(30.0, 20.0, 10.0))
    with Image.open(path) as png:
        assert min(png.size) >= 256
    with pytest.raises(ValueError, match="shape"):
        write_overview_png(
            tmp_path / "x.png", np.zeros((2, 2, 2)), lab, voxel_size=(10.0, 10.0, 10.0)
        )


def test_save_artifacts_draws_the_legend_from_the_label_names(tmp_path, monkeypatch):
    seen = {}

    def spy(path, image, labels, **kwargs):
        seen.update(kwargs)
        return write_overview_png(path, image, labels, **kwargs)

    monkeypatch.setattr(artifacts, "write_overview_png", spy)
    lab = np.zeros((4, 5, 6), np.uint8)
    artifacts.save_artifacts(
        tmp_path, lab, voxel_size=(10.0, 10.0, 10.0), formats=["png"], label_names={1: "membrane"}
    )
    assert seen["label_names"] == {1: "membrane"} and (tmp_path / "overview.png").exists()
