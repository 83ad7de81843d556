/* Fused CPU kernels for supermask layers, called through ctypes from supermask/cpu_kernels.py.
 *
 * On a CPU the element-wise passes of a supermask step run at memory speed, so the bytes they
 * move are their cost. Eager PyTorch needs about eight weight-sized passes a step (|s|, compares,
 * counts, weight * mask; sign and two multiplies). Here a step takes two:
 *
 *   sm_band:   the masked weight out = w where |s| > hi, else 0, and the entries with
 *              lo <= |s| <= hi listed (flat index and |s|) for the exact selection, with the
 *              count above hi. In place (`update`), out already holds the previous step's masked
 *              weight and only the entries that changed are written: the pass then reads s and
 *              one state byte per entry (st, below) and writes almost nothing.
 *   sm_fixup:  after the selection, the listed entries: w if kept, 0 if not.
 *   sm_topk:   the three in one call (what a layer's step runs).
 *   sm_select: the r-th largest of a few values (the band's, or a small layer's |s|) and the
 *              counts above and equal to it.
 *   sm_mask:   out = w where |s| >= v, else 0, for a threshold known in advance; returns the count.
 *   sm_state:  st for a masked weight built elsewhere (the rare eager fallbacks).
 *   sm_grad:   out = (g * w) * sign(s), the straight-through gradient, in eager's order of
 *              operations (equal bit for bit); out may be g itself. sign(s) comes from st, and
 *              for a signed-constant weight (+-sigma) so does w: the pass reads g and one byte.
 *
 * Masked entries are written as 1 * w and 0 * w (-0 for a negative weight), as eager's
 * mask * w does. Threads: OpenMP (the runtime torch loaded, so its threads are shared), static
 * contiguous chunks, so the band lists of threads 0..T-1 concatenated are in flat order (split
 * ties keep the first ones).
 *
 * The file includes itself twice, once for float and once for double.
 */
#ifndef T
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#else /* a compiler without OpenMP (e.g. Apple's clang): one thread */
static int omp_get_thread_num(void) { return 0; }
static int omp_get_num_threads(void) { return 1; }
#endif

#define BLOCK 1024
#define MAX_THREADS 256
#define CHUNK_LO(n, t, nt) ((int64_t)((__int128)(n) * (t) / (nt)))

#define T float
#define FABS fabsf
#define NAME(x) x##_f32
#include "cpu_kernels.c" /* this file again, for T */
#undef T
#undef FABS
#undef NAME

#define T double
#define FABS fabs
#define NAME(x) x##_f64
#include "cpu_kernels.c" /* this file again, for T */

#else

/* A byte of state per entry beside the masked weight: bit 0 kept, bit 1 s > 0, bit 2 s < 0,
 * bit 3 w < 0. The forward pass compares it with what s says now and writes only the entries
 * that changed (reading a quarter of the bytes that reading the masked weight would); the
 * backward pass reads sign(s) from it, and for a weight of one magnitude (signed constant) the
 * weight too: one byte per entry instead of eight. */
#define KEPT 1
#define WNEG 8
#define SIGNS(x) ((unsigned char)((((x) > 0) << 1) | (((x) < 0) << 2)))
#define WSIGN(x) ((unsigned char)(((x) < 0) << 3))

T NAME(sm_select)(const T *x, int64_t n, int64_t r, int absolute, T *scratch, int64_t *counts);

/* Returns the number of listed entries, or -1 when a thread's list overflowed cap (the lists
 * are then incomplete; out and st are still right outside the band). counts[0]: entries above
 * hi. update: out and st hold a previous step's; else both are written in full. */
