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

//: the storage types of the contract's ElementType codes (visit_element_type)
struct ElementTypes {
  using Float32 = float;
  using Float64 = double;
  using BFloat16 = c10::BFloat16;
  using Float16 = c10::Half;
};

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

//: log2(e) and ln(2), in double so that the fp32 constants derived from them round once
constexpr double kLog2e = 1.4426950408889634074;
constexpr double kLn2 = 0.69314718055994530942;

// 2^x for x ≤ 0 in fp32 (a caller's x may exceed 0 by a rounding error; that is fine). Every
// softmax exp goes through here, and on AVX2 the kernels are bound by the multiply/FMA ports:
// 2^x = 2^n·2^f with n = round(x), f = x − n ∈ [−½, ½] exact, and 2^f by its degree-5 minimax
// polynomial (relative error ≤ 1.1e-7, about 2 ulp; coefficients fitted for this range) — 7
// multiply-class ops against 11 for e^x with a Cody–Waite reduction by ln 2. 2^n is written straight
// into the exponent bits. Results below 2^−126 (also for −inf) are 0, as exp_u20's underflow; NaN
// stays NaN, so a NaN logit makes its row's loss and gradient NaN, as in the reference.
inline Vectorized<float> exp2_nonpositive(const Vectorized<float>& x) {
  using Vec = Vectorized<float>;
  using IntVec = Vectorized<int32_t>;
  const Vec n = x.round();
  const Vec f = x - n;
  Vec p(0.001326472731307149f);
  p = at::vec::fmadd(p, f, Vec(0.009671512991189957f));
  p = at::vec::fmadd(p, f, Vec(0.05550733581185341f));
  p = at::vec::fmadd(p, f, Vec(0.24022242426872253f));
  p = at::vec::fmadd(p, f, Vec(0.6931470036506653f));
  p = at::vec::fmadd(p, f, Vec(1.0f));
  const IntVec exponent = (at::vec::convert_to_int_of_same_size(n) + IntVec(127)) << IntVec(23);
  return Vec::blendv(p * at::vec::cast<float>(exponent), Vec(0.0f), x < Vec(-126.0f));
}

// exp(scale·(z − shift)) for z ≤ shift and scale > 0 — the softmax numerators. The log-argument
// arg = (z − shift)·slope is in "units": base 2 for fp32 (slope = scale·log2 e, then
// exp2_nonpositive), nats for fp64 (ATen's exp); a sum of arguments times kNatsPerUnit is in nats.
// z − shift is exact near the row max, so the largest entries are as exact as with a natural exp;
// the slope's rounding is a relative 6e-8 of each argument, the size of the rounding of z/T itself.
template <typename acc_t>
struct ScaledExp {
  using Vec = Vectorized<acc_t>;
  static constexpr bool kBase2 = std::is_same_v<acc_t, float>;
  static constexpr acc_t kNatsPerUnit = kBase2 ? static_cast<acc_t>(kLn2) : acc_t(1);

  ScaledExp(acc_t scale, acc_t shift)
      : slope_(static_cast<acc_t>(kBase2 ? double(scale) * kLog2e : double(scale))), shift_(shift) {}
  Vec arg(const Vec& z) const { return (z - Vec(shift_)) * Vec(slope_); }
  acc_t arg(acc_t z) const { return (z - shift_) * slope_; }
  Vec operator()(const Vec& arg) const {
    if constexpr (kBase2) {
      return exp2_nonpositive(arg);
    } else {
      return arg.exp_u20();
    }
  }
  acc_t operator()(acc_t arg) const { return kBase2 ? std::exp2(arg) : std::exp(arg); }

 private:
  acc_t slope_, shift_;
};

