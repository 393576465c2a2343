/* lowbit kernels for AVX2 + FMA CPUs (Haswell / Zen 1 and later): exact INT8 x INT8 with the
 * sign trick, and INT4 weights unpacked in registers. Compiled with -mavx2 -mfma -mf16c.
 * Compiled again with AVX-512 VNNI (+ VL) enabled, the same kernels become the avx512_vnni ISA
 * path: every 4-code dot product is one vpdpbusd (u8 x s8 summed into int32, no int16 pair
 * sums: exact for every code), and 8-bit activations take the unsigned form q + 128 (no sign
 * op; 128 * colsum(w) is subtracted), as cheap as 7-bit ones.
 * Compiled a third time with AMX (-mamx-tile -mamx-int8), the unsigned forms run on AMX tiles
 * (tdpbusd: 16 x 16 x 64 u8 x s8 products into int32, exact; K after the last whole tile with
 * vpdpbusd), and INT4 x INT8 panels too (tdpbsud): the amx ISA path.
 * The driver (bounds checks, layouts, threads, epilogue) is lowbit_gemm.h. */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>
#if defined(__AMX_TILE__) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#if defined(__AMX_TILE__) && defined(__AMX_INT8__)
/* compiled a third time with AMX enabled: the same kernels plus AMX tiles (amx_tile32) */
#define LB_ISA "amx"
#define LB_AMX 1
#else
#define LB_ISA "avx512_vnni"
#endif
/* 8-bit activation codes are laid out as u = q + 128 (see lowbit_gemm.h) */
#define LB_U8_CODES 1
/* the split form saves nothing here: the unsigned form has no sign op to save */
#define LB_SPLIT_PAYS 0
/* INT4 tiles of 3-4 rows read two panels too (32 zmm registers hold them) */
#define LB_U4_WIDE_TILES 1
/* acc + the 4-code dot products of u (unsigned) and w (signed) per int32 lane: exact */
#define DOT_U(acc, u, w) _mm256_dpbusd_epi32((acc), (u), (w))
#else
#define LB_ISA "avx2"
#define LB_U8_CODES 0
/* the split form of 8-bit activations pays off here (see lowbit_gemm.h) */
#define LB_SPLIT_PAYS 1
/* the same with vpmaddubsw (int16 pair sums: exact while they stay <= 32767) + vpmaddwd */
#define DOT_U(acc, u, w)                                                                       \
    _mm256_add_epi32((acc), _mm256_madd_epi16(_mm256_maddubs_epi16((u), (w)),                   \
                                              _mm256_set1_epi16(1)))
#endif

/* 8 unsigned zero-points (bytes) as floats: exact */
static inline __m256 u4_zero_points(const uint8_t *z) {
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)z)));
}

/* acc + 32 MACs of one activation row (4 codes, broadcast) against 8 columns of a panel step:
 * |a| (u8) x (w with a's sign) (s8): every pair sum <= 2 * 128 * 127 = 32512, exact. */
static inline __m256i dot4(__m256i acc, __m256i abs_a, __m256i sgn_a, __m256i w) {
    return DOT_U(acc, abs_a, _mm256_sign_epi8(w, sgn_a));
}

/* one row of codes q [k] as unsigned u = q + off (mod 256), 4 bytes per step, no zero half
 * (the avx512_vnni unsigned forms: their 512-bit kernels read 4 bytes per row and step; zero
 * tail: u = 0) */
static void layout_compact(const int8_t *q, int64_t k, uint8_t *a, int off) {
    const __m256i o = _mm256_set1_epi8((char)off);
    int64_t j = 0;
    for (; j + 32 <= k; j += 32)
        _mm256_storeu_si256((__m256i *)(a + j),
                            _mm256_add_epi8(_mm256_loadu_si256((const __m256i *)(q + j)), o));
    for (; j < k; ++j)
        a[j] = (uint8_t)(q[j] + off);
    for (; j % 4; ++j)
        a[j] = 0;
}

/* one row of 8-bit codes q [k] as u = q + 128 (the avx512_vnni form of 8-bit codes) */
static void layout_codes_u8(const int8_t *q, int64_t k, uint8_t *a) {
    layout_compact(q, k, a, 128);
}

/* one row of codes q [k] as {|q[4s..4s+3]|, q[4s..4s+3]} per step s (zero tail); |-128| is
 * 0x80, read as the unsigned 128 */
static void layout_codes(const int8_t *q, int64_t k, uint8_t *a) {
    int64_t j = 0;
    for (; j + 32 <= k; j += 32, a += 64) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)(q + j)), m = _mm256_abs_epi8(v);
        const __m256i lo = _mm256_unpacklo_epi32(m, v), hi = _mm256_unpackhi_epi32(m, v);
        _mm256_storeu_si256((__m256i *)a, _mm256_permute2x128_si256(lo, hi, 0x20));
        _mm256_storeu_si256((__m256i *)(a + 32), _mm256_permute2x128_si256(lo, hi, 0x31));
    }
    for (; j < k; j += 4, a += 8)
        for (int t = 0; t < 4; ++t) {
            const int8_t v = j + t < k ? q[j + t] : 0;
            a[t] = (uint8_t)(v < 0 ? -(int32_t)v : v);
            a[4 + t] = (uint8_t)v;
        }
}

/* one row of 7-bit codes q [k] (in [-64, 63]) as {q + 64, 0} per step s (zero tail: u = 0) */
static void layout_codes_u7(const int8_t *q, int64_t k, uint8_t *a) {
#if LB_U8_CODES
    layout_compact(q, k, a, 64); /* (the avx512_vnni layout: q + 64 only) */
#else
    const __m256i off = _mm256_set1_epi8(64), zero = _mm256_setzero_si256();
    int64_t j = 0;
    for (; j + 32 <= k; j += 32, a += 64) {
        const __m256i u = _mm256_add_epi8(_mm256_loadu_si256((const __m256i *)(q + j)), off);
        const __m256i lo = _mm256_unpacklo_epi32(u, zero), hi = _mm256_unpackhi_epi32(u, zero);
        _mm256_storeu_si256((__m256i *)a, _mm256_permute2x128_si256(lo, hi, 0x20));
        _mm256_storeu_si256((__m256i *)(a + 32), _mm256_permute2x128_si256(lo, hi, 0x31));
    }
    for (; j < k; j += 4, a += 8)
        for (int t = 0; t < 4; ++t) {
            a[t] = j + t < k ? (uint8_t)(q[j + t] + 64) : 0;
            a[4 + t] = 0;
        }
#endif
}

