/* lowbit fused CPU kernels: activation quantization and the INT8 GEMM/conv epilogue.
 *
 * Built on first use by lowbit/native.py (cc -O3 -march=native -ffp-contract=off) and called
 * through ctypes on raw buffers. Each function computes, element by element, the same IEEE
 * float32 operations in the same order as lowbit's pure-PyTorch path (no implicit FMA
 * contraction; torch.addcmul's rounding, one fused multiply-add or two roundings, as probed;
 * round half to even), so the two give the same bits; tests check that. Activations may be float32 or bfloat16 (read as
 * the float32 it widens to exactly; written with torch's round-to-nearest-even narrowing).
 * The work is split over rows with OpenMP (the runtime PyTorch already loaded) when it is big.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "lowbit_float.h"
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

/* Whether torch.addcmul(bias, v, s) rounds once (a fused multiply-add, as its AVX2 / AVX-512
 * kernels compile) or twice (its portable kernel); lowbit/native.py probes torch and sets it. */
static int addcmul_fma = 1;

void lb_set_addcmul_fma(int on) { addcmul_fma = on; }

/* bias + v * s rounded as torch.addcmul rounds it (fused: the addcmul_fma setting, read once
 * per call into a local so that loops stay vectorizable). The epilogue kernels below write the
 * bias/ReLU tail out each time: one shared helper taking a (possibly NULL) bias pointer per
 * element made the 4096 x 1536 linear epilogue 2x slower (the loop lost its bias unswitch). */
static inline float add_mul(float b, float v, float s, int fused) {
    return fused ? fmaf(v, s, b) : b + v * s;
}

static inline float clampf(float v, float lo, float hi) {
    /* torch.clamp: max(v, lo) then min(., hi) */
    v = v < lo ? lo : v;
    return v > hi ? hi : v;
}

/* Element j of a row of float32 (bf16 == 0) or bfloat16 (bf16 != 0) values. */
#define LOAD(x, bf16, j) ((bf16) ? bf16_to_f32(((const uint16_t *)(x))[j]) : ((const float *)(x))[j])

/* Row i of a [m, k] matrix with row stride ldx (elements). */
static inline const void *row(const void *x, int bf16, int64_t i, int64_t ldx) {
    return bf16 ? (const void *)((const uint16_t *)x + i * ldx)
                : (const void *)((const float *)x + i * ldx);
}

/* max|x| of a [m, k] matrix with row stride ldx. */
float lb_absmax(const void *x, int bf16, int64_t m, int64_t k, int64_t ldx, int nthreads) {
    uint32_t best = 0; /* bits of the non-negative maxima: a NaN row wins, as in torch.amax */
#pragma omp parallel for num_threads(nthreads) if (nthreads > 1) reduction(max : best)
    for (int64_t i = 0; i < m; ++i) {
        const float a = row_absmax(row(x, bf16, i, ldx), bf16, k);
        uint32_t bits;
        memcpy(&bits, &a, sizeof bits);
        best = bits > best ? bits : best;
    }
    float r;
    memcpy(&r, &best, sizeof r);
    return r;
}

/* Dynamic affine per-tensor qparams of float32 x[n] (ONNX DynamicQuantizeLinear's, and
 * lowbit.ops.qparams_from_range's in the same float32 steps): the range widened to hold 0,
 * scale = max((hi - lo) / (qmax - qmin), FLT_EPSILON), zp = clamp(qmin - round(lo / scale)).
 * Writes scale[0], the signed-equivalent zero-point zp_s[0] = zp + off and, for the epilogue,
 * comp[j] = zp_s * colsum[j] (j < ncols), on nthreads OpenMP threads. Returns 1 (writing
 * nothing) when x holds NaN / Inf. */
int lb_affine_qparams(const float *x, int64_t n, int32_t qmin, int32_t qmax, int32_t off,
                      const int32_t *colsum, int64_t ncols, float *scale, int32_t *zp_s,
                      int32_t *comp, int nthreads) {
    /* On order-preserving integer keys of the float bits (negative floats: the magnitude bits
     * flipped), so that the loop vectorizes as integer min / max; NaN / Inf: |bits| >= Inf's */
    int32_t kmin = 0, kmax = 0; /* the key of +0.0: 0 is always in the range */
    uint32_t amax = 0;
#pragma omp parallel for num_threads(nthreads) if (nthreads > 1) \
    reduction(min : kmin) reduction(max : kmax, amax)
    for (int64_t i = 0; i < n; ++i) {
        uint32_t bits;
        memcpy(&bits, x + i, sizeof bits);
        const int32_t sb = (int32_t)bits;
        const int32_t key = sb ^ ((sb >> 31) & 0x7FFFFFFF);
        const uint32_t a = bits & 0x7FFFFFFFu;
        kmin = key < kmin ? key : kmin;
        kmax = key > kmax ? key : kmax;
        amax = a > amax ? a : amax;
    }
    if (amax >= 0x7F800000u) /* NaN or Inf */
        return 1;
    const int32_t lb = kmin ^ ((kmin >> 31) & 0x7FFFFFFF), hb = kmax ^ ((kmax >> 31) & 0x7FFFFFFF);
    float l, h;
    memcpy(&l, &lb, sizeof l);
    memcpy(&h, &hb, sizeof h);
    float s = (h - l) / (float)(qmax - qmin);
    s = s < FLT_EPSILON ? FLT_EPSILON : s;
    float z = (float)qmin - nearbyintf(l / s);
    z = z < (float)qmin ? (float)qmin : (z > (float)qmax ? (float)qmax : z);
    const int32_t zs = (int32_t)z + off;
    scale[0] = s;
    zp_s[0] = zs;
    for (int64_t j = 0; j < ncols; ++j) comp[j] = zs * colsum[j];
    return 0;
}

/* scale = max(absmax / qmax, FLT_EPSILON), as lowbit.kernels.quantize_activation. */
static inline float dynamic_scale(float absmax, float qmax) {
    float s = absmax / qmax;
    return s < FLT_EPSILON ? FLT_EPSILON : s;
}

/* Codes of one row: clamp(round(x * inv) + zp, lo, hi); x * smooth in place of x when smooth
 * (float32 rows only). */
