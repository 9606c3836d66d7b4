// The exact-k selection over per-sample losses and the reduction over the kept set (CPU).
//
// API (namespace fused_trim::cpu; acc_t float or double, scalar_t the output type):
//   Selection select_reduce<scalar_t, acc_t>(loss, t, ignore_index, M, easiest, rule, offset, w,
//                                            reduction, out, kept, rowscale)
//       The kept set of the contract: valid samples are those with t[i] != ignore_index (n of
//       them); k = rule_k(rule, n, past) (trimmed_ce_common.h; past: the valid samples whose
//       ranked value is past the rule's threshold, counted only for a threshold rule); the k
//       valid samples with the largest ranking keys (KeyOf<acc_t>: "hardest" keeps the largest
//       losses, NaN first; "easiest" the smallest; -0.0 == +0.0), ties to the lower index. With
//       offset (M values in acc_t, or nullptr) the keys rank the scores
//       score_of(loss, offset, i) = loss[i] - offset[i] instead of the losses.
//       Writes kept[M] (bool), rowscale[M] (the gradient scale: 1/denominator for "mean", 1 for
//       "sum"/"none", 0 outside the kept set) and out: the scalar result for mean/sum (mean =
//       sum_K l_i / sum_K w[t_i], NaN when k = 0; sums in double), or M values (l_i on K, 0
//       elsewhere) for "none". Returns n, k, the index of the k-th ranked sample (the threshold:
//       its score is score_of(loss, offset, thr_idx); -1 when k = 0) and the denominator
//       sum_K w[t_i] (k without a weight).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

#include "../trimmed_ce_common.h"

namespace fused_trim::cpu {

// From this many rows on, the selection starts with a histogram of the ranking keys (fp32 and
// narrower; below it, one nth_element over all the candidates is faster).
constexpr int64_t kRadixSelectMin = int64_t(1) << 15;

// The ranked value of sample i: its loss, or loss - offset (score_offset) in acc_t.
template <typename acc_t>
inline acc_t score_of(const acc_t* loss_acc, const acc_t* offset, int64_t i) {
  return offset == nullptr ? loss_acc[i] : loss_acc[i] - offset[i];
}

struct Selection {
  int64_t n = 0;         // valid samples
  int64_t k = 0;         // kept samples
  int64_t thr_idx = -1;  // the k-th ranked sample (-1: none)
  double denom = 0.0;    // sum_K w[t_i] (k without a weight)
};

// The outputs of a kept set given as a list of indices: kept, rowscale, out; returns the
// denominator (sum_K w[t_i], k without a weight).
template <typename scalar_t, typename acc_t>
double write_kept(const acc_t* loss_acc, const int64_t* t, const acc_t* w, int64_t M,
                  const std::vector<int64_t>& kept_idx, int64_t reduction, scalar_t* out, bool* kp, acc_t* rs) {
  const int64_t k = static_cast<int64_t>(kept_idx.size());
  double sum_loss = 0.0, sum_w = 0.0;
  for (int64_t j = 0; j < k; ++j) {
    const int64_t i = kept_idx[j];
    sum_loss += static_cast<double>(loss_acc[i]);
    sum_w += w == nullptr ? 1.0 : static_cast<double>(w[t[i]]);
  }
  const acc_t scale = reduction == kMean ? static_cast<acc_t>(1.0 / sum_w) : acc_t(1);
  scalar_t* o = reduction == kNone ? out : nullptr;
  for (int64_t i = 0; i < M; ++i) {
    kp[i] = false;
    rs[i] = 0;
    if (o != nullptr) o[i] = static_cast<scalar_t>(0);
  }
  for (int64_t j = 0; j < k; ++j) {
    const int64_t i = kept_idx[j];
    kp[i] = true;
    rs[i] = scale;
    if (o != nullptr) o[i] = static_cast<scalar_t>(loss_acc[i]);
  }
  if (reduction == kSum) {
    *out = static_cast<scalar_t>(sum_loss);
  } else if (reduction == kMean) {
    *out = static_cast<scalar_t>(sum_loss / sum_w);
  }
  return sum_w;
}

inline uint32_t bits_of(float v) {
  uint32_t b;
  std::memcpy(&b, &v, sizeof(b));
  return b;
}

inline float float_of(uint32_t b) {
  float v;
  std::memcpy(&v, &b, sizeof(v));
  return v;
}

#if defined(CPU_CAPABILITY_AVX512)
// KeyOf<float>::get on 16 lanes.
inline __m512i keys16(__m512 f, bool easiest) {
  const __mmask16 nan = _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q);
  const __mmask16 zero = _mm512_cmp_ps_mask(f, _mm512_setzero_ps(), _CMP_EQ_OQ);  // -0.0 -> +0.0
  const __m512i b = _mm512_maskz_mov_epi32(static_cast<__mmask16>(~zero), _mm512_castps_si512(f));
  const __m512i flip = _mm512_or_si512(_mm512_srai_epi32(b, 31), _mm512_set1_epi32(int32_t(0x80000000u)));
  __m512i key = _mm512_mask_mov_epi32(_mm512_xor_si512(b, flip), nan, _mm512_set1_epi32(-1));
  if (easiest) key = _mm512_xor_si512(key, _mm512_set1_epi32(-1));
  return key;
}

