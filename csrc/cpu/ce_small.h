// Cross-entropy of (M, C) rows with few classes (C <= kSmallC) on the CPU: forward and gradient.
//
// API (namespace fused_trim::cpu; scalar_t, acc_t, the arguments and the outputs as in ce_rows.h):
//   kSmallC                        the largest C these paths take (the op dispatches on it)
//   small_c_forward_parallel<scalar_t, acc_t>(x, row_stride, M, C, t, ignore_index, w, w_total, ls,
//                                             cap, zl, loss_out, lse_out, bad_target)
//       rows_forward_parallel's outputs, for C <= kSmallC.
//   small_c_backward_parallel<scalar_t, acc_t>(x, row_stride, M, C, t, ignore_index, w, w_total, ls,
//                                              cap, zl, gp, per_row, lse, rowscale, grad)
//       The gradient (M, C), contiguous, of the rows: kept rows (rowscale != 0, target a class)
//       d(coef * l)/dx with coef = gp[i or 0] * rowscale[i], every other row exactly 0; a kept
//       row with a NaN lse is a NaN row, as torch.
//
// A row of ten classes is 40 bytes, shorter than one vector: a loop over rows would spend its time
// in horizontal reductions and scalar tails. Instead V rows (one vector's lanes) at a time are
// transposed into a [C][V] tile, so that max, exp, sum, log, the target's logit and the gradient
// are vertical vector ops across V rows, with no horizontal reduction at all. With fp32 on AVX-512
// the transpose is done in registers (transpose16), and the per-row scalars (targets, the target's
// logit and weight, the loss formula, the gradient's coefficients) are vector ops and gathers too.
// The gradient of fp32 rows of up to 16 classes is formed in the rows' own flat layout instead (see
// FlatLayout); other gradients go through the tile and back. Every lane does the same arithmetic on
// its own row, so a row's loss and gradient do not depend on which rows share its vector, nor on the
// thread count.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include <ATen/Parallel.h>

#include "ce_rows.h"
#include "vec.h"

namespace fused_trim::cpu {

// Up to here the tile ([C][V] acc_t: 2 KiB of fp32 at AVX-512) beats the row paths in both
// directions; at C = 64 the grouped rows forward is the faster one.
constexpr int64_t kSmallC = 32;

// The logits of the block of V rows kPrefetchBlocks blocks ahead of row i0, asked for now. Rows of
// a few classes are read by short masked loads, which the hardware prefetcher does not follow, so
// out of the cache every block would wait for memory.
constexpr int64_t kPrefetchBlocks = 8;
template <typename scalar_t, int64_t V>
inline void prefetch_ahead(const scalar_t* x, int64_t row_stride, int64_t i0, int64_t end) {
  if (i0 + (kPrefetchBlocks + 1) * V > end) return;
  const char* ahead = reinterpret_cast<const char*>(x + (i0 + kPrefetchBlocks * V) * row_stride);
  const int64_t bytes = V * row_stride * static_cast<int64_t>(sizeof(scalar_t));
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(ahead + b, 0, 0);
}

#if defined(CPU_CAPABILITY_AVX512)
// tile[c * 16 + r] = x[r * stride + c] for r < rows, c < cols <= 16 (lanes r >= rows: 0): 16 masked
// row loads and a 16 x 16 transpose in registers by unpacks and 128-bit shuffles (FBGEMM's).
inline void transpose16(const float* x, int64_t stride, int64_t rows, int64_t cols, float* tile) {
  const __mmask16 cm = static_cast<__mmask16>(cols >= 16 ? 0xFFFF : (1u << cols) - 1);
  __m512 a[16], b[16];
  for (int r = 0; r < 16; ++r) a[r] = r < rows ? _mm512_maskz_loadu_ps(cm, x + r * stride) : _mm512_setzero_ps();
  for (int i = 0; i < 8; ++i) {
    b[2 * i] = _mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]);
    b[2 * i + 1] = _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    const __m512d b0 = _mm512_castps_pd(b[4 * i]), b1 = _mm512_castps_pd(b[4 * i + 1]);
    const __m512d b2 = _mm512_castps_pd(b[4 * i + 2]), b3 = _mm512_castps_pd(b[4 * i + 3]);
    a[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(b0, b2));
    a[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(b0, b2));
    a[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b1, b3));
    a[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b1, b3));
  }
  for (int i = 0; i < 2; ++i) {
    for (int j = 0; j < 4; ++j) {
      b[8 * i + j] = _mm512_shuffle_f32x4(a[8 * i + j], a[8 * i + j + 4], 0x88);
      b[8 * i + j + 4] = _mm512_shuffle_f32x4(a[8 * i + j], a[8 * i + j + 4], 0xdd);
    }
  }
  for (int c = 0; c < 16; ++c) {
    if (c >= cols) break;
    const __m512 col = c < 8 ? _mm512_shuffle_f32x4(b[c], b[8 + c], 0x88) : _mm512_shuffle_f32x4(b[c - 8], b[c], 0xdd);
    _mm512_store_ps(tile + c * 16, col);
  }
}
#endif

