// y = GELU(x) = x / 2 * (1 + erf(x / sqrt 2)), the exact (not tanh) GELU of the vision tower's MLP and
// the adapter, in one pass over x.
//
// x, y: any shape, float32, same shape. A MindSpore "aot" Custom CPU kernel: FusedGelu(nparam=2, {x, y}).
//
// Why: MindSpore 2.7.2 runs ops.gelu(approximate="none") on CPU as four kernels (Div, a scalar Erf,
// Add, Mul), 6.7 ms for one 771x1024 activation where this takes 0.9 ms; in the bench model's vision
// tower that was 12% of the time (MindSpore profiler, README "Benchmarks and performance").
// Accuracy: gelu.h's function, in double and rounded once: largest error 2.4e-7 against float64 GELU
// over [-8, 8], where MindSpore's own is 4.5e-7 (tests/test_cpu_kernels.py).
#include <algorithm>
#include <cstdint>
#include <vector>

#include "gelu.h"

namespace {

constexpr int64_t kElementsPerThread = 1 << 15;   // a second thread from 32 Ki elements

}  // namespace

extern "C" int FusedGelu(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                         void *stream, void *extra) {
  (void)stream;
  (void)extra;
  if (nparam != 2 || ndims[0] != ndims[1]) return 1;
  for (int i = 0; i < 2; ++i)
    if (!cogvlm2::is_float32(dtypes[i])) return 2;
  int64_t n = 1;
  for (int d = 0; d < ndims[0]; ++d) {
    if (shapes[0][d] != shapes[1][d]) return 3;
    n *= shapes[0][d];
  }
  const float *x = static_cast<const float *>(params[0]);
  float *y = static_cast<float *>(params[1]);
  // one contiguous range per thread, in whole 8-element vectors
  const int64_t vectors = (n + 7) / 8;
  cogvlm2::parallel((n + kElementsPerThread - 1) / kElementsPerThread, [&](int t, int threads) {
    const int64_t begin = std::min(n, vectors * t / threads * 8);
    const int64_t end = std::min(n, vectors * (t + 1) / threads * 8);
    cogvlm2::gelu::gelu_span(x + begin, y + begin, end - begin);
  });
  return 0;
}

// Output shape: x's.
extern "C" std::vector<int64_t> FusedGeluInferShape(int *ndims, int64_t **shapes, void *extra) {
  (void)extra;
  return std::vector<int64_t>(shapes[0], shapes[0] + ndims[0]);
}
