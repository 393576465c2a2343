/* lowbit INT8 x INT8 and INT4-weight kernels: the ISA-independent driver.
 *
 * Each ISA source (lowbit_gemm_avx2.c, lowbit_gemm_portable.c) defines the micro-kernels
 *   s8_tile(a, lda, rows, panel, k4, form, lst, ldl, out)  rows (1..LB_TILE_ROWS) x 16 columns
 *   s8_gemv(a, panels, pstride, np, k4, form, lst, out)    1 row x np (1..4) panels, exact
 *   s8_tile2(a, lda, rows, panel, pstride, k4, form, out)  (LB_PAIR_TILES) rows x 2 panels
 *   u4_rows(x, ldxp, rows, wq, kp, g, s, out) rows (1..4) of x . 2 weight rows, float32
 *   layout_codes(q, k, a)                    one row of codes as {|q|, q} per 4-K step
 *   layout_codes_u7(q, k, a)                 one row of 7-bit codes as {q + 64, 0} per step
 *                                            (LB_U8_CODES: q + 64 only, 4 bytes per step)
 *   layout_codes_u8(q, k, a)                 (LB_U8_CODES only) 8-bit codes as q + 128
 *   layout_codes_split(q, k, a, idx)         one row of 8-bit codes in the split form (below)
 *   count_split_steps(q, k)                  how many steps of a row the split form lists
 *   u4p_tile(q, ldq, rows, panels, ..., out)  rows (1..4) of int8 codes x 1..2 INT4 panels
 * and the names LB_ISA, LB_SPLIT_PAYS and LB_U8_CODES, then includes this file, which
 * bounds-checks every argument, lays out the operands, splits the work over OpenMP threads and
 * applies the float epilogue.
 * Compiled once per ISA with that ISA's flags (lowbit/native.py) and picked at run time.
 *
 * INT8 weight panels: w [n, k] int8 codes in [-127, 127], packed once per layer as
 *   packed[p][s][c][j] = w[16 p + c][4 s + j]   (zero outside w), p < ceil(n/16), s < ceil(k/4)
 * so one 4-K step of a 16-column panel is 64 contiguous bytes. Activation codes q in
 * [-128, 127] are laid out per row as {|q[4s..4s+3]|, q[4s..4s+3]} (8 bytes per step): the
 * AVX2 kernel multiplies |q| (unsigned) by w carrying q's sign (ggml's sign trick), so every
 * pair sum is at most 2 * 128 * 127 = 32512 and vpmaddubsw never saturates: exact.
 * Activations of at most 7 bits (q in [-64, 63], an activation spec with bits=7) take the
 * cheaper "u7" form: u = q + 64 in [0, 127] is the unsigned operand as it is (no sign op;
 * pair sums <= 2 * 127 * 127), and 64 * colsum(w), stored after the panels, is subtracted.
 * Where the ISA multiplies unsigned by signed bytes without int16 pair sums (VNNI's vpdpbusd:
 * LB_U8_CODES), 8-bit activations take the unsigned form u = q + 128 in [0, 255] instead of the
 * sign form, and 128 * colsum(w) is subtracted: one instruction per 32 MACs, exact. There the
 * unsigned forms (8-bit and 7-bit) are laid out compact: u only, 4 bytes per step.
 * 8-bit activations take the "split" form where the ISA gains from it (LB_SPLIT_PAYS: AVX2,
 * whose sign op costs about a fifth of the GEMM) and few codes lie outside [-64, 63]: q = c + r
 * with c = clamp(q, -64, 63) run as the 7-bit form over every step, and the remainder
 * r = q - c in [-64, 64] (zero for most codes of per-token activations) added with the sign
 * trick for the listed steps of each row only. Still exact; chosen per block of rows when at
 * most LB_SPLIT_PERMILLE of its steps have a remainder, else the sign form.
 *
 * INT4 weights: codes u in [0, 15] (signed codes + 8), per 32 codes 16 bytes with byte j =
 * u[j] | u[j + 16] << 4; y = sum_groups s_g * (sum_j u_j x_j - z_g * sum_j x_j), z_g the
 * unsigned zero-point; equal to the dequantize-then-GEMM reference up to float rounding.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "lowbit_float.h"

#define LB_OK 0
#define LB_EARG (-1)   /* a size, stride or pointer that does not fit */
#define LB_ECODE (-2)  /* an INT8 weight code of -128: not packable (the caller falls back) */
#define LB_ENOMEM (-3)

#ifndef LB_U8_CODES
#define LB_U8_CODES 0
#endif
#ifndef LB_AMX /* AMX tiles (amx_configure / amx_tile / amx_done, lb_amx_granted) */
#define LB_AMX 0
#endif
#ifndef LB_TILE_ROWS /* rows per s8_tile call (at most 8) */
#define LB_TILE_ROWS 4
#endif

#ifndef LB_PAIR_TILES /* s8_tile2: LB_PAIR_MIN_ROWS..LB_TILE_ROWS rows x 2 panels, not split */
#define LB_PAIR_TILES 0
#endif
#ifndef LB_PAIR_MAX_ROWS /* blocks of more rows take the one-panel tiles */
#define LB_PAIR_MAX_ROWS (1 << 30)
#endif

#ifndef LB_U4_WIDE_TILES /* u4p_tile takes 2 panels at 3-4 rows too (else 1) */
#define LB_U4_WIDE_TILES 0
#endif
#ifndef LB_AMX_MIN_ROWS
#define LB_AMX_MIN_ROWS 6
#endif
#ifndef LB_AMX_U4_MIN_ROWS
#define LB_AMX_U4_MIN_ROWS 6
#endif

/* Rows per OpenMP work item when the rows are split between threads. */
#define LB_ROW_BLOCK 32

/* ... at most this many on AMX tiles (see lbk_s8_linear) */
#define LB_AMX_ROW_BLOCK 256

/* Many rows against packed weights of at most this many bytes: each 4-row tile runs over
 * every panel (its activation rows stay in L1, the weights come from L2 / L3) instead of each
 * panel over every tile of a row block (whose laid-out rows, 8 bytes per 4 K, spill L1 at
 * K = 384 already). Measured on Zen 3 (2 threads): 1.2-1.35x at 4096 / 544 x 384 -> 1536,
 * 1.05-1.1x up to 4 MiB of weights, slower at 16 MiB. */
#define LB_ROWS_OUTER_BYTES (4LL << 20)

/* The split form when at most this many steps per 1000 of a block of rows have a remainder:
 * a listed step costs 1-3 dense steps of the 7-bit form, and the two forms broke even at
 * 7-14% listed (Zen 3, bench_kernels.py; docs/kernels.md). */
#define LB_SPLIT_PERMILLE 100

/* -1: choose the form of 8-bit activations as above; 0: never split; 1: always split (tests) */
static int lb_split_mode = -1;

/* Set the split-form choice (-1 auto, 0 never, 1 always; anything else only reads it) and
 * return the previous one. Process-wide: for tests and measurements. */
int lbk_s8_split_mode(int mode) {
    const int old = lb_split_mode;
    if (mode >= -1 && mode <= 1)
        lb_split_mode = mode;
    return old;
}

/* Bit f set: some block of rows was laid out in form f (0 sign, 1 7-bit, 2 split) */
static int lb_forms_seen;

/* The forms used since the last reset (bit mask as above); reset != 0 clears it. For tests. */
int lbk_s8_forms_seen(int reset) {
    return reset ? __atomic_exchange_n(&lb_forms_seen, 0, __ATOMIC_RELAXED)
                 : __atomic_load_n(&lb_forms_seen, __ATOMIC_RELAXED);
}

static inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