// tile[c * V + r] = x[r * row_stride + c] in acc_t for r < rows, c < C; lanes r >= rows are 0.
template <typename scalar_t, typename acc_t>
inline void load_tile(const scalar_t* x, int64_t row_stride, int64_t rows, int64_t C, acc_t* tile) {
  constexpr int64_t V = Vectorized<acc_t>::size();
  if (rows < V) std::fill(tile, tile + C * V, acc_t(0));
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
    for (int64_t c0 = 0; c0 < C; c0 += 16) {
      transpose16(x + c0, row_stride, rows, std::min<int64_t>(16, C - c0), tile + c0 * V);
    }
    return;
  }
#endif
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* row = x + r * row_stride;
    for (int64_t c = 0; c < C; ++c) tile[c * V + r] = static_cast<acc_t>(row[c]);
  }
}

// g[r * C + c] = tile[c * V + r] rounded to scalar_t, for r < rows, c < C.
template <typename scalar_t, typename acc_t>
inline void store_tile(const acc_t* tile, int64_t rows, int64_t C, scalar_t* g) {
  constexpr int64_t V = Vectorized<acc_t>::size();
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < C; ++c) g[r * C + c] = static_cast<scalar_t>(tile[c * V + r]);
  }
}

// Rows [begin, end) (begin a multiple of V), one thread (Cap: the tile is capped once loaded).
template <typename scalar_t, typename acc_t, bool Cap>
__attribute__((flatten)) void small_c_forward(const scalar_t* x, int64_t row_stride, int64_t C, const int64_t* t,
                                              int64_t ignore_index, const acc_t* w, acc_t w_total, acc_t ls,
                                              acc_t cap, acc_t zl, int64_t begin, int64_t end, acc_t* loss_out,
                                              acc_t* lse_out, std::atomic<bool>& bad_target) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  alignas(64) acc_t tile[kSmallC * V];
  alignas(64) acc_t xyv[V], wyv[V], okv[V];
  const bool smooth = ls > 0;
  for (int64_t i0 = begin; i0 < end; i0 += V) {
    const int64_t rows = std::min(V, end - i0);
    prefetch_ahead<scalar_t, V>(x, row_stride, i0, end);
    load_tile<scalar_t, acc_t>(x + i0 * row_stride, row_stride, rows, C, tile);
    if constexpr (Cap) cap_block<acc_t>(tile, C * V, cap, tile);
    Vec m = Vec::loadu(tile);
    for (int64_t c = 1; c < C; ++c) m = at::vec::maximum(m, Vec::loadu(tile + c * V));
    Vec s(0), sx(0);
    for (int64_t c = 0; c < C; ++c) {
      const Vec d = Vec::loadu(tile + c * V) - m;
      s = s + vexp(d);
      if (smooth) sx = sx + (w == nullptr ? d : d * Vec(w[c]));
    }
    // Per lane: the target's logit and weight (class 0 for a row not scored), then finish_sample's
    // arithmetic on the whole vector; rows not scored get 0.
    Vec xy, wy, ok;
    bool bad = false;
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<acc_t, float>) {
      // 16 targets at once: masks, then one gather from the tile (and the weights).
      const Targets16 tg = load_targets16(t + i0, rows, ignore_index, C);
      bad = tg.bad != 0;
      const __mmask16 sc = tg.scored;
      const __m512i y32 = tg.y32;
      const __m512i idx = _mm512_add_epi32(_mm512_slli_epi32(_mm512_maskz_mov_epi32(sc, y32), 4), lane_index16());
      xy = Vec(_mm512_i32gather_ps(idx, tile, 4));
      wy = w == nullptr ? Vec(1.0f)
                        : Vec(_mm512_mask_i32gather_ps(_mm512_set1_ps(1.0f), sc, y32,
                                                       reinterpret_cast<const float*>(w), 4));
      ok = Vec(_mm512_castsi512_ps(_mm512_movm_epi32(sc)));
    } else
