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
// Pixels go in blocks of kPixelVecs vectors (128 fp32 pixels; the backward ran faster on these C
// power-of-two-strided streams than with 64 or 256), each block's classes in chunks of
// kClassChunk. The first pass over a chunk reads it from memory once, converts it to the
// accumulation type and copies it into a contiguous tile; the second pass (exp-sum) reads the
// tile. Re-reading the input instead would miss L1 (and L2) for power-of-two maps: the C lines at
// one pixel offset are S * elem bytes apart, a multiple of 4 KiB, so they all fall in one cache
// set, and 19 classes > 8 ways. A later chunk that raises the running max rescales the sum
// (online softmax per chunk, one exp per element).
// ---------------------------------------------------------------------------------------------
constexpr int64_t kPixelVecs = 8;
constexpr int64_t kClassChunk = 64;

template <typename acc_t>
constexpr int64_t kPixelBlock = kPixelVecs * Vectorized<acc_t>::size();

// The gradient of a map goes out with non-temporal stores from this size on (the row kernels: from
// kStreamBytes): its C class rows, written a block at a time, are power-of-two distances apart and
// evict each other and the logits from the cache sets they share, already at sizes that would fit
// the cache as one contiguous block.
constexpr size_t kSpatialStreamBytes = size_t(4) << 20;

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
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) {
    if (last_c0 == 0) {
      // Every class is in the tile: per 16 pixels the targets' logits by one gather, then
      // finish_sample's arithmetic on the vector (pixels not scored: 0).
      bool bad = false;
      for (int64_t v = 0; v < B; ++v) {
        const int64_t n = std::clamp<int64_t>(rows - v * V, 0, V);
        const Targets16 tg = load_targets16(t + v * V, n, ignore_index, C);
        bad |= tg.bad != 0;
        const __m512i idx =
            _mm512_add_epi32(_mm512_mullo_epi32(_mm512_maskz_mov_epi32(tg.scored, tg.y32), _mm512_set1_epi32(P)),
                             _mm512_add_epi32(lane_index16(), _mm512_set1_epi32(int32_t(v * V))));
        const Vec xy(_mm512_i32gather_ps(idx, tile, 4));
        const Vec wy = w == nullptr ? Vec(1.0f)
                                    : Vec(_mm512_mask_i32gather_ps(_mm512_set1_ps(1.0f), tg.scored, tg.y32,
                                                                   reinterpret_cast<const float*>(w), 4));
        Vec loss, lse;
        finish_samples<acc_t>(m[v], s[v].log(), xy, wy, ref[v], sx[v], ls, w_total, C, zl, loss, lse);
        loss = Vec(_mm512_maskz_mov_ps(tg.scored, loss));
        lse = Vec(_mm512_maskz_mov_ps(tg.scored, lse));
        if (n == V) {
          loss.store(loss_out + v * V);
          lse.store(lse_out + v * V);
        } else if (n > 0) {
          loss.store(loss_out + v * V, static_cast<int>(n));
          lse.store(lse_out + v * V, static_cast<int>(n));
        }
      }
      if (bad) bad_target.store(true, std::memory_order_relaxed);
      return;
    }
  }
#endif
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

