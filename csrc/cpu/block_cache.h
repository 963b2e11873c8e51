// Large CPU outputs (a fresh grad_W and grad_input every backward) whose memory stays mapped
// between calls.
//
// glibc hands a block above its mmap threshold (at most 32 MiB; a smaller one when the heap top
// is trimmed) straight back to the kernel on free, so the next call's W-sized gradient is faulted
// in again a 4 KiB page at a time: at 4096² float32 that is 16384 faults a call, longer than the
// gradient's arithmetic, and whether a call pays them depends on the heap's history. Blocks from
// this cache are kept when their tensor dies and handed to the next output of the same size
// class, as CUDA's caching allocator does; new blocks are 2 MiB aligned and asked for
// transparent huge pages. The cache holds at most TORCHMATGRAD_CPU_CACHE_MB MiB of free blocks
// (default 1024; 0 keeps none, the blocks are still aligned and advised); empty_cache() gives
// them back.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstddef>
#include <cstdint>

namespace torchmatgrad::cpu {

// at::empty(sizes, options) on the CPU, from the cache when nbytes reaches kCachedMinBytes.
at::Tensor empty_reused(at::IntArrayRef sizes, const at::TensorOptions& options);

// Free blocks held now, in bytes; the most it holds; and giving them all back.
int64_t cached_bytes();
int64_t cache_limit_bytes();
void empty_cache();

// Tests: a fork while another thread holds the cache's lock leaves the child a working cache.
bool fork_selftest();

// Ask for transparent huge pages on [data, data + bytes) before its first touch (whole 2 MiB
// pages inside it only). Linux only; a no-op when THP is off or the pages were touched before.
void advise_huge_pages(void* data, size_t bytes);

}  // namespace torchmatgrad::cpu
