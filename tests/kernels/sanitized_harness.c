/* Drives lowbit's GEMM entry points on exact-size heap buffers; built by test_sanitized.py
 * together with one ISA source (LB_SOURCE) under AddressSanitizer + UndefinedBehaviorSanitizer,
 * so any read or write past what a kernel was given, or undefined arithmetic, stops it with a
 * report. Also checks the int32 results against a plain reference. Prints "fails 0" when every
 * result matched; the exit status is non-zero otherwise. */
#include LB_SOURCE
#include <stdio.h>

static int8_t *codes(size_t count, int lo, int hi) {
    int8_t *p = malloc(count ? count : 1);
    for (size_t i = 0; i < count; ++i)
        p[i] = (int8_t)(lo + rand() % (hi - lo + 1));
    return p;
}

/* INT8 x INT8: int8 codes in (exact int32 out) and float rows quantized in the call, 8- and
 * 7-bit codes, every activation form (split mode -1 auto, 0 never, 1 always), 1-2 threads. */
static int s8_cases(int *runs) {
    const int ms[] = {1, 2, 3, 4, 5, 8, 9, 33, 130};
    const int ks[] = {1, 5, 61, 64, 100, 1027};
    const int ns[] = {1, 16, 17, 70};
    int fails = 0;
    for (int mode = -1; mode <= 1; ++mode) {
        lbk_s8_split_mode(mode);
        for (unsigned a = 0; a < sizeof ms / sizeof *ms; ++a)
            for (unsigned b = 0; b < sizeof ks / sizeof *ks; ++b)
                for (unsigned c = 0; c < sizeof ns / sizeof *ns; ++c)
                    for (int th = 1; th <= 2; ++th) {
                        const int m = ms[a], k = ks[b], n = ns[c], seven = (a + b + c) % 2;
                        int8_t *q = codes((size_t)m * k, seven ? -64 : -127, seven ? 63 : 127);
                        int8_t *w = codes((size_t)n * k, -127, 127);
                        const int64_t pb = lbk_s8_packed_bytes(n, k);
                        int8_t *wp = malloc((size_t)pb);
                        if (lbk_s8_pack(w, n, k, k, wp, pb) != LB_OK)
                            return -1;
                        int32_t *y = malloc((size_t)m * n * 4);
                        if (lbk_s8_linear(q, 2, m, k, k, (int64_t)m * k, NULL, 0, 0, NULL, -128,
                                          127, wp, pb, n, NULL, NULL, NULL, 0, 0, y, 2,
                                          (int64_t)m * n * 4, th, NULL) != LB_OK)
                            return -1;
                        for (int i = 0; i < m; ++i)
                            for (int j = 0; j < n; ++j) {
                                int64_t s = 0;
                                for (int l = 0; l < k; ++l)
                                    s += q[(size_t)i * k + l] * w[(size_t)j * k + l];
                                fails += s != y[(size_t)i * n + j];
                            }
                        float *x = malloc((size_t)m * k * 4), *sx = malloc((size_t)m * 4);
                        float *sw = malloc((size_t)n * 4), *bias = malloc((size_t)n * 4);
                        float *yf = malloc((size_t)m * n * 4);
                        for (size_t i = 0; i < (size_t)m * k; ++i)
                            x[i] = (float)q[i] * 0.01f;
                        for (int j = 0; j < n; ++j)
                            sw[j] = 0.02f, bias[j] = (float)j;
                        if (lbk_s8_linear(x, 0, m, k, k, (int64_t)m * k * 4, sx, 1, 1, NULL,
                                          seven ? -64 : -127, seven ? 63 : 127, wp, pb, n, NULL,
                                          sw, bias, th == 2, 0, yf, 0, (int64_t)m * n * 4,
                                          th, NULL) != LB_OK)
                            return -1;
                        /* input smoothing: x with k factors equals x * factors without */
                        float *sm = malloc((size_t)k * 4), *ys = malloc((size_t)m * n * 4);
                        for (int l = 0; l < k; ++l)
                            sm[l] = 0.5f + 0.25f * (float)(l % 7);
                        for (size_t i = 0; i < (size_t)m * k; ++i)
                            x[i] *= sm[i % (size_t)k];
                        if (lbk_s8_linear(x, 0, m, k, k, (int64_t)m * k * 4, sx, 1, 1, NULL,
                                          seven ? -64 : -127, seven ? 63 : 127, wp, pb, n, NULL,
                                          sw, bias, 0, 0, yf, 0, (int64_t)m * n * 4, th,
                                          NULL) != LB_OK)
                            return -1;
                        for (size_t i = 0; i < (size_t)m * k; ++i)
                            x[i] = (float)q[i] * 0.01f;
                        if (lbk_s8_linear(x, 0, m, k, k, (int64_t)m * k * 4, sx, 1, 1, NULL,
                                          seven ? -64 : -127, seven ? 63 : 127, wp, pb, n, NULL,
                                          sw, bias, 0, 0, ys, 0, (int64_t)m * n * 4, th,
                                          sm) != LB_OK)
                            return -1;
                        fails += memcmp(yf, ys, (size_t)m * n * 4) != 0;
                        ++*runs;
                        free(q), free(w), free(wp), free(y), free(x), free(sx), free(sw);
                        free(bias), free(yf), free(sm), free(ys);
                    }
    }
    lbk_s8_split_mode(-1);
    return fails;
}

