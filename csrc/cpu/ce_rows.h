// Cross-entropy of (M, C) rows on the CPU: the per-row forward and the per-row gradient.
//
// API (namespace fused_trim::cpu; scalar_t: the logits' type, acc_t = at::opmath_type<scalar_t>:
// float, or double for double logits). A row is C logits at `x + i * row_stride`, unit class
// stride; `t` holds int64 targets; `w` is the class weight in acc_t (nullptr: none) and
// `w_total = weight_total(w, C)` (C without a weight); `ls` the label smoothing.
//
//   rows_forward_parallel<scalar_t, acc_t>(x, row_stride, M, C, t, ignore_index, w, w_total, ls,
//                                          loss_out, lse_out, bad_target)
//       Rows [0, M) over at::parallel_for: loss_out[i] = l_i and lse_out[i] = logsumexp(x_i) (the
//       one quantity the gradient needs), both acc_t; an ignored row gets 0 in both. A target
//       outside [0, C) that is not ignore_index sets `bad_target` (the caller raises) and gets 0.
//       The loss is formed relative to the row max, ((m - x_y) + log s), never as lse - x_y.
//       A block of fp32 logits (say an LM head's chunk of x @ W^T) is scalar_t = acc_t = float.
//   rows_forward<scalar_t, acc_t>(..., begin, end, ...)   the same on rows [begin, end), serially.
//   row_backward<scalar_t, acc_t>(xrow, grow, C, y, lse, coef, w, w_total, ls, stream, inbuf, outbuf)
//       d(coef * l)/dx of one row whose target y is a class (kept, not ignored), into `grow`;
//       `grow == xrow` (in place over the logits) is allowed. coef = upstream gradient times the
//       row's scale (1 / denominator for "mean"). A NaN lse gives a NaN row, as torch. The
//       true-class term is formed in acc_t before rounding. inbuf/outbuf: kBlock acc_t each (unused
//       when scalar_t is acc_t). stream: non-temporal stores (needs a stream_fence() afterwards).
//   weight_total(w, C), scored_target(y, C, ignore_index, bad_target), finish_sample(...) (and
//       finish_samples(...), its vector form): the pieces every forward path (rows here, pixels in
//       ce_spatial.h) ends with.
//   The loss options of LM heads: `cap` (logit_softcap c; 0: off) makes every logit z
//       c tanh(z / c) before anything else (vcap / cap_scalar / cap_block; the kernels take a
//       template flag `Cap`, so that the plain path is the code it was), and the gradient is
//       multiplied by 1 - tanh^2(z / c) (cap_grad); `zl` (z_loss; 0: off) adds zl lse^2 to each
//       loss (finish_sample) and 2 zl lse p_c to its gradient (row_grad_coefs). With both off every
//       result is bitwise the plain one (the terms are skipped, never added as zeros).
//   row_grad_coefs / row_grad_block / row_grad_true_class: row_backward's pieces, for a kernel that
//       forms a row's gradient a block of classes at a time (the LM head's tiles, linear_ce_cpu.cpp).
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include <ATen/Parallel.h>

#include "vec.h"

namespace fused_trim::cpu {

// Soft-capping: u = c tanh(z / c), one function for every path (the vector form; a scalar goes
// through lane 0, so that a target's capped logit is bitwise the one its row's block holds).
// (z times 1 / c rather than z / c: a division costs as much as the fp32 tanh itself.)
template <typename acc_t>
inline Vectorized<acc_t> vcap(const Vectorized<acc_t>& z, acc_t c) {
  return Vectorized<acc_t>(c) * vtanh<acc_t>(z * Vectorized<acc_t>(acc_t(1) / c));
}

template <typename acc_t>
inline acc_t cap_scalar(acc_t z, acc_t c) {
  alignas(64) acc_t out[Vectorized<acc_t>::size()];
  vcap<acc_t>(Vectorized<acc_t>(z), c).store(out);
  return out[0];
}

// The derivative of the cap at the capped value u: 1 - tanh^2(z / c) = 1 - (u / c)^2 (0, never
// NaN, where tanh saturates).
template <typename acc_t>
inline Vectorized<acc_t> cap_grad(const Vectorized<acc_t>& u, acc_t c) {
  const Vectorized<acc_t> t = u * Vectorized<acc_t>(acc_t(1) / c);
  return Vectorized<acc_t>(acc_t(1)) - t * t;
}

template <typename acc_t>
inline acc_t cap_grad_scalar(acc_t u, acc_t c) {
  const acc_t t = u * (acc_t(1) / c);
  return acc_t(1) - t * t;
}

// dst[j] = c tanh(src[j] / c) for j < n (dst may be src).
template <typename acc_t>
inline void cap_block(const acc_t* src, int64_t n, acc_t c, acc_t* dst) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  int64_t j = 0;
  for (; j + V <= n; j += V) vcap<acc_t>(Vec::loadu(src + j), c).store(dst + j);
  if (j < n) vcap<acc_t>(Vec::loadu(src + j, n - j), c).store(dst + j, n - j);
}