// ln x in fp32 for x ≥ 0, about 1 ulp for normal x, with no division (Sleef's logf has one, and the
// divergence pass takes a log of every entry): x = 2^e·f with f in [√½, √2), t = f − 1, and
// ln x = e·ln 2 + t − t²/2 + t³·P(t) with Cephes' degree-8 P for logf; ln 2 split in two so e·ln 2
// adds no rounding. 0 → −inf, NaN and +inf stay; a subnormal x is read as the smallest normal
// number (its callers weight such a log by a value of that size, far below their sums' resolution).
inline Vectorized<float> log_nonnegative(const Vectorized<float>& x) {
  using Vec = Vectorized<float>;
  using IntVec = Vectorized<int32_t>;
  const IntVec bits = at::vec::cast<int32_t>(at::vec::maximum(x, Vec(std::numeric_limits<float>::min())));
  Vec f = at::vec::cast<float>((bits & IntVec(0x007fffff)) | IntVec(0x3f800000));  // [1, 2)
  // the biased exponent read as a float: 2^23 + k, minus 2^23 + 127
  Vec e = at::vec::cast<float>((bits >> IntVec(23)) | IntVec(0x4b000000)) - Vec(8388608.0f + 127.0f);
  const Vec high = f > Vec(1.41421356237f);
  f = Vec::blendv(f, f * Vec(0.5f), high);
  e = e + Vec::blendv(Vec(0.0f), Vec(1.0f), high);
  const Vec t = f - Vec(1.0f);
  const Vec z = t * t, z2 = z * z;
  // P(t) = Σ c_k t^k by Estrin's scheme: 4 dependent FMAs instead of Horner's 8 (the pass is bound
  // by this chain's latency, not by its throughput)
  const Vec c01 = at::vec::fmadd(Vec(-2.4999993993e-1f), t, Vec(3.3333331174e-1f));
  const Vec c23 = at::vec::fmadd(Vec(-1.6668057665e-1f), t, Vec(2.0000714765e-1f));
  const Vec c45 = at::vec::fmadd(Vec(-1.2420140846e-1f), t, Vec(1.4249322787e-1f));
  const Vec c67 = at::vec::fmadd(Vec(-1.1514610310e-1f), t, Vec(1.1676998740e-1f));
  const Vec c03 = at::vec::fmadd(c23, z, c01), c47 = at::vec::fmadd(c67, z, c45);
  const Vec c48 = at::vec::fmadd(Vec(7.0376836292e-2f), z2, c47);
  const Vec p = at::vec::fmadd(c48, z2, c03);
  Vec y = at::vec::fmadd(e, Vec(-2.12194440e-4f), p * t * z);
  y = at::vec::fmadd(z, Vec(-0.5f), y);
  Vec r = at::vec::fmadd(e, Vec(0.693359375f), t + y);
  r = Vec::blendv(r, Vec(-std::numeric_limits<float>::infinity()), x == Vec(0.0f));
  // NaN (x ≠ x) and +inf are their own logs
  return Vec::blendv(r, x, (x != x) | (x == Vec(std::numeric_limits<float>::infinity())));
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

// Reductions keep four independent vector accumulators: with one, every step waits for the
// previous add (3–4 cycles of latency) while the loads could go at two per cycle.
constexpr int kLanesOfAccumulators = 4;

// max, sum and (optionally) sum of squares in the one pass that reads the row from memory.
template <typename acc_t>
inline void row_max_sum(const acc_t* x, int64_t n, acc_t& max_out, acc_t& sum_out, acc_t* sumsq_out) {
  using Vec = Vectorized<acc_t>;
  constexpr int kAcc = kLanesOfAccumulators;
  constexpr int64_t kStep = kAcc * Vec::size();
  Vec vmax[kAcc], vsum[kAcc], vsq[kAcc];
  for (int k = 0; k < kAcc; ++k) {
    vmax[k] = Vec(kNegInf<acc_t>);
    vsum[k] = Vec(0);
    vsq[k] = Vec(0);
  }
  const bool squares_wanted = sumsq_out != nullptr;
  int64_t i = 0;
  for (; i + kStep <= n; i += kStep) {
    for (int k = 0; k < kAcc; ++k) {
      const Vec v = Vec::loadu(x + i + k * Vec::size());
      vmax[k] = at::vec::maximum(vmax[k], v);
      vsum[k] = vsum[k] + v;
      if (squares_wanted) vsq[k] = at::vec::fmadd(v, v, vsq[k]);
    }
  }
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec v = Vec::loadu(x + i);
    vmax[0] = at::vec::maximum(vmax[0], v);
    vsum[0] = vsum[0] + v;
    if (squares_wanted) vsq[0] = at::vec::fmadd(v, v, vsq[0]);
  }
  for (int k = 1; k < kAcc; ++k) {
    vmax[0] = at::vec::maximum(vmax[0], vmax[k]);
    vsum[0] = vsum[0] + vsum[k];
    vsq[0] = vsq[0] + vsq[k];
  }
  acc_t best = horizontal_max(vmax[0]), total = horizontal_sum(vsum[0]), squares = horizontal_sum(vsq[0]);
  for (; i < n; ++i) {
    best = std::max(best, x[i]);
    total += x[i];
    squares += x[i] * x[i];
  }
  max_out = best;
  sum_out = total;
  if (squares_wanted) *sumsq_out = squares;
}

