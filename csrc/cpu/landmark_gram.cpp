// The landmark-Gram family on CPU: KDA / Nyström partial-Gram transfer (spec §3a–3c, §6 kernel B).
//
//   S^s = F^s·C^sᵀ, S^t = F^t·C^tᵀ (two GEMMs through ATen's BLAS), then one fused pass over the
//   B×m residual R = S^s − S^t that writes the per-row loss sums, the per-row Σ(S^t)² for ‖S^t‖_F
//   and, in place of S^s, G = ∂ℓ/∂R (row_math.h's gram_entry); finally ∂ℓ/∂F^s = G·C^s.
// The contract's factor (weight, ÷ (‖S^t‖_F + eps) when normalising) goes on the loss rows and on the
// B×m matrix G before the last GEMM, not on the B×d gradient after it.
// The teacher side is computed once per call; the residual is never materialised separately.
// Compiled once with default flags: the GEMMs dominate and BLAS dispatches on the CPU by itself.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <tuple>

#include "../common/row_math.h"
#include "../glue_common.h"
#include "ops.h"

namespace kdfast::cpu {
namespace {

//: rows of the m-wide residual per parallel task: enough work to amortise a task
constexpr int64_t kGramElementsPerTask = 1 << 14;

template <typename acc_t>
void residual_epilogue(acc_t* student_gram, const acc_t* teacher_gram, acc_t* loss_rows, acc_t* teacher_sq_rows,
                       int64_t rows, int64_t landmarks, int kind, acc_t beta) {
  const int64_t grain = std::max<int64_t>(1, kGramElementsPerTask / std::max<int64_t>(landmarks, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      acc_t* s = student_gram + i * landmarks;  // becomes G
      const acc_t* t = teacher_gram + i * landmarks;
      acc_t loss = 0, teacher_sq = 0;
      for (int64_t j = 0; j < landmarks; ++j) {
        const row_math::GramEntry<acc_t> entry = row_math::gram_entry(kind, s[j] - t[j], beta);
        teacher_sq += t[j] * t[j];
        loss += entry.loss;
        s[j] = entry.grad;
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
                                                             double beta, double weight, bool normalize, double eps,
                                                             bool compute_grad, bool wide_grad) {
  glue::check_landmark_gram("kdfast::landmark_gram", student_features, teacher_features, student_landmarks,
                            teacher_landmarks, kind, beta);
  const int64_t rows = student_features.size(0), landmarks = student_landmarks.size(0);
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
                                static_cast<int>(kind), static_cast<scalar_t>(beta));
  });
  const at::Tensor teacher_norm = teacher_sq_rows.sum().sqrt();
  glue::apply_gram_factor(student_gram, loss_rows, teacher_norm, weight, normalize, eps);
  at::Tensor grad = compute_grad
                        ? at::mm(student_gram, cs).to(glue::grad_dtype(student_features, wide_grad))
                        : at::empty({0}, student_features.options());
  return {loss_rows, grad, teacher_norm};
}

}  // namespace kdfast::cpu