// score_of on lanes i0 + [0, 16) (rm: the lanes in range; the others 0).
inline __m512 scores16(const float* loss, const float* offset, int64_t i0, __mmask16 rm) {
  const __m512 l = _mm512_maskz_loadu_ps(rm, loss + i0);
  return offset == nullptr ? l : _mm512_sub_ps(l, _mm512_maskz_loadu_ps(rm, offset + i0));
}

// The lanes (of rm) whose target is not ignore_index, as bits.
inline unsigned valid16(const int64_t* t, int64_t i0, __mmask16 rm, int64_t ignore_index) {
  const __m512i ign = _mm512_set1_epi64(ignore_index);
  const __mmask8 rlo = static_cast<__mmask8>(rm & 0xFF), rhi = static_cast<__mmask8>(rm >> 8);
  const __mmask8 lo = _mm512_mask_cmpneq_epi64_mask(rlo, _mm512_maskz_loadu_epi64(rlo, t + i0), ign);
  const __mmask8 hi = _mm512_mask_cmpneq_epi64_mask(rhi, _mm512_maskz_loadu_epi64(rhi, t + i0 + 8), ign);
  return unsigned(lo) | (unsigned(hi) << 8);
}

// The targets of lanes i0 + [0, 16) as int32 (0 outside rm).
inline __m512i targets16_i32(const int64_t* t, int64_t i0, __mmask16 rm) {
  const __mmask8 rlo = static_cast<__mmask8>(rm & 0xFF), rhi = static_cast<__mmask8>(rm >> 8);
  return _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi64_epi32(_mm512_maskz_loadu_epi64(rlo, t + i0))),
                            _mm512_cvtepi64_epi32(_mm512_maskz_loadu_epi64(rhi, t + i0 + 8)), 1);
}

// past_threshold on 16 lanes, as bits (compared in double; NaN is past for "hardest" only).
inline unsigned past16(__m512 sc, double threshold, bool easiest) {
  const __m512d th = _mm512_set1_pd(threshold);
  const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(sc)), hi = _mm512_cvtps_pd(_mm512_extractf32x8_ps(sc, 1));
  if (easiest) {
    return unsigned(_mm512_cmp_pd_mask(lo, th, _CMP_LT_OQ)) | (unsigned(_mm512_cmp_pd_mask(hi, th, _CMP_LT_OQ)) << 8);
  }
  return unsigned(_mm512_cmp_pd_mask(lo, th, _CMP_NLE_UQ)) | (unsigned(_mm512_cmp_pd_mask(hi, th, _CMP_NLE_UQ)) << 8);
}
#endif

// Bins of the histogram select: the ranking key's top 16 bits. A per-thread table, all zero
// between calls (each call clears the bins it used), so that a call neither allocates nor clears
// 256 KiB.
inline uint32_t* key_histogram() {
  thread_local std::vector<uint32_t> hist(size_t(1) << 16, 0);
  return hist.data();
}

