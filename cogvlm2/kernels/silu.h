// silu(gate) * up = gate * sigmoid(gate) * up, element-wise in float32: what silu_mul.cc's kernel computes
// over a tensor and amx_matmul.cc's AmxGated on a gate product's and an up product's sums as they are
// stored (the same function, so the fused kernel gives the bits of the two products and SiluMul in turn).
// sigmoid(g) = 1 / (1 + e) for g >= 0 and e / (1 + e) below, with e = e^-|g| from the vectorised exp
// (within 2 ulp), so no argument overflows.
#pragma once
#include <cstdint>
#include <cstring>

#include "cpu_common.h"

namespace cogvlm2 {
namespace silu {

inline vec silu_mul(vec g, vec u) {
  const vec e = exp_nonpositive(g < 0.f ? g : -g);        // e^-|g|
  const vec sigmoid = (g < 0.f ? e : splat(1.f)) / (1.f + e);
  return g * sigmoid * u;
}

// y[0..n) = silu(gate[0..n)) * up[0..n) (y may be up or gate): whole vectors, then the tail through one
// zero-padded vector
inline void silu_mul_span(const float *gate, const float *up, float *y, int64_t n) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    vec g, u;
    std::memcpy(&g, gate + i, sizeof(g));
    std::memcpy(&u, up + i, sizeof(u));
    const vec out = silu_mul(g, u);
    std::memcpy(y + i, &out, sizeof(out));
  }
  if (i < n) {
    vec g{}, u{};
    std::memcpy(&g, gate + i, sizeof(float) * (n - i));
    std::memcpy(&u, up + i, sizeof(float) * (n - i));
    const vec out = silu_mul(g, u);
    std::memcpy(y + i, &out, sizeof(float) * (n - i));
  }
}

}  // namespace silu
}  // namespace cogvlm2