/* INT4 x INT8 panels: K not a multiple of the group, N not a multiple of 16, scale and
 * zero-point arrays of exactly the pair-major size; AMX tiles (where built) against the
 * panels, and 1 against 2 threads: the same bits. */
static int u4_cases(int *runs) {
    const int ms[] = {1, 2, 3, 6, 7, 17, 33, 130};
    const int ns[] = {8, 17, 33, 100};
    const int gs[] = {32, 64, 128, 256};
    int fails = 0;
    for (unsigned a = 0; a < sizeof ms / sizeof *ms; ++a)
        for (unsigned b = 0; b < sizeof ns / sizeof *ns; ++b)
            for (unsigned c = 0; c < sizeof gs / sizeof *gs; ++c) {
                const int m = ms[a], n = ns[b], g = gs[c], groups = 2, kp = groups * g;
                const int k = kp - 3;
                float *x = malloc((size_t)m * k * 4);
                for (size_t i = 0; i < (size_t)m * k; ++i)
                    x[i] = (float)(rand() % 2001 - 1000) / 100.0f;
                const int64_t wb = lbk_u4p_bytes(n, kp), cols = (n + 15) / 16 * 16;
                uint8_t *wp = malloc((size_t)wb), *z = malloc((size_t)groups * cols);
                float *s = malloc((size_t)groups * cols * 4);
                for (int64_t i = 0; i < wb; ++i)
                    wp[i] = (uint8_t)rand();
                for (int64_t i = 0; i < groups * cols; ++i)
                    s[i] = (float)(rand() % 100) / 1000.0f, z[i] = (uint8_t)(rand() % 16);
                float *y[3];
                for (int v = 0; v < 3; ++v) {
                    y[v] = malloc((size_t)m * n * 4);
                    lbk_amx_u4_min_rows(v == 0 ? 1 : 1 << 20); /* tiles, then panels */
                    if (lbk_u4p_linear(x, m, k, k, (int64_t)m * k, wp, wb, n, kp, g, s, z, NULL,
                                       0, y[v], (int64_t)m * n, v == 2 ? 2 : 1) != LB_OK)
                        return -1;
                }
                fails += memcmp(y[0], y[1], (size_t)m * n * 4) != 0;
                fails += memcmp(y[1], y[2], (size_t)m * n * 4) != 0;
                /* AWQ input smoothing: x with k factors (one row from its float values: an
                 * Inf) equals x * factors without */
                float *sm = malloc((size_t)k * 4);
                for (int l = 0; l < k; ++l)
                    sm[l] = 0.5f + 0.25f * (float)(l % 5);
                x[k / 2] = INFINITY;
                if (lbk_u4p_linear_s(x, m, k, k, (int64_t)m * k, wp, wb, n, kp, g, s, z, NULL,
                                     0, y[1], (int64_t)m * n, 2, sm) != LB_OK)
                    return -1;
                for (size_t i = 0; i < (size_t)m * k; ++i)
                    x[i] *= sm[i % (size_t)k];
                if (lbk_u4p_linear(x, m, k, k, (int64_t)m * k, wp, wb, n, kp, g, s, z, NULL, 0,
                                   y[0], (int64_t)m * n, 2) != LB_OK)
                    return -1;
                fails += memcmp(y[0], y[1], (size_t)m * n * 4) != 0;
                free(sm);
                ++*runs;
                free(x), free(wp), free(z), free(s), free(y[0]), free(y[1]), free(y[2]);
            }
    lbk_amx_u4_min_rows(LB_AMX_U4_MIN_ROWS);
    return fails;
}

int main(void) {
    int runs = 0;
    const int f8 = s8_cases(&runs), f4 = u4_cases(&runs);
    if (f8 < 0 || f4 < 0) {
        printf("an entry point refused valid arguments\n");
        return 2;
    }
    printf("isa %s runs %d fails %d\n", lbk_isa(), runs, f8 + f4);
    return f8 + f4 != 0;
}
