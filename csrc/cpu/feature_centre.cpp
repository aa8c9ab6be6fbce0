// The feature–centre family on CPU: the ND loss (spec §2a–2c, §6 kernel B).
//
// Per row: gather the raw centre c = centres[y]; one pass accumulates ⟨u, c⟩, ‖c‖², ‖u‖², ‖f^t‖²;
// csrc/common/row_math.h's feature_centre_terms turns them into ℓ = 1 − ⟨u, ê⟩/M and the two
// coefficients of ∂ℓ/∂u = kc·c + ku·u, which a second pass writes. Rows whose label is ignore_index
// get loss 0 and a zero gradient. Compiled once per instruction set (see setup.py).
#include "kernels.h"
#include "vec_helpers.h"
// after vec_helpers.h (see rowsoftmax.cpp)
#include "../common/row_math.h"

namespace kdfast::cpu::CPU_CAPABILITY {
namespace {

template <typename acc_t>
struct Dots {
  acc_t uc = 0, cc = 0, uu = 0, tt = 0;
};

template <typename acc_t>
Dots<acc_t> four_dots(const acc_t* u, const acc_t* c, const acc_t* t, int64_t n) {
  using Vec = Vectorized<acc_t>;
  Vec vuc(0), vcc(0), vuu(0), vtt(0);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec vu = Vec::loadu(u + i), vc = Vec::loadu(c + i), vt = Vec::loadu(t + i);
    vuc = at::vec::fmadd(vu, vc, vuc);
    vcc = at::vec::fmadd(vc, vc, vcc);
    vuu = at::vec::fmadd(vu, vu, vuu);
    vtt = at::vec::fmadd(vt, vt, vtt);
  }
  Dots<acc_t> d{horizontal_sum(vuc), horizontal_sum(vcc), horizontal_sum(vuu), horizontal_sum(vtt)};
  for (; i < n; ++i) {
    d.uc += u[i] * c[i];
    d.cc += c[i] * c[i];
    d.uu += u[i] * u[i];
    d.tt += t[i] * t[i];
  }
  return d;
}

// out = feature_centre_gradient(c, u)
template <typename acc_t>
void combine(const acc_t* c, const acc_t* u, const row_math::CentreTerms<acc_t>& terms, acc_t* out, int64_t n) {
  using Vec = Vectorized<acc_t>;
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    row_math::feature_centre_gradient(terms, Vec::loadu(c + i), Vec::loadu(u + i)).store(out + i);
  }
  for (; i < n; ++i) out[i] = row_math::feature_centre_gradient(terms, c[i], u[i]);
}

template <typename scalar_t, typename grad_t>
bool rows(const FeatureCentreArgs& a, int64_t begin, int64_t end, void* scratch_bytes) {
  using acc_t = acc_type<scalar_t>;
  const int64_t n = a.dim;
  acc_t* scratch = static_cast<acc_t*>(scratch_bytes);
  const auto* student = static_cast<const scalar_t*>(a.student);
  const auto* teacher = static_cast<const scalar_t*>(a.teacher);
  const auto* centres = static_cast<const scalar_t*>(a.centres);
  auto* grad = static_cast<grad_t*>(a.grad);  // null: the loss only
  auto* loss = static_cast<acc_t*>(a.loss);
  const acc_t eps = static_cast<acc_t>(a.eps);

  bool labels_ok = true;
  for (int64_t r = begin; r < end; ++r) {
    grad_t* grad_row = grad != nullptr ? grad + r * n : nullptr;
    const int64_t y = a.target[r];  // validated by the glue; checked again so no gather reads outside
    const RowAction action = row_action(y, true, a.ignore_index, true, a.num_centres);
    if (action != RowAction::kCompute) {
      labels_ok = labels_ok && action == RowAction::kIgnore;
      if (grad_row != nullptr) zero_row(grad_row, n);
      loss[r] = 0;
      continue;
    }
    const acc_t* u = widen_row(student + r * n, n, scratch);
    const acc_t* t = widen_row(teacher + r * n, n, scratch + n);
    const acc_t* c = widen_row(centres + y * n, n, scratch + 2 * n);
    const Dots<acc_t> d = four_dots(u, c, t, n);
    const row_math::CentreTerms<acc_t> terms = row_math::feature_centre_terms(d.uc, d.cc, d.uu, d.tt, eps);
    loss[r] = terms.loss;
    if (grad_row == nullptr) continue;
    if constexpr (std::is_same_v<grad_t, acc_t>) {
      combine(c, u, terms, grad_row, n);
    } else {
      // the widened teacher row is no longer needed: reuse its buffer for the gradient
      acc_t* g = scratch + n;
      combine(c, u, terms, g, n);
      narrow_row(g, grad_row, n);
    }
  }
  return labels_ok;
}

}  // namespace

bool feature_centre_rows(const FeatureCentreArgs& args, int64_t begin, int64_t end, void* scratch) {
  return visit_element_and_grad_types<ElementTypes>(args.type, args.grad_type, false, [&](auto* type, auto* grad) {
    return rows<std::remove_pointer_t<decltype(type)>, std::remove_pointer_t<decltype(grad)>>(args, begin, end,
                                                                                              scratch);
  });
}

}  // namespace kdfast::cpu::CPU_CAPABILITY