static inline void quantize_row_s8(const void *x, int bf16, int64_t k, float inv, float zp,
                                   float lo, float hi, const float *smooth, int8_t *q) {
    if (smooth) {
        const float *xf = (const float *)x;
        for (int64_t j = 0; j < k; ++j)
            q[j] = (int8_t)clampf(nearbyintf((xf[j] * smooth[j]) * inv) + zp, lo, hi);
    } else if (bf16) {
        const uint16_t *xb = (const uint16_t *)x;
        for (int64_t j = 0; j < k; ++j)
            q[j] = (int8_t)clampf(nearbyintf(bf16_to_f32(xb[j]) * inv) + zp, lo, hi);
    } else {
        const float *xf = (const float *)x;
        for (int64_t j = 0; j < k; ++j)
            q[j] = (int8_t)clampf(nearbyintf(xf[j] * inv) + zp, lo, hi);
    }
}

/* int8 codes q[i, j] = clamp(round(x[i, j] * (1 / s)) + zp, qmin, qmax) of x [m, k] (float32,
 * or bfloat16 when bf16), row stride ldx; q is contiguous [m, k].
 *
 * per_row: scale / zp hold m values (else one). dynamic: scale is written (per row or per
 * tensor) from max|x| as dynamic_scale(); zp must then be NULL. zp NULL means 0.
 * smooth: NULL, or k float32 per-column factors (AWQ / SmoothQuant input smoothing, float32
 * x and dynamic per-row scales only; anything else is refused, nothing written): the rows
 * quantized are x * smooth, the products torch's x * smooth gives. Returns 0, or -2 refused. */
int lb_quantize_s8(const void *x, int bf16, int64_t m, int64_t k, int64_t ldx, float *scale,
                   int per_row, int dynamic, const int32_t *zp, int32_t qmin, int32_t qmax,
                   int8_t *q, int nthreads, const float *smooth) {
    const float lo = (float)qmin, hi = (float)qmax;
    if (smooth && (bf16 || !dynamic || !per_row))
        return -2;
    if (dynamic && !per_row)
        scale[0] = dynamic_scale(lb_absmax(x, bf16, m, k, ldx, nthreads), hi);
#pragma omp parallel for num_threads(nthreads) if (nthreads > 1)
    for (int64_t i = 0; i < m; ++i) {
        const void *xr = row(x, bf16, i, ldx);
        const int64_t r = per_row ? i : 0;
        if (dynamic && per_row)
            scale[i] = dynamic_scale(smooth ? row_absmax_smooth((const float *)xr, smooth, k)
                                            : row_absmax(xr, bf16, k), hi);
        const float inv = 1.0f / scale[r];
        const float z = zp ? (float)zp[r] : 0.0f;
        quantize_row_s8(xr, bf16, k, inv, z, lo, hi, smooth, q + i * k);
    }
    return 0;
}

/* Centered codes as float32, c = clamp(round(x * (1 / s)), qmin - zp, qmax - zp), of a
 * contiguous float32 tensor of n elements with one scale / zero-point (the input of the fp32
 * conv over codes). dynamic: scale[0] is written from max|x| first. */
void lb_quantize_centered_f32(const float *x, int64_t n, float *scale, int dynamic, int32_t zp,
                              int32_t qmin, int32_t qmax, float *out, int nthreads) {
    if (dynamic)
        scale[0] = dynamic_scale(lb_absmax(x, 0, 1, n, n, nthreads), (float)qmax);
    const float inv = 1.0f / scale[0];
    const float lo = (float)(qmin - zp), hi = (float)(qmax - zp);
    const int64_t block = 4096;
    const int64_t nblocks = (n + block - 1) / block;
#pragma omp parallel for num_threads(nthreads) if (nthreads > 1)
    for (int64_t b = 0; b < nblocks; ++b) {
        const int64_t end = (b + 1) * block < n ? (b + 1) * block : n;
        for (int64_t j = b * block; j < end; ++j)
            out[j] = clampf(nearbyintf(x[j] * inv), lo, hi);
    }
}

/* One [len] run of the epilogue: v = acc * w, then * s or add_mul(b, v, s), ReLU; w / b
 * advance by w_step / b_step (1: per channel along the run; 0: one channel). Written as
 * float32 in place, or as bfloat16 to out_bf16. */
static inline void epilogue_run(void *acc, int is_int32, int64_t len, const float *w,
                                int64_t w_step, const float *b, int64_t b_step, float s,
                                int relu, uint16_t *out_bf16, int fused) {
    float *y = (float *)acc;
    const int32_t *a = (const int32_t *)acc;
    for (int64_t i = 0; i < len; ++i) {
        float v = (is_int32 ? (float)a[i] : y[i]) * w[i * w_step];
        v = b ? add_mul(b[i * b_step], v, s, fused) : v * s;
        v = relu && v < 0.0f ? 0.0f : v;
        if (out_bf16)
            out_bf16[i] = f32_to_bf16(v);
        else
            y[i] = v;
    }
}

/* Epilogue on an [outer, n, inner] accumulator (int32 when is_int32, else float32):
 *   y = bias[c] + (acc * sw[c]) * sx[o]  (rounded as add_mul; no bias: (acc * sw[c]) * sx[o]),
 *   then ReLU,
 * where c indexes n and o indexes outer (sx_per_outer, else sx[0]). The result is written as
 * float32 in place (out_bf16 NULL) or as bfloat16 to out_bf16 (same layout).
 * Linear: [M, N, 1]; NCHW conv: [B, C, HW]. */
/* epilogue_run over one float32 NCHW plane, its weight scale and bias hoisted (the strided
 * form, step 0, did not vectorize): the same operations in the same order. */
static inline void epilogue_plane(float *y, int64_t len, float w, const float *bias, int64_t c,
                                  float s, int relu, int fused) {
    if (!bias) {
        for (int64_t i = 0; i < len; ++i) {
            const float v = y[i] * w * s;
            y[i] = relu && v < 0.0f ? 0.0f : v;
        }
        return;
    }
    const float b = bias[c];
    if (fused) {
        for (int64_t i = 0; i < len; ++i) {
            const float v = fmaf(y[i] * w, s, b);
            y[i] = relu && v < 0.0f ? 0.0f : v;
        }
    } else {
        for (int64_t i = 0; i < len; ++i) {
            const float v = b + (y[i] * w) * s;
            y[i] = relu && v < 0.0f ? 0.0f : v;
        }
    }
}