// The histogram select for 32-bit keys (M < 2^32), writing the outputs as it goes: a pass over the
// keys counts each top-16-bit bin; the bin that holds the k-th key splits the rows into kept (above
// it), dropped (below it) and candidates (in it, a few hundredths of the rows), which are ranked
// by nth_element. The second pass writes kept/rowscale/out and sums the kept rows' losses in four
// interleaved double partial sums (a fixed order: the result does not depend on anything but the
// losses); the weighted mean rescales rowscale in a third pass once its denominator is known.
template <typename scalar_t, typename acc_t, bool Weighted>
Selection histogram_select(const acc_t* loss_acc, const int64_t* t, int64_t ignore_index, int64_t M, bool easiest,
                           const KeepRule& rule, const acc_t* offset, const acc_t* w, int64_t reduction,
                           scalar_t* out, bool* kp, acc_t* rs) {
  static_assert(sizeof(typename KeyOf<acc_t>::type) == 4);
  Selection sel;
  uint32_t* hist = key_histogram();
  const bool threshold_rule = rule.has_threshold && rule.count < 0;
  int64_t n = 0, past = 0;
  uint32_t lo = 0xFFFF, hi = 0;
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) {
    // 16 keys at a time in a vector; the bin counts one by one.
    __m512i vlo = _mm512_set1_epi32(0xFFFF), vhi = _mm512_setzero_si512();
    alignas(64) uint32_t hbs[16];
    for (int64_t i0 = 0; i0 < M; i0 += 16) {
      const int64_t m16 = std::min<int64_t>(16, M - i0);
      const __mmask16 rm = static_cast<__mmask16>(m16 == 16 ? 0xFFFF : (1u << m16) - 1);
      const __m512 sc = scores16(loss_acc, offset, i0, rm);
      const __m512i hb = _mm512_srli_epi32(keys16(sc, easiest), 16);
      const unsigned valid = valid16(t, i0, rm, ignore_index);
      vlo = _mm512_mask_min_epu32(vlo, rm, vlo, hb);
      vhi = _mm512_mask_max_epu32(vhi, rm, vhi, hb);
      _mm512_store_si512(hbs, hb);
      for (int64_t j = 0; j < m16; ++j) hist[hbs[j]] += (valid >> j) & 1u;
      n += __builtin_popcount(valid);
      if (threshold_rule) past += __builtin_popcount(valid & past16(sc, rule.threshold, easiest));
    }
    lo = _mm512_reduce_min_epu32(vlo);
    hi = _mm512_reduce_max_epu32(vhi);
  } else
