"""How the kernels split their work: reduction chunks (which fix the bits) and tasks (which spread them).

Every kernel sees its data as a C-contiguous (A, C, B) array, flattened: A outer rows, C channels, B
inner values. ``B == 1`` is channels-last (NHWC as (N*H*W, C, 1), dense (N, C, 1)); ``B > 1`` is
channels-first (NCHW as (N, C, H*W)).

Reductions are split into *chunks* whose boundaries depend on the shape only; each chunk's partial result
is computed the same way whichever thread computes it, and partials are merged in chunk order. *Tasks*
(one ``prange`` iteration each, ``nt`` of them, balanced contiguous ranges) only decide which thread
computes which chunks. That is what makes every result bitwise identical for 1, 2 or 16 threads, and
between the parallel and serial variants.

Channels-first
    A thread owns whole channels when there are at least ``SPLIT_BELOW_CHANNELS`` of them (or a channel
    is a single chunk): it computes the statistics of a group of its channels (``long_group``: rows are
    read as long contiguous runs) and then normalizes the group while it is still in cache. Chunks hold
    ``CF_CHUNK_ELEMS`` values of one channel (whole rows). With few channels, (channel, chunk) pairs are
    spread over the threads instead.

    Rows shorter than ``SHORT_ROW`` (7x7 and 14x14 maps) are not looped over one by one: a group of
    consecutive channels' rows is one contiguous run of ``G * B`` values (a *slab*), updated with
    per-element coefficients and summed elementwise into per-element accumulators. A 49-value row is
    shorter than one iteration of LLVM's unrolled vector loop (VF 8 x interleave 4), so a row loop runs
    mostly in its scalar remainder. Per-channel results do not depend on the grouping: each element's
    accumulator sees the same additions in the same order, and each channel's segment is reduced alone.

Channels-last
    A chunk is a block of rows x a block of at most ``SLAB_ELEMS`` channels; each thread accumulates a
    chunk's sums elementwise in L1-resident float64 arrays, ``R`` rows wide when rows are short (so one
    loop runs over R * C values instead of C), and folds the R sub-rows per channel at the end. The number of row chunks is capped
    (``CL_MAX_ROW_CHUNKS``, and so that the partials stay under ``CL_MAX_PARTIALS`` values), so temporary
    memory is O(C) whatever the number of rows: with more than 16384 channels each chunk used to be a
    single row and the partials were (N, C) float64, 3x the input.
"""
from __future__ import annotations

from fastbn._jit import helper
from fastbn._kernels.prims import max2, min2

# Values of one channel per reduction chunk (whole rows). Chunks are merged exactly (Chan), so this only
# bounds the error of the one-pass shifted sums within a chunk (see reduce.py) and sets how finely a
# channel can be split across threads when there are few channels.
CF_CHUNK_ELEMS = 16384
SPLIT_BELOW_CHANNELS = 16
# Channels-first rows shorter than this are processed as multi-channel slabs (see module doc). Measured,
# float32 inference, 2 threads, slab / row-loop time: rows of 49 0.68, of 64 0.85, of 196 2.0 (the row
# loop already runs vectorized at 196; the slab path pays its per-element coefficient loads).
SHORT_ROW = 128
# Values per slab: a group of whole short channel rows (channels-first), or of whole rows of at most
# this many channels (channels-last). Its three float64 buffers (shift, two accumulators: 24 KiB) stay in
# a core's 32 KiB L1 while the input streams past.
SLAB_ELEMS = 1024

# Channels-last: values per chunk, caps on the number of row chunks. Rows of more than SLAB_ELEMS
# channels are cut into blocks of SLAB_ELEMS channels.
CL_CHUNK_ELEMS = 32768
CL_MAX_ROW_CHUNKS = 64
CL_MAX_PARTIALS = 1 << 20


# Channels per kernel call: wider inputs are processed in windows of this many channels, so a call's
# temporaries (per-channel float64 rows, coefficients, chunk partials: ~150 bytes a channel) are bounded.
CHANNEL_WINDOW = 1 << 15


def channel_windows(C: int) -> list:
    """The (c0, c1) windows a call over C channels is cut into (Python side)."""
    if C <= CHANNEL_WINDOW:
        return [(0, C)]
    return [(c0, min(C, c0 + CHANNEL_WINDOW)) for c0 in range(0, C, CHANNEL_WINDOW)]