void lb_epilogue(void *acc, int is_int32, int64_t outer, int64_t n, int64_t inner,
                 const float *sx, int sx_per_outer, const float *sw, const float *bias, int relu,
                 uint16_t *out_bf16, int nthreads) {
    const int fused = addcmul_fma;
#pragma omp parallel for num_threads(nthreads) if (nthreads > 1)
    for (int64_t o = 0; o < outer; ++o) {
        const float s = sx[sx_per_outer ? o : 0];
        if (inner == 1) {
            epilogue_run((float *)acc + o * n, is_int32, n, sw, 1, bias, 1, s, relu,
                         out_bf16 ? out_bf16 + o * n : 0, fused);
            continue;
        }
        for (int64_t c = 0; c < n; ++c) {
            const int64_t base = (o * n + c) * inner;
            if (!is_int32 && !out_bf16) { /* a float32 NCHW plane: one weight scale and bias */
                epilogue_plane((float *)acc + base, inner, sw[c], bias, c, s, relu, fused);
                continue;
            }
            epilogue_run((float *)acc + base, is_int32, inner, sw + c, 0, bias ? bias + c : 0,
                         0, s, relu, out_bf16 ? out_bf16 + base : 0, fused);
        }
    }
}

/* INT8 conv, step 1: the float32 NCHW input x [b, c, h, w] quantized per tensor to int8 codes
 * in a zero-point-padded NHWC buffer qpad [b, h + 2 ph, w + 2 pw, c] (padding = the code of
 * 0.0, i.e. zp: exact zero padding). dynamic: scale[0] is written from max|x| first. */
void lb_quantize_nhwc_padded_s8(const float *x, int64_t b, int64_t c, int64_t h, int64_t w,
                                int64_t ph, int64_t pw, float *scale, int dynamic, int32_t zp,
                                int32_t qmin, int32_t qmax, int8_t *qpad, int nthreads) {
    const int64_t n = b * c * h * w;
    if (dynamic)
        scale[0] = dynamic_scale(lb_absmax(x, 0, 1, n, n, nthreads), (float)qmax);
    const float inv = 1.0f / scale[0];
    const float lo = (float)qmin, hi = (float)qmax, z = (float)zp;
    const int64_t hp = h + 2 * ph, wp = w + 2 * pw;
    const int8_t zcode = (int8_t)clampf(z, lo, hi);
    /* the codes in x's NCHW order first, one long vectorized pass (a conv's rows are often
     * shorter than a vector), then interleaved into the padded NHWC rows */
    int8_t *codes = (int8_t *)malloc((size_t)(n > 0 ? n : 1));
    if (!codes) { /* no scratch: store each code in place (same values, slower) */
        for (int64_t r = 0; r < b * hp; ++r) {
            const int64_t bi = r / hp, y = r % hp - ph;
            int8_t *out = qpad + r * wp * c;
            memset(out, zcode, (size_t)(wp * c));
            if (y < 0 || y >= h)
                continue;
            for (int64_t ch = 0; ch < c; ++ch)
                for (int64_t j = 0; j < w; ++j)
                    out[(pw + j) * c + ch] = (int8_t)clampf(
                        nearbyintf(x[((bi * c + ch) * h + y) * w + j] * inv) + z, lo, hi);
        }
        return;
    }
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    {
#pragma omp for
        for (int64_t i = 0; i < n; i += 4096) {
            const int64_t e = i + 4096 < n ? i + 4096 : n;
            for (int64_t j = i; j < e; ++j)
                codes[j] = (int8_t)clampf(nearbyintf(x[j] * inv) + z, lo, hi);
        }
#pragma omp for
        for (int64_t r = 0; r < b * hp; ++r) { /* one padded row (all channels) at a time */
            const int64_t bi = r / hp, y = r % hp - ph;
            int8_t *out = qpad + r * wp * c;
            if (y < 0 || y >= h) {
                memset(out, zcode, (size_t)(wp * c));
                continue;
            }
            memset(out, zcode, (size_t)(pw * c));
            memset(out + (pw + w) * c, zcode, (size_t)(pw * c));
            const int8_t *src = codes + (bi * c * h + y) * w;
            int8_t *o = out + pw * c;
            for (int64_t j = 0; j < w; ++j)
                for (int64_t ch = 0; ch < c; ++ch)
                    o[j * c + ch] = src[ch * h * w + j];
        }
    }
    free(codes);
}

/* Copy n bytes: an inline loop for the few bytes of thin layers (a libc call per patch row
 * would cost more than the copy), memcpy otherwise. */
__attribute__((optimize("no-tree-loop-distribute-patterns")))
static inline void copy_bytes(int8_t *dst, const int8_t *src, int64_t n) {
    if (n >= 32) {
        memcpy(dst, src, (size_t)n);
        return;
    }
    for (int64_t t = 0; t < n; ++t)
        dst[t] = src[t];
}

/* INT8 conv, step 2: channels-last im2col of qpad into cols [b * ho * wo, kh * kw * c]
 * (column order (u, v, channel), the order of w.permute(0, 2, 3, 1)). */
void lb_im2col_nhwc_s8(const int8_t *qpad, int64_t b, int64_t c, int64_t hp, int64_t wp,
                       int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t dh, int64_t dw,
                       int64_t ho, int64_t wo, int8_t *cols, int nthreads) {
    const int64_t k = kh * kw * c;
#pragma omp parallel for num_threads(nthreads) if (nthreads > 1)
    for (int64_t r = 0; r < b * ho; ++r) {
        const int64_t bi = r / ho, i = r % ho;
        for (int64_t j = 0; j < wo; ++j) {
            int8_t *dst = cols + (r * wo + j) * k;
            for (int64_t u = 0; u < kh; ++u) {
                const int8_t *src = qpad + ((bi * hp + i * sh + u * dh) * wp + j * sw) * c;
                if (dw == 1) { /* the kw patches of a row are adjacent in NHWC */
                    copy_bytes(dst, src, kw * c);
                    dst += kw * c;
                    continue;
                }
                for (int64_t v = 0; v < kw; ++v, dst += c)
                    copy_bytes(dst, src + v * dw * c, c);
            }
        }
    }
}

/* INT8 conv, step 3: the epilogue of lb_epilogue on the GEMM's int32 acc [b * l, n] (rows are
 * output pixels), written transposed as float32 NCHW y [b, n, l]. */
void lb_epilogue_to_nchw(const int32_t *acc, int64_t b, int64_t l, int64_t n, const float *sx,
                         const float *sw, const float *bias, int relu, float *y, int nthreads) {
    const float s = sx[0];
    const int fused = addcmul_fma;
    const int64_t tile = 64;
    const int64_t tiles = (l + tile - 1) / tile;
#pragma omp parallel for num_threads(nthreads) if (nthreads > 1)
    for (int64_t t = 0; t < b * tiles; ++t) {
        const int64_t bi = t / tiles, l0 = (t % tiles) * tile;
        const int64_t l1 = l0 + tile < l ? l0 + tile : l;
        for (int64_t c = 0; c < n; ++c) {
            const float w = sw[c];
            float *out = y + (bi * n + c) * l;
            for (int64_t p = l0; p < l1; ++p) {
                float v = (float)acc[(bi * l + p) * n + c] * w;
                v = bias ? add_mul(bias[c], v, s, fused) : v * s;
                out[p] = relu && v < 0.0f ? 0.0f : v;
            }
        }
    }
}

