"""Prepared C calls ("plans") for one quantized layer at one input shape.

At batch 1 a small layer's arithmetic takes a few microseconds and its Python preparation
(checks, kernel choice, allocations, argument conversion, several C calls) 15-30 us: more
than the float layer's whole call. A plan does that preparation once per input shape and
binds every argument except the input and output pointers, so an eager call is a handful of
checks and one C call. Plans run the same C functions in the same order as the step-by-step
paths, so they give the same bits. Modules keep them per shape and drop them whenever their
buffers or fusions change (``QuantizedModuleBase._planned``).
"""

from __future__ import annotations

import ctypes
import math
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from lowbit.kernels.conv import _conv_out_hw, _direct_conv_takes, _direct_conv_threads
from lowbit.kernels.isa import check_bias, check_smooth, check_u4p_args, s8_packed
from lowbit.kernels.linear import FUSED_GEMMS, fused_linear_layout, one_call_linear
from lowbit.memory import POOL_MIN_BYTES
from lowbit.memory import empty as pooled_empty
from lowbit.native import addcmul_fma, load_gemm, threads_for

__all__ = ["Plan", "PlanCache", "conv_codes_plan", "linear_plan", "wo_conv_plan",
           "wo_linear_plan"]


class Plan(NamedTuple):
    """One layer's prepared call at one input shape.

    Attributes:
        run: ``run(x_ptr, y_ptr) -> status``: 0 when ``y`` was written; anything else (NaN /
            Inf in the input, a refused argument) means nothing is returned and the caller
            takes its step-by-step path, which handles the case.
        out_shape: the float32 output's shape.
        alloc: ``torch.empty`` or, for large outputs, ``lowbit.memory.empty`` (the reuse pool).
        keep: the tensors and ctypes objects ``run``'s bound pointers point into (kept alive
            with the plan).
    """

    run: Callable[[int, int], int]
    out_shape: tuple[int, ...]
    alloc: Callable[..., torch.Tensor]
    keep: tuple[Any, ...]


class PlanCache(dict):
    """A layer's plans (key -> ``(Plan or False, weight key)``): copied and pickled empty, since
    plans hold raw pointers into the tensors of the layer they were built for."""

    def __deepcopy__(self, memo: dict) -> PlanCache:
        return PlanCache()

    def __reduce__(self) -> tuple:
        return (PlanCache, ())


