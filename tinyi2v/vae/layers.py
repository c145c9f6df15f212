"""Video VAE building blocks on channel-last activations: one sample, x [T, H, W, C] float32.

Weights keep the torch layout of the upstream checkpoints (conv3d [Cout, Cin, kt, kh, kw],
conv2d [Cout, Cin, kh, kw]); the functions reorder them per call.

Convolutions follow LTX-Video's CausalConv3d: spatial zero padding kh//2, kw//2 built into the
conv, temporal padding by replicating the first / last frame (the caller picks how many of each:
causal = (kt-1, 0), non-causal = ((kt-1)/2, (kt-1)/2)). They never build an im2col matrix (a 3x3x3
conv at 720p would need 13 GB for it): the output is computed a band of rows at a time, the
band's input (all frames and kernel columns side by side) gathered once and multiplied per
kernel row, so the GEMMs are long (K = kt * kw * Cin) and only kh partial sums are added.
The 3x3 stride-1 convolutions on 16 or more channels, most of a decoder's work, use Winograd's
F(2x2, 3x3) instead: 2.25x fewer multiplications, same result up to float32 rounding.
With `pad_rows=False` the convs take rows that carry their own neighbours above and below (a
slab of rows of a row-streamed decoder, see streaming.py).
"""
from __future__ import annotations

import numpy as np

from .. import ops
from ..denoiser import linear, silu

__all__ = [
    "conv2d",
    "conv3d",
    "conv_taps",
    "depth_to_space_ltx",
    "depthwise_conv3d",
    "layer_norm",
    "linear",
    "patchify",
    "pixel_norm",
    "pixel_norm_silu",
    "relu",
    "replicate_pad_index",
    "silu",
    "unpatchify",
]

BAND_BYTES = 16 * 2**20     # convolutions: input columns gathered per band of output rows


class ConvFlops:
    """Floating-point operations (2 per multiply-add) of the convolutions run so far, counted as
    the direct convolution does them (where Winograd does 2.25x fewer, the rate is effective),
    read by `tinyi2v bench` to report each VAE stage's GFLOP/s. One addition per call."""
    total = 0


def replicate_pad_index(T: int, temporal_pad: tuple[int, int]) -> list[int]:
    """Source frame of each temporally padded position: first frame repeated pad[0] times, then
    the frames, then the last frame repeated pad[1] times."""
    before, after = temporal_pad
    return [0] * before + list(range(T)) + [T - 1] * after


def conv_taps(weight: np.ndarray) -> np.ndarray:
    """Torch conv weight [Cout, Cin, kt, kh, kw] (any float dtype) -> float32 taps
    [kh, Cout, kt, kw, Cin]: for each kernel row dy, one [Cout, kt * kw * Cin] matrix that takes
    the frames and kernel columns side by side (used as its transpose, which BLAS reads without a
    copy). The reordering pass also casts FP16 to float32."""
    return np.ascontiguousarray(weight.transpose(3, 0, 2, 4, 1), dtype=np.float32)


