/* EMA's backward on the CPU in one thread per group (fp32): ema_hub/layers/native.py compiles it beside
   ema_forward.c and calls it from the hand-written backward (ema.py, _EMAFunction).

   The algebra is that of _EMAFunction.backward's full-size part: the logit gradient g, a - shift recomputed,
   dk and dbias, the per-channel algebra of _coefficients backwards (for one group), da, the gates' gradient
   du, dpooled = w1^T du, and the input gradient with the pooling's and the one-output 3x3 term's shares,
   plus that term's tap gradient. PyTorch makes each step a pass over the whole batch (about a dozen); here a
   thread reads a group's x and dy from memory, keeps them in its cache for every step and writes dx once.
   What the parameters' gradients need besides (sums over the batch) is returned per group. */
#include "ema_kernels.h"

typedef struct {
    const float *x, *dy;             /* (n, c, H, W): groups folded into the batch */
    const float *gate;               /* (n, H, W): sigmoid(cross) */
    const float *gates;              /* (n, c, H + W): the h-gate then the w-gate */
    const float *shift;              /* (n, c): the shift of _shift */
    const float *k, *mu, *var, *rstd, *s2;  /* (n, c): from _coefficients */
    const float *gamma, *beta;       /* gn (c) */
    const float *w1;                 /* conv1x1 (c, c), rows zero-padded to a multiple of 16 */
    const float *taps_e;             /* (c, c * 9): (out, in x edge) */
    const float *taps_mix;           /* (9, c) */
    float *dx;                       /* (n, c, H, W) */
    float *dk, *dlogit;              /* (n, c) */
    float *dbias;                    /* (n) */
    float *du;                       /* (n, c, H + W) */
    float *dtaps;                    /* (n, 9, c): gradient of taps_mix, per group */
    long n, c, h, w;
    int threads;
} BackArgs;

/* Per-thread scratch. */
typedef struct {
    float *gp;                       /* g's pixel (i, j) at [(i + 1) Wp + j + 1]; the border stays zero */
    float *colv;                     /* (W): per-column sums */
    float *ds2, *drstd, *dmu, *dq, *ds;  /* (c) each */
    float *dedges;                   /* (c, 9) */
    float *dpooled;                  /* (c, L) */
    float *drows, *dcols;            /* (H), (W): row and column terms */
    float *dcol;                     /* (9, W): the tap gradients' column sums */
} Scratch;

/* Carves S out of base (NULL: only counts); returns its size in floats. */
static long scratch_layout(long c, long h, long w, float *base, Scratch *S) {
    long used = 0;
    S->gp = carve(base, &used, (h + 2) * (w + 2));
    S->colv = carve(base, &used, w);
    S->ds2 = carve(base, &used, c);
    S->drstd = carve(base, &used, c);
    S->dmu = carve(base, &used, c);
    S->dq = carve(base, &used, c);
    S->ds = carve(base, &used, c);
    S->dedges = carve(base, &used, 9 * c);
    S->dpooled = carve(base, &used, c * (h + w));
    S->drows = carve(base, &used, h);
    S->dcols = carve(base, &used, w);
    S->dcol = carve(base, &used, 9 * w);
    return used;
}

static long scratch_floats(long c, long h, long w) {
    Scratch S;
    return scratch_layout(c, h, w, NULL, &S);
}

