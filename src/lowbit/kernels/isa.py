"""lowbit's per-ISA C kernels (``csrc/lowbit_gemm_*.c``, one library per instruction set):
the exact INT8 x INT8 GEMM on packed weight panels and the INT4 weight kernel. Python keeps
the packed weights (cached on the weight tensor) and checks every operand; the C side checks
sizes against the memory it was given.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from lowbit.kernels.base import _extent, c_rows, native_eager
from lowbit.memory import empty as pooled_empty
from lowbit.native import addcmul_fma, load_gemm


def s8_packed(w2d: torch.Tensor, lib: Any) -> torch.Tensor | None:
    """The int8 ``[N, K]`` weight in the C GEMM's panel layout (``lowbit_gemm.h``), cached on
    the tensor and rebuilt when it changes in place; None when a code is -128 (the sign trick
    needs [-127, 127]: symmetric weights never have it) so the caller uses another GEMM.

    Example:
        >>> w = torch.randint(-127, 128, (20, 9), dtype=torch.int8)
        >>> lib = load_gemm("portable")
        >>> packed = lib and s8_packed(w, lib)  # ceil(20/16) x ceil(9/4) steps, then colsums
        >>> lib is None or packed.numel() == 2 * 3 * 64 + 2 * 16 * 4
        True
    """
    # inference tensors have no version counter (nor can they change outside inference mode)
    key = (-1 if w2d.is_inference() else w2d._version, w2d.data_ptr(), tuple(w2d.shape))
    cached = w2d.__dict__.get("_lowbit_s8")
    if cached is not None and cached[0] == key:
        return cached[1]
    if w2d.dim() != 2 or w2d.dtype != torch.int8 or w2d.device.type != "cpu":
        raise ValueError(f"s8_packed: needs an int8 CPU [N, K] weight; got {w2d.dtype} "
                         f"{tuple(w2d.shape)} on {w2d.device}")
    w = w2d.contiguous()
    n, k = w.shape
    nbytes = lib.lbk_s8_packed_bytes(n, k)
    out = torch.empty(max(nbytes, 0), dtype=torch.int8)
    rc = lib.lbk_s8_pack(w.data_ptr(), n, k, k, out.data_ptr(), nbytes) if nbytes > 0 else -1
    if rc not in (0, -2):
        raise ValueError(f"s8_packed: the C packer refused a {n}x{k} weight (code {rc})")
    packed = out if rc == 0 else None
    w2d.__dict__["_lowbit_s8"] = (key, packed)
    return packed


def _s8_call(lib: Any, x: torch.Tensor, kind: int, scale: torch.Tensor | None, per_row: bool,
             dynamic: bool, zp: torch.Tensor | None, qmin: int, qmax: int,
             packed: torch.Tensor, n: int, comp: torch.Tensor | None,
             w_scale: torch.Tensor | None, bias: torch.Tensor | None, relu: bool,
             y: torch.Tensor, y_kind: int, smooth: torch.Tensor | None = None) -> None:
    """One ``lbk_s8_linear`` call: the C side bounds-checks ``x`` and ``y`` against their
    extents; the per-row / per-column operands are checked here (dtype, size, layout).
    ``smooth``: float32 ``[K]`` input smoothing applied as the rows are quantized."""
    x, ldx = c_rows(x)
    m, k = x.shape
    for name, t, dt, size in (("scale", scale, torch.float32, m if per_row else 1),
                              ("zero_point", zp, torch.int32, m if per_row else 1),
                              ("comp", comp, torch.int32, n),
                              ("w_scale", w_scale, torch.float32, n),
                              ("bias", bias, torch.float32, n),
                              ("smooth", smooth, torch.float32, k)):
        if t is not None and (t.dtype != dt or t.numel() != size or not t.is_contiguous()):
            raise ValueError(f"lowbit INT8 GEMM: {name} must be a contiguous {dt} tensor of "
                             f"{size} values; got {t.dtype} {tuple(t.shape)}")
    if packed.dtype != torch.int8 or not packed.is_contiguous():
        raise ValueError("lowbit INT8 GEMM: the packed weight must come from s8_packed")
    rc = lib.lbk_s8_linear(
        x.data_ptr(), kind, m, k, ldx, _extent(x),
        None if scale is None else scale.data_ptr(), int(per_row), int(dynamic),
        None if zp is None else zp.data_ptr(), qmin, qmax, packed.data_ptr(), packed.numel(), n,
        None if comp is None else comp.data_ptr(),
        None if w_scale is None else w_scale.data_ptr(),
        None if bias is None else bias.data_ptr(), int(relu), int(addcmul_fma()),
        y.data_ptr(), y_kind, _extent(y), torch.get_num_threads(),
        None if smooth is None else smooth.data_ptr())
    if rc != 0:
        raise RuntimeError(f"lowbit INT8 GEMM ({lib.lbk_isa().decode()}) refused its arguments "
                           f"(code {rc}): x {tuple(x.shape)} stride {x.stride()}, N={n}")


def _s8_acc(lib: Any, q: torch.Tensor, packed: torch.Tensor, n: int,
            pooled: bool) -> torch.Tensor:
    """int32 ``q @ w.T`` ``[M, N]`` of int8 codes ``q [M, K]`` on the packed weight."""
    m = q.shape[0]
    acc = (pooled_empty((m, n), torch.int32) if pooled
           else torch.empty((m, n), dtype=torch.int32))
    _s8_call(lib, q, 2, None, False, False, None, -128, 127, packed, n, None, None, None, False,
             acc, 2)
    return acc


def s8_acc(q: torch.Tensor, w2d: torch.Tensor, kernel: str, pooled: bool
           ) -> torch.Tensor | None:
    """Raw int32 ``q @ w2d.T`` ``[M, N]`` on the C GEMM of ``kernel`` (``"s8_avx2"`` /
    ``"s8_portable"``); None when it does not apply (library unavailable, uint8 codes, or a
    -128 weight code), so that the caller takes an exact torch path.

    Example:
        >>> q = torch.randint(-128, 128, (3, 40), dtype=torch.int8)
        >>> w = torch.randint(-127, 128, (5, 40), dtype=torch.int8)
        >>> acc = s8_acc(q, w, "s8_portable", False)
        >>> acc is None or torch.equal(acc, (q.long() @ w.long().T).int())
        True
    """
    lib = load_gemm(kernel[3:])
    if lib is None or q.dtype != torch.int8 or not native_eager(q, w2d):
        return None
    packed = s8_packed(w2d, lib)
    return None if packed is None else _s8_acc(lib, q, packed, w2d.shape[0], pooled)


def u4_pack(codes: torch.Tensor, signed: bool, scale: torch.Tensor, zero_point: torch.Tensor,
            group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """INT4 codes ``[N, Kp]`` and their per-group qparams in the layout of lowbit's INT4 C
    kernels (``"u4_<isa>"``): unsigned codes ``u = code + 8`` (signed) or ``code``, per 32
    codes 16 bytes ``u[j] | u[j + 16] << 4``; float32 scales and unsigned zero-points
    ``[N, Kp / group]``. ``Kp`` and ``group`` must be multiples of 32.

    Example:
        >>> codes = torch.randint(-8, 8, (2, 64), dtype=torch.int8)
        >>> wq, s, z = u4_pack(codes, True, torch.ones(2, 2), torch.zeros(2, 2, dtype=torch.int32),
        ...                    32)
        >>> tuple(wq.shape), int(wq[0, 0] & 15) == int(codes[0, 0]) + 8
        ((2, 32), True)
    """
    u, s, z = _u4_unsigned(codes, signed, scale, zero_point, group, "u4_pack")
    n, kp = u.shape
    u = u.reshape(n, kp // 32, 2, 16)
    wq = (u[:, :, 0] | (u[:, :, 1] << 4)).reshape(n, kp // 2).contiguous()  # (N, Kp/2)
    return wq, s, z


def _u4_unsigned(codes: torch.Tensor, signed: bool, scale: torch.Tensor,
                 zero_point: torch.Tensor, group: int, caller: str
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The INT4 kernels' common operands: unsigned codes ``u`` uint8 ``[N, Kp]`` in [0, 15],
    float32 scales and unsigned zero-points ``[N, Kp / group]`` (per-tensor ones repeated)."""
    n, kp = codes.shape
    if kp % 32 or group % 32 or kp % group:
        raise ValueError(f"{caller}: Kp={kp} and group={group} must be multiples of 32 "
                         "(and group must divide Kp)")
    u = codes.to(torch.int32) + (8 if signed else 0)  # (N, Kp) in [0, 15]
    if u.numel() and (int(u.min()) < 0 or int(u.max()) > 15):
        raise ValueError(f"{caller}: codes out of the 4-bit range")
    groups = kp // group
    s = scale.float().reshape(-1).expand(n * groups).reshape(n, groups).contiguous() \
        if scale.numel() == 1 else scale.float().reshape(n, groups).contiguous()
    z = (zero_point.to(torch.int32) + (8 if signed else 0)).float()
    z = (z.reshape(-1).expand(n * groups) if z.numel() == 1 else z).reshape(n, groups)
    return u.to(torch.uint8), s, z.contiguous()


