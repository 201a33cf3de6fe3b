/* What ema_forward.c and ema_backward.c share. */
#ifndef EMA_KERNELS_H
#define EMA_KERNELS_H
#include <stdlib.h>
#include <string.h>

/* One vector register of floats: VL lanes, 16 with AVX-512, 8 with AVX, else 4 (SSE, NEON). Wider than the
   registers, GCC lowers the vector arithmetic through memory, ten times slower (-DEMA_VL=n overrides, for
   tests). Weight rows are padded to multiples of 16 floats, which every VL divides. */
#ifndef EMA_VL
#if defined(__AVX512F__)
#define EMA_VL 16
#elif defined(__AVX__)
#define EMA_VL 8
#else
#define EMA_VL 4
#endif
#endif
#define VL EMA_VL

/* The edge sums' positions (EDGE_TOTAL, EDGE_FIRST_ROW, ...) are algebra.Edge's, which native.py defines on the
   compiler's command line: the order is written in one place. */
#ifndef EDGE_XLL
#error "compile through ema_hub/layers/native.py, which defines the EDGE_* positions from algebra.Edge"
#endif
#define ROUND_VL(n) (((n) + VL - 1) / VL * VL)
#define ROUND16(n) (((n) + 15) / 16 * 16)
typedef float vf __attribute__((vector_size(VL * 4), aligned(4)));
typedef int vfi __attribute__((vector_size(VL * 4), aligned(4)));  /* lane masks for vf */

/* The VL floats at p, with the lanes whose mask is 0 (not -1) read as 0.0f: a row's last vector without
   whatever lies past the row's end. */
static inline vf load_masked(const float *p, const int *mask) {
    return (vf)(*(const vfi *)p & *(const vfi *)mask);
}

/* The sum of a vector's lanes as a tree (a loop over the lanes is a chain of dependent adds). */
static inline float hsum(vf v) {
    float t[VL];
    memcpy(t, &v, sizeof t);
    for (int width = VL / 2; width > 0; width /= 2)
        for (int l = 0; l < width; l++) t[l] += t[l + width];
    return t[0];
}

/* Hands out the next n floats of a thread's scratch (a NULL base only counts them). Each kernel carves its
   scratch in one layout function, used both to size it and to lay it out, so the two cannot drift apart. */
static float *carve(float *base, long *used, long n) {
    float *piece = base ? base + *used : NULL;
    *used += n;
    return piece;
}

/* out (m, L) = wt^T in: out[o][t] = sum_k wt[k][o] in[k][t], k < kn, with wt's rows zero-padded to
   ROUND16(m) floats. VL outputs by 8 positions at a time, in registers: a single chain of FMAs along a short
   row is latency bound (the forward's gates and the backward's dpooled at 7x7), and eight chains hide that
   latency better than four. */
static void matmul_t(const float *wt, long m, long kn, const float *in, long L, float *out) {
    const long stride = ROUND16(m);
    for (long o0 = 0; o0 < m; o0 += VL) {
        const long no = m - o0 < VL ? m - o0 : VL;
        for (long t0 = 0; t0 < L; t0 += 8) {
            const long nt = L - t0 < 8 ? L - t0 : 8;
            vf s[8] = {{0}, {0}, {0}, {0}, {0}, {0}, {0}, {0}};
            for (long k = 0; k < kn; k++) {
                const vf wk = *(const vf *)(wt + k * stride + o0);
                const float *ik = in + k * L + t0;
                if (nt == 8)  /* a constant trip count: the sums stay in registers */
                    for (long r = 0; r < 8; r++) s[r] += ik[r] * wk;
                else
                    for (long r = 0; r < nt; r++) s[r] += ik[r] * wk;
            }
            float tmp[8][VL];
            memcpy(tmp, s, sizeof tmp);
            for (long r = 0; r < nt; r++)
                for (long l = 0; l < no; l++) out[(o0 + l) * L + t0 + r] = tmp[r][l];
        }
    }
}

/* Runs group(ctx, g, scratch) for g < n on `threads` OpenMP threads, one group at a time per thread, each
   thread with its own zeroed scratch of `floats` floats (zeroed: padding is read, only interiors written).
   Returns 0, or 1 when memory ran out (the outputs are then incomplete). */
static int for_each_group(long n, int threads, long floats, void (*group)(const void *, long, float *),
                          const void *ctx) {
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float *scratch = calloc((size_t)floats, sizeof(float));
        failed = scratch == NULL;
#pragma omp for schedule(static)
        for (long g = 0; g < n; g++)
            if (scratch) group(ctx, g, scratch);
        free(scratch);
    }
    return failed;
}

#endif