/* A per-thread scratch buffer that only grows (OpenMP threads persist): no page faults per
 * call. 64-byte aligned. NULL when out of memory. */
static __thread uint8_t *tls_buf;
static __thread size_t tls_cap;

static uint8_t *scratch(size_t bytes) {
    if (bytes <= tls_cap)
        return tls_buf;
    size_t cap = bytes + (bytes >> 2) + 64;
    void *p = NULL;
    if (posix_memalign(&p, 64, cap) != 0)
        return NULL;
    free(tls_buf);
    tls_buf = (uint8_t *)p;
    tls_cap = cap;
    return tls_buf;
}

const char *lbk_isa(void) { return LB_ISA; }

/* 1 when this library runs AMX tiles (built with AMX and the OS granted the tile state) */
int lbk_amx_ok(void) {
#if LB_AMX
    return lb_amx_granted;
#else
    return 0;
#endif
}

/* Blocks of at least this many rows run on AMX tiles (when lbk_amx_ok and K >= 61): below,
 * the vpdpbusd tiles, which stream the weights as fast (see docs/kernels.md). */
static int lb_amx_min_rows = LB_AMX_MIN_ROWS;
/* The same for INT4 x INT8 (lbk_u4p_linear, group sizes 64 to 256 in steps of 64): from this
 * many rows on AMX tiles, below the vpdpbusd panels. */
static int lb_amx_u4_min_rows = LB_AMX_U4_MIN_ROWS;

/* Set a row threshold (rows >= 1; anything else only reads it) and return the previous one. */
static int set_min_rows(int *threshold, int rows) {
    const int old = *threshold;
    if (rows >= 1)
        *threshold = rows;
    return old;
}

/* The setters of those thresholds. Process-wide: for tests and measurements. */
int lbk_amx_min_rows(int rows) { return set_min_rows(&lb_amx_min_rows, rows); }
int lbk_amx_u4_min_rows(int rows) { return set_min_rows(&lb_amx_u4_min_rows, rows); }

/* ---------------------------------------------------------------- INT8 weight packing */

int64_t lbk_s8_packed_bytes(int64_t n, int64_t k) {
    if (n <= 0 || k <= 0 || n > (1LL << 31) || k > (1LL << 31))
        return LB_EARG;
    return ceil_div(n, 16) * (ceil_div(k, 4) * 64 + 16 * 4); /* panels, then int32 colsums */
}

/* Pack w [n, k] (row stride ldw >= k) into out (out_bytes == lbk_s8_packed_bytes(n, k)).
 * LB_ECODE when a code is -128 (the sign trick needs [-127, 127]). */
int lbk_s8_pack(const int8_t *w, int64_t n, int64_t k, int64_t ldw, int8_t *out,
                int64_t out_bytes) {
    const int64_t need = lbk_s8_packed_bytes(n, k);
    if (need < 0 || !w || !out || ldw < k || out_bytes != need)
        return LB_EARG;
    const int64_t k4 = ceil_div(k, 4);
    for (int64_t r = 0; r < n; ++r)
        for (int64_t j = 0; j < k; ++j)
            if (w[r * ldw + j] == -128)
                return LB_ECODE;
    memset(out, 0, (size_t)need);
    int32_t *colsum = (int32_t *)(out + ceil_div(n, 16) * k4 * 64); /* 4-byte aligned */
    for (int64_t r = 0; r < n; ++r) {
        int8_t *panel = out + (r / 16) * k4 * 64 + (r % 16) * 4;
        int32_t sum = 0;
        for (int64_t j = 0; j < k; ++j) {
            panel[(j / 4) * 64 + (j % 4)] = w[r * ldw + j];
            sum += w[r * ldw + j];
        }
        colsum[r] = sum;
    }
    return LB_OK;
}

/* ---------------------------------------------------------------- activation layout */

static inline float dyn_scale(float absmax, float qmax) { /* as lb_quantize_s8 */
    float s = absmax / qmax;
    return s < FLT_EPSILON ? FLT_EPSILON : s;
}

static inline float clampf(float v, float lo, float hi) {
    v = v < lo ? lo : v;
    return v > hi ? hi : v;
}

/* One row of x quantized to codes q [k]: clamp(round(x * (1 / s)) + zp, qmin, qmax), the bits
 * of lb_quantize_s8. */
static void quantize_row(const void *x, int kind, int64_t k, float inv, float zp, float lo,
                         float hi, int8_t *q) {
    if (kind == 1) {
        const uint16_t *xb = (const uint16_t *)x;
        for (int64_t j = 0; j < k; ++j)
            q[j] = (int8_t)(int32_t)clampf(nearbyintf(bf16_to_f32(xb[j]) * inv) + zp, lo, hi);
    } else {
        const float *xf = (const float *)x;
        for (int64_t j = 0; j < k; ++j)
            q[j] = (int8_t)(int32_t)clampf(nearbyintf(xf[j] * inv) + zp, lo, hi);
    }
}

/* How the rows of x become codes (lbk_s8_linear's arguments). */
typedef struct {
    const char *x;
    int64_t xrow; /* bytes between rows */
    int kind;     /* 0 float32, 1 bfloat16, 2 int8 codes */
    int64_t k;
    float *scale;
    int per_row, dynamic;
    const int32_t *zp;
    float lo, hi;
    int u7;
    const float *smooth; /* float32 rows only: x * smooth (per column) is quantized, or NULL */
} quant_t;

/* Bytes of scratch lay_out_block needs for rows of k (k4 steps): the laid-out rows, their step
 * lists (count + k4 steps each), the rows' codes and one smoothed float32 row. */
static size_t layout_bytes(int64_t rows, int64_t k, int64_t k4) {
    return (size_t)(rows * k4 * 8 + rows * (k4 + 1) * 4 + rows * k + k * 4 + 128);
}

/* x * smooth of one float32 row (the float32 products torch's x * smooth gives) into out. */
static void smooth_row(const float *x, const float *smooth, int64_t k, float *out) {
    for (int64_t j = 0; j < k; ++j)
        out[j] = x[j] * smooth[j];
}

/* Quantize rows [i0, i0 + rows) of x (dynamic scales written) and lay them out in buf (row
 * stride lda = k4 * 8) in the form of their activations: the 7-bit one (1), else the split one
 * (2) when chosen (see LB_SPLIT_PERMILLE; the rows' step lists follow them, stride k4 + 1:
 * count, steps), else the sign one (0). The codes go to scratch after the lists (kind 2: x's
 * rows are the codes), so each row is quantized once whichever form is chosen. Returns it. */
