"""dqgen's kernels as PyTorch operators: ``torch.ops.dqgen.*``, with autograd and fakes.

Importing this module registers, under the ``dqgen::`` namespace (``torch.library``):

* the family: ``dequantize_per_group``, ``quantize_per_group`` and their straight-through
  backward ops ``dequantize_per_group_backward``, ``quantize_per_group_backward``;
* ``fake_quantize_per_group``, quantize then dequantize in one op, for quantization-aware
  training (its gradient runs both backward plans);
* the checkpoint formats: ``gptq_dequantize``, ``awq_dequantize``, ``ggml_dequantize``,
  ``packed_dequantize``, ``floatzp_dequantize``, ``hqq_dequantize``;
* ``linear`` (``x @ W.T + bias`` with W quantized, never written out) and its x gradient
  ``linear_backward``; ``QuantLinear`` and ``quantize_model`` (``dqgen.torch_nn``) build
  modules on them.

Each op's CPU and CUDA kernels are the plain functions (``dqgen.api``, ``dqgen.formats``),
which take the tensors without copying (CPU tensors through ``.numpy()`` views, CUDA tensors
by address, on the current stream) and return tensors of the same kind. Fake (meta)
implementations give the result's shape
and dtype, so ``torch.compile(fullgraph=True)`` and ``torch.export`` trace the ops without
a graph break.
A program exported with these ops needs ``import dqgen.torch`` before it is loaded.

Autograd (``register_autograd``): the integer tensors (``q``, zero points, packed words)
carry no gradient in PyTorch, so quantize's result is not differentiable on its own; the
straight-through pair lives in ``fake_quantize_per_group``, whose input gradient is
``QuantizePerGroupBackwardPlan`` applied to ``DequantizePerGroupBackwardPlan``'s result
(SPEC.md sections 3 and 4, each formula bit for bit). Gradients for ``scale`` are torch code
(per-group sums, in the compute type): the exact derivative for ``dequantize_per_group``
and the backward ops, LSQ's estimator for ``fake_quantize_per_group``. The format ops have
no gradient; ``linear``'s x has one (``linear_backward``), its quantized weight none.
"""

import inspect
from typing import List, Optional

try:
    import torch
except ImportError as exc:  # dqgen itself needs no torch; only this module does
    raise ImportError("dqgen.torch needs PyTorch: install torch (pip install torch) to use "
                      "dqgen's kernels as torch operators", name="torch") from exc

from dqgen import api
from dqgen.errors import InvalidProblemError, UnsupportedError
from dqgen.formats import awq, floatzp, ggml, gptq, hqq, packed
from dqgen.ir import (FLOAT_DTYPES, byte_storage_for, GPTQ_BITS, GPTQ_V1_ZEROS, HQQ_BITS, INT_DTYPES,
                      PACKED_DTYPES, STORAGE_DTYPES, DType, check_int, parse_dtype,
                      resolve_q_range)

__all__ = ["dequantize_per_group", "quantize_per_group", "dequantize_per_group_backward",
           "quantize_per_group_backward", "fake_quantize_per_group", "gptq_dequantize",
           "awq_dequantize", "ggml_dequantize", "packed_dequantize", "floatzp_dequantize",
           "hqq_dequantize", "linear", "linear_backward", "QuantLinear", "quantize_model"]

Tensor = torch.Tensor
_DISPATCH_KEYS = ("CPU", "CUDA")
_TORCH_DTYPE = {DType.F32: torch.float32, DType.F64: torch.float64, DType.F16: torch.float16,
                DType.BF16: torch.bfloat16, DType.S8: torch.int8, DType.U8: torch.uint8,
                DType.U4: torch.uint8, DType.S4: torch.uint8}


_LIBRARY = torch.library.Library("dqgen", "DEF")


