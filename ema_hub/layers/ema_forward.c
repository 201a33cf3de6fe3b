/* EMA's forward on the CPU in one pass per group (fp32): ema_hub/layers/native.py compiles and calls it.

   The algebra is that of ema_hub/layers/algebra.py (ema_portable): pooling and edge sums, the gates, a - shift and
   its sums, the softmax s2, then cross = k . a + bias + a one-output 3x3 correlation of x, and out = x *
   sigmoid(cross). PyTorch runs each step as a pass over the whole batch (about a dozen full-size passes
   through memory); here a thread takes one group at a time (c channels, c * H * W floats: 100 KB at every
   ResNet-50 stage), reads it from memory once, keeps it in its cache for every step and writes the output
   once. Threads are OpenMP's: linked against the libgomp that PyTorch has loaded, they are PyTorch's own. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ema_kernels.h"

typedef struct {
    const float *x;                  /* (n, c, H, W): groups folded into the batch; channels_last: (B, H, W, C) */
    float *out;                      /* x's layout */
    float *gate;                     /* (n, H, W): sigmoid(cross), for the backward */
    float *pooled;                   /* (n, c, H + W): row means, then column means */
    float *edges;                    /* (n, c, 9): the edge sums of algebra.edge_sums */
    float *sums;                     /* (2, n, c): sum and sum of squares of a - shift */
    const float *w1, *b1;            /* conv1x1 (c, c), (c) */
    const float *gamma, *beta;       /* gn (c) */
    const float *w3, *b3;            /* conv3x3 (c, c, 3, 3), (c) */
    const float *taps_e;             /* (c, c, 9): conv3x3's weights against the edge sums (algebra.edge_taps) */
    float eps;
    long n, c, h, w;
    int threads;
    int channels_last;               /* x and out are (B, H, W, C), C = groups * c: read and written in place */
    long groups;
} Args;

/* What every group shares, from the parameters alone: made once per call. */
typedef struct {
    float *w1t;                      /* (c, ROUND16(c)): w1 transposed, zero padded */
    float *b1p;                      /* (ROUND16(c)) */
    float *taps_et;                  /* (ROUND16(c) / VL, c * 9, VL): taps_e (algebra.coefficients) transposed, zero
                                        padded, in blocks of VL outputs, each read front to back by step 4 */
    float *taps_mix;                 /* (9, c): the conv3x3 taps weighted by s1 = softmax(beta) */
    float const3;                    /* s1 . b3 */
} Shared;

/* exp with Cephes' expf polynomial on a vector (glibc's expf is a call, and GCC leaves a scalar version of
   this unvectorised: the float-to-int step). */
static inline vf exp_v(vf x) {
    const vf lo = x - x - 87.0f, hi = x - x + 88.0f;
    x = (vf)(((vfi)(x < lo) & (vfi)lo) | (~(vfi)(x < lo) & (vfi)x));
    x = (vf)(((vfi)(x > hi) & (vfi)hi) | (~(vfi)(x > hi) & (vfi)x));
    /* x log2(e) rounded to the nearest integer: adding 1.5 * 2^23 rounds it */
    const vf fx = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    x = x - fx * 0.693359375f + fx * 2.12194440e-4f;
    const vf z = x * x;
    vf y = x * 1.9875691500e-4f + 1.3981999507e-3f;
    y = y * x + 8.3334519073e-3f;
    y = y * x + 4.1665795894e-2f;
    y = y * x + 1.6666665459e-1f;
    y = y * x + 5.0000001201e-1f;
    y = y * z + x + 1.0f;
    return y * (vf)((__builtin_convertvector(fx, vfi) + 127) << 23);
}

/* sigmoid on n floats in place: whole vectors, then the tail in a zero-padded vector. */
static void sigmoid_inplace(float *p, long n) {
    long i = 0;
    for (; i + VL <= n; i += VL) {
        vf v;
        memcpy(&v, p + i, sizeof v);
        v = 1.0f / (1.0f + exp_v(-v));
        memcpy(p + i, &v, sizeof v);
    }
    if (i < n) {
        float t[VL] = {0};
        memcpy(t, p + i, (size_t)(n - i) * sizeof(float));
        vf v;
        memcpy(&v, t, sizeof v);
        v = 1.0f / (1.0f + exp_v(-v));
        memcpy(t, &v, sizeof v);
        memcpy(p + i, t, (size_t)(n - i) * sizeof(float));
    }
}

