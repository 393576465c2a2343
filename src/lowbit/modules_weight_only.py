"""Weight-only quantized modules: float activations in and out, low-bit weights dequantized by the
kernel (lowbit's INT4 kernel on CPUs without VNNI rounds the activations to int8 per weight group
inside the call unless ``Int4Linear.int8_activations`` is False; see :class:`Int4Linear`).

:class:`Int4Linear` (2..4 bits, packed two per byte), :class:`Int8WeightOnlyLinear` (5..8
bits), :class:`QuantizedEmbedding` and :class:`WeightOnlyConv2d` / :class:`WeightOnlyConv1d`.

Layout of every weight: the float weight is viewed as ``[N, K]`` (conv: ``[O, C/groups*kh*kw]``,
embedding: ``[num_embeddings, embedding_dim]``) and zero-padded on the right to ``Kp`` columns when
the group size does not divide ``K`` (or to an even count for packing); the padding dequantizes to
exact zeros and is reported in ``meta()["padded_in_features"]``. When ``K < group_size`` the
whole row is one group (``meta()["effective_weight_spec"]``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowbit._qmodule import (
    ConvAttributes,
    QuantizedModuleBase,
    check_conv_geometry,
    check_conv_input,
    conv_geometry,
    default_conv_geometry,
    quantize_weight,
)
from lowbit.config import QuantizationConfig, QuantSpec
from lowbit.kernels import (
    INT4_PACKED_MAX_M,
    INT4_PACKED_MAX_M_NO_BF16,
    U4_NATIVE_MAX_M,
    U4Q8_MAX_M_BF16,
    WEIGHT_ONLY_PACKED_MAX_M,
    c_layout,
    direct_conv_input,
    int4_pack_for_cpu,
    maxpool2d_native,
    native_eager,
    native_lib_for,
    run_dequantize_weight_native,
    run_u4_linear,
    run_u4p_linear,
    run_weight_only_linear_native,
    run_wo_conv2d_native,
    select_kernel,
    u4_pack,
    u4p_pack,
    weight_only_linear,
    wo_group,
    wo_small_fits,
    wo_small_max_rows,
)
from lowbit.kernels.plans import Plan, wo_conv_plan, wo_linear_plan
from lowbit.native import load_gemm, load_native
from lowbit.ops import dequantize, pack_int4, unpack_int4
from lowbit.qgrad import frozen_forward

__all__ = ["Int4Linear", "Int8WeightOnlyLinear", "QuantizedEmbedding", "WeightOnlyConv1d",
           "WeightOnlyConv2d"]


def _layout(k: int, spec: QuantSpec) -> tuple[QuantSpec, int]:
    """(effective spec, padded K) for a ``[N, K]`` weight."""
    packed = spec.bits <= 4
    if spec.granularity != "per_group":
        return spec, k + (k % 2 if packed else 0)
    g = spec.group_size
    assert g is not None
    if k < g:
        g = k + (k % 2 if packed else 0)
        return spec.with_(group_size=g), g
    kp = -(-k // g) * g
    if packed and kp % 2:
        kp += g
    return spec, kp


class _WeightOnly(QuantizedModuleBase):
    """Buffers, packing and dequantization shared by the weight-only modules."""

    def _codes_dtype(self) -> torch.dtype:
        return torch.uint8 if self.packed else self.weight_spec.storage_dtype

    def _init_w(self, n: int, k: int, has_bias: bool, spec: QuantSpec) -> None:
        self.weight_spec = spec
        self.eff_spec, self.kp = _layout(k, spec)
        self.n, self.k = n, k
        self.packed = spec.bits <= 4
        if self.packed:
            self.register_buffer("weight", torch.zeros(n, self.kp // 2, dtype=torch.uint8))
        else:
            self.register_buffer("weight", torch.zeros(n, self.kp, dtype=spec.storage_dtype))
        gran = self.eff_spec.granularity
        qshape: tuple[int, ...] = {"per_tensor": (), "per_channel": (n,)}.get(
            gran, (n, self.kp // (self.eff_spec.group_size or 1)))
        self.register_buffer("weight_scale", torch.ones(qshape))
        self.register_buffer("weight_zero_point", torch.zeros(qshape, dtype=torch.int32))
        self.register_buffer("bias", torch.zeros(n) if has_bias else None)
        self._c_args: tuple | None = None  # set by _refresh_cache

    def _refresh_cache(self) -> None:
        """The arguments of the C dequantization (``lowbit.native``), checked once: codes,
        packed, signed, N, Kp, K, group (0: one scale), scale, zero-point."""
        s = self.eff_spec
        group = wo_group(s.group_size if s.granularity == "per_group" else None,
                         self.weight_scale, self.kp)
        ok = (self.backend == "auto" and self.qweight.is_cpu and self.qweight.is_contiguous()
              and self.qweight.dtype in (torch.int8, torch.uint8)
              and c_layout((self.weight_scale, torch.float32),
                            (self.weight_zero_point, torch.int32)))
        self._c_args = (self.qweight, int(self.packed), int(self.weight_spec.signed), self.n,
                        self.kp, self.k, group, self.weight_scale,
                        self.weight_zero_point) if ok else None

    def _fill(self, weight2d: torch.Tensor, bias: torch.Tensor | None, kind: str,
              weight_qparams: Any) -> None:
        w = F.pad(weight2d.detach().float(), (0, self.kp - self.k))  # (N, Kp)
        q, s, z = quantize_weight(w, self.eff_spec, self.name, kind, weight_qparams)
        self.qweight.copy_(pack_int4(q) if self.packed else q)
        self.weight_scale.copy_(s.reshape(self.weight_scale.shape))
        self.weight_zero_point.copy_(z.reshape(self.weight_zero_point.shape))
        if self.bias is not None and bias is not None:
            self.bias.copy_(bias.detach().float())
        self._refresh_cache()

    def codes(self) -> torch.Tensor:
        """Unpacked integer codes ``[N, Kp]`` (int8, or uint8 for unsigned specs)."""
        return unpack_int4(self.qweight, self.weight_spec.signed) if self.packed else self.qweight

    def _dequant_padded(self) -> torch.Tensor:  # (N, Kp) float32
        return dequantize(self.codes(), self.weight_scale, self.weight_zero_point, self.eff_spec)

    def _weight_shape(self) -> tuple[int, ...]:
        return (self.n, self.k)

    def _dequantize_reference(self) -> torch.Tensor:
        return self._dequant_padded()[:, : self.k]

    def dequantize_weight(self) -> torch.Tensor:
        """The float32 weight ``(q - zp) * scale`` without padding, ``[N, K]``.

        One pass of the fused C kernel (same bits) unless the backend is ``"reference"`` or the
        kernels are unavailable (see :mod:`lowbit.native`).
        """
        codes = self._buffers.get("weight")
        if codes is not None and not codes.is_meta:  # (a buffer changed since the last call)
            self._fresh_caches()
        if self._c_args is not None and (lib := native_lib_for(self.qweight)) is not None:
            return run_dequantize_weight_native(lib, self._c_args)
        return self._dequant_padded()[:, : self.k]

    def _w_meta(self) -> dict[str, Any]:
        return {"weight_spec": self.weight_spec.to_dict(),
                "effective_weight_spec": self.eff_spec.to_dict(), "activation_spec": None,
                "mode": "weight_only", "bias": self.bias is not None,
                "padded_in_features": self.kp, "padding": self.kp - self.k}


class _WeightOnlyLinear(_WeightOnly):
    """Linear with float activations; subclasses pick the packed kernel."""

    _op = "int4_weight_only"

    def __init__(self, in_features: int, out_features: int, has_bias: bool = True, *,
                 weight_spec: QuantSpec | None = None, **kw: Any) -> None:
        super().__init__(**kw)
        self.in_features, self.out_features = in_features, out_features
        self._init_w(out_features, in_features, has_bias, weight_spec or self._default_spec())
        self.register_buffer("_packed", None, persistent=False)
        self.register_buffer("_scales", None, persistent=False)
        self._small_args: tuple | None = None  # set by _refresh_cache
        self._bias_c: torch.Tensor | None = None  # (the bias, contiguous; by _refresh_cache)
        self._u4: tuple | None = None  # Int4Linear: lowbit's INT4 kernel layout (u4_pack)
        self._small_max_m = 0

    @staticmethod
    def _default_spec() -> QuantSpec:
        return QuantSpec.int4_weight()

    @classmethod
    def from_float(cls, module: nn.Module, config: QuantizationConfig, *,
                   weight_qparams: Any = None, fused_relu: bool = False, name: str = "",
                   meta_extra: Mapping[str, Any] | None = None, backend: str = "auto",
                   input_qparams: Any = None) -> _WeightOnlyLinear:
        """Quantize the weights of a float ``nn.Linear`` (``input_qparams`` is ignored).

        Raises:
            ValueError: NaN/Inf weights (names the layer and the fix).
        """
        q = cls(module.in_features, module.out_features, module.bias is not None,
                weight_spec=config.weights, backend=backend, name=name, fused_relu=fused_relu,
                orig_dtype=str(module.weight.dtype)[6:], meta_extra=meta_extra)
        q._fill(module.weight, module.bias, type(module).__name__, weight_qparams)
        return q

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> _WeightOnlyLinear:
        """An empty module of the shapes in ``meta`` (fill it with ``load_state_dict``)."""
        return cls(meta["in_features"], meta["out_features"], meta["bias"],
                   weight_spec=QuantSpec.from_dict(meta["weight_spec"]), **cls._common(meta))

    def _shape_meta(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features,
                **self._w_meta()}

    def _select_packed(self, m: int, int8_activations: bool | None = None) -> str:
        """The kernel for ``m`` rows; ``int8_activations`` (INT4: ``Int4Linear``'s setting when
        None) chooses between lowbit's INT4 kernels."""
        raise NotImplementedError

    def _select(self, m: int) -> str:
        """The kernel for ``m`` float32 activation rows (bf16 inputs skip ``"native_fp32"``)."""
        if m <= self._small_max_m and load_native() is not None:
            return "native_fp32"
        return self._select_packed(m)

    def _refresh_cache(self) -> None:
        """Also the one-call C path for small shapes (:func:`weight_only_linear_native`)."""
        super()._refresh_cache()
        self._small_max_m, self._small_args = 0, None
        bias = self.bias  # (a strided float32 one: its contiguous copy, for the same kernels)
        self._bias_c = (bias.contiguous() if bias is not None and bias.dtype == torch.float32
                        else bias)
        fast = self._c_args is not None and c_layout((self._bias_c, torch.float32))
        self._reset_plans(fast)
        if not fast:
            return
        w, packed, signed, n, kp, _k, group, scale, zp = self._c_args
        if wo_small_fits(self.packed, group):
            self._small_max_m = wo_small_max_rows(n, kp)
            self._small_args = (w, packed, signed, n, kp, group, scale, zp, self._bias_c)

    _plans_fuse_smoothing = True  # (AWQ: the INT4 x INT8 kernel's plans take the factor)

    def _make_plan(self, x: torch.Tensor, smooth: torch.Tensor | None = None) -> Plan | None:
        lib = native_lib_for(x)
        if lib is None or x.dim() == 0 or x.shape[-1] != self.in_features:
            return None  # (the body raises for a wrong shape)
        m = x.numel() // self.in_features
        if 0 < m <= self._small_max_m:
            if smooth is not None:
                return None
            return wo_linear_plan(lib, tuple(x.shape), self._small_args, None, self._bias_c,
                                  self.fused_relu)
        kernel = self._select_packed(m)
        lib4 = load_gemm(kernel.partition("_")[2]) if kernel.startswith("u4q8_") else None
        if lib4 is None:
            return None
        return wo_linear_plan(lib, tuple(x.shape), None,
                              (lib4, self._u4_panels()),  # type: ignore[attr-defined]
                              self._bias_c, self.fused_relu, smooth)

    _max_packed_m = INT4_PACKED_MAX_M

    def kernel_info(self) -> dict[str, str]:
        """Kernel per activation row count, first match: e.g. ``{"M<=25": "native_fp32",
        "M<=512": "int4pack_bf16", "M>512": "dequant_bf16"}`` (``"native_fp32"``: small
        float32 inputs, with the C kernels; ``"u4q8_avx2"`` / ``"u4_avx2"``: lowbit's INT4
        kernels with int8 / float32 activations)."""
        bounds = sorted({U4_NATIVE_MAX_M, INT4_PACKED_MAX_M_NO_BF16, self._max_packed_m,
                         U4Q8_MAX_M_BF16}
                        | ({self._small_max_m} if self._select(1) == "native_fp32" else set()))
        runs: list[list] = []  # [upper bound or None, kernel], neighbours with one kernel merged
        for b in [*bounds, None]:
            kernel = self._select(bounds[-1] + 1 if b is None else b)
            if runs and runs[-1][1] == kernel:
                runs[-1][0] = b
            else:
                runs.append([b, kernel])
        info = {f"M<={b}": k for b, k in runs if b is not None}
        last = max((b for b, _ in runs if b is not None), default=0)
        return {**info, f"M>{last}": runs[-1][1]} if runs[-1][0] is None else info

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Float (..., K) -> float (..., N) in x's dtype."""
        if torch.is_grad_enabled() and getattr(x, "requires_grad", False):
            return frozen_forward(self, x)  # an adapter or float layer before it trains
        x = self._input(x, self.in_features)
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        if (0 < x2.shape[0] <= self._small_max_m and x2.dtype == torch.float32
                and (lib := native_lib_for(x2)) is not None):  # one C call
            if x2.stride(-1) != 1 and x2.shape[0] > 1:  # (batch 1: the C call copies the row)
                x2 = x2.contiguous()  # a few rows: the same exact fp32 path for every layout
            y = run_weight_only_linear_native(lib, x2, self._small_args,  # type: ignore[arg-type]
                                              self.fused_relu)
            return self._gelu(y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.n))
        kernel = self._select_packed(x2.shape[0])
        lowbit_int4 = kernel.startswith(("u4_", "u4q8_"))  # lowbit's INT4 kernels: "u4*_<isa>"
        lib = (load_gemm(kernel.partition("_")[2]) if lowbit_int4 and native_eager(x2)
               else None)
        bias = (self.bias if self.bias is None  # (float: a bf16-cast layer's)
                else self.bias.float().contiguous())
        if lib is not None and kernel.startswith("u4q8_"):  # int8 activations (fused ReLU)
            y = run_u4p_linear(lib, x2.float(), self._u4_panels(),  # type: ignore[attr-defined]
                               bias, self.fused_relu)  # (M, N)
        elif lib is not None:  # float32 activations (fused ReLU)
            y = run_u4_linear(lib, x2.float(), self._u4_rows(), bias,  # type: ignore[attr-defined]
                              self.fused_relu)  # (M, N)
        else:
            if lowbit_int4:  # no C library for it: what runs past its row limit
                kernel = self._select_packed(U4_NATIVE_MAX_M + 1, int8_activations=False)
            if kernel in ("dequant_fp32", "dequant_bf16"):  # the weight dequantized in one C
                # pass where available (no K padding), then a float32 / bf16 GEMM
                y = weight_only_linear(x2, kernel, self.dequantize_weight, self.bias)
            else:
                if self.kp > self.k:
                    x2 = F.pad(x2, (0, self.kp - self.k))  # (M, Kp)
                if kernel == "int4pack_bf16":
                    self._int4pack()
                y = weight_only_linear(x2, kernel, self._dequant_padded, self.bias,
                                       packed=self._packed, scales=self._scales,
                                       group_size=self._group(), out_features=self.n)
            y = self._act(y, self.fused_relu)  # (M, N) float32
        return self._gelu(y.reshape(*x.shape[:-1], self.out_features).to(x.dtype))

    def _group(self) -> int:
        spec = self.eff_spec
        return spec.group_size if spec.granularity == "per_group" else self.kp  # type: ignore

    def extra_repr(self) -> str:
        s = self.weight_spec
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={s.bits}, {s.granularity}, group_size={s.group_size}, "
                f"padded_in_features={self.kp}, backend={self.backend}")