class _Op:
    """One ``dqgen::`` operator, registered with the dispatcher directly.

    ``torch.library.custom_op`` wraps every call in several Python layers (about 8 us a
    call on a 2-core Xeon); this registers the plain function as the CPU and CUDA kernel
    and a small Autograd kernel of its own, so a call costs about what the dispatcher
    itself does. ``register_fake`` and ``register_autograd`` take what custom_op's do.
    The Autograd kernel runs the op below autograd when no input needs a gradient (what
    torch's opcheck asks of a kernel at that key); otherwise an ``autograd.Function``
    built from the registered formula, or, for an op without one, a Function whose
    backward says so.
    """

    def __init__(self, name: str, fn):
        schema = torch.library.infer_schema(fn, mutates_args=())
        _LIBRARY.define(name + schema)
        self.overload = getattr(torch.ops.dqgen, name).default
        self.__name__, self.__doc__ = name, fn.__doc__
        params = inspect.signature(fn).parameters.values()
        self._defaults = tuple(p.default for p in params)
        self._backward = self._setup = None
        self._function = self._make_function()
        for key in _DISPATCH_KEYS:
            _LIBRARY.impl(name, fn, key)
        _LIBRARY.impl(name, self._autograd_kernel, "Autograd")

    def __call__(self, *args, **kwargs):
        return self.overload(*args, **kwargs)

    def register_fake(self, fake):
        torch.library.register_fake(self.overload, fake, lib=_LIBRARY)
        return fake

    def register_autograd(self, backward, setup_context):
        self._backward, self._setup = backward, setup_context

    def _autograd_kernel(self, *args):
        if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
            # the dispatcher drops trailing arguments equal to their defaults
            return self._function.apply(*args, *self._defaults[len(args):])
        with torch._C._AutoDispatchBelowAutograd():
            return self.overload(*args)

    def _make_function(self):
        op = self

        class Function(torch.autograd.Function):
            @staticmethod
            def forward(*args):
                with torch._C._AutoDispatchBelowAutograd():
                    return op.overload(*args)

            @staticmethod
            def setup_context(ctx, inputs, output):
                if op._setup is not None:
                    op._setup(ctx, inputs, output)

            @staticmethod
            def backward(ctx, *grads):
                if op._backward is None:
                    raise UnsupportedError(f"dqgen::{op.__name__} has no gradient: its "
                                           "inputs cannot be trained through it")
                return op._backward(ctx, *grads)

        Function.__name__ = Function.__qualname__ = f"{_camel(self.__name__)}Backward"
        return Function


def _camel(op_name: str) -> str:
    """``dequantize_per_group`` -> ``DequantizePerGroup``: the Function's name in graphs."""
    return "".join(part.capitalize() for part in op_name.split("_"))


def _op(name: str):
    """Register the decorated function as the ``dqgen::name`` operator (see ``_Op``)."""
    return lambda fn: _Op(name, fn)


def _float(t: Tensor, name: str) -> DType:
    return parse_dtype(t.dtype, f"{name}.dtype", FLOAT_DTYPES)


def _compute(dtype: torch.dtype) -> torch.dtype:
    """The compute type C of SPEC.md section 2: f64 for f64 data, else f32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rank(t: Tensor, name: str) -> None:
    if t.dim() == 0:
        raise InvalidProblemError(f"{name} must have at least one dimension")


def _with_last(t: Tensor, last, dtype: torch.dtype) -> Tensor:
    """A fake result: ``t``'s leading dims, ``last`` columns, contiguous."""
    return t.new_empty((*t.shape[:-1], last), dtype=dtype)


def _per_group_sum(values: Tensor, scale: Tensor, group_size: int) -> Tensor:
    """Sum ``values`` (``[..., axis]``) over each group: a gradient shaped as ``scale``."""
    return values.reshape(-1, scale.shape[-1], group_size).sum(-1).reshape(scale.shape)


def _storage(int_dtype: Optional[str], q: Tensor) -> DType:
    if int_dtype is None:
        return parse_dtype(q.dtype, "q.dtype", INT_DTYPES)
    return parse_dtype(int_dtype, "int_dtype", STORAGE_DTYPES)


# --------------------------------------------------------------------------- the family