def _alloc_for(shape: tuple[int, ...]) -> Callable[..., torch.Tensor]:
    return pooled_empty if math.prod(shape) * 4 >= POOL_MIN_BYTES else torch.empty


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _own(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Private copies of the small per-channel vectors a plan binds pointers to (scales, bias,
    zero-points, compensation, smoothing): a layer's buffer can move to other memory without a
    new version (``share_memory_()``), and a bound pointer must never outlive its memory. One
    copy per vector, shared by the layer's plans while the vector is unchanged. (The codes are
    keyed by address by the layer; group-wise scale tables are checked at each call instead,
    :func:`_same_memory`: a copy would cost a quarter of an INT4 layer's memory.)"""
    out = []
    for t in tensors:
        if t is None:
            out.append(None)
            continue
        stamp = (t.data_ptr(), -1 if t.is_inference() else t._version)
        hit = _OWNED.get(id(t))
        if hit is None or hit[0]() is not t or hit[1] != stamp:
            if hit is None or hit[0]() is not t:  # (forgotten with the vector)
                weakref.finalize(t, _OWNED.pop, id(t), None)
            hit = _OWNED[id(t)] = (weakref.ref(t), stamp,
                                   t.clone(memory_format=torch.contiguous_format))
        out.append(hit[2])
    return tuple(out)


#: id of a source vector -> (weak reference to it, (address, version), its private copy), see
#: :func:`_own` (keyed by id: tensors compare elementwise, so they cannot be dict keys)
_OWNED: dict[int, tuple[Any, tuple[int, int], torch.Tensor]] = {}


def _same_memory(*tensors: torch.Tensor) -> Callable[[], bool]:
    """A check that ``tensors`` still live where they did (else the plan declines the call and
    the layer's step-by-step path runs on the tensors as they are now)."""
    pairs = tuple((t, t.data_ptr()) for t in tensors)
    return lambda: all(t.data_ptr() == p for t, p in pairs)


def conv_codes_plan(lib: Any, shape: tuple[int, ...], weight: torch.Tensor,
                    w_scale: torch.Tensor, bias: torch.Tensor | None,
                    static_scale: torch.Tensor | None, zp: int, qmin: int, qmax: int,
                    ksize: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
                    dilation: tuple[int, int], relu: bool, pool: int,
                    affine: tuple[int, int, int] | None = None) -> Plan | None:
    """The ``"fp32_codes_conv"`` INT8 conv on the direct C conv, with its epilogue and an
    optional fused max-pool, as one call of ``lb_qconv_direct`` for float32 contiguous
    NCHW inputs of ``shape``; None when the direct conv does not take the shape (width stride
    other than 1, more than :data:`~lowbit.kernels.conv.DIRECT_CONV_MAX_MACS` multiply-adds).

    Args:
        lib: the library from :func:`~lowbit.kernels.base.native_lib_for`.
        shape: the input's ``(B, C, H, W)``.
        weight: float32 contiguous ``[O, C, kh, kw]`` centered weight codes.
        w_scale, bias: float32 contiguous ``[O]`` (bias may be None).
        static_scale: the static activation scale (0-dim float32), None for dynamic symmetric.
        zp: the static activation zero-point (signed codes; 0 when dynamic).
        qmin, qmax: the signed activation code range.
        ksize, stride, padding, dilation: the conv's geometry (zero padding, groups 1).
        relu: fused ReLU. pool: fused ``MaxPool2d(pool)`` (kernel = stride), 0 for none.
        affine: dynamic affine per-tensor activations ``(spec qmin, spec qmax, code offset)``:
            each call computes the scale and zero-point first (``lb_affine_qparams``) and runs
            the static form with them (``static_scale`` None, ``zp`` unused).

    Example:
        >>> from lowbit.kernels import native_lib_for
        >>> w = torch.randint(-127, 128, (4, 2, 3, 3)).float()
        >>> lib = native_lib_for(w)
        >>> plan = lib and conv_codes_plan(lib, (1, 2, 5, 5), w, torch.ones(4), None, None, 0,
        ...                                -127, 127, (3, 3), (1, 1), (1, 1), (1, 1), False, 0)
        >>> x = torch.randn(1, 2, 5, 5)
        >>> y = plan and plan.alloc(plan.out_shape)
        >>> plan is None or (plan.run(x.data_ptr(), y.data_ptr()), tuple(y.shape))
        (0, (1, 4, 5, 5))
    """
    b, c, h, w = shape
    o = weight.shape[0]
    ho, wo = _conv_out_hw(shape, ksize, stride, padding, dilation)
    if ho <= 0 or wo <= 0 or not _direct_conv_takes(shape, weight.numel(), stride, 1):
        return None
    if (weight.dtype != torch.float32 or not weight.is_contiguous()
            or tuple(weight.shape) != (o, c, *ksize) or w_scale.numel() != o
            or (bias is not None and bias.numel() != o)):
        raise ValueError(f"conv_codes_plan: weight {tuple(weight.shape)} {weight.dtype}, "
                         f"w_scale {tuple(w_scale.shape)} or bias do not match the conv "
                         f"{c} -> {o} channels, kernel {ksize}")
    w_scale, bias, static_scale = _own(w_scale, bias, static_scale)
    threads = torch.get_num_threads()
    params = (ctypes.c_int64 * lib.lb_qconv_nparams())(
        b, c, h, w, o, *ksize, *stride, *padding, *dilation, zp, qmin, qmax, int(relu), pool,
        threads_for(b * c * h * w), _direct_conv_threads(b * ho * wo * weight.numel()),
        threads_for(b * o * ho * wo) if threads > 1 else 1)
    out = (b, o, ho // pool, wo // pool) if pool else (b, o, ho, wo)
    bound = (ctypes.addressof(params), _ptr(static_scale), weight.data_ptr(),
             w_scale.data_ptr(), _ptr(bias))
    call = lib.lb_qconv_direct
    keep = (params, weight, w_scale, bias, static_scale)
    if affine is not None:
        qparams, numel = lib.lb_affine_qparams, b * c * h * w
        quant_threads = threads_for(numel)
        size, zp_index = ctypes.sizeof(params), 13  # LBQ_ZP in lowbit_kernels.c

        def run_affine(x_ptr: int, y_ptr: int) -> int:
            buf = torch.empty(2, dtype=torch.int32)  # scale bits, zero-point (fresh per call)
            base = buf.data_ptr()
            if qparams(x_ptr, numel, *affine, None, 0, base, base + 4, None, quant_threads):
                return 1  # NaN / Inf in x
            p = (ctypes.c_int64 * len(params))()
            ctypes.memmove(p, bound[0], size)
            p[zp_index] = ctypes.c_int32.from_address(base + 4).value
            return call(ctypes.addressof(p), base, *bound[2:], x_ptr, y_ptr)

        return Plan(run_affine, out, _alloc_for(out), keep)

    def run(x_ptr: int, y_ptr: int) -> int:
        return call(*bound, x_ptr, y_ptr)

    return Plan(run, out, _alloc_for(out), keep)


def linear_plan(lib: Any, shape: tuple[int, ...], kernel: str, w: torch.Tensor,
                w_scale: torch.Tensor, bias: torch.Tensor | None, per_token: bool,
                scale: torch.Tensor | None, zero_point: torch.Tensor | None,
                comp: torch.Tensor | None, relu: bool, qmin: int, qmax: int,
                affine: tuple[torch.Tensor, int, int, int] | None = None,
                smooth: torch.Tensor | None = None) -> Plan | None:
    """The INT8 linear (quantize, GEMM, epilogue) on float32 contiguous inputs of ``shape``
    (``[..., K]``) as one bound C call: the one-call small kernel (``lb_linear_s8_small``,
    its arguments in one array) or this ISA's packed GEMM (``lbk_s8_linear``), as
    :func:`~lowbit.kernels.linear.run_fused_linear` picks for ``kernel``; None for the other
    kernels. Layers whose activation scale is shared by all rows (static, per-tensor) first
    check the input is finite (one C absmax), as the step-by-step path does.

    Args:
        lib: the library from :func:`~lowbit.kernels.base.native_lib_for`.
        shape: the input's shape. kernel: the layer's kernel at ``M = prod(shape[:-1])``.
        w: int8 ``[N, K]``; w_scale, bias: float32 ``[N]``; per_token: dynamic per-row scales;
        scale, zero_point: static qparams (float32 / int32, 0-dim) or None for dynamic;
        comp: the static zero-point compensation or None; relu: fused ReLU;
        qmin, qmax: the activation code range. All as checked by
        :func:`~lowbit.kernels.linear.fused_linear_layout`.
        affine: dynamic affine per-tensor activations ``(colsum int32 [N], spec qmin, spec
            qmax, code offset)``: each call first computes the scale, zero-point and
            compensation (``lb_affine_qparams``, whose pass also finds NaN / Inf), then runs
            the static form with them (``scale``, ``zero_point`` and ``comp`` are then None).
        smooth: float32 ``[K]`` input smoothing (AWQ / SmoothQuant) that the C call applies
            to each row as it quantizes it (the products ``x * smooth`` gives, without that
            pass over memory); dynamic per-token layers only (None for the others).

    Example:
        >>> from lowbit.kernels import native_lib_for, select_kernel
        >>> w = torch.randint(-127, 128, (8, 16), dtype=torch.int8)
        >>> lib = native_lib_for(w)
        >>> plan = lib and linear_plan(lib, (3, 16), select_kernel("int8_linear", 3), w,
        ...                            torch.ones(8), None, True, None, None, None, False,
        ...                            -127, 127)
        >>> x = torch.randn(3, 16)
        >>> y = plan and plan.alloc(plan.out_shape)
        >>> plan is None or (plan.run(x.data_ptr(), y.data_ptr()), tuple(y.shape))
        (0, (3, 8))
    """
    k, n = shape[-1], w.shape[0]
    one = (scale, zero_point)  # static qparams: one value each
    if (len(shape) == 0 or w.dim() != 2 or w.shape[1] != k
            or not fused_linear_layout(w, w_scale, bias, comp, scale, zero_point)
            or any(t is not None and t.numel() != n for t in (w_scale, bias, comp))
            or any(t is not None and t.numel() != 1 for t in one)):
        raise ValueError(f"linear_plan: needs a contiguous int8 weight [N, K] with K = the "
                         f"input's last dim ({shape[-1] if shape else '-'}), float32 w_scale / "
                         f"bias and int32 comp of N values, one-value scale / zero_point "
                         f"(lowbit.kernels.fused_linear_layout); got weight "
                         f"{tuple(w.shape)} {w.dtype}")
    m = math.prod(shape[:-1])
    out = (*shape[:-1], n)
    dynamic = scale is None and affine is None
    if m == 0 or (smooth is not None and not (dynamic and per_token)):
        return None
    check_smooth(smooth, k, "linear_plan")
    w_scale, bias, scale, zero_point, comp, smooth = _own(w_scale, bias, scale, zero_point, comp,
                                                         smooth)
    if affine is not None:
        affine = (*_own(affine[0]), *affine[1:])
    finite_check = not (dynamic and per_token)  # one shared scale: a NaN row must not spread
    absmax = lib.lb_absmax
    keep: tuple[Any, ...] = (w, w_scale, bias, scale, zero_point, comp, affine, smooth)
    qparams = _affine_qparams(lib, m * k, n, affine) if affine is not None else None
    if kernel in FUSED_GEMMS and one_call_linear(m, k, n, kernel):
        params = (ctypes.c_int64 * lib.lb_linear_small_nparams())(
            m, k, _ptr(scale) or 0, int(dynamic and per_token), int(dynamic),
            _ptr(zero_point) or 0, qmin, qmax, w.data_ptr(), n, _ptr(comp) or 0,
            w_scale.data_ptr(), _ptr(bias) or 0, int(relu), threads_for(m * n * k),
            int(finite_check), _ptr(smooth) or 0)
        call, p_addr = lib.lb_linear_small_prepared, ctypes.addressof(params)
        if qparams is not None:
            size = ctypes.sizeof(params)

            def run_small_affine(x_ptr: int, y_ptr: int) -> int:
                _buf, s_ptr, z_ptr, c_ptr = qparams(x_ptr)  # fresh (calls may overlap), alive
                if _buf is None:  # NaN / Inf in x
                    return 1
                p = (ctypes.c_int64 * len(params))()
                ctypes.memmove(p, p_addr, size)
                # LBL_SCALE, LBL_ZP, LBL_COMP and LBL_CHECK (lowbit_kernels.c): this call's
                # qparams; the finiteness check is done (lb_affine_qparams)
                p[2], p[5], p[10], p[15] = s_ptr, z_ptr, c_ptr, 0
                return call(ctypes.addressof(p), x_ptr, y_ptr)

            return Plan(run_small_affine, out, torch.empty, (*keep, params))

        def run_small(x_ptr: int, y_ptr: int) -> int:
            return call(p_addr, x_ptr, y_ptr)

        return Plan(run_small, out, torch.empty, (*keep, params))
    lib8 = load_gemm(kernel[3:]) if kernel.startswith("s8_") else None
    packed = lib8 and s8_packed(w, lib8)
    if packed is None:
        return None
    call8 = lib8.lbk_s8_linear
    x_bytes, y_bytes = m * k * 4, m * n * 4
    head8 = (0, m, k, k, x_bytes)
    mid8 = (int(dynamic and per_token), int(dynamic), _ptr(zero_point), qmin, qmax,
            packed.data_ptr(), packed.numel(), n, _ptr(comp), w_scale.data_ptr(), _ptr(bias),
            int(relu), int(addcmul_fma()))
    tail8 = (0, y_bytes, torch.get_num_threads(), _ptr(smooth))
    scale_shape = (m, 1) if per_token else ()
    static_ptr = _ptr(scale)

    if qparams is not None:
        head_mid = mid8[:2]  # (per-row, dynamic): 0, 0
        tail_mid = mid8[3:8]  # qmin .. n
        last_mid = mid8[9:]  # w_scale, bias, relu, fma

        def run_s8_affine(x_ptr: int, y_ptr: int) -> int:
            _buf, s_ptr, z_ptr, c_ptr = qparams(x_ptr)  # fresh (calls may overlap), alive
            if _buf is None:  # NaN / Inf in x
                return 1
            return call8(x_ptr, *head8, s_ptr, *head_mid, z_ptr, *tail_mid, c_ptr, *last_mid,
                         y_ptr, *tail8)

        return Plan(run_s8_affine, out, _alloc_for(out), (*keep, packed))

    def run_s8(x_ptr: int, y_ptr: int) -> int:
        if finite_check and not math.isfinite(absmax(x_ptr, 0, 1, m * k, m * k, 1)):
            return 1
        if dynamic:  # the row scales, written by C (a fresh buffer: calls may overlap)
            s = torch.empty(scale_shape)
            return call8(x_ptr, *head8, s.data_ptr(), *mid8, y_ptr, *tail8)
        return call8(x_ptr, *head8, static_ptr, *mid8, y_ptr, *tail8)

    return Plan(run_s8, out, _alloc_for(out), (*keep, packed))


def _affine_qparams(lib: Any, numel: int, n: int, affine: tuple[torch.Tensor, int, int, int]
                    ) -> Callable[[int], tuple[torch.Tensor | None, int, int, int]]:
    """``qparams(x_ptr) -> (buffer, scale_ptr, zero_point_ptr, comp_ptr)``: one fresh int32
    buffer per call holding the scale (float32 bits), the signed zero-point and ``zp * colsum``
    of a float32 input of ``numel`` values, written by ``lb_affine_qparams``; the buffer is
    None when the input holds NaN / Inf (the caller's step-by-step path handles it)."""
    colsum, spec_qmin, spec_qmax, off = affine
    call, colsum_ptr, threads = lib.lb_affine_qparams, colsum.data_ptr(), threads_for(numel)

    def qparams(x_ptr: int) -> tuple[torch.Tensor | None, int, int, int]:
        buf = torch.empty(n + 2, dtype=torch.int32)
        base = buf.data_ptr()
        if call(x_ptr, numel, spec_qmin, spec_qmax, off, colsum_ptr, n, base, base + 4,
                base + 8, threads):
            return None, 0, 0, 0
        return buf, base, base + 4, base + 8

    return qparams


def wo_conv_plan(lib: Any, shape: tuple[int, ...], c_args: tuple, out_channels: int,
                 ksize: tuple[int, int], bias: torch.Tensor | None, stride: tuple[int, int],
                 padding: tuple[int, int], dilation: tuple[int, int], relu: bool,
                 pool: int) -> Plan | None:
    """The weight-only conv on the direct C conv (weight dequantized from its codes in the same
    call, :func:`~lowbit.kernels.conv.run_wo_conv2d_native`) with an optional fused max-pool,
    as one ``lb_wo_conv_direct`` call for float32 contiguous NCHW inputs of ``shape``; None
    when the direct conv does not take the shape.

    Args:
        lib: the library. shape: the input's ``(B, C, H, W)``.
        c_args: the module's C dequantization arguments ``(codes, packed, signed, n, kp, k,
            group, scale, zero_point)``.
        out_channels, ksize, bias, stride, padding, dilation: the conv (zero padding, groups 1).
        relu: fused ReLU. pool: fused ``MaxPool2d(pool)``, 0 for none.

    Example:
        >>> from lowbit.kernels import native_lib_for
        >>> codes = torch.ones(2, 4, dtype=torch.int8)  # 2 output channels, 1 x 2 x 2 kernel
        >>> args = (codes, 0, 1, 2, 4, 4, 4, torch.tensor([0.5, 1.0]),
        ...         torch.zeros(2, dtype=torch.int32))
        >>> lib = native_lib_for(codes)
        >>> plan = lib and wo_conv_plan(lib, (1, 1, 3, 3), args, 2, (2, 2), None, (1, 1),
        ...                             (0, 0), (1, 1), False, 0)
        >>> x, y = torch.ones(1, 1, 3, 3), torch.empty(1, 2, 2, 2)
        >>> plan is None or (plan.run(x.data_ptr(), y.data_ptr()), y[0, :, 0, 0].tolist())
        (0, [2.0, 4.0])
    """
    codes, packed, signed, n, kp, k, group, scale, zp = c_args
    b, c, h, w = shape
    if n != out_channels or k != c * ksize[0] * ksize[1] or (bias is not None
                                                             and bias.numel() != n):
        raise ValueError(f"wo_conv_plan: the weight codes (N={n}, K={k}) or bias do not match "
                         f"the conv ({c} -> {out_channels} channels, kernel {tuple(ksize)}: "
                         f"K = {c * ksize[0] * ksize[1]}); pass the layer's own _c_args")
    ho, wo = _conv_out_hw(shape, ksize, stride, padding, dilation)
    if ho <= 0 or wo <= 0 or not _direct_conv_takes(shape, n * k, stride, 1):
        return None
    (bias,) = _own(bias)
    unmoved = _same_memory(scale, zp)
    params = (ctypes.c_int64 * lib.lb_wo_conv_nparams())(
        b, c, h, w, n, *ksize, *stride, *padding, *dilation, packed, signed, kp, group,
        int(relu), pool, _direct_conv_threads(b * ho * wo * n * k), threads_for(b * n * ho * wo))
    out = (b, n, ho // pool, wo // pool) if pool else (b, n, ho, wo)
    bound = (ctypes.addressof(params), codes.data_ptr(), scale.data_ptr(), zp.data_ptr(),
             _ptr(bias))
    call = lib.lb_wo_conv_direct

    def run(x_ptr: int, y_ptr: int) -> int:
        return call(*bound, x_ptr, y_ptr) if unmoved() else 1

    return Plan(run, out, _alloc_for(out), (params, codes, scale, zp, bias))


def wo_linear_plan(lib: Any, shape: tuple[int, ...], small_args: tuple | None,
                   u4p: tuple[Any, tuple] | None, bias: torch.Tensor | None,
                   relu: bool, smooth: torch.Tensor | None = None) -> Plan | None:
    """A weight-only linear on float32 contiguous inputs of ``shape`` as one bound C call:
    the one-call small kernel (``lb_wo_linear_small``, ``small_args`` as
    :func:`~lowbit.kernels.weight_only.run_weight_only_linear_native` takes them) or, when
    ``small_args`` is None, the INT4 x INT8 kernel (``u4p = (ISA library, args of``
    :func:`~lowbit.kernels.isa.run_u4p_linear`\\ ``)``); None for neither. ``smooth``:
    float32 ``[K]`` input smoothing (AWQ) that the INT4 x INT8 kernel applies to each row as it
    quantizes it (``lbk_u4p_linear_s``; the small kernel takes none: None then).

    Example:
        >>> from lowbit.kernels import native_lib_for
        >>> codes = torch.tensor([[3, -2]], dtype=torch.int8)
        >>> args = (codes, 0, 1, 1, 2, 2, torch.tensor([0.5]), torch.zeros(1, dtype=torch.int32),
        ...         None)
        >>> lib = native_lib_for(codes)
        >>> plan = lib and wo_linear_plan(lib, (1, 2), args, None, None, False)
        >>> x, y = torch.ones(1, 2), torch.empty(1, 1)
        >>> plan is None or (plan.run(x.data_ptr(), y.data_ptr()), y.tolist())
        (0, [[0.5]])
    """
    k = shape[-1]
    m = math.prod(shape[:-1])
    if m == 0 or (smooth is not None and (small_args is not None or u4p is None)):
        return None
    check_smooth(smooth, k, "wo_linear_plan")
    if small_args is not None:
        w, packed, signed, n, kp, group, scale, zp, _bias = small_args
        scales = n * (kp // group) if group else 1
        if (k > kp or w.shape != (n, kp // 2 if packed else kp) or not w.is_contiguous()
                or (group and kp % group) or scale.numel() != scales
                or zp.numel() != scales or (bias is not None and bias.numel() != n)):
            raise ValueError(f"wo_linear_plan: the input's last dim {k} must be at most "
                             f"Kp={kp}, and the codes {tuple(w.shape)}, scales "
                             f"{tuple(scale.shape)} and bias must be a layer's own "
                             f"(its _small_args) for N={n}, group={group}")
        (bias,) = _own(bias)
        unmoved = _same_memory(scale, zp)
        params = (ctypes.c_int64 * lib.lb_wo_linear_small_nparams())(
            m, k, w.data_ptr(), packed, signed, n, kp, group, scale.data_ptr(), zp.data_ptr(),
            _ptr(bias) or 0, int(relu), threads_for(m * n * kp))
        call, p_addr = lib.lb_wo_linear_small_prepared, ctypes.addressof(params)

        def run_small(x_ptr: int, y_ptr: int) -> int:
            return call(p_addr, x_ptr, y_ptr) if unmoved() else 1

        out = (*shape[:-1], n)
        return Plan(run_small, out, torch.empty, (w, scale, zp, bias, params))
    if u4p is None:
        return None
    lib4, (wp, sc, zp4, n, kp, group) = u4p
    check_u4p_args(u4p[1], "wo_linear_plan")
    check_bias(bias, n, "wo_linear_plan")
    if k > kp:
        raise ValueError(f"wo_linear_plan: the input's last dim {k} exceeds the layer's "
                         f"Kp={kp}")
    bias, smooth = _own(bias, smooth)  # (sc / zp4: the layer's private INT4 panels)
    call4 = lib4.lbk_u4p_linear if smooth is None else lib4.lbk_u4p_linear_s
    head4 = (m, k, k, m * k, wp.data_ptr(), wp.numel(), n, kp, group, sc.data_ptr(),
             zp4.data_ptr(), _ptr(bias), int(relu))
    tail4 = (m * n, torch.get_num_threads(), *(() if smooth is None else (smooth.data_ptr(),)))

    def run_u4p(x_ptr: int, y_ptr: int) -> int:
        return call4(x_ptr, *head4, y_ptr, *tail4)

    out = (*shape[:-1], n)
    return Plan(run_u4p, out, _alloc_for(out), (wp, sc, zp4, bias, smooth))