static void group_backward(const BackArgs *A, long g, float *scratch) {
    const long c = A->c, H = A->h, W = A->w, P = H * W, L = H + W, Wp = W + 2;
    const float *x = A->x + g * c * P, *dy = A->dy + g * c * P, *gate = A->gate + g * P;
    const float *gates = A->gates + g * c * L, *shift = A->shift + g * c;
    const float *k = A->k + g * c, *mu = A->mu + g * c, *var = A->var + g * c;
    const float *rstd = A->rstd + g * c, *s2 = A->s2 + g * c;
    float *dx = A->dx + g * c * P, *du = A->du + g * c * L, *dtaps = A->dtaps + g * 9 * c;
    float *dk = A->dk + g * c, *dlogit = A->dlogit + g * c;
    Scratch T;
    scratch_layout(c, H, W, scratch, &T);
    float *gp = T.gp, *colv = T.colv, *ds2 = T.ds2, *drstd = T.drstd, *dmu = T.dmu, *dq = T.dq, *ds = T.ds;
    float *dedges = T.dedges, *dpooled = T.dpooled, *drows = T.drows, *dcols = T.dcols, *dcol = T.dcol;

    /* 1. g = sum_c dy x, times sigmoid'(cross), into the padded map (row by row, channel-major reads). */
    for (long i = 0; i < H; i++) {
        float *gr = gp + (i + 1) * Wp + 1;
        for (long j = 0; j < W; j++) gr[j] = 0.f;
        for (long ch = 0; ch < c; ch++) {
            const float *xr = x + ch * P + i * W, *dr = dy + ch * P + i * W;
#pragma omp simd
            for (long j = 0; j < W; j++) gr[j] += dr[j] * xr[j];
        }
        const float *gt = gate + i * W;
#pragma omp simd
        for (long j = 0; j < W; j++) gr[j] *= gt[j] * (1.f - gt[j]);
    }
    float dbias = 0.f;
    for (long i = 0; i < H; i++)
        for (long j = 0; j < W; j++) dbias += gp[(i + 1) * Wp + j + 1];
    A->dbias[g] = dbias;

    /* 2. dk = sum_p g (a - shift), per column first. */
    for (long ch = 0; ch < c; ch++) {
        const float *gh = gates + ch * L, *gw = gh + H, *xc = x + ch * P;
        const float sh = shift[ch];
        for (long j = 0; j < W; j++) colv[j] = 0.f;
        for (long i = 0; i < H; i++) {
            const float ghi = gh[i], *xr = xc + i * W, *gr = gp + (i + 1) * Wp + 1;
#pragma omp simd
            for (long j = 0; j < W; j++) colv[j] += gr[j] * (xr[j] * ghi * gw[j] - sh);
        }
        float s = 0.f;
        for (long j = 0; j < W; j++) s += colv[j];
        dk[ch] = s;
    }

    /* 3. The per-channel algebra of _coefficients, backwards (as in _EMAFunction.backward). */
    float dot = 0.f;
    for (long o = 0; o < c; o++) {
        const float gm = A->gamma[o], base = dk[o] - dbias * mu[o];
        ds2[o] = dk[o] * gm * rstd[o] + dbias * (A->beta[o] - gm * mu[o] * rstd[o]);
        drstd[o] = s2[o] * gm * base;
        dmu[o] = -dbias * s2[o] * gm * rstd[o];
        dot += s2[o] * ds2[o];
    }
    for (long o = 0; o < c; o++) {
        dlogit[o] = s2[o] * (ds2[o] - dot);
        const float r = rstd[o], dvar = var[o] >= 0.f ? -0.5f * drstd[o] * r * r * r : 0.f;
        dq[o] = dvar / P;
        ds[o] = (dmu[o] - 2.f * mu[o] * dvar) / P;
    }
    for (long t = 0; t < 9 * c; t++) dedges[t] = 0.f;
    for (long o = 0; o < c; o++) {
        const float d = dlogit[o] / P, *te = A->taps_e + o * c * 9;
#pragma omp simd
        for (long t = 0; t < 9 * c; t++) dedges[t] += d * te[t];
    }

    /* 4. da = 2 dq (a - shift) + k g + ds, kept in dx's place; the gates' gradients are the row sums of
       da x gate_w and the column sums of da x gate_h, times sigmoid'. */
    for (long ch = 0; ch < c; ch++) {
        const float *gh = gates + ch * L, *gw = gh + H, *xc = x + ch * P;
        const float sh = shift[ch], q2 = 2.f * dq[ch], kc = k[ch], sc = ds[ch];
        float *dxc = dx + ch * P, *duc = du + ch * L;
        for (long j = 0; j < W; j++) colv[j] = 0.f;
        for (long i = 0; i < H; i++) {
            const float ghi = gh[i], *xr = xc + i * W, *gr = gp + (i + 1) * Wp + 1;
            float *dr = dxc + i * W, row = 0.f;
#pragma omp simd reduction(+ : row)
            for (long j = 0; j < W; j++) {
                const float da = q2 * (xr[j] * ghi * gw[j] - sh) + kc * gr[j] + sc, e = da * xr[j];
                dr[j] = da;
                row += e * gw[j];
                colv[j] += e * ghi;
            }
            duc[i] = row * ghi * (1.f - ghi);
        }
        for (long j = 0; j < W; j++) duc[H + j] = colv[j] * gw[j] * (1.f - gw[j]);
    }

    /* 5. dpooled = w1^T du. */
    matmul_t16(A->w1, (c + 15) / 16, c, c, du, L, dpooled);

    /* 6. dx = da gate_h gate_w + dy gate + the pooling's share (rows, columns, edge sums) + the one-output
       3x3 term's transpose: sum_t taps_mix[t] g shifted back; and that term's tap gradient sum_p g x. */
    for (long t = 0; t < 9 * c; t++) dtaps[t] = 0.f;
    const float *tm = A->taps_mix;
    for (long ch = 0; ch < c; ch++) {
        const float *gh = gates + ch * L, *gw = gh + H, *xc = x + ch * P, *dyc = dy + ch * P;
        const float *de = dedges + ch * 9, *dp = dpooled + ch * L;
        float *dxc = dx + ch * P;
        for (long i = 0; i < H; i++) drows[i] = dp[i] / W + de[0];
        for (long j = 0; j < W; j++) dcols[j] = dp[H + j] / H;
        drows[0] += de[1];
        drows[H - 1] += de[2];
        dcols[0] += de[3];
        dcols[W - 1] += de[4];
        const float t00 = tm[0 * c + ch], t01 = tm[1 * c + ch], t02 = tm[2 * c + ch];
        const float t10 = tm[3 * c + ch], t11 = tm[4 * c + ch], t12 = tm[5 * c + ch];
        const float t20 = tm[6 * c + ch], t21 = tm[7 * c + ch], t22 = tm[8 * c + ch];
        /* the tap gradients per column first: a reduction per short row would cost more than the row */
        for (long t = 0; t < 9 * W; t++) dcol[t] = 0.f;
        float *d0 = dcol, *d1 = d0 + W, *d2 = d1 + W, *d3 = d2 + W, *d4 = d3 + W, *d5 = d4 + W, *d6 = d5 + W;
        float *d7 = d6 + W, *d8 = d7 + W;
        for (long i = 0; i < H; i++) {
            /* tap (r, q) reads g at (i + 1 - r, j + 1 - q): padded row i + 2 - r, column j + 2 - q */
            const float *g0 = gp + (i + 2) * Wp + 2, *g1 = gp + (i + 1) * Wp + 2, *g2 = gp + i * Wp + 2;
            const float ghi = gh[i], dri = drows[i], *xr = xc + i * W, *dyr = dyc + i * W, *gt = gate + i * W;
            float *dr = dxc + i * W;
#pragma omp simd
            for (long j = 0; j < W; j++) {
                const float z00 = g0[j], z01 = g0[j - 1], z02 = g0[j - 2];
                const float z10 = g1[j], z11 = g1[j - 1], z12 = g1[j - 2];
                const float z20 = g2[j], z21 = g2[j - 1], z22 = g2[j - 2];
                const float xv = xr[j];
                d0[j] += z00 * xv; d1[j] += z01 * xv; d2[j] += z02 * xv;
                d3[j] += z10 * xv; d4[j] += z11 * xv; d5[j] += z12 * xv;
                d6[j] += z20 * xv; d7[j] += z21 * xv; d8[j] += z22 * xv;
                dr[j] = dr[j] * ghi * gw[j] + dyr[j] * gt[j] + dri + dcols[j]
                    + t00 * z00 + t01 * z01 + t02 * z02 + t10 * z10 + t11 * z11 + t12 * z12
                    + t20 * z20 + t21 * z21 + t22 * z22;
            }
        }
        for (long t = 0; t < 9; t++) {
            float v = 0.f;
            for (long j = 0; j < W; j++) v += dcol[t * W + j];
            dtaps[t * c + ch] = v;
        }
        dxc[0] += de[5];
        dxc[W - 1] += de[6];
        dxc[(H - 1) * W] += de[7];
        dxc[P - 1] += de[8];
    }
}

static void group_backward_ctx(const void *ctx, long g, float *scratch) { group_backward(ctx, g, scratch); }

/* Returns 0, or 1 when memory ran out (the outputs are then incomplete). */
int ema_backward(const BackArgs *A) {
    return for_each_group(A->n, A->threads, scratch_floats(A->c, A->h, A->w), group_backward_ctx, A);
}
