"""HQQ (``hqq`` package, ``Quantizer.dequantize``): ``W = F(F(W_q - zero) * scale)``.

``zero`` and ``scale`` are floats of the result's dtype F; each step is rounded to F, as
torch computes on F tensors (FORMATS.md). ``W_q`` is HQQ's ``BitPack`` layout of the
matrix of values (``axis=1``: ``[numel / group_size, group_size]``, a row a group;
``axis=0``: ``[group_size, numel / group_size]``, a column a group), packed along its rows:
``8 / bits`` planes of ``step`` rows stacked in each byte, plane ``j`` (rows
``j * step ...``) at bit ``bits * (8 / bits - 1 - j)``; 3 bits pack ten planes in int32
words, plane ``j`` at bit ``27 - 3 * j``, the rows padded to a multiple of ten. The
kernel reads the fields straight from the words, one plane a call (the same kernel for
every plane: the bit offset is a run-time argument).
"""

from __future__ import annotations

import numpy as np

from ..arrays import refuse_unpacked
from ..errors import InvalidProblemError, UnsupportedError
from ..ir import HQQ_BITS, HqqDequantizeDescriptor, check_int
from . import _inputs
from .plan import FormatPlan


def plane_layout(bits: int) -> tuple[int, int]:
    """(planes a word, bit offset of plane 0) of HQQ's packing for ``bits``."""
    if bits == 3:
        return 10, 27
    return 8 // bits, 8 - bits


def plane_words(W_q, bits: int) -> np.ndarray:
    """``W_q`` as its words: uint8 (int32 for 3 bits); a float view (HQQ's
    ``view_as_float``) or a signed/unsigned twin is viewed, not converted."""
    arr = _inputs.array(W_q, "W_q", 2)
    dtype, shape = _inputs.dtype_of(arr), tuple(arr.shape)
    want = np.dtype(np.int32 if bits == 3 else np.uint8)
    refuse_unpacked(dtype, "W_q", f"HQQ's packed {want} words")
    if dtype.kind in "fV" or (dtype.kind in "iu" and dtype.itemsize == want.itemsize):
        if (shape[1] * dtype.itemsize) % want.itemsize:
            raise InvalidProblemError(f"W_q of dtype {dtype} and shape {shape} cannot "
                                      f"be viewed as {want} words")
        return _inputs.view_as(arr, want, "W_q")
    raise InvalidProblemError(f"W_q has dtype {dtype}; HQQ packs {bits}-bit values in "
                              f"{want} words")


def _group_params(obj, name: str, shape: tuple[int, int]) -> np.ndarray:
    """One value a group: ``[R, 1]`` for axis=1 (``[R]`` too), ``[1, C]`` for axis=0."""
    given = _inputs.shape_of(obj)
    if (int(np.prod(given)) != shape[0] * shape[1] or len(given) > 2
            or (len(given) == 2 and given != shape)):
        raise InvalidProblemError(f"{name} has shape {given}, expected {shape}: one "
                                  "value a group")
    return _inputs.reshaped(_inputs.array(obj, name, len(given)), shape)


def dequantize(W_q, scale, zero, nbits: int, shape, group_size=None, axis: int = 1,
               device=None, out=None):
    """HQQ's ``Quantizer.dequantize(W_q, meta)`` bit for bit, from the meta's fields.

    ``W_q`` as ``Quantizer.quantize`` packs it (``meta["packing"]``; a float view is read
    as its words), ``scale`` and ``zero`` of one float dtype F (HQQ's ``compute_dtype``;
    the result has it), ``nbits`` one of 8, 4, 3, 2, 1, ``shape`` the weight's
    (``meta["shape"]``), ``group_size`` ``meta["group_size"]`` (None: a row of ``shape`` is
    a group), ``axis`` ``meta["axis"]``: 1 (HQQLinear's default) groups rows of
    ``[numel / group_size, group_size]``, scale ``[R, 1]``; 0 groups columns of
    ``[group_size, numel / group_size]``, scale ``[1, C]``. ``out``: an array of F and
    ``shape`` to write instead of allocating one. CUDA arrays run on their device and the
    current stream (``device``: where, when the arrays do not say it; default: where they
    live).
    """
    bits = check_int(nbits, "nbits", minimum=0)
    if bits not in HQQ_BITS:
        raise UnsupportedError(f"nbits={nbits} is not supported for HQQ; expected one of "
                               f"{', '.join(map(str, HQQ_BITS))}")
    if axis not in (0, 1):
        raise UnsupportedError(f"axis={axis!r}: HQQ groups along axis 0 or 1")
    shape = tuple(check_int(n, "shape", minimum=0) for n in shape)
    numel = int(np.prod(shape, dtype=np.int64))
    gs = shape[-1] if group_size is None else check_int(group_size, "group_size", minimum=1)
    if not shape or numel % gs:
        raise InvalidProblemError(f"shape={shape} does not hold whole groups of "
                                  f"group_size={gs}")
    rows, cols = (numel // gs, gs) if axis == 1 else (gs, numel // gs)
    words = plane_words(W_q, bits)
    planes, top = plane_layout(bits)
    step = words.shape[0]
    if words.shape[1] != cols or not (planes * (step - 1) < rows <= planes * step
                                      if bits == 3 else rows == planes * step):
        expect = (f"({-(-rows // planes)}, {cols})" if bits == 3
                  else f"({rows // planes}, {cols})")
        raise InvalidProblemError(f"W_q has shape {words.shape}, expected {expect} for "
                                  f"{bits}-bit HQQ of shape {shape}, axis={axis}, in groups "
                                  f"of {gs}")
    groups = (rows, 1) if axis == 1 else (1, cols)
    s, float_dtype = _inputs.float_array(_group_params(scale, "scale", groups), "scale")
    z = _group_params(zero, "zero", groups)
    if _inputs.dtype_of(z) != _inputs.dtype_of(s):
        raise InvalidProblemError(f"zero has dtype {_inputs.dtype_of(z)}; HQQ's zero and scale "
                                  f"must share the compute dtype (scale is {_inputs.dtype_of(s)})")
    y, result = _inputs.output((rows, cols), float_dtype, scale, out, result_shape=shape)
    part = _inputs.row_range
    caller = {"q": ("W_q", None), "zero_point": ("zero", None), "y": ("out", None)}
    for j in range(planes):
        first, last = j * step, min(rows, (j + 1) * step)
        if first >= last:
            break
        shift = top - bits * j if bits != 8 else 0
        if axis == 1:  # the plane's rows are its groups: one call
            desc = HqqDequantizeDescriptor(last - first, cols, cols, float_dtype, bits, shift)
            _inputs.run(FormatPlan, desc, {"q": part(words, 0, last - first),
                                           "scale": part(s, first, last),
                                           "zero_point": part(z, first, last),
                                           "y": part(y, first, last)}, W_q, device, caller)
            continue
        # axis=0: every column is a group, so a row of the plane is a problem of groups of 1
        desc = HqqDequantizeDescriptor(1, cols, 1, float_dtype, bits, shift)
        for r in range(first, last):
            _inputs.run(FormatPlan, desc, {"q": part(words, r - first, r - first + 1),
                                           "scale": s, "zero_point": z,
                                           "y": part(y, r, r + 1)}, W_q, device, caller)
    return result() if out is not None else result().reshape(shape)