#endif
  {
    for (int64_t i = 0; i < M; ++i) {
      const acc_t s = score_of(loss_acc, offset, i);
      const uint32_t hb = KeyOf<acc_t>::get(s, easiest) >> 16;
      const uint32_t valid = t[i] != ignore_index;
      hist[hb] += valid;
      n += valid;
      lo = std::min(lo, hb);
      hi = std::max(hi, hb);
      if (threshold_rule) past += valid & past_threshold(s, rule.threshold, easiest);
    }
  }
  const int64_t k = rule_k(rule, n, past);
  sel.n = n;
  sel.k = k;
  // The threshold bin: the rows above it are kept; with k = 0 none is (every key lies at or below
  // bin 0xFFFF, and the candidates are only ranked when k > 0).
  int64_t above = 0;
  uint32_t bin = k > 0 ? hi : 0xFFFF;
  if (k > 0) {
    while (above + int64_t(hist[bin]) < k) above += hist[bin--];
  }
  std::fill(hist + lo, hist + hi + 1, 0u);
  const acc_t mean_scale = reduction == kMean && !Weighted ? static_cast<acc_t>(1.0 / double(k)) : acc_t(1);
  scalar_t* o = reduction == kNone ? out : nullptr;
  std::vector<uint64_t> tie;
  // Branch-free (whether a row is kept is a coin flip to the branch predictor): a row left out
  // contributes +0 through a bit mask, so that its loss (NaN, say) never reaches a sum.
  const uint32_t scale_bits = bits_of(mean_scale);
  double sl[4] = {0, 0, 0, 0}, sw[4] = {0, 0, 0, 0};
  auto row = [&](int64_t i, double& sli, double& swi) {
    const acc_t l = loss_acc[i];
    const uint32_t hb = KeyOf<acc_t>::get(score_of(loss_acc, offset, i), easiest) >> 16;
    const int64_t y = t[i];
    const uint32_t valid = y != ignore_index;
    const uint32_t keep = valid & (hb > bin);
    const uint32_t mask = 0u - keep;
    const acc_t lk = float_of(bits_of(l) & mask);
    kp[i] = keep;
    rs[i] = float_of(scale_bits & mask);
    if (o != nullptr) o[i] = static_cast<scalar_t>(lk);
    sli += static_cast<double>(lk);
    if constexpr (Weighted) swi += static_cast<double>(float_of(bits_of(w[y & -int64_t(valid)]) & mask));
    if (valid & (hb == bin) & (k > 0)) {  // (rare: predicted)
      const uint32_t key = KeyOf<acc_t>::get(score_of(loss_acc, offset, i), easiest);
      tie.push_back((uint64_t(key) << 32) | (uint64_t(0xFFFFFFFFu) - uint64_t(i)));
    }
  };
  int64_t i = 0;
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) {
    if (o == nullptr || std::is_same_v<scalar_t, float>) {
      // The same, 16 rows at a time: the sums in 2 x 8 double lanes (a fixed order as well).
      __m512d vsl[2] = {_mm512_setzero_pd(), _mm512_setzero_pd()};
      __m512d vsw[2] = {_mm512_setzero_pd(), _mm512_setzero_pd()};
      const __m512i vbin = _mm512_set1_epi32(static_cast<int32_t>(bin));
      const __m128i one8 = _mm_set1_epi8(1);
      for (int64_t i0 = 0; i0 < M; i0 += 16) {
        const int64_t m16 = std::min<int64_t>(16, M - i0);
        const __mmask16 rm = static_cast<__mmask16>(m16 == 16 ? 0xFFFF : (1u << m16) - 1);
        const __m512 l = _mm512_maskz_loadu_ps(rm, loss_acc + i0);
        const __m512 sc = offset == nullptr ? l : _mm512_sub_ps(l, _mm512_maskz_loadu_ps(rm, offset + i0));
        const __m512i hb = _mm512_srli_epi32(keys16(sc, easiest), 16);
        const __mmask16 valid = static_cast<__mmask16>(valid16(t, i0, rm, ignore_index));
        const __mmask16 keep = k > 0 ? _mm512_mask_cmpgt_epu32_mask(valid, hb, vbin) : __mmask16(0);
        const __mmask16 tied = k > 0 ? _mm512_mask_cmpeq_epu32_mask(valid, hb, vbin) : __mmask16(0);
        _mm_mask_storeu_epi8(kp + i0, rm, _mm_maskz_mov_epi8(keep, one8));
        _mm512_mask_storeu_ps(rs + i0, rm, _mm512_maskz_mov_ps(keep, _mm512_set1_ps(mean_scale)));
        const __m512 lk = _mm512_maskz_mov_ps(keep, l);
        if (o != nullptr) _mm512_mask_storeu_ps(reinterpret_cast<float*>(o) + i0, rm, lk);
        vsl[0] = _mm512_add_pd(vsl[0], _mm512_cvtps_pd(_mm512_castps512_ps256(lk)));
        vsl[1] = _mm512_add_pd(vsl[1], _mm512_cvtps_pd(_mm512_extractf32x8_ps(lk, 1)));
        if constexpr (Weighted) {
          const __m512i y32 = targets16_i32(t, i0, rm);
          const __m512 wk = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), keep, y32, w, 4);
          vsw[0] = _mm512_add_pd(vsw[0], _mm512_cvtps_pd(_mm512_castps512_ps256(wk)));
          vsw[1] = _mm512_add_pd(vsw[1], _mm512_cvtps_pd(_mm512_extractf32x8_ps(wk, 1)));
        }
        for (unsigned tm = tied; tm != 0; tm &= tm - 1) {  // (rare)
          const int64_t r = i0 + __builtin_ctz(tm);
          const uint32_t key = KeyOf<acc_t>::get(score_of(loss_acc, offset, r), easiest);
          tie.push_back((uint64_t(key) << 32) | (uint64_t(0xFFFFFFFFu) - uint64_t(r)));
        }
      }
      sl[0] = _mm512_reduce_add_pd(_mm512_add_pd(vsl[0], vsl[1]));
      sw[0] = _mm512_reduce_add_pd(_mm512_add_pd(vsw[0], vsw[1]));
      i = M;
    }
  }
#endif
  for (; i + 4 <= M; i += 4) {
    row(i, sl[0], sw[0]);
    row(i + 1, sl[1], sw[1]);
    row(i + 2, sl[2], sw[2]);
    row(i + 3, sl[3], sw[3]);
  }
  for (; i < M; ++i) row(i, sl[i & 3], sw[i & 3]);
  double sum_loss = (sl[0] + sl[1]) + (sl[2] + sl[3]);
  double sum_w = Weighted ? (sw[0] + sw[1]) + (sw[2] + sw[3]) : double(above);
  if (k > 0) {
    const int64_t need = k - above;  // 1 <= need <= tie.size()
    if (need < static_cast<int64_t>(tie.size())) {
      std::nth_element(tie.begin(), tie.begin() + (need - 1), tie.end(), std::greater<uint64_t>());
    }
    const uint64_t worst = *std::min_element(tie.begin(), tie.begin() + need);
    sel.thr_idx = int64_t(0xFFFFFFFFu - (worst & 0xFFFFFFFFu));
    for (int64_t j = 0; j < need; ++j) {
      const int64_t i = int64_t(0xFFFFFFFFu - (tie[j] & 0xFFFFFFFFu));
      const acc_t l = loss_acc[i];
      kp[i] = true;
      rs[i] = mean_scale;
      if (o != nullptr) o[i] = static_cast<scalar_t>(l);
      sum_loss += static_cast<double>(l);
      sum_w += Weighted ? static_cast<double>(w[t[i]]) : 1.0;
    }
  }
  if (Weighted && reduction == kMean && k > 0) {
    const acc_t scale = static_cast<acc_t>(1.0 / sum_w);
    for (int64_t i = 0; i < M; ++i) rs[i] = kp[i] ? scale : acc_t(0);
  }
  if (reduction == kSum) {
    *out = static_cast<scalar_t>(sum_loss);
  } else if (reduction == kMean) {
    *out = static_cast<scalar_t>(sum_loss / sum_w);
  }
  sel.denom = sum_w;
  return sel;
}

