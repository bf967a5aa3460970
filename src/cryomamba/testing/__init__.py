"""Helpers for testing CryoMamba and its plugins: tiny model folders, conformance suites."""

from __future__ import annotations

from .conformance import ExecutorTests, SinkTests
from .model_folder import make_model_folder

__all__ = ["ExecutorTests", "SinkTests", "make_model_folder"]
