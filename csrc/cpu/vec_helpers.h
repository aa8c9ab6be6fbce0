// Row primitives shared by the per-instruction-set kernel TUs (rowsoftmax.cpp, feature_centre.cpp).
// Included inside `namespace kdfast::cpu::CPU_CAPABILITY { namespace { ... } }` only, so each build
// gets its own private copy compiled for its instruction set.
//
// Vectorized<acc_t> is 8/16 floats (AVX2/AVX-512) or the portable fallback; tails are scalar, so
// no loop ever reads past n elements.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#ifndef CPU_CAPABILITY
#error "compile the CPU kernels with -DCPU_CAPABILITY=DEFAULT|AVX2|AVX512 (setup.py does)"
#endif

namespace kdfast::cpu::CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

//: fp32 arithmetic for fp32/bf16/fp16 inputs, fp64 for fp64 inputs
template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

template <typename acc_t>
constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();

template <typename acc_t>
inline acc_t horizontal_sum(const Vectorized<acc_t>& v) {
  acc_t lanes[Vectorized<acc_t>::size()];
  v.store(lanes);
  acc_t total = 0;
  for (int i = 0; i < Vectorized<acc_t>::size(); ++i) total += lanes[i];
  return total;
}

template <typename acc_t>
inline acc_t horizontal_max(const Vectorized<acc_t>& v) {
  acc_t lanes[Vectorized<acc_t>::size()];
  v.store(lanes);
  acc_t best = lanes[0];
  for (int i = 1; i < Vectorized<acc_t>::size(); ++i) best = std::max(best, lanes[i]);
  return best;
}

//: ln of the smallest normal float: below it exp(x) is flushed to 0
constexpr float kLnFloatMin = -87.33654f;

// exp(x) for x ≤ 0 in fp32 — every caller passes scale·(z − row max) with scale > 0. Without an
// overflow branch it needs 16 vector ops, against ~25 for ATen's exp_u20 (the softmax kernels are
// bound by their exps once the gradient store is cheap): exp(x) = 2^n·e^r with n = round(x·log2 e),
// r = x − n·ln 2 (ln 2 split in two so that n·ln2_high is exact) and e^r, |r| ≤ ln2/2, by its
// degree-6 Taylor polynomial (truncation ≤ 1.2e-7 relative: about 1 ulp, tighter than exp_u20's 20);
// 2^n is written straight into the exponent bits. Results below ln(FLT_MIN) (also −inf and NaN)
// are 0, as exp_u20 gives for its underflow.
inline Vectorized<float> exp_nonpositive(const Vectorized<float>& x) {
  using Vec = Vectorized<float>;
  using IntVec = Vectorized<int32_t>;
  const Vec n = (x * Vec(1.44269504088896341f)).round();
  Vec r = at::vec::fmadd(n, Vec(-0.693359375f), x);
  r = at::vec::fmadd(n, Vec(2.12194440e-4f), r);
  Vec p(1.0f / 720);
  p = at::vec::fmadd(p, r, Vec(1.0f / 120));
  p = at::vec::fmadd(p, r, Vec(1.0f / 24));
  p = at::vec::fmadd(p, r, Vec(1.0f / 6));
  p = at::vec::fmadd(p, r, Vec(0.5f));
  p = at::vec::fmadd(p, r, Vec(1.0f));
  p = at::vec::fmadd(p, r, Vec(1.0f));
  const IntVec exponent = (at::vec::convert_to_int_of_same_size(n) + IntVec(127)) << IntVec(23);
  return Vec::blendv(Vec(0.0f), p * at::vec::cast<float>(exponent), x >= Vec(kLnFloatMin));
}

// exp of x ≤ 0 (see exp_nonpositive); fp64 rows keep ATen's exp.
template <typename acc_t>
inline Vectorized<acc_t> fast_exp(const Vectorized<acc_t>& x) {
  if constexpr (std::is_same_v<acc_t, float>) {
    return exp_nonpositive(x);
  } else {
    return x.exp_u20();
  }
}

