/* What ema_forward.c and ema_backward.c share. */
#ifndef EMA_KERNELS_H
#define EMA_KERNELS_H
#include <stdlib.h>
#include <string.h>

/* 16 floats: one AVX-512 register (the compiler splits it where the CPU has narrower ones). */
typedef float v16 __attribute__((vector_size(64), aligned(4)));
typedef int v16i __attribute__((vector_size(64), aligned(4)));  /* lane masks for v16 */

/* The 16 floats at p, with the lanes whose mask is 0 (not -1) read as 0.0f: a row's last vector without
   whatever lies past the row's end. */
static inline v16 load_masked(const float *p, const int *mask) {
    return (v16)(*(const v16i *)p & *(const v16i *)mask);
}

/* The sum of a vector's lanes as a tree (a loop over its 16 lanes is a chain of 15 dependent adds). */
static inline float hsum16(v16 v) {
    const float a0 = (v[0] + v[8]) + (v[4] + v[12]), a1 = (v[1] + v[9]) + (v[5] + v[13]);
    const float a2 = (v[2] + v[10]) + (v[6] + v[14]), a3 = (v[3] + v[11]) + (v[7] + v[15]);
    return (a0 + a2) + (a1 + a3);
}

/* Hands out the next n floats of a thread's scratch (a NULL base only counts them). Each kernel carves its
   scratch in one layout function, used both to size it and to lay it out, so the two cannot drift apart. */
static float *carve(float *base, long *used, long n) {
    float *piece = base ? base + *used : NULL;
    *used += n;
    return piece;
}

/* out (m, L) = wt^T in: out[o][t] = sum_k wt[k][o] in[k][t], k < kn, with wt's rows zero-padded to cv * 16
   floats (m <= cv * 16). 16 outputs by 8 positions at a time, in registers: a single chain of FMAs along a
   short row is latency bound (the forward's gates and the backward's dpooled at 7x7), and eight chains hide
   that latency better than four. */
static void matmul_t16(const float *wt, long cv, long m, long kn, const float *in, long L, float *out) {
    for (long ov = 0; ov < cv; ov++) {
        const long no = m - ov * 16 < 16 ? m - ov * 16 : 16;
        for (long t0 = 0; t0 < L; t0 += 8) {
            const long nt = L - t0 < 8 ? L - t0 : 8;
            v16 s[8] = {{0}, {0}, {0}, {0}, {0}, {0}, {0}, {0}};
            for (long k = 0; k < kn; k++) {
                const v16 wk = *(const v16 *)(wt + (k * cv + ov) * 16);
                const float *ik = in + k * L + t0;
                if (nt == 8)  /* a constant trip count: the sums stay in registers */
                    for (long r = 0; r < 8; r++) s[r] += ik[r] * wk;
                else
                    for (long r = 0; r < nt; r++) s[r] += ik[r] * wk;
            }
            float tmp[8][16];
            memcpy(tmp, s, sizeof tmp);
            for (long r = 0; r < nt; r++)
                for (long l = 0; l < no; l++) out[(ov * 16 + l) * L + t0 + r] = tmp[r][l];
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