/* one row of 8-bit codes q [k] in the split form {c + 64, r} per step s, c = clamp(q, -64, 63)
 * (the dense 7-bit part) and r = q - c in [-64, 64] (zero for most codes); the steps whose r
 * is not all zero are listed in idx. Returns how many (zero tail: u = 0, r = 0). */
static int64_t layout_codes_split(const int8_t *q, int64_t k, uint8_t *a, int32_t *idx) {
    const __m256i off = _mm256_set1_epi8(64), lo7 = _mm256_set1_epi8(-64);
    const __m256i hi7 = _mm256_set1_epi8(63), zero = _mm256_setzero_si256();
    int64_t j = 0, n = 0;
    for (; j + 32 <= k; j += 32, a += 64) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)(q + j));
        const __m256i c = _mm256_min_epi8(_mm256_max_epi8(v, lo7), hi7);
        const __m256i r = _mm256_sub_epi8(v, c), u = _mm256_add_epi8(c, off);
        const __m256i lo = _mm256_unpacklo_epi32(u, r), hi = _mm256_unpackhi_epi32(u, r);
        _mm256_storeu_si256((__m256i *)a, _mm256_permute2x128_si256(lo, hi, 0x20));
        _mm256_storeu_si256((__m256i *)(a + 32), _mm256_permute2x128_si256(lo, hi, 0x31));
        /* bit t: step j / 4 + t has a remainder */
        unsigned mask = ~(unsigned)_mm256_movemask_ps(
                            _mm256_castsi256_ps(_mm256_cmpeq_epi32(r, zero))) & 0xFFu;
        while (mask) {
            idx[n++] = (int32_t)(j / 4 + __builtin_ctz(mask));
            mask &= mask - 1;
        }
    }
    for (; j < k; j += 4, a += 8) {
        int any = 0;
        for (int t = 0; t < 4; ++t) {
            const int8_t v = j + t < k ? q[j + t] : 0;
            const int8_t c = v < -64 ? -64 : (v > 63 ? 63 : v);
            a[t] = (uint8_t)(j + t < k ? c + 64 : 0);
            a[4 + t] = (uint8_t)(int8_t)(v - c);
            any |= v != c;
        }
        if (any)
            idx[n++] = (int32_t)(j / 4);
    }
    return n;
}

/* how many 4-K steps of a row of codes q [k] hold a code outside [-64, 63] (the steps
 * layout_codes_split lists) */
static int64_t count_split_steps(const int8_t *q, int64_t k) {
    const __m256i lo7 = _mm256_set1_epi8(-64), hi7 = _mm256_set1_epi8(63);
    const __m256i zero = _mm256_setzero_si256();
    int64_t j = 0, n = 0;
    for (; j + 32 <= k; j += 32) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)(q + j));
        const __m256i out = _mm256_or_si256(_mm256_cmpgt_epi8(v, hi7),
                                            _mm256_cmpgt_epi8(lo7, v));
        const int clean = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(out, zero)));
        n += 8 - __builtin_popcount((unsigned)clean);
    }
    for (; j < k; j += 4) {
        int any = 0;
        for (int t = 0; t < 4 && j + t < k; ++t)
            any |= q[j + t] < -64 || q[j + t] > 63;
        n += any;
    }
    return n;
}

/* acc + 32 MACs of unsigned codes (7-bit u = q + 64, or on VNNI 8-bit q + 128; broadcast)
 * against 8 columns: no sign op */
static inline __m256i dot4_u(__m256i acc, __m256i u, __m256i w) { return DOT_U(acc, u, w); }

/* The remainders of the split form: for each listed step s of a row, |r| x (w with r's sign)
 * into that row's accumulators, as dot4 (pair sums <= 2 * 64 * 127: exact). */
#define SPLIT_FIXUP(acc0, acc1, arow, w, lst)                                                   \
    do {                                                                                       \
        const int32_t cnt_ = (lst)[0];                                                         \
        for (int32_t t_ = 0; t_ < cnt_; ++t_) {                                                \
            const int64_t s_ = (lst)[1 + t_];                                                  \
            int32_t rs_;                                                                       \
            __builtin_memcpy(&rs_, (arow) + s_ * 8 + 4, 4);                                    \
            const __m256i vs_ = _mm256_set1_epi32(rs_), va_ = _mm256_abs_epi8(vs_);            \
            const __m256i w0_ = _mm256_loadu_si256((const __m256i *)((w) + s_ * 64));          \
            const __m256i w1_ = _mm256_loadu_si256((const __m256i *)((w) + s_ * 64 + 32));     \
            acc0 = dot4(acc0, va_, vs_, w0_);                                                  \
            acc1 = dot4(acc1, va_, vs_, w1_);                                                  \
        }                                                                                      \
    } while (0)

#if LB_U8_CODES
/* Pins a loop-carried accumulator to one register: without it gcc -O3 copies every vpdpbusd
 * accumulator in and out of a second register each step (R = 8 rows: 25 moves per 16
 * vpdpbusd; 32-64 rows ran 1.05-1.3x slower, docs/kernels.md). Emits nothing. */
#define LB_KEEP(v) __asm__("" : "+v"(v))

/* The unsigned forms with 512-bit registers (rows laid out compact, 4 bytes per step): one 4-K
 * step of a 16-column panel (64 bytes) is one zmm, so each row takes one vpdpbusd per step (two
 * with 256-bit ones). Even and odd steps go to separate accumulators: 2 R independent chains
 * hide vpdpbusd's latency. Named accumulators (not an array) and LB_KEEP keep all 2 R in
 * registers. */
#define LB_ROWS8(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7)
static inline __attribute__((always_inline)) void tile_r512(const uint8_t *a, int64_t lda,
                                                             const int R, const int8_t *w,
                                                             int64_t k4, int32_t *out) {
#define T512_ZERO(r) __m512i e##r = _mm512_setzero_si512(), o##r = _mm512_setzero_si512();
#define T512_CODE(r, off) (__extension__({                                                     \
        int32_t c_;                                                                            \
        __builtin_memcpy(&c_, a + (r) * lda + s * 4 + (off), 4);                               \
        _mm512_set1_epi32(c_);                                                                 \
    }))
