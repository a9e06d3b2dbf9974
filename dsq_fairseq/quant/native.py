"""Native CPU kernels (``native_kernels.c``): BFP quantize (round to nearest or stochastic, the
random stream computed in registers), pack, unpack; 1-bit dropout / ReLU masks.

Why: on CPU the inductor kernels of :mod:`.fast` split BFP into a reduction and an elementwise
pass (the per-block exponent arithmetic did not vectorize when fused), reduce rows of 16 with one
horizontal max each, and every compiled call pays ~50-90 us of dynamo guards. The C kernels read
``x`` once per block (the block stays in L1 between its maximum and its quantization), reduce 16
contiguous blocks with one transposing max tree, and are called through :mod:`ctypes` (a few us).
Measured on 2 cores (AVX-512): ``4096x4096`` BFP4 along the last dim 31 -> 18 ms, along dim 0
25 -> 19 ms (``torch.clone``: 16-17 ms).

Instruction sets: the kernels are written once against the 16-lane layer of ``native_simd.h``,
which is AVX-512 (F/BW/VL/DQ) itself or AVX2 with two 256-bit halves per vector; the build takes
the wider one the CPU has (:func:`isa`). ``DSQ_NATIVE_ISA=avx2`` builds the AVX2 kernels on an
AVX-512 CPU (to test or compare them).

Bits: the kernels do the references' IEEE operations in the same order (multiplications by exact
powers of two, round half to even, clamp, two multiplications back); NaN propagates through them as
through the eager ops, ``inf`` and subnormals follow the references' rules
(``tests/test_quant_native.py`` checks all of it against :func:`.bfp.bfp_quantize` and
:func:`.packing.pack` bit for bit, on whichever instruction set was built).

Build: on first use, ``$CC`` (default ``cc``) ``-O3 -march=native -fopenmp -ffp-contract=off
-shared`` into ``$DSQ_NATIVE_CACHE`` (default ``$XDG_CACHE_HOME/dsq_fairseq`` or
``~/.cache/dsq_fairseq``), one library per source, header, compiler, flags and CPU (its
``/proc/cpuinfo`` flags), written atomically; ~5 s (every helper is inlined into every
kernel). No compiler, a failed build, a CPU with
neither AVX-512 nor AVX2, ``DSQ_NATIVE=0`` or :func:`.fast.set_enabled(False)` leave
:func:`available` false and the callers on the ``torch.compile`` paths. Threads:
``torch.get_num_threads()`` (OpenMP, serial below 32768 elements).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from ._blocks import pnq as _pnq

__all__ = ["available", "available_for", "bfp_pack", "bfp_quantize", "bfp_unpack", "isa",
           "set_enabled", "bfp_pair", "mask_apply", "mask_pack", "supports_pack",
           "supports_pair", "uniform"]

_SOURCE = Path(__file__).with_name("native_kernels.c")
_HEADERS = (Path(__file__).with_name("native_simd.h"),)
# -ffp-contract=off: the AVX2 layer's products and sums are plain vector arithmetic, which GCC
# would otherwise fuse into FMAs (one rounding instead of the reference's two)
_FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=gnu11",
          "-ffp-contract=off")
PACK_WIDTHS = (2, 4, 8, 16)
_lib: Optional[ctypes.CDLL] = None
_state = "unloaded"  # "unloaded" | "ready" | "unavailable"
_isa: Optional[str] = None
_enabled = os.environ.get("DSQ_NATIVE", "1").strip().lower() not in ("0", "false", "off", "")


def _cache_dir() -> Path:
    env = os.environ.get("DSQ_NATIVE_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dsq_fairseq"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _flags() -> Tuple[str, ...]:
    """The compiler flags: :data:`_FLAGS`, plus ``-mno-avx512f`` under ``DSQ_NATIVE_ISA=avx2``
    (the AVX2 kernels on an AVX-512 CPU, to test or compare them)."""
    isa = os.environ.get("DSQ_NATIVE_ISA", "").strip().lower()
    return _FLAGS + (("-mno-avx512f",) if isa == "avx2" else ())


def _build() -> Path:
    cc = os.environ.get("CC", "cc")
    sources = [_SOURCE.read_bytes(), *(h.read_bytes() for h in _HEADERS)]
    flags = _flags()
    digest = hashlib.sha256(
        b"\0".join([*sources, cc.encode(), " ".join(flags).encode(), _cpu_flags().encode(),
                    platform.machine().encode()])
    ).hexdigest()[:16]
    target = _cache_dir() / f"native_kernels-{digest}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([cc, *flags, "-o", tmp, str(_SOURCE)], check=True,
                       capture_output=True, text=True, timeout=120)
        os.replace(tmp, target)  # atomic: concurrent builders (test workers) never see half a file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _load() -> Optional[ctypes.CDLL]:
    global _lib, _state, _isa
    if _state == "unloaded":
        _state = "unavailable"
        try:
            lib = ctypes.CDLL(str(_build()))
        except (OSError, subprocess.SubprocessError) as exc:
            detail = getattr(exc, "stderr", "") or exc
            warnings.warn(f"dsq native CPU kernels unavailable ({detail}); using the "
                          "torch.compile paths", RuntimeWarning, stacklevel=3)
            return None
        width = lib.dsq_native_vectorized()
        if not width:
            return None  # no AVX-512 / AVX2 on this CPU: the compiled paths are the fast ones
        _isa = "avx512" if width == 512 else "avx2"
        i64, i32, f32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_void_p
        lib.dsq_bfp_quantize.argtypes = [ptr, ptr, i64, i64, i64, i64, i32, f32, i32, i32]
        lib.dsq_bfp_quantize.restype = None
        u32 = ctypes.c_uint32
        lib.dsq_bfp_quantize_sr.argtypes = [ptr, ptr, i64, i64, i64, i64, i32, f32, i32, u32, u32,
                                            i32]
        lib.dsq_bfp_quantize_sr.restype = None
        lib.dsq_uniform.argtypes = [ptr, i64, u32, u32, i32]
        lib.dsq_uniform.restype = None
        lib.dsq_bfp_pack.argtypes = [ptr, ptr, ptr, i64, i64, i64, i64, i32, i32, i64, f32, i32,
                                     i32]
        lib.dsq_bfp_pack.restype = i32
        lib.dsq_bfp_unpack.argtypes = [ptr, ptr, ptr, i64, i64, i64, i64, i32, i32, i64, i32]
        lib.dsq_bfp_unpack.restype = None
        lib.dsq_bfp_pair.argtypes = [ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, i32, i32, i32,
                                     i32]
        lib.dsq_bfp_pair.restype = i32
        for name in ("dsq_codes_join", "dsq_codes_split"):
            getattr(lib, name).argtypes = [ptr, ptr, i64, i32, i32]
            getattr(lib, name).restype = None
        lib.dsq_mask_pack.argtypes = [ptr, ptr, i64, i32, i32]
        lib.dsq_mask_pack.restype = None
        lib.dsq_mask_apply.argtypes = [ptr, ptr, ptr, i64, i32, f32, i32]
        lib.dsq_mask_apply.restype = None
        _lib, _state = lib, "ready"
    return _lib


def set_enabled(flag: bool) -> None:
    """Turn the native kernels on or off for this process (overrides ``DSQ_NATIVE``)."""
    global _enabled
    _enabled = bool(flag)


def isa() -> Optional[str]:
    """The instruction set the kernels run on: ``"avx512"`` or ``"avx2"`` (built on the first
    call that asks), ``None`` where they are unavailable."""
    return _isa if _load() is not None else None


def available_for(t: Tensor) -> bool:
    """Whether the native kernels are on for ``t``'s device: enabled (``DSQ_NATIVE``,
    :func:`set_enabled`, :func:`.fast.set_enabled`), a CPU tensor, and the library built and
    vectorized for this CPU (built on the first call that asks)."""
    from . import fast

    return _enabled and fast.enabled() and t.device.type == "cpu" and _load() is not None


def available(x: Tensor) -> bool:
    """:func:`available_for` a non-empty fp32 ``x``: the native kernels quantize / pack it."""
    return x.dtype == torch.float32 and x.numel() > 0 and available_for(x)


def bfp_quantize(x: Tensor, width: int, exponent_bits: int, block_size: int, dim: int,
                 inplace: bool = False, key: Optional[Tensor] = None) -> Tensor:
    """``bfp.bfp_quantize(x, width, exponent_bits, block_size, dim, "nearest")`` for a CPU fp32
    ``x`` (:func:`available`), validated arguments, ``dim >= 0``, ``width < 32``: a new
    contiguous tensor of ``x``'s shape, bit-identical; with ``inplace`` (a contiguous ``x``)
    written over ``x`` itself and ``x`` returned (every kernel reads a whole block before it
    writes any of it). With ``key`` (int64 ``[2]``, :func:`.rounding.draw_key`):
    ``rounding="stochastic"`` with that key's stream, ``u`` computed in the kernel."""
    xc = x.detach().contiguous()
    if inplace and xc.data_ptr() != x.data_ptr():
        raise ValueError("bfp_quantize(inplace=True) needs a contiguous tensor")
    out = xc if inplace else torch.empty_like(xc, memory_format=torch.contiguous_format)
    p, n, q = _pnq(xc.shape, dim)
    args = (xc.data_ptr(), out.data_ptr(), p, n, q, block_size, width - 2,
            float(2 ** (width - 1) - 1), 2 ** (exponent_bits - 1) - 1)
    if key is None:
        _lib.dsq_bfp_quantize(*args, torch.get_num_threads())
    else:
        k0, k1 = key.tolist()
        _lib.dsq_bfp_quantize_sr(*args, k0, k1, torch.get_num_threads())
    return x if inplace else out