#endif
    {
      for (int64_t r = 0; r < V; ++r) {
        const int64_t y = t[i0 + std::min(r, rows - 1)];
        const bool in_range = static_cast<uint64_t>(y) < static_cast<uint64_t>(C);
        const bool scored = (r < rows) & (y != ignore_index) & in_range;
        bad |= (r < rows) & (y != ignore_index) & !in_range;
        const int64_t yk = y & -int64_t(scored);
        xyv[r] = tile[yk * V + r];
        wyv[r] = w == nullptr ? acc_t(1) : w[yk];
        okv[r] = static_cast<acc_t>(scored);
      }
      xy = Vec::loadu(xyv);
      wy = Vec::loadu(wyv);
      ok = Vec::loadu(okv) != Vec(0);
    }
    if (bad) bad_target.store(true, std::memory_order_relaxed);
    Vec loss, lse;
    // (sx was taken relative to the max itself)
    finish_samples<acc_t>(m, s.log(), xy, wy, m, sx, ls, w_total, C, zl, loss, lse);
    loss = Vec::blendv(Vec(0), loss, ok);
    lse = Vec::blendv(Vec(0), lse, ok);
    if (rows == V) {
      loss.store(loss_out + i0);
      lse.store(lse_out + i0);
    } else {
      loss.store(loss_out + i0, static_cast<int>(rows));
      lse.store(lse_out + i0, static_cast<int>(rows));
    }
  }
}

// Rows go to threads in whole vectors of rows, at least kParallelGrainElements logits a chunk.
template <typename acc_t>
inline int64_t small_c_grain_vectors(int64_t C) {
  constexpr int64_t V = Vectorized<acc_t>::size();
  const int64_t rows = std::max<int64_t>(1, kParallelGrainElements / std::max<int64_t>(C, 1));
  return (rows + V - 1) / V;
}

template <typename scalar_t, typename acc_t>
void small_c_forward_parallel(const scalar_t* x, int64_t row_stride, int64_t M, int64_t C, const int64_t* t,
                              int64_t ignore_index, const acc_t* w, acc_t w_total, acc_t ls, acc_t cap, acc_t zl,
                              acc_t* loss_out, acc_t* lse_out, std::atomic<bool>& bad_target) {
  constexpr int64_t V = Vectorized<acc_t>::size();
  at::parallel_for(0, (M + V - 1) / V, small_c_grain_vectors<acc_t>(C), [&](int64_t gb, int64_t ge) {
    if (cap > acc_t(0)) {
      small_c_forward<scalar_t, acc_t, true>(x, row_stride, C, t, ignore_index, w, w_total, ls, cap, zl, gb * V,
                                             std::min(M, ge * V), loss_out, lse_out, bad_target);
    } else {
      small_c_forward<scalar_t, acc_t, false>(x, row_stride, C, t, ignore_index, w, w_total, ls, cap, zl, gb * V,
                                              std::min(M, ge * V), loss_out, lse_out, bad_target);
    }
  });
}