#define T512_STEP2(r)                                                                          \
    if (R > (r)) {                                                                             \
        e##r = _mm512_dpbusd_epi32(e##r, T512_CODE(r, 0), w0);                                 \
        o##r = _mm512_dpbusd_epi32(o##r, T512_CODE(r, 4), w1);                                 \
        LB_KEEP(e##r);                                                                         \
        LB_KEEP(o##r);                                                                         \
    }
#define T512_STEP1(r)                                                                          \
    if (R > (r))                                                                               \
        e##r = _mm512_dpbusd_epi32(e##r, T512_CODE(r, 0), w0);
#define T512_STORE(r)                                                                          \
    if (R > (r))                                                                               \
        _mm512_storeu_si512((void *)(out + (r) * 16), _mm512_add_epi32(e##r, o##r));
    LB_ROWS8(T512_ZERO)
    int64_t s = 0;
    for (; s + 2 <= k4; s += 2) {
        /* 2 KB ahead (1 KB before: 8 x 4096 -> 11008 with the weights in DRAM 2.76 -> 2.46 ms;
         * 4-8 KB measured the same as 2) */
        _mm_prefetch((const char *)(w + s * 64 + 2048), _MM_HINT_T0);
        _mm_prefetch((const char *)(w + s * 64 + 2112), _MM_HINT_T0);
        const __m512i w0 = _mm512_loadu_si512((const void *)(w + s * 64));
        const __m512i w1 = _mm512_loadu_si512((const void *)(w + s * 64 + 64));
        LB_ROWS8(T512_STEP2)
    }
    if (s < k4) {
        const __m512i w0 = _mm512_loadu_si512((const void *)(w + s * 64));
        LB_ROWS8(T512_STEP1)
    }
    LB_ROWS8(T512_STORE)
#undef T512_ZERO
#undef T512_CODE
#undef T512_STEP2
#undef T512_STEP1
#undef T512_STORE
}

/* rows (2..8) x 32 columns: two panels (pstride apart) at once. Each row's code broadcast
 * feeds both panels' vpdpbusd, so a step takes R broadcasts for 2 R vpdpbusd (tile_r512: R for
 * R), and the weights stream from two places; the 2 R accumulators are independent chains.
 * Each stream is prefetched 2 KB ahead into L1 and 6 KB ahead into L2 (the second prefetch:
 * 8 x 4096 -> 11008 from DRAM 1.40-1.51 -> 1.31-1.36 ms, Zen 4, 2 threads; docs/kernels.md). */
static inline __attribute__((always_inline)) void tile_r512x2(const uint8_t *a, int64_t lda,
                                                               const int R, const int8_t *w,
                                                               int64_t pstride, int64_t k4,
                                                               int32_t *out) {
#define T2_ZERO(r) __m512i l##r = _mm512_setzero_si512(), h##r = _mm512_setzero_si512();
#define T2_STEP(r)                                                                             \
    if (R > (r)) {                                                                             \
        int32_t c_;                                                                            \
        __builtin_memcpy(&c_, a + (r) * lda + s * 4, 4);                                       \
        const __m512i u_ = _mm512_set1_epi32(c_);                                              \
        l##r = _mm512_dpbusd_epi32(l##r, u_, w0);                                              \
        h##r = _mm512_dpbusd_epi32(h##r, u_, w1);                                              \
        LB_KEEP(l##r);                                                                         \
        LB_KEEP(h##r);                                                                         \
    }
#define T2_STORE(r)                                                                            \
    if (R > (r)) {                                                                             \
        _mm512_storeu_si512((void *)(out + (r) * 32), l##r);                                   \
        _mm512_storeu_si512((void *)(out + (r) * 32 + 16), h##r);                              \
    }
    LB_ROWS8(T2_ZERO)
    const int8_t *w2 = w + pstride;
    for (int64_t s = 0; s < k4; ++s) {
        _mm_prefetch((const char *)(w + s * 64 + 2048), _MM_HINT_T0);
        _mm_prefetch((const char *)(w2 + s * 64 + 2048), _MM_HINT_T0);
        _mm_prefetch((const char *)(w + s * 64 + 6144), _MM_HINT_T1);
        _mm_prefetch((const char *)(w2 + s * 64 + 6144), _MM_HINT_T1);
        const __m512i w0 = _mm512_loadu_si512((const void *)(w + s * 64));
        const __m512i w1 = _mm512_loadu_si512((const void *)(w2 + s * 64));
        LB_ROWS8(T2_STEP)
    }
    LB_ROWS8(T2_STORE)
#undef T2_ZERO
#undef T2_STEP
#undef T2_STORE
}

/* acc + one INT4 weight group's int32 sums ds over 8 columns (scales sv, sv * zero-points sz)
 * for an activation row with group scale sx and tq = sx * sum_g(q):
 *   acc + float(ds) * (sv * sx) - sz * tq
 * the float ops of both INT4 x INT8 kernels of this path (u4p_rp512, the AMX tiles) in one
 * order, so they give the same bits. */
static inline __m256 u4_group_add(__m256 acc, __m256i ds, __m256 sv, __m256 sz, float sx,
                                  float tq) {
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ds), _mm256_mul_ps(sv, _mm256_set1_ps(sx)), acc);
    return _mm256_fnmadd_ps(sz, _mm256_set1_ps(tq), acc); /* - s_g z_g * (sx_g sum_g(q)) */
}

static inline __attribute__((always_inline)) void gemv_p512(const uint8_t *a, const int8_t *w,
                                                             int64_t pstride, const int P,
                                                             int64_t k4, int32_t *out) {
    __m512i acc[4];
    for (int p = 0; p < P; ++p)
        acc[p] = _mm512_setzero_si512();
    for (int64_t s = 0; s < k4; ++s) {
        int32_t ab;
        __builtin_memcpy(&ab, a + s * 4, 4);
        const __m512i va = _mm512_set1_epi32(ab);
        for (int p = 0; p < P; ++p) { /* P independent weight streams */
            const int8_t *wp = w + p * pstride + s * 64;
            _mm_prefetch((const char *)(wp + 768), _MM_HINT_T0);
            acc[p] = _mm512_dpbusd_epi32(acc[p], va, _mm512_loadu_si512((const void *)wp));
        }
    }
    for (int p = 0; p < P; ++p)
        _mm512_storeu_si512((void *)(out + p * 16), acc[p]);
}
#endif


#if LB_AMX
/* The AMX tile state must be requested from Linux once per process (arch_prctl
 * ARCH_REQ_XCOMP_PERM for XTILEDATA) before the first tile instruction; without it, or on
 * another OS, the library keeps its vpdpbusd kernels. 1 granted, 0 not. */
static int lb_amx_granted;

__attribute__((constructor)) static void lb_amx_request(void) {
#if defined(__linux__) && defined(SYS_arch_prctl)
    lb_amx_granted = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */,
                             18 /* XFEATURE_XTILEDATA */) == 0;
#endif
}

/* ldtilecfg's 64-byte operand */
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} amx_cfg_t;

/* Tiles of amx_tile32 for r0 (1..16) + r1 (0..16) rows: 0, 1 the int32 results of rows 0-15
 * (panels 0, 1), 2, 3 of rows 16-31, 4, 5 the activation rows (16 steps = 64 bytes each), 6, 7
 * 16 steps of the two panels (64 bytes a step: the packed layout as it is). A tile of 0 rows
 * stays unconfigured (and unused). ldtilecfg zeroes every tile. */
static void amx_configure(int r0, int r1) {
    amx_cfg_t c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    const int rows[8] = {r0, r0, r1, r1, r0, r1, 16, 16};
    for (int t = 0; t < 8; ++t)
        if (rows[t]) {
            c.rows[t] = (uint8_t)rows[t];
            c.colsb[t] = 64;
        }
    _tile_loadconfig(&c);
}

/* Rows (16 or, with R2, 32: as configured) of unsigned codes a (row stride lda, 4 bytes a
 * step) x P (1..2) panels at w (panel stride pstride), the first k4 steps (a multiple of 16):
 * out[r * 32 + 16 p + c] (int32). */
static inline __attribute__((always_inline)) void amx_tile32(const uint8_t *a, int64_t lda,
                                                              const int R2, const int8_t *w,
                                                              int64_t pstride, const int P,
                                                              int64_t k4, int32_t *out) {
    _tile_zero(0);
    if (P == 2)
        _tile_zero(1);
    if (R2) {
        _tile_zero(2);
        if (P == 2)
            _tile_zero(3);
    }
    for (int64_t s = 0; s < k4; s += 16) {
        _tile_loadd(4, a + s * 4, lda);
        _tile_loadd(6, w + s * 64, 64);
        if (R2)
            _tile_loadd(5, a + 16 * lda + s * 4, lda);
        _tile_dpbusd(0, 4, 6);
        if (R2)
            _tile_dpbusd(2, 5, 6);
        if (P == 2) {
            _tile_loadd(7, w + pstride + s * 64, 64);
            _tile_dpbusd(1, 4, 7);
            if (R2)
                _tile_dpbusd(3, 5, 7);
        }
    }
    _tile_stored(0, out, 128);
    if (P == 2)
        _tile_stored(1, out + 16, 128);
    if (R2) {
        _tile_stored(2, out + 16 * 32, 128);
        if (P == 2)
            _tile_stored(3, out + 16 * 32 + 16, 128);
    }
}

/* rows (1..32, as configured: r1 = rows > 16) x P panels over k4 steps (at least 16): whole
 * tiles on AMX, the last k4 % 16 steps with tile_r512, added: out[r * 32 + 16 p + c] */
static void amx_tile(const uint8_t *a, int64_t lda, int rows, const int8_t *w, int64_t pstride,
                     int P, int64_t k4, int32_t *out) {
    const int64_t kt = k4 & ~(int64_t)15, tail = k4 - kt;
    if (rows > 16)
        P == 2 ? amx_tile32(a, lda, 1, w, pstride, 2, kt, out)
               : amx_tile32(a, lda, 1, w, pstride, 1, kt, out);
    else
        P == 2 ? amx_tile32(a, lda, 0, w, pstride, 2, kt, out)
               : amx_tile32(a, lda, 0, w, pstride, 1, kt, out);
    if (!tail)
        return;
    int32_t t[8 * 16];
    for (int p = 0; p < P; ++p)
        for (int r = 0; r < rows; r += 8) {
            const int rr = rows - r < 8 ? rows - r : 8;
            switch (rr) {
#define TAIL(R)                                                                                \
    case R: tile_r512(a + r * lda + kt * 4, lda, R, w + p * pstride + kt * 64, tail, t); break
                TAIL(8); TAIL(7); TAIL(6); TAIL(5); TAIL(4); TAIL(3); TAIL(2); TAIL(1);
#undef TAIL
            }
            for (int i = 0; i < rr; ++i) { /* (mod 2^32, as the epilogue) */
                int32_t *o = out + (r + i) * 32 + 16 * p;
                for (int c = 0; c < 16; ++c)
                    o[c] = (int32_t)((uint32_t)o[c] + (uint32_t)t[i * 16 + c]);
            }
        }
}

static void amx_done(void) { _tile_release(); }

/* INT4 panels on AMX: one B tile (16 four-K steps x 16 columns, unsigned codes as bytes) from
 * 8 eight-K pairs of two INT4 panels (p, p + 1; NULL: zero columns) starting at pair t0: row 2j
 * the low nibbles of pair t0 + j, row 2j + 1 the high ones (see lbk_u4p layout). */
static void amx_u4_unpack(const uint8_t *p0, const uint8_t *p1, int64_t t0, uint8_t *b) {
    const __m256i zero = _mm256_setzero_si256();
    const __m512i low = _mm512_set1_epi8(0x0F);
    for (int j = 0; j < 8; ++j) {
        const __m256i v0 = p0 ? _mm256_loadu_si256((const __m256i *)(p0 + (t0 + j) * 32)) : zero;
        const __m256i v1 = p1 ? _mm256_loadu_si256((const __m256i *)(p1 + (t0 + j) * 32)) : zero;
        const __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512(v0), v1, 1);
        _mm512_store_si512((void *)(b + 128 * j), _mm512_and_si512(v, low));
        _mm512_store_si512((void *)(b + 128 * j + 64),
                           _mm512_and_si512(_mm512_srli_epi16(v, 4), low));
    }
}

/* 32 rows of signed int8 codes q (row stride ldq) x two unpacked B tiles (b: chunks of 2 KB,
 * tile 0 then tile 1) over nch 64-K chunks starting at column kc: int32 sums into
 * out[r * 32 + c] (the configuration amx_configure(16, 16) loaded). tdpbsud: s8 x u8. */
static void amx_u4_tile(const int8_t *q, int64_t ldq, int64_t kc, const uint8_t *b, int nch,
                        int32_t *out) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int ch = 0; ch < nch; ++ch) {
        _tile_loadd(4, q + kc + 64 * ch, ldq);
        _tile_loadd(5, q + 16 * ldq + kc + 64 * ch, ldq);
        _tile_loadd(6, b + 2048 * ch, 64);
        _tile_loadd(7, b + 2048 * ch + 1024, 64);
        _tile_dpbsud(0, 4, 6);
        _tile_dpbsud(1, 4, 7);
        _tile_dpbsud(2, 5, 6);
        _tile_dpbsud(3, 5, 7);
    }
    _tile_stored(0, out, 128);
    _tile_stored(1, out + 16, 128);
    _tile_stored(2, out + 16 * 32, 128);
    _tile_stored(3, out + 16 * 32 + 16, 128);
}

