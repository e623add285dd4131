"""PackBits run-length encoding of 8-bit image planes, row by row, as PSD files store channels.

Each row is a sequence of tokens: a repeat (header 257 - n, then the byte: n copies, 2 <= n <= 128)
or a literal (header n - 1, then n bytes, 1 <= n <= 128). Rows never share a token. The encoder
is vectorised with numpy, since a layered file of a 2048x2048 image has tens of millions of bytes.
"""
from __future__ import annotations

import numpy as np

MAX_TOKEN = 128


def _tokens(plane: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(start, length, is_literal) of every token of a [H, W] plane, starts as flat indices."""
    width = plane.shape[1]
    flat = plane.reshape(-1)
    col = np.arange(flat.size) % width
    run_start = np.ones(flat.size, dtype=bool)
    run_start[1:] = (flat[1:] != flat[:-1]) | (col[1:] == 0)
    starts = np.flatnonzero(run_start)
    run_length = np.diff(np.append(starts, flat.size))
    # A pixel is literal when its run has length 1; maximal stretches of literal pixels, and every
    # run of repeats, are groups that are cut into tokens of at most MAX_TOKEN pixels.
    literal = np.repeat(run_length == 1, run_length)
    group_start = run_start & ~(literal & np.r_[False, literal[:-1]] & (col != 0))
    group_first = np.maximum.accumulate(np.where(group_start, np.arange(flat.size), 0))
    token_start = np.flatnonzero((np.arange(flat.size) - group_first) % MAX_TOKEN == 0)
    token_length = np.diff(np.append(token_start, flat.size))
    return token_start, token_length, literal[token_start]


def _odd_byte_split(start: np.ndarray, length: np.ndarray, is_literal: np.ndarray):
    """The same tokens with the first row's encoding made an odd number of bytes longer: a literal
    of 2+ split in two (+1 byte), or a repeat's first two pixels made a literal (+1 or +3)."""
    i = 0 if not is_literal[0] or length[0] > 1 else 1
    s, n = int(start[i]), int(length[i])
    if is_literal[i]:
        new = [(s, 1, True), (s + 1, n - 1, True)]
    else:
        new = [(s, 2, True)] + ([(s + 2, n - 2, n - 2 == 1)] if n > 2 else [])
    new_start, new_length, new_literal = (np.array(v) for v in zip(*new))
    return (np.concatenate([start[:i], new_start, start[i + 1:]]),
            np.concatenate([length[:i], new_length, length[i + 1:]]),
            np.concatenate([is_literal[:i], new_literal.astype(bool), is_literal[i + 1:]]))


def encode_plane(plane: np.ndarray, even: bool = False) -> tuple[np.ndarray, bytes]:
    """(byte count of every row as uint16 [H], the rows' PackBits data) of a uint8 [H, W] plane.

    `even`: make the total an even number of bytes (by encoding one row differently, still valid
    PackBits); some readers (Pillow) expect every PSD channel to end on an even file offset.
    """
    plane = np.ascontiguousarray(plane, dtype=np.uint8)
    height, width = plane.shape
    start, length, is_literal = _tokens(plane)
    size = np.where(is_literal, 1 + length, 2)
    # A width of 1 always gives 2 bytes per row; otherwise the first row has a token to split.
    if even and int(size.sum()) % 2 and width > 1:
        start, length, is_literal = _odd_byte_split(start, length, is_literal)
        size = np.where(is_literal, 1 + length, 2)
    offset = np.concatenate([[0], np.cumsum(size)[:-1]])
    out = np.empty(int(size.sum()), dtype=np.uint8)
    flat = plane.reshape(-1)
    out[offset] = np.where(is_literal, length - 1, 257 - length).astype(np.uint8)
    repeat = ~is_literal
    out[offset[repeat] + 1] = flat[start[repeat]]
    # Literal pixels go after their token's header, in order.
    pixel_token = np.repeat(np.arange(start.size), length)
    literal_pixel = np.flatnonzero(is_literal[pixel_token])
    token = pixel_token[literal_pixel]
    out[offset[token] + 1 + literal_pixel - start[token]] = flat[literal_pixel]
    row_counts = np.bincount(start // width, weights=size, minlength=height).astype(np.uint16)
    return row_counts, out.tobytes()
