/* EMA's backward on the CPU in one thread per group (fp32): ema_hub/layers/native.py compiles it beside
   ema_forward.c and calls it from the hand-written backward (ops.py, ema_backward).

   The algebra is that of eager.backward_full_size: the logit gradient g, a - shift recomputed,
   dk and dbias, the per-channel algebra of algebra.coefficients backwards (for one group), da, the gates' gradient
   du, dpooled = w1^T du, and the input gradient with the pooling's and the one-output 3x3 term's shares,
   plus that term's tap gradient. PyTorch makes each step a pass over the whole batch (about a dozen); here a
   thread reads a group's x and dy from memory, keeps them in its cache for every step and writes dx once.
   What the parameters' gradients need besides (sums over the batch) is returned per group. */
#include "ema_kernels.h"

typedef struct {
    const float *x, *dy;             /* (n, c, H, W): groups folded into the batch */
    const float *gate;               /* (n, H, W): sigmoid(cross) */
    const float *gates;              /* (n, c, H + W): the h-gate then the w-gate */
    const float *shift;              /* (n, c): the shift of algebra.shift */
    const float *k, *mu, *var, *rstd, *s2;  /* (n, c): from algebra.coefficients */
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

/* Per-thread scratch. The full-size steps run over a channel's whole map as one flat vector of P pixels:
   along rows of 7 or 14 pixels most of a vector's lanes would idle and each row end in a scalar tail. What
   depends on the row or the column (the gate product, the pooling's share, du's sums) is laid out per pixel
   first or done in a short pass of its own: rows of 7 or 14 pixels left most vector lanes idle. */
typedef struct {
    float *z;                        /* (9, P): g shifted for each 3x3 tap (zero outside the map); tap 4 is g */
    float *gp;                       /* g's pixel (i, j) at [(i + 1) Wp + j + 1]; the border stays zero */
    float *prod;                     /* (P): gate_h x gate_w of one channel */
    float *colv;                     /* (W): per-column sums */
    float *ds2, *drstd, *dmu, *dq, *ds;  /* (c) each */
    float *dedges;                   /* (c, 9) */
    float *dpooled;                  /* (c, L) */
    float *drows, *dcols;            /* (H), (W): row and column terms */
} Scratch;

/* Carves S out of base (NULL: only counts); returns its size in floats. */
static long scratch_layout(long c, long h, long w, float *base, Scratch *S) {
    const long p = h * w;
    long used = 0;
    S->z = carve(base, &used, 9 * p);
    S->gp = carve(base, &used, (h + 2) * (w + 2));
    S->prod = carve(base, &used, p);
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
    return used;
}

static long scratch_floats(long c, long h, long w) {
    Scratch S;
    return scratch_layout(c, h, w, NULL, &S);
}

/* out (H, W) = gate_h x gate_w. */
static void gate_product(const float *gh, const float *gw, long H, long W, float *out) {
    for (long i = 0; i < H; i++)
        for (long j = 0; j < W; j++) out[i * W + j] = gh[i] * gw[j];
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
    float *z = T.z, *gp = T.gp, *prod = T.prod, *colv = T.colv;
    float *ds2 = T.ds2, *drstd = T.drstd, *dmu = T.dmu, *dq = T.dq, *ds = T.ds;
    float *dedges = T.dedges, *dpooled = T.dpooled, *drows = T.drows, *dcols = T.dcols;
    float *gm = z + 4 * P;           /* the logit gradient g, flat: the centre tap's map */

    /* 1. g = sum_c dy x, times sigmoid'(cross); then the padded map and from it the eight shifted taps:
       tap (r, q) reads g at (i + 1 - r, j + 1 - q). */
    for (long p = 0; p < P; p++) gm[p] = 0.f;
    for (long ch = 0; ch < c; ch++) {
        const float *xc = x + ch * P, *dc = dy + ch * P;
#pragma omp simd
        for (long p = 0; p < P; p++) gm[p] += dc[p] * xc[p];
    }
    float dbias = 0.f;
#pragma omp simd reduction(+ : dbias)
    for (long p = 0; p < P; p++) {
        gm[p] *= gate[p] * (1.f - gate[p]);
        dbias += gm[p];
    }
    A->dbias[g] = dbias;
    for (long i = 0; i < H; i++)
        for (long j = 0; j < W; j++) gp[(i + 1) * Wp + j + 1] = gm[i * W + j];
    for (long t = 0; t < 9; t++) {
        if (t == 4) continue;
        const float *src = gp + (2 - t / 3) * Wp + 2 - t % 3;
        float *zt = z + t * P;
        for (long i = 0; i < H; i++)
            for (long j = 0; j < W; j++) zt[i * W + j] = src[i * Wp + j];
    }

    /* 2. dk = sum_p g (a - shift) with a = x gate_h gate_w. */
    for (long ch = 0; ch < c; ch++) {
        const float *gh = gates + ch * L, *xc = x + ch * P, sh = shift[ch];
        gate_product(gh, gh + H, H, W, prod);
        float s = 0.f;
#pragma omp simd reduction(+ : s)
        for (long p = 0; p < P; p++) s += gm[p] * (xc[p] * prod[p] - sh);
        dk[ch] = s;
    }

    /* 3. The per-channel algebra of algebra.coefficients, backwards (as in eager.backward_full_size). */
    float dot = 0.f;
    for (long o = 0; o < c; o++) {
        const float gm_o = A->gamma[o], base = dk[o] - dbias * mu[o];
        ds2[o] = dk[o] * gm_o * rstd[o] + dbias * (A->beta[o] - gm_o * mu[o] * rstd[o]);
        drstd[o] = s2[o] * gm_o * base;
        dmu[o] = -dbias * s2[o] * gm_o * rstd[o];
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

    /* 4. da = 2 dq (a - shift) + k g + ds; dx's place keeps da gate_h gate_w, the input gradient's first term.
       The gates' gradients: du_h[i] = gate_h' sum_j da x gate_w and du_w[j] = gate_w' sum_i da x gate_h, which
       are (1 - gate) times the row and column sums of da gate_h gate_w x. (Those products are made in the
       sums' pass, not stored by the flat one: an array of them costs a full-size write and read.) */
    for (long ch = 0; ch < c; ch++) {
        const float *gh = gates + ch * L, *gw = gh + H, *xc = x + ch * P;
        const float sh = shift[ch], q2 = 2.f * dq[ch], kc = k[ch], sc = ds[ch];
        float *dxc = dx + ch * P, *duc = du + ch * L;
        gate_product(gh, gw, H, W, prod);
#pragma omp simd
        for (long p = 0; p < P; p++) {
            const float da = q2 * (xc[p] * prod[p] - sh) + kc * gm[p] + sc;
            dxc[p] = da * prod[p];
        }
        for (long j = 0; j < W; j++) colv[j] = 0.f;
        for (long i = 0; i < H; i++) {
            const float *dr = dxc + i * W, *xr = xc + i * W;
            float row = 0.f;
#pragma omp simd reduction(+ : row)
            for (long j = 0; j < W; j++) {
                const float e = dr[j] * xr[j];
                row += e;
                colv[j] += e;
            }
            duc[i] = row * (1.f - gh[i]);
        }
        for (long j = 0; j < W; j++) duc[H + j] = colv[j] * (1.f - gw[j]);
    }

    /* 5. dpooled = w1^T du. */
    matmul_t(A->w1, c, c, du, L, dpooled);

    /* 6. dx += dy gate + the one-output 3x3 term's transpose (sum_t taps_mix[t] z_t) + the pooling's share
       (rows, columns, edge sums); and that term's tap gradient, sum_p z_t x. */
    const float *tm = A->taps_mix;
    const float *z0 = z, *z1 = z + P, *z2 = z + 2 * P, *z3 = z + 3 * P, *z4 = gm, *z5 = z + 5 * P;
    const float *z6 = z + 6 * P, *z7 = z + 7 * P, *z8 = z + 8 * P;
    for (long ch = 0; ch < c; ch++) {
        const float *xc = x + ch * P, *dyc = dy + ch * P;
        const float *de = dedges + ch * 9, *dp = dpooled + ch * L;
        float *dxc = dx + ch * P;
        const float t0 = tm[0 * c + ch], t1 = tm[1 * c + ch], t2 = tm[2 * c + ch], t3 = tm[3 * c + ch];
        const float t4 = tm[4 * c + ch], t5 = tm[5 * c + ch], t6 = tm[6 * c + ch], t7 = tm[7 * c + ch];
        const float t8 = tm[8 * c + ch];
        float d0 = 0.f, d1 = 0.f, d2 = 0.f, d3 = 0.f, d4 = 0.f, d5 = 0.f, d6 = 0.f, d7 = 0.f, d8 = 0.f;
#pragma omp simd reduction(+ : d0, d1, d2, d3, d4, d5, d6, d7, d8)
        for (long p = 0; p < P; p++) {
            const float xv = xc[p];
            d0 += z0[p] * xv; d1 += z1[p] * xv; d2 += z2[p] * xv;
            d3 += z3[p] * xv; d4 += z4[p] * xv; d5 += z5[p] * xv;
            d6 += z6[p] * xv; d7 += z7[p] * xv; d8 += z8[p] * xv;
            dxc[p] += dyc[p] * gate[p] + t0 * z0[p] + t1 * z1[p] + t2 * z2[p] + t3 * z3[p] + t4 * z4[p]
                + t5 * z5[p] + t6 * z6[p] + t7 * z7[p] + t8 * z8[p];
        }
        float *dt = dtaps + ch;
        dt[0] = d0; dt[c] = d1; dt[2 * c] = d2; dt[3 * c] = d3; dt[4 * c] = d4;
        dt[5 * c] = d5; dt[6 * c] = d6; dt[7 * c] = d7; dt[8 * c] = d8;
        for (long i = 0; i < H; i++) drows[i] = dp[i] / W + de[EDGE_TOTAL];
        for (long j = 0; j < W; j++) dcols[j] = dp[H + j] / H;
        drows[0] += de[EDGE_FIRST_ROW];
        drows[H - 1] += de[EDGE_LAST_ROW];
        dcols[0] += de[EDGE_FIRST_COL];
        dcols[W - 1] += de[EDGE_LAST_COL];
        for (long i = 0; i < H; i++)
            for (long j = 0; j < W; j++) dxc[i * W + j] += drows[i] + dcols[j];
        dxc[0] += de[EDGE_X00];
        dxc[W - 1] += de[EDGE_X0L];
        dxc[(H - 1) * W] += de[EDGE_XL0];
        dxc[P - 1] += de[EDGE_XLL];
    }
}

static void group_backward_ctx(const void *ctx, long g, float *scratch) { group_backward(ctx, g, scratch); }

/* Returns 0, or 1 when memory ran out (the outputs are then incomplete). */
int ema_backward(const BackArgs *A) {
    return for_each_group(A->n, A->threads, scratch_floats(A->c, A->h, A->w), group_backward_ctx, A);
}