// The kept set of the contract and the outputs of the reduction over it (see the API above).
template <typename scalar_t, typename acc_t>
Selection select_reduce(const acc_t* loss_acc, const int64_t* t, int64_t ignore_index, int64_t M, bool easiest,
                        const KeepRule& rule, const acc_t* offset, const acc_t* w, int64_t reduction, scalar_t* out,
                        bool* kp, acc_t* rs) {
  using key_t = typename KeyOf<acc_t>::type;
  if constexpr (sizeof(key_t) == 4) {
    if (M >= kRadixSelectMin && M <= int64_t(0xFFFFFFFF)) {
      return w == nullptr ? histogram_select<scalar_t, acc_t, false>(loss_acc, t, ignore_index, M, easiest, rule,
                                                                      offset, w, reduction, out, kp, rs)
                          : histogram_select<scalar_t, acc_t, true>(loss_acc, t, ignore_index, M, easiest, rule,
                                                                     offset, w, reduction, out, kp, rs);
    }
  }
  Selection sel;
  // Valid samples past the threshold (a threshold rule only; one more pass over the scores).
  int64_t past = 0;
  if (rule.has_threshold && rule.count < 0) {
    for (int64_t i = 0; i < M; ++i) {
      past += (t[i] != ignore_index) & past_threshold(score_of(loss_acc, offset, i), rule.threshold, easiest);
    }
  }
  // The k candidates with the largest (key, -index). With 32-bit keys (fp32 and below) and fewer
  // than 2^32 rows, a candidate is one 64-bit integer (key above, complemented index below), so
  // the selection compares plain integers.
  std::vector<int64_t> kept_idx;
  auto select = [&](auto& cands, auto better, auto index_of) {
    sel.n = static_cast<int64_t>(cands.size());
    sel.k = rule_k(rule, sel.n, past);
    const int64_t k = sel.k;
    if (k > 0 && k < sel.n) std::nth_element(cands.begin(), cands.begin() + (k - 1), cands.end(), better);
    // The k-th in ranking order is the worst of the first k.
    if (k > 0) sel.thr_idx = index_of(*std::max_element(cands.begin(), cands.begin() + k, better));
    kept_idx.resize(k);
    for (int64_t j = 0; j < k; ++j) kept_idx[j] = index_of(cands[j]);
  };
  if (sizeof(key_t) == 4 && M <= int64_t(0xFFFFFFFF)) {
    std::vector<uint64_t> cands;
    cands.reserve(M);
    for (int64_t i = 0; i < M; ++i) {
      if (t[i] != ignore_index) {
        cands.push_back((uint64_t(KeyOf<acc_t>::get(score_of(loss_acc, offset, i), easiest)) << 32) |
                        (uint64_t(0xFFFFFFFFu) - uint64_t(i)));
      }
    }
    // "better" = ranks first = larger packed value; max_element(better) gives the worst.
    select(cands, std::greater<uint64_t>(), [](uint64_t c) { return int64_t(0xFFFFFFFFu - (c & 0xFFFFFFFFu)); });
  } else {
    struct Cand {
      key_t key;
      int64_t idx;
    };
    std::vector<Cand> cands;
    cands.reserve(M);
    for (int64_t i = 0; i < M; ++i) {
      if (t[i] != ignore_index) cands.push_back({KeyOf<acc_t>::get(score_of(loss_acc, offset, i), easiest), i});
    }
    select(cands, [](const Cand& a, const Cand& b) { return a.key > b.key || (a.key == b.key && a.idx < b.idx); },
           [](const Cand& c) { return c.idx; });
  }
  sel.denom = write_kept<scalar_t, acc_t>(loss_acc, t, w, M, kept_idx, reduction, out, kp, rs);
  return sel;
}

}  // namespace fused_trim::cpu