static inline int32_t dot_s8(const int8_t *a, const int8_t *b, int64_t k) {
    int32_t s = 0;
    for (int64_t j = 0; j < k; ++j)
        s += (int32_t)a[j] * (int32_t)b[j];
    return s;
}

/* A whole small INT8 linear layer in one call: quantize x [m, k] (as lb_quantize_s8, with its
 * codes and, when dynamic, its scales in stack scratch: m * k <= 2^14 bytes, the caller's
 * SMALL_LINEAR_CODES), int32 dot products with the int8 weight w [n, k] (minus comp[c], the
 * static zero-point term, when given), and the lb_epilogue, written as float32 (or bfloat16
 * when out_bf16) to out [m, n]. For batch-1-like shapes, where three calls and their
 * temporaries cost more than the arithmetic. scale: the static scale (NULL when dynamic).
 * smooth: as lb_quantize_s8 takes it. Returns 0, or -2 (refused by lb_quantize_s8: nothing
 * written). */
int lb_linear_s8_small(const void *x, int bf16, int64_t m, int64_t k, int64_t ldx,
                        const float *static_scale, int per_row, int dynamic, const int32_t *zp,
                        int32_t qmin, int32_t qmax, const int8_t *w, int64_t n,
                        const int32_t *comp, const float *sw, const float *bias, int relu,
                        void *out, int out_bf16, int nthreads, const float *smooth) {
    int8_t q[m * k > 0 ? m * k : 1];
    float dyn_scale[m > 0 ? m : 1];
    float *scale = dynamic ? dyn_scale : (float *)static_scale;
    if (lb_quantize_s8(x, bf16, m, k, ldx, scale, per_row, dynamic, zp, qmin, qmax, q, 1,
                       smooth) != 0)
        return -2;
    const int fused = addcmul_fma;
#pragma omp parallel for num_threads(nthreads) if (nthreads > 1) collapse(2)
    for (int64_t i = 0; i < m; ++i) {
        for (int64_t c = 0; c < n; ++c) {
            const int32_t acc = dot_s8(q + i * k, w + c * k, k) - (comp ? comp[c] : 0);
            const float s = scale[per_row ? i : 0];
            float v = (float)acc * sw[c];
            v = bias ? add_mul(bias[c], v, s, fused) : v * s;
            v = relu && v < 0.0f ? 0.0f : v;
            if (out_bf16)
                ((uint16_t *)out)[i * n + c] = f32_to_bf16(v);
            else
                ((float *)out)[i * n + c] = v;
        }
    }
    return 0;
}

/* Dequantized weight out [n, k] = (code - zp) * scale of stored codes [n, kp] (kp >= k, the
 * padded row length): int4 nibbles packed two per byte, low nibble first (packed), else one
 * int8 / uint8 code per byte (is_signed). One scale / zero-point per tensor (group == 0), or
 * per run of `group` codes in a row (group == kp: per channel). zp NULL means 0. */
/* Row r of the weight, codes [0, k) of it, dequantized into o (see lb_dequantize_weight), in
 * two long passes: the codes as floats, then (c - z) * s per run of one scale. Short per-group
 * loops (groups of 32 codes) vectorize poorly; these give the same values 2-3x faster. */
static inline void dequantize_row(const uint8_t *w, int packed, int is_signed, int64_t kp,
                                  int64_t k, int64_t group, const float *scale,
                                  const int32_t *zp, int64_t r, float *o) {
    const int64_t groups = group ? kp / group : 1, run = group ? group : kp;
    if (packed) {
        const uint8_t *wr = w + r * (kp / 2);
        const int32_t flip = is_signed ? 8 : 0; /* (v ^ 8) - 8 sign-extends a nibble */
        const int64_t pairs = k / 2;
        for (int64_t p = 0; p < pairs; ++p) { /* low nibble first */
            const int32_t byte = wr[p];
            o[2 * p] = (float)(((byte & 0xF) ^ flip) - flip);
            o[2 * p + 1] = (float)(((byte >> 4) ^ flip) - flip);
        }
        if (k & 1)
            o[k - 1] = (float)(((wr[pairs] & 0xF) ^ flip) - flip);
    } else {
        const uint8_t *wr = w + r * kp;
        for (int64_t j = 0; j < k; ++j)
            o[j] = (float)(is_signed ? (int32_t)(int8_t)wr[j] : (int32_t)wr[j]);
    }
    for (int64_t j0 = 0; j0 < k; j0 += run) { /* one scale / zero-point per run */
        const int64_t g = group ? r * groups + j0 / group : 0;
        const float sc = scale[g], z = zp ? (float)zp[g] : 0.0f;
        const int64_t j1 = j0 + run < k ? j0 + run : k;
        int64_t j = j0;
        for (; j + 16 <= j1; j += 16) /* one AVX-512 vector, no loop tail */
            for (int l = 0; l < 16; ++l)
                o[j + l] = (o[j + l] - z) * sc;
        for (; j < j1; ++j)
            o[j] = (o[j] - z) * sc;
    }
}

void lb_dequantize_weight(const uint8_t *w, int packed, int is_signed, int64_t n, int64_t kp,
                          int64_t k, int64_t group, const float *scale, const int32_t *zp,
                          float *out, int nthreads) {
#pragma omp parallel for num_threads(nthreads) if (nthreads > 1)
    for (int64_t r = 0; r < n; ++r)
        dequantize_row(w, packed, is_signed, kp, k, group, scale, zp, r, out + r * k);
}

/* A whole small weight-only linear layer in one call, in float32: y [m, n] = x [m, k] (row
 * stride ldx) . W^T (+ bias, ReLU) with W = (code - zp) * scale (codes and qparams as
 * lb_dequantize_weight reads them), straight from the codes: each output is
 * sum over runs g of scale_g * sum_j (c_j - z_g) * x_j, in 16 interleaved partial sums (lane l
 * takes the codes 16t + l of a run, or the bytes 16t + l of a packed run, whose low and high
 * nibbles pair with the even and odd x; a run's last codes short of a vector go to one more
 * sum), then lanes 0..15 in order, then that sum: a fixed order, so a fixed result, that
 * vectorizes without reassociation. Packed runs are byte aligned (even), as
 * lowbit's layouts make them. For batch-1-like shapes, where the packed bf16 ops' casts and
 * calls cost more than the arithmetic. Returns 0; -1 when out of memory, -2 for odd packed runs. */