template <typename acc_t>
struct RowResult {
  acc_t loss;
  acc_t lse;
};

// sum of the class weights, in the accumulation type, without a tensor op and `.item()`.
template <typename acc_t>
inline acc_t weight_total(const acc_t* w, int64_t C) {
  double s = 0.0;
  for (int64_t c = 0; c < C; ++c) s += static_cast<double>(w[c]);
  return static_cast<acc_t>(s);
}

// One sample's loss and logsumexp from its max `m`, `log_s = log(sum_c exp(x_c - m))`, its
// target's logit and weight, and (label smoothing) `sx = sum_c w_c (x_c - ref)`; `zl` (z_loss)
// adds zl lse^2, not weighted. Every forward path (rows, few classes, grouped rows, spatial pixels,
// the LM head's tiles) ends here.
template <typename acc_t>
inline RowResult<acc_t> finish_sample(acc_t m, acc_t log_s, acc_t x_y, acc_t w_y, acc_t ref, acc_t sx, acc_t ls,
                                      acc_t w_total, int64_t C, acc_t zl) {
  // A sample whose max is not finite (a NaN, a +inf, or all -inf) has NaN log-probabilities in
  // torch; the vector exp saturates instead of propagating NaN, so say it explicitly.
  if (!std::isfinite(m)) log_s = std::numeric_limits<acc_t>::quiet_NaN();
  // (m - x_y) + log(s) rather than lse - x_y: no cancellation when p_y is close to 1.
  acc_t loss = w_y * ((m - x_y) + log_s);
  if (ls > 0) {
    const acc_t smooth_term = ((m - ref) + log_s) * w_total - sx;  // -sum_c w_c log p_c
    loss = (acc_t(1) - ls) * loss + (ls / static_cast<acc_t>(C)) * smooth_term;
  }
  const acc_t lse = m + log_s;
  if (zl != acc_t(0)) loss += zl * lse * lse;
  return {loss, lse};
}

// finish_sample on the V lanes of a vector of samples: the same operations in the same order, lane
// by lane, so that each lane's results are bitwise the scalar function's.
template <typename acc_t>
inline void finish_samples(const Vectorized<acc_t>& m, Vectorized<acc_t> log_s, const Vectorized<acc_t>& x_y,
                           const Vectorized<acc_t>& w_y, const Vectorized<acc_t>& ref, const Vectorized<acc_t>& sx,
                           acc_t ls, acc_t w_total, int64_t C, acc_t zl, Vectorized<acc_t>& loss_out,
                           Vectorized<acc_t>& lse_out) {
  using Vec = Vectorized<acc_t>;
  log_s = Vec::blendv(Vec(std::numeric_limits<acc_t>::quiet_NaN()), log_s, (m - m) == Vec(0));  // m finite
  Vec loss = w_y * ((m - x_y) + log_s);
  if (ls > 0) {
    const Vec smooth_term = ((m - ref) + log_s) * Vec(w_total) - sx;
    loss = Vec(acc_t(1) - ls) * loss + Vec(ls / static_cast<acc_t>(C)) * smooth_term;
  }
  const Vec lse = m + log_s;
  if (zl != acc_t(0)) loss = loss + Vec(zl) * lse * lse;
  loss_out = loss;
  lse_out = lse;
}

