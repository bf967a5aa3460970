"""`NapariSink`: show a job's previews and final mask as Labels layers in a napari viewer.

`handle` runs on the job's sink thread, where Qt must not be touched, so it only records
the event and posts the work to the Qt main thread (superqt's `ensure_main_thread`); it
returns at once. Previews are throttled to at most one per `throttle_s`: a newer preview
replaces a pending one, and the last pending one is always applied before the terminal
event is handled.

Layers (N = the sink's `name`):

* ``"N preview"``: uint8 Labels, created on the first preview and then updated in place
  (`layer.data[...] = labels; layer.refresh()`, or `layer.data = ...` when the shape
  changes), never through `data_setitem`, which would record undo history.
* ``"N mask"``: the full-resolution uint8 labels of the result, added on `Completed`;
  the preview layer is then removed. `Failed` and `Canceled` remove the preview too, and
  say why in a napari notification.

Geometry. A preview at integer scale ``s`` holds the maximum of each ``s³`` block of
full-resolution voxels: preview voxel ``k`` covers voxels ``k*s .. k*s + s - 1``, whose
centre is at voxel coordinate ``k*s + (s - 1)/2``. With the image at ``world = translate +
index * scale`` (per axis), the preview layer therefore gets::

    preview.scale     = image_scale * s
    preview.translate = image_translate + (s - 1) / 2 * image_scale

The image's scale and translate come from `image_layer` (a layer or a layer name) when
given, else from the result's `voxel_size` and `origin` (Å, as the napari-cryomamba reader
sets them), else 1 and 0. The mask layer gets the image's scale and translate unchanged.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from ..events import Canceled, Completed, Event, Failed, Preview

if TYPE_CHECKING:
    from ..segmentation import Segmentation

__all__ = ["NapariSink", "preview_geometry"]

log = logging.getLogger(__name__)


def preview_geometry(
    scale: int, image_scale: Any = (1.0, 1.0, 1.0), image_translate: Any = (0.0, 0.0, 0.0)
) -> tuple[np.ndarray, np.ndarray]:
    """(layer scale, layer translate) that overlay an `s`-times block-max preview on the image."""
    image_scale = np.asarray(image_scale, dtype=np.float64)
    image_translate = np.asarray(image_translate, dtype=np.float64)
    return image_scale * scale, image_translate + (scale - 1) / 2 * image_scale


def _by_name(viewer: Any, name: str) -> Any:
    return next((layer for layer in viewer.layers if layer.name == name), None)


class NapariSink:
    """Shows previews and the final mask of a job in a napari viewer (see the module docs).

    `viewer` defaults to `napari.current_viewer()`, looked up on first use, so
    `sinks=["napari"]` works from a script with a viewer open. `image_layer` (a layer or
    its name) is the image the labels must overlay. `result` holds the `Segmentation` once
    the job has completed.
    """

    def __init__(
        self,
        viewer: Any = None,
        *,
        name: str = "cryomamba",
        image_layer: Any = None,
        throttle_s: float = 0.5,
    ) -> None:
        if not (isinstance(throttle_s, (int, float)) and math.isfinite(throttle_s)) or (
            throttle_s < 0
        ):
            raise ValueError(f"throttle_s must be a finite number >= 0, got {throttle_s!r}")
        # Plugin widgets get napari's public-only proxy of the viewer; the sink needs the
        # viewer itself to tell whether its window is still open.
        self.viewer = _unproxied(viewer)
        self.name = name
        self.image_layer = image_layer
        self.throttle_s = float(throttle_s)
        self.result: Segmentation | None = None
        self.preview_layer: Any = None
        self.mask_layer: Any = None
        self._lock = threading.Lock()
        self._pending: Preview | None = None
        self._scheduled = False
        self._last_apply = -math.inf
        self._told_no_viewer = False

    @property
    def preview_name(self) -> str:
        return f"{self.name} preview"

    @property
    def mask_name(self) -> str:
        return f"{self.name} mask"

    # -- the sink thread: record, post to the main thread, return -----------------------------
    def handle(self, event: Event) -> None:
        if isinstance(event, Preview):
            with self._lock:
                self._pending = event
                if self._scheduled:
                    return  # a flush is on its way and will take this newer preview
                self._scheduled = True
            try:
                self._in_main_thread(self._schedule_flush)
            except BaseException:
                with self._lock:
                    self._scheduled = False  # so a later preview tries again
                raise
        elif isinstance(event, (Completed, Failed, Canceled)):
            if isinstance(event, Completed):
                self.result = event.result
            self._in_main_thread(self._finish, event)

    @staticmethod
    def _in_main_thread(fn: Any, *args: Any) -> None:
        from qtpy.QtCore import QCoreApplication
        from superqt.utils import ensure_main_thread

        if QCoreApplication.instance() is None:
            raise RuntimeError(
                "NapariSink needs a napari viewer, and there is no Qt application: "
                "open one (napari.Viewer()) before starting the job"
            )
        ensure_main_thread(fn)(*args)  # runs now on the main thread, else queued to it

    # -- the main thread ----------------------------------------------------------------------
    def _schedule_flush(self) -> None:
        delay = self._last_apply + self.throttle_s - time.monotonic()
        if delay <= 0:
            self._flush()
        else:
            from qtpy.QtCore import QTimer

            QTimer.singleShot(math.ceil(delay * 1000), self._flush)

    def _flush(self) -> None:
        with self._lock:
            event, self._pending, self._scheduled = self._pending, None, False
        if event is None:
            return
        self._last_apply = time.monotonic()
        viewer = self._get_viewer()
        if viewer is not None:
            self._show_preview(viewer, event)

    def _finish(self, event: Event) -> None:
        self._flush()  # the last preview is never dropped by the throttle
        viewer = self._get_viewer()
        if viewer is None:
            return
        from napari.utils import notifications

        if isinstance(event, Completed):
            if event.result is None:
                notifications.show_warning(
                    f"{self.name}: the job completed, but its labels are not available here"
                )
            else:
                self._show_mask(viewer, event.result)
        elif isinstance(event, Failed):
            text = f"{event.message} — {event.hint}" if event.hint else event.message
            notifications.show_error(text)
        else:
            notifications.show_info(f"{self.name}: segmentation canceled")
        self._remove_preview(viewer)

    def _get_viewer(self) -> Any:
        """The viewer, or None (after saying why) when there is none or it has been closed."""
        if self.viewer is None:
            import napari

            self.viewer = _unproxied(napari.current_viewer())
            if self.viewer is None:
                if not self._told_no_viewer:  # once, not for every preview
                    from napari.utils import notifications

                    notifications.show_error(
                        f"{self.name}: no napari viewer is open to show the segmentation in"
                    )
                    self._told_no_viewer = True
                return None
        window = getattr(self.viewer, "window", None)  # a bare ViewerModel has none
        if window is not None and not hasattr(window, "_qt_window"):  # napari deletes it on close
            log.debug("%r: the viewer was closed; dropping the update", self)
            return None
        return self.viewer

    def _image_geometry(self, viewer: Any, result: Any = None) -> tuple[np.ndarray, np.ndarray]:
        layer = self.image_layer
        if isinstance(layer, str):
            layer = _by_name(viewer, layer)
            if layer is None:
                log.warning(
                    "image layer %r is not in the viewer; placing labels without it",
                    self.image_layer,
                )
        if layer is not None and layer.ndim >= 3:
            return np.asarray(layer.scale[-3:], float), np.asarray(layer.translate[-3:], float)
        if result is not None:
            return np.asarray(result.voxel_size, float), np.asarray(result.origin, float)
        return np.ones(3), np.zeros(3)

    def _show_preview(self, viewer: Any, event: Preview) -> None:
        labels = np.asarray(event.labels)
        scale, translate = preview_geometry(event.scale, *self._image_geometry(viewer))
        layer = self._labels_layer(viewer, self.preview_layer, self.preview_name)
        if layer is None:
            layer = viewer.add_labels(
                np.array(labels, dtype=np.uint8),
                name=self.preview_name,
                scale=scale,
                translate=translate,
                opacity=0.5,
            )
        else:
            if not np.array_equal(layer.scale, scale) or not np.array_equal(
                layer.translate, translate
            ):
                layer.scale, layer.translate = scale, translate
            data = layer.data
            if data.shape == labels.shape and data.dtype == np.uint8 and data.flags.writeable:
                data[...] = labels
                layer.refresh()
            else:
                layer.data = np.array(labels, dtype=np.uint8)
        self.preview_layer = layer

    def _show_mask(self, viewer: Any, result: Any) -> None:
        labels = result.labels
        if labels.dtype != np.uint8:
            labels = np.asarray(labels, dtype=np.uint8)
        scale, translate = self._image_geometry(viewer, result)
        layer = self._labels_layer(viewer, self.mask_layer, self.mask_name)
        if layer is None:
            layer = viewer.add_labels(labels, name=self.mask_name, scale=scale, translate=translate)
        else:
            layer.data = labels
            layer.scale, layer.translate = scale, translate
        if result.label_names:
            index = list(range(max(result.label_names) + 1))
            layer.features = {
                "index": index,
                "name": [result.label_names.get(i, "") for i in index],
            }
        self.mask_layer = layer

    def _remove_preview(self, viewer: Any) -> None:
        layer = self.preview_layer
        if layer is not None and layer in viewer.layers:
            viewer.layers.remove(layer)
        self.preview_layer = None

    @staticmethod
    def _labels_layer(viewer: Any, layer: Any, name: str) -> Any:
        """`layer` if still in the viewer, else a Labels layer called `name`, else None."""
        from napari.layers import Labels

        if layer is not None and layer in viewer.layers:
            return layer
        found = _by_name(viewer, name)
        return found if isinstance(found, Labels) else None

    def __repr__(self) -> str:
        return f"NapariSink(name={self.name!r}, throttle_s={self.throttle_s})"


def _unproxied(viewer: Any) -> Any:
    """The viewer behind napari's `PublicOnlyProxy` (or the viewer itself, or None)."""
    return getattr(viewer, "__wrapped__", viewer)
