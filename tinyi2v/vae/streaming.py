"""Row streaming: run a convolutional decoder over slabs of whole rows instead of whole tensors.

An activation [T, H, W, C] (one sample, every frame) is passed on as consecutive row slabs
[T, rows, W, C], top to bottom. Every layer is a lazy iterator that turns the row slabs of its
input into the row slabs of its output, keeping only the rows its kernel still needs from the
previous slab, so a decoder holds a few slabs per layer instead of whole activations, and every
output pixel is computed once, from the same inputs as on the whole tensor (equal up to float
rounding to a layer-by-layer decode). Used by the LTX-Video decoder (ltx.py) and Turbo-VAED
(turbo_vaed.py).
"""
from __future__ import annotations

import collections
from collections.abc import Callable, Iterator

import numpy as np

Slabs = Iterator[np.ndarray]          # consecutive row slabs [T, rows, W, C] of one activation
Activation = Callable[[np.ndarray], np.ndarray]
SLAB_BYTES = 16 * 2**20               # activation rows per slab, in bytes


def rechunk(slabs: Slabs, max_bytes: int) -> Slabs:
    """Split slabs into pieces of at most `max_bytes` (whole rows, at least one)."""
    for slab in slabs:
        rows = max(1, max_bytes // max(1, slab[:, :1].nbytes))
        for r in range(0, slab.shape[1], rows):
            yield slab[:, r:r + rows]


def stream_rows(layer: Callable[..., np.ndarray], slabs: Slabs, height: int,
                pre: Activation | None = None, halo: int = 1) -> Slabs:
    """A layer whose kernel reads `halo` rows above and below each output row (a 3x3 conv: 1,
    5x5: 2) over the row slabs of an activation of `height` rows, zero padded in rows.

    Each slab is run together with the 2 * halo rows before it (at the top: `halo` zero rows, the
    conv's padding; the last slab also gets `halo` zero rows below), so every output row is
    computed once, exactly as on the whole tensor. `layer(rows, pad_rows=False)` maps R input rows
    to R - 2 * halo output rows (x2 for an upsampler). `pre` (e.g. pixel norm + SiLU) is applied
    to each slab first, before the zero padding, as the conv pads its activated input.
    A call whose first output row is odd also takes the input row before its rows and drops its
    first output row (or rows: an upsampler doubles them), so every call starts on an even row:
    a Winograd convolution (layers.py) then pairs rows into 2x2 tiles as on the whole tensor,
    and rounds alike. The slabs keep their sizes; about half the calls compute one row more."""
    carry, received = None, 0                # the last 2 * halo + 1 input rows; rows so far

    def next_rows(slab: np.ndarray) -> np.ndarray | None:
        nonlocal carry, received
        start = max(0, received - halo)          # this call's first output row (halo zeros on top)
        received += slab.shape[1]
        if pre is not None:
            slab = pre(slab)
        zeros = np.zeros((slab.shape[0], halo) + slab.shape[2:], slab.dtype)
        spare = 0 if carry is None else max(0, carry.shape[1] - 2 * halo)   # the row before
        rows = np.concatenate([zeros if carry is None else carry, slab]
                              + [zeros] * (received == height), axis=1)
        carry = rows[:, -2 * halo - 1:].copy()                  # a view would pin `rows`
        extra = start % 2                                       # odd start: keep the row before
        rows = rows[:, spare - extra:]                          # (held whenever start > 0)
        if rows.shape[1] - extra <= 2 * halo:
            return None
        out = layer(rows, pad_rows=False)
        if extra:                                # drop the extra row's outputs (2 if upsampled)
            out = out[:, out.shape[1] // (rows.shape[1] - 2 * halo):]
        return out

    # map/filter rather than a generator function: a suspended generator would keep its last
    # slab alive, and a chain of twenty of them would hold twenty slabs for nothing
    return filter(lambda out: out is not None, map(next_rows, slabs))


class RowQueue:
    """The rows of a stream that were pushed and not yet taken (a resnet's skip path)."""

    def __init__(self):
        self.slabs: collections.deque[np.ndarray] = collections.deque()

    def push(self, slab: np.ndarray) -> np.ndarray:
        self.slabs.append(slab)
        return slab

    def take(self, n: int) -> np.ndarray:
        parts = []
        while n > 0:
            slab = self.slabs[0]
            if slab.shape[1] <= n:
                parts.append(self.slabs.popleft())
            else:
                parts.append(slab[:, :n])
                self.slabs[0] = slab[:, n:].copy()          # a view would pin the whole slab
            n -= parts[-1].shape[1]
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)


def stream_residual(slabs: Slabs, branch: Callable[[Slabs], Slabs],
                    skip: Activation | None = None) -> Slabs:
    """branch(x) + skip(x) over row slabs (a resnet; skip None is the identity). `branch` is a
    row-streamed chain, so its output rows lag its input: the skip path queues each input slab
    until the output rows it belongs to come out (not itertools.tee: it frees its buffer in
    blocks of 57 items, which here means 57 slabs)."""
    queue = RowQueue()

    def add_skip(out: np.ndarray) -> np.ndarray:
        x = queue.take(out.shape[1])
        out += x if skip is None else skip(x)
        return out

    return map(add_skip, branch(map(queue.push, slabs)))


def write_rows(slabs: Slabs, out: np.ndarray) -> Iterator[int]:
    """Write the row slabs [T, rows, W, C] of one sample into out [C, T, H, W], top to bottom;
    yields the number of rows written so far after each slab (for progress reports)."""
    row = 0
    for slab in slabs:
        out[:, :, row:row + slab.shape[1]] = slab.transpose(3, 0, 1, 2)
        row += slab.shape[1]
        yield row