def layout_of(A: int, C: int, B: int) -> tuple[bool, bool, bool]:
    """(channels-last, channels-first owned, short rows) of an (A, C, B) shape, in Python: the kernels'
    compile-time flags CL, OWNED, SHORT, so that each variant compiles one path."""
    if B == 1:
        return True, False, False
    owned = C >= SPLIT_BELOW_CHANNELS or -(-A // max(1, CF_CHUNK_ELEMS // B)) == 1
    return False, owned, B < SHORT_ROW


@helper(inline=True)
def task_range(t, nt, total):
    """The t-th of nt balanced contiguous ranges of range(total)."""
    return (t * total) // nt, ((t + 1) * total) // nt


@helper(inline=True)
def n_chunks(rows, rows_per_chunk):
    return (rows + rows_per_chunk - 1) // rows_per_chunk


@helper(inline=True)
def cf_rows_per_chunk(B):
    return max2(1, CF_CHUNK_ELEMS // B)


@helper(inline=True)
def channel_owned(A, C, B):
    """True where a channels-first pass gives each thread whole channels (see module doc)."""
    return B > 1 and (C >= SPLIT_BELOW_CHANNELS or n_chunks(A, cf_rows_per_chunk(B)) == 1)


@helper(inline=True)
def slab_channels(B):
    """Channels per short-row slab (1 for long rows)."""
    if B >= SHORT_ROW:
        return 1
    return max2(1, SLAB_ELEMS // B)


# Channels-first long rows, owned channels: a thread takes its channels in groups, reading a group's rows
# row by row (its channels' rows of one outer index are one contiguous run) instead of one channel's rows,
# which are C * B values apart. The hardware prefetchers need long runs: measured on one core, the shifted
# sums of a float32 (64, 128, 3136) array took 8.0 ms a channel at a time, 5.9 / 5.1 / 4.7 / 4.3 ms in
# groups of 2 / 4 / 8 / 16 channels, 4.1 ms as one linear run (float64: 12.2, 9.7, 8.3, 8.5, 8.5, 8.1 ms).
# A group is as many channels as make runs of LONG_RUN_BYTES, fewer where the group's input would exceed
# a budget (the output pass reads it again right after its statistics): LONG_GROUP_BYTES, within L3, for
# the training forward; the backward's sums read two arrays and gained nothing from groups that spill
# out of L2 (2 threads, float32 (64, 128, 56, 56): 12.6-13.7 ms a channel at a time, 13.2-15.7 ms in
# groups of 5; (32, 64, 56, 56) 2.8-3.3 against 3.3 ms), so its budget is LONG_GROUP_BYTES_BWD. The
# training forward in groups: (32, 64, 56, 56) float32 2.25-2.36 -> 1.76-1.88 ms, (64, 128, 56, 56)
# 8.7-8.8 -> 7.1-8.3 ms (2 threads, medians of 21 interleaved rounds, alternating processes); float64
# varies from process to process: (64, 128, 56, 56) 13.7-15.2 ms before (5 processes), 9.1-9.6 ms in 2
# of 9 processes after, 11.0 in one, 13.2-14.7 in 6; (32, 64, 56, 56) 3.4-3.6 -> 2.4-3.5 ms. The
# statistics and gradient-sum kernels (synchronized BN, precise statistics) read their groups once, within
# LONG_GROUP_BYTES: float32 (64, 128, 3136) statistics 4.9-5.1 -> 3.3-3.4 ms, gradient sums 8.4-8.8 ->
# 6.4 ms; (32, 64, 3136) 1.1-1.2 -> 0.5-0.7 ms and 1.7-2.0 -> 0.8-1.2 ms.
# Per-channel results do not depend on the grouping (each channel's rows are added in row order).
LONG_RUN_BYTES = 64 << 10
LONG_GROUP_BYTES = 8 << 20
LONG_GROUP_BYTES_BWD = 1 << 20


@helper(inline=True)
def long_group(A, B, itemsize, arrays, budget):
    """Channels per group of owned long-row channels (see LONG_RUN_BYTES) when ``arrays`` arrays of
    ``itemsize`` bytes a value are read, at most ``budget`` bytes of them a group."""
    row = B * itemsize
    g = (LONG_RUN_BYTES + row - 1) // row
    return max2(1, min2(min2(g, budget // max2(1, arrays * A * row)), SLAB_ELEMS))


@helper(inline=True)
def task_channels(t, nt, C, B):
    """The channels [c0, c1) of the t-th of nt shares of owned channels: whole short-row slab groups
    (``slab_channels``), or channels."""
    S = slab_channels(B)
    g0, g1 = task_range(t, nt, n_chunks(C, S))
    return g0 * S, min2(C, g1 * S)


@helper(inline=True)
def cl_block(C):
    """Channels per channels-last block."""
    return min2(C, SLAB_ELEMS)


# Outputs of at least this many bytes are written with streaming stores (intrin.stream_store). Below it
# the output is better left in cache for its consumer. Measured crossover, 2 threads, float32 inference
# over rows of 4096 values, streaming / plain time: 8 MiB 1.26, 12 MiB 1.08, 16 MiB 0.90, 20 MiB 0.82,
# 48 MiB 0.70, 96 MiB 0.72 (a plain copy: 1.25, 1.14, 0.94, 0.83, 0.67, 0.73).
STREAM_MIN_BYTES = 16 << 20
# Streaming stores pay only in long runs: one core writing 102.8 MB in runs of 512 bytes took 27 ms with
# streaming stores against 10 ms with ordinary ones, in runs of 4 KiB 7.7 against 9.2 ms, in runs of
# 16 KiB 5.9 against 8.5 ms (aligned runs, no fence between them). So a channels-first pass streams only
# where its rows hold at least STREAM_RUN_ELEMS values (a thread's rows of one channel are far apart);
# short channels-first rows never stream. Channels-last passes write one contiguous run per task (below).
STREAM_RUN_ELEMS = 2048
# Channels-last streaming passes write slabs of whole rows of about this many values, with the
# coefficients tiled to the slab's length (fwd.affine_cl, bwd.grad_apply_cl). The slabs of a task are
# consecutive, so the write stream stays contiguous however short each slab is; what the slab length
# sets is the size of the tiled coefficients, which share L1 with the input. Measured, 2 threads, float32
# y = (x - M) * K + T over 25.7 MB (C = 64, 128, 512; streaming stores), time per slab length: 128
# values 1.00 ms, 256 0.76, 512 0.64-0.67, 1024 0.75-0.78, 2048 1.14-1.23 (a plain scalar-coefficient
# streaming pass: 0.70).
CL_STREAM_SLAB_ELEMS = 512


def streams(A: int, C: int, B: int, nbytes: int) -> bool:
    """Whether a pass writing ``nbytes`` over an (A, C, B) layout uses streaming stores (Python side:
    the kernels' STREAM flag)."""
    if nbytes < STREAM_MIN_BYTES:
        return False
    return B == 1 or B >= STREAM_RUN_ELEMS


@helper(inline=True)
def cl_rows_per_chunk(A, C):
    """Rows per channels-last chunk: ~CL_CHUNK_ELEMS values per (row chunk, channel block), at most
    CL_MAX_ROW_CHUNKS row chunks (fewer when there are many channel blocks or many channels)."""
    cb = cl_block(C)
    nb = n_chunks(C, cb)
    k = n_chunks(A, max2(1, CL_CHUNK_ELEMS // cb))
    k = min2(min2(k, max2(1, (CL_MAX_ROW_CHUNKS + nb - 1) // nb)), max2(1, CL_MAX_PARTIALS // C))
    return n_chunks(A, max2(1, k))


@helper(inline=True)
def tasks_for(units, threads):
    """Number of tasks for ``units`` independent work units on ``threads`` threads."""
    return max2(1, min2(units, threads))


@helper(inline=True)
def stream_for(nbytes):
    return nbytes >= STREAM_MIN_BYTES


@helper(inline=True)
def elementwise_units(A, C, B, cl, owned, short, stream):
    """Work units of an elementwise pass: rows (channels-first long rows, channels-last), slabs (short
    rows); see fwd.affine_task."""
    if cl:
        return A
    if short:
        return n_chunks(C, slab_channels(B)) * A
    return A * C


@helper(inline=True)
def reduction_units(A, C, B, cl, owned):
    """Work units of a reduction: (row chunk, channel block) pairs (channels-last), slab groups of owned
    channels, or (channel, chunk) pairs (channels-first split)."""
    if cl:
        return n_chunks(A, cl_rows_per_chunk(A, C)) * n_chunks(C, cl_block(C))
    if owned:
        return n_chunks(C, slab_channels(B))
    return C * n_chunks(A, cf_rows_per_chunk(B))