static int shared_init(const Args *A, Shared *S) {
    const long c = A->c, cp = ROUND16(c);
    float *mem = calloc((size_t)(c * cp + cp + c * 9 * cp + 9 * c + c), sizeof(float));
    if (!mem) return 1;
    S->w1t = mem;
    S->b1p = S->w1t + c * cp;
    S->taps_et = S->b1p + cp;
    S->taps_mix = S->taps_et + c * 9 * cp;
    float *s1 = S->taps_mix + 9 * c;
    for (long o = 0; o < c; o++) {
        S->b1p[o] = A->b1[o];
        for (long k = 0; k < c; k++) S->w1t[k * cp + o] = A->w1[o * c + k];
    }
    for (long o = 0; o < c; o++)
        for (long k = 0; k < c; k++) {
            const float *e = A->taps_e + (o * c + k) * 9;
            float *te = S->taps_et + ((o / VL) * c * 9 + k * 9) * VL + o % VL;
            for (int j = 0; j < 9; j++) te[j * VL] = e[j];
        }
    float mx = -INFINITY, den = 0.f;
    for (long o = 0; o < c; o++) mx = A->beta[o] > mx ? A->beta[o] : mx;
    for (long o = 0; o < c; o++) den += s1[o] = expf(A->beta[o] - mx);
    S->const3 = 0.f;
    for (long o = 0; o < c; o++) {
        s1[o] /= den;
        S->const3 += s1[o] * A->b3[o];
    }
    /* taps_mix[t][k] = sum_o s1[o] w3[o][k][t], read in w3's order (o innermost read floats 9c apart). */
    for (long o = 0; o < c; o++)
        for (long k = 0; k < c; k++)
            for (int t = 0; t < 9; t++) S->taps_mix[t * c + k] += s1[o] * A->w3[(o * c + k) * 9 + t];
    return 0;
}

/* Per-thread scratch. x and a - shift are kept with zero-padded rows of pitch W + 2, so that every 3x3 tap is
   an in-bounds read and taps that cross a row's end land in the padding; the buffers read or written in whole
   vectors have 16 floats (at least a vector) to spare at their end. */
typedef struct {
    long xs, zs;                     /* the strides: one channel of xpad (XS), one tap map of z (ZS) */
    float *xpad;                     /* channel ch's pixel (i, j) at [ch XS + 1 + (i + 1) Wp + j + 1] */
    float *apad;                     /* laid out as xpad */
    float *z;                        /* (9, ZS): step 5's tap maps, laid out as one channel of xpad */
    float *gates;                    /* (c, L): the h-gate then the w-gate */
    float *acc;                      /* (H, Wp): cross; pixel (i, j) at [i Wp + j + 1] */
    float *k, *s2;                   /* (c) each */
    float *gwq, *shq;                /* (Wp rounded up to VL) each: step 3's rows */
    int *rowmask, *colmask;          /* (Wp, W rounded up to VL): lanes inside a padded / a plain row */
    float *colq;                     /* (W rounded up to VL): step 1's column sums */
} Scratch;

/* Carves S out of base (NULL: only counts); returns its size in floats (an int takes a float's 4 bytes). */
static long scratch_layout(long c, long h, long w, float *base, Scratch *S) {
    const long wp = w + 2, xs = (h + 2) * wp + 2, zs = (xs + 31) / 16 * 16;
    S->xs = xs;
    S->zs = zs;
    long used = 0;
    S->xpad = carve(base, &used, c * xs + 16);
    S->apad = carve(base, &used, c * xs + 16);
    S->z = carve(base, &used, 9 * zs + 16);
    S->gates = carve(base, &used, c * (h + w));
    S->acc = carve(base, &used, h * wp + 16);
    S->k = carve(base, &used, c);
    S->s2 = carve(base, &used, c);
    S->gwq = carve(base, &used, wp + 15);
    S->shq = carve(base, &used, wp + 15);
    S->rowmask = (int *)carve(base, &used, wp + 15);
    S->colmask = (int *)carve(base, &used, w + 15);
    S->colq = carve(base, &used, w + 15);
    return used;
}

