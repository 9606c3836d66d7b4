// Tensor-level helpers shared by the CPU ops: argument normalisation and the gradient allocator.
//
// API (namespace fused_trim::cpu):
//   acc_type_of(st)             the accumulation dtype: kDouble for double, kFloat otherwise
//   as_contiguous(t, st)        t as a contiguous tensor of dtype st (no dispatcher call when it is one)
//   unit_stride_last(t)         t with a unit-stride last dimension (the kernels' one layout need)
//   empty_large(sizes, opts)    an uninitialised CPU tensor for an O(N*C) output (gradient blocks
//                               of 2 MiB and more come from a small cache of huge-page blocks)
//   empty_cache()               frees that cache (the op fused_trim::empty_cache)
#pragma once

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>

#include <cstdlib>
#include <mutex>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fused_trim::cpu {

inline at::ScalarType acc_type_of(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// `t` as a contiguous tensor of dtype `st`, without a dispatcher round trip when it already is
// one (the usual case: at small shapes a no-op `.to().contiguous()` costs as much as a row).
inline at::Tensor as_contiguous(const at::Tensor& t, at::ScalarType st) {
  if (t.scalar_type() == st && t.is_contiguous()) return t;
  return t.to(st).contiguous();
}

// `t` with a unit-stride last dimension (the CPU kernels' one requirement on the layout).
inline at::Tensor unit_stride_last(const at::Tensor& t) {
  const int64_t d = t.dim() - 1;
  return t.size(d) <= 1 || t.stride(d) == 1 ? t : t.contiguous();
}

// The gradient is the one O(N*C) buffer the op allocates. A fresh multi-hundred-MB allocation is
// backed page by page on first touch (the kernel zeroes every page it hands out), which costs
// more than writing the gradient itself (already at a few MB: glibc hands such blocks back to the
// system when they are freed, so every step faults them in again; (1024, 1000) fp32 fwd+bwd went
// from a median of ~570 to ~340 us). Gradients of 2 MiB and more therefore come from a small cache of
// 2 MiB-aligned blocks with transparent huge pages requested: a block freed by one step (the
// usual `zero_grad(set_to_none=True)`) serves the next step's backward, as the CUDA caching
// allocator does. The cache holds at most kMaxCachedBlocks blocks of memory the process already
// used (4: the LM head's keep-all step holds its unscaled gradients and their scaled copies, input's
// and linear_weight's, at once; with 2 the 64 MiB copy of one of them faulted in afresh every step, a
// fifth of a (2048, 512) x (512, 32000) matmul); FUSED_TRIM_NO_GRAD_CACHE=1 turns it off, and
// fused_trim::empty_cache() releases it.
constexpr size_t kHugePage = size_t(2) << 20;
constexpr size_t kMaxCachedBlocks = 4;

struct GradBlockCache {
  std::mutex mu;
  std::vector<std::pair<void*, size_t>> blocks;  // (pointer, size) of free blocks

  void* take(size_t size) {
    std::lock_guard<std::mutex> lock(mu);
    for (size_t i = 0; i < blocks.size(); ++i) {
      if (blocks[i].second == size) {
        void* p = blocks[i].first;
        blocks.erase(blocks.begin() + static_cast<std::ptrdiff_t>(i));
        return p;
      }
    }
    return nullptr;
  }
  void give(void* p, size_t size) {
    {
      std::lock_guard<std::mutex> lock(mu);
      if (blocks.size() < kMaxCachedBlocks) {
        blocks.emplace_back(p, size);
        return;
      }
    }
    std::free(p);
  }
  void clear() {
    std::vector<std::pair<void*, size_t>> old;
    {
      std::lock_guard<std::mutex> lock(mu);
      old.swap(blocks);
    }
    for (auto& b : old) std::free(b.first);
  }
};

// One cache per process (an inline function's static: one instance across translation units).
inline GradBlockCache& grad_cache() {
  static GradBlockCache* cache = new GradBlockCache();  // never destroyed: deleters may run late
  return *cache;
}

inline bool env_flag(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && v[0] == '1';
}

inline at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& opts) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  int64_t numel = 1;
  for (auto s : sizes) numel *= s;
  const size_t nbytes =
      static_cast<size_t>(numel) * c10::elementSize(c10::typeMetaToScalarType(opts.dtype()));
  static const bool disabled = env_flag("FUSED_TRIM_NO_GRAD_CACHE");
  if (nbytes >= kHugePage && !disabled) {
    const size_t size = (nbytes + kHugePage - 1) / kHugePage * kHugePage;
    void* p = grad_cache().take(size);
    if (p == nullptr && posix_memalign(&p, kHugePage, size) == 0) {
      madvise(p, size, MADV_HUGEPAGE);
    }
    if (p != nullptr) {
      return at::from_blob(p, sizes, [size](void* q) { grad_cache().give(q, size); }, opts);
    }
  }
#endif
  return at::detail::empty_cpu(sizes, opts);
}

inline void empty_cache() {
  grad_cache().clear();
}

}  // namespace fused_trim::cpu
