/* lowbit kernels in portable C for any CPU (ARM, x86 without AVX2): the same layouts and
 * results as the ISA-specific sources, in plain loops the compiler may vectorize.
 * The driver (bounds checks, layouts, threads, epilogue) is lowbit_gemm.h. */
#include <stdint.h>

#define LB_ISA "portable"
/* plain int32 loops: the split form of 8-bit activations saves nothing here (see lowbit_gemm.h) */
#define LB_SPLIT_PAYS 0

/* one row of codes q [k] as {|q[4s..4s+3]|, q[4s..4s+3]} per step s (zero tail) */
static void layout_codes(const int8_t *q, int64_t k, uint8_t *a) {
    const int64_t k4 = (k + 3) / 4;
    for (int64_t s = 0; s < k4; ++s)
        for (int j = 0; j < 4; ++j) {
            const int64_t idx = s * 4 + j;
            const int8_t v = idx < k ? q[idx] : 0;
            a[s * 8 + j] = (uint8_t)(v < 0 ? -(int32_t)v : v);
            a[s * 8 + 4 + j] = (uint8_t)v;
        }
}

/* one row of 7-bit codes q [k] (in [-64, 63]) as {q + 64, 0} per step s (zero tail: u = 0) */
static void layout_codes_u7(const int8_t *q, int64_t k, uint8_t *a) {
    const int64_t k4 = (k + 3) / 4;
    for (int64_t s = 0; s < k4; ++s)
        for (int j = 0; j < 4; ++j) {
            const int64_t idx = s * 4 + j;
            a[s * 8 + j] = idx < k ? (uint8_t)(q[idx] + 64) : 0;
            a[s * 8 + 4 + j] = 0;
        }
}

/* one row of 8-bit codes q [k] in the split form {c + 64, r} per step s, c = clamp(q, -64, 63)
 * and r = q - c; the steps whose r is not all zero listed in idx; returns how many */
static int64_t layout_codes_split(const int8_t *q, int64_t k, uint8_t *a, int32_t *idx) {
    const int64_t k4 = (k + 3) / 4;
    int64_t n = 0;
    for (int64_t s = 0; s < k4; ++s) {
        int any = 0;
        for (int j = 0; j < 4; ++j) {
            const int64_t i = s * 4 + j;
            const int8_t v = i < k ? q[i] : 0;
            const int8_t c = v < -64 ? -64 : (v > 63 ? 63 : v);
            a[s * 8 + j] = (uint8_t)(i < k ? c + 64 : 0);
            a[s * 8 + 4 + j] = (uint8_t)(int8_t)(v - c);
            any |= v != c;
        }
        if (any)
            idx[n++] = (int32_t)s;
    }
    return n;
}

/* how many 4-K steps of a row of codes q [k] hold a code outside [-64, 63] */
static int64_t count_split_steps(const int8_t *q, int64_t k) {
    int64_t n = 0;
    for (int64_t j = 0; j < k; j += 4) {
        int any = 0;
        for (int t = 0; t < 4 && j + t < k; ++t)
            any |= q[j + t] < -64 || q[j + t] > 63;
        n += any;
    }
    return n;
}

/* rows (1..4) x 16 columns of one panel: out[r * 16 + c], exact int32. form 0: {|q|, q};
 * 1: the unsigned 7-bit form, q + 64 in the first 4 bytes of a step; 2: the split form
 * {c + 64, r} (the driver subtracts 64 * colsum for both; the step lists are not needed) */
