"""`JobConfig` as JSON Schema (the OpenAPI 3.0 dialect), generated from the dataclass.

Each property's type, nullability and default come from the field itself; its limits come
from the same named constants `JobConfig`'s validation reads (`MIN_TILE_STEP`,
`TILE_BATCH_RANGE`, `FORMATS`, ...). A field without a rule here is an error, so a new
setting cannot reach the server's OpenAPI document undescribed.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

from .config import (
    CHECKPOINTS,
    DEVICE_PATTERN,
    FOLD_RANGE,
    FORMATS,
    MIN_TILE_STEP,
    PREVIEW_SCALE_RANGE,
    RESAMPLE_MODES,
    TILE_BATCH_RANGE,
    VOXEL_SIZE_RANGE,
    JobConfig,
)

__all__ = ["job_config_schema"]

_JSON_TYPES: dict[Any, str] = {bool: "boolean", int: "integer", float: "number", str: "string"}


def job_config_schema(*, models: Sequence[str] = (), devices: Sequence[str] = ()) -> dict[str, Any]:
    """The schema of `JobConfig.to_dict()` / `JobConfig.from_dict()`; `models` and `devices`
    narrow `model` and `device` to what one server offers (empty: any valid value)."""
    hints = typing.get_type_hints(JobConfig)
    rules = _rules(models, devices)
    properties: dict[str, Any] = {}
    for f in dataclasses.fields(JobConfig):
        if f.name not in rules:
            raise KeyError(f"JobConfig.{f.name} has no JSON Schema rule in config_schema.py")
        schema = _type_schema(hints[f.name])
        rule = rules[f.name]()
        if "oneOf" in rule:  # the rule says what the value may be, whatever the field's type
            schema = {k: v for k, v in schema.items() if k == "nullable"}
        schema.update(rule)
        if "enum" not in schema or f.default in schema["enum"]:
            schema["default"] = _json(f.default)
        properties[f.name] = schema
    return {
        "type": "object",
        "description": "cryomamba.JobConfig as JSON; every key is optional",
        "additionalProperties": False,
        "properties": properties,
    }


def _rules(
    models: Sequence[str], devices: Sequence[str]
) -> dict[str, Callable[[], dict[str, Any]]]:
    lo, hi = VOXEL_SIZE_RANGE
    voxel = {"type": "number", "minimum": lo, "maximum": hi}
    return {
        "model": lambda: {"minLength": 1, **({"enum": list(models)} if models else {})},
        "folds": lambda: {
            "items": {"type": "integer", "minimum": FOLD_RANGE[0], "maximum": FOLD_RANGE[1]},
            "minItems": 1,
            "uniqueItems": True,
        },
        "checkpoint": lambda: {"enum": list(CHECKPOINTS)},
        "tile_step": lambda: {"minimum": MIN_TILE_STEP, "maximum": 1},
        "mirroring": dict,
        "fp16": dict,
        "device": lambda: {"enum": ["auto", *devices]} if devices else {"pattern": DEVICE_PATTERN},
        "tile_batch": lambda: {
            "description": "samples per network call, or 'auto' to size it from free memory",
            "oneOf": [
                {"type": "integer", "minimum": TILE_BATCH_RANGE[0], "maximum": TILE_BATCH_RANGE[1]},
                {"type": "string", "enum": ["auto"]},
            ],
        },
        "compile": lambda: {
            "description": "run the networks through torch.compile (slow first call; opt-in)",
        },
        "preview_interval_s": lambda: {
            "minimum": 0,
            "description": "seconds between previews; 0 turns them off",
        },
        "preview_scale": lambda: {
            "minimum": PREVIEW_SCALE_RANGE[0],
            "maximum": PREVIEW_SCALE_RANGE[1],
        },
        "formats": lambda: {"items": {"type": "string", "enum": list(FORMATS)}},
        "resample": lambda: {"enum": list(RESAMPLE_MODES)},
        "voxel_size": lambda: {
            "description": "Å, overrides the file's header: one number or [z, y, x]",
            "oneOf": [voxel, {"type": "array", "items": voxel, "minItems": 3, "maxItems": 3}],
        },
    }


def _type_schema(hint: Any) -> dict[str, Any]:
    """JSON Schema for a field's annotation: scalars, tuples (as arrays), `X | None`."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        (inner,) = (a for a in args if a is not type(None))
        return {**_type_schema(inner), "nullable": True}
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return {"oneOf": [_type_schema(a) for a in args]}
    if typing.get_origin(hint) is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return {"type": "array", "items": _type_schema(args[0])}
        item = _type_schema(args[0])
        return {"type": "array", "items": item, "minItems": len(args), "maxItems": len(args)}
    return {"type": _JSON_TYPES[hint]}


def _json(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
