// Shared by the CPU and CUDA implementations of fused_trim::trimmed_ce_fwd / trimmed_ce_bwd.
//
// Ranking keys: every per-sample loss is mapped to an unsigned integer whose order is the
// ranking order of the contract (larger key = kept first):
//   * "hardest": larger loss -> larger key, NaN above +inf (all NaNs map to the largest key);
//   * "easiest": the bitwise complement, so the smallest loss has the largest key and NaN the
//     smallest one (least preferred);
//   * -0.0 and +0.0 map to the same key (torch.sort treats them as equal, ties go by index).
// Equal keys are broken by the lower flat index. Ignored samples never take part.
#pragma once

#include <math.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__CUDACC__)
#define FT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FT_HOST_DEVICE inline
#endif

namespace fused_trim {

enum Reduction : int64_t { kNone = 0, kMean = 1, kSum = 2 };

template <typename acc_t>
struct KeyOf;

template <>
struct KeyOf<float> {
  using type = uint32_t;
  static FT_HOST_DEVICE uint32_t get(float f, bool easiest) {
    uint32_t key;
    if (f != f) {
      key = 0xFFFFFFFFu;
    } else {
      if (f == 0.0f) f = 0.0f;  // -0.0 -> +0.0
      uint32_t b;
#if defined(__CUDA_ARCH__)
      b = __float_as_uint(f);
#else
      std::memcpy(&b, &f, sizeof(b));
#endif
      key = b ^ ((b >> 31) ? 0xFFFFFFFFu : 0x80000000u);
    }
    return easiest ? ~key : key;
  }
};

template <>
struct KeyOf<double> {
  using type = uint64_t;
  static FT_HOST_DEVICE uint64_t get(double f, bool easiest) {
    uint64_t key;
    if (f != f) {
      key = ~uint64_t(0);
    } else {
      if (f == 0.0) f = 0.0;
      uint64_t b;
#if defined(__CUDA_ARCH__)
      b = static_cast<uint64_t>(__double_as_longlong(f));
#else
      std::memcpy(&b, &f, sizeof(b));
#endif
      key = b ^ ((b >> 63) ? ~uint64_t(0) : (uint64_t(1) << 63));
    }
    return easiest ? ~key : key;
  }
};

// exp in the accumulation type (expf for float), on the host and the device.
FT_HOST_DEVICE float ft_exp(float v) { return expf(v); }
FT_HOST_DEVICE double ft_exp(double v) { return exp(v); }

// Online-softmax state of the CUDA forward: running max m and sum s of exp(x - m) over the
// entries seen; -inf entries contribute nothing, a NaN entry makes s NaN (and keeps it NaN).
// Here, not in the .cu, so that a host test (tests/native_host/ms_merge_check.cpp) runs the very
// functions the device runs, in the kernel's lane and warp merge order.
template <typename acc_t>
struct MaxSum {
  acc_t m;
  acc_t s;
};

template <typename acc_t>
FT_HOST_DEVICE void ms_add(MaxSum<acc_t>& a, acc_t v) {
  constexpr acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  if (v > a.m) {
    a.s = a.s * ft_exp(a.m - v) + acc_t(1);
    a.m = v;
  } else if (v != ninf) {
    a.s += ft_exp(v - a.m);
  }
}

// The state of the union of two sets of entries. A side whose max is -inf holds s = 0 (nothing
// seen, or only -inf) or s = NaN (a NaN seen): that s passes through as it is, never replaced by
// 0, so a NaN survives a merge with a side whose max is finite.
template <typename acc_t>
FT_HOST_DEVICE MaxSum<acc_t> ms_merge(MaxSum<acc_t> a, MaxSum<acc_t> b) {
  constexpr acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  const acc_t m = a.m > b.m ? a.m : b.m;
  if (m == ninf) return {m, a.s + b.s};
  const acc_t sa = a.m == ninf ? a.s : a.s * ft_exp(a.m - m);
  const acc_t sb = b.m == ninf ? b.s : b.s * ft_exp(b.m - m);
  return {m, sa + sb};
}

// k = min(n, max(1, floor(r * n + 0.5))) in float64; k = 0 when n = 0.
FT_HOST_DEVICE int64_t compute_k(int64_t n, double keep_ratio) {
  if (n <= 0) return 0;
  double k = floor(keep_ratio * static_cast<double>(n) + 0.5);
  if (k < 1.0) k = 1.0;
  if (k > static_cast<double>(n)) k = static_cast<double>(n);
  return static_cast<int64_t>(k);
}

// The keep rule (fused_trim._common.keep_k): an exact count when count >= 0, else a threshold
// (every valid sample strictly past it, at least min(n, min_kept)) when has_threshold, else the
// ratio.
struct KeepRule {
  double ratio = 1.0;
  int64_t count = -1;
  bool has_threshold = false;
  double threshold = 0.0;
  int64_t min_kept = 0;
};

// k of the rule over n valid samples, `past` of them strictly past the threshold.
FT_HOST_DEVICE int64_t rule_k(const KeepRule& rule, int64_t n, int64_t past) {
  if (rule.count >= 0) return rule.count < n ? rule.count : n;
  if (rule.has_threshold) {
    const int64_t least = rule.min_kept < n ? rule.min_kept : n;
    return past > least ? past : least;
  }
  return compute_k(n, rule.ratio);
}

// Whether a ranked value is strictly past the threshold, compared in double: above it for
// "hardest" (NaN too: it ranks above +inf), below it for "easiest" (never NaN).
template <typename acc_t>
FT_HOST_DEVICE bool past_threshold(acc_t score, double threshold, bool easiest) {
  const double s = static_cast<double>(score);
  if (s != s) return !easiest;
  return easiest ? s < threshold : s > threshold;
}

}  // namespace fused_trim