// Whether sample target `y` is a class to score; an ignored one is not, and one outside [0, C)
// is not either and raises the op's ValueError afterwards (through `bad_target`).
inline bool scored_target(int64_t y, int64_t C, int64_t ignore_index, std::atomic<bool>& bad_target) {
  if (y == ignore_index) return false;
  if (y >= 0 && y < C) return true;
  bad_target.store(true, std::memory_order_relaxed);
  return false;
}

#if defined(CPU_CAPABILITY_AVX512)
// scored_target for 16 samples at once: the int64 targets t[0:n) (n <= 16; lanes >= n are neither
// scored nor bad), as lane masks and as int32 lanes (0 beyond n).
struct Targets16 {
  __mmask16 scored;  // a class in [0, C)
  __mmask16 bad;     // neither a class nor ignore_index
  __m512i y32;
};

inline Targets16 load_targets16(const int64_t* t, int64_t n, int64_t ignore_index, int64_t C) {
  const __mmask16 rm = static_cast<__mmask16>(n >= 16 ? 0xFFFF : (1u << n) - 1);
  const __mmask8 rlo = static_cast<__mmask8>(rm & 0xFF), rhi = static_cast<__mmask8>(rm >> 8);
  const __m512i ylo = _mm512_maskz_loadu_epi64(rlo, t), yhi = _mm512_maskz_loadu_epi64(rhi, t + 8);
  const __m512i ign = _mm512_set1_epi64(ignore_index), cc = _mm512_set1_epi64(C);
  const unsigned named = _mm512_mask_cmpneq_epi64_mask(rlo, ylo, ign) |
                         (unsigned(_mm512_mask_cmpneq_epi64_mask(rhi, yhi, ign)) << 8);
  const unsigned in_range = _mm512_cmplt_epu64_mask(ylo, cc) | (unsigned(_mm512_cmplt_epu64_mask(yhi, cc)) << 8);
  Targets16 r;
  r.scored = static_cast<__mmask16>(named & in_range);
  r.bad = static_cast<__mmask16>(named & ~in_range);
  r.y32 = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi64_epi32(ylo)), _mm512_cvtepi64_epi32(yhi), 1);
  return r;
}

inline __m512i lane_index16() {
  return _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
}
#endif

// Loss and logsumexp of one row (one pass over memory, blockwise online max). buf: kBlock acc_t
// (unused when scalar_t is acc_t and there is no cap).
template <typename scalar_t, typename acc_t, bool Cap>
__attribute__((flatten)) inline RowResult<acc_t> row_forward(const scalar_t* row, int64_t C, int64_t y,
                                                             const acc_t* w, acc_t w_total, acc_t ls, acc_t cap,
                                                             acc_t zl, acc_t* buf) {
  constexpr acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  const bool smooth = ls > 0;
  acc_t m = ninf, s = 0, sx = 0, ref = 0;
  for (int64_t b = 0; b < C; b += kBlock) {
    const int64_t n = std::min(kBlock, C - b);
    const acc_t* p = load_block<scalar_t, acc_t>(row + b, n, buf);
    if constexpr (Cap) {
      cap_block<acc_t>(p, n, cap, buf);
      p = buf;
    }
    const acc_t bm = block_max<acc_t>(p, n);
    if (b == 0) {
      ref = std::isfinite(bm) ? bm : acc_t(0);
      m = bm;
    } else if (bm != bm) {
      m = bm;  // NaN propagates to the loss
    } else if (bm > m) {
      s = s * std::exp(m - bm);
      m = bm;
    }
    if (bm != ninf) s += block_sumexp<acc_t>(p, n, m);
    if (smooth) sx += block_sum_shifted<acc_t>(p, w == nullptr ? nullptr : w + b, n, ref);
  }
  acc_t x_y = static_cast<acc_t>(row[y]);
  if constexpr (Cap) x_y = cap_scalar<acc_t>(x_y, cap);
  return finish_sample<acc_t>(m, std::log(s), x_y, w == nullptr ? acc_t(1) : w[y], ref, sx, ls, w_total, C, zl);
}