static long scratch_floats(long c, long h, long w) {
    Scratch S;
    return scratch_layout(c, h, w, NULL, &S);
}

/* The end of step 1 for one channel: its edge sums (at algebra.Edge's positions) from its row and column sums (pooled,
   H then W) and its corners x00, x0l, xl0, xll; then the sums made means. */
static void edges_and_means(float *pooled, long H, long W, float x00, float x0l, float xl0, float xll, float *e) {
    float *rows = pooled, *cols = pooled + H, total = 0.f;
    for (long i = 0; i < H; i++) total += rows[i];
    e[EDGE_TOTAL] = total; e[EDGE_FIRST_ROW] = rows[0]; e[EDGE_LAST_ROW] = rows[H - 1];
    e[EDGE_FIRST_COL] = cols[0]; e[EDGE_LAST_COL] = cols[W - 1];
    e[EDGE_X00] = x00; e[EDGE_X0L] = x0l; e[EDGE_XL0] = xl0; e[EDGE_XLL] = xll;
    const float rw = 1.0f / (float)W, rh = 1.0f / (float)H;  /* multiplies: divides are slow */
    for (long i = 0; i < H; i++) rows[i] *= rw;
    for (long j = 0; j < W; j++) cols[j] *= rh;
}

/* Step 4 of both forwards: s2 = softmax(edges . taps_e / P + b3) into s2, then k (as algebra.coefficients); returns the
   constant of cross. */
static float coefficients(const Args *A, const Shared *S, const float *edges, const float *sums,
                          const float *squares, long P, float *s2, float *k) {
    const long c = A->c;
    float mx = -INFINITY;
    for (long o0 = 0; o0 < c; o0 += VL) {
        vf l[4] = {{0}, {0}, {0}, {0}};
        const float *te = S->taps_et + o0 * c * 9;
        long t = 0;
        for (; t + 4 <= c * 9; t += 4)
            for (long r = 0; r < 4; r++) l[r] += edges[t + r] * *(const vf *)(te + (t + r) * VL);
        for (; t < c * 9; t++) l[0] += edges[t] * *(const vf *)(te + t * VL);
        const vf lsum = (l[0] + l[1]) + (l[2] + l[3]);
        float tmp[VL];
        memcpy(tmp, &lsum, sizeof tmp);
        const long no = c - o0 < VL ? c - o0 : VL;
        for (long j = 0; j < no; j++) {
            const long o = o0 + j;
            s2[o] = tmp[j] / (float)P + A->b3[o];
            mx = s2[o] > mx ? s2[o] : mx;
        }
    }
    float den = 0.f;
    for (long o = 0; o < c; o++) den += s2[o] = expf(s2[o] - mx);
    float bias = S->const3;
    for (long o = 0; o < c; o++) {
        s2[o] /= den;
        const float mu = sums[o] / P;
        float var = squares[o] / P - mu * mu;
        var = var > 0.f ? var : 0.f;
        const float rstd = 1.0f / sqrtf(var + A->eps);
        k[o] = s2[o] * A->gamma[o] * rstd;
        bias += s2[o] * (A->beta[o] - A->gamma[o] * mu * rstd);
    }

    return bias;
}

/* Step 2 of both forwards: gates (c, L) = sigmoid(w1 @ pooled + b1). */
static void gates_of(const Args *A, const Shared *S, const float *pooled, long L, float *gates) {
    const long c = A->c;
    matmul_t(S->w1t, c, c, pooled, L, gates);
    for (long o = 0; o < c; o++)
        for (long t = 0; t < L; t++) gates[o * L + t] += S->b1p[o];
    sigmoid_inplace(gates, c * L);
}

/* The shift of algebra.shift for one channel, from its gates and row means. */
static float shift_of(const float *gh, const float *gw, const float *rows, long H, long W) {
    float sh = 0.f, sw = 0.f;
    for (long i = 0; i < H; i++) sh += gh[i] * rows[i];
    for (long j = 0; j < W; j++) sw += gw[j];
    return (sh / H) * (sw / W);
}