class Int4Linear(_WeightOnlyLinear):
    """Weight-only 2..4-bit linear: codes packed two per byte, group-wise scales/zero-points.

    M <= 512 runs ``aten._weight_int4pack_mm_for_cpu`` on bf16 activations (group in {32, 64,
    128, 256}); otherwise dequantize + bf16 GEMM; ``backend="reference"``: dequantize + fp32
    GEMM. The op needs N % 16 == 0: other N (e.g. a 10-class head) get zero rows in the packed
    cache (non-persistent, so state_dict and saved files are unchanged) and the output is sliced.

    Without VNNI (the ``avx2`` / ``portable`` ISA paths) lowbit's INT4 kernels run instead.
    With ``int8_activations`` (the default; a class attribute that can be set per module) the
    activations are quantized to int8 per row and weight group and each group's dot product is
    taken in integers, as llama.cpp and ONNX Runtime's ``MatMulNBits`` (``accuracy_level=4``)
    do (``"u4q8_avx2"``, every M: 10x FP32 at batch 1 on a 4096^2 layer, 1.6x at 4096 rows),
    off from the dequantize + GEMM reference by about 5e-3 relative (``docs/backends.md``);
    ``False`` keeps float32 activations (``"u4_avx2"`` up to ``U4_NATIVE_MAX_M`` rows).

    Example:
        >>> fc = nn.Linear(100, 32)
        >>> q = Int4Linear.from_float(fc, QuantizationConfig.int4_weight_only(group_size=32))
        >>> q.qweight.dtype, tuple(q.qweight.shape), q.meta()["padding"], q.weight.dtype
        (torch.uint8, (32, 64), 28, torch.float32)
        >>> q(torch.randn(3, 100)).shape
        torch.Size([3, 32])
    """

    #: Whether lowbit's INT4 kernels (without VNNI) quantize the activations to int8 per row and
    #: weight group (faster, every M) or keep them in float32 (closer to the reference). Set on
    #: one module, it is saved with it (``meta()``).
    int8_activations: bool = True

    @property
    def _plan_tag(self) -> bool:
        return self.int8_activations  # (set class-wide, it changes the kernel: new plans)

    def _shape_meta(self) -> dict[str, Any]:
        meta = super()._shape_meta()
        if "int8_activations" in self.__dict__:  # set on this module: saved with it
            meta["int8_activations"] = bool(self.__dict__["int8_activations"])
        return meta

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> Int4Linear:
        """An empty module of the shapes in ``meta`` (fill it with ``load_state_dict``)."""
        layer = super().from_meta(meta)
        if "int8_activations" in meta:
            layer.int8_activations = bool(meta["int8_activations"])
        return layer  # type: ignore[return-value]

    def _n_packed(self) -> int:
        """Rows of the packed cache: N rounded up to the packed op's multiple of 16."""
        return -(-self.n // 16) * 16

    def _select_packed(self, m: int, int8_activations: bool | None = None) -> str:
        g = self._group() if self.eff_spec.granularity != "per_tensor" else None
        a8 = self.int8_activations if int8_activations is None else int8_activations
        return select_kernel("int4_weight_only", m, backend=self.backend, n=self._n_packed(),
                             device=self.qweight.device.type, k=self.kp, group_size=g,
                             int8_activations=a8)

    def _u4_panels(self) -> tuple:
        """The weight in the INT4 x INT8 kernel's panel layout (built on first use, cached)."""
        if self._u4p is None:
            g = self._group()
            self._u4p = (*u4p_pack(self.codes(), self.weight_spec.signed, self.weight_scale,
                                   self.weight_zero_point, g), self.n, self.kp, g)
        return self._u4p

    def _u4_rows(self) -> tuple:
        """The weight in the float-activation INT4 kernel's layout (built on first use)."""
        if self._u4 is None:
            g = self._group()
            self._u4 = (*u4_pack(self.codes(), self.weight_spec.signed, self.weight_scale,
                                 self.weight_zero_point, g), self.kp, g)
        return self._u4

    def _refresh_cache(self) -> None:
        super()._refresh_cache()
        self._packed = self._scales = self._u4 = self._u4p = None

    def _int4pack(self) -> None:
        """Build the packed cache of ``aten._weight_int4pack_mm_for_cpu`` on first use (a layer
        whose calls never pick that op keeps no second copy of its weight)."""
        if self._packed is None:
            pad = self._n_packed() - self.n  # zero rows: their outputs are sliced off
            codes = F.pad(self.codes(), (0, 0, 0, pad))  # (Np, Kp)
            scale = F.pad(self.weight_scale.reshape(self.n, -1), (0, 0, 0, pad))  # (Np, G)
            zp = F.pad(self.weight_zero_point.reshape(self.n, -1), (0, 0, 0, pad))
            shift = 8 if self.weight_spec.signed else 0
            packed, sz = int4_pack_for_cpu(codes, scale, zp, shift)
            self._scales = sz.to(torch.bfloat16)  # (Kp/g, Np, 2)
            self._packed = packed  # last: another thread's call checks it (then reads both)


class Int8WeightOnlyLinear(_WeightOnlyLinear):
    """Weight-only INT8 (5..8-bit) linear with float activations.

    Symmetric per-channel weights at small M run ``aten._weight_int8pack_mm`` on bf16
    activations; otherwise dequantize + bf16 GEMM (``backend="reference"``: fp32). The op needs
    K % 16 == 0: other K get zero columns in the packed cache (non-persistent) and the input is
    padded to match.

    Example:
        >>> q = Int8WeightOnlyLinear.from_float(nn.Linear(16, 8), QuantizationConfig(
        ...     weights=QuantSpec.int8_weight(), activations=None, mode="weight_only"))
        >>> q.qweight.dtype, q(torch.randn(2, 16)).shape
        (torch.int8, torch.Size([2, 8]))
    """

    _max_packed_m = WEIGHT_ONLY_PACKED_MAX_M

    @staticmethod
    def _default_spec() -> QuantSpec:
        return QuantSpec.int8_weight()

    def _select_packed(self, m: int, int8_activations: bool | None = None) -> str:
        s = self.weight_spec
        ok = (s.granularity == "per_channel" and s.symmetric and s.signed and self.kp == self.k
              and self.__dict__.get("_zp_zero", True))  # (the packed op has no zero-points)
        k16 = -(-self.kp // 16) * 16  # the packed cache's K (zero columns added)
        return select_kernel("int8_weight_only", m, backend=self.backend, k=k16, packable=ok,
                             device=self.qweight.device.type)

    def _refresh_cache(self) -> None:
        super()._refresh_cache()
        self._packed = self._scales = None
        self.__dict__["_zp_zero"] = not bool(self.weight_zero_point.any())
        if self._select_packed(1) == "int8pack_bf16":
            self._packed = F.pad(self.qweight, (0, -self.kp % 16))  # (N, K16), zero columns
            self._scales = self.weight_scale.to(torch.bfloat16)


class QuantizedEmbedding(_WeightOnly):
    """Weight-only INT8 / INT4 embedding, per row (``per_channel`` axis 0) or per group.

    Looks up the codes of the requested rows and dequantizes only those.

    Example:
        >>> emb = nn.Embedding(10, 6)
        >>> cfg = QuantizationConfig.int4_weight_only(group_size=4)
        >>> q = QuantizedEmbedding.from_float(emb, cfg)
        >>> idx = torch.tensor([[1, 2]])
        >>> q(idx).shape, torch.allclose(q(idx), q.dequantize_weight()[idx])
        (torch.Size([1, 2, 6]), True)
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *,
                 weight_spec: QuantSpec | None = None, padding_idx: int | None = None,
                 **kw: Any) -> None:
        super().__init__(**kw)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx = padding_idx
        self._init_w(num_embeddings, embedding_dim, False, weight_spec or QuantSpec.int8_weight())

    @classmethod
    def from_float(cls, module: nn.Module, config: QuantizationConfig, *,
                   weight_qparams: Any = None, fused_relu: bool = False, name: str = "",
                   meta_extra: Mapping[str, Any] | None = None, backend: str = "auto",
                   input_qparams: Any = None) -> QuantizedEmbedding:
        """Quantize a float ``nn.Embedding`` (``fused_relu`` / ``input_qparams`` are ignored)."""
        q = cls(module.num_embeddings, module.embedding_dim, weight_spec=config.weights,
                padding_idx=module.padding_idx, backend=backend, name=name,
                orig_dtype=str(module.weight.dtype)[6:], meta_extra=meta_extra)
        q._fill(module.weight, None, type(module).__name__, weight_qparams)
        return q

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> QuantizedEmbedding:
        """An empty module of the shapes in ``meta`` (fill it with ``load_state_dict``)."""
        return cls(meta["num_embeddings"], meta["embedding_dim"],
                   weight_spec=QuantSpec.from_dict(meta["weight_spec"]),
                   padding_idx=meta.get("padding_idx"), **cls._common(meta))

    def _shape_meta(self) -> dict[str, Any]:
        return {"num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim,
                "padding_idx": self.padding_idx, **self._w_meta()}

    def kernel_info(self) -> str:
        """Row gather + dequantize of the gathered rows (same for both backends)."""
        return "gather_dequant"

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Indices (...) -> float rows (..., D) in the original dtype."""
        dtype = getattr(torch, self.orig_dtype, torch.float32)
        if (isinstance(idx, torch.Tensor) and idx.numel() == 0
                and idx.dtype in (torch.int32, torch.int64)):  # (others: F.embedding refuses)
            return torch.empty(*idx.shape, self.k, dtype=dtype, device=self.qweight.device)
        rows = F.embedding(idx, self.qweight)  # (..., Kp) codes or (..., Kp/2) packed
        if self.packed:
            rows = unpack_int4(rows, self.weight_spec.signed)
        rows = rows.float()
        spec = self.eff_spec
        s = self.weight_scale.reshape(self.n, -1)[idx].unsqueeze(-1)  # (..., G, 1)
        z = self.weight_zero_point.reshape(self.n, -1)[idx].unsqueeze(-1).float()
        if spec.granularity == "per_group":
            rows = rows.reshape(*rows.shape[:-1], -1, spec.group_size)  # (..., G, g)
        else:
            rows = rows.unsqueeze(-2)  # (..., 1, Kp)
        out = ((rows - z) * s).flatten(-2)[..., : self.k]  # (..., D)
        return out.to(dtype)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, bits={self.weight_spec.bits}, "
                f"{self.weight_spec.granularity}")


class WeightOnlyConv2d(ConvAttributes, _WeightOnly):
    """Conv2d with low-bit weights (2..8 bits, packed when <= 4) dequantized on the fly.

    The weight is quantized as ``[O, C/groups*kh*kw]`` (per channel or per group along that
    flattened dimension) and dequantized into a float conv each call.

    Example:
        >>> conv = nn.Conv2d(3, 8, 3, padding=1)
        >>> q = WeightOnlyConv2d.from_float(conv, QuantizationConfig.int4_weight_only(9))
        >>> q(torch.randn(1, 3, 6, 6)).shape
        torch.Size([1, 8, 6, 6])
    """

    _dims = 2

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, ...],
                 has_bias: bool = True, *, geometry: Mapping[str, Any] | None = None,
                 weight_spec: QuantSpec | None = None, **kw: Any) -> None:
        super().__init__(**kw)
        d = self._dims
        self.geometry = dict(geometry or default_conv_geometry(d))
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = tuple(kernel_size)
        check_conv_geometry(self.geometry, list(self.kernel_size), in_channels, out_channels, d,
                            self._label())  # also for from_meta and direct construction
        self.wshape = (out_channels, in_channels // self.geometry["groups"], *self.kernel_size)
        k = self.wshape[1] * int(torch.tensor(self.kernel_size).prod())
        self._init_w(out_channels, k, has_bias, weight_spec or QuantSpec.int4_weight(32))

    @classmethod
    def from_float(cls, module: nn.Module, config: QuantizationConfig, *,
                   weight_qparams: Any = None, fused_relu: bool = False, name: str = "",
                   meta_extra: Mapping[str, Any] | None = None, backend: str = "auto",
                   input_qparams: Any = None) -> WeightOnlyConv2d:
        """Quantize the weights of a float conv (``input_qparams`` is ignored)."""
        q = cls(module.in_channels, module.out_channels, module.kernel_size,
                module.bias is not None, geometry=conv_geometry(module, name),
                weight_spec=config.weights, backend=backend, name=name, fused_relu=fused_relu,
                orig_dtype=str(module.weight.dtype)[6:], meta_extra=meta_extra)
        q._fill(module.weight.reshape(module.out_channels, -1), module.bias,
                type(module).__name__, weight_qparams)
        return q

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> WeightOnlyConv2d:
        """An empty module of the shapes in ``meta`` (fill it with ``load_state_dict``)."""
        return cls(meta["in_channels"], meta["out_channels"], meta["kernel_size"], meta["bias"],
                   geometry=meta["geometry"], weight_spec=QuantSpec.from_dict(meta["weight_spec"]),
                   **cls._common(meta))

    def _shape_meta(self) -> dict[str, Any]:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "geometry": dict(self.geometry),
                **self._w_meta()}

    def kernel_info(self) -> str:
        """Dequantize the weight, then the float convolution."""
        return "dequant_fp32"

    def _refresh_cache(self) -> None:
        super()._refresh_cache()
        g = self.geometry
        self._reset_plans(self._c_args is not None and self._dims == 2
                          and g["pre_pad"] is None and g["groups"] == 1
                          and c_layout((self.bias, torch.float32)))

    def _make_plan(self, x: torch.Tensor) -> Plan | None:
        lib = native_lib_for(x)
        if lib is None or x.dim() != 4 or x.shape[1] != self.in_channels:
            return None  # (the body handles unbatched inputs and raises for wrong shapes)
        check_conv_input(self._label(), x, self._dims, self.kernel_size, self.geometry)
        g = self.geometry
        return wo_conv_plan(lib, tuple(x.shape), self._c_args,  # type: ignore[arg-type]
                            self.out_channels, tuple(self.kernel_size), self.bias,  # type: ignore[arg-type]
                            tuple(g["stride"]), tuple(g["padding"]), tuple(g["dilation"]),
                            self.fused_relu, g.get("fused_maxpool") or 0)

    def dequantize_weight(self) -> torch.Tensor:
        """The float32 weight in the conv's shape ``[O, C/groups, *kernel_size]``."""
        return super().dequantize_weight().reshape(self.wshape)

    def _weight_shape(self) -> tuple[int, ...]:
        return tuple(self.wshape)

    def _dequantize_reference(self) -> torch.Tensor:
        return super()._dequantize_reference().reshape(self.wshape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Float conv with the dequantized weight; output in x's dtype."""
        if torch.is_grad_enabled() and getattr(x, "requires_grad", False):
            return frozen_forward(self, x)  # an adapter or float layer before it trains
        if isinstance(x, torch.Tensor) and x.dim() == self._dims + 1:  # unbatched, as the
            return self.forward(x.unsqueeze(0)).squeeze(0)  # float conv takes it
        x = self._input(x, self.in_channels, dim=1)
        checked = (x.shape, self.geometry.get("fused_maxpool"))  # once per input shape
        if checked != self.__dict__.get("_checked_input"):
            check_conv_input(self._label(), x, self._dims, self.kernel_size, self.geometry)
            self.__dict__["_checked_input"] = checked
        g = self.geometry
        if g["pre_pad"] is not None:
            x = F.pad(x, g["pre_pad"], mode=g["pad_mode"])
        conv = F.conv1d if self._dims == 1 else F.conv2d
        xd = lib = None
        if (self._dims == 2 and self._c_args is not None
                and c_layout((self.bias, torch.float32))):
            xd = direct_conv_input(x, self.n * self.k, g["stride"], g["groups"])
            lib = None if xd is None else native_lib_for(xd)
        if lib is not None:  # small: dequantize + direct conv + bias + ReLU in one C call
            y = run_wo_conv2d_native(lib, xd, self._c_args, self.out_channels, self.kernel_size,
                                     self.bias, g["stride"], g["padding"], g["dilation"],
                                     self.fused_relu)
        else:
            w = self.dequantize_weight()  # [O, C/groups, *kernel_size]
            if x.dtype != torch.float32:
                w = w.to(x.dtype)
            b = (self.bias if self.bias is None or self.bias.dtype == x.dtype
                 else self.bias.to(x.dtype))
            y = conv(x, w, b, g["stride"], g["padding"], g["dilation"], g["groups"])
            y = y.relu_() if self.fused_relu else y
        pool = g.get("fused_maxpool")  # a following MaxPool2d fused by lowbit.ptq
        if pool:
            lib = None if self.backend != "auto" or y.dtype != torch.float32 else (
                native_lib_for(y) if y.is_contiguous() else None)
            y = F.max_pool2d(y, pool) if lib is None else maxpool2d_native(lib, y, pool)
        return y

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"bits={self.weight_spec.bits}, {self.weight_spec.granularity}")


class WeightOnlyConv1d(WeightOnlyConv2d):
    """Conv1d with low-bit weights dequantized on the fly (see :class:`WeightOnlyConv2d`).

    Example:
        >>> q = WeightOnlyConv1d.from_float(nn.Conv1d(4, 6, 3),
        ...                                 QuantizationConfig.int4_weight_only(group_size=12))
        >>> q(torch.randn(2, 4, 10)).shape
        torch.Size([2, 6, 8])
    """

    _dims = 1