// Rows of one block (C <= kBlock) in fp32/fp64: rows are taken kRowGroup at a time, in phases
// (every row's max, then every row's exp-sum, then one vector log for the group), so that the
// short dependency chains of independent rows overlap (a row at a time, max -> horizontal
// reduction -> exp -> reduction -> log is one long chain that left the core idle at C ~ 100).
// The rows of a group stay in L1 between the phases. Same arithmetic as row_forward.
constexpr int64_t kRowGroup = 16;

template <typename acc_t>
__attribute__((flatten)) void grouped_rows_forward(
    const acc_t* x, int64_t row_stride, int64_t C, const int64_t* t, int64_t ignore_index,
    const acc_t* w, acc_t w_total, acc_t ls, acc_t zl, int64_t begin, int64_t end, acc_t* loss_out,
    acc_t* lse_out, std::atomic<bool>& bad_target) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  constexpr int64_t G = kRowGroup;
  static_assert(G % V == 0, "the group is a whole number of vectors");
  constexpr acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  const bool smooth = ls > 0;
  // Fewer rows per group when they would not stay in L1 (~32 KiB) between the phases.
  const int64_t g_max = std::clamp<int64_t>(int64_t(32768) / (C * int64_t(sizeof(acc_t))), 1, G);
  alignas(64) acc_t mv[G], sv[G], lsv[G], sxv[G];
  int64_t idx[G];
  int64_t i = begin;
  while (i < end) {
    int64_t g = 0;
    for (; i < end && g < g_max; ++i) {
      if (!scored_target(t[i], C, ignore_index, bad_target)) {
        loss_out[i] = lse_out[i] = 0;
        continue;
      }
      idx[g++] = i;
    }
    for (int64_t r = 0; r < g; ++r) mv[r] = block_max<acc_t>(x + idx[r] * row_stride, C);
    for (int64_t r = 0; r < g; ++r) {
      const acc_t* p = x + idx[r] * row_stride;
      const acc_t m = mv[r];
      sv[r] = m != ninf ? block_sumexp<acc_t>(p, C, m) : acc_t(0);
      if (smooth) sxv[r] = block_sum_shifted<acc_t>(p, w, C, std::isfinite(m) ? m : acc_t(0));
    }
    for (int64_t r = g; r < G; ++r) sv[r] = 1;
    for (int64_t r = 0; r < g; r += V) Vec::loadu(sv + r).log().store(lsv + r);
    for (int64_t r = 0; r < g; ++r) {
      const int64_t row = idx[r];
      const int64_t y = t[row];
      const acc_t m = mv[r];
      const auto res = finish_sample<acc_t>(m, lsv[r], x[row * row_stride + y], w == nullptr ? acc_t(1) : w[y],
                                            std::isfinite(m) ? m : acc_t(0), sxv[r], ls, w_total, C, zl);
      loss_out[row] = res.loss;
      lse_out[row] = res.lse;
    }
  }
}

// Rows [begin, end), one thread: the path that suits C and the dtype (capped rows: a row at a time).
template <typename scalar_t, typename acc_t, bool Cap>
void rows_forward(const scalar_t* x, int64_t row_stride, int64_t C, const int64_t* t, int64_t ignore_index,
                  const acc_t* w, acc_t w_total, acc_t ls, acc_t cap, acc_t zl, int64_t begin, int64_t end,
                  acc_t* loss_out, acc_t* lse_out, std::atomic<bool>& bad_target) {
  if (!Cap && std::is_same_v<scalar_t, acc_t> && C <= kBlock) {
    grouped_rows_forward<acc_t>(reinterpret_cast<const acc_t*>(x), row_stride, C, t, ignore_index, w, w_total, ls,
                                zl, begin, end, loss_out, lse_out, bad_target);
  } else {
    alignas(64) acc_t buf[std::is_same_v<scalar_t, acc_t> && !Cap ? 1 : kBlock];
    for (int64_t i = begin; i < end; ++i) {
      const int64_t y = t[i];
      if (!scored_target(y, C, ignore_index, bad_target)) {
        loss_out[i] = lse_out[i] = 0;
        continue;
      }
      const auto res = row_forward<scalar_t, acc_t, Cap>(x + i * row_stride, C, y, w, w_total, ls, cap, zl, buf);
      loss_out[i] = res.loss;
      lse_out[i] = res.lse;
    }
  }
}

