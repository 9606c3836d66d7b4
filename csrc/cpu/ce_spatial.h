// Cross-entropy of a spatial map (N, C, S) read in place on the CPU: forward and gradient.
//
// API (namespace fused_trim::cpu):
//   spatial_forward<scalar_t, acc_t>(x, N, C, S, sN, sC, t, ignore_index, w, w_total, ls, cap, zl,
//                                    loss_out, lse_out, bad_target)
//       Samples are pixels in n * S + s order (t, loss_out, lse_out have N * S entries); the pixel
//       stride is 1, the class stride sC, the image stride sN. Same outputs as rows_forward.
//   spatial_backward(grad_out, input, target, weight, lse, rowscale, ignore_index, label_smoothing,
//                    logit_softcap, z_loss)
//       The gradient (N, C, S), contiguous: kept pixels (rowscale != 0) recompute softmax from the
//       saved lse, every other pixel is exactly 0. grad_out is () or (N * S,), acc dtype; target
//       int64 and weight/lse/rowscale in the acc dtype, all contiguous.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include "ce_rows.h"
#include "tensors.h"
#include "vec.h"

namespace fused_trim::cpu {

// ---------------------------------------------------------------------------------------------
// Spatial inputs (N, C, S): a sample is a pixel, its classes S elements apart, neighbouring
// pixels adjacent. The vectors run ACROSS pixels (V pixels per vector, as the small-C tile does
// for rows, but without a transpose: the layout already is one), and the reductions over the C
// classes are plain elementwise vector ops, with no horizontal reduction at all.
//
// Pixels go in blocks of kPixelVecs vectors (64 fp32 pixels), each block's classes in chunks of
// kClassChunk. The first pass over a chunk reads it from memory once, converts it to the
// accumulation type and copies it into a contiguous tile; the second pass (exp-sum) reads the
// tile. Re-reading the input instead would miss L1 (and L2) for power-of-two maps: the C lines at
// one pixel offset are S * elem bytes apart, a multiple of 4 KiB, so they all fall in one cache
// set, and 19 classes > 8 ways. A later chunk that raises the running max rescales the sum
// (online softmax per chunk, one exp per element).
// ---------------------------------------------------------------------------------------------
constexpr int64_t kPixelVecs = 4;
constexpr int64_t kClassChunk = 64;

template <typename acc_t>
constexpr int64_t kPixelBlock = kPixelVecs * Vectorized<acc_t>::size();

// V pixels of one class in the accumulation type; `count` < V pads with zeros.
template <typename scalar_t, typename acc_t, bool full>
inline Vectorized<acc_t> load_px(const scalar_t* p, int64_t count) {
  using Vec = Vectorized<acc_t>;
  if constexpr (full) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      return Vec::loadu(p);
    } else {
      Vec out;
      at::vec::load_to_float<scalar_t>(p, out);
      return out;
    }
  } else {
    alignas(64) acc_t tmp[Vec::size()] = {};
    for (int64_t j = 0; j < std::min<int64_t>(count, Vec::size()); ++j) tmp[j] = static_cast<acc_t>(p[j]);
    return Vec::loadu(tmp);
  }
}

// V (or `count` < V) pixels of one class, rounded to the output type.
template <typename scalar_t, typename acc_t, bool full>
inline void store_px(scalar_t* dst, const Vectorized<acc_t>& v, int64_t count) {
  using Vec = Vectorized<acc_t>;
  if constexpr (full) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      v.store(dst);
    } else {
      at::vec::convert_from_float<scalar_t>(v, v).store(dst, Vec::size());
    }
  } else {
    alignas(64) acc_t tmp[Vec::size()];
    v.store(tmp);
    for (int64_t j = 0; j < std::min<int64_t>(count, Vec::size()); ++j) dst[j] = static_cast<scalar_t>(tmp[j]);
  }
}