static int lay_out_block(const quant_t *qp, int64_t i0, int64_t rows, uint8_t *buf,
                         int64_t lda) {
    const int64_t k = qp->k, k4 = lda / 8, ldl = k4 + 1;
    int32_t *lst = (int32_t *)(buf + rows * lda);
    int8_t *codes = (int8_t *)(lst + rows * ldl);
    /* the smoothed row after the codes, 64-byte aligned */
    float *srow = (float *)(((uintptr_t)(codes + rows * k) + 63) & ~(uintptr_t)63);
    const int64_t ldq = qp->kind == 2 ? qp->xrow : k;
    const int8_t *q = qp->kind == 2 ? (const int8_t *)(qp->x + i0 * qp->xrow) : codes;
    for (int64_t r = 0; qp->kind != 2 && r < rows; ++r) {
        const int64_t i = i0 + r, ri = qp->per_row ? i : 0;
        const char *xr = qp->x + i * qp->xrow;
        if (qp->smooth) {
            smooth_row((const float *)xr, qp->smooth, k, srow);
            xr = (const char *)srow;
        }
        if (qp->dynamic && qp->per_row)
            qp->scale[i] = dyn_scale(row_absmax(xr, qp->kind, k), qp->hi);
        quantize_row(xr, qp->kind, k, 1.0f / qp->scale[ri], qp->zp ? (float)qp->zp[ri] : 0.0f,
                     qp->lo, qp->hi, codes + r * k);
    }
    const int mode = lb_split_mode;
    int form = qp->u7 ? 1 : 0;
    if (!qp->u7 && (mode == 1 || (mode < 0 && LB_SPLIT_PAYS))) {
        form = 2;
        if (mode < 0) {
            const int64_t limit = rows * k4 * LB_SPLIT_PERMILLE / 1000;
            int64_t listed = 0;
            for (int64_t r = 0; r < rows && listed <= limit; ++r)
                listed += count_split_steps(q + r * ldq, k);
            form = listed <= limit ? 2 : 0;
        }
    }
    for (int64_t r = 0; r < rows; ++r) {
        uint8_t *a = buf + r * lda;
        if (form == 2)
            lst[r * ldl] = (int32_t)layout_codes_split(q + r * ldq, k, a, lst + r * ldl + 1);
        else if (form == 1)
            layout_codes_u7(q + r * ldq, k, a);
        else
#if LB_U8_CODES
            layout_codes_u8(q + r * ldq, k, a);
#else
            layout_codes(q + r * ldq, k, a);
#endif
    }
    __atomic_fetch_or(&lb_forms_seen, 1 << form, __ATOMIC_RELAXED);
    return form;
}

/* ---------------------------------------------------------------- epilogue */

typedef struct {
    const int32_t *comp; /* [n] subtracted from the accumulator, or NULL */
    const int32_t *u7;   /* [n] colsum(w): off * colsum is subtracted (unsigned codes), or NULL */
    const float *sx;     /* [m] (per_row) or [1] */
    int per_row;
    const float *sw;     /* [n] */
    const float *bias;   /* [n] or NULL */
    int relu, fused;     /* fused: bias + v * s in one rounding (torch.addcmul with FMA) */
    void *y;
    int y_kind;          /* 0 float32, 1 bfloat16, 2 int32 accumulator (comp applied) */
    int64_t n;           /* row length of y */
    uint32_t off;        /* the unsigned codes' offset: 64 (7-bit, split) or 128 (8-bit) */
} epi_t;

/* acc [cols] of row i starting at column c0 -> y, the float ops of lb_epilogue in its order.
 * A float32 output is written in one pass from the int32 values (no float row in between). */
static inline __attribute__((always_inline)) void epilogue(const epi_t *e, int64_t i,
                                                             int64_t c0, int64_t cols,
                                                             const int32_t *acc) {
    const int32_t *comp = e->comp ? e->comp + c0 : NULL, *u7 = e->u7 ? e->u7 + c0 : NULL;
    int32_t a[64];
    if (comp || u7) {
        for (int64_t c = 0; c < cols; ++c) /* mod 2^32: the sum of u * w may wrap, q * w not */
            a[c] = (int32_t)((uint32_t)acc[c] - (uint32_t)(comp ? comp[c] : 0) -
                             (u7 ? e->off * (uint32_t)u7[c] : 0u));
        acc = a;
    }
    if (e->y_kind == 2) {
        memcpy((int32_t *)e->y + i * e->n + c0, acc, (size_t)cols * sizeof(int32_t));
        return;
    }
    const float s = e->sx[e->per_row ? i : 0];
    const float *restrict sw = e->sw + c0, *restrict b = e->bias ? e->bias + c0 : NULL;
    const int relu = e->relu;
    if (e->y_kind == 0) { /* one loop per case, as lowbit_kernels.c's epilogue_plane; y never
                           * overlaps the operands, and restrict lets the loops vectorize */
        const int32_t *restrict q = acc;
        float *restrict y = (float *)e->y + i * e->n + c0;
        if (!b) {
            for (int64_t c = 0; c < cols; ++c) {
                const float v = (float)q[c] * sw[c] * s;
                y[c] = relu && v < 0.0f ? 0.0f : v; /* torch.relu: NaN and -0 stay */
            }
        } else if (e->fused) {
            for (int64_t c = 0; c < cols; ++c) {
                const float v = fmaf((float)q[c] * sw[c], s, b[c]);
                y[c] = relu && v < 0.0f ? 0.0f : v;
            }
        } else {
            for (int64_t c = 0; c < cols; ++c) {
                const float v = b[c] + (float)q[c] * sw[c] * s;
                y[c] = relu && v < 0.0f ? 0.0f : v;
            }
        }
        return;
    }
    float v[64];
    for (int64_t c = 0; c < cols; ++c)
        v[c] = (float)acc[c] * sw[c];
    if (b) {
        if (e->fused)
            for (int64_t c = 0; c < cols; ++c)
                v[c] = fmaf(v[c], s, b[c]);
        else
            for (int64_t c = 0; c < cols; ++c)
                v[c] = b[c] + v[c] * s;
    } else {
        for (int64_t c = 0; c < cols; ++c)
            v[c] = v[c] * s;
    }
    uint16_t *y = (uint16_t *)e->y + i * e->n + c0;
    for (int64_t c = 0; c < cols; ++c)
        y[c] = f32_to_bf16(relu && v[c] < 0.0f ? 0.0f : v[c]);
}

#if LB_AMX
/* s8_block_t on AMX tiles (unsigned forms, k4 >= 16): 32 rows x 2 panels a tile, in
 * rows-outer or panels-outer order as s8_block_t. */
static void amx_block(const uint8_t *a, int64_t i0, int64_t rows, const int8_t *wpack,
                      int64_t k4, int64_t p0, int64_t p1, const epi_t *e, int rows_outer) {
    int32_t out[32 * 32];
    const int64_t lda = k4 * 8, pstride = k4 * 64;
    const int64_t nrt = ceil_div(rows, 32), npp = ceil_div(p1 - p0, 2);
    int cfg = -1; /* rows of the loaded configuration */
    for (int64_t t = 0; t < nrt * npp; ++t) {
        const int64_t r = 32 * (rows_outer ? t / npp : t % nrt);
        const int64_t p = p0 + 2 * (rows_outer ? t % npp : t / nrt);
        const int rr = (int)(rows - r < 32 ? rows - r : 32), P = p1 - p < 2 ? 1 : 2;
        if (rr != cfg) {
            amx_configure(rr < 16 ? rr : 16, rr < 16 ? 0 : rr - 16);
            cfg = rr;
        }
        amx_tile(a + r * lda, lda, rr, wpack + p * pstride, pstride, P, k4, out);
        const int64_t c0 = p * 16, cols = e->n - c0 < 16 * P ? e->n - c0 : 16 * P;
        for (int i = 0; i < rr; ++i)
            epilogue(e, i0 + r + i, c0, cols, out + i * 32);
    }
    amx_done();
}
#endif

/* Rows [i0, i0 + rows) of A (laid out by lay_out_block in form F, row stride k4 * 8, step
 * lists after the rows) times panels [p0, p1), tiles in rows-outer order when rows_outer (see
 * LB_ROWS_OUTER_BYTES); F constant (see s8_block), so that each form gets its own register
 * allocation. */