int64_t NAME(sm_band)(const T *s, const T *w, T *out, unsigned char *st, int64_t n, T lo, T hi, int update,
                      int64_t cap, int64_t *idx, T *vals, int64_t *counts, int nthreads) {
    int64_t above_t[MAX_THREADS], band_t[MAX_THREADS];
    int used = 1;
    if (nthreads < 1) nthreads = 1;
    if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
#pragma omp parallel num_threads(nthreads)
    {
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
        int64_t i0 = CHUNK_LO(n, t, nt), i1 = CHUNK_LO(n, t + 1, nt);
        int64_t above = 0, nb = 0;
        int64_t *my_idx = idx + (int64_t)t * cap;
        T *my_vals = vals + (int64_t)t * cap;
        /* Per block: a branch-free loop (vectorized) counts and marks entries in a byte array
         * (1: in the band, 2: outside it and changed); the marks are then read eight at a
         * time, and the few marked entries handled one by one. */
        unsigned char mark[BLOCK + 8];
        for (int64_t b0 = i0; b0 < i1; b0 += BLOCK) {
            int64_t len = i1 - b0 < BLOCK ? i1 - b0 : BLOCK;
            const T *sb = s + b0, *wb = w + b0;
            T *ob = out + b0;
            unsigned char *stb = st + b0;
            if (update) {
                for (int64_t j = 0; j < len; j++) {
                    T x = sb[j], a = FABS(x);
                    int is_above = a > hi, in_band = (a >= lo) & (a <= hi);
                    unsigned char now = (unsigned char)((stb[j] & WNEG) | is_above | SIGNS(x));
                    above += is_above;
                    mark[j] = (unsigned char)(in_band | ((now != stb[j]) << 1));
                }
            } else {
                for (int64_t j = 0; j < len; j++) {
                    T x = sb[j], a = FABS(x), wj = wb[j];
                    int is_above = a > hi;
                    ob[j] = (T)is_above * wj;
                    stb[j] = (unsigned char)(is_above | SIGNS(x) | WSIGN(wj));
                    above += is_above;
                    mark[j] = (unsigned char)((a >= lo) & (a <= hi));
                }
            }
            memset(mark + len, 0, 8);
            for (int64_t j = 0; j < len; j += 8) {
                uint64_t word;
                memcpy(&word, mark + j, 8);
                if (!word) continue;
                for (int64_t q = j; q < j + 8; q++) {
                    if (!mark[q]) continue;
                    T x = sb[q], a = FABS(x);
                    if (mark[q] & 1) { /* in the band: listed for sm_fixup, which sets KEPT */
                        stb[q] = (unsigned char)((stb[q] & (WNEG | KEPT)) | SIGNS(x));
                        if (nb < cap) {
                            my_idx[nb] = b0 + q;
                            my_vals[nb] = a;
                        }
                        nb++;
                    } else { /* outside the band and changed: kept side or sign of s */
                        int is_above = a > hi;
                        if ((stb[q] & KEPT) != is_above) ob[q] = (T)is_above * wb[q];
                        stb[q] = (unsigned char)((stb[q] & WNEG) | is_above | SIGNS(x));
                    }
                }
            }
        }
        above_t[t] = above;
        band_t[t] = nb;
        if (t == 0) used = nt;
    }
    int64_t above = 0, total = 0;
    int overflow = 0;
    for (int t = 0; t < used; t++) {
        above += above_t[t];
        overflow |= band_t[t] > cap;
    }
    counts[0] = above;
    if (overflow) return -1;
    for (int t = 0; t < used; t++) { /* the per-thread lists made contiguous, in thread order */
        if (t && band_t[t]) {
            memmove(idx + total, idx + (int64_t)t * cap, band_t[t] * sizeof(int64_t));
            memmove(vals + total, vals + (int64_t)t * cap, band_t[t] * sizeof(T));
        }
        total += band_t[t];
    }
    return total;
}

/* The listed entries: kept (w) when above v, or equal to v among the first `ties` equal ones
 * in list order (all of them if ties < 0); else 0. st must say what out holds for them. */
void NAME(sm_fixup)(const T *w, T *out, unsigned char *st, const int64_t *idx, const T *vals, int64_t nb, T v,
                    int64_t ties) {
    for (int64_t j = 0; j < nb; j++) {
        T a = vals[j];
        int keep = a > v;
        if (a == v && ties != 0) {
            keep = 1;
            if (ties > 0) ties--;
        }
        int64_t i = idx[j];
        if ((st[i] & KEPT) != keep) { /* only the few that cross v: w and out are not read otherwise */
            out[i] = (T)keep * w[i];
            st[i] = (unsigned char)((st[i] & ~KEPT) | keep);
        }
    }
}

/* A layer's step in one call: sm_band, then the selection among the listed entries and
 * sm_fixup. Returns 0 when done; 1 when the threshold is not in the band or a list overflowed
 * (out and st are then right outside the band only: the caller falls back). res: the threshold,
 * the number listed, the count above hi (doubles: exact for these values). */