static inline __attribute__((always_inline)) void s8_tile(const uint8_t *a, int64_t lda,
                                                          int rows, const int8_t *w,
                                                          int64_t k4, int form,
                                                          const int32_t *lst, int64_t ldl,
                                                          int32_t *out) {
    (void)lst;
    (void)ldl;
    for (int r = 0; r < rows; ++r) {
        int32_t acc[16] = {0};
        const uint8_t *ar = a + r * lda;
        for (int64_t s = 0; s < k4; ++s) {
            const int8_t *ws = w + s * 64;
            int32_t q[4];
            for (int j = 0; j < 4; ++j) /* the codes of this step */
                q[j] = form == 0 ? (int32_t)(int8_t)ar[s * 8 + 4 + j]
                                 : (int32_t)ar[s * 8 + j] +
                                       (form == 2 ? (int32_t)(int8_t)ar[s * 8 + 4 + j] : 0);
            for (int c = 0; c < 16; ++c)
                for (int j = 0; j < 4; ++j)
                    acc[c] += q[j] * (int32_t)ws[c * 4 + j];
        }
        for (int c = 0; c < 16; ++c)
            out[r * 16 + c] = acc[c];
    }
}

/* one activation row x np (1..4) panels (pstride bytes apart): out[p * 16 + c] */
static inline __attribute__((always_inline)) void s8_gemv(const uint8_t *a, const int8_t *w,
                                                          int64_t pstride, int np, int64_t k4,
                                                          int form, const int32_t *lst,
                                                          int32_t *out) {
    for (int p = 0; p < np; ++p)
        s8_tile(a, 0, 1, w + p * pstride, k4, form, lst, 0, out + p * 16);
}

/* rows (1..4) of x . nr (1..2) INT4 weight rows: out[r][c] = sum_g s_g * sum_j u_j x_j */
static void u4_rows(const float *x, int64_t ldx, int rows, const uint8_t *wq, int64_t kp,
                    int64_t g, const float *s, float out[4][2], int nr) {
    const int64_t groups = kp / g, row_bytes = kp / 2;
    for (int r = 0; r < rows; ++r)
        for (int c = 0; c < nr; ++c) {
            const uint8_t *wr = wq + c * row_bytes;
            const float *xr = x + r * ldx;
            float acc = 0.0f;
            for (int64_t gi = 0; gi < groups; ++gi) {
                float d = 0.0f;
                for (int64_t j = gi * g; j < (gi + 1) * g; j += 32)
                    for (int t = 0; t < 16; ++t) {
                        const uint8_t b = wr[j / 2 + t];
                        d += (float)(b & 0xF) * xr[j + t] + (float)(b >> 4) * xr[j + 16 + t];
                    }
                acc += s[c * groups + gi] * d;
            }
            out[r][c] = acc;
        }
}

/* rows (1..4) of int8 codes q x np (1..2) panels of 8 INT4 columns (lbk_u4p_linear's layout):
 * out[r * 16 + p * 8 + c] = sum_g s_g sx_g (dot_g(u, q) - z_g sum_g(q)), each dot exact */
static void u4p_tile(const int8_t *q, int64_t ldq, int rows, const uint8_t *wp, int64_t pstride,
                     int np, int64_t kp, int64_t g, const float *sT, const uint8_t *zT,
                     int64_t ldT, const float *sx, const float *tq, int64_t groups, float *out) {
    for (int r = 0; r < rows; ++r)
        for (int p = 0; p < np; ++p)
            for (int c = 0; c < 8; ++c) {
                const uint8_t *pan = wp + p * pstride + c * 4;
                const int8_t *qr = q + r * ldq;
                float acc = 0.0f;
                for (int64_t gi = 0; gi < groups; ++gi) {
                    int32_t d = 0;
                    for (int64_t t = gi * g / 8; t < (gi + 1) * g / 8; ++t)
                        for (int j = 0; j < 4; ++j) {
                            const uint8_t b = pan[t * 32 + j];
                            d += (int32_t)(b & 0xF) * qr[8 * t + j] +
                                 (int32_t)(b >> 4) * qr[8 * t + 4 + j];
                        }
                    const float s = sT[gi * ldT + p * 8 + c], z = (float)zT[gi * ldT + p * 8 + c];
                    acc += s * sx[r * groups + gi] * (float)d - s * z * tq[r * groups + gi];
                }
                out[r * 16 + p * 8 + c] = acc;
            }
}

#include "lowbit_gemm.h"
