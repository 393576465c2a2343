"""INT8 convolutions: im2col on int8 codes + the INT8 GEMM, an fp32 conv over the centered codes
(small K, exact), the direct C conv for small layers, and a fused max-pool.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from lowbit.kernels.base import _F32_EPS, c_layout, native_lib_for
from lowbit.kernels.gemm import _float_epilogue, _int8_acc, _int8_epilogue
from lowbit.kernels.quantize import _absmax, quantize_activation
from lowbit.kernels.select import select_kernel
from lowbit.memory import empty as pooled_empty
from lowbit.native import threads_for


def _conv_out_hw(shape: Sequence[int], ksize: Sequence[int], stride: Sequence[int],
                 padding: Sequence[int], dilation: Sequence[int]) -> tuple[int, int]:
    """Output height and width of a conv of an input shaped ``[B, C, H, W]`` (zero padding)."""
    h, w = shape[2], shape[3]
    return ((h + 2 * padding[0] - dilation[0] * (ksize[0] - 1) - 1) // stride[0] + 1,
            (w + 2 * padding[1] - dilation[1] * (ksize[1] - 1) - 1) // stride[1] + 1)


def int8_conv2d(x: torch.Tensor, x_scale: torch.Tensor, x_zp: torch.Tensor | None, qmin: int,
                qmax: int, w: torch.Tensor, w_scale: torch.Tensor, colsum: torch.Tensor,
                bias: torch.Tensor | None, stride: tuple[int, int], padding: tuple[int, int],
                dilation: tuple[int, int], groups: int, *, relu: bool = False,
                kernel: str | None = None, w_zp: torch.Tensor | None = None,
                w_float: torch.Tensor | None = None, w_cols: torch.Tensor | None = None
                ) -> torch.Tensor:
    """INT8 Conv2d on per-tensor activation qparams: fp32 conv on codes, im2col + INT8 GEMM, or
    reference.

    Zero padding is exact: 0.0 quantizes to the zero-point, which the compensation removes.
    ``"fp32_codes_conv"`` (small K) runs ``F.conv2d`` in float32 on the centered codes, exact
    while ``K * 255 * 255 < 2^24`` (:data:`CONV_CODES_EXACT_K`), any ``groups``.

    Args:
        x: float input ``[B, C, H, W]``; x_scale / x_zp: per-tensor qparams (float32 / int32;
            ``x_zp=None`` means 0 and skips the zero-point compensation); ``x_scale=None``:
            dynamic symmetric, ``max|x| / qmax`` (clamped to float32 eps), zero-point 0.
        qmin, qmax: activation code range.
        w: int8 weight ``[O, C/groups, kh, kw]``; w_scale float32 ``[O]``;
        colsum: int32 ``[O]``, the sum of ``w - w_zp`` over all but the first dim.
        bias, stride, padding, dilation, groups: as in ``F.conv2d``; relu: fused ReLU.
        kernel: ``"int_mm_s8s8"`` / ``"fp32_codes"`` (groups must be 1), ``"fp32_codes_conv"``
            (K at most :data:`CONV_CODES_EXACT_K`) or ``"reference"``; None: chosen by
            :func:`select_kernel`.
        w_zp: int32 weight zero-points ``[O]``, or None for symmetric weights.
        w_float: for ``"fp32_codes_conv"``: the float32 ``w - w_zp`` (a module's cache); None
            computes it.
        w_cols: for the GEMM kernels: ``w.permute(0, 2, 3, 1).reshape(O, -1)`` (a module's
            cache); None computes it.

    Returns:
        float32 ``[B, O, Ho, Wo]``.

    Example:
        >>> w = torch.randint(-127, 128, (4, 3, 3, 3), dtype=torch.int8)
        >>> x = torch.randn(2, 3, 5, 5)
        >>> args = (x, torch.tensor(0.02), torch.tensor(3), -128, 127, w, torch.ones(4),
        ...         w.int().sum((1, 2, 3)), None, (1, 1), (1, 1), (1, 1), 1)
        >>> torch.equal(int8_conv2d(*args), int8_conv2d(*args, kernel="reference"))
        True
    """
    bsz = x.shape[0]
    o, _, kh, kw = w.shape
    ho, wo = _conv_out_hw(x.shape, (kh, kw), stride, padding, dilation)
    if kernel is None:
        kernel = select_kernel("int8_conv2d", bsz * ho * wo, groups=groups, k=w[0].numel(),
                               n=o, device=x.device.type)
    native = kernel != "reference"
    if kernel == "fp32_codes_conv":
        return _conv_codes_fp32(x, x_scale, x_zp, qmin, qmax, w, w_scale, bias, stride, padding,
                                dilation, groups, relu, w_zp, w_float)
    if w_cols is None:
        w_cols = w.permute(0, 2, 3, 1).reshape(o, -1)  # (O, kh*kw*C), the order of the columns
    if (native and groups == 1 and w_zp is None and x.dtype == torch.float32
            and x.is_contiguous() and (lib := native_lib_for(x)) is not None):
        return _conv_gemm_native(lib, x, x_scale, x_zp, qmin, qmax, w_cols, (kh, kw), w_scale,
                                 colsum, bias, stride, padding, dilation, (ho, wo), relu, kernel)
    q, x_scale, zp = quantize_activation(x, qmin, qmax, x_scale, x_zp, per_token=False,
                                         native=native)  # (B, C, H, W) int8 codes
    if kernel == "reference":
        centered = q.double() if zp is None else q.double() - zp.double()  # zero pad = exact
        wc = w.double() if w_zp is None else w.double() - w_zp.double().reshape(-1, 1, 1, 1)
        acc = F.conv2d(centered, wc, None, stride, padding, dilation, groups)
        acc = acc.to(torch.int32).permute(0, 2, 3, 1).reshape(-1, o)  # (B*Ho*Wo, O)
    else:  # quantize the input once, then im2col on int8 codes (4x fewer bytes than float)
        pad = 0 if zp is None else int(zp)
        cols = _im2col_codes(q, pad, (kh, kw), stride, padding, dilation, (ho, wo))
        acc = _int8_acc(cols, zp, w_cols, colsum, None, kernel, w_zp)  # (B*Ho*Wo, O) int32
    y = _int8_epilogue(acc, x_scale, w_scale, bias, relu, native)  # (B*L, O)
    return y.reshape(bsz, ho, wo, o).permute(0, 3, 1, 2)  # (B, O, Ho, Wo), channels-last memory


def conv2d_fused(lib: Any, x: torch.Tensor, kernel: str, x_scale: torch.Tensor | None,
                 x_zp: torch.Tensor | None, zp_int: int, qmin: int, qmax: int,
                 weight: torch.Tensor, w_scale: torch.Tensor, colsum: torch.Tensor,
                 bias: torch.Tensor | None, ksize: tuple[int, int], stride: tuple[int, int],
                 padding: tuple[int, int], dilation: tuple[int, int], relu: bool,
                 pool: int = 0) -> torch.Tensor:
    """A module's INT8 conv on the C kernels with everything checked beforehand (the layer's
    tensors by ``_refresh_cache``, ``x`` float32, contiguous, CPU, 4-D): the same kernels and
    bits as :func:`int8_conv2d`, without its per-call preparation (a batch-1 conv is ~8-25 us).

    Args:
        lib: from :func:`native_lib_for`. kernel: ``"fp32_codes_conv"`` (``weight`` = the
            float32 centered weight codes) or ``"int_mm_s8s8"`` / ``"fp32_codes"`` (``weight``
            = the int8 ``[O, kh*kw*C]`` im2col matrix).
        x_scale, x_zp: static qparams (0-dim float32 / int32), or None / None for dynamic
            symmetric; zp_int: ``x_zp`` as an int (0 when None).
        w_scale, colsum, bias: float32 ``[O]``, int32 ``[O]``, float32 ``[O]`` or None.
        ksize, stride, padding, dilation, relu: the conv's geometry and fused ReLU.
        pool: a fused ``MaxPool2d(pool)`` (kernel = stride, no padding) on the output; 0: none.

    Returns:
        float32 ``[B, O, Ho, Wo]`` (pooled: ``[B, O, Ho // pool, Wo // pool]``), contiguous.

    Example:
        >>> w = torch.randint(-127, 128, (4, 2, 3, 3), dtype=torch.int8)
        >>> x = torch.randn(1, 2, 5, 5)
        >>> args = (None, None, 0, -128, 127)
        >>> lib = native_lib_for(x)
        >>> y = lib and conv2d_fused(lib, x, "fp32_codes_conv", *args, w.float(), torch.ones(4),
        ...                          w.sum((1, 2, 3), dtype=torch.int32), None, (3, 3), (1, 1),
        ...                          (1, 1), (1, 1), False)
        >>> ref = int8_conv2d(x, None, None, -128, 127, w, torch.ones(4),
        ...                   w.sum((1, 2, 3), dtype=torch.int32), None, (1, 1), (1, 1), (1, 1),
        ...                   1, kernel="reference")
        >>> y is None or torch.equal(y, ref)
        True
    """
    if kernel == "fp32_codes_conv":
        y = _conv_codes_native(lib, x, x_scale, zp_int, qmin, qmax, weight, w_scale, bias,
                               stride, padding, dilation, 1, relu)
    else:
        y = _conv_gemm_native(lib, x, x_scale, x_zp, qmin, qmax, weight, ksize, w_scale,
                              colsum, bias, stride, padding, dilation,
                              _conv_out_hw(x.shape, ksize, stride, padding, dilation), relu, kernel,
                              zp_int=zp_int)
    return y if not pool else maxpool2d_native(lib, y, pool)


def maxpool2d_native(lib: Any, y: torch.Tensor, k: int) -> torch.Tensor:
    """``F.max_pool2d(y, k)`` (kernel = stride = k, no padding, floor) of a contiguous float32
    NCHW ``y`` by one C call; the same values (a max picks, it does not round).

    Example:
        >>> y = torch.arange(16.0).reshape(1, 1, 4, 4)
        >>> lib = native_lib_for(y)
        >>> out = lib and maxpool2d_native(lib, y, 2)
        >>> out is None or torch.equal(out, F.max_pool2d(y, 2))
        True
    """
    if y.dim() != 4 or y.dtype != torch.float32 or not y.is_contiguous() or k < 1:
        raise ValueError(f"maxpool2d_native: needs a contiguous float32 NCHW tensor and k >= 1; "
                         f"got {tuple(y.shape)} {y.dtype} (contiguous={y.is_contiguous()}), "
                         f"k={k}; use F.max_pool2d otherwise")
    b, c, h, w = y.shape
    out = torch.empty((b, c, h // k, w // k))
    lib.lb_maxpool2d(y.data_ptr(), b * c, h, w, k, out.data_ptr(), threads_for(y.numel()))
    return out


def _conv_gemm_native(lib: Any, x: torch.Tensor, x_scale: torch.Tensor | None,
                      x_zp: torch.Tensor | None, qmin: int, qmax: int, w_cols: torch.Tensor,
                      ksize: tuple[int, int], w_scale: torch.Tensor, colsum: torch.Tensor,
                      bias: torch.Tensor | None, stride: tuple[int, int],
                      padding: tuple[int, int], dilation: tuple[int, int],
                      out_hw: tuple[int, int], relu: bool, kernel: str,
                      zp_int: int | None = None) -> torch.Tensor:
    """The im2col + INT8 GEMM conv with its three memory passes in C: quantize into a
    zero-point-padded NHWC int8 buffer, gather the patches, and the epilogue written straight
    to NCHW. The same codes, accumulator and epilogue as the PyTorch path, so the same bits."""
    bsz, c, h, wd = x.shape
    (kh, kw), (ph, pw), (ho, wo) = ksize, padding, out_hw
    o = w_cols.shape[0]
    dynamic = x_scale is None
    cell = ctypes.c_float() if dynamic else None  # the dynamic scale, written by C
    if x_scale is not None and not c_layout((x_scale, torch.float32)):
        x_scale = x_scale.float().contiguous()
    s_ptr = ctypes.addressof(cell) if cell is not None else x_scale.data_ptr()  # type: ignore[union-attr]
    zp = (0 if x_zp is None else int(x_zp)) if zp_int is None else zp_int
    qpad = torch.empty((bsz, h + 2 * ph, wd + 2 * pw, c), dtype=torch.int8)
    lib.lb_quantize_nhwc_padded_s8(x.data_ptr(), bsz, c, h, wd, ph, pw, s_ptr, int(dynamic),
                                   zp, qmin, qmax, qpad.data_ptr(), threads_for(x.numel()))
    if (kh, kw) == (1, 1) and stride == (1, 1) and (ph, pw) == (0, 0):
        cols = qpad.view(-1, c)  # (B*H*W, C)
    else:
        cols = torch.empty((bsz * ho * wo, kh * kw * c), dtype=torch.int8)
        lib.lb_im2col_nhwc_s8(qpad.data_ptr(), bsz, c, h + 2 * ph, wd + 2 * pw, kh, kw,
                              stride[0], stride[1], dilation[0], dilation[1], ho, wo,
                              cols.data_ptr(), threads_for(cols.numel()))
    zpt = None if x_zp is None else x_zp.to(torch.int32)
    acc = _int8_acc(cols, zpt, w_cols, colsum, None, kernel, pooled=True)  # (B*Ho*Wo, O) int32
    y = pooled_empty((bsz, o, ho, wo))
    if not c_layout((w_scale, torch.float32)) or w_scale.numel() != o:  # modules: already so
        w_scale = w_scale.float().expand(o).contiguous()
    b = bias if bias is None or c_layout((bias, torch.float32)) else bias.float().contiguous()
    lib.lb_epilogue_to_nchw(acc.data_ptr(), bsz, ho * wo, o, s_ptr, w_scale.data_ptr(),
                            None if b is None else b.data_ptr(), int(relu), y.data_ptr(),
                            threads_for(acc.numel()))
    return y


def _conv_codes_fp32(x: torch.Tensor, x_scale: torch.Tensor | None, x_zp: torch.Tensor | None,
                     qmin: int, qmax: int, w: torch.Tensor, w_scale: torch.Tensor,
                     bias: torch.Tensor | None, stride: tuple[int, int],
                     padding: tuple[int, int], dilation: tuple[int, int], groups: int,
                     relu: bool, w_zp: torch.Tensor | None, w_float: torch.Tensor | None
                     ) -> torch.Tensor:
    """``"fp32_codes_conv"``: fp32 ``F.conv2d`` over centered codes, NCHW in and out.

    The centered codes ``q - zp = clamp(round(x * (1/s)), qmin - zp, qmax - zp)`` are the same
    integers as :func:`quantize_activation`'s, kept in float32 (no int8 round trip); zero
    padding is an exact 0.0. With ``K * 255 * 255 < 2^24`` every partial sum of the conv is an
    exactly represented integer, so the result equals the int32 accumulator in any summation
    order. The epilogue runs in place in NCHW with ``[O, 1, 1]`` broadcasts: the same per-element
    ops as :func:`_int8_epilogue` (hence the same bits), without the two ``[B*L, O]`` <-> NCHW
    copies of the GEMM paths.
    """
    o = w.shape[0]
    xf = x if x.dtype == torch.float32 else x.float()
    zp = 0 if x_zp is None else int(x_zp)
    if w_float is None:
        w_float = w.float() if w_zp is None else w.float().sub_(w_zp.float().reshape(-1, 1, 1, 1))
    lib = (native_lib_for(xf) if xf.is_contiguous() and w_scale.numel() == o
           and c_layout((w_scale, torch.float32), (bias, torch.float32)) else None)
    if lib is not None:
        if x_scale is not None and not c_layout((x_scale, torch.float32)):
            x_scale = x_scale.float().contiguous()
        return _conv_codes_native(lib, xf, x_scale, zp, qmin, qmax, w_float, w_scale, bias,
                                  stride, padding, dilation, groups, relu)
    if x_scale is None:  # max|x| / qmax, zero-point 0: as choose_qparams
        x_scale = _absmax(xf, False).div_(qmax).clamp_(min=_F32_EPS)
    t = xf * x_scale.float().reciprocal()  # as quantize_activation
    t.round_()
    t.clamp_(qmin - zp, qmax - zp)  # == clamp(round + zp, qmin, qmax) - zp, |.| <= 255
    y = F.conv2d(t, w_float, None, stride, padding, dilation, groups).contiguous()
    return _float_epilogue(y, x_scale, w_scale.reshape(o, 1, 1),
                           None if bias is None else bias.reshape(o, 1, 1), relu)


#: Convolutions of up to this many multiply-adds (and groups 1, width stride 1) run as the
#: direct C conv (:func:`conv2d_direct_native`) instead of ``F.conv2d`` (oneDNN): 16 -> 32
#: channels 3x3 on 14x14 at batch 1 14.5 vs 21.8 us, batch 8 62 vs 77 us (2 threads).
DIRECT_CONV_MAX_MACS = 1 << 23


#: ... on all threads from this many multiply-adds (MNIST conv1 at batch 1, 113k: 1 thread).
DIRECT_CONV_PARALLEL_MACS = 1 << 18


def direct_conv_fits(x: torch.Tensor, weight_numel: int, stride: Sequence[int],
                     groups: int) -> bool:
    """Whether the direct C conv (:func:`conv2d_direct_native`, the weight-only conv) takes a
    conv of ``x`` with a weight of ``weight_numel`` values: float32 contiguous 4-D ``x``,
    groups 1, width stride 1, at most :data:`DIRECT_CONV_MAX_MACS` multiply-adds.

    Example:
        >>> direct_conv_fits(torch.zeros(1, 16, 14, 14), 32 * 16 * 9, (1, 1), 1)
        True
    """
    return (x.dim() == 4 and x.dtype == torch.float32 and x.is_contiguous()
            and _direct_conv_takes(x.shape, weight_numel, stride, groups))


def direct_conv_input(x: torch.Tensor, weight_numel: int, stride: Sequence[int],
                      groups: int) -> torch.Tensor | None:
    """``x`` as the direct C conv reads it when that conv takes the shape
    (:func:`direct_conv_fits`), else None. An input in another layout (channels-last, or a
    batch expanded from one image) is copied to contiguous NCHW, so every layout of the same
    values gets the same kernel and bits (``F.conv2d`` sums in another order).

    Example:
        >>> x = torch.zeros(1, 16, 14, 14).expand(4, -1, -1, -1)
        >>> direct_conv_input(x, 32 * 16 * 9, (1, 1), 1).is_contiguous()
        True
    """
    if (x.dim() != 4 or x.dtype != torch.float32
            or not _direct_conv_takes(x.shape, weight_numel, stride, groups)):
        return None
    return x if x.is_contiguous() else x.contiguous()


def _direct_conv_takes(shape: Sequence[int], weight_numel: int, stride: Sequence[int],
                       groups: int) -> bool:
    """The shape part of :func:`direct_conv_fits`, for an input shaped ``[B, C, H, W]``."""
    b, _, h, w = shape
    return groups == 1 and stride[1] == 1 and b * h * w * weight_numel <= DIRECT_CONV_MAX_MACS


def _direct_conv_result(err: int, caller: str) -> None:
    if err == -1:
        raise MemoryError(f"{caller}: no memory for the padded input / weight rows")
    if err:
        raise ValueError(f"{caller}: the width stride must be 1 (see direct_conv_fits)")


def run_wo_conv2d_native(lib: Any, x: torch.Tensor, c_args: tuple, out_channels: int,
                         ksize: Sequence[int], bias: torch.Tensor | None, stride: Sequence[int],
                         padding: Sequence[int], dilation: Sequence[int],
                         relu: bool) -> torch.Tensor:
    """A weight-only conv in one C call: the weight dequantized from its codes (``c_args`` as
    a weight-only module builds them for :func:`run_dequantize_weight_native`) straight into
    the direct conv (:func:`conv2d_direct_native`), with bias and ReLU. ``x`` and the conv
    must pass :func:`direct_conv_fits`.

    Example:
        >>> codes = torch.ones(2, 4, dtype=torch.int8)  # 2 output channels, 1 x 2 x 2 kernel
        >>> args = (codes, 0, 1, 2, 4, 4, 4, torch.tensor([0.5, 1.0]),
        ...         torch.zeros(2, dtype=torch.int32))
        >>> x = torch.ones(1, 1, 3, 3)
        >>> lib = native_lib_for(x)
        >>> y = lib and run_wo_conv2d_native(lib, x, args, 2, (2, 2), None, (1, 1), (0, 0),
        ...                                  (1, 1), False)
        >>> y is None or y[0, :, 0, 0].tolist() == [2.0, 4.0]
        True
    """
    w, packed, signed, _n, kp, _k, group, scale, zp = c_args
    b, c, h, wd = x.shape
    ho, wo = _conv_out_hw(x.shape, ksize, stride, padding, dilation)
    y = pooled_empty((b, out_channels, max(ho, 0), max(wo, 0)))
    macs = b * max(ho, 0) * max(wo, 0) * out_channels * c * ksize[0] * ksize[1]
    _direct_conv_result(lib.lb_wo_conv2d_small(
        x.data_ptr(), b, c, h, wd, w.data_ptr(), packed, signed, kp, group, scale.data_ptr(),
        zp.data_ptr(), out_channels, ksize[0], ksize[1], stride[0], stride[1], padding[0],
        padding[1], dilation[0], dilation[1], None if bias is None else bias.data_ptr(),
        int(relu), y.data_ptr(), _direct_conv_threads(macs)), "run_wo_conv2d_native")
    return y


def _direct_conv_threads(macs: int) -> int:
    """One thread below ~256k multiply-adds: the OpenMP fork costs more than it saves there."""
    return 1 if macs < DIRECT_CONV_PARALLEL_MACS else torch.get_num_threads()


def conv2d_direct_native(lib: Any, x: torch.Tensor, weight: torch.Tensor,
                         bias: torch.Tensor | None, stride: tuple[int, int],
                         padding: tuple[int, int], dilation: tuple[int, int],
                         relu: bool = False) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride, padding, dilation)`` (then ReLU) by the direct C conv,
    for operands :func:`direct_conv_fits` accepts: float32 sums over the taps in order with
    fused multiply-adds, so equal to ``F.conv2d`` up to float32 rounding, and exact for
    integer-valued operands (the centered codes of ``"fp32_codes_conv"``).

    Example:
        >>> x, w = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3)
        >>> lib = native_lib_for(x)
        >>> y = lib and conv2d_direct_native(lib, x, w, None, (1, 1), (1, 1), (1, 1))
        >>> y is None or torch.allclose(y, F.conv2d(x, w, None, 1, 1), atol=1e-5)
        True

    Raises:
        ValueError: operands the C conv cannot read as given (named), e.g. a weight whose input
            channels differ from ``x``'s; use ``F.conv2d`` for those.
    """
    if (weight.dim() != 4 or x.dim() != 4 or weight.shape[1] != x.shape[1]
            or not direct_conv_fits(x, weight.numel(), stride, 1)
            or not c_layout((weight, torch.float32), (bias, torch.float32))
            or (bias is not None and bias.numel() != weight.shape[0])):
        raise ValueError(
            f"conv2d_direct_native: needs contiguous float32 x [B, C, H, W] and weight "
            f"[O, C, kh, kw] with the same C, bias [O] or None, width stride 1 and at most "
            f"DIRECT_CONV_MAX_MACS multiply-adds (see direct_conv_fits); got x "
            f"{tuple(x.shape)} {x.dtype}, weight {tuple(weight.shape)} {weight.dtype}, bias "
            f"{None if bias is None else tuple(bias.shape)}, stride {tuple(stride)}; use F.conv2d")
    return _conv2d_direct(lib, x, weight, bias, stride, padding, dilation, relu)


def _conv2d_direct(lib: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                   relu: bool = False) -> torch.Tensor:
    """:func:`conv2d_direct_native` once its operands are known to fit."""
    b, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    ho, wo = _conv_out_hw(x.shape, (kh, kw), stride, padding, dilation)
    y = pooled_empty((b, o, max(ho, 0), max(wo, 0)))
    _direct_conv_result(lib.lb_conv2d_f32_small(
        x.data_ptr(), b, c, h, w, weight.data_ptr(), o, kh, kw, stride[0], stride[1],
        padding[0], padding[1], dilation[0], dilation[1], None if bias is None else bias.data_ptr(),
        int(relu), y.data_ptr(), _direct_conv_threads(b * max(ho, 0) * max(wo, 0) * weight.numel())
    ), "conv2d_direct_native")
    return y


def _conv_codes_native(lib: Any, x: torch.Tensor, x_scale: torch.Tensor | None, zp: int,
                       qmin: int, qmax: int, w_float: torch.Tensor, w_scale: torch.Tensor,
                       bias: torch.Tensor | None, stride: tuple[int, int],
                       padding: tuple[int, int], dilation: tuple[int, int], groups: int,
                       relu: bool) -> torch.Tensor:
    """``"fp32_codes_conv"`` on the C kernels: the centered codes in one pass (two when dynamic:
    ``x_scale`` None), the direct C conv over them (``F.conv2d`` when it does not fit), the
    epilogue in place in NCHW; the same bits as
    :func:`_conv_codes_fp32`'s PyTorch ops. ``x``, ``x_scale``, ``w_scale`` ``[O]`` and ``bias``
    are float32 and contiguous."""
    cell = ctypes.c_float() if x_scale is None else None  # the dynamic scale, written by C
    s_ptr = ctypes.addressof(cell) if cell is not None else x_scale.data_ptr()  # type: ignore[union-attr]
    t = torch.empty_like(x)
    lib.lb_quantize_centered_f32(x.data_ptr(), x.numel(), s_ptr, int(cell is not None), zp,
                                 qmin, qmax, t.data_ptr(), threads_for(x.numel()))
    if direct_conv_fits(t, w_float.numel(), stride, groups) and c_layout(
            (w_float, torch.float32)):  # exact either way: integer sums < 2^24
        y = _conv2d_direct(lib, t, w_float, None, stride, padding, dilation)
    else:
        y = F.conv2d(t, w_float, None, stride, padding, dilation, groups)
        y = y if y.is_contiguous() else y.contiguous()
    bsz, o, ho, wo = y.shape
    lib.lb_epilogue(y.data_ptr(), 0, bsz, o, ho * wo, s_ptr, 0, w_scale.data_ptr(),
                    None if bias is None else bias.data_ptr(), int(relu), None,
                    threads_for(y.numel()))
    return y


def _im2col_codes(u: torch.Tensor, pad_value: int, ksize: tuple[int, int], stride: tuple[int, int],
               padding: tuple[int, int], dilation: tuple[int, int], out_hw: tuple[int, int]
               ) -> torch.Tensor:
    """Channels-last im2col of integer codes ``[B, C, H, W]`` -> ``[B*Ho*Wo, kh*kw*C]``.

    Padding is filled with ``pad_value`` (the zero-point code, i.e. an exact 0.0); the patches are
    gathered by one strided copy.
    """
    bsz, c, h, w = u.shape
    (kh, kw), (ph, pw), (ho, wo) = ksize, padding, out_hw
    if (kh, kw) == (1, 1) and stride == (1, 1) and padding == (0, 0):
        return u.permute(0, 2, 3, 1).reshape(-1, c)  # (B*H*W, C)
    buf = u.new_full((bsz, h + 2 * ph, w + 2 * pw, c), pad_value)  # (B, Hp, Wp, C)
    buf[:, ph:ph + h, pw:pw + w] = u.permute(0, 2, 3, 1)
    sb, sh, sw, _ = buf.stride()
    patches = buf.as_strided((bsz, ho, wo, kh, kw, c),
                             (sb, sh * stride[0], sw * stride[1], sh * dilation[0],
                              sw * dilation[1], 1))
    return patches.reshape(bsz * ho * wo, kh * kw * c)
