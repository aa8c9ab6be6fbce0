// The kdfast operator library: schemas of the three kernel families and their CPU implementations
// (the CUDA implementations register themselves from csrc/cuda/glue.cpp when that is built).
// Called from Python as torch.ops.kdfast.<name>; kdfast/backends/_fused.py describes the contract
// and kdfast/backends/cpu.py registers the fake (meta) implementations used by torch.compile.
//
// ATen/ATen.h + torch/library.h rather than torch/extension.h: no pybind11, a much faster compile.
#include <Python.h>

#include <ATen/ATen.h>
#include <torch/library.h>

#include "cpu/ops.h"

TORCH_LIBRARY(kdfast, m) {
  // the integer codes (normalize, teacher_mode, divergence, kind) are csrc/common/contract.h's enums;
  // compute_grad=False: the loss only (an empty gradient, no gradient pass); wide_grad: an fp32
  // gradient for half inputs (see glue_common.h grad_dtype)
  m.def(
      "row_softmax(Tensor student, Tensor? teacher, Tensor? target, int normalize, float multiplier, float eps, "
      "float temperature, int teacher_mode, float kl_weight, float ce_weight, float uniform_weight, bool reweight, "
      "float reweight_alpha, float reweight_eps, int ignore_index, bool compute_grad=True, bool wide_grad=False, "
      "int divergence=0, float divergence_param=0.0) -> (Tensor, Tensor)");
  // rows whose target is ignore_index: loss 0, zero gradient
  m.def(
      "feature_centre(Tensor student, Tensor teacher, Tensor target, Tensor centres, float eps, int ignore_index, "
      "bool compute_grad=True, bool wide_grad=False) -> (Tensor, Tensor)");
  // loss rows and gradient × weight, ÷ (‖S^t‖_F + eps) when normalize
  m.def(
      "landmark_gram(Tensor student_features, Tensor teacher_features, Tensor student_landmarks, "
      "Tensor teacher_landmarks, int kind, float beta, float weight, bool normalize, float eps, "
      "bool compute_grad=True, bool wide_grad=False) -> (Tensor, Tensor, Tensor)");
  m.def("cpu_capability() -> str", &kdfast::cpu::capability);
  m.def("cpu_parallel_threads_used() -> int", &kdfast::cpu::parallel_threads_used);
  m.def("cpu_set_gradient_reuse(bool enabled) -> bool", &kdfast::cpu::set_gradient_reuse);
  m.def("cpu_kept_gradient_bytes() -> int", &kdfast::cpu::kept_gradient_bytes);
  m.def("cpu_release_kept_gradients() -> ()", &kdfast::cpu::release_kept_gradients);
}

TORCH_LIBRARY_IMPL(kdfast, CPU, m) {
  m.impl("row_softmax", &kdfast::cpu::row_softmax);
  m.impl("feature_centre", &kdfast::cpu::feature_centre);
  m.impl("landmark_gram", &kdfast::cpu::landmark_gram);
}

// An importable (empty) Python module, so `import kdfast._C` loads the library and runs the
// registrations above.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "kdfast's compiled kernels (torch.ops.kdfast)", -1,
                               nullptr};
  return PyModule_Create(&module);
}