/* acc[8] of one row and panel += the group's sums d (u4_group_add, as u4p_rp512) */
static inline void amx_u4_accumulate(float *acc, const int32_t *d, const float *s,
                                     const uint8_t *z, float sx, float tq) {
    const __m256 sv = _mm256_loadu_ps(s);
    const __m256 sz = _mm256_mul_ps(sv, u4_zero_points(z));
    _mm256_storeu_ps(acc, u4_group_add(_mm256_loadu_ps(acc),
                                       _mm256_loadu_si256((const __m256i *)d), sv, sz, sx, tq));
}
#endif

/* R rows x P (1..2) panels (pstride apart), out[r * 16 P + c]. F: 0 the sign form {|q|, q},
 * 1 the 7-bit form {q + 64, 0}, 2 the split form {c + 64, r} with per-row step lists
 * lst + r * ldl = {count, steps...} (one panel only; with LB_U8_CODES, forms 0 and 1 run
 * tile_r512 instead). Two panels stream the weights from two places: blocks of 2
 * rows take them (2 x 4096 -> 11008 with 8-bit codes, Zen 4 cores limited to AVX2: 1.48-1.55 ->
 * 1.31-1.33 ms; at 4 rows two passes over each pair were slower than one 4-row pass from DRAM).
 * A second prefetch 6 KB ahead into L2 keeps DRAM busy while the tile computes: 4 x 4096 ->
 * 4096 with 7-bit codes 0.68-0.85 -> 0.46-0.58 ms (fbgemm 0.53-0.72 in the same runs). */
