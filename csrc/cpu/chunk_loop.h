// The one threading loop of the CPU kernels: chunks of a range handed out
// dynamically, in runs of consecutive chunks.
//
// Why runs: a thread that takes single 32 KB chunks alternately with another
// thread jumps every 32 KB, and the hardware prefetchers start over at every
// jump; on the two-core AMD EPYC this ran the in-place apply_ kernels at half
// speed (4.5 ms for a 4096x11008 bf16 weight instead of 2.3 ms, while
// torch's own in-place add took 2.8 ms). Why dynamic: on a busy machine a
// thread that is descheduled must not hold the others back (a static split
// made 2-thread runs several times slower than 1-thread ones there), so every
// thread takes at least ~8 runs. Every chunk's result depends only on the
// chunk, so which thread runs it never shows.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>

#include <ATen/Parallel.h>

namespace deltaops {
namespace cpu {

// Items a run of chunks covers when the range is long enough (elements, for
// loops over elements): 512 KB of bf16.
constexpr int64_t kRunItems = int64_t(1) << 18;

// Calls f(slot, begin, end) for the consecutive chunks [begin, end) of [0, n)
// of `chunk` items (the last one shorter), from up to at::get_num_threads()
// threads; `slot` in [0, slots()) identifies the calling task (for per-thread
// scratch). A thread takes about `run_items` items of consecutive chunks at a
// time and runs them in order.
class ChunkLoop {
 public:
  ChunkLoop(int64_t n, int64_t chunk, int64_t run_items = kRunItems)
      : n_(n), chunk_(std::max<int64_t>(chunk, 1)) {
    nchunks_ = (n_ + chunk_ - 1) / chunk_;
    const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
    slots_ = std::max<int64_t>(1, std::min<int64_t>(threads, nchunks_));
    const int64_t wanted = std::max<int64_t>(1, run_items / chunk_);
    run_ = std::max<int64_t>(1, std::min(wanted, nchunks_ / (8 * slots_)));
  }
  int64_t slots() const { return slots_; }

  template <typename F>
  void run(const F& f) const {
    if (nchunks_ == 0) return;
    if (slots_ == 1) {
      for (int64_t c = 0; c < nchunks_; ++c) call(f, 0, c);
      return;
    }
    std::atomic<int64_t> next{0};
    at::parallel_for(0, slots_, 1, [&](int64_t slot_begin, int64_t slot_end) {
      for (int64_t slot = slot_begin; slot < slot_end; ++slot) {
        for (int64_t r = next.fetch_add(run_, std::memory_order_relaxed); r < nchunks_;
             r = next.fetch_add(run_, std::memory_order_relaxed)) {
          for (int64_t c = r; c < std::min(nchunks_, r + run_); ++c) call(f, slot, c);
        }
      }
    });
  }

 private:
  template <typename F>
  void call(const F& f, int64_t slot, int64_t c) const {
    f(slot, c * chunk_, std::min(n_, (c + 1) * chunk_));
  }

  int64_t n_, chunk_, nchunks_, slots_, run_;
};

// f(begin, end) over the chunks of [0, n), as ChunkLoop hands them out.
template <typename F>
void parallel_chunks(int64_t n, int64_t chunk, const F& f, int64_t run_items = kRunItems) {
  ChunkLoop(n, chunk, run_items).run([&](int64_t, int64_t b, int64_t e) { f(b, e); });
}

}  // namespace cpu
}  // namespace deltaops