/* 16 lanes (one AVX-512 register; GCC / Clang split them on narrower CPUs, same results). */
typedef float v16sf __attribute__((vector_size(64)));
typedef int32_t v16si __attribute__((vector_size(64)));
typedef uint8_t v16qu __attribute__((vector_size(16)));
typedef int8_t v16qs __attribute__((vector_size(16)));

int lb_wo_linear_small(const float *x, int64_t m, int64_t k, int64_t ldx, const uint8_t *w,
                       int packed, int is_signed, int64_t n, int64_t kp, int64_t group,
                       const float *scale, const int32_t *zp, const float *bias, int relu,
                       float *out, int nthreads) {
    const int64_t groups = group ? kp / group : 1, run = group ? group : kp;
    if (packed && (run & 1))
        return -2; /* a run of one scale must be whole bytes */
    /* x zero-padded to kp (the codes' padding columns are zero too), de-interleaved for packed
     * codes: xs[i] = [x_i[0], x_i[2], ..., x_i[1], x_i[3], ...] */
    float *xs = (float *)malloc((size_t)(m * kp) * sizeof(float));
    if (!xs)
        return -1;
    const int64_t half = kp / 2;
    for (int64_t i = 0; i < m; ++i) {
        float *d = xs + i * kp;
        const float *xi = x + i * ldx;
        for (int64_t j = 0; j < kp; ++j) {
            const float v = j < k ? xi[j] : 0.0f;
            d[packed ? (j & 1) * half + (j >> 1) : j] = v;
        }
    }
    const int32_t flip = is_signed ? 8 : 0; /* (v ^ 8) - 8 sign-extends a nibble */
#pragma omp parallel for num_threads(nthreads) if (nthreads > 1) collapse(2)
    for (int64_t r = 0; r < n; ++r) {
        for (int64_t i = 0; i < m; ++i) {
            const float *xe = xs + i * kp, *xo = xe + half;
            v16sf acc = {0};
            float rest = 0.0f; /* codes past the last full vector of a run */
            for (int64_t gi = 0; gi < groups; ++gi) { /* no division in this loop */
                const int64_t j0 = gi * run, g = group ? r * groups + gi : 0;
                const float sc = scale[g], z = zp ? (float)zp[g] : 0.0f;
                if (packed) {
                    const uint8_t *wb = w + r * half + j0 / 2;
                    const float *e = xe + j0 / 2, *o = xo + j0 / 2;
                    const int64_t nb = run / 2;
                    int64_t p = 0;
                    for (; p + 16 <= nb; p += 16) {
                        v16qu bytes;
                        v16sf ev, ov;
                        memcpy(&bytes, wb + p, sizeof bytes);
                        memcpy(&ev, e + p, sizeof ev);
                        memcpy(&ov, o + p, sizeof ov);
                        const v16si b = __builtin_convertvector(bytes, v16si);
                        const v16sf lo = __builtin_convertvector(((b & 0xF) ^ flip) - flip,
                                                                 v16sf) - z;
                        const v16sf hi = __builtin_convertvector(((b >> 4) ^ flip) - flip,
                                                                 v16sf) - z;
                        acc += (lo * ev + hi * ov) * sc;
                    }
                    for (; p < nb; ++p) {
                        const int32_t b = wb[p];
                        const float lo = (float)(((b & 0xF) ^ flip) - flip) - z;
                        const float hi = (float)(((b >> 4) ^ flip) - flip) - z;
                        rest += (lo * e[p] + hi * o[p]) * sc;
                    }
                } else {
                    const uint8_t *wc = w + r * kp + j0;
                    const float *xv = xe + j0;
                    int64_t j = 0;
                    for (; j + 16 <= run; j += 16) {
                        v16qu bytes;
                        v16sf xv16;
                        memcpy(&bytes, wc + j, sizeof bytes);
                        memcpy(&xv16, xv + j, sizeof xv16);
                        const v16si c = is_signed
                            ? __builtin_convertvector((v16qs)bytes, v16si)
                            : __builtin_convertvector(bytes, v16si);
                        acc += (__builtin_convertvector(c, v16sf) - z) * xv16 * sc;
                    }
                    for (; j < run; ++j) {
                        const float c = (float)(is_signed ? (int32_t)(int8_t)wc[j]
                                                          : (int32_t)wc[j]);
                        rest += (c - z) * xv[j] * sc;
                    }
                }
            }
            float v = 0.0f;
            for (int l = 0; l < 16; ++l)
                v += acc[l];
            v += rest;
            v = bias ? v + bias[r] : v;
            out[i * n + r] = relu && v < 0.0f ? 0.0f : v; /* torch.relu: NaN stays NaN */
        }
    }
    free(xs);
    return 0;
}

/* A MaxPool2d fused after a conv (kernel = stride = k, no padding, floor): y [planes, h, w]
 * float32 -> out [planes, h / k, w / k], as torch's CPU max_pool2d picks (start at -inf, take
 * a value when greater or NaN). */
static inline float pool_take(float m, float val) { return (val > m || val != val) ? val : m; }

void lb_maxpool2d(const float *y, int64_t planes, int64_t h, int64_t w, int64_t k, float *out,
                  int nthreads) {
    const int64_t ho = h / k, wo = w / k;
    /* k = 2 on even-width rows: the horizontal pairs of the whole tensor in one long
     * vectorized pass, then the vertical pairs. take(take(a, b), take(c, d)) is the sequential
     * take(take(take(take(-inf, a), b), c), d) bit for bit: ties keep the earlier value, and
     * any NaN gives the last NaN either way (take(-inf, a) is a itself). */
    float *pairs = (k == 2 && w % 2 == 0 && ho > 0)
        ? (float *)malloc((size_t)(planes * h * wo) * sizeof(float)) : NULL;
    if (pairs) {
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
        {
            const int64_t np = planes * h * wo;
#pragma omp for
            for (int64_t i = 0; i < np; i += 4096) {
                const int64_t e = i + 4096 < np ? i + 4096 : np;
                for (int64_t q = i; q < e; ++q)
                    pairs[q] = pool_take(y[2 * q], y[2 * q + 1]);
            }
#pragma omp for
            for (int64_t r = 0; r < planes * ho; ++r) {
                const int64_t p = r / ho, i = r % ho;
                const float *a = pairs + (p * h + 2 * i) * wo, *b = a + wo;
                float *dst = out + r * wo;
                for (int64_t j = 0; j < wo; ++j)
                    dst[j] = pool_take(a[j], b[j]);
            }
        }
        free(pairs);
        return;
    }
#pragma omp parallel for num_threads(nthreads) if (nthreads > 1)
    for (int64_t r = 0; r < planes * ho; ++r) {
        const int64_t p = r / ho, i = r % ho;
        const float *src = y + (p * h + i * k) * w;
        float *dst = out + r * wo;
        for (int64_t j = 0; j < wo; ++j) {
            float m = -INFINITY;
            for (int64_t u = 0; u < k; ++u)
                for (int64_t v = 0; v < k; ++v)
                    m = pool_take(m, src[u * w + j * k + v]);
            dst[j] = m;
        }
    }
}

