/* The ledger's per-row reductions in one pass (torch_momentum.balance._native), and their sums
   into the units (tm_unit_sum, at the end of the first part of this file).

   For every "use" of a tensor, its three slots x (weight), v (velocity) and g (gradient), viewed
   as contiguous arrays of shape (pre, n, post), are reduced over each row j = the entries
   [a, j, c] for all a < pre, c < post:

     gram (linear = 0): the symmetric 3x3 Gram matrix G_j = sum_{a,c} s s^T, s = (x, v, g)[a,j,c],
                        9 doubles per row (row-major);
     sums (linear = 1): the sums sum_{a,c} (x, v, g)[a,j,c], 3 doubles per row.

   pre = 1 reads the rows along the leading dimension (a unit's entries are contiguous); pre > 1
   a later dimension (a matrix's columns, a convolution's input channels). Products and sums are
   accumulated in double whatever the slots' dtype. A use is seven int64: the tensor's index k
   (its slots are slots[k], slots[K + k], slots[2K + k]), pre, n, post, linear, the first row of
   its output in gram or sums, and lead: for a Gram use along dim 1 (pre = the leading
   dimension), the first row in gram of the rows along dim 0 too, computed in the same pass over
   the tensor (-1: none).

   Compiled once per machine with the system's C compiler (C99). The float and double versions
   are two instances of the code below, made by this file including itself twice (a quoted
   include is looked up next to the including file first). */

#ifndef TM_T

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define TM_CAT2(a, b) a##b
#define TM_CAT(a, b) TM_CAT2(a, b)

/* A loop whose iterations touch distinct entries (no dependence between them): vectorise it
   without run-time alias checks (gcc gives up on a loop of many streams otherwise). */
#if defined(__clang__)
#define TM_INDEPENDENT _Pragma("clang loop vectorize(assume_safety)")
#elif defined(__GNUC__)
#define TM_INDEPENDENT _Pragma("GCC ivdep")
#else
#define TM_INDEPENDENT
#endif

#define TM_T float
#define TM_SUFFIX _f32
#include "_rows.c"
#undef TM_T
#undef TM_SUFFIX

#define TM_T double
#define TM_SUFFIX _f64
#include "_rows.c"
#undef TM_T
#undef TM_SUFFIX

/* Rows of values summed into units: out (units x width) = sum over the entries i of
   factor[i] * values[src[i]], added into row dst[i] (out is zeroed first). The indices are
   checked when the entries are made. */
void tm_unit_sum(const int64_t *src, const int64_t *dst, const double *factor, int64_t entries,
                 const double *values, int64_t width, double *out, int64_t units) {
  memset(out, 0, sizeof(double) * (size_t)(units * width));
  for (int64_t i = 0; i < entries; ++i) {
    const double f = factor[i], *r = values + src[i] * width;
    double *o = out + dst[i] * width;
    for (int64_t c = 0; c < width; ++c) o[c] += f * r[c];
  }
}

#else /* one dtype's instance: TM_T the slots' type, TM_SUFFIX its names' suffix */

#define TM_NAME(name) TM_CAT(name, TM_SUFFIX)

/* The six distinct entries xx, xv, xg, vv, vg, gg of the Gram matrix of m contiguous entries. */
static inline void TM_NAME(gram_of)(const TM_T *x, const TM_T *v, const TM_T *g, int64_t m,
                                    double e[6]) {
  double xx = 0, xv = 0, xg = 0, vv = 0, vg = 0, gg = 0;
  for (int64_t c = 0; c < m; ++c) {
    const double xi = x[c], vi = v[c], gi = g[c];
    xx += xi * xi, xv += xi * vi, xg += xi * gi;
    vv += vi * vi, vg += vi * gi, gg += gi * gi;
  }
  e[0] = xx, e[1] = xv, e[2] = xg, e[3] = vv, e[4] = vg, e[5] = gg;
}

/* The symmetric 3x3 matrix of the six entries e, written row-major to r (9 doubles). */
static inline void TM_NAME(store)(const double e[6], double *r) {
  r[0] = e[0], r[1] = e[1], r[2] = e[2], r[3] = e[1], r[4] = e[3], r[5] = e[4];
  r[6] = e[2], r[7] = e[4], r[8] = e[5];
}

/* G_j of every row j < n, rows contiguous (pre = 1), written to out (n x 9). */
static void TM_NAME(gram_rows)(const TM_T *x, const TM_T *v, const TM_T *g, int64_t n,
                               int64_t post, double *out) {
  for (int64_t j = 0; j < n; ++j) {
    double e[6];
    TM_NAME(gram_of)(x + j * post, v + j * post, g + j * post, post, e);
    TM_NAME(store)(e, out + 9 * j);
  }
}

/* Rows a, a+1, a+2, a+3 of an (pre, n) matrix (x, v, g start at row a) added into the column
   accumulators acc (6 x n: xx, xv, xg, vv, vg, gg of every column), one pass over the columns. */