static void group_forward(const Args *A, const Shared *S, long g, float *scratch) {
    const long c = A->c, H = A->h, W = A->w, P = H * W, L = H + W, Wp = W + 2;
    /* Channels_last: group g's pixel p is the c floats at x[p * ps] (likewise in out). */
    const long cl = A->channels_last, ps = c * A->groups;
    const long at = cl ? (g / A->groups) * P * ps + (g % A->groups) * c : g * c * P;
    const float *x = A->x + at;
    float *out = A->out + at;
    float *pooled = A->pooled + g * c * L;
    float *edges = A->edges + g * c * 9;
    float *gate = A->gate + g * P;
    Scratch T;
    scratch_layout(c, H, W, scratch, &T);
    const long XS = T.xs, ZS = T.zs;
    float *xpad = T.xpad, *apad = T.apad, *z = T.z, *gates = T.gates, *acc = T.acc, *k = T.k, *s2 = T.s2;
    float *gwq = T.gwq, *shq = T.shq, *colq = T.colq;
    int *rowmask = T.rowmask, *colmask = T.colmask;

    /* 1. Row and column sums, edge sums, pooled means; x copied into its padded rows. As step 3, in whole
       vectors along each row with the lanes past its end masked (the copy stores them as zeros into the padding
       and the next row, which overwrites them); a row whose vectors would read past the end of x is done a
       float at a time. Faster than a vectorised loop per row at every ResNet-50 stage, most on short rows. */
    const long Wx = ROUND_VL(W);
    const long x_size = A->n * c * P;
    for (long j = 0; j < Wx; j++) colmask[j] = j < W ? -1 : 0;
    if (cl)  /* (P, c) rows of x, C apart, into xpad's c padded maps; prefetched: the stride defeats the
                hardware's prefetcher */
        for (long i = 0; i < H; i++)
            for (long j = 0; j < W; j++) {
                const float *px = x + (i * W + j) * ps;
                __builtin_prefetch(px + 32 * ps);
                __builtin_prefetch(px + 32 * ps + c - 1);
                float *dst = xpad + 1 + (i + 1) * Wp + j + 1;
                for (long ch = 0; ch < c; ch++) dst[ch * XS] = px[ch];
            }
    for (long ch = 0; ch < c; ch++) {
        const float *xc = x + ch * P;
        float *xp = xpad + ch * XS + 1 + Wp + 1;
        float *rows = pooled + ch * L, *cols = rows + H;
        for (long j = 0; j < Wx; j++) colq[j] = 0.f;
        for (long i = 0; i < H; i++) {
            const float *xr = xc + i * W;
            float *xpr = xp + i * Wp;
            if (!cl && xr - A->x + Wx <= x_size) {
                vf rv = {0};
                for (long j0 = 0; j0 < Wx; j0 += VL) {
                    const vf xv = load_masked(xr + j0, colmask + j0);
                    *(vf *)(xpr + j0) = xv;
                    *(vf *)(colq + j0) += xv;
                    rv += xv;
                }
                rows[i] = hsum(rv);
            } else {  /* channels_last (xpad holds the row), or a row whose vectors would pass x's end */
                const float *src = cl ? xpr : xr;
                float r = 0.f;
                for (long j = 0; j < W; j++) {
                    colq[j] += src[j];
                    xpr[j] = src[j];
                    r += src[j];
                }
                rows[i] = r;
            }
        }
        for (long j = 0; j < W; j++) cols[j] = colq[j];
        const float *xl = xp + (H - 1) * Wp;  /* the last row, in xpad */
        edges_and_means(rows, H, W, xp[0], xp[W - 1], xl[0], xl[W - 1], edges + ch * 9);
    }

    /* 2. gates = sigmoid(w1 @ pooled + b1). */
    gates_of(A, S, pooled, L, gates);

    /* 3. a - shift (the shift of algebra.shift), into apad, and its sum and sum of squares. Whole vectors along each
       padded row, lanes past its end masked (stored as zeros, overwritten by the next row), summed in vector
       registers over the channel: a short row then costs one vector, not a vector, a scalar tail and a
       horizontal sum. */
    float *sums = A->sums + g * c, *squares = A->sums + A->n * c + g * c;
    const long Wq = ROUND_VL(Wp);
    for (long j = 0; j < Wq; j++) rowmask[j] = j < Wp ? -1 : 0;
    for (long ch = 0; ch < c; ch++) {
        const float *gh = gates + ch * L, *gw = gh + H, *rows = pooled + ch * L;
        const float shift = shift_of(gh, gw, rows, H, W);
        for (long j = 0; j < Wq; j++) {  /* the w-gate and the shift along a padded row, zero on the padding */
            const int inside = j >= 1 && j <= W;
            gwq[j] = inside ? gw[j - 1] : 0.f;
            shq[j] = inside ? shift : 0.f;
        }
        vf sv = {0}, qv = {0};
        for (long i = 0; i < H; i++) {
            const float ghi = gh[i];
            const long row = ch * XS + 1 + (i + 1) * Wp;
            for (long j0 = 0; j0 < Wq; j0 += VL) {
                const vf xv = load_masked(xpad + row + j0, rowmask + j0);
                const vf av = xv * ghi * *(const vf *)(gwq + j0) - *(const vf *)(shq + j0);
                *(vf *)(apad + row + j0) = av;
                sv += av;
                qv += av * av;
            }
        }
        sums[ch] = hsum(sv);
        squares[ch] = hsum(qv);
    }

    /* 4. s2, k and the constant. */
    const float bias = coefficients(A, S, edges, sums, squares, P, s2, k);

    /* 5. cross = bias + k . a + the 3x3 correlation of x with taps_mix. First the nine tap maps over the padded
       layout, z_t = sum_ch taps_mix[t][ch] x_ch (the centre tap's also takes k . a), VL pixels at a time in
       registers, one read of x and of a per channel; then cross[p] = bias + sum_t z_t shifted by tap t: about
       one cycle per vector FMA, where summing the taps per channel into cross, with nine unaligned reads of x
       each, was slower at every stage. */
    const float *tm = S->taps_mix;
    for (long q0 = 0; q0 < XS; q0 += VL) {
        vf zt[9] = {{0}, {0}, {0}, {0}, {0}, {0}, {0}, {0}, {0}};
        for (long ch = 0; ch < c; ch++) {
            const vf xv = *(const vf *)(xpad + ch * XS + q0), av = *(const vf *)(apad + ch * XS + q0);
            for (int t = 0; t < 9; t++) zt[t] += tm[t * c + ch] * xv;
            zt[4] += k[ch] * av;
        }
        for (int t = 0; t < 9; t++) *(vf *)(z + t * ZS + q0) = zt[t];
    }
    /* Tap (r, s) at output pixel p (acc's layout) reads padded position p + r Wp + s. */
    const long Q = H * Wp;
    for (long p0 = 0; p0 < Q; p0 += VL) {
        vf sum = {0};
        sum += bias;
        for (int r = 0; r < 3; r++)
            for (int t = 0; t < 3; t++) sum += *(const vf *)(z + (r * 3 + t) * ZS + p0 + r * Wp + t);
        *(vf *)(acc + p0) = sum;
    }

    /* 6. gate = sigmoid(cross) (over acc's padded rows as one vector: the padding is finite); out = x * gate. */
    sigmoid_inplace(acc, Q);
    for (long i = 0; i < H; i++) memcpy(gate + i * W, acc + i * Wp + 1, (size_t)W * sizeof(float));
    if (cl) {  /* x from xpad (in cache), out in (P, c) rows C apart */
        for (long i = 0; i < H; i++)
            for (long j = 0; j < W; j++) {
                const float gp = gate[i * W + j], *src = xpad + 1 + (i + 1) * Wp + j + 1;
                float *po = out + (i * W + j) * ps;
                __builtin_prefetch(po + 32 * ps, 1);
                __builtin_prefetch(po + 32 * ps + c - 1, 1);
                for (long ch = 0; ch < c; ch++) po[ch] = src[ch * XS] * gp;
            }
        return;
    }
    for (long ch = 0; ch < c; ch++) {
        const float *xc = x + ch * P;
        float *oc = out + ch * P;
#pragma omp simd
        for (long p = 0; p < P; p++) oc[p] = xc[p] * gate[p];
    }
}

