/* Float helpers shared by lowbit_kernels.c and the per-ISA GEMMs (lowbit_gemm.h): bfloat16
 * conversions with c10::BFloat16's rounding, and a row's max|x| whose NaN semantics both must
 * keep identical (a NaN row gets a NaN scale and a NaN output row, as the float layer gives). */
#ifndef LOWBIT_FLOAT_H
#define LOWBIT_FLOAT_H

#include <stdint.h>
#include <string.h>

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

/* max|x[0..k)| of float32 (bf16 == 0) or bfloat16 values, as the max of the sign-cleared bit
 * patterns (magnitudes of non-negative floats order like their bits): an integer max that
 * vectorizes, and a NaN wins (its bits exceed +Inf's), as in torch.amax. */
static inline float row_absmax(const void *x, int bf16, int64_t k) {
    if (bf16) {
        const uint16_t *xb = (const uint16_t *)x;
        uint16_t m = 0;
        for (int64_t j = 0; j < k; ++j) {
            const uint16_t a = xb[j] & 0x7FFFu;
            m = a > m ? a : m;
        }
        return bf16_to_f32(m);
    }
    const uint32_t *xb = (const uint32_t *)x;
    uint32_t m = 0;
    for (int64_t j = 0; j < k; ++j) {
        const uint32_t a = xb[j] & 0x7FFFFFFFu;
        m = a > m ? a : m;
    }
    float r;
    memcpy(&r, &m, sizeof r);
    return r;
}

/* max|x[j] * smooth[j]| of k float32 values (AWQ / SmoothQuant input smoothing), as the bits of
 * the float32 products (see row_absmax). */
static inline float row_absmax_smooth(const float *x, const float *smooth, int64_t k) {
    uint32_t m = 0;
    for (int64_t j = 0; j < k; ++j) {
        const float p = x[j] * smooth[j];
        uint32_t a;
        memcpy(&a, &p, sizeof a);
        a &= 0x7FFFFFFFu;
        m = a > m ? a : m;
    }
    float r;
    memcpy(&r, &m, sizeof r);
    return r;
}

#endif