//: Σ (x − mean)² (the second pass of a two-pass variance; the row is in cache by now)
template <typename acc_t>
inline acc_t centred_squares(const acc_t* x, int64_t n, acc_t mean) {
  using Vec = Vectorized<acc_t>;
  constexpr int kAcc = kLanesOfAccumulators;
  constexpr int64_t kStep = kAcc * Vec::size();
  const Vec vmean(mean);
  Vec vsq[kAcc];
  for (int k = 0; k < kAcc; ++k) vsq[k] = Vec(0);
  int64_t i = 0;
  for (; i + kStep <= n; i += kStep) {
    for (int k = 0; k < kAcc; ++k) {
      const Vec d = Vec::loadu(x + i + k * Vec::size()) - vmean;
      vsq[k] = at::vec::fmadd(d, d, vsq[k]);
    }
  }
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec d = Vec::loadu(x + i) - vmean;
    vsq[0] = at::vec::fmadd(d, d, vsq[0]);
  }
  for (int k = 1; k < kAcc; ++k) vsq[0] = vsq[0] + vsq[k];
  acc_t squares = horizontal_sum(vsq[0]);
  for (; i < n; ++i) squares += (x[i] - mean) * (x[i] - mean);
  return squares;
}

// Software prefetch of the next row's inputs, one cache line of each per vector step of this row's
// exp pass. Otherwise a row's first pass waits on memory while its exp passes, most of the work,
// leave memory idle. Into L2 (prefetcht1), where the following passes over the row find it.
struct NextRowPrefetch {
  static constexpr int64_t kLineBytes = 64;
  const char* first = nullptr;
  const char* second = nullptr;  // may be null
  int64_t bytes = 0;
  int64_t issued = 0;

  void step() {
    if (issued < bytes) {
      __builtin_prefetch(first + issued, 0, 2);
      if (second != nullptr) __builtin_prefetch(second + issued, 0, 2);
      issued += kLineBytes;
    }
  }
};

//: Σ exp(scale·(x − shift)), also stored into out when out is not null (prefetching the next row meanwhile)
template <typename acc_t>
inline acc_t sum_exp(const acc_t* x, int64_t n, acc_t scale, acc_t shift, acc_t* out,
                     NextRowPrefetch* prefetch = nullptr) {
  using Vec = Vectorized<acc_t>;
  const ScaledExp<acc_t> exp_of(scale, shift);
  Vec vsum(0);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    if (prefetch != nullptr) prefetch->step();
    const Vec e = exp_of(exp_of.arg(Vec::loadu(x + i)));
    if (out != nullptr) e.store(out + i);
    vsum = vsum + e;
  }
  acc_t total = horizontal_sum(vsum);
  for (; i < n; ++i) {
    const acc_t e = exp_of(exp_of.arg(x[i]));
    if (out != nullptr) out[i] = e;
    total += e;
  }
  return total;
}

}  // namespace
}  // namespace kdfast::cpu::CPU_CAPABILITY

// The SIMD forms of csrc/common/row_math.h's elementwise helpers (its scalar versions are the rule;
// these overloads, declared before that header is included, let the elementwise templates there
// run on whole vectors). zero_where_zero: 0 in the lanes where `weight` is exactly 0, x elsewhere.
namespace kdfast::row_math {
template <typename T>
inline at::vec::Vectorized<T> zero_where_zero(const at::vec::Vectorized<T>& weight, const at::vec::Vectorized<T>& x) {
  using Vec = at::vec::Vectorized<T>;
  return Vec::blendv(x, Vec(0), weight == Vec(0));
}
template <typename T>
inline at::vec::Vectorized<T> select_equal(const at::vec::Vectorized<T>& a, const at::vec::Vectorized<T>& b,
                                           const at::vec::Vectorized<T>& x, const at::vec::Vectorized<T>& y) {
  return at::vec::Vectorized<T>::blendv(y, x, a == b);
}
template <typename T>
inline at::vec::Vectorized<T> select_greater(const at::vec::Vectorized<T>& a, const at::vec::Vectorized<T>& b,
                                             const at::vec::Vectorized<T>& x, const at::vec::Vectorized<T>& y) {
  return at::vec::Vectorized<T>::blendv(y, x, a > b);
}
//: fp32: log_nonnegative below (the divergence pass's one log per entry); fp64: ATen's (Sleef)
template <typename T>
inline at::vec::Vectorized<T> log_of(const at::vec::Vectorized<T>& x) {
  if constexpr (std::is_same_v<T, float>) {
    return kdfast::cpu::CPU_CAPABILITY::log_nonnegative(x);
  } else {
    return x.log();
  }
}
template <typename T>
inline at::vec::Vectorized<T> abs_of(const at::vec::Vectorized<T>& x) { return x.abs(); }
}  // namespace kdfast::row_math
