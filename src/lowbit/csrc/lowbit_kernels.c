/* lowbit fused CPU kernels: activation quantization and the INT8 GEMM/conv epilogue.
 *
 * Built on first use by lowbit/native.py (cc -O3 -march=native -ffp-contract=off) and called
 * through ctypes on raw buffers. Each function computes, element by element, the same IEEE
 * float32 operations in the same order as lowbit's pure-PyTorch path (no implicit FMA
 * contraction, the one explicit fmaf where torch's addcmul fuses, round half to even), so the
 * two give the same bits; tests check that. Activations may be float32 or bfloat16 (read as
 * the float32 it widens to exactly; written with torch's round-to-nearest-even narrowing).
 * The work is split over rows with OpenMP (the runtime PyTorch already loaded) when it is big.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float clampf(float v, float lo, float hi) {
    /* torch.clamp: max(v, lo) then min(., hi) */
    v = v < lo ? lo : v;
    return v > hi ? hi : v;
}

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* c10::BFloat16's round_to_nearest_even (NaN -> 0x7FC0). */
static inline uint16_t f32_to_bf16(float f) {
    if (f != f)
        return 0x7FC0;
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return (uint16_t)((u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16);
}

/* Element j of a row of float32 (bf16 == 0) or bfloat16 (bf16 != 0) values. */
#define LOAD(x, bf16, j) ((bf16) ? bf16_to_f32(((const uint16_t *)(x))[j]) : ((const float *)(x))[j])

/* max|x[0..k)|: exact in any order, so the reduction may be reordered (vectorized). */
__attribute__((optimize("fast-math"))) static float row_absmax_f32(const float *x, int64_t k) {
    float m = 0.0f;
    for (int64_t j = 0; j < k; ++j)
        m = fmaxf(m, fabsf(x[j]));
    return m;
}

/* Magnitudes of non-negative floats order like their bit patterns: max over the sign-cleared
 * bfloat16 bits is max|x| (and a NaN wins, as it does in torch.amax). */
static float row_absmax_bf16(const uint16_t *x, int64_t k) {
    uint16_t m = 0;
    for (int64_t j = 0; j < k; ++j) {
        uint16_t a = x[j] & 0x7FFFu;
        m = a > m ? a : m;
    }
    return bf16_to_f32(m);
}

static inline float row_absmax(const void *x, int bf16, int64_t k) {
    return bf16 ? row_absmax_bf16((const uint16_t *)x, k) : row_absmax_f32((const float *)x, k);
}

/* Row i of a [m, k] matrix with row stride ldx (elements). */
static inline const void *row(const void *x, int bf16, int64_t i, int64_t ldx) {
    return bf16 ? (const void *)((const uint16_t *)x + i * ldx)
                : (const void *)((const float *)x + i * ldx);
}

/* max|x| of a [m, k] matrix with row stride ldx. */
float lb_absmax(const void *x, int bf16, int64_t m, int64_t k, int64_t ldx, int nthreads) {
    float best = 0.0f;
#pragma omp parallel for num_threads(nthreads) if (nthreads > 1) reduction(max : best)
    for (int64_t i = 0; i < m; ++i) {
        float a = row_absmax(row(x, bf16, i, ldx), bf16, k);
        best = a > best ? a : best;
    }
    return best;
}

/* scale = max(absmax / qmax, FLT_EPSILON), as lowbit.kernels.quantize_activation. */
static inline float dynamic_scale(float absmax, float qmax) {
    float s = absmax / qmax;
    return s < FLT_EPSILON ? FLT_EPSILON : s;
}

static inline void quantize_row_s8(const void *x, int bf16, int64_t k, float inv, float zp,
                                   float lo, float hi, int8_t *q) {
    if (bf16) {
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
 * tensor) from max|x| as dynamic_scale(); zp must then be NULL. zp NULL means 0. */
void lb_quantize_s8(const void *x, int bf16, int64_t m, int64_t k, int64_t ldx, float *scale,
                    int per_row, int dynamic, const int32_t *zp, int32_t qmin, int32_t qmax,
                    int8_t *q, int nthreads) {
    const float lo = (float)qmin, hi = (float)qmax;
    if (dynamic && !per_row)
        scale[0] = dynamic_scale(lb_absmax(x, bf16, m, k, ldx, nthreads), hi);
#pragma omp parallel for num_threads(nthreads) if (nthreads > 1)
    for (int64_t i = 0; i < m; ++i) {
        const void *xr = row(x, bf16, i, ldx);
        const int64_t r = per_row ? i : 0;
        if (dynamic && per_row)
            scale[i] = dynamic_scale(row_absmax(xr, bf16, k), hi);
        const float inv = 1.0f / scale[r];
        const float z = zp ? (float)zp[r] : 0.0f;
        quantize_row_s8(xr, bf16, k, inv, z, lo, hi, q + i * k);
    }
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

/* One [len] run of the epilogue: v = acc * w (then * s, or fma(v, s, b)), ReLU; w / b advance
 * by w_step / b_step (1: per channel along the run; 0: one channel). Written as float32 in
 * place, or as bfloat16 to out_bf16. */
static inline void epilogue_run(void *acc, int is_int32, int64_t len, const float *w,
                                int64_t w_step, const float *b, int64_t b_step, float s,
                                int relu, uint16_t *out_bf16) {
    float *y = (float *)acc;
    const int32_t *a = (const int32_t *)acc;
    for (int64_t i = 0; i < len; ++i) {
        float v = (is_int32 ? (float)a[i] : y[i]) * w[i * w_step];
        /* torch.addcmul(bias, v, s) is one fused multiply-add on x86 (AVX2/AVX-512) */
        v = b ? fmaf(v, s, b[i * b_step]) : v * s;
        v = relu ? (v > 0.0f ? v : 0.0f) : v;
        if (out_bf16)
            out_bf16[i] = f32_to_bf16(v);
        else
            y[i] = v;
    }
}

/* Epilogue on an [outer, n, inner] accumulator (int32 when is_int32, else float32):
 *   y = fma(acc * sw[c], sx[o], bias[c])  (or (acc * sw[c]) * sx[o] without bias), then ReLU,
 * where c indexes n and o indexes outer (sx_per_outer, else sx[0]). The result is written as
 * float32 in place (out_bf16 NULL) or as bfloat16 to out_bf16 (same layout).
 * Linear: [M, N, 1]; NCHW conv: [B, C, HW]. */
void lb_epilogue(void *acc, int is_int32, int64_t outer, int64_t n, int64_t inner,
                 const float *sx, int sx_per_outer, const float *sw, const float *bias, int relu,
                 uint16_t *out_bf16, int nthreads) {
#pragma omp parallel for num_threads(nthreads) if (nthreads > 1)
    for (int64_t o = 0; o < outer; ++o) {
        const float s = sx[sx_per_outer ? o : 0];
        if (inner == 1) {
            epilogue_run((float *)acc + o * n, is_int32, n, sw, 1, bias, 1, s, relu,
                         out_bf16 ? out_bf16 + o * n : 0);
            continue;
        }
        for (int64_t c = 0; c < n; ++c) {
            const int64_t base = (o * n + c) * inner;
            epilogue_run((float *)acc + base, is_int32, inner, sw + c, 0, bias ? bias + c : 0,
                         0, s, relu, out_bf16 ? out_bf16 + base : 0);
        }
    }
}