// The flat layout of a full block of fp32 rows (AVX-512, C <= 16, contiguous rows): the block's
// 16 * C gradients are C whole vectors, each lane's row coefficient fetched from the block's
// coefficient vectors by one in-register permute; loads and stores stay whole and contiguous (and
// streamed when asked), with no transpose either way.
#if defined(CPU_CAPABILITY_AVX512)
struct FlatLayout {
  __m512i row[16];  // lane -> the row (in the block) of flat element 16 j + lane
  __m512 cls[16];   // ... and its class, as float
  __m512 w[16];     // ... and that class's weight (1 without a weight)
};

inline FlatLayout flat_layout(int64_t C, const float* w) {
  FlatLayout f;
  for (int64_t j = 0; j < C; ++j) {
    alignas(64) int32_t row[16];
    alignas(64) float cls[16], wc[16];
    for (int64_t l = 0; l < 16; ++l) {
      const int64_t e = 16 * j + l;
      row[l] = static_cast<int32_t>(e / C);
      cls[l] = static_cast<float>(e % C);
      wc[l] = w == nullptr ? 1.0f : w[e % C];
    }
    f.row[j] = _mm512_load_si512(row);
    f.cls[j] = _mm512_load_ps(cls);
    f.w[j] = _mm512_load_ps(wc);
  }
  return f;
}
#endif

// The gradient of rows [begin, end) (begin a multiple of V), one thread. Per lane the arithmetic of
// row_backward: a exp(x_c - lse) - b w_c off the target, the true class formed in acc_t from
// p_y = exp(x_y - lse) (the accurate vector exp: it decides the bits of 1 - p_y when p_y ~ 1); with
// Cap, of the capped logits, times cap_grad (through the tile: no flat layout).
template <typename scalar_t, typename acc_t, bool Cap>
__attribute__((flatten)) void small_c_backward(const scalar_t* x, int64_t row_stride, int64_t C, const int64_t* t,
                                               int64_t ignore_index, const acc_t* w, acc_t w_total, acc_t ls,
                                               acc_t cap, acc_t zl, const acc_t* gp, bool per_row, const acc_t* lse,
                                               const acc_t* rs, int64_t begin, int64_t end, scalar_t* grad,
                                               bool stream) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  alignas(64) acc_t tile[kSmallC * V];
  alignas(64) acc_t cm[V], wm[V], lm[V], ym[V], xy[V];
  const acc_t one_m_ls = acc_t(1) - ls, ls_wc = ls * w_total / static_cast<acc_t>(C);
  const int64_t g_step = per_row ? 1 : 0;
  const Vec nan(std::numeric_limits<acc_t>::quiet_NaN());
  // (the vector gathers index the block's rows with 32-bit offsets)
  [[maybe_unused]] const bool gather_ok = row_stride <= (int64_t(1) << 26);
#if defined(CPU_CAPABILITY_AVX512)
  constexpr bool flat_type = !Cap && std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>;
  const bool flat = flat_type && C <= 16 && row_stride == C;
  FlatLayout layout;
  if constexpr (flat_type) {
    if (flat) layout = flat_layout(C, reinterpret_cast<const float*>(w));
  }
