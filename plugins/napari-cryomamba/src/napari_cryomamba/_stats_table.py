"""The table of per-label statistics shown when a job completes (`Segmentation.stats`)."""

from __future__ import annotations

from typing import Any

from qtpy.QtCore import Qt
from qtpy.QtWidgets import QAbstractItemView, QHeaderView, QTableWidget, QTableWidgetItem

__all__ = ["COLUMNS", "StatsTable"]

# (header, key in a `label_stats` entry, format, tooltip)
COLUMNS: tuple[tuple[str, str, str, str], ...] = (
    ("Label", "name", "{}", "label name (value)"),
    ("Voxels", "voxel_count", "{:,}", "voxel count"),
    ("Volume\nnm³", "volume_nm3", "{:,.0f}", "voxel count × voxel volume"),
    ("Surface\nnm²", "surface_area_nm2", "{:,.0f}", "area of a smoothed mesh of the label"),
    ("Parts", "components", "{:,}", "connected components (26-connected)"),
)
_VISIBLE_ROWS = 4


class StatsTable(QTableWidget):
    """One row per foreground label, then a "total" row; read-only, numbers right-aligned."""

    def __init__(self, parent=None) -> None:
        super().__init__(0, len(COLUMNS), parent)
        for c, (title, _, _, tip) in enumerate(COLUMNS):
            item = QTableWidgetItem(title)
            item.setToolTip(tip)
            self.setHorizontalHeaderItem(c, item)
        self.verticalHeader().setVisible(False)
        self.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        header = self.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        rows = self.verticalHeader().defaultSectionSize() * _VISIBLE_ROWS
        self.setMaximumHeight(header.sizeHint().height() + rows + 2 * self.frameWidth())

    def show_stats(self, stats: dict[str, Any] | None) -> None:
        """Fill from `Segmentation.stats` (`{"labels": [...], "total": {...}}`); None clears."""
        rows: list[dict[str, Any]] = []
        if stats:
            rows = [dict(e) for e in stats.get("labels", ())]
            if len(rows) > 1 and stats.get("total"):
                rows.append({"name": "total", **stats["total"]})
        self.setRowCount(len(rows))
        for r, entry in enumerate(rows):
            for c, (_, key, fmt, _) in enumerate(COLUMNS):
                value = entry.get(key)
                if key == "name" and "label" in entry:
                    text = f"{entry.get('name')} ({entry['label']})"
                else:
                    text = "" if value is None else fmt.format(value)
                item = QTableWidgetItem(text)
                if c > 0:
                    item.setTextAlignment(
                        Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter
                    )
                self.setItem(r, c, item)

    def cell_text(self, row: int, column: int) -> str:
        item = self.item(row, column)
        return item.text() if item is not None else ""