static inline __attribute__((always_inline)) void s8_block_t(const uint8_t *a, int64_t i0,
                                                              int64_t rows,
                                                              const int8_t *wpack, int64_t k4,
                                                              int64_t p0, int64_t p1,
                                                              const epi_t *e, const int F,
                                                              int rows_outer) {
    int32_t out[4 * 64];
    const int64_t lda = k4 * 8, pstride = k4 * 64, ldl = k4 + 1;
    const int32_t *lst = (const int32_t *)(a + rows * lda);
#if LB_AMX
    if (F != 2 && lb_amx_granted && k4 >= 16 && rows >= lb_amx_min_rows) {
        amx_block(a, i0, rows, wpack, k4, p0, p1, e, rows_outer);
        return;
    }
#endif
    if (rows == 1) { /* GEMV: the row streams up to 4 panels at once. From 2 rows the tiles
                      * below read each weight step once for all rows (a GEMV per row read the
                      * weights once per row: 2-3 rows 1.15-1.6x slower on 4096-wide layers) */
        for (int64_t p = p0; p < p1; p += 4) {
            const int np = (int)(p1 - p < 4 ? p1 - p : 4);
            s8_gemv(a, wpack + p * pstride, pstride, np, k4, F, lst, out);
            const int64_t c0 = p * 16, cols = (e->n - c0 < np * 16) ? e->n - c0 : np * 16;
            epilogue(e, i0, c0, cols, out);
        }
        return;
    }
    /* tile t of the row tiles x panel groups grid, rows-outer or panels-outer
     * (LB_ROWS_OUTER_BYTES); a group is one panel, or two where s8_tile2 takes the rows */
#if LB_PAIR_TILES
    const int pw = F != 2 && rows >= LB_PAIR_MIN_ROWS && rows <= LB_PAIR_MAX_ROWS ? 2 : 1;
#else
    const int pw = 1;
#endif
    const int64_t nrt = ceil_div(rows, LB_TILE_ROWS), npn = ceil_div(p1 - p0, pw);
    for (int64_t t = 0; t < nrt * npn; ++t) {
        const int64_t r = LB_TILE_ROWS * (rows_outer ? t / npn : t % nrt);
        const int64_t p = p0 + pw * (rows_outer ? t % npn : t / nrt);
        const int rr = (int)(rows - r < LB_TILE_ROWS ? rows - r : LB_TILE_ROWS);
#if LB_PAIR_TILES
        if (pw == 2 && p + 1 < p1 && rr >= LB_PAIR_MIN_ROWS) {
            const int64_t c0 = p * 16, cols = e->n - c0 < 32 ? e->n - c0 : 32;
            s8_tile2(a + r * lda, lda, rr, wpack + p * pstride, pstride, k4, F, out);
            for (int i = 0; i < rr; ++i)
                epilogue(e, i0 + r + i, c0, cols, out + i * 32);
            continue;
        }
#endif
        for (int64_t q = p; q < p1 && q < p + pw; ++q) { /* (a last single panel, few rows) */
            const int64_t c0 = q * 16, cols = e->n - c0 < 16 ? e->n - c0 : 16;
            s8_tile(a + r * lda, lda, rr, wpack + q * pstride, k4, F, lst + r * ldl, ldl, out);
            for (int i = 0; i < rr; ++i)
                epilogue(e, i0 + r + i, c0, cols, out + i * 16);
        }
    }
}

/* s8_block_t with the activation form fixed at compile time: a run-time flag inside the
 * micro-kernel loops made the 8-bit path 2.4x slower (4096 x 384 x 1536). The 7-bit and split
 * forms subtract 64 * colsum (colsum: stored after the panels), LB_U8_CODES's 8-bit form
 * 128 * colsum. */
static void s8_block(const uint8_t *a, int64_t i0, int64_t rows, const int8_t *wpack,
                     int64_t k4, int64_t p0, int64_t p1, const epi_t *e, int form,
                     const int32_t *colsum, int rows_outer) {
    epi_t ef = *e;
    ef.u7 = form || LB_U8_CODES ? colsum : NULL;
    ef.off = form ? 64u : 128u;
    if (form == 2)
        s8_block_t(a, i0, rows, wpack, k4, p0, p1, &ef, 2, rows_outer);
    else if (form == 1)
        s8_block_t(a, i0, rows, wpack, k4, p0, p1, &ef, 1, rows_outer);
    else
        s8_block_t(a, i0, rows, wpack, k4, p0, p1, &ef, 0, rows_outer);
}

/* The INT8 linear layer y = epilogue(q(x) . w^T), or the raw int32 accumulator.
 *
 * x: kind 0 float32 / 1 bfloat16 [m, k] with row stride ldx, quantized here as lb_quantize_s8
 *    does (scale: [m] per_row or [1]; dynamic: written from max|x|; zp: [m] / [1] or NULL);
 *    kind 2: int8 codes, used as they are (y_kind must then be 2).
 * x_bytes / y_bytes: how many bytes may be read at x / written at y (bounds check).
 * smooth: NULL, or k float32 per-column factors (kind 0 only: AWQ / SmoothQuant input
 *    smoothing): the rows quantized are x * smooth, the products torch's x * smooth gives.
 * wpack: lbk_s8_pack of the [n, k] weight (wpack_bytes of it). Returns LB_OK or LB_EARG /
 * LB_ENOMEM (nothing written). */
int lbk_s8_linear(const void *x, int kind, int64_t m, int64_t k, int64_t ldx, int64_t x_bytes,
                  float *scale, int per_row, int dynamic, const int32_t *zp, int32_t qmin,
                  int32_t qmax, const int8_t *wpack, int64_t wpack_bytes, int64_t n,
                  const int32_t *comp, const float *sw, const float *bias, int relu, int fused,
                  void *y, int y_kind, int64_t y_bytes, int nthreads, const float *smooth) {
    static const int64_t esize[3] = {4, 2, 1}, ysize[3] = {4, 2, 4};
    if (kind < 0 || kind > 2 || y_kind < 0 || y_kind > 2 || (kind == 2 && y_kind != 2) ||
        (smooth && kind != 0))
        return LB_EARG;
    if (m < 0 || k <= 0 || n <= 0 || ldx < k || nthreads < 1 || !wpack)
        return LB_EARG;
    if (wpack_bytes != lbk_s8_packed_bytes(n, k) || qmin < -128 || qmax > 127 || qmin > qmax)
        return LB_EARG;
    if (m == 0)
        return LB_OK;
    if (!x || !y || (m - 1) * ldx + k > x_bytes / esize[kind] || m * n > y_bytes / ysize[y_kind])
        return LB_EARG;
    if (y_kind != 2 && (!scale || !sw))
        return LB_EARG;
    if (kind != 2 && (!scale || (dynamic && zp)))
        return LB_EARG;
    const int64_t k4 = ceil_div(k, 4), np = ceil_div(n, 16), lda = k4 * 8;
    const float lo = (float)qmin, hi = (float)qmax;
    const char *xb = (const char *)x;
    const int64_t xrow = ldx * esize[kind];
    if (kind != 2 && dynamic && !per_row) { /* one scale for all rows first */
        uint32_t best = 0; /* bits of non-negative maxima: a NaN wins, as in torch.amax */
#pragma omp parallel for num_threads(nthreads) if (nthreads > 1 && m * k >= (1 << 15)) \
    reduction(max : best)
        for (int64_t i = 0; i < m; ++i) {
            const float v = smooth ? row_absmax_smooth((const float *)(xb + i * xrow), smooth, k)
                                   : row_absmax(xb + i * xrow, kind, k);
            uint32_t bits;
            memcpy(&bits, &v, sizeof bits);
            best = bits > best ? bits : best;
        }
        float amax;
        memcpy(&amax, &best, sizeof amax);
        scale[0] = dyn_scale(amax, hi);
    }
    /* activations of at most 7 bits: the cheaper unsigned form (see the top of this file) */
    const int u7 = kind != 2 && qmin >= -64 && qmax <= 63;
    const int32_t *colsum = (const int32_t *)(wpack + np * k4 * 64);
    const epi_t e = {comp, NULL, scale, per_row, sw, bias, relu, fused, y, y_kind, n};
    const quant_t qp = {xb, xrow, kind, k, scale, per_row, dynamic, zp, lo, hi, u7, smooth};
    int status = LB_OK;
    const int split_rows = m >= 2 * LB_ROW_BLOCK * nthreads || np < 2 * nthreads;
    if (split_rows) { /* each work item: quantize its rows, then every panel */
        int64_t rb = LB_ROW_BLOCK;
#if LB_AMX
        /* AMX tiles run a block of rows faster than its weights stream in: larger blocks (the
         * panels-outer order then reads the weights once per block), while each thread still
         * gets at least two */
        if (lb_amx_granted && k4 >= 16)
            while (rb < LB_AMX_ROW_BLOCK && m >= 4 * rb * nthreads)
                rb *= 2;
#endif
        const int64_t blocks = ceil_div(m, rb);
        const int rows_outer = np * k4 * 64 <= LB_ROWS_OUTER_BYTES;
#pragma omp parallel for num_threads(nthreads) if (nthreads > 1 && m * n * k >= (1 << 18)) \
    schedule(dynamic, 1)
        for (int64_t b = 0; b < blocks; ++b) {
            const int64_t i0 = b * rb;
            const int64_t rows = m - i0 < rb ? m - i0 : rb;
            uint8_t *buf = scratch(layout_bytes(rows, k, k4));
            if (!buf) {
#pragma omp atomic write
                status = LB_ENOMEM;
                continue;
            }
            const int form = lay_out_block(&qp, i0, rows, buf, lda);
            s8_block(buf, i0, rows, wpack, k4, 0, np, &e, form, colsum, rows_outer);
        }
        return status;
    }
    /* few rows: lay them all out once, then split the panels between threads */
    uint8_t *buf = scratch(layout_bytes(m, k, k4));
    if (!buf)
        return LB_ENOMEM;
    const int form = lay_out_block(&qp, 0, m, buf, lda);
    /* about 4 work items per thread, whole groups of 4 panels (the GEMV's streams) */
    const int64_t chunk = 4 * ceil_div(np, 16 * (int64_t)nthreads);
    const int64_t items = ceil_div(np, chunk);
#pragma omp parallel for num_threads(nthreads) if (nthreads > 1 && m * n * k >= (1 << 18)) \
    schedule(dynamic, 1)
    for (int64_t t = 0; t < items; ++t) {
        const int64_t p0 = t * chunk, p1 = p0 + chunk < np ? p0 + chunk : np;
        s8_block(buf, 0, m, wpack, k4, p0, p1, &e, form, colsum, 0);
    }
    return LB_OK;
}

