// Pinning MindSpore's CPU kernel threads one to a CPU (cpu_common.h's KernelThreads): the config's
// kernel_threads, set from cogvlm2_cpu_kernels.set_kernel_threads through ctypes.
#include "cpu_common.h"

// pinned 1: pin the pool's threads one to a CPU at the next kernel call; 0: give them back every CPU of
// the process.
extern "C" void SetKernelThreadsPinned(int pinned) { cogvlm2::KernelThreads::get().request(pinned != 0); }

// How many threads the last change pinned (0 after unpinning, or when they were not as many as the CPUs).
extern "C" int PinnedKernelThreads() { return cogvlm2::KernelThreads::get().pinned(); }
