// The landmark-Gram family on CPU: KDA / Nyström partial-Gram transfer (spec §3a–3c, §6 kernel B).
//
//   S^s = F^s·C^sᵀ, S^t = F^t·C^tᵀ (two GEMMs through ATen's BLAS), then one fused pass over the
//   B×m residual R = S^s − S^t that writes the per-row loss sums, the per-row Σ(S^t)² for ‖S^t‖_F
//   and, in place of S^s, G = ∂ℓ/∂R (huber_β: clip(R/β, −1, 1); squared: 2R); finally ∂ℓ/∂F^s = G·C^s.
// The contract's factor (weight, ÷ (‖S^t‖_F + eps) when normalising) goes on the loss rows and on the
// B×m matrix G before the last GEMM, not on the B×d gradient after it.
// The teacher side is computed once per call; the residual is never materialised separately.
// Compiled once with default flags: the GEMMs dominate and BLAS dispatches on the CPU by itself.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <tuple>

#include "../glue_common.h"
#include "ops.h"

namespace kdfast::cpu {
namespace {

//: rows of the m-wide residual per parallel task: enough work to amortise a task
constexpr int64_t kGramElementsPerTask = 1 << 14;

template <typename acc_t>
void residual_epilogue(acc_t* student_gram, const acc_t* teacher_gram, acc_t* loss_rows, acc_t* teacher_sq_rows,
                       int64_t rows, int64_t landmarks, int64_t kind, acc_t beta) {
  const int64_t grain = std::max<int64_t>(1, kGramElementsPerTask / std::max<int64_t>(landmarks, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      acc_t* s = student_gram + i * landmarks;  // becomes G
      const acc_t* t = teacher_gram + i * landmarks;
      acc_t loss = 0, teacher_sq = 0;
      for (int64_t j = 0; j < landmarks; ++j) {
        const acc_t r = s[j] - t[j];
        teacher_sq += t[j] * t[j];
        if (kind == kGramSmoothL1) {
          const acc_t size = std::abs(r);
          if (size < beta) {
            loss += acc_t(0.5) * r * r / beta;
            s[j] = r / beta;
          } else {
            loss += size - acc_t(0.5) * beta;
            s[j] = r > 0 ? acc_t(1) : acc_t(-1);
          }
        } else {
          loss += r * r;
          s[j] = 2 * r;
        }
      }
      loss_rows[i] = loss;
      teacher_sq_rows[i] = teacher_sq;
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> landmark_gram(const at::Tensor& student_features,
                                                             const at::Tensor& teacher_features,
                                                             const at::Tensor& student_landmarks,
                                                             const at::Tensor& teacher_landmarks, int64_t kind,
                                                             double beta, double weight, bool normalize, double eps) {
  TORCH_CHECK(student_features.dim() == 2 && teacher_features.dim() == 2 && student_landmarks.dim() == 2 &&
                  teacher_landmarks.dim() == 2,
              "kdfast::landmark_gram expects 2-D features and landmarks");
  TORCH_CHECK(kind == kGramSmoothL1 || kind == kGramSquared, "kdfast::landmark_gram: unknown kind ", kind);
  TORCH_CHECK(beta > 0 || kind != kGramSmoothL1, "kdfast::landmark_gram: beta must be positive");
  const int64_t rows = student_features.size(0), landmarks = student_landmarks.size(0);
  TORCH_CHECK(teacher_features.size(0) == rows && teacher_landmarks.size(0) == landmarks &&
                  student_landmarks.size(1) == student_features.size(1) &&
                  teacher_landmarks.size(1) == teacher_features.size(1),
              "kdfast::landmark_gram: shapes do not match: F^s ", student_features.sizes(), ", F^t ",
              teacher_features.sizes(), ", C^s ", student_landmarks.sizes(), ", C^t ", teacher_landmarks.sizes());
  // fp32 GEMMs for half inputs (a bf16 Gram would round S before the subtraction), fp64 for fp64
  const auto compute = student_features.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto fs = student_features.to(compute), cs = student_landmarks.to(compute);
  at::Tensor student_gram = at::mm(fs, cs.t()).contiguous();
  const at::Tensor teacher_gram = at::mm(teacher_features.to(compute), teacher_landmarks.to(compute).t()).contiguous();
  at::Tensor loss_rows = at::empty({rows}, fs.options());
  at::Tensor teacher_sq_rows = at::empty({rows}, fs.options());
  AT_DISPATCH_FLOATING_TYPES(compute, "kdfast_landmark_gram", [&] {
    residual_epilogue<scalar_t>(student_gram.data_ptr<scalar_t>(), teacher_gram.data_ptr<scalar_t>(),
                                loss_rows.data_ptr<scalar_t>(), teacher_sq_rows.data_ptr<scalar_t>(), rows, landmarks,
                                kind, static_cast<scalar_t>(beta));
  });
  const at::Tensor teacher_norm = teacher_sq_rows.sum().sqrt();
  glue::apply_gram_factor(student_gram, loss_rows, teacher_norm, weight, normalize, eps);
  at::Tensor grad = at::mm(student_gram, cs).to(student_features.scalar_type());
  return {loss_rows, grad, teacher_norm};
}

}  // namespace kdfast::cpu
