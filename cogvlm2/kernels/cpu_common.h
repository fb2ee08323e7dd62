// What the CPU kernels (rows_matmul.cc, decode_attention.cc, gelu.cc, layer_norm.cc; built into one
// library by cogvlm2/cogvlm2_cpu_kernels.py) share: the SIMD vector types and the worker threads.
#pragma once
#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>
#include <sched.h>
#include <unistd.h>

namespace cogvlm2 {

#if defined(__AVX512F__)
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif
typedef float vec __attribute__((vector_size(kLanes * sizeof(float)), aligned(4)));   // unaligned loads

// 8 float32 values widened to 8 doubles (one AVX-512 register): gelu.cc and layer_norm.cc compute in
// double and round once to float32.
typedef float fvec8 __attribute__((vector_size(8 * sizeof(float)), aligned(4)));
typedef double dvec8 __attribute__((vector_size(8 * sizeof(double))));

inline dvec8 load8(const float *p) {
  fvec8 v;
  std::memcpy(&v, p, sizeof(v));
  return __builtin_convertvector(v, dvec8);
}

inline void store8(float *p, dvec8 v) {
  const fvec8 f = __builtin_convertvector(v, fvec8);
  std::memcpy(p, &f, sizeof(f));
}

inline int cpu_count() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) != 0) return 1;
  return std::max(1, CPU_COUNT(&set));
}

// Worker threads that live for the process and sleep on a condition variable between calls (no
// spinning beside MindSpore's own pool; a thread started per call cost ~0.3 ms per product in page
// faults of its fresh stack and sums). One call at a time uses them: a call that finds them busy
// (MindSpore may launch independent kernels at once) runs on its own thread (``parallel``).
class Pool {
 public:
  explicit Pool(int workers) : pid_(getpid()) {
    for (int id = 1; id <= workers; ++id) threads_.emplace_back([this, id] { Loop(id); });
    for (auto &t : threads_) t.detach();
  }
  pid_t pid() const { return pid_; }
  int size() const { return static_cast<int>(threads_.size()) + 1; }
  std::mutex &busy() { return busy_; }

  // fn(0) on the caller, fn(1..n-1) on workers; returns when all are done. Caller holds busy().
  void Run(int n, const std::function<void(int)> &fn) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = &fn;
      active_ = n;
      pending_ = n - 1;
      ++generation_;
    }
    start_.notify_all();
    fn(0);
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [this] { return pending_ == 0; });
  }

 private:
  void Loop(int id) {
    int64_t seen = 0;
    for (;;) {
      const std::function<void(int)> *fn;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        start_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        if (id >= active_) continue;
        fn = job_;
      }
      (*fn)(id);
      std::lock_guard<std::mutex> lock(mutex_);
      if (--pending_ == 0) done_.notify_one();
    }
  }

  pid_t pid_;
  std::vector<std::thread> threads_;
  std::mutex busy_, mutex_;
  std::condition_variable start_, done_;
  const std::function<void(int)> *job_ = nullptr;
  int64_t generation_ = 0;
  int active_ = 0, pending_ = 0;
};

// The process's pool (rebuilt in a forked child, which has no copy of the parent's threads); never
// destroyed, so exit does not wait on sleeping workers.
inline Pool *pool() {
  static std::mutex guard;
  static Pool *current = nullptr;
  std::lock_guard<std::mutex> lock(guard);
  if (current == nullptr || current->pid() != getpid()) current = new Pool(cpu_count() - 1);
  return current;
}

// fn(t, n) for t in [0, n) on n threads, n = min(wanted, the pool's threads): fn(0, 1) on the caller
// alone when n would be 1 or another call holds the workers.
inline void parallel(int64_t wanted, const std::function<void(int, int)> &fn) {
  Pool *workers = pool();
  const int n = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(wanted, workers->size())));
  std::unique_lock<std::mutex> lock(workers->busy(), std::try_to_lock);
  if (n <= 1 || !lock.owns_lock()) {
    fn(0, 1);
    return;
  }
  workers->Run(n, [&](int t) { fn(t, n); });
}

}  // namespace cogvlm2