// Rows [0, M) over the intra-op thread pool (few classes: ce_small.h).
template <typename scalar_t, typename acc_t>
void rows_forward_parallel(const scalar_t* x, int64_t row_stride, int64_t M, int64_t C, const int64_t* t,
                           int64_t ignore_index, const acc_t* w, acc_t w_total, acc_t ls, acc_t cap, acc_t zl,
                           acc_t* loss_out, acc_t* lse_out, std::atomic<bool>& bad_target) {
  const int64_t grain = std::max<int64_t>(1, kParallelGrainElements / std::max<int64_t>(C, 1));
  at::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) {
    if (cap > acc_t(0)) {
      rows_forward<scalar_t, acc_t, true>(x, row_stride, C, t, ignore_index, w, w_total, ls, cap, zl, begin, end,
                                          loss_out, lse_out, bad_target);
    } else {
      rows_forward<scalar_t, acc_t, false>(x, row_stride, C, t, ignore_index, w, w_total, ls, cap, zl, begin, end,
                                           loss_out, lse_out, bad_target);
    }
  });
}

// The gradient of coef * l for one kept row: d l / d x_c = (1-ls) w_y (p_c - [c==y]) + ls/C (W p_c - w_c)
// (+ 2 zl lse p_c with z_loss), i.e. a p_c - b w_c with a = coef ((1-ls) w_y + ls W / C [+ 2 zl lse]),
// b = coef ls / C, and the true class's extra term (row_grad_true_class) patched afterwards; with a
// cap, p is that of the capped logits and each entry is then multiplied by cap_grad.
template <typename acc_t>
struct RowGrad {
  acc_t a, b;
};

template <typename acc_t>
inline RowGrad<acc_t> row_grad_coefs(acc_t coef, acc_t w_y, acc_t w_total, acc_t ls, int64_t C, acc_t lse, acc_t zl) {
  RowGrad<acc_t> g{coef * ((acc_t(1) - ls) * w_y + ls * w_total / static_cast<acc_t>(C)),
                   coef * ls / static_cast<acc_t>(C)};
  if (zl != acc_t(0)) g.a += coef * (acc_t(2) * zl * lse);
  return g;
}

// o[j] = a exp(p[j] - lse) - b w[j] for j < n (w == nullptr: w = 1; o may be p); nt: non-temporal
// stores (o aligned to kVecBytes; needs a stream_fence() afterwards). Cap: p holds capped logits
// u, and o[j] is further multiplied by cap_grad(p[j], cap).
template <typename acc_t, bool Cap = false>
inline void row_grad_block(const acc_t* p, acc_t* o, int64_t n, acc_t lse, RowGrad<acc_t> g, const acc_t* w,
                           bool nt, acc_t cap = acc_t(0)) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const Vec va(g.a), vb(g.b), vl(lse);
  int64_t j = 0;
  if constexpr (Cap) {
    auto grad = [&](const Vec& u, const Vec& wj) { return (vexp(u - vl) * va - vb * wj) * cap_grad<acc_t>(u, cap); };
    for (; j + V <= n; j += V) {
      const Vec gv = grad(Vec::loadu(p + j), w == nullptr ? Vec(1) : Vec::loadu(w + j));
      if (nt) {
        store_stream<acc_t>(o + j, gv);
      } else {
        gv.store(o + j);
      }
    }
    if (j < n) grad(Vec::loadu(p + j, n - j), w == nullptr ? Vec(1) : Vec::loadu(w + j, n - j)).store(o + j, n - j);
    return;
  }
  if (nt && g.b == acc_t(0)) {
    for (; j + V <= n; j += V) store_stream<acc_t>(o + j, vexp(Vec::loadu(p + j) - vl) * va);
    if (j < n) (vexp(Vec::loadu(p + j, n - j) - vl) * va).store(o + j, n - j);
  } else if (g.b == acc_t(0)) {
    for (; j + V <= n; j += V) (vexp(Vec::loadu(p + j) - vl) * va).store(o + j);
    if (j < n) (vexp(Vec::loadu(p + j, n - j) - vl) * va).store(o + j, n - j);
  } else if (w == nullptr) {
    for (; j + V <= n; j += V) (vexp(Vec::loadu(p + j) - vl) * va - vb).store(o + j);
    if (j < n) (vexp(Vec::loadu(p + j, n - j) - vl) * va - vb).store(o + j, n - j);
  } else {
    for (; j + V <= n; j += V) (vexp(Vec::loadu(p + j) - vl) * va - vb * Vec::loadu(w + j)).store(o + j);
    if (j < n) (vexp(Vec::loadu(p + j, n - j) - vl) * va - vb * Vec::loadu(w + j, n - j)).store(o + j, n - j);
  }
}