/* channels_last with c a multiple of 8: the same steps pixel by pixel, each pixel's c channels as vectors of 8
   floats, read and written in place; transposing each group into channel maps, as group_forward does, cost
   more than the rest of the layer. */
typedef float v8 __attribute__((vector_size(32), aligned(4)));

/* Two vectors' lanes picked by constant indices (GCC before 12 has only __builtin_shuffle). */
#if defined(__clang__) || __GNUC__ >= 12
#define SHUFFLE8(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
typedef int v8i __attribute__((vector_size(32)));
#define SHUFFLE8(a, b, ...) __builtin_shuffle(a, b, (v8i){__VA_ARGS__})
#endif

/* The lane sums of eight vectors, as one vector: three rounds of pairwise shuffles and adds. */
static inline v8 sum8(const v8 *a) {
    v8 p[4], q[2];
    for (int i = 0; i < 4; i++)
        p[i] = SHUFFLE8(a[2 * i], a[2 * i + 1], 0, 8, 2, 10, 4, 12, 6, 14)
               + SHUFFLE8(a[2 * i], a[2 * i + 1], 1, 9, 3, 11, 5, 13, 7, 15);
    for (int i = 0; i < 2; i++)
        q[i] = SHUFFLE8(p[2 * i], p[2 * i + 1], 0, 1, 8, 9, 4, 5, 12, 13)
               + SHUFFLE8(p[2 * i], p[2 * i + 1], 2, 3, 10, 11, 6, 7, 14, 15);
    return SHUFFLE8(q[0], q[1], 0, 1, 2, 3, 8, 9, 10, 11) + SHUFFLE8(q[0], q[1], 4, 5, 6, 7, 12, 13, 14, 15);
}

