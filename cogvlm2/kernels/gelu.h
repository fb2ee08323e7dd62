// GELU(x) = x / 2 * (1 + erf(x / sqrt 2)), the exact (not tanh) GELU, on a register of doubles at a time:
// what gelu.cc's kernel computes over a tensor and amx_matmul.cc's AmxLinearGelu on a product's sums as
// they are stored (the same function, so the fused kernel gives the bits of the two kernels in turn).
// erf is the rational function fitted by tools/fit_erf.py (largest error 1.5e-9 on [0, 4]; |z| > 4 is
// clamped, and below z = -4 GELU is 0, as float32 erf rounds there), evaluated in double and rounded
// once by the caller.
#pragma once
#include "cpu_common.h"

namespace cogvlm2 {
namespace gelu {

constexpr double kSqrtHalf = 0.70710678118654752440;
constexpr double kErfClamp = 4.0;

// erf(z) = z P(z^2) / Q(z^2), coefficients from tools/fit_erf.py
constexpr double kP[] = {1.1283791820721378,    0.1847113320035359,     0.05433269542290258,
                         0.003839566452931642,  0.0003826917658173668,  4.78049754236018e-06,
                         -1.3666616479367943e-08};
constexpr double kQ[] = {1.0,                   0.4970297011207354,     0.1138266872026493,
                         0.015453586981128108,  0.0013095862425938948,  6.400890168703629e-05};

inline dvec splat(double v) { return dvec{} + v; }

inline dvec gelu_values(dvec x) {
  dvec z = x * kSqrtHalf;
  const auto zero = z < -kErfClamp;               // GELU underflows to 0 there (|GELU| < 4.4e-8)
  z = z < -kErfClamp ? splat(-kErfClamp) : z;
  z = z > kErfClamp ? splat(kErfClamp) : z;
  const dvec s = z * z;
  dvec p = splat(kP[6]);
  for (int i = 5; i >= 0; --i) p = p * s + kP[i];
  dvec q = splat(kQ[5]);
  for (int i = 4; i >= 0; --i) q = q * s + kQ[i];
  const dvec y = 0.5 * x * (1.0 + z * p / q);
  return zero ? splat(0.0) : y;
}

// y[0..n) = GELU(x[0..n)) (y may be x): whole registers, then the rest through a zero-padded one
inline void gelu_span(const float *x, float *y, int64_t n) {
  int64_t i = 0;
  for (; i + kDoubleLanes <= n; i += kDoubleLanes) stored(y + i, gelu_values(loadd(x + i)));
  if (i < n) {
    float buffer[kDoubleLanes] = {};
    for (int64_t j = i; j < n; ++j) buffer[j - i] = x[j];
    stored(buffer, gelu_values(loadd(buffer)));
    for (int64_t j = i; j < n; ++j) y[j] = buffer[j - i];
  }
}

}  // namespace gelu
}  // namespace cogvlm2