#if defined(CPU_CAPABILITY_AVX512)
// The gradient of one block of fp32 pixels, everything in vectors (AVX-512): per 16 pixels the
// coefficients of spatial_backward (its scalar loop's values: a, b, the true-class term with p_y
// from the accurate vector exp, NaN for a kept pixel with a NaN lse), then per class one pass that
// puts the true-class term into its lanes by a blend. The targets' logits are gathered with 32-bit
// offsets (C * cs < 2^31 - kPixelBlock). Returns the block's kept pixels; with none it writes the
// zeros alone, without reading the logits.
template <bool Cap>
__attribute__((flatten)) inline int64_t spatial_block_backward_f32(
    const float* p, int64_t cs, float* g, int64_t gs, int64_t C, int64_t rows, const int64_t* t, int64_t ign,
    const float* rs, const float* lse, const float* gp, bool per_row, const float* w, float one_m_ls, float ls_wc,
    float ls_c, float zl2, float cap, bool stream) {
  using Vec = Vectorized<float>;
  constexpr int64_t B = kPixelVecs;
  static_assert(Vec::size() == 16);
  __m512 va[B], vb[B], vl[B], vt[B], vy[B];
  __mmask16 km[B], rm[B];
  int64_t nk = 0;
  // The next block's logits: C streams kilobytes apart are more than the hardware prefetcher follows.
  // (A prefetch past the map's end does not fault.)
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t j = 0; j < B * 16; j += 16) __builtin_prefetch(p + c * cs + B * 16 + j);
  }
  for (int64_t v = 0; v < B; ++v) {
    const int64_t r0 = v * 16, n = std::clamp<int64_t>(rows - r0, 0, 16);
    rm[v] = static_cast<__mmask16>(n >= 16 ? 0xFFFF : (1u << n) - 1);
    const Targets16 tg = load_targets16(t + r0, n, ign, C);
    const __m512 rsv = _mm512_maskz_loadu_ps(rm[v], rs + r0);
    const __mmask16 k = static_cast<__mmask16>(tg.scored & _mm512_cmp_ps_mask(rsv, _mm512_setzero_ps(), _CMP_NEQ_UQ));
    km[v] = k;
    nk += __builtin_popcount(unsigned(k));
    const __m512i y32 = tg.y32;
    const Vec gv = per_row ? Vec(_mm512_maskz_loadu_ps(k, gp + r0)) : Vec(gp[0]);
    const Vec coef(_mm512_maskz_mul_ps(k, gv, rsv));
    const Vec w_y = w == nullptr ? Vec(1.0f) : Vec(_mm512_mask_i32gather_ps(_mm512_set1_ps(1.0f), k, y32, w, 4));
    const Vec l(_mm512_maskz_loadu_ps(k, lse + r0));
    Vec a = coef * (Vec(one_m_ls) * w_y + Vec(ls_wc));
    if (zl2 != 0.0f) a = a + coef * (Vec(zl2) * l);
    const Vec b = coef * Vec(ls_c);
    const __m512i idx = _mm512_add_epi32(_mm512_mullo_epi32(y32, _mm512_set1_epi32(int32_t(cs))),
                                         _mm512_add_epi32(lane_index16(), _mm512_set1_epi32(int32_t(r0))));
    Vec u_y(_mm512_mask_i32gather_ps(_mm512_setzero_ps(), k, idx, p, 4));
    if constexpr (Cap) u_y = vcap<float>(u_y, cap);
    const Vec p_y = (u_y - l).exp();
    const Vec ty = (a * p_y - b * w_y) - coef * Vec(one_m_ls) * w_y;
    const __mmask16 nan_row = k & _mm512_cmp_ps_mask(l, l, _CMP_UNORD_Q);
    const __m512 nan = _mm512_set1_ps(std::numeric_limits<float>::quiet_NaN());
    va[v] = _mm512_mask_mov_ps(a, nan_row, nan);
    vt[v] = _mm512_mask_mov_ps(ty, nan_row, nan);
    vb[v] = b;
    vl[v] = l;
    vy[v] = _mm512_mask_blend_ps(k, _mm512_set1_ps(-1.0f), _mm512_cvtepi32_ps(y32));
  }
  const bool full = rows == B * 16;
  const bool nt = full && stream && reinterpret_cast<uintptr_t>(g) % 64 == 0 && (gs * int64_t(sizeof(float))) % 64 == 0;
  if (nk == 0) {
    for (int64_t c = 0; c < C; ++c) zero_bytes(static_cast<void*>(g + c * gs), rows * sizeof(float), stream);
    return 0;
  }
  for (int64_t c = 0; c < C; ++c) {
    const float* row = p + c * cs;
    float* grow = g + c * gs;
    const Vec wc(w == nullptr ? 1.0f : w[c]);
    const __m512 cv = _mm512_set1_ps(static_cast<float>(c));
    for (int64_t v = 0; v < B; ++v) {
      const Vec xv = full ? Vec::loadu(row + v * 16) : Vec(_mm512_maskz_loadu_ps(rm[v], row + v * 16));
      Vec u = xv;
      if constexpr (Cap) u = vcap<float>(xv, cap);
      Vec gv = vexp<float>(u - Vec(vl[v])) * Vec(va[v]) - Vec(vb[v]) * wc;
      gv = _mm512_mask_mov_ps(gv, _mm512_cmp_ps_mask(vy[v], cv, _CMP_EQ_OQ), vt[v]);
      if constexpr (Cap) gv = gv * cap_grad<float>(u, cap);
      const __m512 out = _mm512_maskz_mov_ps(km[v], gv);
      if (nt) {
        _mm512_stream_ps(grow + v * 16, out);
      } else if (full) {
        _mm512_storeu_ps(grow + v * 16, out);
      } else {
        _mm512_mask_storeu_ps(grow + v * 16, rm[v], out);
      }
    }
  }
  return nk;
}
#endif

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
    const bool stream = static_cast<size_t>(N) * C * S * sizeof(scalar_t) >= kSpatialStreamBytes;
    // d l / d x_c = (1-ls) w_y (p_c - [c==y]) + ls/C (W p_c - w_c), per kept pixel a p_c - b w_c
    // with a = coef ((1-ls) w_y + ls W / C [+ 2 zl lse]), b = coef ls / C, and the true-class term
    // patched (with a cap: p of the capped logits, every entry times cap_grad).
    const acc_t one_m_ls = acc_t(1) - ls, ls_wc = ls * w_total / static_cast<acc_t>(C);
    const acc_t ls_c = ls / static_cast<acc_t>(C);
    // fp32 with AVX-512: whole blocks in vectors, where 32-bit offsets reach every class.
    [[maybe_unused]] const bool vec_block = C * std::max<int64_t>(sC, 1) < (int64_t(1) << 31) - 2 * P;
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
#if defined(CPU_CAPABILITY_AVX512)
        if constexpr (std::is_same_v<scalar_t, float>) {
          if (vec_block) {
            // (casts: this lambda is no template, so the discarded branch must compile for every type)
            const float* p = reinterpret_cast<const float*>(x + n * sN + s0);
            float* gf = reinterpret_cast<float*>(g);
            const float* rsf = reinterpret_cast<const float*>(rsp + i0);
            const float* lsef = reinterpret_cast<const float*>(lsep + i0);
            const float* gpf = reinterpret_cast<const float*>(gpp + i0 * g_step);
            const float* wf = reinterpret_cast<const float*>(wp);
            const float f_one_m_ls = static_cast<float>(one_m_ls), f_ls_wc = static_cast<float>(ls_wc);
            const float f_ls_c = static_cast<float>(ls_c), f_zl2 = static_cast<float>(zl2);
            const float f_cap = static_cast<float>(cap);
            if (f_cap > 0.0f) {
              spatial_block_backward_f32<true>(p, sC, gf, S, C, rows, tp + i0, ign, rsf, lsef, gpf, per_row, wf,
                                               f_one_m_ls, f_ls_wc, f_ls_c, f_zl2, f_cap, stream);
            } else {
              spatial_block_backward_f32<false>(p, sC, gf, S, C, rows, tp + i0, ign, rsf, lsef, gpf, per_row, wf,
                                                f_one_m_ls, f_ls_wc, f_ls_c, f_zl2, f_cap, stream);
            }
            continue;
          }
        }
#endif
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
