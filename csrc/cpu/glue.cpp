// Tensor glue for the CPU row kernels: argument checks, layout, allocation, the choice of the
// instruction-set build, and the split of rows over threads. Compiled once with default flags.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <atomic>
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <set>
#include <vector>

#include <sys/mman.h>

#include "../glue_common.h"
#include "kernels.h"
#include "ops.h"

namespace kdfast::cpu {
namespace {

//: elements per parallel task: below this a row range is not worth a thread hand-off
constexpr int64_t kElementsPerTask = 1 << 15;

//: gradients at least this large get their own huge-page-backed allocation (see empty_gradient)
constexpr int64_t kHugePageMinBytes = int64_t(32) << 20;
constexpr size_t kHugePageBytes = size_t(2) << 20;

using RowSoftmaxFn = bool (*)(const RowSoftmaxArgs&, int64_t, int64_t, void*);
using FeatureCentreFn = bool (*)(const FeatureCentreArgs&, int64_t, int64_t, void*);

struct KernelSet {
  RowSoftmaxFn row_softmax;
  FeatureCentreFn feature_centre;
  const char* name;
};

// The best build this CPU can run; KDFAST_CPU_CAPABILITY=default|avx2|avx512 lowers it (never
// raises it above what the CPU supports), for testing the other builds on one machine.
KernelSet select_kernels() {
  const KernelSet builds[] = {
      {DEFAULT::row_softmax_rows, DEFAULT::feature_centre_rows, "default"},
      {AVX2::row_softmax_rows, AVX2::feature_centre_rows, "avx2"},
      {AVX512::row_softmax_rows, AVX512::feature_centre_rows, "avx512"},
  };
  __builtin_cpu_init();
  int level = 0;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) level = 1;
  if (level == 1 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    level = 2;
  }
  if (const char* requested = std::getenv("KDFAST_CPU_CAPABILITY")) {
    for (int i = 0; i < 3; ++i) {
      if (std::strcmp(requested, builds[i].name) == 0 && i < level) level = i;
    }
  }
  return builds[level];
}

const KernelSet& kernels() {
  static const KernelSet chosen = select_kernels();
  return chosen;
}

using glue::element_type;

// Gradient buffers. The kernels write each gradient once, so for big ones the cost is the first
// touch of fresh pages: with 4 KB pages the page faults alone run at ~1 GB/s on the project's
// machines, slower than the kernel. Advising MADV_HUGEPAGE (THP in "madvise" mode, the common
// default) on the 2 MB-aligned part of the block before anything touches it takes 512× fewer
// faults. The block still comes from torch's allocator (2 MB larger, to fit the aligned part), so
// the profiler and memory accounting see it like any other tensor. Below 32 MB (glibc's largest
// mmap threshold) the allocator reuses already-touched heap memory, so nothing is done.
//: bytes from the start of `block` to its first 2 MB boundary
int64_t huge_page_offset(const at::Tensor& block) {
  const auto address = reinterpret_cast<uintptr_t>(block.data_ptr());
  return static_cast<int64_t>((kHugePageBytes - address % kHugePageBytes) % kHugePageBytes);
}

at::Tensor huge_page_block(int64_t bytes, const at::TensorOptions& options) {
  const int64_t page = static_cast<int64_t>(kHugePageBytes);
  at::Tensor block = at::empty({bytes + page}, options.dtype(at::kByte));
  const int64_t offset = huge_page_offset(block);
  const size_t advised = static_cast<size_t>((bytes + page - offset) / page * page);  // whole pages inside
  madvise(block.data_ptr<uint8_t>() + offset, advised, MADV_HUGEPAGE);  // advice only: ignored without THP
  return block;
}

//: a gradient of this shape and dtype inside a block from huge_page_block (a view of it)
at::Tensor gradient_view(const at::Tensor& block, at::IntArrayRef sizes, at::ScalarType dtype) {
  const int64_t bytes = block.numel() - static_cast<int64_t>(kHugePageBytes);
  return block.narrow(0, huge_page_offset(block), bytes).view(dtype).view(sizes);
}

// Opt-in (KDFAST_CPU_REUSE_GRADIENT=1 at start-up, or set_gradient_reuse): big gradient blocks are
// kept after use and handed out again once no tensor refers to them any more, so a training loop
// stops paying the OS for freshly zeroed pages on every step (50–70 ms per 524 MB on the project's
// machines). The price: up to kReusedBlocks blocks stay allocated between steps, and the profiler
// sees them allocated once (kept_gradient_bytes reports them).
// "Idle" means the kept handle is the storage's only owner; a gradient whose storage Python has
// wrapped (Tensor.untyped_storage()) may keep an owner and then simply is not reused.
constexpr size_t kReusedBlocks = 2;

std::atomic<bool>& reuse_enabled() {
  static std::atomic<bool> enabled = [] {
    const char* value = std::getenv("KDFAST_CPU_REUSE_GRADIENT");
    return value != nullptr && std::strcmp(value, "1") == 0;
  }();
  return enabled;
}

// The kept blocks: storage referenced here and by every live view of it.
struct KeptBlocks {
  std::mutex lock;
  std::vector<at::Tensor> blocks;
};

KeptBlocks& kept_blocks() {
  static KeptBlocks kept;
  return kept;
}

at::Tensor reused_gradient(int64_t bytes, at::IntArrayRef sizes, const at::TensorOptions& options) {
  auto& [lock, blocks] = kept_blocks();
  const std::lock_guard<std::mutex> guard(lock);
  const int64_t block_bytes = bytes + static_cast<int64_t>(kHugePageBytes);
  const auto idle = [](const at::Tensor& block) { return block.storage().use_count() == 1; };
  for (const at::Tensor& block : blocks) {
    // the view is made under the lock, so no other caller can see this block idle meanwhile
    if (block.numel() == block_bytes && idle(block)) return gradient_view(block, sizes, options.dtype().toScalarType());
  }
  at::Tensor block = huge_page_block(bytes, options);
  if (blocks.size() >= kReusedBlocks) {
    const auto old = std::find_if(blocks.begin(), blocks.end(), idle);
    if (old == blocks.end()) return gradient_view(block, sizes, options.dtype().toScalarType());  // all busy: not kept
    blocks.erase(old);
  }
  blocks.push_back(block);
  return gradient_view(block, sizes, options.dtype().toScalarType());
}

//: a contiguous gradient of `input`'s shape in `dtype`
at::Tensor empty_gradient(const at::Tensor& input, at::ScalarType dtype) {
  const at::TensorOptions options = input.options().dtype(dtype);
  const int64_t bytes = input.numel() * static_cast<int64_t>(c10::elementSize(dtype));
  if (bytes < kHugePageMinBytes) return at::empty(input.sizes(), options);
  if (reuse_enabled().load()) return reused_gradient(bytes, input.sizes(), options);
  return gradient_view(huge_page_block(bytes, options), input.sizes(), dtype);
}

// Runs `body(begin, end, scratch)` over row ranges, each task with its own uninitialised scratch.
template <typename Body>
bool for_row_ranges(int64_t rows, int64_t row_elements, int64_t scratch_bytes, const Body& body) {
  std::atomic<bool> ok{true};
  const int64_t grain = std::max<int64_t>(1, kElementsPerTask / std::max<int64_t>(row_elements, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::unique_ptr<double[]> scratch(new double[(scratch_bytes + sizeof(double) - 1) / sizeof(double)]);
    if (!body(begin, end, scratch.get())) ok = false;
  });
  return ok.load();
}

}  // namespace