static inline __attribute__((always_inline)) void tile_r(const uint8_t *a, int64_t lda,
                                                          const int R, const int8_t *w,
                                                          int64_t pstride, const int P,
                                                          int64_t k4, const int F,
                                                          const int32_t *lst, int64_t ldl,
                                                          int32_t *out) {
#if LB_U8_CODES
    if (F != 2) { /* (the split form's remainders need the 256-bit sign op; P = 1 here: the
                   * unsigned forms' panel pairs are s8_tile2's tile_r512x2) */
        tile_r512(a, lda, R, w, k4, out);
        return;
    }
#endif
    __m256i acc[4][4];
    for (int r = 0; r < R; ++r)
        for (int h = 0; h < 2 * P; ++h)
            acc[r][h] = _mm256_setzero_si256();
    for (int64_t s = 0; s < k4; ++s) {
        __m256i wv[4];
        for (int p = 0; p < P; ++p) {
            const int8_t *wp = w + p * pstride + s * 64;
            _mm_prefetch((const char *)(wp + 1024), _MM_HINT_T0); /* ahead in the panel */
            _mm_prefetch((const char *)(wp + 6144), _MM_HINT_T1); /* and further into L2 */
            wv[2 * p] = _mm256_loadu_si256((const __m256i *)wp);
            wv[2 * p + 1] = _mm256_loadu_si256((const __m256i *)(wp + 32));
        }
        for (int r = 0; r < R; ++r) {
            int32_t ab, as;
            __builtin_memcpy(&ab, a + r * lda + s * 8, 4);
            const __m256i va = _mm256_set1_epi32(ab);
            if (F) {
                for (int h = 0; h < 2 * P; ++h)
                    acc[r][h] = dot4_u(acc[r][h], va, wv[h]);
                continue;
            }
            __builtin_memcpy(&as, a + r * lda + s * 8 + 4, 4);
            const __m256i vs = _mm256_set1_epi32(as);
            for (int h = 0; h < 2 * P; ++h)
                acc[r][h] = dot4(acc[r][h], va, vs, wv[h]);
        }
    }
    if (F == 2)
        for (int r = 0; r < R; ++r)
            SPLIT_FIXUP(acc[r][0], acc[r][1], a + r * lda, w, lst + r * ldl);
    for (int r = 0; r < R; ++r)
        for (int h = 0; h < 2 * P; ++h)
            _mm256_storeu_si256((__m256i *)(out + r * 16 * P + h * 8), acc[r][h]);
}

/* rows (1..4) x 16 columns of one panel: out[r * 16 + c] */
static inline __attribute__((always_inline)) void s8_tile4(const uint8_t *a, int64_t lda,
                                                           int rows, const int8_t *w,
                                                           int64_t k4, int form,
                                                           const int32_t *lst, int64_t ldl,
                                                           int32_t *out) {
#define TILE(R)                                                                                \
    (form == 2   ? tile_r(a, lda, R, w, 0, 1, k4, 2, lst, ldl, out)                            \
     : form == 1 ? tile_r(a, lda, R, w, 0, 1, k4, 1, lst, ldl, out)                            \
                 : tile_r(a, lda, R, w, 0, 1, k4, 0, lst, ldl, out))
    switch (rows) {
    case 4: TILE(4); break;
    case 3: TILE(3); break;
    case 2: TILE(2); break;
    default: TILE(1); break;
    }
#undef TILE
}

/* s8_tile2: blocks of 2 rows (and, with 512-bit tiles, up to 8) read two panels at once */
#define LB_PAIR_TILES 1
#define LB_PAIR_MIN_ROWS 2

#if LB_U8_CODES
/* 8-row tiles: each weight step loaded once for 8 rows (16 zmm accumulators) */
#define LB_TILE_ROWS 8

/* rows (LB_PAIR_MIN_ROWS..8) x 2 panels (pstride apart) of the unsigned forms:
 * out[r * 32 + c] */
