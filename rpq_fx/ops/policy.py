"""The path policy of ``rpq_fx::linear``: compute in the compressed domain or expand the weight, per call.

A rough CPU cost model (:func:`choose_path`) picks the cheaper path for each call (on CUDA with the Triton
kernels, a batch-size rule that no GPU has timed yet); ``RPQ_FX_PATH`` (read once, when rpq_fx is
imported) or :func:`compute_path` (a block of code) force one.

Paths: ``"compressed"`` (the weight never built; on the CPU, batches of one or two rows with 33-256 codewords use
32-bit lookup tables where the CPU has AVX-512 VBMI, as close to the exact result as float32 is), ``"expand"``, and two opt-in paths that
trade accuracy for speed: ``"lut8"`` / ``"lut16"``, the compressed forward through 8- / 16-bit lookup tables
(on fitted MiniLM layers at batch 1, 8-bit tables added 4-8% of the output's norm on average and up to 56% on one
row, 16-bit 2e-4 to 3e-4: ``benchmarks/results/lut_error.md``; the C++ kernels on a CPU with AVX-512 VBMI, uint8
codes, float32 or bfloat16 only; elsewhere, for the backward and above 8 rows, they compute as ``"compressed"``).
``"auto"`` never picks an opt-in path.
"""

import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from .. import _kernels, _triton

__all__ = ["PATHS", "LUT_BITS", "choose_path", "compute_path", "forced_path", "lut_applies"]

PATHS = ("auto", "compressed", "expand", "lut8", "lut16")
LUT_BITS = {"lut8": 8, "lut16": 16}  # the opt-in paths' table widths
# The opt-in lookup-table paths compute row by row: above this many rows the blocked float32 kernel was as fast or
# faster (lut8 at d = 4: 7.3 ms against 7.4 at batch 8, 13.2 against 7.2 at 16, one thread), so they compute as
# "compressed" there.
_LUT_MAX_ROWS = 8
_PATH_ENV = "RPQ_FX_PATH"

# The C++ forward's cost per (slice, output row) pair for one batch block of each width (ns, one thread), and per
# multiply-add of a task's table: timed on the 2-core AVX-512 machine (4096x4096, d = 2, 4, 8 and 256, K = 16 and 256,
# float32, medians of CPU time on a loaded machine; benchmarks/linear.py).
_PAIR_NS = {1: 0.35, 2: 0.6, 4: 0.6, 8: 0.65, 16: 0.75, 32: 1.1}
_TABLE_MAC_NS = 0.028
# Batch blocks of 2-32 columns at d = 1, 2, 4, 8 hold the block's x in registers (csrc ``table_rows``): a table entry
# costs its store plus d multiply-adds, 0.03 + 0.004 * d ns (1536x384 at 128 rows, K = 256 less K = 16, one thread,
# best CPU time on a loaded machine: d = 2, 4, 8 took 0.022, 0.0115, 0.008 ns per multiply-add, where the loop above
# took 0.015-0.029).
_HELD_DIMS = (1, 2, 4, 8)
_ENTRY_NS, _HELD_MAC_NS = 0.03, 0.004
# The 32-bit lookup-table forward (one or two rows): per (slice, output row) and per table entry quantised, one thread
# (the same machine, 4096x4096 at d = 2, 4, 8, medians of CPU time on a loaded machine); calls of more than about
# 60 us share their work with a helper thread (csrc ``split_phases``), as the halving below assumes.
_LUT_PAIR_NS = 0.07
_LUT_ENTRY_NS = 0.4
_LUT_AUTO_ROWS = 2  # the C++ kernels' kLutMaxRows
# reason: no GPU has run rpq_fx yet, so no GPU figures exist: a simple rule that benchmarks/gpu.py's table will
# confirm or replace. Up to this many rows the Triton compressed path (lookup tables up to 16 rows, tiles of W
# expanded in shared memory above) reads only the codes and L2-resident codebooks; above it, one write and read
# of the dense weight is small beside the cuBLAS GEMM it feeds.
_CUDA_COMPRESSED_MAX_BATCH = 256
_FAST_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)  # 16-bit floats summed in float32


def _valid(path: str, where: str) -> str:
    if path not in PATHS:
        raise ValueError(f"rpq_fx linear: {where} must be one of {PATHS}, got {path!r}")
    return path


_override = [_valid(os.environ.get(_PATH_ENV) or "auto", _PATH_ENV)]  # reason: read once, not per call