std::string capability() { return kernels().name; }

bool set_gradient_reuse(bool enabled) { return reuse_enabled().exchange(enabled); }

int64_t kept_gradient_bytes() {
  auto& [lock, blocks] = kept_blocks();
  const std::lock_guard<std::mutex> guard(lock);
  int64_t total = 0;
  for (const at::Tensor& block : blocks) total += block.numel();
  return total;
}

void release_kept_gradients() {
  auto& [lock, blocks] = kept_blocks();
  const std::lock_guard<std::mutex> guard(lock);
  blocks.clear();  // a block still viewed by a live gradient is freed with that gradient
}

int64_t parallel_threads_used() {
  // at::parallel_for is compiled into this TU: count the threads it really hands rows to
  std::mutex lock;
  std::set<int> threads;
  at::parallel_for(0, 4096, 1, [&](int64_t, int64_t) {
    std::lock_guard<std::mutex> guard(lock);
    threads.insert(at::get_thread_num());
  });
  return static_cast<int64_t>(threads.size());
}

std::tuple<at::Tensor, at::Tensor> row_softmax(const at::Tensor& student, const std::optional<at::Tensor>& teacher,
                                               const std::optional<at::Tensor>& target, int64_t normalize,
                                               double multiplier, double eps, double temperature,
                                               int64_t teacher_mode, double kl_weight, double ce_weight,
                                               double uniform_weight, bool reweight, double reweight_alpha,
                                               double reweight_eps, int64_t ignore_index, bool compute_grad,
                                               bool wide_grad, int64_t divergence, double divergence_param) {
  constexpr const char* op = "kdfast::row_softmax";
  glue::RowSoftmaxCall call = glue::prepare_row_softmax(op, student, teacher, target, normalize, multiplier, eps,
                                                        temperature, teacher_mode, kl_weight, ce_weight,
                                                        uniform_weight, reweight, reweight_alpha, reweight_eps,
                                                        ignore_index, divergence, divergence_param);
  RowSoftmaxArgs& args = call.args;
  const int64_t rows = args.rows, classes = args.classes;
  auto [loss, grad] = glue::attach_outputs(
      args, call.student,
      compute_grad ? empty_gradient(call.student, glue::grad_dtype(call.student, wide_grad)) : at::Tensor());

  const RowSoftmaxFn kernel = kernels().row_softmax;
  const bool ok = for_row_ranges(rows, classes, row_softmax_scratch_bytes(classes),
                                 [&](int64_t begin, int64_t end, void* scratch) {
                                   return kernel(args, begin, end, scratch);
                                 });
  TORCH_CHECK(ok, op, ": target holds a class index outside [0, ", classes, ") on a row that is not ignored");
  return {loss, grad};
}

