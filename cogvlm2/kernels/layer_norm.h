// LayerNorm of one row in double, rounded once to float32: what layer_norm.cc's kernel computes row by
// row, and amx_matmul.cc's AmxLinearNormAdd on a product's rows as they are finished (the same function,
// so the fused kernel gives the bits of the product, the LayerNorm and MindSpore's Add in turn).
// Mean and (biased) variance are summed in double, two-pass, and the row is normalised in double.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "cpu_common.h"

namespace cogvlm2 {
namespace layer_norm {

// y[0..C) = (x - mean) / sqrt(var + eps) * weight + bias, rounded to float32, then plus residual[0..C)
// in float32 if residual is given (y may be x)
inline void normalize_row(const float *x, const float *weight, const float *bias, float *y, int64_t C, double eps,
                          const float *residual = nullptr) {
  const int64_t whole = C / 8 * 8;
  double sum = sum8(x, whole, [](dvec v) { return v; });
  for (int64_t i = whole; i < C; ++i) sum += x[i];
  const double mean = sum / static_cast<double>(C);
  double squares = sum8(x, whole, [mean](dvec v) { return (v - mean) * (v - mean); });
  for (int64_t i = whole; i < C; ++i) squares += (x[i] - mean) * (x[i] - mean);
  const double rstd = 1.0 / std::sqrt(squares / static_cast<double>(C) + eps);
  for (int64_t i = 0; i < whole; i += kDoubleLanes) {
    const dvec normed = (loadd(x + i) - mean) * rstd * loadd(weight + i) + loadd(bias + i);
    if (residual == nullptr) {
      stored(y + i, normed);
    } else {
      fvecd r, out = __builtin_convertvector(normed, fvecd);
      std::memcpy(&r, residual + i, sizeof(r));
      out += r;
      std::memcpy(y + i, &out, sizeof(out));
    }
  }
  for (int64_t i = whole; i < C; ++i) {
    const float normed = static_cast<float>((x[i] - mean) * rstd * weight[i] + bias[i]);
    y[i] = residual == nullptr ? normed : normed + residual[i];
  }
}

}  // namespace layer_norm
}  // namespace cogvlm2