@_op("dequantize_per_group")
def dequantize_per_group(q: Tensor, scale: Tensor, zero_point: Tensor, group_size: int,
                         int_dtype: Optional[str] = None,
                         output_dtype: Optional[torch.dtype] = None) -> Tensor:
    """``y = scale * (q - zero_point)`` per group (``dqgen.dequantize_per_group``).

    ``q`` is int8/uint8, or packed 4-bit bytes when ``int_dtype`` is ``"u4"``/``"s4"``.
    ``output_dtype`` (default: ``scale``'s dtype): the kernel runs in the wider of the two
    (``scale`` widened exactly; f32 for f16 and bf16) and its result is converted, as
    torchao's ``dequantize_affine(..., output_dtype=)`` computes it.
    Differentiable in ``scale`` (the per-group sum of ``dy * (q - zero_point)``).
    """
    if output_dtype is None or output_dtype == scale.dtype:
        return api.dequantize_per_group(q, scale, zero_point, group_size, int_dtype=int_dtype)
    wide = _wide_dtype(scale, output_dtype)
    y = api.dequantize_per_group(q, scale.to(wide), zero_point, group_size, int_dtype=int_dtype)
    return y if wide == output_dtype else y.to(output_dtype)


def _wide_dtype(scale: Tensor, output_dtype: torch.dtype) -> torch.dtype:
    """The dtype the dequantize kernel runs in for ``output_dtype`` results: torch's
    promotion of the two float dtypes (both checked to be dqgen's)."""
    _float(scale, "scale")
    parse_dtype(output_dtype, "output_dtype", FLOAT_DTYPES)
    return torch.promote_types(scale.dtype, output_dtype)


@dequantize_per_group.register_fake
def _(q, scale, zero_point, group_size, int_dtype=None, output_dtype=None):
    _rank(q, "q")
    storage = _storage(int_dtype, q)
    dtype = _TORCH_DTYPE[_float(scale, "scale")]
    if output_dtype is not None:
        _wide_dtype(scale, output_dtype)
        dtype = output_dtype
    return _with_last(q, q.shape[-1] * (2 if storage.is_packed else 1), dtype)


def _dequantize_setup(ctx, inputs, output):
    q, scale, zero_point, group_size, int_dtype, _ = inputs
    ctx.group_size, ctx.int_dtype = group_size, int_dtype
    ctx.save_for_backward(q, scale, zero_point)


def _dequantize_grad(ctx, grad):
    q, scale, zero_point = ctx.saved_tensors
    grad_scale = None
    if ctx.needs_input_grad[1]:
        c = _compute(scale.dtype)
        # C(q - zp) exactly: the family's dequantize with unit scales of the compute type
        diff = dequantize_per_group(q, torch.ones_like(scale, dtype=c), zero_point,
                                    ctx.group_size, ctx.int_dtype)
        grad_scale = _per_group_sum(grad.to(c) * diff, scale, ctx.group_size).to(scale.dtype)
    return None, grad_scale, None, None, None, None


dequantize_per_group.register_autograd(_dequantize_grad, setup_context=_dequantize_setup)


@_op("quantize_per_group")
def quantize_per_group(x: Tensor, scale: Tensor, zero_point: Tensor, group_size: int,
                       dtype: str = "s8", q_min: Optional[int] = None,
                       q_max: Optional[int] = None) -> Tensor:
    """``q = clamp(rint(x / scale) + zero_point, q_min, q_max)`` as ``dtype`` (s8, u8, or
    packed u4/s4 bytes). An integer result: no gradient (see ``fake_quantize_per_group``)."""
    return api.quantize_per_group(x, scale, zero_point, group_size, dtype=dtype, q_min=q_min,
                                  q_max=q_max)


@quantize_per_group.register_fake
def _(x, scale, zero_point, group_size, dtype="s8", q_min=None, q_max=None):
    _rank(x, "x")
    _float(x, "x")
    storage = parse_dtype(dtype, "dtype", STORAGE_DTYPES)
    resolve_q_range(q_min, q_max, *storage.int_range, storage.value)
    return _with_last(x, x.shape[-1] // 2 if storage.is_packed else x.shape[-1],
                      _TORCH_DTYPE[storage])