/* A block of m consecutive groups of one sample is one task: each pixel's m * c channels (128 bytes at most
   block sizes) are read and written as one contiguous run, which the hardware's prefetcher follows; a group
   alone reads a fraction of each cache line, C floats apart. */
static long block_groups(const Args *A) {
    long m = 32 / A->c < 1 ? 1 : 32 / A->c;
    while (A->groups % m) m--;
    return m;
}

typedef struct {
    float *xq;                       /* (m, (H + 2) (W + 2) + 16, c): each group's x pixel-major, zero border */
    float *rows, *cols;              /* (m c), (W, m c): row and column sums */
    float *gates;                    /* (c, L) */
    float *gq;                       /* (L + 16, c): gates pixel-major */
    float *shift, *k, *s2;           /* (c) each */
} ScratchCL;

static long scratch_layout_cl(long m, long c, long h, long w, float *base, ScratchCL *S) {
    long used = 0;
    S->xq = carve(base, &used, m * ((h + 2) * (w + 2) + 16) * c);
    S->rows = carve(base, &used, m * c);
    S->cols = carve(base, &used, w * m * c);
    S->gates = carve(base, &used, c * (h + w));
    S->gq = carve(base, &used, (h + w + 16) * c);
    S->shift = carve(base, &used, c);
    S->k = carve(base, &used, c);
    S->s2 = carve(base, &used, c);
    return used;
}

#define V8(p) (*(v8 *)(p))
#define CV8(p) (*(const v8 *)(p))

/* One group's steps 2 to 5, its x in xq (pixel-major, zero border) and its pooled means and edge sums made:
   leaves the gate (sigmoid(cross)) in A->gate and the sums in A->sums. */
