// Vector building blocks of the CPU kernels (ATen's Vectorized<T>, compiled for the machine's
// CPU capability: every .cpp of the op is built with the same -DCPU_CAPABILITY flags).
//
// API (all in namespace fused_trim::cpu; acc_t is float or double, scalar_t adds Half/BFloat16):
//   kBlock                         logits per block: a block stays in L1 between passes over it
//   kParallelGrainElements         at::parallel_for grain, in logits per chunk of rows
//   vexp(v)                        exp of a vector (fp32: ATen's polynomial, fp64: SLEEF 1-ulp)
//   vtanh(v)                       tanh of a vector (fp32: a polynomial and exp, fp64: SLEEF 1-ulp)
//   load_block(src, n, buf)        n scalar_t -> acc_t (returns src itself when they are one type)
//   store_block(src, n, dst)       n acc_t -> scalar_t, rounded to nearest
//   block_max(p, n)                NaN-propagating max of p[0:n]
//   block_sumexp(p, n, m)          sum_j exp(p[j] - m)
//   block_sum_shifted(p, w, n, r)  sum_j w[j] * (p[j] - r)   (w == nullptr: w = 1)
//   store_stream / stream_fence    non-temporal vector stores (for outputs >> last-level cache)
//   zero_bytes(dst, bytes, stream) memset, streamed when asked
//   zero_unless(v, keep)           v when keep == 1, +0 when keep == 0 (bitwise; drops a NaN v)
//   interleaved_for(n, grain, f)   f(begin, end) over [0, n) in blocks of grain, dealt to the threads
//                                  in turn (block b to thread b mod T)
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

namespace fused_trim::cpu {

using at::vec::Vectorized;

// Logits are processed in blocks that stay in L1 between the passes over one block.
constexpr int64_t kBlock = 2048;
// Rows go to threads in chunks of at least this many logits (below it one thread does all);
// 32 KiB of fp32, as ATen's own softmax kernels split their rows.
constexpr int64_t kParallelGrainElements = int64_t(1) << 13;

// exp over a vector: ATen's inline polynomial for float (measured here: the per-row losses stay
// within 2e-7 relative of a float64 computation, as close as F.cross_entropy's float32 ones), and
// SLEEF's 1-ULP exp for double.
template <typename acc_t>
inline Vectorized<acc_t> vexp(const Vectorized<acc_t>& v) {
  if constexpr (std::is_same_v<acc_t, float>) {
    return v.exp_u20();
  } else {
    return v.exp();
  }
}

// tanh over a vector. fp32: below |x| = 0.6 the odd polynomial x + x s q(s), s = x^2, of
// scripts/fit_tanh.py (within 0.8 ulp; the Triton kernels use the same one), above it
// sign(x) (1 - e) / (1 + e) with e = exp(-2|x|) (no cancellation there; +-1 once e underflows,
// NaN for NaN): one exp a logit, several times cheaper than SLEEF's 1-ulp tanh, which
// soft-capping would otherwise pay on every logit of an LM head. fp64: SLEEF's 1-ulp tanh.
template <typename acc_t>
inline Vectorized<acc_t> vtanh(const Vectorized<acc_t>& a) {
  if constexpr (std::is_same_v<acc_t, float>) {
    using Vec = Vectorized<float>;
    const Vec ax = a.abs();
    const Vec x = at::vec::minimum(ax, Vec(0.6f));  // (no inf - inf in the unused polynomial)
    const Vec s = x * x;
    Vec q = at::vec::fmadd(s, Vec(-5.89561764848e-3f), Vec(2.07963681879e-2f));
    q = at::vec::fmadd(s, q, Vec(-5.37839508699e-2f));
    q = at::vec::fmadd(s, q, Vec(1.33319256214e-1f));
    q = at::vec::fmadd(s, q, Vec(-3.33332980627e-1f));
    const Vec poly = at::vec::fmadd(q * s, x, x);
    const Vec e = vexp<float>(Vec(-2.0f) * ax);
    const Vec big = (Vec(1.0f) - e) / (Vec(1.0f) + e);
    return Vec::blendv(big, poly, ax < Vec(0.6f)).copysign(a);
  } else {
    return a.tanh();
  }
}

template <typename acc_t>
inline acc_t nan_max(acc_t a, acc_t b) {
  return (a > b || a != a) ? a : b;
}

// Converts n input elements to the accumulation type (a no-op pointer pass for fp32/fp64).
template <typename scalar_t, typename acc_t>
inline const acc_t* load_block(const scalar_t* src, int64_t n, acc_t* buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return src;
  } else {
    using bVec = Vectorized<scalar_t>;
    using fVec = Vectorized<float>;
    int64_t j = 0;
    for (; j + bVec::size() <= n; j += bVec::size()) {
      auto [a, b] = at::vec::convert_to_float<scalar_t>(bVec::loadu(src + j));
      a.store(buf + j);
      b.store(buf + j + fVec::size());
    }
    for (; j < n; ++j) buf[j] = static_cast<float>(src[j]);
    return buf;
  }
}