#endif
  for (int64_t i0 = begin; i0 < end; i0 += V) {
    const int64_t rows = std::min(V, end - i0);
    prefetch_ahead<scalar_t, V>(x, row_stride, i0, end);
    scalar_t* g = grad + i0 * C;
    // The rows' coefficients, branch-free (a random half of the rows is kept: no predictor guesses
    // it). Masks, not products: a row left out may have a NaN upstream gradient or lse.
    int64_t nk = 0;
    Vec coef, w_y, vl, vy, u_y;
    bool gathered = false;
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
      if (gather_ok) {
        gathered = true;
        // The same values in vector form (a lane left out: coefficient and lse +0, class -1,
        // logit 0, weight 1; the lane's gradient is masked to 0 in the end either way).
        const __mmask16 rm = static_cast<__mmask16>(rows >= 16 ? 0xFFFF : (1u << rows) - 1);
        const Targets16 tg = load_targets16(t + i0, rows, ignore_index, C);
        const __m512 rsv = _mm512_maskz_loadu_ps(rm, reinterpret_cast<const float*>(rs) + i0);
        const __mmask16 km =
            static_cast<__mmask16>(tg.scored & _mm512_cmp_ps_mask(rsv, _mm512_setzero_ps(), _CMP_NEQ_UQ));
        nk = __builtin_popcount(unsigned(km));
        if (nk != 0) {
          const float* gpf = reinterpret_cast<const float*>(gp);
          const __m512 gv = per_row ? _mm512_maskz_loadu_ps(km, gpf + i0) : _mm512_set1_ps(gpf[0]);
          const __m512i y32 = tg.y32;
          coef = Vec(_mm512_maskz_mul_ps(km, gv, rsv));
          w_y = w == nullptr ? Vec(1.0f)
                             : Vec(_mm512_mask_i32gather_ps(_mm512_set1_ps(1.0f), km, y32,
                                                            reinterpret_cast<const float*>(w), 4));
          vl = Vec(_mm512_maskz_loadu_ps(km, reinterpret_cast<const float*>(lse) + i0));
          vy = Vec(_mm512_mask_blend_ps(km, _mm512_set1_ps(-1.0f), _mm512_cvtepi32_ps(y32)));
          const __m512i idx =
              _mm512_add_epi32(_mm512_mullo_epi32(lane_index16(), _mm512_set1_epi32(int32_t(row_stride))), y32);
          u_y = Vec(_mm512_mask_i32gather_ps(_mm512_setzero_ps(), km, idx,
                                             reinterpret_cast<const float*>(x) + i0 * row_stride, 4));
        }
      }
    }
#endif
    if (!gathered) {
      for (int64_t r = 0; r < V; ++r) {
        const int64_t i = i0 + std::min(r, rows - 1);
        const int64_t y = t[i];
        const int64_t keep = int64_t(r < rows) & int64_t(rs[i] != acc_t(0)) & int64_t(y != ignore_index) &
                             int64_t(static_cast<uint64_t>(y) < static_cast<uint64_t>(C));
        const int64_t yk = y & -keep;
        cm[r] = zero_unless(gp[i * g_step] * rs[i], keep);
        wm[r] = w == nullptr ? acc_t(1) : w[yk];
        lm[r] = zero_unless(lse[i], keep);
        ym[r] = static_cast<acc_t>(((y + 1) & -keep) - 1);  // y, or -1 when left out
        xy[r] = static_cast<acc_t>(x[i * row_stride + yk]);
        nk += keep;
      }
      coef = Vec::loadu(cm);
      w_y = Vec::loadu(wm);
      vl = Vec::loadu(lm);
      vy = Vec::loadu(ym);
      u_y = Vec::loadu(xy);
    }
    if (nk == 0) {  // no kept row: zeros, without reading the logits
      zero_bytes(static_cast<void*>(g), static_cast<size_t>(rows * C) * sizeof(scalar_t), stream);
      continue;
    }
    // row_grad_coefs and row_grad_true_class, lane by lane; a kept row with a NaN lse gets NaN
    // coefficients, hence a NaN row.
    const Vec nan_row = (vy >= Vec(0)) & (vl != vl);
    Vec a = coef * (Vec(one_m_ls) * w_y + Vec(ls_wc));
    if (zl != acc_t(0)) a = a + coef * (Vec(acc_t(2) * zl) * vl);
    const Vec va = Vec::blendv(a, nan, nan_row);
    const Vec vb = coef * Vec(ls) / Vec(static_cast<acc_t>(C));
    if constexpr (Cap) u_y = vcap<acc_t>(u_y, cap);
    const Vec p_y = (u_y - vl).exp();
    const Vec vt = Vec::blendv((va * p_y - vb * w_y) - coef * Vec(one_m_ls) * w_y, nan, nan_row);
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (flat_type) {
      if (flat && rows == V) {
        const bool nt = stream && reinterpret_cast<uintptr_t>(g) % 64 == 0;
        const __m512 a512 = va, b512 = vb, t512 = vt, l512 = vl, y512 = vy;
        for (int64_t j = 0; j < C; ++j) {
          const __m512i id = layout.row[j];
          const Vec a(_mm512_permutexvar_ps(id, a512)), b(_mm512_permutexvar_ps(id, b512));
          const Vec l(_mm512_permutexvar_ps(id, l512)), yv(_mm512_permutexvar_ps(id, y512));
          const Vec e = vexp(Vec::loadu(reinterpret_cast<const float*>(x) + i0 * C + 16 * j) - l);
          Vec gv = e * a - b * Vec(layout.w[j]);
          gv = Vec::blendv(gv, Vec(_mm512_permutexvar_ps(id, t512)), yv == Vec(layout.cls[j]));
          gv = Vec::blendv(Vec(0), gv, yv >= Vec(0));
          float* gj = reinterpret_cast<float*>(g) + 16 * j;
          if (nt) {
            store_stream<float>(gj, gv);
          } else {
            gv.store(gj);
          }
        }
        continue;
      }
    }