static void group_cross_cl(const Args *A, const Shared *S, long g, const float *xq, ScratchCL *T) {
    const long c = A->c, H = A->h, W = A->w, P = H * W, L = H + W, Wp = W + 2;
    float *pooled = A->pooled + g * c * L, *edges = A->edges + g * c * 9, *gate = A->gate + g * P;
    float *sums = A->sums + g * c, *squares = A->sums + A->n * c + g * c, *gq = T->gq;
#define XQ(i, j) (xq + ((i) * Wp + (j)) * c)  /* padded pixel (i, j): image pixel (i - 1, j - 1) */

    /* 2. The gates, then pixel-major in gq, and the shifts. */
    gates_of(A, S, pooled, L, T->gates);
    for (long ch = 0; ch < c; ch++) {
        const float *gc = T->gates + ch * L;
        for (long t = 0; t < L; t++) gq[t * c + ch] = gc[t];
        T->shift[ch] = shift_of(gc, gc + H, pooled + ch * L, H, W);
    }

    /* 3. The sums of a - shift and of its square, a = x * h-gate * w-gate, eight channels at a time. */
    for (long v = 0; v < c; v += 8) {
        v8 sv = {0}, qv = {0};
        const v8 shv = CV8(T->shift + v);
        for (long i = 0; i < H; i++) {
            const v8 ghv = CV8(gq + i * c + v);
            for (long j = 0; j < W; j++) {
                const v8 av = CV8(XQ(i + 1, j + 1) + v) * ghv * CV8(gq + (H + j) * c + v) - shv;
                sv += av;
                qv += av * av;
            }
        }
        V8(sums + v) = sv;
        V8(squares + v) = qv;
    }

    /* 4. s2, k and the constant. */
    const float bias = coefficients(A, S, edges, sums, squares, P, T->s2, T->k);

    /* 5. cross = bias + k . (a - shift) + the 3x3 correlation of x with taps_mix into the gate, eight channels
       by eight pixels of a row at a time: each pixel's sum over the channels in a vector, the eight summed
       across at once (sum8); lanes past the row's end read the padding and the next row, and are not stored. */
    for (long v = 0; v < c; v += 8) {
        const v8 kv = CV8(T->k + v), shv = CV8(T->shift + v);
        v8 tv[9];
        for (int t = 0; t < 9; t++) tv[t] = CV8(S->taps_mix + t * c + v);
        for (long i = 0; i < H; i++) {
            const float *x0 = XQ(i, 0) + v, *x1 = XQ(i + 1, 0) + v, *x2 = XQ(i + 2, 0) + v;
            const float *gw = gq + H * c + v;
            const v8 ghv = CV8(gq + i * c + v);
            float *row = gate + i * W;
            for (long j0 = 0; j0 < W; j0 += 8) {
                v8 acc[8];
                for (long l = 0; l < 8; l++) {
                    const long o = (j0 + l) * c;
                    acc[l] = kv * (CV8(x1 + o + c) * ghv * CV8(gw + o) - shv)
                             + tv[0] * CV8(x0 + o) + tv[1] * CV8(x0 + o + c) + tv[2] * CV8(x0 + o + 2 * c)
                             + tv[3] * CV8(x1 + o) + tv[4] * CV8(x1 + o + c) + tv[5] * CV8(x1 + o + 2 * c)
                             + tv[6] * CV8(x2 + o) + tv[7] * CV8(x2 + o + c) + tv[8] * CV8(x2 + o + 2 * c);
                }
                float part[8];
                const v8 sum = sum8(acc);
                memcpy(part, &sum, sizeof part);
                const long nj = W - j0 < 8 ? W - j0 : 8;
                for (long l = 0; l < nj; l++) row[j0 + l] = (v ? row[j0 + l] : bias) + part[l];
            }
        }
    }
    sigmoid_inplace(gate, P);
#undef XQ
}

/* channels_last with c a multiple of 8: the forward of block `blk` (m groups) pixel by pixel, each pixel's
   channels as vectors of 8 floats, x read and out written in place; transposing each group into channel maps,
   as group_forward does, cost more than the rest of the layer. */