// A row in accumulation precision: the input itself when it already is, else widened into buffer.
template <typename scalar_t, typename acc_t>
inline const acc_t* widen_row(const scalar_t* src, int64_t n, acc_t* buffer) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return src;
  } else {
    using HalfVec = Vectorized<scalar_t>;
    using FloatVec = Vectorized<float>;
    int64_t i = 0;
    for (; i + HalfVec::size() <= n; i += HalfVec::size()) {
      auto [low, high] = at::vec::convert_to_float<scalar_t>(HalfVec::loadu(src + i));
      low.store(buffer + i);
      high.store(buffer + i + FloatVec::size());
    }
    for (; i < n; ++i) buffer[i] = static_cast<float>(src[i]);
    return buffer;
  }
}

// dst (input dtype) ← src (accumulation precision), rounding to nearest even for bf16/fp16.
template <typename scalar_t, typename acc_t>
inline void narrow_row(const acc_t* src, scalar_t* dst, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (src != dst) std::copy(src, src + n, dst);
  } else {
    at::vec::convert(src, dst, n);
  }
}

template <typename scalar_t>
inline void zero_row(scalar_t* dst, int64_t n) {
  std::fill(dst, dst + n, static_cast<scalar_t>(0));
}

//: max over n elements; −inf for n = 0
template <typename acc_t>
inline acc_t row_max(const acc_t* x, int64_t n) {
  using Vec = Vectorized<acc_t>;
  acc_t best = kNegInf<acc_t>;
  int64_t i = 0;
  if (n >= Vec::size()) {
    Vec vbest = Vec::loadu(x);
    for (i = Vec::size(); i + Vec::size() <= n; i += Vec::size()) vbest = at::vec::maximum(vbest, Vec::loadu(x + i));
    best = horizontal_max(vbest);
  }
  for (; i < n; ++i) best = std::max(best, x[i]);
  return best;
}

// max, sum and (optionally) sum of squares in the one pass that reads the row from memory.
template <typename acc_t>
inline void row_max_sum(const acc_t* x, int64_t n, acc_t& max_out, acc_t& sum_out, acc_t* sumsq_out) {
  using Vec = Vectorized<acc_t>;
  Vec vmax(kNegInf<acc_t>), vsum(0), vsq(0);
  int64_t i = 0;
  if (sumsq_out != nullptr) {
    for (; i + Vec::size() <= n; i += Vec::size()) {
      Vec v = Vec::loadu(x + i);
      vmax = at::vec::maximum(vmax, v);
      vsum = vsum + v;
      vsq = at::vec::fmadd(v, v, vsq);
    }
  } else {
    for (; i + Vec::size() <= n; i += Vec::size()) {
      Vec v = Vec::loadu(x + i);
      vmax = at::vec::maximum(vmax, v);
      vsum = vsum + v;
    }
  }
  acc_t best = horizontal_max(vmax), total = horizontal_sum(vsum), squares = horizontal_sum(vsq);
  for (; i < n; ++i) {
    best = std::max(best, x[i]);
    total += x[i];
    squares += x[i] * x[i];
  }
  max_out = best;
  sum_out = total;
  if (sumsq_out != nullptr) *sumsq_out = squares;
}

//: Σ (x − mean)² (the second pass of a two-pass variance; the row is in cache by now)
template <typename acc_t>
inline acc_t centred_squares(const acc_t* x, int64_t n, acc_t mean) {
  using Vec = Vectorized<acc_t>;
  const Vec vmean(mean);
  Vec vsq(0);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    Vec d = Vec::loadu(x + i) - vmean;
    vsq = at::vec::fmadd(d, d, vsq);
  }
  acc_t squares = horizontal_sum(vsq);
  for (; i < n; ++i) squares += (x[i] - mean) * (x[i] - mean);
  return squares;
}

//: Σ exp(scale·(x − shift)), also stored into out when out is not null
template <typename acc_t>
inline acc_t sum_exp(const acc_t* x, int64_t n, acc_t scale, acc_t shift, acc_t* out) {
  using Vec = Vectorized<acc_t>;
  const Vec vscale(scale), vshift(shift);
  Vec vsum(0);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    Vec e = fast_exp((Vec::loadu(x + i) - vshift) * vscale);
    if (out != nullptr) e.store(out + i);
    vsum = vsum + e;
  }
  acc_t total = horizontal_sum(vsum);
  for (; i < n; ++i) {
    acc_t e = std::exp(scale * (x[i] - shift));
    if (out != nullptr) out[i] = e;
    total += e;
  }
  return total;
}

}  // namespace
}  // namespace kdfast::cpu::CPU_CAPABILITY
