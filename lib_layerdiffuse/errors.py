"""The errors a user sees: one base class, and the short name ComfyUI shows for them.

Every problem the pack reports to a user (a missing or wrong weight file, a model of the wrong
family, inputs that do not belong together) is a `LayerDiffuseError` whose message says what to
connect, choose or download.
"""
from __future__ import annotations

# ComfyUI titles an execution error with the exception class's module path. A custom node pack's
# modules are named after the pack's folder, a full filesystem path, so the classes carry this
# short name instead.
PUBLIC_MODULE = "layerdiffuse"


class LayerDiffuseError(Exception):
    """Something the user can fix; the message says how."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.__module__ = PUBLIC_MODULE


LayerDiffuseError.__module__ = PUBLIC_MODULE


class InputError(LayerDiffuseError):
    """Node inputs that do not fit together or do not fit the node (sizes, batches, channels)."""


class ModelError(LayerDiffuseError):
    """The connected model (or VAE) is not one the chosen mode or node works with."""


class WeightFileError(LayerDiffuseError):
    """A weight file is missing, unreadable or of the wrong layout; the message says what to do."""