// Rounds n accumulation-type values to the output type.
template <typename scalar_t, typename acc_t>
inline void store_block(const acc_t* src, int64_t n, scalar_t* dst) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (dst != src) std::memcpy(dst, src, n * sizeof(acc_t));
  } else {
    using bVec = Vectorized<scalar_t>;
    using fVec = Vectorized<float>;
    int64_t j = 0;
    for (; j + bVec::size() <= n; j += bVec::size()) {
      auto a = fVec::loadu(src + j);
      auto b = fVec::loadu(src + j + fVec::size());
      at::vec::convert_from_float<scalar_t>(a, b).store(dst + j);
    }
    for (; j < n; ++j) dst[j] = static_cast<scalar_t>(src[j]);
  }
}

template <typename acc_t>
inline acc_t reduce_max(const Vectorized<acc_t>& v) {  // NaN-propagating
  return at::vec::vec_reduce_all<acc_t>(
      [](const Vectorized<acc_t>& a, const Vectorized<acc_t>& b) { return at::vec::maximum(a, b); }, v);
}

template <typename acc_t>
inline acc_t reduce_sum(const Vectorized<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>(
      [](const Vectorized<acc_t>& a, const Vectorized<acc_t>& b) { return a + b; }, v);
}

// max over p[0:n], NaN-propagating.
template <typename acc_t>
inline acc_t block_max(const acc_t* p, int64_t n) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const Vec ninf(-std::numeric_limits<acc_t>::infinity());
  Vec m0 = ninf, m1 = ninf, m2 = ninf, m3 = ninf;
  int64_t j = 0;
  for (; j + 4 * V <= n; j += 4 * V) {
    m0 = at::vec::maximum(m0, Vec::loadu(p + j));
    m1 = at::vec::maximum(m1, Vec::loadu(p + j + V));
    m2 = at::vec::maximum(m2, Vec::loadu(p + j + 2 * V));
    m3 = at::vec::maximum(m3, Vec::loadu(p + j + 3 * V));
  }
  for (; j + V <= n; j += V) m0 = at::vec::maximum(m0, Vec::loadu(p + j));
  if (j < n) m0 = at::vec::maximum(m0, Vec::set(ninf, Vec::loadu(p + j, n - j), n - j));
  return reduce_max<acc_t>(at::vec::maximum(at::vec::maximum(m0, m1), at::vec::maximum(m2, m3)));
}

// sum of exp(p[j] - m) over p[0:n].
template <typename acc_t>
inline acc_t block_sumexp(const acc_t* p, int64_t n, acc_t m) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const Vec vm(m);
  Vec s0(0), s1(0), s2(0), s3(0);
  int64_t j = 0;
  for (; j + 4 * V <= n; j += 4 * V) {
    s0 = s0 + vexp(Vec::loadu(p + j) - vm);
    s1 = s1 + vexp(Vec::loadu(p + j + V) - vm);
    s2 = s2 + vexp(Vec::loadu(p + j + 2 * V) - vm);
    s3 = s3 + vexp(Vec::loadu(p + j + 3 * V) - vm);
  }
  for (; j + V <= n; j += V) s0 = s0 + vexp(Vec::loadu(p + j) - vm);
  if (j < n) s0 = s0 + Vec::set(Vec(0), vexp(Vec::loadu(p + j, n - j) - vm), n - j);
  return reduce_sum<acc_t>((s0 + s1) + (s2 + s3));
}