@_op("dequantize_per_group_backward")
def dequantize_per_group_backward(dy: Tensor, scale: Tensor, group_size: int) -> Tensor:
    """``dq = dy * scale`` per group (``DequantizePerGroupBackwardPlan``)."""
    return api.dequantize_per_group_backward(dy, scale, group_size)


@dequantize_per_group_backward.register_fake
def _(dy, scale, group_size):
    _rank(dy, "dy")
    _float(dy, "dy")
    return dy.new_empty(dy.shape)


def _dequantize_backward_setup(ctx, inputs, output):
    dy, scale, group_size = inputs
    ctx.group_size = group_size
    ctx.save_for_backward(dy, scale)


def _dequantize_backward_grad(ctx, grad):
    """Linear in ``dy``: its gradient is the same op; ``scale``'s a per-group sum."""
    dy, scale = ctx.saved_tensors
    grad_dy = grad_scale = None
    if ctx.needs_input_grad[0]:
        grad_dy = dequantize_per_group_backward(grad, scale, ctx.group_size)
    if ctx.needs_input_grad[1]:
        c = _compute(scale.dtype)
        grad_scale = _per_group_sum(grad.to(c) * dy.to(c), scale, ctx.group_size).to(scale.dtype)
    return grad_dy, grad_scale, None


dequantize_per_group_backward.register_autograd(_dequantize_backward_grad,
                                                setup_context=_dequantize_backward_setup)


@_op("quantize_per_group_backward")
def quantize_per_group_backward(dy: Tensor, x: Tensor, scale: Tensor, zero_point: Tensor,
                                group_size: int, q_min: int, q_max: int) -> Tensor:
    """Straight-through ``dx = dy / scale`` where ``q_min <= rint(x / scale) + zp <= q_max``
    and ``scale != 0``, else 0 (``QuantizePerGroupBackwardPlan``, inclusive mask)."""
    return api.quantize_per_group_backward(dy, x, scale, zero_point, group_size, q_min, q_max)


@quantize_per_group_backward.register_fake
def _(dy, x, scale, zero_point, group_size, q_min, q_max):
    _rank(dy, "dy")
    _float(dy, "dy")
    return dy.new_empty(dy.shape)


def _quantize_backward_setup(ctx, inputs, output):
    dy, x, scale, zero_point, group_size, q_min, q_max = inputs
    ctx.args = (group_size, q_min, q_max)
    ctx.save_for_backward(x, scale, zero_point, output)


def _quantize_backward_grad(ctx, grad):
    """Linear in ``dy`` (the same op); the mask is constant in ``x`` almost everywhere, so
    ``x`` gets none; ``scale`` gets ``-sum(grad * dx / scale)`` per group."""
    x, scale, zero_point, dx = ctx.saved_tensors
    group_size, q_min, q_max = ctx.args
    grad_dy = grad_scale = None
    if ctx.needs_input_grad[0]:
        grad_dy = quantize_per_group_backward(grad, x, scale, zero_point, group_size, q_min, q_max)
    if ctx.needs_input_grad[2]:
        c = _compute(scale.dtype)
        s = scale.to(c).repeat_interleave(group_size, dim=-1).reshape(dx.shape)
        # dx is 0 where the scale is: divide those by 1 (no 0 / 0)
        grad_scale = -_per_group_sum(grad.to(c) * dx.to(c) / torch.where(s == 0, 1, s), scale,
                                     group_size)
        grad_scale = grad_scale.to(scale.dtype)
    return grad_dy, None, grad_scale, None, None, None, None


quantize_per_group_backward.register_autograd(_quantize_backward_grad,
                                              setup_context=_quantize_backward_setup)


# --------------------------------------------------------------------------- fake quantize

