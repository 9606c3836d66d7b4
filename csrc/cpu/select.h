// The exact-k selection over per-sample losses and the reduction over the kept set (CPU).
//
// API (namespace fused_trim::cpu; acc_t float or double):
//   Selection select_kept<acc_t>(loss, t, ignore_index, M, easiest, rule, offset = nullptr)
//       The kept set of the contract: valid samples are those with t[i] != ignore_index (n of
//       them); k = rule_k(rule, n, past) (trimmed_ce_common.h; past: the valid samples whose
//       ranked value is past the rule's threshold, counted only for a threshold rule); the k valid samples with the largest ranking keys (KeyOf<acc_t>: "hardest" keeps the
//       largest losses, NaN first; "easiest" the smallest; -0.0 == +0.0), ties to the lower
//       index. With offset (M values in acc_t, or nullptr) the keys rank the scores
//       score_of(loss, offset, i) = loss[i] - offset[i] instead of the losses. Returns n, k, the
//       kept indices (in no particular order) and the index of the k-th ranked sample (the
//       threshold: its score is score_of(loss, offset, thr_idx); -1 when k = 0).
//   double reduce_kept<scalar_t, acc_t>(loss, t, w, M, sel, reduction, out, kept, rowscale)
//       Writes kept[M] (bool), rowscale[M] (the gradient scale: 1/denominator for "mean", 1 for
//       "sum"/"none", 0 outside the kept set) and out: the scalar result for mean/sum (mean =
//       sum_K l_i / sum_K w[t_i], NaN when k = 0), or M values (l_i on K, 0 elsewhere) for
//       "none". Returns the denominator sum_K w[t_i] (k without a weight).
#pragma once

#include <algorithm>
#include <cstdint>
#include <functional>
#include <limits>
#include <vector>

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
  int64_t n = 0;       // valid samples
  int64_t k = 0;       // kept samples
  int64_t thr_idx = -1;  // the k-th ranked sample (-1: none)
  std::vector<int64_t> kept_idx;  // the k kept samples, in no particular order
};

template <typename acc_t>
Selection select_kept(const acc_t* loss_acc, const int64_t* t, int64_t ignore_index, int64_t M, bool easiest,
                      const KeepRule& rule, const acc_t* offset = nullptr) {
  using key_t = typename KeyOf<acc_t>::type;
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
  bool selected = false;
  auto select = [&](auto& cands, auto better, auto index_of) {
    sel.n = static_cast<int64_t>(cands.size());
    sel.k = rule_k(rule, sel.n, past);
    const int64_t k = sel.k;
    if (k > 0 && k < sel.n) std::nth_element(cands.begin(), cands.begin() + (k - 1), cands.end(), better);
    // The k-th in ranking order is the worst of the first k.
    if (k > 0) sel.thr_idx = index_of(*std::max_element(cands.begin(), cands.begin() + k, better));
    sel.kept_idx.resize(k);
    for (int64_t j = 0; j < k; ++j) sel.kept_idx[j] = index_of(cands[j]);
    selected = true;
  };
  if constexpr (sizeof(key_t) == 4) {
    if (M >= kRadixSelectMin && M <= int64_t(0xFFFFFFFF)) {
      // Many rows: a histogram of the keys' top 16 bits finds the bin that holds the k-th; rows
      // above it are kept, rows below it dropped, and only the threshold bin's rows (a few
      // hundredths of them) go through nth_element. Branch-free where the outcome is random.
      std::vector<uint32_t> keys(M);
      std::vector<uint32_t> hist(size_t(1) << 16, 0);
      int64_t n = 0;
      for (int64_t i = 0; i < M; ++i) {
        const uint32_t key = KeyOf<acc_t>::get(score_of(loss_acc, offset, i), easiest);
        const uint32_t valid = t[i] != ignore_index;
        keys[i] = key;
        hist[key >> 16] += valid;
        n += valid;
      }
      const int64_t k = rule_k(rule, n, past);
      sel.n = n;
      sel.k = k;
      std::vector<int64_t>& kept_idx = sel.kept_idx;
      kept_idx.resize(k);
      if (k > 0) {
        int64_t above = 0;  // rows in the bins above the threshold bin
        uint32_t bin = 0xFFFF;
        while (above + int64_t(hist[bin]) < k) above += hist[bin--];
        std::vector<uint64_t> tie;
        int64_t na = 0;
        for (int64_t i = 0; i < M; ++i) {
          const uint32_t hb = keys[i] >> 16;
          const bool valid = t[i] != ignore_index;
          kept_idx[std::min(na, k - 1)] = i;  // (na < k whenever it is kept)
          na += valid & (hb > bin);
          if (valid & (hb == bin)) tie.push_back((uint64_t(keys[i]) << 32) | (uint64_t(0xFFFFFFFFu) - uint64_t(i)));
        }
        const int64_t need = k - above;  // 1 <= need <= tie.size()
        if (need < static_cast<int64_t>(tie.size())) {
          std::nth_element(tie.begin(), tie.begin() + (need - 1), tie.end(), std::greater<uint64_t>());
        }
        const uint64_t worst = *std::min_element(tie.begin(), tie.begin() + need);
        sel.thr_idx = int64_t(0xFFFFFFFFu - (worst & 0xFFFFFFFFu));
        for (int64_t j = 0; j < need; ++j) kept_idx[above + j] = int64_t(0xFFFFFFFFu - (tie[j] & 0xFFFFFFFFu));
      }
      selected = true;
    } else if (M <= int64_t(0xFFFFFFFF)) {
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
    }
  }
  if (!selected) {
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
  return sel;
}

template <typename scalar_t, typename acc_t>
double reduce_kept(const acc_t* loss_acc, const int64_t* t, const acc_t* w, int64_t M, const Selection& sel,
                   int64_t reduction, scalar_t* out, bool* kp, acc_t* rs) {
  double sum_loss = 0.0, sum_w = 0.0;
  for (int64_t j = 0; j < sel.k; ++j) {
    const int64_t i = sel.kept_idx[j];
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
  for (int64_t j = 0; j < sel.k; ++j) {
    const int64_t i = sel.kept_idx[j];
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

}  // namespace fused_trim::cpu