int NAME(sm_topk)(const T *s, const T *w, T *out, unsigned char *st, int64_t n, int64_t n_keep, T lo, T hi,
                  int update, int64_t cap, int64_t *idx, T *vals, T *scratch, double *res, int nthreads) {
    int64_t counts[2];
    int64_t nb = NAME(sm_band)(s, w, out, st, n, lo, hi, update, cap, idx, vals, counts, nthreads);
    int64_t c_hi = counts[0];
    res[1] = (double)nb;
    res[2] = (double)c_hi;
    if (nb < 0 || c_hi >= n_keep || n_keep > c_hi + nb) return 1;
    T v = NAME(sm_select)(vals, nb, n_keep - c_hi, 0, scratch, counts);
    int64_t ties = n_keep - c_hi - counts[0]; /* entries equal to v that are kept */
    NAME(sm_fixup)(w, out, st, idx, vals, nb, v, ties != counts[1] ? ties : -1);
    res[0] = (double)v;
    return 0;
}

/* out = w where |s| >= v, else 0, and st in full; returns how many were kept. */
int64_t NAME(sm_mask)(const T *s, const T *w, T *out, unsigned char *st, int64_t n, T v, int nthreads) {
    int64_t kept = 0;
#pragma omp parallel for num_threads(nthreads) schedule(static) reduction(+ : kept)
    for (int64_t i = 0; i < n; i++) {
        int keep = FABS(s[i]) >= v;
        out[i] = (T)keep * w[i];
        st[i] = (unsigned char)(keep | SIGNS(s[i]) | WSIGN(w[i]));
        kept += keep;
    }
    return kept;
}

/* st for a masked weight built elsewhere: kept where out != 0 (an entry whose weight is 0 reads
 * as dropped, which changes no value). */
void NAME(sm_state)(const T *s, const T *w, const T *out, unsigned char *st, int64_t n, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t i = 0; i < n; i++) st[i] = (unsigned char)((out[i] != (T)0) | SIGNS(s[i]) | WSIGN(w[i]));
}

/* out = (g * w) * sign(s), sign(s) from st: torch.mul(g, w).mul_(torch.sign(s)) bit for bit.
 * With w == NULL every weight is +-sigma, its sign in st. */
void NAME(sm_grad)(const T *g, const T *w, T sigma, const unsigned char *st, T *out, int64_t n, int nthreads) {
    if (w) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int64_t i = 0; i < n; i++) {
            T sign = (T)((st[i] >> 1) & 1) - (T)((st[i] >> 2) & 1);
            out[i] = (g[i] * w[i]) * sign;
        }
    } else {
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int64_t i = 0; i < n; i++) {
            T sign = (T)((st[i] >> 1) & 1) - (T)((st[i] >> 2) & 1);
            T wi = (st[i] & WNEG) ? -sigma : sigma;
            out[i] = (g[i] * wi) * sign;
        }
    }
}

/* The r-th largest (1 <= r <= n) of x (of |x| with absolute), with how many entries are above
 * and equal to it in counts[0], counts[1]. Quickselect (Hoare partition, median-of-three) on a
 * copy in scratch (n entries); NaNs are not expected (callers pass none). */
T NAME(sm_select)(const T *x, int64_t n, int64_t r, int absolute, T *scratch, int64_t *counts) {
    for (int64_t i = 0; i < n; i++) scratch[i] = absolute ? FABS(x[i]) : x[i];
    int64_t lo = 0, hi = n - 1, k = r - 1; /* k-th in descending order */
    while (lo < hi) {
        int64_t mid = lo + (hi - lo) / 2;
        T a = scratch[lo], b = scratch[mid], c = scratch[hi];
        T pivot = (a > b) ? ((b > c) ? b : ((a > c) ? c : a)) : ((a > c) ? a : ((b > c) ? c : b));
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (scratch[i] > pivot) i++;
            while (scratch[j] < pivot) j--;
            if (i <= j) {
                T tmp = scratch[i];
                scratch[i] = scratch[j];
                scratch[j] = tmp;
                i++;
                j--;
            }
        }
        if (k <= j) hi = j;
        else if (k >= i) lo = i;
        else break; /* j < k < i: scratch[k] == pivot */
    }
    T v = scratch[k];
    int64_t above = 0, equal = 0;
    for (int64_t i = 0; i < n; i++) {
        T a = absolute ? FABS(x[i]) : x[i];
        above += a > v;
        equal += a == v;
    }
    counts[0] = above;
    counts[1] = equal;
    return v;
}

#endif
