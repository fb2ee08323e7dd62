// What the CPU kernels (kernels/*.cc, built into one library by cogvlm2/cogvlm2_cpu_kernels.py) share:
// the SIMD vector types, the vectorised exp, and the threads they run on.
#pragma once
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cstdint>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>
#include <dirent.h>
#include <dlfcn.h>
#include <sched.h>
#include <unistd.h>

namespace cogvlm2 {

#if defined(__AVX512F__)
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif
typedef float vec __attribute__((vector_size(kLanes * sizeof(float)), aligned(4)));   // unaligned loads

typedef int32_t ivec __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline int64_t round_up(int64_t n, int64_t to) { return (n + to - 1) / to * to; }

inline vec splat(float v) { return vec{} + v; }

// e^x for x <= 0 (softmax arguments s - max, sigmoid's e^-|x|): Cephes' expf (range reduction by ln 2
// in two parts and a degree-6 polynomial, within 2 ulp), flushing below -87.3 to the smallest normal
// range.
inline vec exp_nonpositive(vec x) {
  x = x < splat(-87.33654f) ? splat(-87.33654f) : x;
  vec fx = x * 1.44269504088896341f + 0.5f;
  ivec n = __builtin_convertvector(fx, ivec);                  // truncates toward zero
  const vec truncated = __builtin_convertvector(n, vec);
  n -= (truncated > fx) ? ivec{} + 1 : ivec{};                  // floor
  const vec nf = __builtin_convertvector(n, vec);
  x -= nf * 0.693359375f;
  x -= nf * -2.12194440e-4f;
  vec y = splat(1.9875691500e-4f);
  y = y * x + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  y = y * x * x + x + 1.0f;
  const ivec bits = (n + 127) << 23;
  vec scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}

// float32 values widened to doubles, as many as one register holds (8 with AVX-512, else 4): gelu.h,
// layer_norm.h and rms_norm.cc compute in double and round once to float32. A generic vector wider than
// the machine's registers is expanded piecewise by g++ (its conditions value by value): 8-wide doubles
// on an AVX2 CPU made GELU 4.5x slower (13.7 -> 3.0 ms single-threaded for 1542 x 1024 values).
#if defined(__AVX512F__)
constexpr int kDoubleLanes = 8;
#else
constexpr int kDoubleLanes = 4;
#endif
typedef float fvecd __attribute__((vector_size(kDoubleLanes * sizeof(float)), aligned(4)));
typedef double dvec __attribute__((vector_size(kDoubleLanes * sizeof(double))));

inline dvec loadd(const float *p) {
  fvecd v;
  std::memcpy(&v, p, sizeof(v));
  return __builtin_convertvector(v, dvec);
}

inline void stored(float *p, dvec v) {
  const fvecd f = __builtin_convertvector(v, fvecd);
  std::memcpy(p, &f, sizeof(f));
}

// sum of f(x[i]) for i < n (a multiple of 8), in eight running double sums, one per position i mod 8,
// added up in position order at the end: the same additions, so the same bits, whatever the register width
template <class F>
double sum8(const float *x, int64_t n, F f) {
  static_assert(8 % kDoubleLanes == 0, "8 values are whole registers");
  dvec part[8 / kDoubleLanes] = {};
  for (int64_t i = 0; i < n; i += 8)
    for (int h = 0; h < 8 / kDoubleLanes; ++h) part[h] += f(loadd(x + i + h * kDoubleLanes));
  double s = 0;
  for (int h = 0; h < 8 / kDoubleLanes; ++h)
    for (int j = 0; j < kDoubleLanes; ++j) s += part[h][j];
  return s;
}

// The dtype name MindSpore's aot interface gives a float32 tensor ("float32", or "float" in some paths).
inline bool is_float32(const char *dtype) {
  return std::strcmp(dtype, "float32") == 0 || std::strcmp(dtype, "float") == 0;
}

// Linear weights kept as bfloat16 (model_config param_init_type: bfloat16 on CPU) reach the kernels as
// their bit patterns, a uint16 tensor (MindSpore 2.7.2's CPU kernels have no bfloat16). A bfloat16 value
// is the top half of the float32 with the same value, so widening is exact and a product over them gives
// the bits of the same product over float32 weights holding those values.
inline bool is_bf16_bits(const char *dtype) { return std::strcmp(dtype, "uint16") == 0; }

inline float widen_bf16(uint16_t bits) {
  const uint32_t word = uint32_t{bits} << 16;
  float value;
  std::memcpy(&value, &word, sizeof(value));
  return value;
}

typedef uint16_t bits_vec __attribute__((vector_size(kLanes * sizeof(uint16_t))));
typedef uint32_t word_vec __attribute__((vector_size(kLanes * sizeof(uint32_t))));

// kLanes bfloat16 bit patterns from p (unaligned) -> their float32 values
inline vec widen_bf16(const uint16_t *p) {
  bits_vec bits;
  std::memcpy(&bits, p, sizeof(bits));
  const word_vec words = __builtin_convertvector(bits, word_vec) << 16;
  vec values;
  std::memcpy(&values, &words, sizeof(values));
  return values;
}

// The CPUs the process may run on: the main thread's (tid = pid) affinity, which pinning leaves alone.
inline bool process_cpus(cpu_set_t *set) { return sched_getaffinity(getpid(), sizeof(*set), set) == 0; }

inline int cpu_count() {
  cpu_set_t set;
  if (!process_cpus(&set)) return 1;
  return std::max(1, CPU_COUNT(&set));
}

// MindSpore's CPU kernel threads (ActorThread_N, KernelThread_N in mindspore 2.7.2: the pool the kernels
// hand their work to, MindSporePool below) pinned one to a CPU of the process, or left to the scheduler.
// Left to it, the bench tower's two threads shared one CPU for whole encodes: 30-48% of the encodes
// 1.25-1.6x slower than the best (one process, 60 encodes each way, alternating); pinned, 2-3%.
// `request` (kernel_threads.cc, from the config's kernel_threads) takes effect at the next hand-over.
// Only a pool with as many threads as the process has CPUs is pinned: with more, two would share a CPU
// (what pinning avoids); with fewer, every process (data-parallel workers) would pin its threads to the
// same first CPUs of the machine while the others idle.
class KernelThreads {
 public:
  static KernelThreads &get() {
    static KernelThreads threads;
    return threads;
  }
  void request(bool pinned) { wanted_.store(pinned ? 1 : 0); }
  int pinned() const { return pinned_.load(); }   // threads the last change pinned
  void apply() {
    const int wanted = wanted_.load(std::memory_order_relaxed);
    if (wanted == applied_.load(std::memory_order_relaxed)) return;
    std::lock_guard<std::mutex> lock(mutex_);
    if (wanted == applied_.load()) return;
    cpu_set_t allowed;
    if (!process_cpus(&allowed)) return;
    std::vector<int> cpus;
    for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu)
      if (CPU_ISSET(cpu, &allowed)) cpus.push_back(cpu);
    const std::vector<pid_t> threads = pool_threads();
    const bool pin = wanted == 1 && threads.size() == cpus.size();
    int count = 0;
    for (size_t i = 0; i < threads.size(); ++i) {
      cpu_set_t one;
      CPU_ZERO(&one);
      CPU_SET(cpus[i % cpus.size()], &one);
      if (sched_setaffinity(threads[i], sizeof(cpu_set_t), pin ? &one : &allowed) == 0 && pin) ++count;
    }
    pinned_.store(count);
    applied_.store(wanted);
  }