static void block_forward_cl(const Args *A, const Shared *S, long m, long blk, float *scratch) {
    const long c = A->c, H = A->h, W = A->w, P = H * W, L = H + W, Wp = W + 2, ps = c * A->groups, mc = m * c;
    const long g0 = blk * m, at = (g0 / A->groups) * P * ps + (g0 % A->groups) * c;
    const float *x = A->x + at;
    float *out = A->out + at;
    ScratchCL T;
    scratch_layout_cl(m, c, H, W, scratch, &T);
    const long xqs = ((H + 2) * Wp + 16) * c;  /* one group's xq */
    float *rows = T.rows, *cols = T.cols;

    /* 1. x into each group's xq, row and column sums; then each group's edge sums and pooled means. */
    memset(cols, 0, (size_t)(W * mc) * sizeof(float));
    for (long i = 0; i < H; i++) {
        memset(rows, 0, (size_t)mc * sizeof(float));
        for (long j = 0; j < W; j++) {
            const float *px = x + (i * W + j) * ps;
            __builtin_prefetch(px + 8 * ps);
            __builtin_prefetch(px + 8 * ps + mc - 1);
            float *col = cols + j * mc, *dst = T.xq + ((i + 1) * Wp + j + 1) * c;
            for (long gi = 0; gi < m; gi++)
                for (long v = 0; v < c; v += 8) {
                    const long u = gi * c + v;
                    const v8 xv = CV8(px + u);
                    V8(dst + gi * xqs + v) = xv;
                    V8(rows + u) += xv;
                    V8(col + u) += xv;
                }
        }
        for (long u = 0; u < mc; u++) A->pooled[((g0 + u / c) * c + u % c) * L + i] = rows[u];
    }
    for (long j = 0; j < W; j++)
        for (long u = 0; u < mc; u++) A->pooled[((g0 + u / c) * c + u % c) * L + H + j] = cols[j * mc + u];
    for (long u = 0; u < mc; u++) {
        const long g = g0 + u / c, ch = u % c;
        const float *xq = T.xq + (u / c) * xqs + ch;
        edges_and_means(A->pooled + (g * c + ch) * L, H, W, xq[(Wp + 1) * c], xq[(Wp + W) * c], xq[(H * Wp + 1) * c],
                        xq[(H * Wp + W) * c], A->edges + (g * c + ch) * 9);
    }

    /* 2-5, per group. */
    for (long gi = 0; gi < m; gi++) group_cross_cl(A, S, g0 + gi, T.xq + gi * xqs, &T);

    /* 6. out = x * gate, each pixel's m * c channels in one run. */
    const float *gate = A->gate + g0 * P;
    for (long i = 0; i < H; i++)
        for (long j = 0; j < W; j++) {
            const long p = i * W + j, q = ((i + 1) * Wp + j + 1) * c;
            float *po = out + p * ps;
            __builtin_prefetch(po + 8 * ps, 1);
            __builtin_prefetch(po + 8 * ps + mc - 1, 1);
            for (long gi = 0; gi < m; gi++) {
                const float gp = gate[gi * P + p], *src = T.xq + gi * xqs + q;
                for (long v = 0; v < c; v += 8) V8(po + gi * c + v) = CV8(src + v) * gp;
            }
        }
}

typedef struct { const Args *A; const Shared *S; } Context;

static void group_forward_ctx(const void *ctx, long g, float *scratch) {
    const Context *C = ctx;
    group_forward(C->A, C->S, g, scratch);
}

typedef struct { const Args *A; const Shared *S; long m; } BlockContext;

static void block_forward_cl_ctx(const void *ctx, long blk, float *scratch) {
    const BlockContext *C = ctx;
    block_forward_cl(C->A, C->S, C->m, blk, scratch);
}

/* Returns 0, or 1 when memory ran out (the outputs are then incomplete). */
int ema_forward(const Args *A) {
    Shared S;
    if (shared_init(A, &S)) return 1;
    const Context C = {A, &S};
    int failed;
    if (A->channels_last && A->c % 8 == 0) {
        const BlockContext B = {A, &S, block_groups(A)};
        ScratchCL T;
        failed = for_each_group(A->n / B.m, A->threads, scratch_layout_cl(B.m, A->c, A->h, A->w, NULL, &T),
                                block_forward_cl_ctx, &B);
    } else {
        failed = for_each_group(A->n, A->threads, scratch_floats(A->c, A->h, A->w), group_forward_ctx, &C);
    }
    free(S.w1t);
    return failed;
}