def uniform(key: Tensor, shape: Tuple[int, ...]) -> Tensor:
    """``rounding.uniform_like(key, shape)`` (CPU, :func:`available_for`): the stream's ``u``
    for a tensor of ``shape``, fp32, bit-identical, one write pass."""
    out = torch.empty(shape, dtype=torch.float32)
    k0, k1 = key.tolist()
    _lib.dsq_uniform(out.data_ptr(), out.numel(), k0, k1, torch.get_num_threads())
    return out


def _direct(shape: torch.Size, width: int, dim: int, block_size: int) -> bool:
    """Whether the pack / unpack kernels can write / read the packed stream of ``shape``
    directly: every run of codes they handle starts and ends on a byte (``g = 8 / w``:
    ``Q % g == 0`` for blocks along a non-last dim; ``n % g == 0`` and ``B % g == 0`` along the
    last; always at widths 8 and 16). Otherwise they go through one byte per code and
    :func:`_join` / :func:`_split`."""
    if width >= 8:
        return True
    p, n, q = _pnq(shape, dim)
    g = 8 // width
    return (q % g == 0) if q > 1 else (n % g == 0 and block_size % g == 0)


def _high_offset(numel: int, width: int) -> int:
    """Where the high bytes of a width-16 stream of ``numel`` codes start (``pack_bits``: after
    the low bytes, padded to a whole group of 8 codes); 0 at other widths."""
    return -(-numel // 8) * 8 if width == 16 else 0


def _stream(numel: int, width: int) -> Tuple[Tensor, int]:
    """An uninitialised packed stream for ``numel`` codes at ``width`` with its padding bytes
    (after the last group of 8 codes; at width 16 after each of its two byte streams) zeroed,
    and :func:`_high_offset`."""
    codes = torch.empty(-(-numel // 8) * width, dtype=torch.uint8)
    hoff = _high_offset(numel, width)
    if hoff:
        codes[numel:hoff] = 0
        codes[hoff + numel:] = 0
    else:
        codes[numel * width // 8:] = 0
    return codes, hoff


def supports_pack(shape: torch.Size, width: int) -> bool:
    """Whether :func:`bfp_pack` / :func:`bfp_unpack` take a tensor of ``shape`` at ``width``:
    widths 2, 4, 8 and 16, any non-empty shape with at least one dim."""
    return width in PACK_WIDTHS and len(shape) > 0 and shape.numel() > 0


def bfp_pack(x: Tensor, width: int, exponent_bits: int, block_size: int, dim: int
             ) -> Optional[Tuple[Tensor, Tensor]]:
    """``(codes, exponents)`` of ``packing.pack(bfp_quantize(x, ...), "bfp", width, dim, ...)``
    (the stream zero-padded to whole groups of 8 codes; exponents ``[P, nblocks, 1, Q]`` int8:
    the quantizer's shared exponents) for a CPU fp32 ``x`` (:func:`available`,
    :func:`supports_pack`, ``dim >= 0``); ``None`` when ``x`` holds a NaN or inf (no code for
    them)."""
    xc = x.detach().contiguous()
    p, n, q = _pnq(xc.shape, dim)
    numel = xc.numel()
    direct = _direct(xc.shape, width, dim, block_size)
    if direct:
        codes, hoff = _stream(numel, width)
    else:
        codes, hoff = torch.empty(numel, dtype=torch.uint8), 0
    exps = torch.empty((p, -(-n // block_size), 1, q), dtype=torch.int8)
    threads = torch.get_num_threads()
    ok = _lib.dsq_bfp_pack(xc.data_ptr(), codes.data_ptr(), exps.data_ptr(), p, n, q, block_size,
                           width, width if direct else 8, hoff, float(2 ** (width - 1) - 1),
                           2 ** (exponent_bits - 1) - 1, threads)
    if not ok:
        return None
    if not direct:
        stream = torch.empty(-(-numel // 8) * width, dtype=torch.uint8)
        _lib.dsq_codes_join(codes.data_ptr(), stream.data_ptr(), numel, width, threads)
        codes = stream
    return codes, exps


def bfp_unpack(codes: Tensor, exps: Tensor, shape: torch.Size, width: int, block_size: int,
               dim: int) -> Tensor:
    """The fp32 tensor of ``shape`` that :func:`bfp_pack` packed into ``(codes, exps)``."""
    p, n, q = _pnq(shape, dim)
    numel = shape.numel()
    out = torch.empty(shape, dtype=torch.float32)
    codes, exps = codes.contiguous(), exps.contiguous()
    threads = torch.get_num_threads()
    direct = _direct(shape, width, dim, block_size)
    if not direct:
        c8 = torch.empty(numel, dtype=torch.uint8)
        _lib.dsq_codes_split(codes.data_ptr(), c8.data_ptr(), numel, width, threads)
        codes = c8
    hoff = _high_offset(numel, width)
    _lib.dsq_bfp_unpack(codes.data_ptr(), exps.data_ptr(), out.data_ptr(), p, n, q, block_size,
                        width, width if direct else 8, hoff, threads)
    return out


def supports_pair(x: Tensor, block_size: int) -> bool:
    """Whether :func:`bfp_pair` takes ``x``: :func:`available`, at least 2-D, blocks of 16 and a
    last dim that is a multiple of 16."""
    return (block_size == 16 and x.dim() >= 2 and x.shape[-1] % 16 == 0 and available(x))


def bfp_pair(x: Tensor, width_last: int, width_outer: int, exponent_bits: int,
             pack_outer: bool = False) -> Tuple[Tensor, Union[Tensor, Tuple[Tensor, Tensor], None]]:
    """Two BFP round-to-nearest quantizations of ``x`` (:func:`supports_pair`, blocks of 16,
    widths 2..31) in one pass over it: along the last dim at ``width_last``, and along the
    second-to-last at ``width_outer`` -- as an fp32 tensor, or with ``pack_outer`` as the
    ``(codes, exponents)`` of :func:`bfp_pack` (``width_outer`` 2/4/8/16; ``None`` when ``x``
    holds a NaN or inf). Each bit-identical to :func:`bfp_quantize` / :func:`bfp_pack`."""
    xc = x.detach().contiguous()
    q = xc.shape[-1]
    n = xc.shape[-2]
    p = xc.numel() // (n * q) if xc.numel() else 0
    out_r = torch.empty_like(xc, memory_format=torch.contiguous_format)
    out_c = codes = exps = None
    hoff = 0
    if pack_outer:
        codes, hoff = _stream(xc.numel(), width_outer)
        exps = torch.empty((*xc.shape[:-2], -(-n // 16), 1, q), dtype=torch.int8)
    else:
        out_c = torch.empty_like(out_r)
    ptr = (lambda t: None if t is None else t.data_ptr())  # noqa: E731
    ok = _lib.dsq_bfp_pair(xc.data_ptr(), out_r.data_ptr(), ptr(out_c), ptr(codes), ptr(exps),
                           hoff, p, n, q, width_last, width_outer, 2 ** (exponent_bits - 1) - 1,
                           torch.get_num_threads())
    if not pack_outer:
        return out_r, out_c
    return out_r, ((codes, exps.view(p, -(-n // 16), 1, q)) if ok else None)


MASK_NONZERO, MASK_NOT_POSITIVE = 0, 1
"""Mask kinds of :func:`mask_pack`: dropout's ``noise != 0``, ReLU's ``y <= 0``."""


def mask_pack(x: Tensor, kind: int) -> Tensor:
    """``packing.pack_bits((x != 0) or (x <= 0), 1)`` (``kind``: :data:`MASK_NONZERO` /
    :data:`MASK_NOT_POSITIVE`) of a CPU fp32 ``x`` (:func:`available`): ``ceil(n / 8)`` bytes,
    bit ``i % 8`` of byte ``i // 8`` for element ``i`` in row-major order."""
    xc = x.detach().contiguous()
    n = xc.numel()
    bits = torch.empty(-(-n // 8), dtype=torch.uint8)
    _lib.dsq_mask_pack(xc.data_ptr(), bits.data_ptr(), n, kind, torch.get_num_threads())
    return bits


def mask_apply(bits: Tensor, g: Tensor, kind: int, scale: float = 0.0) -> Tensor:
    """The backward of a :func:`mask_pack` mask on a CPU fp32 gradient ``g``: dropout
    (:data:`MASK_NONZERO`) ``g * (bit ? scale : 0)``, ReLU (:data:`MASK_NOT_POSITIVE`)
    ``bit ? 0 : g``; a new contiguous tensor of ``g``'s shape."""
    gc = g.contiguous()
    out = torch.empty_like(gc, memory_format=torch.contiguous_format)
    _lib.dsq_mask_apply(bits.data_ptr(), gc.data_ptr(), out.data_ptr(), gc.numel(), kind, scale,
                        torch.get_num_threads())
    return out