 private:
  // this process's threads named ActorThread_* or KernelThread_*, the actor threads first
  static std::vector<pid_t> pool_threads() {
    std::vector<std::pair<std::string, pid_t>> found;
    DIR *tasks = opendir("/proc/self/task");
    if (tasks == nullptr) return {};
    while (const dirent *entry = readdir(tasks)) {
      const pid_t tid = static_cast<pid_t>(std::atoi(entry->d_name));
      if (tid <= 0) continue;
      char path[64], name[32] = {};
      std::snprintf(path, sizeof(path), "/proc/self/task/%d/comm", static_cast<int>(tid));
      if (FILE *comm = std::fopen(path, "r")) {
        if (std::fgets(name, sizeof(name), comm) != nullptr) {
          std::string thread(name);
          if (!thread.empty() && thread.back() == '\n') thread.pop_back();
          if (thread.rfind("ActorThread_", 0) == 0 || thread.rfind("KernelThread_", 0) == 0)
            found.emplace_back(thread, tid);
        }
        std::fclose(comm);
      }
    }
    closedir(tasks);
    std::sort(found.begin(), found.end());
    std::vector<pid_t> threads;
    for (const auto &entry : found) threads.push_back(entry.second);
    return threads;
  }
  std::atomic<int> wanted_{-1}, applied_{-1}, pinned_{0};   // -1: never asked, nothing done
  std::mutex mutex_;
};

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