@contextmanager
def compute_path(path: str) -> Iterator[None]:
    """Within the block, every ``rpq_fx::linear`` call left to choose (``path="auto"``) uses ``path``
    (``"compressed"``, ``"expand"``, or ``"auto"`` for the cost model), its backward too. Process-wide:
    the autograd engine may run a backward on another thread."""
    _override.append(_valid(path, "compute_path"))
    try:
        yield
    finally:
        _override.pop()


def forced_path(path: str) -> str:
    """``path``, or for ``"auto"`` the path :func:`compute_path` / ``RPQ_FX_PATH`` force now."""
    return _override[-1] if path == "auto" else _valid(path, "path")


def _padded_batch(batch: int) -> int:
    """The batch the C++ kernels compute for: blocks of 1, 2, 4, 8, 16 or 32 columns."""
    if batch <= 16:
        return 1 << max(0, (batch - 1).bit_length())
    return -(-batch // 32) * 32


def _cost_ns(path: str, batch: int, in_features: int, out_features: int, num_codebooks: int, num_codes: int,
             codebook_dim: int, dtype: torch.dtype, device_type: str, fast_kernels: bool, backward: bool, threads: int,
             lut_rows: int) -> float:
    """A rough time model (nanoseconds), fitted to 2-core AVX-512 CPU measurements (benchmarks/linear.py).

    Only the ratio of the two paths matters. The dense weight is ``out * in`` values; the compressed
    path's backward scratch is ``C * K * B`` values, and above glibc's largest mmap threshold (32 MiB)
    a fresh buffer costs page faults.
    """
    B, N, C, K, d = batch, out_features, num_codebooks, num_codes, codebook_dim
    weight = N * in_features
    if device_type == "cuda":
        # reason: stock ops on CUDA (no Triton), untimed (no GPU in CI); bandwidth and tensor-core rates of a
        # recent data-centre GPU
        mac, move, add = 1 / 50e3, 1 / 500.0, 1 / 300.0
        launch = 4 * 5e3
        compressed = launch + mac * B * K * in_features + add * B * C * N + move * C * K * d
        expand = launch + move * 2 * weight + mac * B * weight
        return (2 * compressed if backward else compressed) if path == "compressed" else (
            (2 * expand + move * 2 * weight) if backward else expand)
    itemsize = dtype.itemsize
    if fast_kernels and dtype == torch.float32 and not backward and path == "compressed":
        return _compressed_forward_ns(B, in_features, N, C, K, d, threads, lut_rows)
    # reason: ATen's CPU float16 GEMM (no AVX512-FP16 here) ran 34x slower than float32's (64x768 by 768x768, one
    # thread); the C++ kernels compute float16's products in float32
    slow_half = 34.0 if dtype == torch.float16 else itemsize / 4
    expansion = 1.0 * weight  # the weight built in cache-sized blocks, and read once by a GEMM
    gemm = 0.013 * slow_half * B * weight
    mac = 0.007 * (1.0 if dtype == torch.float16 and fast_kernels else slow_half)
    row_add = (0.27 if fast_kernels else 0.6) * itemsize / 4
    padded = _padded_batch(B) if fast_kernels else max(B, 1)
    table = mac * max(B, 8) * K * in_features + 0.15 * C * K * d
    if not backward:
        if path == "compressed":
            return table + row_add * padded * C * N + 2e3
        return expansion + gemm + 2e3
    if path == "compressed":
        scratch = C * K * padded
        scratch_fresh = 2.0 if scratch * itemsize > 32 * 2**20 else 0.3
        return scratch_fresh * scratch + 2 * row_add * padded * C * N + 2 * table + 4e3
    # the weight rebuilt, two GEMMs, the dense weight gradient (block by block) and its sum into the codebooks
    return expansion + 2 * gemm + 0.5 * weight + 0.5 * weight + 10 * C * N + 4e3


def _compressed_forward_ns(batch: int, in_features: int, out_features: int, num_codebooks: int, num_codes: int,
                           codebook_dim: int, threads: int, lut_rows: int) -> float:
    """The float32 C++ forward (csrc/rpq_kernels.cpp ``forward_impl``): batch blocks of 1-32 columns, each cut into
    bands of rows that build their own table (K * in * width multiply-adds) and add C values per row; two threads."""
    width = 32 if batch > 16 else _padded_batch(batch)
    blocks = -(-batch // width)
    threads = max(1, threads)
    shortest = max(64, num_codes * codebook_dim // 8 if width == 1 else num_codes * codebook_dim)
    bands = min(max(1, -(-2 * threads // blocks)), max(1, out_features // shortest))
    pair = 0.08 if width == 1 and num_codes <= 32 else _PAIR_NS[width]  # one-row lookups by permutes: no gather
    gather = pair * blocks * num_codebooks * out_features
    if width > 1 and codebook_dim in _HELD_DIMS:
        tables = (_ENTRY_NS + _HELD_MAC_NS * codebook_dim) * blocks * bands * num_codes * num_codebooks * width
    else:
        tables = _TABLE_MAC_NS * blocks * bands * num_codes * in_features * width
    if 32 < num_codes <= 256 and batch <= lut_rows:
        # 32-bit tables in registers, row by row: lookups per (slice, output row), the table's quantisation per entry
        gather = batch * _LUT_PAIR_NS * num_codebooks * out_features
        tables = batch * (_TABLE_MAC_NS * num_codes * in_features + _LUT_ENTRY_NS * num_codebooks * num_codes)
    return (gather + tables) / 2 + 2e3


def _lut_max_rows() -> int:
    """Batches up to this many rows take the C++ kernels' 32-bit lookup tables: where they serve and the CPU has
    AVX-512 VBMI (the kernels check the same flag)."""
    return _LUT_AUTO_ROWS if _kernels.serving() and _cpu_has_vbmi() else 0


@functools.cache
def _cpu_has_vbmi() -> bool:
    # reason: torch reports only AVX512 / AVX2 (torch.backends.cpu.get_cpu_capability), not VBMI; Linux's flags
    try:
        with open("/proc/cpuinfo") as info:
            return any(line.startswith("flags") and "avx512vbmi" in line.split() for line in info)
    except OSError:
        return False


def choose_path(input: Tensor, codebooks: Tensor, codes: Tensor, path: str = "auto", backward: bool = False) -> str:
    """``"compressed"`` or ``"expand"`` for one linear call (``path`` forces it; :func:`compute_path` and
    ``RPQ_FX_PATH`` override ``"auto"``)."""
    path = forced_path(path)
    if path in LUT_BITS:
        rows = input.numel() // max(1, input.shape[-1])
        return path if not backward and rows <= _LUT_MAX_ROWS and lut_applies(input, codebooks, codes) \
            else "compressed"
    if path != "auto":
        return path
    num_codebooks, out_features = codes.shape
    in_features = input.shape[-1]
    batch = input.numel() // in_features if in_features else 0
    if _triton_applies(input, codebooks):
        return _cuda_path(batch)
    fast = _fast_kernels_apply(input, codebooks)
    return _auto_path(batch, in_features, out_features, num_codebooks, codebooks.shape[1], codebooks.shape[2],
                      input.dtype, input.device.type, fast, backward, torch.get_num_threads(), _lut_max_rows())


# reason: the cost model took about half of choose_path's 4 us, on every call of every layer; its answer depends only
# on these arguments (the threads and the lookup-table rows included), so it is computed once per layer shape
@functools.lru_cache(maxsize=4096)
def _auto_path(*args) -> str:
    """The cheaper path by :func:`_cost_ns` for ``_cost_ns``'s arguments after ``path``."""
    return "compressed" if _cost_ns("compressed", *args) <= _cost_ns("expand", *args) else "expand"


def _cuda_path(batch: int) -> str:
    """The path on CUDA where the Triton kernels compute (forward and backward alike; untimed, see above)."""
    return "compressed" if batch <= _CUDA_COMPRESSED_MAX_BATCH else "expand"


def _triton_applies(x: Tensor, codebooks: Tensor) -> bool:
    """Whether the Triton kernels compute this call (CUDA, float16 / bfloat16 / float32, one dtype), not stock ops."""
    return (x.device.type == "cuda" and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and codebooks.dtype == x.dtype and _triton.serving())


def lut_applies(x: Tensor, codebooks: Tensor, codes: Tensor) -> bool:
    """Whether the C++ lookup-table kernel computes this call fast: CPU with AVX-512 VBMI (elsewhere its scalar loop
    is slower than the float32 kernel), uint8 codes, at most 256 codewords, float32 or bfloat16 (one dtype)."""
    return (x.device.type == "cpu" and codes.dtype == torch.uint8 and codebooks.shape[1] <= 256
            and x.dtype in (torch.float32, torch.bfloat16) and codebooks.dtype == x.dtype and _kernels.serving()
            and _cpu_has_vbmi())


def _fast_kernels_apply(x: Tensor, codebooks: Tensor) -> bool:
    """Whether the C++ loops compute this call (CPU, one dtype of ``_FAST_DTYPES``), not stock ops."""
    return x.device.type == "cpu" and x.dtype in _FAST_DTYPES and codebooks.dtype == x.dtype and _kernels.serving()