def u4p_pack(codes: torch.Tensor, signed: bool, scale: torch.Tensor, zero_point: torch.Tensor,
             group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """INT4 codes ``[N, Kp]`` and their per-group qparams in the panel layout of lowbit's
    INT4 x INT8 kernels (``"u4q8_<isa>"``): unsigned codes ``u`` in panels of 8 columns, per
    8-K pair 32 bytes, byte ``4c + j`` = ``u[c][8t + j] | u[c][8t + 4 + j] << 4``; scales
    (float32) and unsigned zero-points (uint8) as ``[ceil(N / 16), Kp / group, 16]`` (per 16
    columns, i.e. a pair of panels, its groups one after the other: the kernel streams them
    beside the codes; zero for the padding columns). ``Kp`` and ``group`` must be multiples of
    32, and the zero-points within the codes' range (as lowbit's quantizers make them).

    Example:
        >>> codes = torch.randint(-8, 8, (3, 64), dtype=torch.int8)
        >>> wp, s, z = u4p_pack(codes, True, torch.ones(3, 2),
        ...                     torch.zeros(3, 2, dtype=torch.int32), 32)
        >>> wp.numel(), tuple(s.shape), int(wp[0] & 15) == int(codes[0, 0]) + 8
        (256, (1, 2, 16), True)
    """
    u, s, z = _u4_unsigned(codes, signed, scale, zero_point, group, "u4p_pack")
    n, kp = u.shape
    if z.numel() and (float(z.min()) < 0 or float(z.max()) > 15):
        raise ValueError("u4p_pack: zero-points outside the 4-bit codes' range (the layer's "
                         "weight_zero_point was not made by a lowbit quantizer, or its file is "
                         "corrupt): quantize the layer again")
    pad = -n % 8  # zero columns up to whole panels
    u = F.pad(u, (0, 0, 0, pad)).reshape(-1, 8, kp // 8, 2, 4)  # [panel, c, pair, half, j]
    u = u.permute(0, 2, 1, 4, 3)  # [panel, pair, c, j, half]
    wp = (u[..., 0] | (u[..., 1] << 4)).contiguous().reshape(-1)
    s, z = (F.pad(t, (0, 0, 0, -n % 16)).reshape(-1, 16, kp // group).transpose(1, 2)
            .contiguous() for t in (s, z))  # [pair of panels, group, 16 columns]
    return wp, s, z.to(torch.uint8)


def run_u4p_linear(lib: Any, x: torch.Tensor, args: tuple, bias: torch.Tensor | None,
                   relu: bool) -> torch.Tensor:
    """``x [M, K] @ W.T (+ bias, ReLU)`` on lowbit's INT4 x INT8 kernel of one ISA; ``args`` =
    ``(wp, scales, zero_points, n, kp, group)`` from :func:`u4p_pack`. x is quantized to int8
    per row and weight group (scale ``max|x_g| / 127``, as llama.cpp's Q8 blocks; ONNX
    Runtime's ``MatMulNBits`` with ``accuracy_level=4`` does the same) and each group's dot
    product is taken in integers: off from dequantize + ``F.linear`` by the activation
    rounding, about 5e-3 relative on Gaussian inputs. Rows holding NaN / Inf are computed from
    their float values.

    Example:
        >>> codes = torch.randint(-8, 8, (3, 64), dtype=torch.int8)
        >>> s, z = torch.rand(3, 2), torch.randint(-8, 8, (3, 2), dtype=torch.int32)
        >>> lib, x = load_gemm("portable"), torch.randn(2, 64)
        >>> w = (codes.float() - z.float().repeat_interleave(32, 1)) * s.repeat_interleave(32, 1)
        >>> y = None if lib is None else run_u4p_linear(
        ...     lib, x, (*u4p_pack(codes, True, s, z, 32), 3, 64, 32), None, False)
        >>> y is None or bool((y - x @ w.T).norm() < 0.02 * (x @ w.T).norm())
        True
    """
    check_u4p_args(args, "run_u4p_linear")
    wp, sc, zp, n, kp, group = args
    return _u4_call(lib.lbk_u4p_linear, "run_u4p_linear", "lowbit INT4 x INT8 kernel", lib, x,
                    wp, n, kp, group, sc, zp, bias, relu)


def check_u4p_args(args: tuple, caller: str) -> None:
    """Raise ValueError unless ``args`` = ``(wp, scales, zero_points, n, kp, group)`` are laid
    out as :func:`u4p_pack` makes them (what the C kernel reads beside the sizes it checks
    itself).

    Example:
        >>> check_u4p_args((torch.zeros(0, dtype=torch.uint8), torch.zeros(3), torch.zeros(8),
        ...                 8, 32, 32), "demo")
        Traceback (most recent call last):
        ...
        ValueError: demo: scales must be contiguous float32 [ceil(N / 16), Kp / group, 16] ...
    """
    wp, sc, zp, n, kp, group = args
    cols = -(-n // 16) * 16  # the C kernel reads [cols / 16, Kp / group, 16] of each
    for name, t, dtype in (("scales", sc, torch.float32), ("zero_points", zp, torch.uint8)):
        if (t.dtype != dtype or not t.is_contiguous() or group <= 0 or kp % group
                or t.numel() != kp // group * cols):
            raise ValueError(f"{caller}: {name} must be contiguous {str(dtype)[6:]} "
                             f"[ceil(N / 16), Kp / group, 16] from u4p_pack; got {t.dtype} "
                             f"{tuple(t.shape)} for N={n}, Kp={kp}, group={group}")
    if wp.dtype != torch.uint8 or not wp.is_contiguous():
        raise ValueError(f"{caller}: the packed weight must come from u4p_pack")


def check_bias(bias: torch.Tensor | None, n: int, caller: str) -> None:
    """Raise ValueError unless ``bias`` is None or what the C kernels read: ``n`` contiguous
    float32 values.

    Example:
        >>> check_bias(torch.zeros(3, dtype=torch.bfloat16), 3, "demo")
        Traceback (most recent call last):
        ...
        ValueError: demo: bias must be a contiguous float32 tensor of N=3 values; got ...
    """
    _check_f32_vector(bias, n, caller, "bias", "N", "; pass bias.float()")


def check_smooth(smooth: torch.Tensor | None, k: int, caller: str) -> None:
    """Raise ValueError unless ``smooth`` (an input smoothing, AWQ / SmoothQuant) is None or
    what the C quantizers read: ``k`` contiguous float32 values.

    Example:
        >>> check_smooth(torch.ones(4), 3, "demo")
        Traceback (most recent call last):
        ...
        ValueError: demo: smooth must be a contiguous float32 tensor of K=3 values; got ...
    """
    _check_f32_vector(smooth, k, caller, "smooth", "K")


def _check_f32_vector(t: torch.Tensor | None, size: int, caller: str, what: str, dim: str,
                      hint: str = "") -> None:
    if t is not None and (t.dtype != torch.float32 or not t.is_contiguous()
                          or t.numel() != size):
        raise ValueError(f"{caller}: {what} must be a contiguous float32 tensor of {dim}={size} "
                         f"values; got {t.dtype} {tuple(t.shape)}{hint}")


def _u4_call(fn: Any, caller: str, what: str, lib: Any, x: torch.Tensor, packed: torch.Tensor,
             n: int, kp: int, group: int, scales: torch.Tensor, zero_points: torch.Tensor,
             bias: torch.Tensor | None, relu: bool) -> torch.Tensor:
    """One call of an INT4 C entry point (``lbk_u4_linear`` / ``lbk_u4p_linear``: the same
    arguments); the C side bounds-checks ``x`` and ``y`` against their extents."""
    if x.dtype != torch.float32 or x.dim() != 2:
        raise ValueError(f"{caller}: x must be float32 [M, K]; got {x.dtype} {tuple(x.shape)}")
    check_bias(bias, n, caller)
    x, ldx = c_rows(x)
    m, k = x.shape
    y = torch.empty((m, n))
    rc = fn(x.data_ptr(), m, k, ldx, _extent(x) // 4, packed.data_ptr(),
            packed.numel(), n, kp, group, scales.data_ptr(), zero_points.data_ptr(),
            None if bias is None else bias.data_ptr(), int(relu), y.data_ptr(), y.numel(),
            torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"{what} ({lib.lbk_isa().decode()}) refused its arguments (code "
                           f"{rc}): x {tuple(x.shape)}, N={n}, Kp={kp}, group={group}")
    return y


def run_u4_linear(lib: Any, x: torch.Tensor, args: tuple, bias: torch.Tensor | None,
                  relu: bool) -> torch.Tensor:
    """``x [M, K] @ W.T (+ bias, ReLU)`` in float32 on lowbit's INT4 C kernel of one ISA;
    ``args`` = ``(wq, scales, zero_points, kp, group)`` from :func:`u4_pack`. The same as
    dequantize + ``F.linear`` up to float32 rounding (each group's dot product first).

    Example:
        >>> codes = torch.randint(-8, 8, (3, 64), dtype=torch.int8)
        >>> s, z = torch.rand(3, 2), torch.randint(-8, 8, (3, 2), dtype=torch.int32)
        >>> lib, x = load_gemm("portable"), torch.randn(2, 64)
        >>> w = (codes.float() - z.float().repeat_interleave(32, 1)) * s.repeat_interleave(32, 1)
        >>> lib is None or torch.allclose(run_u4_linear(lib, x, (*u4_pack(codes, True, s, z, 32),
        ...     64, 32), None, False), x @ w.T, atol=1e-4)
        True
    """
    wq, sc, zp, kp, group = args
    n = wq.shape[0] if wq.dim() == 2 else -1
    if (wq.dtype != torch.uint8 or not wq.is_contiguous() or n < 0 or group <= 0 or kp % 32
            or group % 32 or kp % group or wq.shape[1] != kp // 2):
        raise ValueError(f"run_u4_linear: the packed weight must be u4_pack's contiguous uint8 "
                         f"[N, Kp / 2] with Kp and group multiples of 32; got {wq.dtype} "
                         f"{tuple(wq.shape)}, Kp={kp}, group={group}")
    for name, t in (("scales", sc), ("zero_points", zp)):  # (what the C kernel reads)
        if t.dtype != torch.float32 or not t.is_contiguous() or t.numel() != n * (kp // group):
            raise ValueError(f"run_u4_linear: {name} must be u4_pack's contiguous float32 "
                             f"[N, Kp / group] = [{n}, {kp // group}]; got {t.dtype} "
                             f"{tuple(t.shape)}")
    return _u4_call(lib.lbk_u4_linear, "run_u4_linear", "lowbit INT4 kernel", lib, x, wq,
                    wq.shape[0], kp, group, sc, zp, bias, relu)


#: ``lbk_rnn_scan``'s kind code and gate count of each recurrent layer kind.
_RNN_KINDS = {"LSTM": (0, 4), "GRU": (1, 3), "RNN_TANH": (2, 1), "RNN_RELU": (3, 1)}


def run_rnn_scan(lib: Any, kind: str, gx: torch.Tensor, spans: list[tuple[int, int]],
                 h: torch.Tensor, c: torch.Tensor | None, packed: torch.Tensor,
                 w_scale: torch.Tensor, bias: torch.Tensor | None, qmin: int,
                 qmax: int) -> torch.Tensor:
    """One LSTM / GRU / Elman RNN layer direction's whole recurrence in one ``lbk_rnn_scan``
    call (``kind``: ``"LSTM"``, ``"GRU"``, ``"RNN_TANH"`` or ``"RNN_RELU"``).

    ``gx [rows, G * hid]``: the input projection of every step (its bias included); ``spans``:
    ``(first row, batch rows)`` per step in order; ``h`` / ``c [batch, hid]`` are updated in
    place (the first ``b`` rows at a step of ``b``). Returns ``out [rows, hid]``. Each step's
    hidden GEMM is the exact INT8 kernel (the layer's dynamic per-row codes); the gates use C's
    vectorized exp, so outputs agree with the PyTorch loop to float rounding (documented in
    ``docs/backends.md``), not bit for bit.

    Example:
        >>> lib = load_gemm("portable")
        >>> w = torch.randint(-127, 128, (12, 3), dtype=torch.int8)  # GRU: 3 gates x hid 3
        >>> h = torch.zeros(1, 3)
        >>> out = lib and run_rnn_scan(lib, "GRU", torch.randn(2, 9), [(0, 1), (1, 1)], h,
        ...                            None, s8_packed(w[:9], lib), torch.ones(9), None, -128, 127)
        >>> out is None or (tuple(out.shape) == (2, 3) and torch.equal(out[1], h[0]))
        True
    """
    code, gates = _RNN_KINDS[kind]
    hid = h.shape[1]
    rows = gx.shape[0] if gx.dim() == 2 else -1
    for name, t, shape in (("gx", gx, (rows, gates * hid)), ("h", h, (h.shape[0], hid)),
                           ("c", c, (h.shape[0], hid)), ("w_scale", w_scale, (gates * hid,)),
                           ("bias", bias, (gates * hid,))):
        if t is not None and (t.dtype != torch.float32 or tuple(t.shape) != shape
                              or not t.is_contiguous()):
            raise ValueError(f"lowbit RNN scan: {name} must be a contiguous float32 tensor of "
                             f"shape {shape}; got {t.dtype} {tuple(t.shape)}")
    if kind == "LSTM" and c is None:
        raise ValueError("lowbit RNN scan: an LSTM needs its cell state c")
    if packed.dtype != torch.int8 or not packed.is_contiguous():
        raise ValueError("lowbit RNN scan: the packed weight must come from s8_packed")
    out = torch.empty((rows, hid))
    span_t = torch.tensor(spans, dtype=torch.int64).reshape(-1, 2)
    rc = lib.lbk_rnn_scan(code, gx.data_ptr(), gx.numel(), rows, hid,
                          span_t.data_ptr(), span_t.shape[0], h.data_ptr(),
                          None if c is None else c.data_ptr(), h.numel(), h.shape[0],
                          packed.data_ptr(), packed.numel(), w_scale.data_ptr(),
                          None if bias is None else bias.data_ptr(), int(addcmul_fma()), qmin,
                          qmax, out.data_ptr(), out.numel(), torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"lowbit RNN scan ({lib.lbk_isa().decode()}) refused its arguments "
                           f"(code {rc}): gx {tuple(gx.shape)}, h {tuple(h.shape)}")
    return out
