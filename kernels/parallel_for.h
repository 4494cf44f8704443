// badnet-jax: the native kernels' one parallel loop over XLA's intra-op threads (included by each kernel's source;
// built by kernels/native.py).
//
// [0, total) is handed out in chunks by an atomic counter to the calling thread and helpers scheduled on XLA's
// FFI thread pool. The caller works too and waits only for chunks already taken, so a helper the pool starts
// late finds nothing left and returns: it holds the shared state by shared_ptr and never touches the buffers
// after the call returned. What `make_range` captured (e.g. the kernel's packed weights) is dropped when the
// call returns, not when its last helper runs: with as many devices as cores, every pool thread runs a device's
// program and the helpers wait in the queue until the sweep ends, so each would pin its call's copy (hundreds
// of MB over a lab-scale sweep on two CPU devices).
#ifndef BADNET_JAX_KERNELS_PARALLEL_FOR_H_
#define BADNET_JAX_KERNELS_PARALLEL_FOR_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace badnet_jax {

template <typename MakeRange>
struct ParallelWork {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t total = 0, chunk = 1;
  std::mutex mu;
  std::condition_variable finished;
  std::optional<MakeRange> make_range;  // under mu; reset by the caller when the loop is done
};

// Runs range(start, stop) over chunks of [0, total), about `chunks_per_thread` chunks per pool thread. Each
// thread that takes part first builds its own `range = make_range()` (where per-thread scratch lives).
template <typename MakeRange>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t total, int64_t chunks_per_thread, MakeRange make_range) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  auto work = std::make_shared<ParallelWork<MakeRange>>();
  work->total = total;
  work->chunk = std::max<int64_t>(1, total / (threads * chunks_per_thread));
  work->make_range.emplace(std::move(make_range));
  auto run = [work]() {
    std::optional<decltype((*work->make_range)())> range;
    {
      std::lock_guard<std::mutex> lock(work->mu);
      if (!work->make_range) return;  // the call has returned: nothing left, nothing to hold
      range.emplace((*work->make_range)());
    }
    for (;;) {
      const int64_t start = work->next.fetch_add(work->chunk);
      if (start >= work->total) return;
      const int64_t stop = std::min(work->total, start + work->chunk);
      (*range)(start, stop);
      if (work->done.fetch_add(stop - start) + (stop - start) == work->total) {
        std::lock_guard<std::mutex> lock(work->mu);
        work->finished.notify_all();
      }
    }
  };
  const int64_t chunks = (total + work->chunk - 1) / work->chunk;
  for (int64_t t = 1; t < std::min(threads, chunks); ++t) {
    auto helper = run;
    pool.Schedule(std::move(helper));
  }
  run();
  std::unique_lock<std::mutex> lock(work->mu);
  work->finished.wait(lock, [&] { return work->done.load() == work->total; });
  work->make_range.reset();
}

}  // namespace badnet_jax

#endif  // BADNET_JAX_KERNELS_PARALLEL_FOR_H_
