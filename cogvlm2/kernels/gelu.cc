// y = GELU(x) = x / 2 * (1 + erf(x / sqrt 2)), the exact (not tanh) GELU of the vision tower's MLP and
// the adapter, in one pass over x.
//
// x, y: any shape, float32, same shape. A MindSpore "aot" Custom CPU kernel: FusedGelu(nparam=2, {x, y}).
//
// Why: MindSpore 2.7.2 runs ops.gelu(approximate="none") on CPU as four kernels (Div, a scalar Erf,
// Add, Mul), 6.7 ms for one 771x1024 activation where this takes 0.9 ms; in the bench model's vision
// tower that was 12% of the time (MindSpore profiler, README "Benchmarks and performance").
// Accuracy: erf is the rational function fitted by tools/fit_erf.py (largest error 1.5e-9 on [0, 4];
// |z| > 4 is clamped, and below z = -4 GELU is 0, as float32 erf rounds there), evaluated in double
// and rounded once: largest error 2.4e-7 against float64 GELU over [-8, 8], where MindSpore's own is
// 4.5e-7 (tests/test_cpu_kernels.py).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_common.h"

namespace {

using cogvlm2::dvec8;

constexpr double kSqrtHalf = 0.70710678118654752440;
constexpr double kErfClamp = 4.0;
constexpr int64_t kElementsPerThread = 1 << 15;   // a second thread from 32 Ki elements

// erf(z) = z P(z^2) / Q(z^2), coefficients from tools/fit_erf.py
constexpr double kP[] = {1.1283791820721378,    0.1847113320035359,     0.05433269542290258,
                         0.003839566452931642,  0.0003826917658173668,  4.78049754236018e-06,
                         -1.3666616479367943e-08};
constexpr double kQ[] = {1.0,                   0.4970297011207354,     0.1138266872026493,
                         0.015453586981128108,  0.0013095862425938948,  6.400890168703629e-05};

inline dvec8 splat(double v) { return dvec8{} + v; }

inline dvec8 gelu8(dvec8 x) {
  dvec8 z = x * kSqrtHalf;
  const auto zero = z < -kErfClamp;               // GELU underflows to 0 there (|GELU| < 4.4e-8)
  z = z < -kErfClamp ? splat(-kErfClamp) : z;
  z = z > kErfClamp ? splat(kErfClamp) : z;
  const dvec8 s = z * z;
  dvec8 p = splat(kP[6]);
  for (int i = 5; i >= 0; --i) p = p * s + kP[i];
  dvec8 q = splat(kQ[5]);
  for (int i = 4; i >= 0; --i) q = q * s + kQ[i];
  const dvec8 y = 0.5 * x * (1.0 + z * p / q);
  return zero ? splat(0.0) : y;
}

void gelu(const float *x, float *y, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) cogvlm2::store8(y + i, gelu8(cogvlm2::load8(x + i)));
  if (i < n) {                                    // the last 1-7 elements through a zero-padded vector
    float buffer[8] = {};
    std::copy(x + i, x + n, buffer);
    cogvlm2::store8(buffer, gelu8(cogvlm2::load8(buffer)));
    std::copy(buffer, buffer + (n - i), y + i);
  }
}

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
    gelu(x + begin, y + begin, end - begin);
  });
  return 0;
}

// Output shape: x's.
extern "C" std::vector<int64_t> FusedGeluInferShape(int *ndims, int64_t **shapes, void *extra) {
  (void)extra;
  return std::vector<int64_t>(shapes[0], shapes[0] + ndims[0]);
}