#endif
    load_tile<scalar_t, acc_t>(x + i0 * row_stride, row_stride, rows, C, tile);
    const Vec keep = vy >= Vec(0);
    for (int64_t c = 0; c < C; ++c) {
      Vec u = Vec::loadu(tile + c * V);
      if constexpr (Cap) u = vcap<acc_t>(u, cap);
      const Vec e = vexp(u - vl);
      Vec gv = e * va - vb * Vec(w == nullptr ? acc_t(1) : w[c]);
      gv = Vec::blendv(gv, vt, vy == Vec(static_cast<acc_t>(c)));
      if constexpr (Cap) gv = gv * cap_grad<acc_t>(u, cap);
      Vec::blendv(Vec(0), gv, keep).store(tile + c * V);
    }
    store_tile<scalar_t, acc_t>(tile, rows, C, g);
  }
  if (stream) stream_fence();
}

template <typename scalar_t, typename acc_t>
void small_c_backward_parallel(const scalar_t* x, int64_t row_stride, int64_t M, int64_t C, const int64_t* t,
                               int64_t ignore_index, const acc_t* w, acc_t w_total, acc_t ls, acc_t cap, acc_t zl,
                               const acc_t* gp, bool per_row, const acc_t* lse, const acc_t* rs, scalar_t* grad) {
  constexpr int64_t V = Vectorized<acc_t>::size();
  const bool stream = static_cast<size_t>(M) * C * sizeof(scalar_t) >= kStreamBytes;
  interleaved_for((M + V - 1) / V, small_c_grain_vectors<acc_t>(C), [&](int64_t gb, int64_t ge) {
    if (cap > acc_t(0)) {
      small_c_backward<scalar_t, acc_t, true>(x, row_stride, C, t, ignore_index, w, w_total, ls, cap, zl, gp, per_row,
                                              lse, rs, gb * V, std::min(M, ge * V), grad, stream);
    } else {
      small_c_backward<scalar_t, acc_t, false>(x, row_stride, C, t, ignore_index, w, w_total, ls, cap, zl, gp,
                                               per_row, lse, rs, gb * V, std::min(M, ge * V), grad, stream);
    }
  });
}

}  // namespace fused_trim::cpu