/* ---------------------------------------------------------------- INT4 weights, float x */

/* y [m, n] (+ bias, ReLU) = x [m, k] (row stride ldx, x_floats readable) . W^T, W the INT4
 * weight wq (lbk layout above, n * kp / 2 bytes) with per-group scale s [n, kp / g] and
 * unsigned zero-point z [n, kp / g] (float32). kp % 32 == 0, g % 32 == 0, kp % g == 0,
 * k <= kp (x is read up to k, zero beyond). Returns LB_OK, LB_EARG or LB_ENOMEM. */
int lbk_u4_linear(const float *x, int64_t m, int64_t k, int64_t ldx, int64_t x_floats,
                  const uint8_t *wq, int64_t wq_bytes, int64_t n, int64_t kp, int64_t g,
                  const float *s, const float *z, const float *bias, int relu, float *y,
                  int64_t y_floats, int nthreads) {
    if (m < 0 || n <= 0 || k <= 0 || kp < k || g <= 0 || g % 32 || kp % g || ldx < k ||
        nthreads < 1 || !wq || !s || !z || wq_bytes != n * (kp / 2))
        return LB_EARG;
    if (m == 0)
        return LB_OK;
    if (!x || !y || (m - 1) * ldx + k > x_floats || m * n > y_floats)
        return LB_EARG;
    const int64_t groups = kp / g;
    /* x padded to kp with zeros, then the per-group sums of x */
    float *xp = (float *)scratch((size_t)(m * (kp + groups)) * sizeof(float));
    if (!xp)
        return LB_ENOMEM;
    float *xs = xp + m * kp;
    for (int64_t i = 0; i < m; ++i) {
        memcpy(xp + i * kp, x + i * ldx, (size_t)k * sizeof(float));
        memset(xp + i * kp + k, 0, (size_t)(kp - k) * sizeof(float));
        for (int64_t gi = 0; gi < groups; ++gi) {
            float t = 0.0f;
            for (int64_t j = 0; j < g; ++j)
                t += xp[i * kp + gi * g + j];
            xs[i * groups + gi] = t;
        }
    }
    const int64_t pairs = ceil_div(n, 2);
#pragma omp parallel for num_threads(nthreads) if (nthreads > 1 && m * n * kp >= (1 << 18)) \
    schedule(dynamic, 16)
    for (int64_t pr = 0; pr < pairs; ++pr) {
        const int64_t r0 = pr * 2, nr = n - r0 < 2 ? n - r0 : 2;
        for (int64_t i = 0; i < m; i += 4) {
            const int rows = (int)(m - i < 4 ? m - i : 4);
            float out[4][2];
            u4_rows(xp + i * kp, kp, rows, wq + r0 * (kp / 2), kp, g, s + r0 * groups, out,
                    (int)nr);
            for (int t = 0; t < rows; ++t)
                for (int64_t c = 0; c < nr; ++c) {
                    float v = out[t][c];
                    const float *zr = z + (r0 + c) * groups, *sr = s + (r0 + c) * groups;
                    const float *xsr = xs + (i + t) * groups;
                    for (int64_t gi = 0; gi < groups; ++gi)
                        v -= sr[gi] * zr[gi] * xsr[gi];
                    if (bias)
                        v += bias[r0 + c];
                    if (relu)
                        v = v < 0.0f ? 0.0f : v;
                    y[(i + t) * n + r0 + c] = v;
                }
        }
    }
    return LB_OK;
}

/* ---------------------------------------------------------------- INT4 panels, INT8 x */

/* A group's max|x| at or above this is quantized; a smaller non-zero one (its reciprocal would
 * overflow) or a NaN / Inf makes the row's outputs come from its float values. */
#define U4Q8_TINY 1e-30f

/* Row x [k] (zero up to kp) as int8 codes per weight group: q = round(x * 127 / max|x_g|),
 * sx_g = max|x_g| / 127 and tq_g = sx_g * sum_g(q); 1 when it cannot be (see U4Q8_TINY).
 * smooth: NULL, or k factors: the row quantized is x * smooth (the float32 products). */
static int quant_row_groups(const float *x, const float *smooth, int64_t k, int64_t kp,
                            int64_t g, int8_t *q, float *sx, float *tq) {
    for (int64_t gi = 0, j0 = 0; j0 < kp; ++gi, j0 += g) {
        const int64_t j1 = j0 + g < k ? j0 + g : k;
        const float amax = j1 <= j0 ? 0.0f
                           : smooth ? row_absmax_smooth(x + j0, smooth + j0, j1 - j0)
                                    : row_absmax(x + j0, 0, j1 - j0);
        if (!(amax <= FLT_MAX) || (amax > 0.0f && amax < U4Q8_TINY))
            return 1;
        const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        int32_t sum = 0;
        int64_t j = j0;
        if (smooth) {
            for (; j < j1; ++j) {
                const int32_t v =
                    (int32_t)clampf(nearbyintf((x[j] * smooth[j]) * inv), -127.0f, 127.0f);
                q[j] = (int8_t)v;
                sum += v;
            }
        }
        for (; j < j1; ++j) {
            const int32_t v = (int32_t)clampf(nearbyintf(x[j] * inv), -127.0f, 127.0f);
            q[j] = (int8_t)v;
            sum += v;
        }
        for (; j < j0 + g; ++j)
            q[j] = 0;
        sx[gi] = amax / 127.0f;
        tq[gi] = sx[gi] * (float)sum;
    }
    return 0;
}