// MindSpore's own kernel thread pool, the one its CPU kernels run on, found in the libraries MindSpore
// has loaded (RTLD_NOLOAD: never loads anything): kernel::GetActorMgrInnerThreadPool() in
// libmindspore_ops_cpu.so and ThreadPool::ParallelLaunch(func, content, task_num) in
// libmindspore_core.so (mindspore 2.7.2; ActorThreadPool derives from ThreadPool alone, so the pointer
// is the ThreadPool's). Work handed to it runs on the threads that otherwise spin between MindSpore's
// kernels: with a separate pool the two sets of threads shared 2 cores, and the vision attention
// kernel, 2x faster than MindSpore's ops alone, made the tower slower (bench tower, interleaved:
// 124.1 ms with the kernels' own pool, 106.3 ms with MindSpore's, 155.2 ms without the kernels).
// Not found (another MindSpore build, or no MindSpore): the kernels' own pool below.
class MindSporePool {
 public:
  using Task = std::function<int(void *, int, float, float)>;   // (content, task id, scales)
  static MindSporePool *get() {
    static MindSporePool found = find();
    return found.launch_ != nullptr ? &found : nullptr;
  }
  // fn(t) for t in [0, n); false if MindSpore's pool is not running
  bool Run(int n, const std::function<void(int)> &fn) const {
    void *threads = get_pool_();
    if (threads == nullptr) return false;
    KernelThreads::get().apply();
    const Task task = [&fn](void *, int t, float, float) {
      fn(t);
      return 0;
    };
    return launch_(threads, task, nullptr, n) == 0;
  }

 private:
  using GetPool = void *(*)();
  using Launch = int (*)(void *, const Task &, void *, int);   // the member function, `this` first
  static MindSporePool find() {
    MindSporePool pool;
    void *ops = dlopen("libmindspore_ops_cpu.so", RTLD_NOLOAD | RTLD_LAZY);
    void *core = dlopen("libmindspore_core.so", RTLD_NOLOAD | RTLD_LAZY);
    if (ops == nullptr || core == nullptr) return pool;
    auto get_pool = reinterpret_cast<GetPool>(dlsym(ops, "_ZN9mindspore6kernel26GetActorMgrInnerThreadPoolEv"));
    auto launch = reinterpret_cast<Launch>(
        dlsym(core, "_ZN9mindspore10ThreadPool14ParallelLaunchERKSt8functionIFiPviffEES2_i"));
    if (get_pool != nullptr && launch != nullptr) {
      pool.get_pool_ = get_pool;
      pool.launch_ = launch;
    }
    return pool;
  }
  GetPool get_pool_ = nullptr;
  Launch launch_ = nullptr;
};

// fn(t, n) for t in [0, n), n = min(wanted, the CPUs): on MindSpore's kernel threads, else on the
// kernels' own pool (fn(0, 1) on the caller alone when n would be 1 or another call holds it).
inline void parallel(int64_t wanted, const std::function<void(int, int)> &fn) {
  static const int cpus = cpu_count();            // once, not a sched_getaffinity per kernel call
  const int n = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(wanted, cpus)));
  if (n <= 1) {
    fn(0, 1);
    return;
  }
  const MindSporePool *mindspore = MindSporePool::get();
  if (mindspore != nullptr && mindspore->Run(n, [&](int t) { fn(t, n); })) return;
  Pool *workers = pool();
  const int m = std::min(n, workers->size());
  std::unique_lock<std::mutex> lock(workers->busy(), std::try_to_lock);
  if (m <= 1 || !lock.owns_lock()) {
    fn(0, 1);
    return;
  }
  workers->Run(m, [&](int t) { fn(t, m); });
}

}  // namespace cogvlm2