static void TM_NAME(columns4)(const TM_T *restrict x, const TM_T *restrict v,
                              const TM_T *restrict g, int64_t n, double *restrict acc) {
  const TM_T *x1 = x + n, *x2 = x + 2 * n, *x3 = x + 3 * n;
  const TM_T *v1 = v + n, *v2 = v + 2 * n, *v3 = v + 3 * n;
  const TM_T *g1 = g + n, *g2 = g + 2 * n, *g3 = g + 3 * n;
  double *restrict axx = acc, *restrict axv = acc + n, *restrict axg = acc + 2 * n;
  double *restrict avv = acc + 3 * n, *restrict avg = acc + 4 * n, *restrict agg = acc + 5 * n;
  TM_INDEPENDENT
  for (int64_t j = 0; j < n; ++j) {
    const double a0 = x[j], a1 = x1[j], a2 = x2[j], a3 = x3[j];
    const double b0 = v[j], b1 = v1[j], b2 = v2[j], b3 = v3[j];
    const double c0 = g[j], c1 = g1[j], c2 = g2[j], c3 = g3[j];
    axx[j] += a0 * a0 + a1 * a1 + a2 * a2 + a3 * a3;
    axv[j] += a0 * b0 + a1 * b1 + a2 * b2 + a3 * b3;
    axg[j] += a0 * c0 + a1 * c1 + a2 * c2 + a3 * c3;
    avv[j] += b0 * b0 + b1 * b1 + b2 * b2 + b3 * b3;
    avg[j] += b0 * c0 + b1 * c1 + b2 * c2 + b3 * c3;
    agg[j] += c0 * c0 + c1 * c1 + c2 * c2 + c3 * c3;
  }
}

/* G_j of every row j < n along a later dimension (pre > 1), written to out (n x 9): the six
   distinct entries of all rows are accumulated side by side (acc, 6 x n), so that the pass
   runs through memory in order. With lead (not NULL), the Gram matrices of the rows along the
   leading dimension a < pre too, written to lead (pre x 9), from the same pass. Returns 1 where
   the accumulators cannot be allocated. */
static int TM_NAME(gram_later)(const TM_T *x, const TM_T *v, const TM_T *g, int64_t pre,
                               int64_t n, int64_t post, double *out, double *lead) {
  double *acc = calloc((size_t)(6 * n), sizeof(double)); /* entry i of column j: acc[i n + j] */
  if (acc == NULL) return 1;
  int64_t a = 0;
  if (post == 1) { /* a matrix's columns: four of its rows a time, into the accumulators */
    for (; a + 4 <= pre; a += 4) {
      TM_NAME(columns4)(x + a * n, v + a * n, g + a * n, n, acc);
      /* its rows while they are in cache */
      if (lead) TM_NAME(gram_rows)(x + a * n, v + a * n, g + a * n, 4, n, lead + 9 * a);
    }
  }
  for (; a < pre; ++a) {
    const TM_T *xa = x + a * n * post, *va = v + a * n * post, *ga = g + a * n * post;
    double r[6] = {0, 0, 0, 0, 0, 0};
    for (int64_t j = 0; j < n; ++j) {
      double e[6];
      TM_NAME(gram_of)(xa + j * post, va + j * post, ga + j * post, post, e);
      for (int i = 0; i < 6; ++i) acc[i * n + j] += e[i], r[i] += e[i];
    }
    if (lead) TM_NAME(store)(r, lead + 9 * a);
  }
  for (int64_t j = 0; j < n; ++j) {
    const double e[6] = {acc[j], acc[n + j], acc[2 * n + j], acc[3 * n + j], acc[4 * n + j],
                         acc[5 * n + j]};
    TM_NAME(store)(e, out + 9 * j);
  }
  free(acc);
  return 0;
}

/* The sums of every row j < n, written to out (n x 3). */
static void TM_NAME(sums)(const TM_T *x, const TM_T *v, const TM_T *g, int64_t pre, int64_t n,
                          int64_t post, double *out) {
  memset(out, 0, sizeof(double) * (size_t)(3 * n));
  for (int64_t a = 0; a < pre; ++a) {
    for (int64_t j = 0; j < n; ++j) {
      const int64_t o = (a * n + j) * post;
      double sx = 0, sv = 0, sg = 0;
      for (int64_t c = 0; c < post; ++c) sx += x[o + c], sv += v[o + c], sg += g[o + c];
      out[3 * j] += sx, out[3 * j + 1] += sv, out[3 * j + 2] += sg;
    }
  }
}

/* Every use's rows: slots (3K pointers), uses (U x 7 int64), gram (rows x 9) and sums (rows x 3)
   written. Returns 0, or 1 where memory ran out (the outputs are then incomplete). */
int TM_NAME(tm_rows)(const TM_T *const *slots, int64_t K, const int64_t *uses, int64_t U,
                     double *gram, double *sums) {
  for (int64_t u = 0; u < U; ++u) {
    const int64_t *s = uses + 7 * u;
    const int64_t k = s[0], pre = s[1], n = s[2], post = s[3], linear = s[4], first = s[5];
    const TM_T *x = slots[k], *v = slots[K + k], *g = slots[2 * K + k];
    if (linear) {
      TM_NAME(sums)(x, v, g, pre, n, post, sums + 3 * first);
    } else if (pre == 1) {
      TM_NAME(gram_rows)(x, v, g, n, post, gram + 9 * first);
    } else if (TM_NAME(gram_later)(x, v, g, pre, n, post, gram + 9 * first,
                                   s[6] < 0 ? NULL : gram + 9 * s[6])) {
      return 1;
    }
  }
  return 0;
}

#undef TM_NAME

#endif