/* A direct float32 conv2d (groups 1, width stride 1) for small layers, where oneDNN's per-call
 * cost dominates: x [b, c, h, w] (zero padding ph / pw), weight [o, c, kh, kw], y [b, o, ho, wo]
 * plus bias and ReLU. Each output is the sum over the taps (ci, u, v), in that order, of x * w by
 * fused multiply-adds: a fixed order, so a fixed result (integer-valued inputs, as the centered
 * codes of "fp32_codes_conv", give exact integer sums below 2^24). Vectorized over 16 output
 * pixels of a row, 8 output channels at a time (8 independent FMA chains), stored straight into
 * the NCHW rows. Returns 0; -1 when out of memory, -2 for a width stride other than 1. */
/* Store the first nj (1..16) lanes of v: one masked store with AVX-512 (a variable-size memcpy
 * is a library call per row segment, which cost more than the arithmetic). */
static inline void store_first(float *dst, const v16sf *v, int64_t nj) {
    if (nj == 16) {
        memcpy(dst, v, sizeof *v);
        return;
    }
#ifdef __AVX512F__
    _mm512_mask_storeu_ps(dst, (__mmask16)((1u << nj) - 1u), (__m512)*v);
#else
    for (int64_t l = 0; l < nj; ++l)
        dst[l] = (*v)[l];
#endif
}

#pragma GCC push_options
#pragma GCC optimize("fp-contract=fast")
#define LB_OCB 8

/* a[q] (16 output pixels of channel q of the block) = sum over the taps kk, in order, of
 * x[koff[kk] + 0..15] * wb[q * k + kk]. Without AVX-512 a 16-float vector is two ymm registers
 * and GCC keeps an array of 8 of them on the stack (the conv ran 6x slower than F.conv2d on an
 * AVX2 CPU), so there the accumulators are spelled out as __m256 pairs. */
static void conv_taps(const float *restrict x, const int64_t *restrict koff, int64_t k,
                      const float *restrict wb, v16sf *restrict a) {
#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
    __m256 lo[LB_OCB], hi[LB_OCB];
    for (int q = 0; q < LB_OCB; ++q)
        lo[q] = hi[q] = _mm256_setzero_ps();
    for (int64_t kk = 0; kk < k; ++kk) {
        const __m256 x0 = _mm256_loadu_ps(x + koff[kk]), x1 = _mm256_loadu_ps(x + koff[kk] + 8);
        for (int q = 0; q < LB_OCB; ++q) {
            const __m256 wv = _mm256_broadcast_ss(wb + q * k + kk);
            lo[q] = _mm256_fmadd_ps(x0, wv, lo[q]);
            hi[q] = _mm256_fmadd_ps(x1, wv, hi[q]);
        }
    }
    for (int q = 0; q < LB_OCB; ++q) {
        _mm256_storeu_ps((float *)&a[q], lo[q]);
        _mm256_storeu_ps((float *)&a[q] + 8, hi[q]);
    }
#else
    const v16sf zero = {0};
    for (int q = 0; q < LB_OCB; ++q)
        a[q] = zero;
    for (int64_t kk = 0; kk < k; ++kk) {
        v16sf xv;
        memcpy(&xv, x + koff[kk], sizeof xv);
        for (int q = 0; q < LB_OCB; ++q)
            a[q] += xv * wb[q * k + kk];
    }
#endif
}
/* The conv itself; wz: the weight as [o8, k] rows (o8 = o rounded up to LB_OCB, zero rows). */
static int conv2d_direct(const float *x, int64_t b, int64_t c, int64_t h, int64_t w,
                         const float *wz, int64_t o, int64_t kh, int64_t kw, int64_t sh,
                         int64_t ph, int64_t pw, int64_t dh, int64_t dw, const float *bias,
                         int relu, float *y, int nthreads) {
    const int64_t hp = h + 2 * ph, wp = w + 2 * pw;
    const int64_t ho = (hp - dh * (kh - 1) - 1) / sh + 1, wo = wp - dw * (kw - 1);
    const int64_t k = c * kh * kw, nob = (o + LB_OCB - 1) / LB_OCB;
    /* padded x, with 16 floats of slack: a row's last vector may read past its end */
    float *xpad = (float *)calloc((size_t)(b * c * hp * wp + 16), sizeof(float));
    int64_t *koff = (int64_t *)malloc((size_t)k * sizeof(int64_t));
    if (!xpad || !koff) {
        free(xpad);
        free(koff);
        return -1;
    }
    for (int64_t pl = 0; pl < b * c; ++pl)
        for (int64_t i = 0; i < h; ++i)
            memcpy(xpad + (pl * hp + i + ph) * wp + pw, x + (pl * h + i) * w,
                   (size_t)w * sizeof(float));
    for (int64_t ci = 0; ci < c; ++ci) /* where tap (ci, u, v) reads, from an output's corner */
        for (int64_t u = 0; u < kh; ++u)
            for (int64_t v = 0; v < kw; ++v)
                koff[(ci * kh + u) * kw + v] = (ci * hp + u * dh) * wp + v * dw;
    const v16sf zero = {0};
#pragma omp parallel for num_threads(nthreads) if (nthreads > 1) collapse(3)
    for (int64_t n = 0; n < b; ++n) {
        for (int64_t i = 0; i < ho; ++i) {
            for (int64_t ob = 0; ob < nob; ++ob) {
                const float *xrow = xpad + (n * c * hp + i * sh) * wp;
                const float *wb = wz + ob * LB_OCB * k;
                for (int64_t j0 = 0; j0 < wo; j0 += 16) {
                    const int64_t nj = wo - j0 < 16 ? wo - j0 : 16;
                    v16sf a[LB_OCB];
                    conv_taps(xrow + j0, koff, k, wb, a);
                    for (int q = 0; q < LB_OCB; ++q) {
                        const int64_t oc = ob * LB_OCB + q;
                        if (oc >= o)
                            break;
                        v16sf r = bias ? a[q] + bias[oc] : a[q];
                        if (relu) /* r < 0 -> 0; NaN stays NaN, as torch.relu */
                            r = (v16sf)((v16si)r & ~(r < zero));
                        store_first(y + ((n * o + oc) * ho + i) * wo + j0, &r, nj);
                    }
                }
            }
        }
    }
    free(xpad);
    free(koff);
    return 0;
}