@_op("fake_quantize_per_group")
def fake_quantize_per_group(x: Tensor, scale: Tensor, zero_point: Tensor, group_size: int,
                            q_min: int, q_max: int) -> Tensor:
    """Quantize then dequantize (``scale * (clamp(rint(x / scale) + zp) - zp)``), for QAT.

    Two kernels (the quantized values go through s8, or u8 when the range needs it).
    Gradient for ``x``: the chain rule through the pair's backward plans,
    ``quantize_per_group_backward(dequantize_per_group_backward(dy, scale), x, ...)``,
    i.e. ``F(F(dy * scale) / scale)`` where the value was in range (inclusive) and the
    scale non-zero, else 0, each step rounded as SPEC.md says (in f32 almost always
    ``dy`` itself; in f16 a product below f16's range becomes 0). Gradient for ``scale``:
    LSQ's estimator (Esser et al. 2020), without its gradient scale factor (multiply by
    ``1 / sqrt(numel * q_max)`` yourself if you want it): per group, the sum of
    ``dy * (q - zp - x / scale)`` over in-range values and ``dy * (q - zp)`` over the
    others, computed in torch in the compute type. ``zero_point`` has no gradient.

    A float ``zero_point`` (``x``'s dtype, as ``scale``) selects torchao's FLOAT domain
    (tinygemm, ``ZeroPointDomain.FLOAT``): ``dqgen.formats.floatzp.fake_quantize``,
    torchao's ``_fake_quantize_affine`` bit for bit, and its straight-through gradient
    for ``x`` as torch's autograd computes it through torchao's expression,
    ``F(where(q_min <= rint(t) <= q_max, F(dy * scale), 0) / scale)``; ``scale`` and
    ``zero_point`` get none there (compute them without gradient, as torchao does).
    """
    if zero_point.is_floating_point():
        return floatzp.fake_quantize(x, scale, zero_point, group_size, q_min, q_max)
    storage = byte_storage_for(q_min, q_max)
    q = api.quantize_per_group(x, scale, zero_point, group_size, dtype=storage, q_min=q_min,
                               q_max=q_max)
    return api.dequantize_per_group(q, scale, zero_point, group_size)


@fake_quantize_per_group.register_fake
def _(x, scale, zero_point, group_size, q_min, q_max):
    _rank(x, "x")
    _float(x, "x")
    byte_storage_for(q_min, q_max)
    if zero_point.is_floating_point():
        _float_zero_params(x, scale, zero_point, group_size)
        return x.new_empty(x.shape)
    return x.new_empty(x.shape, dtype=_TORCH_DTYPE[_float(scale, "scale")])


