// Host check of the CUDA forward's online-softmax merge (csrc/trimmed_ce_common.h: ms_add,
// ms_merge), run in the kernel's order: lane l of a group of G threads takes columns l, l + G, ...
// through ms_add; then the warp's butterfly (__shfl_xor_sync with offsets 16, 8, 4, 2, 1: every
// lane merges its state with lane ^ offset's, its own first); for G > 32, lane 0 of the block
// merges the warps' results in warp order (group_reduce in trimmed_ce_cuda.cu).
// Rows: C = 1..40 (and a few wider), a NaN in every column position (so in every lane), with and
// without -inf entries, all -inf, +inf. Checks: lse = m + log(s) (NaN when m is not finite) is NaN
// exactly when the row holds a NaN or its max is not finite, and otherwise matches a float64
// logsumexp. Prints the failures and exits 1, or prints "OK n" (rows checked) and exits 0.
#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <vector>

#include "trimmed_ce_common.h"

using fused_trim::MaxSum;
using fused_trim::ms_add;
using fused_trim::ms_merge;

template <typename acc_t>
acc_t group_lse(const std::vector<acc_t>& row, int G) {
  constexpr acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  std::vector<MaxSum<acc_t>> lanes(G, MaxSum<acc_t>{ninf, acc_t(0)});
  for (int l = 0; l < G; ++l) {
    for (size_t c = l; c < row.size(); c += G) ms_add(lanes[l], row[c]);
  }
  for (int w0 = 0; w0 < G; w0 += 32) {  // each warp's butterfly, all lanes at once
    for (int off = 16; off > 0; off >>= 1) {
      std::vector<MaxSum<acc_t>> next(lanes.begin() + w0, lanes.begin() + w0 + 32);
      for (int l = 0; l < 32; ++l) next[l] = ms_merge(lanes[w0 + l], lanes[w0 + (l ^ off)]);
      for (int l = 0; l < 32; ++l) lanes[w0 + l] = next[l];
    }
  }
  MaxSum<acc_t> ms = lanes[0];
  for (int w0 = 32; w0 < G; w0 += 32) ms = ms_merge(ms, lanes[w0]);
  const acc_t log_s = std::isfinite(ms.m) ? std::log(ms.s) : std::numeric_limits<acc_t>::quiet_NaN();
  return ms.m + log_s;
}

template <typename acc_t>
int check(std::mt19937& gen, long& rows) {
  constexpr acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
  std::normal_distribution<double> normal(0.0, 3.0);
  std::vector<int> widths;
  for (int c = 1; c <= 40; ++c) widths.push_back(c);
  for (int c : {63, 64, 65, 255, 256, 257, 300}) widths.push_back(c);
  int failures = 0;
  for (int G : {32, 256}) {
    for (int C : widths) {
      // nan_at = -1: no NaN; otherwise a NaN in that column. variant 0: finite entries, 1: every
      // third entry -inf, 2: all entries -inf, 3: an entry +inf.
      for (int variant = 0; variant < 4; ++variant) {
        for (int nan_at = -1; nan_at < C; ++nan_at) {
          std::vector<acc_t> row(C);
          for (int c = 0; c < C; ++c) {
            row[c] = static_cast<acc_t>(normal(gen));
            if (variant == 1 && c % 3 == 1) row[c] = ninf;
            if (variant == 2) row[c] = ninf;
          }
          if (variant == 3) row[C / 2] = std::numeric_limits<acc_t>::infinity();
          if (nan_at >= 0) row[nan_at] = nan;
          bool has_nan = false;
          double m = -std::numeric_limits<double>::infinity();
          for (acc_t v : row) {
            if (v != v) has_nan = true;
            else m = std::max(m, static_cast<double>(v));
          }
          const bool finite_max = std::isfinite(m);
          const acc_t got = group_lse(row, G);
          ++rows;
          bool ok;
          if (has_nan || !finite_max) {
            ok = std::isnan(got);
          } else {
            double s = 0;
            for (acc_t v : row) s += std::exp(static_cast<double>(v) - m);
            const double want = m + std::log(s);
            ok = std::fabs(static_cast<double>(got) - want) <= 1e-5 * (1 + std::fabs(want));
          }
          if (!ok && failures++ < 10) {
            std::printf("FAIL %s G=%d C=%d variant=%d nan_at=%d: lse=%g\n", sizeof(acc_t) == 4 ? "float" : "double",
                        G, C, variant, nan_at, static_cast<double>(got));
          }
        }
      }
    }
  }
  return failures;
}

int main() {
  std::mt19937 gen(7);
  long rows = 0;
  const int failures = check<float>(gen, rows) + check<double>(gen, rows);
  if (failures) {
    std::printf("%d failures\n", failures);
    return 1;
  }
  std::printf("OK %ld\n", rows);
  return 0;
}