// The true class's gradient, formed in the accumulation type before any rounding (x_y: the capped
// logit with Cap, and the result times its cap_grad).
template <typename acc_t, bool Cap = false>
inline acc_t row_grad_true_class(acc_t x_y, acc_t lse, RowGrad<acc_t> g, acc_t coef, acc_t w_y, acc_t ls,
                                 acc_t cap = acc_t(0)) {
  const acc_t p_y = std::exp(x_y - lse);
  const acc_t d = g.a * p_y - g.b * w_y - coef * (acc_t(1) - ls) * w_y;
  if constexpr (Cap) return d * cap_grad_scalar<acc_t>(x_y, cap);
  return d;
}

// d(coef * l)/dx of one kept row into grow (may be xrow itself), block by block. With Cap, inbuf
// is kBlock acc_t whatever the types.
template <typename scalar_t, typename acc_t, bool Cap = false>
__attribute__((flatten)) inline void row_backward(const scalar_t* xrow, scalar_t* grow, int64_t C, int64_t y,
                                                  acc_t lse, acc_t coef, const acc_t* w, acc_t w_total, acc_t ls,
                                                  acc_t cap, acc_t zl, bool stream, acc_t* inbuf, acc_t* outbuf) {
  if (lse != lse) {  // a kept row with NaN log-probabilities: NaN gradient, as torch
    std::fill(grow, grow + C, static_cast<scalar_t>(std::numeric_limits<acc_t>::quiet_NaN()));
    return;
  }
  acc_t x_y = static_cast<acc_t>(xrow[y]);  // read before an in-place pass overwrites it
  if constexpr (Cap) x_y = cap_scalar<acc_t>(x_y, cap);
  const acc_t w_y = w == nullptr ? acc_t(1) : w[y];
  const RowGrad<acc_t> g = row_grad_coefs<acc_t>(coef, w_y, w_total, ls, C, lse, zl);
  for (int64_t b = 0; b < C; b += kBlock) {
    const int64_t n = std::min(kBlock, C - b);
    const acc_t* p = load_block<scalar_t, acc_t>(xrow + b, n, inbuf);
    if constexpr (Cap) {
      cap_block<acc_t>(p, n, cap, inbuf);
      p = inbuf;
    }
    acc_t* o = std::is_same_v<scalar_t, acc_t> ? reinterpret_cast<acc_t*>(grow + b) : outbuf;
    const bool nt =
        std::is_same_v<scalar_t, acc_t> && stream && reinterpret_cast<uintptr_t>(o) % kVecBytes<acc_t> == 0;
    row_grad_block<acc_t, Cap>(p, o, n, lse, g, w == nullptr ? nullptr : w + b, nt, cap);
    if constexpr (!std::is_same_v<scalar_t, acc_t>) store_block<scalar_t, acc_t>(o, n, grow + b);
  }
  if (stream) stream_fence();  // the streamed row is in place before grow[y] is patched
  grow[y] = static_cast<scalar_t>(row_grad_true_class<acc_t, Cap>(x_y, lse, g, coef, w_y, ls, cap));
}

}  // namespace fused_trim::cpu