/* 1 when the direct conv has work to do; 0 for an empty output (nothing to do); -2 for a
 * width stride other than 1 (the conv reads 16 consecutive input pixels per vector). */
static int direct_conv_shape(int64_t b, int64_t o, int64_t h, int64_t w, int64_t kh,
                             int64_t kw, int64_t sw, int64_t ph, int64_t pw, int64_t dh,
                             int64_t dw) {
    if (sw != 1)
        return -2;
    return b > 0 && o > 0 && h + 2 * ph - dh * (kh - 1) > 0 && w + 2 * pw - dw * (kw - 1) > 0;
}

int lb_conv2d_f32_small(const float *x, int64_t b, int64_t c, int64_t h, int64_t w,
                        const float *weight, int64_t o, int64_t kh, int64_t kw, int64_t sh,
                        int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw,
                        const float *bias, int relu, float *y, int nthreads) {
    const int shape = direct_conv_shape(b, o, h, w, kh, kw, sw, ph, pw, dh, dw);
    if (shape <= 0)
        return shape;
    const int64_t k = c * kh * kw, o8 = (o + LB_OCB - 1) / LB_OCB * LB_OCB;
    float *wz = (float *)calloc((size_t)(o8 * k), sizeof(float)); /* [o8, k], zero rows */
    if (!wz)
        return -1;
    memcpy(wz, weight, (size_t)(o * k) * sizeof(float));
    const int err = conv2d_direct(x, b, c, h, w, wz, o, kh, kw, sh, ph, pw, dh, dw, bias, relu,
                                  y, nthreads);
    free(wz);
    return err;
}

/* The weight-only conv in one call: the weight dequantized from its codes (as
 * lb_dequantize_weight: rows of kp codes, the first k = c * kh * kw used) straight into the
 * direct conv's weight rows, then lb_conv2d_f32_small. */
int lb_wo_conv2d_small(const float *x, int64_t b, int64_t c, int64_t h, int64_t w,
                       const uint8_t *codes, int packed, int is_signed, int64_t kp,
                       int64_t group, const float *scale, const int32_t *zp, int64_t o,
                       int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw,
                       int64_t dh, int64_t dw, const float *bias, int relu, float *y,
                       int nthreads) {
    const int shape = direct_conv_shape(b, o, h, w, kh, kw, sw, ph, pw, dh, dw);
    if (shape <= 0)
        return shape;
    const int64_t k = c * kh * kw, o8 = (o + LB_OCB - 1) / LB_OCB * LB_OCB;
    float *wz = (float *)calloc((size_t)(o8 * k), sizeof(float));
    if (!wz)
        return -1;
    for (int64_t r = 0; r < o; ++r)
        dequantize_row(codes, packed, is_signed, kp, k, group, scale, zp, r, wz + r * k);
    const int err = conv2d_direct(x, b, c, h, w, wz, o, kh, kw, sh, ph, pw, dh, dw, bias, relu,
                                  y, nthreads);
    free(wz);
    return err;
}
#pragma GCC pop_options

/* A small INT8 conv over centered codes in one call (a batch-1 conv's time is mostly the
 * per-call cost of its steps): quantize (lb_quantize_centered_f32), the direct conv over the
 * codes (lb_conv2d_f32_small), the epilogue in place (lb_epilogue) and an optional fused
 * max-pool (lb_maxpool2d): the same functions in the same order as the step-by-step path, so
 * the same bits. p: the LBQ_* parameters. static_scale: the static activation scale, NULL for
 * dynamic (max|x| / qmax, computed here). weight: [o, c, kh, kw] float32 centered codes;
 * sw, bias: [o] (bias may be NULL). x: [b, c, h, w]; y: [b, o, ho, wo], or pooled
 * [b, o, ho / pool, wo / pool]. Returns 0; 1 when x holds NaN / Inf (nothing written: the
 * caller's path zeroes those samples); -1 out of memory; -2 a width stride other than 1. */
/* Output length of a conv along one dimension (zero padding), as PyTorch computes it. */
static inline int64_t conv_out_len(int64_t size, int64_t pad, int64_t dil, int64_t k,
                                   int64_t stride) {
    return (size + 2 * pad - dil * (k - 1) - 1) / stride + 1;
}

enum { LBQ_B, LBQ_C, LBQ_H, LBQ_W, LBQ_O, LBQ_KH, LBQ_KW, LBQ_SH, LBQ_SW, LBQ_PH, LBQ_PW, LBQ_DH,
       LBQ_DW, LBQ_ZP, LBQ_QMIN, LBQ_QMAX, LBQ_RELU, LBQ_POOL, LBQ_T_QUANT, LBQ_T_CONV,
       LBQ_T_EPI, LBQ_NPARAMS };

int64_t lb_qconv_nparams(void) { return LBQ_NPARAMS; }

int lb_qconv_direct(const int64_t *p, const float *static_scale, const float *weight,
                    const float *sw, const float *bias, const float *x, float *y) {
    const int64_t b = p[LBQ_B], c = p[LBQ_C], h = p[LBQ_H], w = p[LBQ_W], o = p[LBQ_O];
    const int64_t kh = p[LBQ_KH], kw = p[LBQ_KW], pool = p[LBQ_POOL], n = b * c * h * w;
    const int64_t ho = conv_out_len(h, p[LBQ_PH], p[LBQ_DH], kh, p[LBQ_SH]);
    const int64_t wo = conv_out_len(w, p[LBQ_PW], p[LBQ_DW], kw, p[LBQ_SW]);
    const int tq = (int)p[LBQ_T_QUANT], te = (int)p[LBQ_T_EPI];
    if (n <= 0 || o <= 0 || ho <= 0 || wo <= 0)
        return -2;
    const float amax = lb_absmax(x, 0, 1, n, n, tq);
    if (!(amax <= FLT_MAX))
        return 1;
    const float scale = static_scale ? static_scale[0] : dynamic_scale(amax, (float)p[LBQ_QMAX]);
    float *t = (float *)malloc((size_t)n * sizeof(float));
    float *out = pool ? (float *)malloc((size_t)(b * o * ho * wo) * sizeof(float)) : y;
    int err = (!t || !out) ? -1 : 0;
    if (!err) {
        float s = scale; /* read only: dynamic = 0 */
        lb_quantize_centered_f32(x, n, &s, 0, (int32_t)p[LBQ_ZP], (int32_t)p[LBQ_QMIN],
                                 (int32_t)p[LBQ_QMAX], t, tq);
        err = lb_conv2d_f32_small(t, b, c, h, w, weight, o, kh, kw, p[LBQ_SH], p[LBQ_SW],
                                  p[LBQ_PH], p[LBQ_PW], p[LBQ_DH], p[LBQ_DW], NULL, 0, out,
                                  (int)p[LBQ_T_CONV]);
    }
    if (!err) {
        lb_epilogue(out, 0, b, o, ho * wo, &scale, 0, sw, bias, (int)p[LBQ_RELU], NULL, te);
        if (pool)
            lb_maxpool2d(out, b * o, ho, wo, pool, y, te);
    }
    free(t);
    if (pool)
        free(out);
    return err;
}

