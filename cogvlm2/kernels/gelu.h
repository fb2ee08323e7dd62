// GELU(x) = x / 2 * (1 + erf(x / sqrt 2)), the exact (not tanh) GELU, on 8 values at a time in double:
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

// y[0..n) = GELU(x[0..n)) (y may be x): whole 8-value vectors, then the last 1-7 through a zero-padded one
inline void gelu_span(const float *x, float *y, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) store8(y + i, gelu8(load8(x + i)));
  if (i < n) {
    float buffer[8] = {};
    for (int64_t j = i; j < n; ++j) buffer[j - i] = x[j];
    store8(buffer, gelu8(load8(buffer)));
    for (int64_t j = i; j < n; ++j) y[j] = buffer[j - i];
  }
}

}  // namespace gelu
}  // namespace cogvlm2
