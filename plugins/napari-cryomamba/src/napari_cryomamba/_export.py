"""The widget's Export row: save the last result as MRC, NIfTI, NRRD or stats.json into a folder."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from napari.utils.notifications import show_error, show_info
from qtpy.QtWidgets import QFileDialog, QHBoxLayout, QPushButton, QWidget

import cryomamba as cm

from ._texts import error_text

__all__ = ["EXPORTS", "ExportRow", "export_result"]

EXPORTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("MRC", ("mrc",)),
    ("NIfTI", ("nifti",)),
    ("NRRD", ("nrrd",)),
    ("stats.json", ("stats",)),
)
"""Export buttons: label → `Segmentation.save` formats."""


def export_result(
    result: cm.Segmentation | None, folder: str | os.PathLike, formats: Sequence[str]
) -> dict[str, Path]:
    """Save `result` into `folder` (e.g. formats=["mrc", "stats"]); returns the paths."""
    if result is None:
        raise cm.OutputError("there is no result to export yet", hint="run a segmentation first")
    return result.save(folder, formats=list(formats))


class ExportRow(QHBoxLayout):
    """One button per entry of `EXPORTS`: ask for a folder, then save there in the background."""

    def __init__(
        self,
        parent: QWidget,
        export: Callable[[str, tuple[str, ...]], dict[str, Path]],
        in_background: Callable[[Callable[[], Any], Callable[[tuple[str, Any]], None]], None],
    ) -> None:
        super().__init__()
        self._parent = parent
        self._export = export
        self._in_background = in_background
        self._folder = str(Path.home())
        self.buttons: dict[str, QPushButton] = {}
        for label, formats in EXPORTS:
            button = QPushButton(label)
            button.setEnabled(False)
            button.setToolTip(f"save {', '.join(formats)} of the last result into a folder")
            button.clicked.connect(lambda _=False, f=formats: self._clicked(f))
            self.addWidget(button)
            self.buttons[label] = button

    def set_enabled(self, enabled: bool) -> None:
        """Offer the buttons (there is a result) or not."""
        for button in self.buttons.values():
            button.setEnabled(enabled)

    def _clicked(self, formats: tuple[str, ...]) -> None:
        folder = QFileDialog.getExistingDirectory(self._parent, "Export to folder", self._folder)
        if not folder:
            return
        self._folder = folder
        self._in_background(lambda: self._export(folder, formats), self._on_exported)

    def _on_exported(self, outcome: tuple[str, Any]) -> None:
        kind, value = outcome
        if kind == "error":
            show_error(error_text(value))
        else:
            show_info("CryoMamba: wrote " + ", ".join(str(p) for p in value.values()))