/* INT4 weights in 8-column panels for lbk_u4p_linear: per panel p and 8-K pair t, 32 bytes
 * b = c * 4 + j holding u[8p + c][8t + j] (low nibble) and u[8p + c][8t + 4 + j] (high
 * nibble): the low nibbles of a pair are one 4-K step of 8 columns in the order of the INT8
 * panels, the high nibbles the next. */
int64_t lbk_u4p_bytes(int64_t n, int64_t kp) {
    if (n <= 0 || kp <= 0 || kp % 32 || n > (1LL << 31) || kp > (1LL << 31))
        return LB_EARG;
    return ceil_div(n, 8) * (kp / 8) * 32;
}

/* The INT4 scales (float32) and unsigned zero-points (bytes) of lbk_u4p_linear, pair-major:
 * [ceil(n / 16)][kp / g][16], so a pair of 8-column panels reads its groups' values as two
 * sequential streams (64 + 16 bytes a group) beside its weights. The offset of panel p's 8
 * values for group gi: */
static inline int64_t u4_qp_at(int64_t p, int64_t gi, int64_t groups) {
    return ((p >> 1) * groups + gi) * 16 + (p & 1) * 8;
}

/* Row i's outputs from the float values (a row with NaN / Inf / tiny groups): the dequantized
 * weight times x in float32, as the reference computes it, read from the panel layout. */
static void u4p_row_float(const float *x, int64_t k, const uint8_t *wp, int64_t n, int64_t kp,
                          int64_t g, const float *sT, const uint8_t *zT, const float *bias,
                          int relu, float *y) {
    const int64_t groups = kp / g, pstride = (kp / 8) * 32;
    for (int64_t c = 0; c < n; ++c) {
        const uint8_t *pan = wp + (c / 8) * pstride + (c % 8) * 4;
        float acc = 0.0f;
        for (int64_t j = 0; j < k; ++j) {
            const uint8_t b = pan[(j / 8) * 32 + (j % 4)];
            const int32_t u = (j % 8) < 4 ? (b & 0xF) : (b >> 4);
            const int64_t at = u4_qp_at(c / 8, j / g, groups) + c % 8;
            acc += x[j] * (((float)u - (float)zT[at]) * sT[at]);
        }
        if (bias)
            acc += bias[c];
        y[c] = relu && acc < 0.0f ? 0.0f : acc;
    }
}

#if LB_AMX
/* Rows of at most this many per AMX work item of lbk_u4p_linear (float sums on the stack). */
#define LB_AMX_U4_ROWS 128

/* lbk_u4p_linear's GEMM on AMX tiles (g in 64, 128, 192, 256; q holds whole 32-row tiles, zero
 * beyond m):
 * work items of up to LB_AMX_U4_ROWS rows x quads of panels (32 columns); per quad and group
 * the group's B tiles are unpacked once, every 32-row tile of the item runs them, and its sums
 * are added in float as u4p_rp512 adds them, so the outputs are its bits. */
static void u4p_amx(const int8_t *q, int64_t ldq, int64_t m, const uint8_t *wp, int64_t pstride,
                    int64_t np, int64_t n, int64_t kp, int64_t g, const float *sT,
                    const uint8_t *zT, const float *sx, const float *tq,
                    int64_t groups, const float *bias, int relu, float *y, int nthreads) {
    const int64_t nrb = ceil_div(m, LB_AMX_U4_ROWS), nq = ceil_div(np, 4);
    const int64_t want = 4 * (int64_t)nthreads; /* work items wanted */
    int64_t cq = nrb >= want ? nq : ceil_div(nq, ceil_div(want, nrb));
    cq = cq < 1 ? 1 : cq;
    const int64_t ncq = ceil_div(nq, cq);
    const int nch = (int)(g / 64);
#pragma omp parallel for num_threads(nthreads) if (nthreads > 1 && m * n * kp >= (1 << 18)) \
    schedule(dynamic, 1)
    for (int64_t item = 0; item < nrb * ncq; ++item) {
        float acc[LB_AMX_U4_ROWS][32];
        int32_t d[32 * 32];
        uint8_t b[4 * 2048] __attribute__((aligned(64))); /* (not scratch(): it holds q) */
        const int64_t i0 = (item / ncq) * LB_AMX_U4_ROWS;
        const int64_t i1 = i0 + LB_AMX_U4_ROWS < m ? i0 + LB_AMX_U4_ROWS : m;
        const int64_t q0 = (item % ncq) * cq, q1 = q0 + cq < nq ? q0 + cq : nq;
        amx_configure(16, 16);
        for (int64_t pq = q0 * 4; pq < q1 * 4; pq += 4) {
            const int npan = (int)(np - pq < 4 ? np - pq : 4);
            memset(acc, 0, sizeof acc);
            for (int64_t gi = 0; gi < groups; ++gi) {
                for (int ch = 0; ch < nch; ++ch)
                    for (int h = 0; h < 2; ++h)
                        amx_u4_unpack(2 * h < npan ? wp + (pq + 2 * h) * pstride : NULL,
                                      2 * h + 1 < npan ? wp + (pq + 2 * h + 1) * pstride : NULL,
                                      (gi * g + 64 * ch) / 8, b + 2048 * ch + 1024 * h);
                const float *sj[4]; /* the 4 panels' values of this group */
                const uint8_t *zj[4];
                for (int j = 0; j < npan; ++j) {
                    sj[j] = sT + u4_qp_at(pq + j, gi, groups);
                    zj[j] = zT + u4_qp_at(pq + j, gi, groups);
                }
                for (int64_t r0 = i0; r0 < i1; r0 += 32) {
                    amx_u4_tile(q + r0 * ldq, ldq, gi * g, b, nch, d);
                    const int64_t rr = i1 - r0 < 32 ? i1 - r0 : 32;
                    for (int64_t r = 0; r < rr; ++r)
                        for (int j = 0; j < npan; ++j)
                            amx_u4_accumulate(acc[r0 - i0 + r] + 8 * j, d + r * 32 + 8 * j,
                                              sj[j], zj[j], sx[(r0 + r) * groups + gi],
                                              tq[(r0 + r) * groups + gi]);
                }
            }
            const int64_t c0 = pq * 8, cols = n - c0 < 32 ? n - c0 : 32;
            for (int64_t i = i0; i < i1; ++i) {
                float *yr = y + i * n + c0;
                for (int64_t c = 0; c < cols; ++c) {
                    float v = acc[i - i0][c] + (bias ? bias[c0 + c] : 0.0f);
                    yr[c] = relu && v < 0.0f ? 0.0f : v;
                }
            }
        }
        amx_done();
    }
}
#endif

/* y [m, n] (+ bias, ReLU) = x [m, k] (row stride ldx, x_floats readable) . W^T, W the INT4
 * weight in panels (wp, lbk_u4p_bytes(n, kp) bytes) with per-group scales sT and unsigned
 * zero-points zT (bytes), both pair-major ([ceil(n / 16)][kp / g][16], u4_qp_at).
 * The activations are quantized to int8 per row and weight group (scale max|x_g| / 127, as
 * llama.cpp's Q8 blocks) and each group's dot product is taken in integers: u4 (unsigned) x
 * q8 (signed) pair sums (vpmaddubsw, at most 2 * 15 * 127: exact) summed in int16 over 32 K,
 *   y = sum_g s_g * sx_g * (dot_g(u, q) - z_g * sum_g(q)),
 * with the columns in vector lanes (no horizontal sums). Differs from dequantize + GEMM by the
 * activation rounding (about 5e-3 relative on Gaussian inputs); a row with a NaN / Inf (or a
 * group max below 1e-30) is computed from its float values instead. With AMX (groups of 64 to
 * 256, from lb_amx_u4_min_rows rows) u4p_amx runs the same sums on tiles: the same bits.
 * lbk_u4p_linear_s: the same with k float32 factors smooth (AWQ input smoothing): the rows
 * computed are x * smooth, the float32 products torch's x * smooth gives. */
