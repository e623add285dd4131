"""What differs between the ComfyUI versions the pack supports (0.8.0 to 0.33.0), in one place.

Newer hosts add schema fields and types; the pack uses them where the running host has them and
leaves them out where it does not, so one code path serves every supported version.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

from comfy_api.latest import io


def schema(**fields: Any) -> io.Schema:
    """io.Schema from the fields this host's Schema knows; fields of newer hosts (such as
    `search_aliases`, from 0.33) are dropped on older ones."""
    known = {field.name for field in dataclasses.fields(io.Schema)}
    return io.Schema(**{name: value for name, value in fields.items() if name in known})


def layers_type() -> Optional[type]:
    """The LAYERS type of core's layered images (Add Layer, Create Layered Image), or None on
    hosts that do not have it."""
    return getattr(io, "Layers", None)