/* The weight-only conv (lb_wo_conv2d_small: the weight dequantized from its codes, direct
 * conv, bias, ReLU) and an optional fused max-pool in one call; the same functions in the
 * same order as the step-by-step path. p: the LBW_* parameters; codes, scale, zp as
 * lb_wo_conv2d_small takes them. Returns 0, -1 out of memory, -2 a width stride other than 1
 * or an empty output. */
enum { LBW_B, LBW_C, LBW_H, LBW_W, LBW_O, LBW_KH, LBW_KW, LBW_SH, LBW_SW, LBW_PH, LBW_PW,
       LBW_DH, LBW_DW, LBW_PACKED, LBW_SIGNED, LBW_KP, LBW_GROUP, LBW_RELU, LBW_POOL,
       LBW_T_CONV, LBW_T_POOL, LBW_NPARAMS };

int64_t lb_wo_conv_nparams(void) { return LBW_NPARAMS; }

int lb_wo_conv_direct(const int64_t *p, const uint8_t *codes, const float *scale,
                      const int32_t *zp, const float *bias, const float *x, float *y) {
    const int64_t b = p[LBW_B], o = p[LBW_O], kh = p[LBW_KH], kw = p[LBW_KW], pool = p[LBW_POOL];
    const int64_t ho = conv_out_len(p[LBW_H], p[LBW_PH], p[LBW_DH], kh, p[LBW_SH]);
    const int64_t wo = conv_out_len(p[LBW_W], p[LBW_PW], p[LBW_DW], kw, p[LBW_SW]);
    if (b <= 0 || o <= 0 || ho <= 0 || wo <= 0)
        return -2;
    float *out = pool ? (float *)malloc((size_t)(b * o * ho * wo) * sizeof(float)) : y;
    if (!out)
        return -1;
    int err = lb_wo_conv2d_small(x, b, p[LBW_C], p[LBW_H], p[LBW_W], codes, (int)p[LBW_PACKED],
                                 (int)p[LBW_SIGNED], p[LBW_KP], p[LBW_GROUP], scale, zp, o, kh,
                                 kw, p[LBW_SH], p[LBW_SW], p[LBW_PH], p[LBW_PW], p[LBW_DH],
                                 p[LBW_DW], bias, (int)p[LBW_RELU], out, (int)p[LBW_T_CONV]);
    if (!err && pool)
        lb_maxpool2d(out, b * o, ho, wo, pool, y, (int)p[LBW_T_POOL]);
    if (pool)
        free(out);
    return err;
}

/* lb_linear_s8_small on float32 rows with its arguments in one array (a prepared call: one
 * ctypes argument instead of twenty), after an optional finiteness check of x (layers whose
 * activation scale is shared by all rows). Pointers are stored as integers. LBL_SMOOTH: 0, or
 * k float32 per-column factors (AWQ / SmoothQuant input smoothing): x * smooth is quantized,
 * the products torch's x * smooth gives (dynamic per-row scales only). Returns 0; 1 when the
 * check finds NaN / Inf, -2 refused (lb_linear_s8_small): nothing written. */
enum { LBL_M, LBL_K, LBL_SCALE, LBL_PER_ROW, LBL_DYNAMIC, LBL_ZP, LBL_QMIN, LBL_QMAX, LBL_W,
       LBL_N, LBL_COMP, LBL_SW, LBL_BIAS, LBL_RELU, LBL_THREADS, LBL_CHECK, LBL_SMOOTH,
       LBL_NPARAMS };

int64_t lb_linear_small_nparams(void) { return LBL_NPARAMS; }

int lb_linear_small_prepared(const int64_t *p, const float *x, float *y) {
    const int64_t m = p[LBL_M], k = p[LBL_K];
    if (p[LBL_CHECK] && !(lb_absmax(x, 0, 1, m * k, m * k, 1) <= FLT_MAX))
        return 1;
    return lb_linear_s8_small(
        x, 0, m, k, k, (const float *)(intptr_t)p[LBL_SCALE], (int)p[LBL_PER_ROW],
        (int)p[LBL_DYNAMIC], (const int32_t *)(intptr_t)p[LBL_ZP], (int32_t)p[LBL_QMIN],
        (int32_t)p[LBL_QMAX], (const int8_t *)(intptr_t)p[LBL_W], p[LBL_N],
        (const int32_t *)(intptr_t)p[LBL_COMP], (const float *)(intptr_t)p[LBL_SW],
        (const float *)(intptr_t)p[LBL_BIAS], (int)p[LBL_RELU], y, 0, (int)p[LBL_THREADS],
        (const float *)(intptr_t)p[LBL_SMOOTH]);
}

/* lb_wo_linear_small with its arguments in one array (a prepared call), x rows contiguous. */
enum { LBO_M, LBO_K, LBO_W, LBO_PACKED, LBO_SIGNED, LBO_N, LBO_KP, LBO_GROUP, LBO_SCALE, LBO_ZP,
       LBO_BIAS, LBO_RELU, LBO_THREADS, LBO_NPARAMS };

int64_t lb_wo_linear_small_nparams(void) { return LBO_NPARAMS; }

int lb_wo_linear_small_prepared(const int64_t *p, const float *x, float *y) {
    return lb_wo_linear_small(x, p[LBO_M], p[LBO_K], p[LBO_K], (const uint8_t *)(intptr_t)p[LBO_W],
                              (int)p[LBO_PACKED], (int)p[LBO_SIGNED], p[LBO_N], p[LBO_KP],
                              p[LBO_GROUP], (const float *)(intptr_t)p[LBO_SCALE],
                              (const int32_t *)(intptr_t)p[LBO_ZP],
                              (const float *)(intptr_t)p[LBO_BIAS], (int)p[LBO_RELU], y,
                              (int)p[LBO_THREADS]);
}