static int u4p_linear(const float *x, int64_t m, int64_t k, int64_t ldx, int64_t x_floats,
                      const uint8_t *wp, int64_t wp_bytes, int64_t n, int64_t kp, int64_t g,
                      const float *sT, const uint8_t *zT, const float *bias, int relu, float *y,
                      int64_t y_floats, int nthreads, const float *smooth);

int lbk_u4p_linear(const float *x, int64_t m, int64_t k, int64_t ldx, int64_t x_floats,
                   const uint8_t *wp, int64_t wp_bytes, int64_t n, int64_t kp, int64_t g,
                   const float *sT, const uint8_t *zT, const float *bias, int relu, float *y,
                   int64_t y_floats, int nthreads) {
    return u4p_linear(x, m, k, ldx, x_floats, wp, wp_bytes, n, kp, g, sT, zT, bias, relu, y,
                      y_floats, nthreads, NULL);
}

int lbk_u4p_linear_s(const float *x, int64_t m, int64_t k, int64_t ldx, int64_t x_floats,
                     const uint8_t *wp, int64_t wp_bytes, int64_t n, int64_t kp, int64_t g,
                     const float *sT, const uint8_t *zT, const float *bias, int relu, float *y,
                     int64_t y_floats, int nthreads, const float *smooth) {
    if (!smooth)
        return LB_EARG;
    return u4p_linear(x, m, k, ldx, x_floats, wp, wp_bytes, n, kp, g, sT, zT, bias, relu, y,
                      y_floats, nthreads, smooth);
}

static int u4p_linear(const float *x, int64_t m, int64_t k, int64_t ldx, int64_t x_floats,
                      const uint8_t *wp, int64_t wp_bytes, int64_t n, int64_t kp, int64_t g,
                      const float *sT, const uint8_t *zT, const float *bias, int relu, float *y,
                      int64_t y_floats, int nthreads, const float *smooth) {
    if (m < 0 || n <= 0 || k <= 0 || kp < k || g <= 0 || g % 32 || kp % g || ldx < k ||
        nthreads < 1 || !wp || !sT || !zT || wp_bytes != lbk_u4p_bytes(n, kp))
        return LB_EARG;
    if (m == 0)
        return LB_OK;
    if (!x || !y || (m - 1) * ldx + k > x_floats || m * n > y_floats)
        return LB_EARG;
    const int64_t groups = kp / g, np = ceil_div(n, 8), pstride = (kp / 8) * 32;
#if LB_AMX
    const int amx = lb_amx_granted && g % 64 == 0 && g <= 256 && m >= lb_amx_u4_min_rows;
#else
    const int amx = 0;
#endif
    const int64_t mq = amx ? ceil_div(m, 32) * 32 : m; /* AMX reads whole 16-row tiles */
    const size_t qbytes = (size_t)(mq * kp + 63) & ~(size_t)63;
    uint8_t *buf = scratch(qbytes + (size_t)(2 * m * groups) * sizeof(float) + m);
    if (!buf)
        return LB_ENOMEM;
    int8_t *q = (int8_t *)buf;
    float *sx = (float *)(buf + qbytes), *tq = sx + m * groups;
    uint8_t *bad = (uint8_t *)(tq + m * groups);
    float *xs = NULL; /* a smoothed row, for the float rows of a smoothed call */
#pragma omp parallel for num_threads(nthreads) if (nthreads > 1 && m * kp >= (1 << 16))
    for (int64_t i = 0; i < m; ++i)
        bad[i] = (uint8_t)quant_row_groups(x + i * ldx, smooth, k, kp, g, q + i * kp,
                                           sx + i * groups, tq + i * groups);
#if LB_AMX
    if (amx) {
        memset(q + m * kp, 0, (size_t)((mq - m) * kp));
        u4p_amx(q, kp, m, wp, pstride, np, n, kp, g, sT, zT, sx, tq, groups, bias, relu, y,
                nthreads);
        goto float_rows;
    }
#endif
    /* work items: blocks of rows (codes ~128 KB, in L2 while each panel is read once into L1
     * for all of them) x chunks of panels, >= 4 per thread where the shape allows */
    int64_t rb = m <= 4 ? m : (131072 / kp) & ~(int64_t)3;
    rb = rb < 4 ? 4 : rb > m ? m : rb;
    const int64_t nrb = ceil_div(m, rb);
    int64_t cb = ceil_div(np * nrb, 4 * (int64_t)nthreads);
    cb = cb < 2 ? 2 : cb > 64 ? 64 : cb;
    cb += cb & 1; /* whole pairs of panels */
    const int64_t ncb = ceil_div(np, cb);
#pragma omp parallel for num_threads(nthreads) if (nthreads > 1 && m * n * kp >= (1 << 18)) \
    schedule(dynamic, 1)
    for (int64_t item = 0; item < nrb * ncb; ++item) {
        const int64_t i0 = (item / ncb) * rb, i1 = i0 + rb < m ? i0 + rb : m;
        const int64_t p0 = (item % ncb) * cb, p1 = p0 + cb < np ? p0 + cb : np;
        const int pmax = LB_U4_WIDE_TILES || i1 - i0 <= 2 ? 2 : 1;
        for (int64_t p = p0; p < p1; p += pmax) {
            const int npan = (int)(p1 - p < pmax ? p1 - p : pmax);
            for (int64_t i = i0; i < i1; i += 4) {
                const int rows = (int)(i1 - i < 4 ? i1 - i : 4);
                float out[4 * 16];
                u4p_tile(q + i * kp, kp, rows, wp + p * pstride, pstride, npan, kp, g,
                         sT + u4_qp_at(p, 0, groups), zT + u4_qp_at(p, 0, groups), 16,
                         sx + i * groups, tq + i * groups, groups,
                         out);
                const int64_t c0 = p * 8, cols = n - c0 < npan * 8 ? n - c0 : npan * 8;
                for (int t = 0; t < rows; ++t) {
                    float *yr = y + (i + t) * n + c0;
                    const float *o = out + t * 16;
                    for (int64_t c = 0; c < cols; ++c) {
                        float v = o[c] + (bias ? bias[c0 + c] : 0.0f);
                        yr[c] = relu && v < 0.0f ? 0.0f : v;
                    }
                }
            }
        }
    }
#if LB_AMX
float_rows:
#endif
    for (int64_t i = 0; i < m; ++i) { /* NaN / Inf / tiny rows: from the float values */
        if (!bad[i])
            continue;
        const float *xr = x + i * ldx;
        if (smooth) {
            if (!xs && !(xs = (float *)malloc((size_t)k * sizeof(float))))
                return LB_ENOMEM;
            smooth_row(xr, smooth, k, xs);
            xr = xs;
        }
        u4p_row_float(xr, k, wp, n, kp, g, sT, zT, bias, relu, y + i * n);
    }
    free(xs);
    return LB_OK;
}

/* --------------------------------------------------------- LSTM / GRU / RNN recurrence */

/* exp(x) for the gates, written so the compiler vectorizes it (Cephes' expf: Cody-Waite
 * reduction by ln 2 and a degree-6 polynomial, about 1 ulp; PyTorch's Sleef exp is also about
 * 1 ulp, so the two differ in the last bit now and then). */