// One block of pixels [s0, s0 + rows) of image n: loss and logsumexp per pixel (Cap: of the
// logits capped as they are loaded).
template <typename scalar_t, typename acc_t, bool full, bool Cap>
__attribute__((flatten)) inline void spatial_block_forward(
    const scalar_t* p, int64_t cs, int64_t C, int64_t rows, const int64_t* t, int64_t ignore_index,
    const acc_t* w, acc_t w_total, acc_t ls, acc_t cap, acc_t zl, acc_t* tile, acc_t* loss_out, acc_t* lse_out,
    std::atomic<bool>& bad_target) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  constexpr int64_t B = kPixelVecs;
  constexpr int64_t P = kPixelBlock<acc_t>;
  constexpr acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  const bool smooth = ls > 0;
  Vec m[B], s[B], sx[B], ref[B];
  int64_t c0 = 0;
  for (; c0 < C; c0 += kClassChunk) {
    const int64_t cn = std::min(kClassChunk, C - c0);
    Vec bm[B];
    for (int64_t v = 0; v < B; ++v) bm[v] = Vec(ninf);
    for (int64_t c = 0; c < cn; ++c) {
      const scalar_t* row = p + (c0 + c) * cs;
      for (int64_t v = 0; v < B; ++v) {
        Vec xv = load_px<scalar_t, acc_t, full>(row + v * V, rows - v * V);
        if constexpr (Cap) xv = vcap<acc_t>(xv, cap);
        xv.store(tile + c * P + v * V);
        bm[v] = at::vec::maximum(bm[v], xv);
      }
    }
    if (c0 == 0) {
      for (int64_t v = 0; v < B; ++v) {
        m[v] = bm[v];
        s[v] = Vec(0);
        sx[v] = Vec(0);
        // The smoothing sum is taken relative to the first chunk's max where that is finite.
        ref[v] = Vec::blendv(Vec(0), bm[v], (bm[v] - bm[v]) == Vec(0));
      }
    } else {
      for (int64_t v = 0; v < B; ++v) {
        const Vec mn = at::vec::maximum(m[v], bm[v]);
        // Lanes whose classes so far were all -inf hold no sum yet (exp(-inf - -inf) is NaN).
        s[v] = Vec::blendv(Vec(0), s[v] * vexp(m[v] - mn), m[v] != Vec(ninf));
        m[v] = mn;
      }
    }
    for (int64_t c = 0; c < cn; ++c) {
      const acc_t* trow = tile + c * P;
      for (int64_t v = 0; v < B; ++v) s[v] = s[v] + vexp(Vec::loadu(trow + v * V) - m[v]);
      if (smooth) {
        const Vec wc(w == nullptr ? acc_t(1) : w[c0 + c]);
        for (int64_t v = 0; v < B; ++v) sx[v] = sx[v] + wc * (Vec::loadu(trow + v * V) - ref[v]);
      }
    }
  }
  const int64_t last_c0 = (C - 1) / kClassChunk * kClassChunk;  // the chunk still in the tile
  alignas(64) acc_t mv[P], lsv[P], sxv[P], refv[P];
  for (int64_t v = 0; v < B; ++v) {
    m[v].store(mv + v * V);
    s[v].log().store(lsv + v * V);
    sx[v].store(sxv + v * V);
    ref[v].store(refv + v * V);
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t y = t[r];
    if (!scored_target(y, C, ignore_index, bad_target)) {
      loss_out[r] = lse_out[r] = 0;
      continue;
    }
    acc_t x_y;
    if (y >= last_c0) {
      x_y = tile[(y - last_c0) * P + r];
    } else {
      x_y = static_cast<acc_t>(p[y * cs + r]);
      if constexpr (Cap) x_y = cap_scalar<acc_t>(x_y, cap);
    }
    const auto res = finish_sample<acc_t>(mv[r], lsv[r], x_y, w == nullptr ? acc_t(1) : w[y], refv[r], sxv[r], ls,
                                          w_total, C, zl);
    loss_out[r] = res.loss;
    lse_out[r] = res.lse;
  }
}