static inline __attribute__((always_inline)) void s8_tile2(const uint8_t *a, int64_t lda,
                                                           int rows, const int8_t *w,
                                                           int64_t pstride, int64_t k4,
                                                           int F, int32_t *out) {
    (void)F; /* both unsigned forms are laid out alike */
    switch (rows) {
    case 8: tile_r512x2(a, lda, 8, w, pstride, k4, out); break;
    case 7: tile_r512x2(a, lda, 7, w, pstride, k4, out); break;
    case 6: tile_r512x2(a, lda, 6, w, pstride, k4, out); break;
    case 5: tile_r512x2(a, lda, 5, w, pstride, k4, out); break;
    case 4: tile_r512x2(a, lda, 4, w, pstride, k4, out); break;
    case 3: tile_r512x2(a, lda, 3, w, pstride, k4, out); break;
    default: tile_r512x2(a, lda, 2, w, pstride, k4, out); break;
    }
}
#else
#define LB_PAIR_MAX_ROWS 2
static inline __attribute__((always_inline)) void s8_tile2(const uint8_t *a, int64_t lda,
                                                           int rows, const int8_t *w,
                                                           int64_t pstride, int64_t k4,
                                                           int F, int32_t *out) {
    (void)rows; /* LB_PAIR_MIN_ROWS = LB_PAIR_MAX_ROWS = 2 */
    if (F)
        tile_r(a, lda, 2, w, pstride, 2, k4, 1, NULL, 0, out);
    else
        tile_r(a, lda, 2, w, pstride, 2, k4, 0, NULL, 0, out);
}
#endif

/* rows (1..LB_TILE_ROWS) x 16 columns of one panel: out[r * 16 + c] */
static inline __attribute__((always_inline)) void s8_tile(const uint8_t *a, int64_t lda,
                                                          int rows, const int8_t *w,
                                                          int64_t k4, int form,
                                                          const int32_t *lst, int64_t ldl,
                                                          int32_t *out) {
#if LB_U8_CODES
    if (rows > 4 && form == 2) { /* the split form's 256-bit tiles: 4 rows, then the rest */
        s8_tile4(a, lda, 4, w, k4, form, lst, ldl, out);
        s8_tile4(a + 4 * lda, lda, rows - 4, w, k4, form, lst + 4 * ldl, ldl, out + 64);
        return;
    }
    switch (rows) {
    case 8: tile_r512(a, lda, 8, w, k4, out); return;
    case 7: tile_r512(a, lda, 7, w, k4, out); return;
    case 6: tile_r512(a, lda, 6, w, k4, out); return;
    case 5: tile_r512(a, lda, 5, w, k4, out); return;
    default: break;
    }
#endif
    s8_tile4(a, lda, rows, w, k4, form, lst, ldl, out);
}

static inline __attribute__((always_inline)) void gemv_p(const uint8_t *a, const int8_t *w,
                                                          int64_t pstride, const int P,
                                                          int64_t k4, const int F,
                                                          const int32_t *lst, int32_t *out) {
#if LB_U8_CODES
    if (F != 2) {
        gemv_p512(a, w, pstride, P, k4, out);
        return;
    }
#endif
    __m256i acc[4][2];
    for (int p = 0; p < P; ++p)
        acc[p][0] = acc[p][1] = _mm256_setzero_si256();
    for (int64_t s = 0; s < k4; ++s) {
        int32_t ab, as;
        __builtin_memcpy(&ab, a + s * 8, 4);
        __builtin_memcpy(&as, a + s * 8 + 4, 4);
        const __m256i va = _mm256_set1_epi32(ab), vs = _mm256_set1_epi32(as);
        for (int p = 0; p < P; ++p) { /* P independent weight streams */
            const int8_t *wp = w + p * pstride + s * 64;
            _mm_prefetch((const char *)(wp + 768), _MM_HINT_T0);
            const __m256i w0 = _mm256_loadu_si256((const __m256i *)wp);
            const __m256i w1 = _mm256_loadu_si256((const __m256i *)(wp + 32));
            if (F) {
                acc[p][0] = dot4_u(acc[p][0], va, w0);
                acc[p][1] = dot4_u(acc[p][1], va, w1);
            } else {
                acc[p][0] = dot4(acc[p][0], va, vs, w0);
                acc[p][1] = dot4(acc[p][1], va, vs, w1);
            }
        }
    }
    if (F == 2)
        for (int p = 0; p < P; ++p)
            SPLIT_FIXUP(acc[p][0], acc[p][1], a, w + p * pstride, lst);
    for (int p = 0; p < P; ++p) {
        _mm256_storeu_si256((__m256i *)(out + p * 16), acc[p][0]);
        _mm256_storeu_si256((__m256i *)(out + p * 16 + 8), acc[p][1]);
    }
}

/* one activation row x np (1..4) panels (pstride bytes apart): out[p * 16 + c] */
static inline __attribute__((always_inline)) void s8_gemv(const uint8_t *a, const int8_t *w,
                                                          int64_t pstride, int np, int64_t k4,
                                                          int form, const int32_t *lst,
                                                          int32_t *out) {
#define GEMV(P)                                                                                \
    (form == 2   ? gemv_p(a, w, pstride, P, k4, 2, lst, out)                                   \
     : form == 1 ? gemv_p(a, w, pstride, P, k4, 1, lst, out)                                   \
                 : gemv_p(a, w, pstride, P, k4, 0, lst, out))
    switch (np) {
    case 4: GEMV(4); break;
    case 3: GEMV(3); break;
    case 2: GEMV(2); break;
    default: GEMV(1); break;
    }
#undef GEMV
}

static inline float hsum8(__m256 v) {
    __m128 t = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    t = _mm_add_ps(t, _mm_movehl_ps(t, t));
    t = _mm_add_ss(t, _mm_movehdup_ps(t));
    return _mm_cvtss_f32(t);
}

/* 32 INT4 codes (16 bytes) as four float vectors: codes 0-7, 8-15, 16-23, 24-31. Each 8 bytes
 * are zero-extended to dwords straight from memory; a dword's low nibble is a code of the first
 * 16, its high nibble (v >> 4: nothing above it) the code 16 places on. */