def _phases(frame: np.ndarray, kh: int, kw: int, sh: int, sw: int, pad_rows: bool = True):
    """Zero-pad a frame [H, W, C] by (kh//2, kw//2) and split it into its sh x sw stride phases.

    `pad_rows=False` pads the columns only (the caller supplies the rows above and below).

    Returns (buf [sh, sw, Hq + 1, Wq, C], H', W', Wq): tap (dy, dx) of output row r reads phase
    (dy % sh, dx % sw) at rows r + dy // sh, columns + dx // sw. Flattening a phase to
    [(Hq + 1) * Wq, C] turns every tap into one contiguous slice (output rows are computed Wq wide
    and the extra columns dropped); the extra zero row keeps the last tap's slice in bounds.
    """
    H, W, C = frame.shape
    ph, pw = (kh // 2 if pad_rows else 0), kw // 2
    Ho, Wo = (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1
    Hq, Wq = Ho + (kh - 1) // sh, Wo + (kw - 1) // sw          # rows / columns of one phase
    buf = np.zeros((sh, sw, Hq + 1, Wq, C), np.float32)
    for ry in range(sh):
        y0 = (ry - ph) % sh                                     # first frame row in this phase
        for rx in range(sw):
            x0 = (rx - pw) % sw
            py, px = (y0 + ph) // sh, (x0 + pw) // sw           # where it lands in the phase
            src = frame[y0::sh, x0::sw][:Hq - py, :Wq - px]     # a stride may leave the end unused
            buf[ry, rx, py:py + src.shape[0], px:px + src.shape[1]] = src
    return buf, Ho, Wo, Wq


def _ring(count: int, st: int, kt: int, ring: bool):
    """The input positions each output frame of a temporal convolution needs, held in kt slots.

    Yields (t, [(slot, position) to fill], shift) for output frames t = 0 .. count - 1, which read
    positions t*st .. t*st + kt - 1. With `ring`, position p lives in slot p % kt, so a frame
    fills only the positions the previous one did not hold (1 of kt at stride 1) and multiplies
    the slots in ring order: slot s holds tap (s - shift) % kt, i.e. the taps rolled by `shift`
    along their kt axis. Without it, slot i holds position t*st + i (every frame fills its kt
    slots) and shift is 0.
    """
    held = [-1] * kt                                            # the position in each slot
    for t in range(count):
        fill = []
        for p in range(t * st, t * st + kt):
            slot = p % kt if ring else p - t * st
            if held[slot] != p:
                held[slot] = p
                fill.append((slot, p))
        yield t, fill, (t * st % kt if ring else 0)


def _rolled_taps(taps: np.ndarray, axis: int, shape: tuple[int, ...]) -> tuple[bool, list]:
    """(ring, the taps for each `_ring` shift): with a ring, shift s multiplies the taps rolled
    by s along their kt `axis` (kt - 1 rolled copies, made only where they fit in BAND_BYTES;
    shift 0 is the taps themselves, no copy); without, the taps alone. Each reshaped to `shape`
    for its GEMMs."""
    kt = taps.shape[axis]
    ring = (kt - 1) * taps.nbytes <= BAND_BYTES
    return ring, [(np.roll(taps, s, axis) if s else taps).reshape(shape)
                  for s in range(kt if ring else 1)]


def _conv_phased(positions: list, taps: np.ndarray, bias: np.ndarray | None,
                 stride: tuple[int, int, int]) -> np.ndarray:
    """The convolution over frames already split by `_phases` (any kernel, any stride).

    positions: the temporally padded input, one `_phases` result per position (a replicated
    frame appears once per copy); taps [kh, Cout, kt, kw, Cin] from `conv_taps`; stride (st, sh,
    sw): output frame t reads positions t*st .. t*st + kt - 1 -> [T', H', W', Cout].

    Per band of output rows, the input rows the band reads are copied into `cols`
    [rows, kt, kw, Cin] (kt positions and kw kernel columns side by side), and each kernel row
    dy is one GEMM with K = kt * kw * Cin on a row-shifted slice of it: long GEMMs and kh - 1
    additions per band instead of kt * kh * kw short GEMMs and additions (the additions, not the
    multiplications, were the bottleneck at 128 channels). Where the taps are small, the kt
    positions of `cols` form a ring (`_ring`): each output frame copies only its new position.
    Larger taps, found at low resolution where copying is cheap, are not rolled. At 64 channels
    the copies took half as long as the GEMMs; the ring made both 720p decoders ~10% faster.
    """
    kh, cout, kt, kw, cin = taps.shape
    st, sh, sw = stride
    count = (len(positions) - kt) // st + 1
    _, Ho, Wo, Wq = positions[0]
    flats = [buf.reshape(sh, sw, -1, cin) for buf, *_ in positions]
    rows_below = (kh - 1) // sh                                 # extra phase rows a band reads
    phases = min(sh, kh)                                        # row phases the kernel reads
    out = np.empty((count, Ho, Wo, cout), np.float32)
    band = max(1, BAND_BYTES // (4 * phases * kt * kw * cin * Wq))   # output rows per band
    ring, rolled = _rolled_taps(taps, 2, (kh, cout, -1))        # [kh, Cout, K] per ring shift
    for r0 in range(0, Ho, band):
        r1 = min(Ho, r0 + band)
        n, m = (r1 - r0) * Wq, (r1 - r0 + rows_below) * Wq     # output / input pixels
        cols = np.empty((phases, m, kt, kw, cin), np.float32)
        acc, tmp = np.empty((n, cout), np.float32), np.empty((n, cout), np.float32)
        for t, fill, shift in _ring(count, st, kt, ring):
            for slot, p in fill:
                for ry in range(phases):
                    for dx in range(kw):
                        start = r0 * Wq + dx // sw
                        cols[ry, :, slot, dx] = flats[p][ry, dx % sw, start:start + m]
            a = cols.reshape(phases, m, -1)                     # [phases, m, K]
            for dy in range(kh):
                rows = (dy // sh) * Wq
                np.matmul(a[dy % sh, rows:rows + n], rolled[shift][dy].T,
                          out=acc if dy == 0 else tmp)
                if dy:
                    acc += tmp
            out[t, r0:r1] = acc.reshape(r1 - r0, Wq, cout)[:, :Wo]
    if bias is not None:
        out += bias
    ConvFlops.total += 2 * count * Ho * Wo * cout * kt * kh * kw * cin
    return out


# Winograd F(2x2, 3x3) (ops/numpy_ops.py) where it measured faster: at 720p 1.2-1.7x on the
# decoders' 16- to 512-channel convolutions, upsamplers (Cout = 8 Cin) included, but no faster on
# Turbo-VAED's 4-channel conv_out (the 16 GEMMs too thin) or its 256 -> 2048 upsampler, whose
# transformed taps (16/9 the size of the direct ones, held whole) would be 100 MB.
WINOGRAD_MIN_CHANNELS = 16
WINOGRAD_MAX_TAPS_BYTES = 64 * 2**20


# G turns 3 taps into the 4 that multiply B^T d B; kron(G, G) [16, 9] takes a flattened 3x3
# kernel g (y * 3 + x) to G g G^T (element 4a + b).
WINOGRAD_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float32)
WINOGRAD_GG = np.kron(WINOGRAD_G, WINOGRAD_G)


def winograd_taps(weight: np.ndarray) -> np.ndarray:
    """Torch conv weight [Cout, Cin, kt, 3, 3] (any float dtype) -> float32 [16, kt, Cin, Cout]:
    G g G^T of each 3x3 kernel g, as the right-hand sides of the 16 GEMMs. Runs once per call
    of a convolution (a streamed decoder calls each one per slab), so it is two copies and
    small GEMMs rather than elementwise passes."""
    cout, cin, kt = weight.shape[:3]
    g = np.ascontiguousarray(weight.reshape(cout, -1).T, dtype=np.float32)   # [Cin * kt * 9, Cout]
    u = WINOGRAD_GG @ g.reshape(cin, kt, 9, cout)                # [Cin, kt, 16, Cout]
    return np.ascontiguousarray(u.transpose(2, 1, 0, 3))         # [16, kt, Cin, Cout]


def _conv_winograd(x: np.ndarray, src: list[int], weight: np.ndarray, bias: np.ndarray | None,
                   pad_rows: bool) -> np.ndarray:
    """A 3x3 (x kt) stride-1 convolution by Winograd F(2x2, 3x3): 2.25x fewer multiplications.

    x [T, H, W, Cin]; src: the frame of each temporally padded position; weight [Cout, Cin, kt,
    3, 3] -> [T', H', W, Cout]. Each frame is zero-padded once; per band of 2x2 output tiles,
    `ops.winograd_tiles` turns the input positions into [16, tiles, kt, Cin] (a ring over
    positions, as in `_conv_phased`), 16 GEMMs with K = kt * Cin give the transformed outputs,
    and `ops.winograd_untile` turns them into the band's output rows (bias added there).
    The transforms only add and subtract (and G halves), so the result equals the direct
    convolution up to float32 rounding.
    """
    T, H, W, cin = x.shape
    cout, _, kt = weight.shape[:3]
    ph = 1 if pad_rows else 0
    Ho = H + 2 * ph - 2
    ty, tx = -(-Ho // 2), -(-W // 2)                            # 2x2 output tiles
    padded = np.zeros((T, 2 * ty + 2, 2 * tx + 2, cin), np.float32)   # tile (i, j): rows 2i..2i+3
    padded[:, ph:ph + H, 1:1 + W] = x
    u = winograd_taps(weight)                                   # [16, kt, Cin, Cout]
    bias = np.zeros(cout, np.float32) if bias is None else np.asarray(bias, np.float32)
    count = len(src) - kt + 1
    out = np.empty((count, 2 * ty, 2 * tx, cout), np.float32)
    band = max(1, BAND_BYTES // (4 * 16 * tx * (kt * cin + cout)))   # tile rows per band
    ring, rolled = _rolled_taps(u, 1, (16, kt * cin, cout))     # [16, K, Cout] per ring shift
    for r0 in range(0, ty, band):
        r1 = min(ty, r0 + band)
        n = (r1 - r0) * tx                                      # tiles in the band
        v = np.empty((16, r1 - r0, tx, kt, cin), np.float32)   # transformed input, kt slots
        m = np.empty((16, n, cout), np.float32)                 # transformed output
        for t, fill, shift in _ring(count, 1, kt, ring):
            for slot, p in fill:
                ops.winograd_tiles(padded[src[p]], r0, v, slot)
            np.matmul(v.reshape(16, n, kt * cin), rolled[shift], out=m)   # 16 GEMMs
            ops.winograd_untile(m.reshape(16, r1 - r0, tx, cout), bias, out[t, 2 * r0:2 * r1])
    ConvFlops.total += 2 * count * Ho * W * cout * kt * 9 * cin   # as the direct convolution
    if out.shape[1:3] != (Ho, W):                               # odd sizes: drop the extra
        out = np.ascontiguousarray(out[:, :Ho, :W])
    return out


def conv3d(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None,
           stride: tuple[int, int, int] = (1, 1, 1), temporal_pad: tuple[int, int] = (0, 0),
           pad_rows: bool = True) -> np.ndarray:
    """3D convolution, LTX CausalConv3d padding.   x [T, H, W, Cin] -> [T', H', W', Cout].

    weight [Cout, Cin, kt, kh, kw]; the first frame is replicated temporal_pad[0] times and the
    last temporal_pad[1] times; spatial zero padding kh//2, kw//2 (columns only if `pad_rows` is
    False: then x carries its own rows above and below, and H' = H - kh + 1).
    A one-frame input with padding gives every tap the same frame, so the kt temporal slices of
    the kernel are summed first: a 2D conv, kt x fewer GEMMs, equal up to rounding.
    3x3 stride-1 kernels on enough channels go through Winograd (`_conv_winograd`), the rest
    through direct GEMMs (`_conv_phased`).
    """
    cout, cin, kt, kh, kw = weight.shape
    src = replicate_pad_index(x.shape[0], temporal_pad)        # padded position -> frame
    count = (len(src) - kt) // stride[0] + 1
    if x.shape[0] == 1 and kt > 1:
        summed = weight.astype(np.float32).sum(axis=2, keepdims=True)   # [Cout, Cin, 1, kh, kw]
        return np.repeat(conv3d(x, summed, bias, (1,) + stride[1:], (0, 0), pad_rows), count, 0)
    if ((kh, kw) == (3, 3) and stride == (1, 1, 1) and cin >= WINOGRAD_MIN_CHANNELS
            and 16 * kt * cin * cout * 4 <= WINOGRAD_MAX_TAPS_BYTES):
        return _conv_winograd(x, src, weight, bias, pad_rows)
    taps = conv_taps(weight)
    phased = [_phases(f, kh, kw, *stride[1:], pad_rows) for f in x]   # each frame padded once
    return _conv_phased([phased[j] for j in src], taps, bias, stride)


def conv2d(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None,
           pad_rows: bool = True) -> np.ndarray:
    """Per-frame 2D convolution, stride 1, zero padding k//2.   x [F, H, W, Cin] -> [F, H', W, Cout];
    weight [Cout, Cin, kh, kw]; `pad_rows` as in conv3d (H' = H, or H - kh + 1 if False)."""
    return conv3d(x, weight[:, :, None], bias, pad_rows=pad_rows)   # a kt = 1 3D conv


def depthwise_conv3d(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None,
                     temporal_pad: tuple[int, int], pad_rows: bool = True) -> np.ndarray:
    """Depthwise 3D convolution (groups = C), stride 1, same padding rules as `conv3d`.

    x [T, H, W, C], weight [C, 1, kt, kh, kw], bias [C] -> [T', H', W, C], H' = H (or
    H - kh + 1 if `pad_rows` is False).
    """
    _, _, kt, kh, kw = weight.shape
    T, H, W, C = x.shape
    ph, pw = (kh // 2 if pad_rows else 0), kw // 2
    padded = np.zeros((T, H + 2 * ph, W + 2 * pw, C), np.float32)
    padded[:, ph:ph + H, pw:pw + W] = x
    Ho = H + 2 * ph - kh + 1
    src = replicate_pad_index(T, temporal_pad)
    T_out = len(src) - kt + 1
    w = np.ascontiguousarray(weight[:, 0].transpose(1, 2, 3, 0), dtype=np.float32)  # [kt, kh, kw, C]
    out = np.zeros((T_out, Ho, W, C), np.float32)
    for t in range(T_out):
        for i in range(kt):
            frame = padded[src[t + i]]
            for dy in range(kh):
                for dx in range(kw):
                    out[t] += frame[dy:dy + Ho, dx:dx + W] * w[i, dy, dx]
    if bias is not None:
        out += bias
    ConvFlops.total += 2 * out.size * kt * kh * kw
    return out


def pixel_norm(x: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """RMS norm over the channel (last) axis, no weight: x / sqrt(mean_c(x^2) + eps)."""
    return ops.pixel_norm(x, eps, False)


def pixel_norm_silu(x: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """silu(pixel_norm(x)), fused: the pre-activation of every LTX conv."""
    return ops.pixel_norm(x, eps, True)


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    """LayerNorm over the channel (last) axis with affine weight and bias."""
    y = x - x.mean(axis=-1, keepdims=True)
    y *= 1.0 / np.sqrt(np.mean(y * y, axis=-1, keepdims=True) + np.float32(eps))
    y *= weight
    y += bias
    return y


def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, np.float32(0))


def patchify(video: np.ndarray, p: int) -> np.ndarray:
    """Space-to-depth by p.   [T, H, W, C] -> [T, H/p, W/p, C*p*p].

    LTX's channel order: c*p*p + col_offset*p + row_offset (the column offset is the more
    significant index, transposed with respect to the usual pixel-unshuffle).
    """
    T, H, W, C = video.shape
    v = video.reshape(T, H // p, p, W // p, p, C)              # [T, h, row, w, col, C]
    return v.transpose(0, 1, 3, 5, 4, 2).reshape(T, H // p, W // p, C * p * p)


def unpatchify(x: np.ndarray, p: int) -> np.ndarray:
    """Depth-to-space by p, the inverse of `patchify`.   [T, h, w, C*p*p] -> [T, h*p, w*p, C]."""
    T, h, w, _ = x.shape
    v = x.reshape(T, h, w, -1, p, p)                           # [T, h, w, C, col, row]
    return v.transpose(0, 1, 5, 2, 4, 3).reshape(T, h * p, w * p, -1)


def depth_to_space_ltx(x: np.ndarray) -> np.ndarray:
    """LTX's upsampler rearrangement: 3D depth-to-space by 2, first output frame dropped.

    [T, H, W, 8C] -> [2T - 1, 2H, 2W, C]; input channel c*8 + dt*4 + dy*2 + dx lands at
    frame 2t + dt - 1, row 2h + dy, column 2w + dx.
    """
    T, H, W, _ = x.shape
    v = x.reshape(T, H, W, -1, 2, 2, 2)                        # [T, H, W, C, dt, dy, dx]
    return v.transpose(0, 4, 1, 5, 2, 6, 3).reshape(2 * T, 2 * H, 2 * W, -1)[1:]