template <typename scalar_t, typename acc_t, bool Cap>
void spatial_forward_impl(const scalar_t* x, int64_t N, int64_t C, int64_t S, int64_t sN, int64_t sC,
                          const int64_t* t, int64_t ignore_index, const acc_t* w, acc_t w_total, acc_t ls,
                          acc_t cap, acc_t zl, acc_t* loss_out, acc_t* lse_out, std::atomic<bool>& bad_target) {
  constexpr int64_t P = kPixelBlock<acc_t>;
  const int64_t nblk = (S + P - 1) / P;
  const int64_t grain = std::max<int64_t>(1, kParallelGrainElements / std::max<int64_t>(C * P, 1));
  at::parallel_for(0, N * nblk, grain, [&](int64_t begin, int64_t end) {
    alignas(64) acc_t tile[kClassChunk * P];
    for (int64_t u = begin; u < end; ++u) {
      const int64_t n = u / nblk, s0 = (u - n * nblk) * P;
      const int64_t rows = std::min(P, S - s0);
      const scalar_t* p = x + n * sN + s0;
      const int64_t i0 = n * S + s0;
      if (rows == P) {
        spatial_block_forward<scalar_t, acc_t, true, Cap>(p, sC, C, rows, t + i0, ignore_index, w, w_total, ls,
                                                          cap, zl, tile, loss_out + i0, lse_out + i0, bad_target);
      } else {
        spatial_block_forward<scalar_t, acc_t, false, Cap>(p, sC, C, rows, t + i0, ignore_index, w, w_total, ls,
                                                           cap, zl, tile, loss_out + i0, lse_out + i0, bad_target);
      }
    }
  });
}

template <typename scalar_t, typename acc_t>
void spatial_forward(const scalar_t* x, int64_t N, int64_t C, int64_t S, int64_t sN, int64_t sC,
                     const int64_t* t, int64_t ignore_index, const acc_t* w, acc_t w_total, acc_t ls, acc_t cap,
                     acc_t zl, acc_t* loss_out, acc_t* lse_out, std::atomic<bool>& bad_target) {
  if (cap > acc_t(0)) {
    spatial_forward_impl<scalar_t, acc_t, true>(x, N, C, S, sN, sC, t, ignore_index, w, w_total, ls, cap, zl,
                                                loss_out, lse_out, bad_target);
  } else {
    spatial_forward_impl<scalar_t, acc_t, false>(x, N, C, S, sN, sC, t, ignore_index, w, w_total, ls, cap, zl,
                                                 loss_out, lse_out, bad_target);
  }
}

// Gradient of one block of pixels: kept pixels recompute softmax from the saved logsumexp; the
// other lanes are masked to exactly 0 (NaN logits there must not leak). `g` is the block's
// class-0 gradient, classes S apart. Cap: of the capped logits, times cap_grad.
template <typename scalar_t, typename acc_t, bool full, bool Cap>
__attribute__((flatten)) inline void spatial_block_backward(
    const scalar_t* p, int64_t cs, scalar_t* g, int64_t gs, int64_t C, int64_t rows, const acc_t* am,
    const acc_t* bm, const acc_t* lm, const acc_t* km, const acc_t* w, acc_t cap, bool stream) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  constexpr int64_t B = kPixelVecs;
  Vec va[B], vb[B], vl[B], mask[B];
  for (int64_t v = 0; v < B; ++v) {
    va[v] = Vec::loadu(am + v * V);
    vb[v] = Vec::loadu(bm + v * V);
    vl[v] = Vec::loadu(lm + v * V);
    mask[v] = Vec::loadu(km + v * V) != Vec(0);
  }
  const bool nt = full && std::is_same_v<scalar_t, acc_t> && stream &&
                  reinterpret_cast<uintptr_t>(g) % kVecBytes<acc_t> == 0 &&
                  (gs * int64_t(sizeof(scalar_t))) % int64_t(kVecBytes<acc_t>) == 0;
  for (int64_t c = 0; c < C; ++c) {
    const scalar_t* row = p + c * cs;
    scalar_t* grow = g + c * gs;
    const Vec wc(w == nullptr ? acc_t(1) : w[c]);
    for (int64_t v = 0; v < B; ++v) {
      const Vec xv = load_px<scalar_t, acc_t, full>(row + v * V, rows - v * V);
      Vec gv;
      if constexpr (Cap) {
        const Vec u = vcap<acc_t>(xv, cap);
        gv = Vec::blendv(Vec(0), (vexp(u - vl[v]) * va[v] - vb[v] * wc) * cap_grad<acc_t>(u, cap), mask[v]);
      } else {
        gv = Vec::blendv(Vec(0), vexp(xv - vl[v]) * va[v] - vb[v] * wc, mask[v]);
      }
      if constexpr (full && std::is_same_v<scalar_t, acc_t>) {
        if (nt) {
          store_stream<acc_t>(reinterpret_cast<acc_t*>(grow + v * V), gv);
          continue;
        }
      }
      store_px<scalar_t, acc_t, full>(grow + v * V, gv, rows - v * V);
    }
  }
}