static inline void unpack32(const uint8_t *b, __m256 *w) {
    const __m256i m = _mm256_set1_epi32(0x0F);
    const __m256i v0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)b));
    const __m256i v1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(b + 8)));
    w[0] = _mm256_cvtepi32_ps(_mm256_and_si256(v0, m));
    w[1] = _mm256_cvtepi32_ps(_mm256_and_si256(v1, m));
    w[2] = _mm256_cvtepi32_ps(_mm256_srli_epi32(v0, 4));
    w[3] = _mm256_cvtepi32_ps(_mm256_srli_epi32(v1, 4));
}

static inline __attribute__((always_inline)) void u4_rc(const float *x, int64_t ldx,
                                                         const int R, const uint8_t *wq,
                                                         int64_t kp, int64_t g, const float *s,
                                                         float out[4][2], const int C) {
    /* partial sums per (row, column): enough independent FMA chains to hide FMA latency */
    enum { P = 4 };
    const int np = R * C >= 8 ? 1 : R * C >= 4 ? 2 : 4;
    const int64_t groups = kp / g, row_bytes = kp / 2;
    __m256 acc[4][2];
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c)
            acc[r][c] = _mm256_setzero_ps();
    for (int64_t gi = 0; gi < groups; ++gi) {
        __m256 d[4][2][P];
        for (int r = 0; r < R; ++r)
            for (int c = 0; c < C; ++c)
                for (int p = 0; p < np; ++p)
                    d[r][c][p] = _mm256_setzero_ps();
        for (int64_t j = gi * g; j < (gi + 1) * g; j += 32) {
            for (int c = 0; c < C; ++c) {
                __m256 w[4];
                const uint8_t *b = wq + c * row_bytes + j / 2;
                _mm_prefetch((const char *)(b + 512), _MM_HINT_T0);
                unpack32(b, w);
                for (int r = 0; r < R; ++r) {
                    const float *xr = x + r * ldx + j;
                    for (int v = 0; v < 4; ++v)
                        d[r][c][v % np] = _mm256_fmadd_ps(w[v], _mm256_loadu_ps(xr + 8 * v),
                                                          d[r][c][v % np]);
                }
            }
        }
        for (int c = 0; c < C; ++c) {
            const __m256 sv = _mm256_set1_ps(s[c * groups + gi]);
            for (int r = 0; r < R; ++r) {
                __m256 t = d[r][c][0];
                for (int p = 1; p < np; ++p)
                    t = _mm256_add_ps(t, d[r][c][p]);
                acc[r][c] = _mm256_fmadd_ps(sv, t, acc[r][c]);
            }
        }
    }
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c)
            out[r][c] = hsum8(acc[r][c]);
}

/* rows (1..4) of x (row stride ldx, kp floats each) . nr (1..2) INT4 weight rows:
 * out[r][c] = sum_groups s_g * sum_j u_j x_j */
static void u4_rows(const float *x, int64_t ldx, int rows, const uint8_t *wq, int64_t kp,
                    int64_t g, const float *s, float out[4][2], int nr) {
#define U4_CASE(R)                                                                          \
    if (nr == 2)                                                                            \
        u4_rc(x, ldx, R, wq, kp, g, s, out, 2);                                             \
    else                                                                                    \
        u4_rc(x, ldx, R, wq, kp, g, s, out, 1);
    switch (rows) {
    case 4: U4_CASE(4) break;
    case 3: U4_CASE(3) break;
    case 2: U4_CASE(2) break;
    default: U4_CASE(1) break;
    }
#undef U4_CASE
}

/* R rows (1..4) of int8 codes q (row stride ldq, kp each) x P (1..2) panels of 8 INT4 columns
 * (lbk_u4p_linear's layout, pstride bytes apart): out[r * 16 + p * 8 + c], before the bias.
 * Per 8-K pair a panel is one 32-byte load; its low / high nibbles are two 4-K steps of 8
 * columns, multiplied with 4 broadcast activation codes each (vpmaddubsw: u unsigned, q
 * signed), summed in int16 over 32 K, then scaled per group: s_g (columns) * sx_g (row). */
static inline __attribute__((always_inline)) void u4p_rp(const int8_t *q, int64_t ldq,
                                                          const int R, const uint8_t *wp,
                                                          int64_t pstride, const int P,
                                                          int64_t kp, int64_t g,
                                                          const float *sT, const uint8_t *zT,
                                                          int64_t ldT, const float *sx,
                                                          const float *tq, int64_t groups,
                                                          float *out) {
    const __m256i ones = _mm256_set1_epi16(1), low = _mm256_set1_epi8(0x0F);
    __m256 acc[4][2];
    for (int r = 0; r < R; ++r)
        for (int p = 0; p < P; ++p)
            acc[r][p] = _mm256_setzero_ps();
    for (int64_t gi = 0; gi < groups; ++gi) {
        __m256 sv[2];
        for (int p = 0; p < P; ++p)
            sv[p] = _mm256_loadu_ps(sT + gi * ldT + p * 8);
        for (int64_t t0 = gi * g / 8; t0 < (gi + 1) * g / 8; t0 += 4) {
            __m256i d[4][2];
            for (int r = 0; r < R; ++r)
                for (int p = 0; p < P; ++p)
                    d[r][p] = _mm256_setzero_si256();
            for (int64_t t = t0; t < t0 + 4; ++t) {
                __m256i a0[4], a1[4];
                for (int r = 0; r < R; ++r) {
                    int32_t v0, v1;
                    __builtin_memcpy(&v0, q + r * ldq + 8 * t, 4);
                    __builtin_memcpy(&v1, q + r * ldq + 8 * t + 4, 4);
                    a0[r] = _mm256_set1_epi32(v0);
                    a1[r] = _mm256_set1_epi32(v1);
                }
                for (int p = 0; p < P; ++p) {
                    const uint8_t *b = wp + p * pstride + t * 32;
                    _mm_prefetch((const char *)(b + 512), _MM_HINT_T0);
                    _mm_prefetch((const char *)(b + 4096), _MM_HINT_T1); /* L2, as tile_r */
                    const __m256i v = _mm256_loadu_si256((const __m256i *)b);
                    const __m256i lo = _mm256_and_si256(v, low);
                    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
                    for (int r = 0; r < R; ++r)
                        d[r][p] = _mm256_add_epi16(
                            d[r][p], _mm256_add_epi16(_mm256_maddubs_epi16(lo, a0[r]),
                                                      _mm256_maddubs_epi16(hi, a1[r])));
                }
            }
            for (int r = 0; r < R; ++r) {
                const __m256 sxr = _mm256_set1_ps(sx[r * groups + gi]);
                for (int p = 0; p < P; ++p)
                    acc[r][p] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(d[r][p], ones)),
                                                _mm256_mul_ps(sv[p], sxr), acc[r][p]);
            }
        }
        for (int p = 0; p < P; ++p) { /* - s_g z_g * (sx_g sum_g(q)) */
            const __m256 sz = _mm256_mul_ps(sv[p], u4_zero_points(zT + gi * ldT + p * 8));
            for (int r = 0; r < R; ++r)
                acc[r][p] = _mm256_fnmadd_ps(sz, _mm256_set1_ps(tq[r * groups + gi]), acc[r][p]);
        }
    }
    for (int r = 0; r < R; ++r)
        for (int p = 0; p < P; ++p)
            _mm256_storeu_ps(out + r * 16 + p * 8, acc[r][p]);
}