def _float_zero_params(x: Tensor, scale: Tensor, zero_point: Tensor, group_size: int) -> None:
    """``floatzp.check_params`` on (fake) tensors: x's dtype, one value a group."""
    group_size = check_int(group_size, "group_size", minimum=1, maximum=2**31 - 1)
    if x.shape[-1] % group_size:
        raise InvalidProblemError(f"x's last axis ({x.shape[-1]}) is not a multiple of "
                                  f"group_size={group_size}")
    want = (*x.shape[:-1], x.shape[-1] // group_size)
    for name, t in (("scale", scale), ("zero_point", zero_point)):
        if t.dtype != x.dtype:
            raise InvalidProblemError(f"{name} has dtype {t.dtype}; float zero points work in "
                                      f"x's dtype ({x.dtype}): convert it")
        if tuple(t.shape) != want:
            raise InvalidProblemError(f"{name} has shape {tuple(t.shape)}, expected {want}: "
                                      f"one value a group of {group_size}")


def _fake_quantize_setup(ctx, inputs, output):
    x, scale, zero_point, group_size, q_min, q_max = inputs
    ctx.args = (group_size, q_min, q_max)
    ctx.save_for_backward(x, scale, zero_point)


def _lsq_scale_grad(grad, x, scale, zero_point, group_size, q_min, q_max):
    """LSQ: ``d y / d scale`` is ``rint(t) - t`` inside the range (t = x / scale) and the
    clamped level minus the zero point outside it, summed per group against ``grad``."""
    c = _compute(scale.dtype)
    shape = (-1, scale.shape[-1], group_size)
    s = scale.to(c).reshape(shape[0], shape[1], 1)
    zp = zero_point.to(torch.float64).reshape(shape[0], shape[1], 1)
    t = torch.where(s == 0, 0, x.to(c).reshape(shape) / torch.where(s == 0, 1, s))
    r = torch.round(t)  # half to even, as SPEC.md rounds
    shifted = r.to(torch.float64) + zp
    inside = (shifted >= q_min) & (shifted <= q_max) & (s != 0)  # NaN is outside
    level = torch.where(torch.isnan(r), zp, shifted)
    step = (level.clamp(q_min, q_max) - zp).to(c) - torch.where(inside, t, 0)
    total = (grad.to(c).reshape(shape) * step).sum(-1)
    return total.reshape(scale.shape).to(scale.dtype)


def _float_zero_x_grad(grad, x, scale, zero_point, group_size, q_min, q_max):
    """torch's autograd through torchao's FLOAT-domain fake quantize: the clamp passes
    ``F(dy * scale)`` where ``q_min <= round(t) <= q_max``, the division divides it by
    ``scale`` again (0 / 0 is NaN there too, as in torch)."""
    t = floatzp.quotient(x, scale, zero_point, group_size, q_min, q_max)
    r = torch.round(t)
    inside = (r >= q_min) & (r <= q_max)
    s = scale.reshape(-1, scale.shape[-1], 1)
    shape = (-1, scale.shape[-1], group_size)
    through = torch.where(inside.reshape(shape), grad.reshape(shape) * s, 0)
    return (through / s).reshape(x.shape)


def _fake_quantize_grad(ctx, grad):
    x, scale, zero_point = ctx.saved_tensors
    group_size, q_min, q_max = ctx.args
    grad_x = grad_scale = None
    if zero_point.is_floating_point():
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            raise UnsupportedError("fake_quantize_per_group with float zero points has no "
                                   "gradient for scale or zero_point; detach them")
        if ctx.needs_input_grad[0]:
            grad_x = _float_zero_x_grad(grad, x, scale, zero_point, group_size, q_min, q_max)
        return grad_x, None, None, None, None, None
    if ctx.needs_input_grad[0]:
        dq = dequantize_per_group_backward(grad, scale, group_size)
        grad_x = quantize_per_group_backward(dq, x, scale, zero_point, group_size, q_min, q_max)
    if ctx.needs_input_grad[1]:
        grad_scale = _lsq_scale_grad(grad, x, scale, zero_point, group_size, q_min, q_max)
    return grad_x, grad_scale, None, None, None, None


fake_quantize_per_group.register_autograd(_fake_quantize_grad, setup_context=_fake_quantize_setup)


# --------------------------------------------------------------------------- checkpoint formats
# Every format runs on the device its tensors live on; packed 4-bit on CUDA runs the
# family's packed kernel.

@_op("gptq_dequantize")
def gptq_dequantize(qweight: Tensor, qzeros: Tensor, scales: Tensor,
                    g_idx: Optional[Tensor] = None, bits: int = 4,
                    checkpoint_format: str = "gptq", dtype: torch.dtype = torch.float16,
                    group_size: Optional[int] = None,
                    v1_zeros: str = GPTQ_V1_ZEROS[0]) -> Tensor:
    """A GPTQ layer to its ``[K, N]`` weight (``dqgen.formats.gptq.dequantize``)."""
    return gptq.dequantize(qweight, qzeros, scales, g_idx=g_idx, bits=bits,
                           checkpoint_format=checkpoint_format, dtype=dtype,
                           group_size=group_size, v1_zeros=v1_zeros)


@gptq_dequantize.register_fake
def _(qweight, qzeros, scales, g_idx=None, bits=4, checkpoint_format="gptq",
      dtype=torch.float16, group_size=None, v1_zeros=GPTQ_V1_ZEROS[0]):
    bits = check_int(bits, "bits", minimum=0)
    if bits not in GPTQ_BITS:
        raise InvalidProblemError(f"bits={bits} is not supported for GPTQ; expected one of "
                                  f"{', '.join(map(str, GPTQ_BITS))}")
    out = _TORCH_DTYPE[parse_dtype(dtype, "dtype", FLOAT_DTYPES)]
    return qweight.new_empty((qweight.shape[0] * 32 // bits, qweight.shape[1]), dtype=out)


@_op("awq_dequantize")
def awq_dequantize(qweight: Tensor, qzeros: Tensor, scales: Tensor,
                   dtype: torch.dtype = torch.float16,
                   group_size: Optional[int] = None) -> Tensor:
    """An AWQ GEMM layer to its ``[K, N]`` weight (``dqgen.formats.awq.dequantize``)."""
    return awq.dequantize(qweight, qzeros, scales, dtype=dtype, group_size=group_size)


@awq_dequantize.register_fake
def _(qweight, qzeros, scales, dtype=torch.float16, group_size=None):
    out = _TORCH_DTYPE[parse_dtype(dtype, "dtype", FLOAT_DTYPES)]
    return qweight.new_empty((qweight.shape[0], qweight.shape[1] * 8), dtype=out)


@_op("ggml_dequantize")
def ggml_dequantize(data: Tensor, qtype: str, dtype: torch.dtype = torch.float16) -> Tensor:
    """GGML blocks (uint8 ``[..., row_bytes]``) of ``qtype`` (a name in
    ``dqgen.formats.ggml.TYPES``: "Q4_0", "Q4_K", ...) to
    ``[..., row_bytes / block_bytes * block_values]`` (``dqgen.formats.ggml.dequantize``)."""
    return ggml.dequantize(data, qtype, dtype=dtype)


@ggml_dequantize.register_fake
def _(data, qtype, dtype=torch.float16):
    _rank(data, "data")
    out = _TORCH_DTYPE[parse_dtype(dtype, "dtype", FLOAT_DTYPES)]
    return _with_last(data, data.shape[-1] // ggml.block_bytes(qtype) * ggml.block_values(qtype),
                      out)


@_op("packed_dequantize")
def packed_dequantize(q: Tensor, scale: Tensor, zero_point: Tensor, group_size: int,
                      dtype: str = "u4") -> Tensor:
    """Packed 4-bit bytes (uint8 ``[..., axis / 2]``) to ``[..., axis]`` of ``scale``'s
    dtype (``dqgen.formats.packed.dequantize``; on CUDA the family's packed kernel)."""
    if q.device.type == "cpu":
        return packed.dequantize(q, scale, zero_point, group_size, dtype=dtype)
    return api.dequantize_per_group(q, scale, zero_point, group_size, int_dtype=dtype)


@packed_dequantize.register_fake
def _(q, scale, zero_point, group_size, dtype="u4"):
    _rank(q, "q")
    parse_dtype(dtype, "dtype", PACKED_DTYPES)
    return _with_last(q, q.shape[-1] * 2, _TORCH_DTYPE[_float(scale, "scale")])


@_op("floatzp_dequantize")
def floatzp_dequantize(q: Tensor, scale: Tensor, zero_point: Tensor, group_size: int,
                       int_dtype: Optional[str] = None, q_min: Optional[int] = None,
                       q_max: Optional[int] = None) -> Tensor:
    """``x = (q - mid) * scale + zero_point`` with a float zero point
    (``dqgen.formats.floatzp.dequantize``)."""
    return floatzp.dequantize(q, scale, zero_point, group_size, int_dtype=int_dtype,
                              q_min=q_min, q_max=q_max)


@floatzp_dequantize.register_fake
def _(q, scale, zero_point, group_size, int_dtype=None, q_min=None, q_max=None):
    _rank(q, "q")
    storage = _storage(int_dtype, q)
    return _with_last(q, q.shape[-1] * (2 if storage.is_packed else 1),
                      _TORCH_DTYPE[_float(scale, "scale")])


@_op("hqq_dequantize")
def hqq_dequantize(W_q: Tensor, scale: Tensor, zero: Tensor, nbits: int, shape: List[int],
                   group_size: Optional[int] = None, axis: int = 1) -> Tensor:
    """HQQ's ``Quantizer.dequantize`` from its meta's fields, a weight of ``shape`` in
    ``scale``'s dtype (``dqgen.formats.hqq.dequantize``)."""
    return hqq.dequantize(W_q, scale, zero, nbits, shape, group_size=group_size, axis=axis)


@hqq_dequantize.register_fake
def _(W_q, scale, zero, nbits, shape, group_size=None, axis=1):
    if check_int(nbits, "nbits", minimum=0) not in HQQ_BITS:
        raise UnsupportedError(f"nbits={nbits} is not supported for HQQ; expected one of "
                               f"{', '.join(map(str, HQQ_BITS))}")
    return W_q.new_empty(tuple(shape), dtype=_TORCH_DTYPE[_float(scale, "scale")])


# --------------------------------------------------------------------------- the fused linear
# x @ W.T with W quantized and never written out (dqgen.formats.weight); the weight is its
# arrays in the decode kernel's order and its format's descriptor record as JSON text.

@_op("linear")
def linear(x: Tensor, weight: List[Tensor], format: str, n: int, k: int,
           bias: Optional[Tensor] = None, out_dtype: Optional[torch.dtype] = None,
           column_order: Optional[Tensor] = None, compute: str = "f32") -> Tensor:
    """``x @ W.T (+ bias)`` with ``W [n, k]`` quantized: ``weight`` its tensors in the
    decode kernel's order, ``format`` its descriptor record (``QuantizedWeight.format_json``),
    ``column_order`` the stored columns' places (act-order). The sum's order is SPEC.md
    §8's (``compute="int8"``: §9's, x quantized to int8 a block of 32), the same bits on
    any thread count. x's gradient is ``dy @ W`` in f32 either way."""
    return run_linear(x, weight, format, n, k, bias, out_dtype, False, column_order, compute)


@linear.register_fake
def _(x, weight, format, n, k, bias=None, out_dtype=None, column_order=None, compute="f32"):
    return x.new_empty((*x.shape[:-1], n), dtype=out_dtype if out_dtype is not None else x.dtype)


@_op("linear_backward")
def linear_backward(dy: Tensor, weight: List[Tensor], format: str, n: int, k: int,
                    out_dtype: Optional[torch.dtype] = None,
                    column_order: Optional[Tensor] = None) -> Tensor:
    """``dy @ W`` (the gradient of ``linear``'s x) by the transposed fused kernel, in the
    same order over n; W is never written out."""
    return run_linear(dy, weight, format, n, k, None, out_dtype, True, column_order)


@linear_backward.register_fake
def _(dy, weight, format, n, k, out_dtype=None, column_order=None):
    return dy.new_empty((*dy.shape[:-1], k), dtype=out_dtype if out_dtype is not None else dy.dtype)


def _linear_setup(ctx, inputs, output):
    x, weight, fmt, n, k, bias, out_dtype, column_order, _ = inputs
    ctx.weight, ctx.fmt, ctx.n, ctx.k, ctx.order = weight, fmt, n, k, column_order
    ctx.x_dtype, ctx.has_bias = x.dtype, bias is not None


def _linear_grad(ctx, dy):
    dx = linear_backward(dy.contiguous(), ctx.weight, ctx.fmt, ctx.n, ctx.k, ctx.x_dtype,
                         ctx.order) if ctx.needs_input_grad[0] else None
    db = dy.reshape(-1, ctx.n).sum(0) if ctx.has_bias and ctx.needs_input_grad[5] else None
    return dx, None, None, None, None, db, None, None, None


linear.register_autograd(_linear_grad, setup_context=_linear_setup)

from dqgen.torch_nn import QuantLinear, quantize_model, run_linear  # noqa: E402
