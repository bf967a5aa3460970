"""Helpers for testing CryoMamba and its plugins: tiny model folders, conformance suites."""

from __future__ import annotations

from .model_folder import make_model_folder

__all__ = ["make_model_folder"]