#if LB_U8_CODES
/* u4p_rp with 512-bit registers: two 8-K steps of a panel (64 bytes) per load, their
 * activations side by side (lanes 0-7 step t, 8-15 step t + 1), int32 sums over a whole group
 * (vpdpbusd: at most g * 15 * 128, exact), halves added before the group's scaling. */
static inline __attribute__((always_inline)) void u4p_rp512(const int8_t *q, int64_t ldq,
                                                             const int R, const uint8_t *wp,
                                                             int64_t pstride, const int P,
                                                             int64_t g, const float *sT,
                                                             const uint8_t *zT, int64_t ldT,
                                                             const float *sx, const float *tq,
                                                             int64_t groups, float *out) {
    const __m512i low = _mm512_set1_epi8(0x0F);
    __m256 acc[4][2];
    for (int r = 0; r < R; ++r)
        for (int p = 0; p < P; ++p)
            acc[r][p] = _mm256_setzero_ps();
    for (int64_t gi = 0; gi < groups; ++gi) {
        __m512i d[4][2], e[4][2]; /* low / high nibbles: independent chains */
        for (int r = 0; r < R; ++r)
            for (int p = 0; p < P; ++p)
                d[r][p] = e[r][p] = _mm512_setzero_si512();
        for (int64_t t = gi * g / 8; t < (gi + 1) * g / 8; t += 2) { /* (g / 8: even) */
            __m512i a0[4], a1[4];
            for (int r = 0; r < R; ++r) { /* codes 8t .. 8t + 15 of row r as 4 dwords */
                /* d0 d1 in lanes 0-7, d2 d3 in lanes 8-15, then one in-lane shuffle per
                 * operand (two vpermd before: 4-32 rows 6-13% slower, docs/kernels.md) */
                int64_t c01, c23;
                __builtin_memcpy(&c01, q + r * ldq + 8 * t, 8);
                __builtin_memcpy(&c23, q + r * ldq + 8 * t + 8, 8);
                const __m512i v = _mm512_inserti64x4(
                    _mm512_castsi256_si512(_mm256_set1_epi64x(c01)), _mm256_set1_epi64x(c23), 1);
                a0[r] = _mm512_shuffle_epi32(v, _MM_PERM_AAAA);
                a1[r] = _mm512_shuffle_epi32(v, _MM_PERM_BBBB);
            }
            for (int p = 0; p < P; ++p) {
                const uint8_t *b = wp + p * pstride + t * 32;
                _mm_prefetch((const char *)(b + 512), _MM_HINT_T0);
                _mm_prefetch((const char *)(b + 4096), _MM_HINT_T1); /* L2, as tile_r512x2 */
                const __m512i v = _mm512_loadu_si512((const void *)b);
                const __m512i lo = _mm512_and_si512(v, low);
                const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
                for (int r = 0; r < R; ++r) {
                    d[r][p] = _mm512_dpbusd_epi32(d[r][p], lo, a0[r]);
                    e[r][p] = _mm512_dpbusd_epi32(e[r][p], hi, a1[r]);
                }
            }
        }
        /* a later group's scales and zero-points (ldT apart: one sequential stream each; a
         * prefetch never faults) */
        _mm_prefetch((const char *)(sT + (gi + 4) * ldT), _MM_HINT_T0);
        _mm_prefetch((const char *)(zT + (gi + 16) * ldT), _MM_HINT_T0);
        for (int p = 0; p < P; ++p) {
            const __m256 sv = _mm256_loadu_ps(sT + gi * ldT + p * 8);
            const __m256 sz = _mm256_mul_ps(sv, u4_zero_points(zT + gi * ldT + p * 8));
            for (int r = 0; r < R; ++r) {
                const __m512i de = _mm512_add_epi32(d[r][p], e[r][p]);
                const __m256i ds = _mm256_add_epi32(_mm512_castsi512_si256(de),
                                                    _mm512_extracti64x4_epi64(de, 1));
                acc[r][p] = u4_group_add(acc[r][p], ds, sv, sz, sx[r * groups + gi],
                                         tq[r * groups + gi]);
            }
        }
    }
    for (int r = 0; r < R; ++r)
        for (int p = 0; p < P; ++p)
            _mm256_storeu_ps(out + r * 16 + p * 8, acc[r][p]);
}
#define U4P_RP(q, ldq, R, wp, pstride, P, kp, g, sT, zT, ldT, sx, tq, groups, out)              \
    u4p_rp512(q, ldq, R, wp, pstride, P, g, sT, zT, ldT, sx, tq, groups, out)
#else
#define U4P_RP u4p_rp
#endif

static void u4p_tile(const int8_t *q, int64_t ldq, int rows, const uint8_t *wp, int64_t pstride,
                     int np, int64_t kp, int64_t g, const float *sT, const uint8_t *zT,
                     int64_t ldT, const float *sx, const float *tq, int64_t groups, float *out) {
#define U4P(R, P) U4P_RP(q, ldq, R, wp, pstride, P, kp, g, sT, zT, ldT, sx, tq, groups, out)
    switch (rows * 4 + np) {
    case 4 + 2: U4P(1, 2); break;
    case 8 + 2: U4P(2, 2); break;
    case 8 + 1: U4P(2, 1); break;
    case 12 + 1: U4P(3, 1); break;
    case 16 + 1: U4P(4, 1); break;
#if LB_U4_WIDE_TILES
    case 12 + 2: U4P(3, 2); break;
    case 16 + 2: U4P(4, 2); break;
#endif
    default: U4P(1, 1); break;
    }
#undef U4P
}

#include "lowbit_gemm.h"
