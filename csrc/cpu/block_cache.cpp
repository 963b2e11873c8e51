#include "block_cache.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>

#ifdef __linux__
#include <pthread.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>
#endif

namespace torchmatgrad::cpu {
namespace {

constexpr size_t kMiB = size_t(1) << 20;
constexpr size_t kHuge = 2 * kMiB;
constexpr size_t kCachedMinBytes = kMiB;  // below, glibc's heap serves without faults

// Size classes: 2 MiB steps from 16 MiB up (at most 1/8 wasted), 64 KiB steps below; blocks from
// 4 MiB up are 2 MiB aligned so that all of them can be huge pages.
size_t size_class(size_t n) {
  const size_t step = n >= 16 * kMiB ? kHuge : size_t(64) << 10;
  return (n + step - 1) / step * step;
}

size_t limit_from_env() {
  const char* v = std::getenv("TORCHMATGRAD_CPU_CACHE_MB");
  if (v == nullptr || *v == '\0') return 1024 * kMiB;
  char* end = nullptr;
  const long long mb = std::strtoll(v, &end, 10);
  TORCH_CHECK(end != v && *end == '\0' && mb >= 0,
              "TORCHMATGRAD_CPU_CACHE_MB: expected a whole number of MiB >= 0, got '", v, "'");
  return size_t(mb) * kMiB;
}

class BlockCache final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t nbytes) override {
    if (nbytes < kCachedMinBytes) return c10::GetDefaultCPUAllocator()->allocate(nbytes);
    const size_t size = size_class(nbytes);
    void* p = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = free_.find(size);
      if (it != free_.end()) {
        p = it->second;
        free_.erase(it);
        cached_ -= size;
        live_.emplace(p, size);
      }
    }
    if (p == nullptr) {
      const size_t align = size >= 4 * kMiB ? kHuge : 64;
      if (posix_memalign(&p, align, size) != 0) {
        clear();  // the free blocks of other sizes go back first, as CUDA's allocator does
        TORCH_CHECK(posix_memalign(&p, align, size) == 0, "torchmatgrad: out of memory allocating ",
                    size, " bytes");
      }
      advise_huge_pages(p, size);
      std::lock_guard<std::mutex> lock(mutex_);
      live_.emplace(p, size);
    }
    return {p, p, &release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  int64_t limit() const { return int64_t(limit_); }

  int64_t cached() {
    std::lock_guard<std::mutex> lock(mutex_);
    return int64_t(cached_);
  }

  void clear() {
    std::multimap<size_t, void*> blocks;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      blocks.swap(free_);
      cached_ = 0;
    }
    for (auto& [size, p] : blocks) std::free(p);
  }

  // Fork while another thread holds the lock; the child takes and gives back a block. True if
  // the child finished (the atfork handlers below), false if it hung (killed after 10 s).
  bool fork_selftest() {
#ifdef __linux__
    std::atomic<bool> locked{false};
    std::thread holder([&] {
      std::lock_guard<std::mutex> lock(mutex_);
      locked = true;
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
    });
    while (!locked) std::this_thread::yield();
    const pid_t pid = fork();
    if (pid == 0) {
      {
        c10::DataPtr block = allocate(kCachedMinBytes);
      }
      _exit(0);
    }
    holder.join();
    TORCH_CHECK(pid > 0, "fork failed");
    for (int i = 0; i < 1000; ++i) {
      int status = 0;
      if (waitpid(pid, &status, WNOHANG) == pid)
        return WIFEXITED(status) && WEXITSTATUS(status) == 0;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    kill(pid, SIGKILL);
    waitpid(pid, nullptr, 0);
    return false;
#else
    return true;
#endif
  }

  static BlockCache& get() {
    static BlockCache* cache = [] {
      auto* c = new BlockCache();  // never destroyed: tensors may outlive exit
#ifdef __linux__
      // A fork (DataLoader workers) while another thread holds the lock would leave the child's
      // lock held forever: hold it across the fork, release it on both sides.
      pthread_atfork([] { get().mutex_.lock(); }, [] { get().mutex_.unlock(); },
                     [] { get().mutex_.unlock(); });
#endif
      return c;
    }();
    return *cache;
  }

 private:
  static void release(void* p) {
    BlockCache& c = get();
    {
      std::lock_guard<std::mutex> lock(c.mutex_);
      auto it = c.live_.find(p);
      const size_t size = it->second;
      c.live_.erase(it);
      if (c.cached_ + size <= c.limit_) {
        c.free_.emplace(size, p);
        c.cached_ += size;
        return;
      }
    }
    std::free(p);
  }

  std::mutex mutex_;
  std::multimap<size_t, void*> free_;       // size class -> free block
  std::unordered_map<void*, size_t> live_;  // block in use -> its size class
  size_t cached_ = 0;                       // bytes in free_
  const size_t limit_ = limit_from_env();
};

}  // namespace

at::Tensor empty_reused(at::IntArrayRef sizes, const at::TensorOptions& options) {
  TORCH_INTERNAL_ASSERT(options.device().is_cpu());
  return at::detail::empty_generic(sizes, &BlockCache::get(),
                                   c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   options.dtype().toScalarType(), std::nullopt);
}

int64_t cached_bytes() {
  return BlockCache::get().cached();
}

int64_t cache_limit_bytes() {
  return BlockCache::get().limit();
}

void empty_cache() {
  BlockCache::get().clear();
}

bool fork_selftest() {
  return BlockCache::get().fork_selftest();
}

void advise_huge_pages(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const uintptr_t begin = reinterpret_cast<uintptr_t>(data);
  const uintptr_t lo = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t hi = (begin + bytes) & ~(kHuge - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

}  // namespace torchmatgrad::cpu
