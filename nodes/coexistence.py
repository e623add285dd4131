"""Saying so when another loaded pack registers the same node ids as this one.

huchenlei/ComfyUI-layerdiffuse registers eight of this pack's node ids, and most users moving over
have it installed. ComfyUI keeps whichever pack it loads last, in directory-listing order, so which
one runs is arbitrary; the log says so once per pack, naming both folders and what to do.

Host internals used here: ComfyUI's `nodes.NODE_CLASS_MAPPINGS` (read only) and the
`custom_nodes` folder list of `folder_paths`.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import os
from typing import Iterable

import folder_paths

_reported: set[str] = set()  # folders of other packs already named in the log


def _pack_folder(node_class: type) -> str:
    """The custom_nodes folder a node class comes from (else the folder of its file)."""
    path = os.path.realpath(inspect.getfile(node_class))
    for root in folder_paths.get_folder_paths("custom_nodes"):
        root = os.path.realpath(root)
        if path.startswith(root + os.sep):
            return os.path.join(root, os.path.relpath(path, root).split(os.sep)[0])
    return os.path.dirname(path)


def report_shared_ids(ours: Iterable[type], our_folder: str, registered: dict[str, type]) -> None:
    """Log, once per other pack, the node ids of `ours` that another pack's class holds in
    `registered` (ComfyUI's NODE_CLASS_MAPPINGS)."""
    ours = list(ours)
    by_folder: dict[str, list[str]] = {}
    for node_class in ours:
        node_id = node_class.GET_SCHEMA().node_id
        holder = registered.get(node_id)
        if holder is None or holder in ours:
            continue
        try:
            folder = _pack_folder(holder)
        except (TypeError, OSError):  # built in or without a file
            folder = getattr(holder, "RELATIVE_PYTHON_MODULE", None) or repr(holder)
        by_folder.setdefault(folder, []).append(node_id)
    for folder, ids in by_folder.items():
        if folder in _reported:
            continue
        _reported.add(folder)
        logging.warning(
            "LayerDiffuse: the pack in %s also registers %s, like this pack (%s). ComfyUI keeps whichever it "
            "loads last, so which one runs is arbitrary. Disable one of them: in ComfyUI-Manager, or by "
            "renaming its folder to end in .disabled (workflows saved with either pack open with the other).",
            folder, ", ".join(sorted(ids)), our_folder)


def watch_for_shared_ids(ours: Iterable[type], our_folder: str) -> None:
    """Report node ids of ours that packs loaded before this one hold now, and, once ComfyUI has
    loaded the rest (the loader runs all packs in one pass of the event loop), those that packs
    loaded after it took over."""
    import nodes as comfy_nodes  # ComfyUI's own nodes module

    ours = list(ours)
    report_shared_ids(ours, our_folder, comfy_nodes.NODE_CLASS_MAPPINGS)
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return
    loop.call_soon(report_shared_ids, ours, our_folder, comfy_nodes.NODE_CLASS_MAPPINGS)
