"""Slice assembly: the part of a global tensor a rank needs, from the pieces other ranks saved.

Legend: an index is, per dim, the (start, stop) ranges of the global tensor that, concatenated,
make up a local tensor (megamoe.parallel.params). A piece is (index, flat range or None, data):
a whole local shard, or (ZeRO-1) the range [a, b) of its flattened elements one rank held.
Pure tensor code: no files, no collectives.
"""

from __future__ import annotations

import itertools
import math
from typing import Iterable

import torch

Index = tuple[tuple[tuple[int, int], ...], ...]
Piece = tuple[Index, "list[int] | None", torch.Tensor]    # (index, flat range or None, data)


def as_index(index) -> Index:
    return tuple(tuple((int(a), int(b)) for a, b in ranges) for ranges in index)


def index_shape(index) -> tuple[int, ...]:
    return tuple(sum(b - a for a, b in ranges) for ranges in index)


def _segments(dst: tuple, src: tuple) -> list[tuple[int, int, int]]:
    """(source offset, destination offset, length) of the global positions both hold, one dim."""
    out, s_off = [], 0
    for sa, sb in src:
        d_off = 0
        for da, db in dst:
            lo, hi = max(sa, da), min(sb, db)
            if lo < hi:
                out.append((s_off + lo - sa, d_off + lo - da, hi - lo))
            d_off += db - da
        s_off += sb - sa
    return out


def copy_overlap(dst: torch.Tensor, covered: torch.Tensor, dst_index: Index, src: torch.Tensor,
                 src_index: Index) -> None:
    """dst[what both hold] = src[...]: rectangular block copies (a handful: ranges are few)."""
    per_dim = [_segments(d, s) for d, s in zip(dst_index, src_index)]
    for blocks in itertools.product(*per_dim):
        d = tuple(slice(o, o + n) for _, o, n in blocks)
        dst[d] = src[tuple(slice(o, o + n) for o, _, n in blocks)]
        covered[d] = True


def _join_flat(parts: list[tuple[tuple[int, int], torch.Tensor]], shape, what: str) -> torch.Tensor:
    """One local shard from the flat ranges of it that the ranks of a ZeRO-1 group wrote."""
    out = torch.empty(math.prod(shape), dtype=parts[0][1].dtype)
    end = 0
    for (a, b), data in sorted(parts, key=lambda x: x[0]):
        if a > end:
            break
        out[a:b] = data.reshape(-1)
        end = max(end, b)
    if end < out.numel():
        raise ValueError(f"the checkpoint lacks part of the ZeRO-1 state of {what}; is a rank file missing?")
    return out.view(shape)


def assemble(pieces: Iterable[Piece], index, dtype: torch.dtype | None, what: str) -> torch.Tensor | None:
    """The slice `index` of a global tensor from saved pieces; None when there are no pieces."""
    index = as_index(index)
    shape = index_shape(index)
    out = covered = None
    flat_groups: dict[Index, list] = {}
    for src_index, flat, data in pieces:
        src_index = as_index(src_index)
        if out is None:
            out = torch.empty(shape, dtype=dtype or data.dtype)
            covered = torch.zeros(shape, dtype=torch.bool)
        if not all(_segments(d, s) for d, s in zip(index, src_index)):
            continue   # no overlap with the wanted slice
        if flat is not None:
            flat_groups.setdefault(src_index, []).append(((int(flat[0]), int(flat[1])), data))
        elif tuple(data.shape) != index_shape(src_index):
            raise ValueError(f"a saved shard of {what} has shape {tuple(data.shape)} but its spec "
                             f"says {index_shape(src_index)}; the checkpoint is corrupt")
        else:
            copy_overlap(out, covered, index, data, src_index)
    for src_index, parts in flat_groups.items():
        copy_overlap(out, covered, index, _join_flat(parts, index_shape(src_index), what), src_index)
    if out is not None and not bool(covered.all()):
        raise ValueError(f"the checkpoint does not cover all of {what}; is a rank file missing?")
    return out


__all__ = ["Index", "Piece", "as_index", "index_shape", "copy_overlap", "assemble"]