std::tuple<at::Tensor, at::Tensor> feature_centre(const at::Tensor& student, const at::Tensor& teacher,
                                                  const at::Tensor& target, const at::Tensor& centres, double eps,
                                                  int64_t ignore_index, bool compute_grad, bool wide_grad) {
  constexpr const char* op = "kdfast::feature_centre";
  glue::FeatureCentreCall call = glue::prepare_feature_centre(op, student, teacher, target, centres, eps, ignore_index);
  FeatureCentreArgs& args = call.args;
  // the kernel gathers centres[y]: every label must name a centre or be ignore_index
  TORCH_CHECK(!glue::bad_labels(call.target, 0, args.num_centres, ignore_index).any().item<bool>(), op,
              ": target must lie in [0, ", args.num_centres, ") or equal ignore_index (", ignore_index, ")");
  auto [loss, grad] =
      glue::attach_outputs(args, call.student, glue::empty_gradient_or_none(call.student, compute_grad, wide_grad));
  const FeatureCentreFn kernel = kernels().feature_centre;
  const bool ok = for_row_ranges(args.rows, args.dim, feature_centre_scratch_bytes(args.dim),
                                 [&](int64_t begin, int64_t end, void* scratch) { return kernel(args, begin, end, scratch); });
  TORCH_CHECK(ok, op, ": target holds an index outside [0, ", args.num_centres, ")");
  return {loss, grad};
}

}  // namespace kdfast::cpu