// sum of w[j] * (p[j] - ref) over p[0:n] (w == nullptr: w = 1).
template <typename acc_t>
inline acc_t block_sum_shifted(const acc_t* p, const acc_t* w, int64_t n, acc_t ref) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const Vec vr(ref);
  Vec s0(0), s1(0);
  int64_t j = 0;
  if (w == nullptr) {
    for (; j + 2 * V <= n; j += 2 * V) {
      s0 = s0 + (Vec::loadu(p + j) - vr);
      s1 = s1 + (Vec::loadu(p + j + V) - vr);
    }
    for (; j + V <= n; j += V) s0 = s0 + (Vec::loadu(p + j) - vr);
    if (j < n) s0 = s0 + Vec::set(Vec(0), Vec::loadu(p + j, n - j) - vr, n - j);
  } else {
    for (; j + 2 * V <= n; j += 2 * V) {
      s0 = s0 + Vec::loadu(w + j) * (Vec::loadu(p + j) - vr);
      s1 = s1 + Vec::loadu(w + j + V) * (Vec::loadu(p + j + V) - vr);
    }
    for (; j + V <= n; j += V) s0 = s0 + Vec::loadu(w + j) * (Vec::loadu(p + j) - vr);
    if (j < n) {
      s0 = s0 + Vec::set(Vec(0), Vec::loadu(w + j, n - j) * (Vec::loadu(p + j, n - j) - vr), n - j);
    }
  }
  return reduce_sum<acc_t>(s0 + s1);
}

// Non-temporal (streaming) stores for outputs much larger than the last-level cache: they skip
// the read-for-ownership of every written line, a third of the backward's memory traffic.
constexpr size_t kStreamBytes = size_t(32) << 20;

template <typename acc_t>
constexpr size_t kVecBytes = sizeof(acc_t) * Vectorized<acc_t>::size();

template <typename acc_t>
inline void store_stream(acc_t* dst, const Vectorized<acc_t>& v) {  // dst aligned to kVecBytes
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) {
    _mm512_stream_ps(dst, v);
  } else {
    _mm512_stream_pd(dst, v);
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<acc_t, float>) {
    _mm256_stream_ps(dst, v);
  } else {
    _mm256_stream_pd(dst, v);
  }
#else
  v.store(dst);
#endif
}

inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

inline void zero_bytes(void* dst, size_t bytes, bool stream) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if (stream) {
    char* p = static_cast<char*>(dst);
    char* const end = p + bytes;
    while ((reinterpret_cast<uintptr_t>(p) & 63) != 0 && p < end) *p++ = 0;
    const __m256i z = _mm256_setzero_si256();
    for (; p + 64 <= end; p += 64) {
      _mm256_stream_si256(reinterpret_cast<__m256i*>(p), z);
      _mm256_stream_si256(reinterpret_cast<__m256i*>(p + 32), z);
    }
    while (p < end) *p++ = 0;
    return;
  }
#endif
  std::memset(dst, 0, bytes);
}

// v where keep is 1, +0 where it is 0 (bitwise: no branch, and a NaN v is dropped too).
template <typename acc_t>
inline acc_t zero_unless(acc_t v, int64_t keep) {
  using bits_t = std::conditional_t<sizeof(acc_t) == 4, uint32_t, uint64_t>;
  bits_t b;
  std::memcpy(&b, &v, sizeof(b));
  b &= static_cast<bits_t>(-keep);
  std::memcpy(&v, &b, sizeof(b));
  return v;
}

// f(begin, end) over [0, n) in blocks of `grain` items, block b to thread b mod T. For the backward
// passes, where only the kept rows do work: a keep rule on groups keeps contiguous runs of rows
// (whole sequences, whole images), which a split into T contiguous ranges would leave to one
// thread while the others only write zeros. Items must be independent (each thread writes its own
// rows), so the result does not depend on the split.
template <typename F>
inline void interleaved_for(int64_t n, int64_t grain, const F& f) {
  grain = std::max<int64_t>(grain, 1);
  const int64_t blocks = (n + grain - 1) / grain;
  const int64_t T = std::min<int64_t>(at::get_num_threads(), blocks);
  if (T <= 1 || at::in_parallel_region()) {
    if (n > 0) f(int64_t(0), n);
    return;
  }
  at::parallel_for(0, T, 1, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      for (int64_t b = j; b < blocks; b += T) f(b * grain, std::min(n, (b + 1) * grain));
    }
  });
}

}  // namespace fused_trim::cpu