static inline float gate_exp(float x) {
    x = x < -87.0f ? -87.0f : x; /* NaN stays NaN */
    x = x > 88.0f ? 88.0f : x;
    const float t = x * 1.44269504088896341f;
    const float n = (t + 12582912.0f) - 12582912.0f; /* round to nearest (|t| < 2^22) */
    const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

static inline float gate_sigmoid(float x) { return 1.0f / (1.0f + gate_exp(-x)); }

/* tanh(x) = 2 sigmoid(2x) - 1 (absolute error ~1e-7; the gates only ever use it absolutely) */
static inline float gate_tanh(float x) { return 2.0f / (1.0f + gate_exp(-2.0f * x)) - 1.0f; }

/* LSTM gates of one row: g [4 hid] (the hidden GEMM) + x (the input projection), c updated
 * in place, h written to y. FUSED (constant): a + b * c in one rounding, as torch.addcmul. */
static inline __attribute__((always_inline)) void lstm_gates(const float *restrict g,
                                                             const float *restrict x,
                                                             int64_t hid, float *restrict c,
                                                             float *restrict y,
                                                             const int FUSED) {
#pragma omp simd
    for (int64_t j = 0; j < hid; ++j) {
        const float si = gate_sigmoid(g[j] + x[j]);
        const float sf = gate_sigmoid(g[hid + j] + x[hid + j]);
        const float tg = gate_tanh(g[2 * hid + j] + x[2 * hid + j]);
        const float so = gate_sigmoid(g[3 * hid + j] + x[3 * hid + j]);
        const float fc = sf * c[j];
        const float cn = FUSED ? fmaf(si, tg, fc) : fc + si * tg;
        c[j] = cn;
        y[j] = so * gate_tanh(cn);
    }
}

/* GRU gates of one row: g [3 hid] (the hidden GEMM, with its bias) and x (the input
 * projection), h the previous state; the new state written to y. */
static inline __attribute__((always_inline)) void gru_gates(const float *restrict g,
                                                            const float *restrict x,
                                                            int64_t hid,
                                                            const float *restrict h,
                                                            float *restrict y,
                                                            const int FUSED) {
#pragma omp simd
    for (int64_t j = 0; j < hid; ++j) {
        const float r = gate_sigmoid(g[j] + x[j]);
        const float z = gate_sigmoid(g[hid + j] + x[hid + j]);
        const float nn = gate_tanh(FUSED ? fmaf(r, g[2 * hid + j], x[2 * hid + j])
                                         : x[2 * hid + j] + r * g[2 * hid + j]);
        const float d = h[j] - nn;
        y[j] = FUSED ? fmaf(z, d, nn) : nn + z * d;
    }
}

/* Elman RNN of one row: h = tanh(hh + x) (RELU 0) or relu(hh + x) (RELU 1). */
static inline __attribute__((always_inline)) void rnn_gates(const float *restrict g,
                                                            const float *restrict x,
                                                            int64_t hid, float *restrict y,
                                                            const int RELU) {
#pragma omp simd
    for (int64_t j = 0; j < hid; ++j) {
        const float v = g[j] + x[j];
        y[j] = RELU ? (v > 0.0f ? v : (v == v ? 0.0f : v)) : gate_tanh(v); /* NaN stays NaN */
    }
}

/* One direction of one LSTM (kind 0), GRU (kind 1) or Elman RNN (kind 2: tanh, 3: relu) layer
 * over packed time-major steps, the whole recurrence in one call (the Python loop costs ~25 us
 * of op dispatch per step).
 *
 * spans [nsteps][2]: step t reads rows o .. o + b of gx [rows, G * hid] (the input projection
 * with its bias, G = 4 for LSTM / 3 for GRU / 1 for RNN) and writes them in out [rows, hid];
 * it updates
 * the first b of the batch rows of h [batch, hid] (and c, LSTM); gx_floats, state_floats (h
 * and c each) and out_floats are the sizes of those buffers. Each step's hidden GEMM is
 * lbk_s8_linear on h (dynamic per-row codes in [qmin, qmax], the packed weight [G * hid, hid],
 * w_scale sw, bias: exact, the layer's own GEMM); the gates then follow nn.LSTM / nn.GRU:
 *   LSTM: g = hh + gx; c = s(f) c + s(i) tanh(g); h = s(o) tanh(c)
 *   GRU:  r, z = s(hh_rz + gx_rz); n = tanh(gx_n + r hh_n); h = n + z (h - n)
 *   RNN:  h = tanh(hh + gx) or relu(hh + gx)
 * Returns LB_OK, LB_EARG (nothing written) or LB_ENOMEM. */
int lbk_rnn_scan(int kind, const float *gx, int64_t gx_floats, int64_t rows, int64_t hid,
                 const int64_t *spans, int64_t nsteps, float *h, float *c, int64_t state_floats,
                 int64_t batch, const int8_t *wpack, int64_t wpack_bytes, const float *sw,
                 const float *bias, int fused, int32_t qmin, int32_t qmax, float *out,
                 int64_t out_floats, int nthreads) {
    if (kind < 0 || kind > 3 || rows < 0 || hid <= 0 || hid > (1LL << 24) || nsteps < 0 ||
        batch <= 0 || batch > (1LL << 24) || rows > (1LL << 40) || nthreads < 1 || !wpack ||
        !sw || qmin < -128 || qmax > 127 || qmin > qmax)
        return LB_EARG;
    if (nsteps > 0 && (!gx || !h || !out || !spans || (kind == 0 && !c)))
        return LB_EARG; /* (no step: empty buffers may come as NULL) */
    const int64_t G = kind == 0 ? 4 : kind == 1 ? 3 : 1, n = G * hid;
    /* every buffer at least as large as the shapes claim (gx [rows, n], h / c [batch, hid],
     * out [rows, hid]): nothing is read or written past what the caller gave */
    if (wpack_bytes != lbk_s8_packed_bytes(n, hid) || gx_floats < rows * n ||
        state_floats < batch * hid || out_floats < rows * hid)
        return LB_EARG;
    for (int64_t t = 0; t < nsteps; ++t) {
        const int64_t o = spans[2 * t], b = spans[2 * t + 1];
        if (o < 0 || b < 1 || b > batch || o > rows - b)
            return LB_EARG;
    }
    float *gates = (float *)malloc((size_t)(batch * n + batch) * sizeof(float));
    if (!gates)
        return LB_ENOMEM;
    float *scale = gates + batch * n;
    int status = LB_OK;
    for (int64_t t = 0; t < nsteps && status == LB_OK; ++t) {
        const int64_t o = spans[2 * t], b = spans[2 * t + 1];
        status = lbk_s8_linear(h, 0, b, hid, hid, b * hid * 4, scale, 1, 1, NULL, qmin, qmax,
                               wpack, wpack_bytes, n, NULL, sw, bias, 0, fused, gates, 0,
                               b * n * 4, nthreads, NULL);
        for (int64_t r = 0; r < b && status == LB_OK; ++r) {
            const float *x = gx + (o + r) * n;
            float *yr = out + (o + r) * hid;
            if (kind == 0 && fused)
                lstm_gates(gates + r * n, x, hid, c + r * hid, yr, 1);
            else if (kind == 0)
                lstm_gates(gates + r * n, x, hid, c + r * hid, yr, 0);
            else if (kind == 1 && fused)
                gru_gates(gates + r * n, x, hid, h + r * hid, yr, 1);
            else if (kind == 1)
                gru_gates(gates + r * n, x, hid, h + r * hid, yr, 0);
            else
                rnn_gates(gates + r * n, x, hid, yr, kind == 3);
            memcpy(h + r * hid, yr, (size_t)hid * sizeof(float));
        }
    }
    free(gates);
    return status;
}