inline at::Tensor spatial_backward(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& target,
                            const at::Tensor& weight, const at::Tensor& lse_c, const at::Tensor& rs_c,
                            int64_t ignore_index, double label_smoothing, double logit_softcap, double z_loss) {
  const int64_t N = input.size(0), C = input.size(1), S = input.size(2);
  const int64_t sN = input.stride(0), sC = input.stride(1);
  const bool per_row = grad_out.dim() == 1;
  at::Tensor grad = empty_large({N, C, S}, input.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "trimmed_ce_bwd_spatial", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int64_t P = kPixelBlock<acc_t>;
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    const int64_t* t = target.const_data_ptr<int64_t>();
    const acc_t* w = weight.defined() ? weight.const_data_ptr<acc_t>() : nullptr;
    const acc_t w_total = w == nullptr ? static_cast<acc_t>(C) : weight_total<acc_t>(w, C);
    const acc_t ls = static_cast<acc_t>(label_smoothing);
    const acc_t cap = static_cast<acc_t>(logit_softcap), zl2 = static_cast<acc_t>(2.0 * z_loss);
    const acc_t* gp = grad_out.const_data_ptr<acc_t>();
    const acc_t* lse = lse_c.const_data_ptr<acc_t>();
    const acc_t* rs = rs_c.const_data_ptr<acc_t>();
    scalar_t* gr = grad.mutable_data_ptr<scalar_t>();
    const int64_t nblk = (S + P - 1) / P;
    const int64_t grain = std::max<int64_t>(1, kParallelGrainElements / std::max<int64_t>(C * P, 1));
    const bool stream = static_cast<size_t>(N) * C * S * sizeof(scalar_t) >= kStreamBytes;
    // d l / d x_c = (1-ls) w_y (p_c - [c==y]) + ls/C (W p_c - w_c), per kept pixel a p_c - b w_c
    // with a = coef ((1-ls) w_y + ls W / C [+ 2 zl lse]), b = coef ls / C, and the true-class term
    // patched (with a cap: p of the capped logits, every entry times cap_grad).
    const acc_t one_m_ls = acc_t(1) - ls, ls_wc = ls * w_total / static_cast<acc_t>(C);
    const acc_t ls_c = ls / static_cast<acc_t>(C);
    interleaved_for(N * nblk, grain, [&](int64_t begin, int64_t end) {
      alignas(64) acc_t am[P], bm[P], lm[P], km[P], coefv[P];
      int64_t kept_r[P];
      // Locals, so that the per-pixel loop does not reload them through the captures.
      const int64_t* const tp = t;
      const acc_t* const rsp = rs;
      const acc_t* const lsep = lse;
      const acc_t* const wp = w;
      const acc_t* const gpp = gp;
      const int64_t ign = ignore_index;
      const int64_t g_step = per_row ? 1 : 0;
      for (int64_t u = begin; u < end; ++u) {
        const int64_t n = u / nblk, s0 = (u - n * nblk) * P;
        const int64_t rows = std::min(P, S - s0);
        const int64_t i0 = n * S + s0;
        scalar_t* g = gr + n * C * S + s0;
        int64_t nk = 0;
        // Branch-free: a random half of the pixels is kept, which no predictor guesses.
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t i = i0 + r;
          const int64_t y = tp[i];
          const int64_t keep_r = int64_t(rsp[i] != acc_t(0)) & int64_t(y != ign) &
                                 int64_t(static_cast<uint64_t>(y) < static_cast<uint64_t>(C));
          // Masks, not products: a non-kept pixel's upstream gradient may be NaN.
          const acc_t coef = zero_unless(gpp[i * g_step] * rsp[i], keep_r);
          const acc_t w_y = wp == nullptr ? acc_t(1) : wp[y & -keep_r];
          am[r] = coef * (one_m_ls * w_y + ls_wc);
          if (zl2 != acc_t(0)) am[r] += coef * (zl2 * zero_unless(lsep[i], keep_r));
          bm[r] = coef * ls_c;
          lm[r] = zero_unless(lsep[i], keep_r);
          km[r] = static_cast<acc_t>(keep_r);
          coefv[r] = coef;
          kept_r[nk] = r;
          nk += keep_r;
        }
        for (int64_t r = rows; r < P; ++r) am[r] = bm[r] = lm[r] = km[r] = 0;
        if (nk == 0) {  // no kept pixel: zeros, without reading the logits
          for (int64_t c = 0; c < C; ++c) {
            zero_bytes(static_cast<void*>(g + c * S), rows * sizeof(scalar_t), stream);
          }
          continue;
        }
        const scalar_t* p = x + n * sN + s0;
        if (cap > acc_t(0)) {
          if (rows == P) {
            spatial_block_backward<scalar_t, acc_t, true, true>(p, sC, g, S, C, rows, am, bm, lm, km, w, cap, stream);
          } else {
            spatial_block_backward<scalar_t, acc_t, false, true>(p, sC, g, S, C, rows, am, bm, lm, km, w, cap, stream);
          }
        } else if (rows == P) {
          spatial_block_backward<scalar_t, acc_t, true, false>(p, sC, g, S, C, rows, am, bm, lm, km, w, cap, stream);
        } else {
          spatial_block_backward<scalar_t, acc_t, false, false>(p, sC, g, S, C, rows, am, bm, lm, km, w, cap, stream);
        }
        if (stream) stream_fence();  // the streamed block is in place before it is patched
        for (int64_t j = 0; j < nk; ++j) {
          const int64_t r = kept_r[j];
          const int64_t i = i0 + r;
          const int64_t y = t[i];
          if (lse[i] != lse[i]) {  // a kept pixel with NaN log-probabilities: NaN gradient, as torch
            for (int64_t c = 0; c < C; ++c) {
              g[c * S + r] = static_cast<scalar_t>(std::numeric_limits<acc_t>::quiet_NaN());
            }
            continue;
          }
          // The true-class term, formed in the accumulation type before rounding.
          const acc_t w_y = w == nullptr ? acc_t(1) : w[y];
          const acc_t x_y = static_cast<acc_t>(p[y * sC + r]);
          const acc_t u_y = cap > acc_t(0) ? cap_scalar<acc_t>(x_y, cap) : x_y;
          const acc_t p_y = std::exp(u_y - lse[i]);
          acc_t g_y = am[r] * p_y - bm[r] * w_y - coefv[r] * one_m_ls * w_y;
          if (cap > acc_t(0)) g_y *= cap_grad_scalar<acc_t>(u_y, cap);
          g[y * S + r] = static_cast<scalar_t>(g_y);
        }
      }
      if (stream) stream_fence();
    });
  });
  return grad;
}

}  // namespace fused_trim::cpu
