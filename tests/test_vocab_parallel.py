"""Vocabulary-parallel losses (kdfast.parallel.vocab) on 2 and 3 gloo processes equal the
single-process ``backend="reference"`` losses: loss on every rank, the concatenated gradient shards,
for every form, tail and reduction, uneven shards, masked, ignored and NaN rows, fp64/fp32/bf16,
DTensor inputs; and every call issues exactly the collectives of the table in the module
docstring of kdfast/parallel/vocab.py, none in the backward.

The ranks are one persistent pool of spawned workers per world size (tests/distributed_pool.py);
each test sends one task (a module-level function below) to it. Every worker builds the same full
tensors from a fixed seed and keeps its shard; the parent computes the reference (float64 on the
upcast inputs, as tests/backends.py) and compares.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

import kdfast
from distributed_pool import DistributedPool, count_collectives, skip_reason

# The workers import this module to find the tasks: keep its imports light (tests/backends.py
# probes the Triton backend at import time; the parent-side helpers import it when they run).
F64, F32, BF16 = torch.float64, torch.float32, torch.bfloat16
DTYPES = {"f64": F64, "f32": F32, "bf16": BF16}

pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")

INF = math.inf
SHAPE = (2, 4)                                          #: leading dims: 8 rows
#: uneven splits of V = 11 (rank order = column order)
SPLITS = {2: (7, 4), 3: (5, 4, 2)}
#: more splits: very uneven, an empty shard (test_empty_shard), equal shards (vocab_start_index=None)
SKEWED = {2: (2, 9), 3: (1, 3, 7)}
EMPTY = {2: (0, 11), 3: (6, 0, 5)}
EQUAL = {2: (6, 6), 3: (4, 4, 4)}
#: labels of the 8 rows: row 2 ignored; the last column (row 4), the first, and every rank's block
LABELS = (9, 3, -100, 2, -1, 0, 5, 7)                   #: -1: the last column V − 1


def tolerance(dtype):
    """(loss tol, grad tol), (rel, abs) against the float64 reference: tests/backends.py's
    reference table (fp32 accumulation for fp32 and bf16 inputs), ~1e-12 for fp64."""
    from backends import REFERENCE
    return ((1e-12, 1e-12), (1e-12, 1e-12)) if dtype == F64 else REFERENCE[dtype]


def assert_matches(*args, **kwargs):
    from backends import assert_matches
    assert_matches(*args, **kwargs)


def assert_nan_rows_whole(*args):
    from backends import assert_nan_rows_whole
    assert_nan_rows_whole(*args)


@pytest.fixture(scope="module", params=[2, 3], ids=lambda p: f"P{p}")
def pool(request):
    with DistributedPool(request.param, timeout=120.0) as pool:
        yield pool


# --- problems: the same full tensors in every process ---------------------------------------------

def last_block(splits):
    """[start, stop) of the last non-empty shard."""
    stop = sum(splits)
    for size in reversed(splits):
        if size:
            return stop - size, stop
        stop -= size
    raise AssertionError("no columns")


def build(loss, splits, dtype_name, *, masked=True, nan=False, skd_inf=False, undefined=False, topk_nan=False,
          seed=0, k=4):
    """Full inputs: (student [2, 4, V], args after the student, target [2, 4]).

    Dense rows: row 1 has column 4 masked (−inf on both sides); row 3 has the last rank's whole
    shard masked on both sides; row 2 is ignored. ``nan``: student row 0 NaN in the last shard,
    teacher row 4 NaN in the first column. SKD has no −inf (``skd_inf`` puts one in row 5). Top-k:
    k global indices spread over the ranks (row 0 includes the last column, row 6 only the last
    shard), padding entries (−inf log-probs, colliding indices) in rows 4, 5 and 6, no index on a
    masked student column."""
    dtype = DTYPES[dtype_name]
    vocab = sum(splits)
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(*SHAPE, vocab, generator=gen, dtype=F64) * 2
    teacher = torch.randn(*SHAPE, vocab, generator=gen, dtype=F64) * 2 + 0.5
    target = torch.tensor([vocab - 1 if y == -1 else y for y in LABELS]).reshape(SHAPE)
    s, t = student.view(-1, vocab), teacher.view(-1, vocab)
    lo, hi = last_block(splits)
    if loss == "skd_loss":
        t += 5.0                                        # a large mean: the Σz² − V·μ² cancellation
        if skd_inf:
            s[5, 2] = -INF
    elif masked:
        s[1, 4] = t[1, 4] = -INF
        s[3, lo:hi] = t[3, lo:hi] = -INF
    if undefined:                                       # (a top-k teacher has no logits to mask)
        s[5] = -INF
        s[7] = -INF
        if loss != "topk_divergence_loss":
            t[6] = t[7] = -INF
    if nan:
        s[0, vocab - 1] = math.nan
        if loss != "topk_divergence_loss":
            t[4, 1] = math.nan
    if loss == "topk_divergence_loss":
        logp = torch.log_softmax(teacher / 1.5, dim=-1)     # stored at T_gen = 1.5 (or 1: see options)
        allowed = [c for c in range(vocab) if c != 4 and not (lo <= c < hi)]
        rows, short = [], []
        for row in range(8):
            free = [c for c in range(vocab) if row != 1 or c != 4] if row != 3 else allowed
            order = [free[i] for i in torch.randperm(len(free), generator=gen).tolist()]
            if row == 0:
                order = [vocab - 1] + [c for c in order if c != vocab - 1]
            if row == 6:
                order = [vocab - 1, vocab - 2] + [0, 1]
            short.append(max(0, k - len(order)))         # too few allowed columns: padded below
            rows.append((order + [0] * k)[:k])
        indices = torch.tensor(rows).reshape(*SHAPE, k)
        logprobs = logp.gather(-1, indices)
        lp = logprobs.view(-1, k)
        for row, missing in enumerate(short):
            if missing:
                lp[row, k - missing:] = -INF
        lp[4, 2:] = -INF                                # padding; its indices collide with real ones
        indices.view(-1, k)[4, 2:] = indices.view(-1, k)[4, 0]
        lp[5, 3] = -INF
        lp[6, 2:] = -INF
        if topk_nan:                                    # a NaN teacher log-prob: the row is NaN
            lp[1, 1] = math.nan
        return student.to(dtype), (indices, logprobs.to(dtype)), target
    return student.to(dtype), (teacher.to(dtype),), target


def upstream_of(kind, reduction, dtype):
    """The grad_output: None (1), a number, or "random" (a weight per row for reduction "none")."""
    if kind is None:
        return None
    if reduction == "none":
        gen = torch.Generator().manual_seed(7)
        return (torch.rand(SHAPE, generator=gen, dtype=F64) * 2 - 0.5).to(dtype)
    return torch.tensor(float(kind), dtype=dtype)


def shard_args(loss, args, start, stop):
    if loss == "topk_divergence_loss":
        return args                                      # the top-k teacher is replicated
    return tuple(a[..., start:stop] for a in args)


# --- counting the collectives in a worker -------------------------------------------------------

def expected_ops(loss, options):
    """The collectives of one call, in order (the table of kdfast/parallel/vocab.py)."""
    if loss == "kd_loss":
        return ["max", "sum"]
    if loss == "skd_loss":
        return ["max", "sum", "sum"]                     # (MAX ∥ SUM) + SUM
    if loss == "topk_divergence_loss":
        if options.get("tail", "renormalize") == "renormalize_both" and options.get("alpha", 1.0) == 1:
            return ["sum"]
        return ["max", "sum"]
    form = options.get("divergence", "forward_kl")
    beta, skew = options.get("beta", 0.5), options.get("skew_alpha", 0.1)
    # JSD(0), JSD(1) are the forward and reverse KL, and run as them: 2 collectives, not 3
    one_level = (form in ("forward_kl", "reverse_kl", "mixed_kl") or (form == "jsd" and beta in (0, 1))
                 or (form.startswith("skew") and skew == 0))
    return ["max", "sum"] if one_level else ["max", "sum", "sum"]


# --- the worker tasks (module level: the workers import this module) ----------------------------

def loss_task(rank, world, loss, splits, dtype_name, options, upstream, problem=None, start_mode="explicit",
              group=None):
    """This rank's shard through the public loss: loss, gradient shard, collectives."""
    from kdfast.parallel.vocab import record_collectives
    assert len(splits) == world
    student, args, target = build(loss, splits, dtype_name, **(problem or {}))
    start = sum(splits[:rank])
    stop = start + splits[rank]
    x = student[..., start:stop].clone().requires_grad_()
    parallel = dict(vocab_parallel_group=dist.group.WORLD if group is None else group,
                    vocab_start_index=None if start_mode == "none" else start)
    with count_collectives() as forward, record_collectives() as records:
        out = getattr(kdfast, loss)(x, *shard_args(loss, args, start, stop), target, **parallel, **options)
    weight = upstream_of(upstream, options.get("reduction", "batchmean"), out.dtype)
    with count_collectives() as backward:
        grad, = torch.autograd.grad(out, x, None if weight is None else weight.expand_as(out))
    return dict(loss=out.detach(), grad=grad, forward=forward, backward=backward,
                records=[(r.op, r.shape, r.dtype) for r in records])


def guarded_loss_task(rank, world, *args, seconds=2.0):
    """loss_task on a fresh group with a short timeout, the error (if any) returned: a rank that
    raises before the collectives leaves the others waiting; they time out instead of hanging
    the pool."""
    from datetime import timedelta
    group = dist.new_group(list(range(world)), timeout=timedelta(seconds=seconds))
    try:
        return loss_task(rank, world, *args, group=group)
    except Exception as error:  # noqa: BLE001  (reported to the parent)
        return dict(error=f"{type(error).__name__}: {error}")
    finally:
        dist.destroy_process_group(group)


def dtensor_splits(world, vocab=11):
    """The shard widths of torch's Shard(-1) (torch.chunk: ceil(V/P) each, the last one shorter)."""
    return tuple(len(chunk) for chunk in torch.arange(vocab).chunk(world))


def dtensor_task(rank, world, loss, dtype_name, options, upstream, problem=None):
    """DTensor logits distributed with torch's chunking (Shard(-1) over a 1-D CPU mesh)."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor
    student, args, target = build(loss, dtensor_splits(world), dtype_name, **(problem or {}))
    mesh = DeviceMesh("cpu", list(range(world)))
    x = distribute_tensor(student, mesh, [Shard(-1)]).requires_grad_()
    if loss != "topk_divergence_loss":
        args = tuple(distribute_tensor(a, mesh, [Shard(-1)]) for a in args)
    with count_collectives() as forward:
        out = getattr(kdfast, loss)(x, *args, target, **options)
    weight = upstream_of(upstream, options.get("reduction", "batchmean"), out.dtype)
    with count_collectives() as backward:
        if weight is None:
            out.backward()
        else:
            out.backward(weight.expand_as(out))
    grad = x.grad
    return dict(loss=out.detach(), is_dtensor=isinstance(grad, DTensor), grad_placements=tuple(grad.placements),
                placements=tuple(x.placements), local_width=x.to_local().shape[-1],
                grad_local=grad.to_local(), grad=grad.full_tensor(), forward=forward, backward=backward)


def errors_task(rank, world):
    """The argument errors, raised identically on every rank (before or after the collectives)."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import Shard, distribute_tensor
    splits = SPLITS[world]
    start = sum(splits[:rank])
    stop = start + splits[rank]
    student, (teacher,), target = build("divergence_loss", splits, "f64")
    s, t = student[..., start:stop], teacher[..., start:stop]
    group = dist.group.WORLD
    messages = {}

    def expect(name, error, fn):
        with pytest.raises(error) as info:
            fn()
        messages[name] = str(info.value)

    expect("start_without_group", ValueError, lambda: kdfast.divergence_loss(s, t, vocab_start_index=start))
    expect("kd_start_without_group", ValueError, lambda: kdfast.kd_loss(s, t, vocab_start_index=start))
    for name, bad in (("float", float(start)), ("tensor", torch.tensor(start)), ("bool", True), ("negative", -1)):
        expect(f"start_{name}", ValueError, lambda bad=bad: kdfast.divergence_loss(
            s, t, target, vocab_parallel_group=group, vocab_start_index=bad))
    label = target.clone()
    label[1, 1] = sum(splits)                           # == global V: only the local check would pass it
    expect("label_out_of_vocab", ValueError, lambda: kdfast.divergence_loss(
        s, t, label, alpha=0.5, vocab_parallel_group=group, vocab_start_index=start))
    expect("label_out_of_vocab_kd", ValueError, lambda: kdfast.kd_loss(
        s, t, label, vocab_parallel_group=group, vocab_start_index=start))
    _, (indices, logprobs), _ = build("topk_divergence_loss", splits, "f64")
    indices = indices.clone()
    indices[0, 0, 0] = sum(splits)
    expect("topk_index_out_of_vocab", ValueError, lambda: kdfast.topk_divergence_loss(
        s, indices, logprobs, target, vocab_parallel_group=group, vocab_start_index=start))
    mesh = DeviceMesh("cpu", list(range(world)))
    s_d, t_d = distribute_tensor(student, mesh, [Shard(-1)]), distribute_tensor(teacher, mesh, [Shard(-1)])
    expect("dtensor_student_plain_full_teacher", ValueError, lambda: kdfast.divergence_loss(s_d, teacher))
    expect("plain_student_dtensor_teacher", ValueError, lambda: kdfast.divergence_loss(
        s, t_d, vocab_parallel_group=group, vocab_start_index=start))
    expect("dtensor_with_start", ValueError, lambda: kdfast.divergence_loss(s_d, t_d, vocab_start_index=0))
    return messages


def dtensor_plain_local_teacher_task(rank, world):
    """A DTensor student with the teacher's local shard as a plain tensor (same local shape)."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import Shard, distribute_tensor
    student, (teacher,), _ = build("divergence_loss", dtensor_splits(world), "f64")
    mesh = DeviceMesh("cpu", list(range(world)))
    s_d, t_d = distribute_tensor(student, mesh, [Shard(-1)]), distribute_tensor(teacher, mesh, [Shard(-1)])
    with pytest.raises(ValueError, match="teacher_logits"):
        kdfast.divergence_loss(s_d, t_d.to_local())
    return True


# --- the parent's side ----------------------------------------------------------------------------

def reference(loss, splits, dtype_name, options, upstream, problem=None):
    """(loss, gradient) of the single-process reference in float64 on the same (upcast) inputs."""
    student, args, target = build(loss, splits, dtype_name, **(problem or {}))
    x = student.detach().double().requires_grad_()
    args = tuple(a.double() if a.is_floating_point() else a for a in args)
    out = getattr(kdfast, loss)(x, *args, target, backend="reference", **options)
    weight = upstream_of(upstream, options.get("reduction", "batchmean"), F64)
    grad, = torch.autograd.grad(out, x, torch.ones_like(out) if weight is None else weight.expand_as(out))
    return out.detach(), grad


def check(pool, loss, options, *, splits=None, dtype="f64", upstream=3.0, problem=None, start_mode="explicit"):
    splits = splits[pool.world_size] if isinstance(splits, dict) else (splits or SPLITS[pool.world_size])
    results = pool.run(loss_task, loss, splits, dtype, options, upstream, problem, start_mode)
    want_loss, want_grad = reference(loss, splits, dtype, options, upstream, problem)
    loss_tol, grad_tol = tolerance(DTYPES[dtype])
    what = f"{loss} {options} P={pool.world_size} {splits} {dtype}"
    for rank, result in enumerate(results):
        got = result["loss"]
        assert got.dtype == (F64 if dtype == "f64" else F32), f"{what}: loss dtype {got.dtype}"
        assert_matches(got, want_loss.to(got.dtype), loss_tol, f"{what}: rank {rank} loss", per_entry=True)
        assert result["grad"].dtype == DTYPES[dtype], f"{what}: grad dtype {result['grad'].dtype}"
        assert result["grad"].shape[-1] == splits[rank]
    grad = torch.cat([r["grad"] for r in results], dim=-1)
    assert_matches(grad, want_grad, grad_tol, f"{what}: gradient", per_entry=False)
    check_collectives(results, expected_ops(loss, options), what)
    return results, (want_loss, want_grad)


def check_collectives(results, ops, what):
    for rank, result in enumerate(results):
        assert result["forward"] == [("all_reduce", op) for op in ops], \
            f"{what}: rank {rank} issued {result['forward']}, expected all_reduce {ops}"
        assert result["backward"] == [], f"{what}: rank {rank}: collectives in the backward: {result['backward']}"
        if "records" in result:
            assert [r[0] for r in result["records"]] == ops, \
                f"{what}: record_collectives() says {result['records']}, torch.distributed saw {result['forward']}"


# --- dense divergences ----------------------------------------------------------------------------

FORMS = [
    pytest.param(dict(divergence="forward_kl"), id="forward_kl"),
    pytest.param(dict(divergence="reverse_kl"), id="reverse_kl"),
    pytest.param(dict(divergence="mixed_kl", mixed_kl_weight=0.3), id="mixed_kl"),
    pytest.param(dict(divergence="jsd", beta=0.3), id="jsd0.3"),
    pytest.param(dict(divergence="jsd", beta=0.0), id="jsd0"),
    pytest.param(dict(divergence="jsd", beta=1.0), id="jsd1"),
    pytest.param(dict(divergence="tvd"), id="tvd"),
    pytest.param(dict(divergence="skew_forward_kl", skew_alpha=0.2), id="skew_forward_kl"),
    pytest.param(dict(divergence="skew_reverse_kl", skew_alpha=0.2), id="skew_reverse_kl"),
]
VARIANTS = {
    "plain": dict(),
    "ce_T2": dict(alpha=0.6, temperature=2.0, t2_scaling=True),
    "transforms": dict(alpha=0.8, temperature=0.7, student_softcap=5.0, student_logit_scale=1.3,
                       teacher_softcap=9.0, teacher_logit_scale=0.8),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("form", FORMS)
def test_divergence_forms_fp64(pool, form, variant):
    """Every form, with/without the CE term (labels on every rank and the last column), T ≠ 1, T²,
    softcaps and scales; reduction "none" with a random weight per row."""
    check(pool, "divergence_loss", dict(form, reduction="none", **VARIANTS[variant]), upstream="random")


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
@pytest.mark.parametrize("form", FORMS)
def test_divergence_forms_low_precision(pool, form, dtype):
    check(pool, "divergence_loss", dict(form, reduction="none", **VARIANTS["transforms"]), dtype=dtype,
          upstream="random")


@pytest.mark.parametrize("dtype", ["f64", "f32", "bf16"])
@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_kd_loss(pool, alpha, dtype):
    check(pool, "kd_loss", dict(alpha=alpha, temperature=3.0), dtype=dtype, upstream=None if dtype == "f32" else 3.0)


REDUCTIONS = [
    pytest.param(dict(reduction="none"), "random", id="none"),
    pytest.param(dict(reduction="sum"), 3.0, id="sum"),
    pytest.param(dict(reduction="mean"), 3.0, id="mean"),
    pytest.param(dict(reduction="batchmean"), None, id="batchmean"),
    pytest.param(dict(reduction="batchmean", num_items_in_batch=5), 3.0, id="num_items_int"),
    pytest.param(dict(reduction="batchmean", num_items_in_batch=torch.tensor(6.5, dtype=F64)), -2.0,
                 id="num_items_tensor"),
]


@pytest.mark.parametrize("options, upstream", REDUCTIONS)
@pytest.mark.parametrize("loss, form", [
    ("divergence_loss", dict(divergence="forward_kl", alpha=0.7)),
    ("divergence_loss", dict(divergence="jsd", beta=0.3, alpha=0.7)),
    ("topk_divergence_loss", dict(tail="bucket", alpha=0.7)),
    ("skd_loss", dict(alpha=0.7)),
], ids=["forward_kl", "jsd", "topk_bucket", "skd"])
def test_reductions(pool, loss, form, options, upstream):
    """Every reduction and num_items_in_batch (number, 0-dim tensor), grad_output ≠ 1."""
    check(pool, loss, dict(form, **options), upstream=upstream)


@pytest.mark.parametrize("splits", ["skewed", "equal"])
@pytest.mark.parametrize("loss, options", [
    ("divergence_loss", dict(divergence="forward_kl", alpha=0.6)),
    ("divergence_loss", dict(divergence="tvd", alpha=0.6)),
    ("divergence_loss", dict(divergence="skew_reverse_kl", alpha=0.6, temperature=2.0)),
    ("topk_divergence_loss", dict(tail="renormalize", alpha=0.6)),
    ("topk_divergence_loss", dict(tail="renormalize_both")),
    ("skd_loss", dict(alpha=0.6)),
], ids=["forward_kl", "tvd", "skew_reverse_kl", "topk_renormalize", "topk_renormalize_both", "skd"])
def test_other_splits(pool, loss, options, splits):
    """Very uneven shards (a rank with a single column), and equal shards with
    vocab_start_index=None (start = rank·V_r)."""
    table = {"skewed": SKEWED, "equal": EQUAL}[splits]
    check(pool, loss, dict(options, reduction="none"), splits=table, upstream="random",
          start_mode="none" if splits == "equal" else "explicit")


# --- NaN rows ------------------------------------------------------------------------------------

@pytest.mark.parametrize("loss, options", [
    ("divergence_loss", dict(divergence="forward_kl", alpha=0.6)),
    ("divergence_loss", dict(divergence="mixed_kl")),
    ("divergence_loss", dict(divergence="jsd", beta=0.3)),
    ("divergence_loss", dict(divergence="tvd")),
    ("divergence_loss", dict(divergence="skew_reverse_kl")),
    ("kd_loss", dict()),
    ("skd_loss", dict(alpha=0.6)),
    ("topk_divergence_loss", dict(tail="renormalize")),
    ("topk_divergence_loss", dict(tail="renormalize_both")),
    ("topk_divergence_loss", dict(tail="bucket", divergence="jsd")),
], ids=["forward_kl", "mixed_kl", "jsd", "tvd", "skew_reverse_kl", "kd", "skd", "topk_renormalize",
        "topk_renormalize_both", "topk_bucket"])
def test_nan_in_one_shard(pool, loss, options):
    """A NaN in one rank's shard of a row (student row 0 in the last shard; teacher row 4 in the
    first): that row's loss is NaN on every rank and its whole gradient row NaN on every rank (the
    ranks without the NaN too); the other rows are unaffected."""
    results, (want_loss, _) = check(pool, loss, dict(options, reduction="none"), upstream="random",
                                    problem=dict(nan=True))
    nan_rows = [0] if loss == "topk_divergence_loss" else [0, 4]
    for rank, result in enumerate(results):
        flat = result["loss"].reshape(-1)
        assert flat[nan_rows].isnan().all() and not flat[[r for r in range(8) if r not in nan_rows]].isnan().any()
        grad = result["grad"].reshape(8, -1)
        if grad.shape[-1]:
            assert grad[nan_rows].isnan().all(), f"rank {rank}: NaN row's gradient shard is not wholly NaN"
            assert not grad[[r for r in range(8) if r not in nan_rows]].isnan().any()
    assert want_loss.reshape(-1)[nan_rows].isnan().all()
    grad = torch.cat([r["grad"] for r in results], dim=-1)
    assert_nan_rows_whole(results[0]["loss"], grad, f"{loss} {options}")


# --- SKD ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("alpha", [1.0, 0.7])
@pytest.mark.parametrize("normalize", ["layernorm", "l2", "standardize"])
def test_skd(pool, normalize, alpha):
    check(pool, "skd_loss", dict(normalize=normalize, alpha=alpha, reduction="none"), upstream="random")
    check(pool, "skd_loss", dict(normalize=normalize, alpha=alpha, temperature=2.0, multiplier=1.5))


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
@pytest.mark.parametrize("normalize", ["layernorm", "l2", "standardize"])
def test_skd_low_precision(pool, normalize, dtype):
    check(pool, "skd_loss", dict(normalize=normalize, alpha=0.7, reduction="none"), dtype=dtype, upstream="random")


@pytest.mark.parametrize("normalize", ["layernorm", "l2", "standardize"])
def test_skd_minus_inf_row_is_nan(pool, normalize):
    """A −inf makes an SKD row NaN by definition: on every rank, as the single-process loss."""
    results, (want_loss, _) = check(pool, "skd_loss", dict(normalize=normalize, reduction="none"),
                                    upstream="random", problem=dict(skd_inf=True))
    assert want_loss.reshape(-1)[5].isnan()
    for result in results:
        flat = result["loss"].reshape(-1)
        assert flat[5].isnan() and not flat[[0, 1, 2, 3, 4, 6, 7]].isnan().any()


# --- top-k ----------------------------------------------------------------------------------------

TOPK_FORMS = {
    "renormalize-forward_kl": dict(tail="renormalize"),
    "renormalize-reverse_kl": dict(tail="renormalize", divergence="reverse_kl", reverse_kl_floor=-100.0),
    "renormalize-mixed_kl": dict(tail="renormalize", divergence="mixed_kl", mixed_kl_weight=0.3,
                                 reverse_kl_floor=-100.0),
    "renormalize-jsd": dict(tail="renormalize", divergence="jsd", beta=0.3),
    "renormalize_both-forward_kl": dict(tail="renormalize_both"),
    "renormalize_both-reverse_kl": dict(tail="renormalize_both", divergence="reverse_kl"),
    "renormalize_both-mixed_kl": dict(tail="renormalize_both", divergence="mixed_kl", mixed_kl_weight=0.3),
    "renormalize_both-jsd": dict(tail="renormalize_both", divergence="jsd", beta=0.3),
    "bucket-forward_kl": dict(tail="bucket"),
    "bucket-reverse_kl": dict(tail="bucket", divergence="reverse_kl"),
    "bucket-mixed_kl": dict(tail="bucket", divergence="mixed_kl", mixed_kl_weight=0.3),
    "bucket-jsd": dict(tail="bucket", divergence="jsd", beta=0.3),
    "truncate-forward_kl": dict(tail="truncate"),
}
TOPK_VARIANTS = {
    "plain": dict(temperature=1.5),                      # T = T_gen (the log-probs are stored at 1.5)
    "ce_T2_softcap": dict(alpha=0.7, temperature=1.5, t2_scaling=True, student_softcap=5.0,
                          student_logit_scale=1.2),
    "retempered": dict(alpha=0.8, temperature=2.0, teacher_temperature=1.5),
}


@pytest.mark.parametrize("form, variant", [
    pytest.param(form, variant, id=f"{name}-{variant}")
    for name, form in TOPK_FORMS.items() for variant in TOPK_VARIANTS
    if not (variant == "retempered" and form["tail"] in ("bucket", "truncate"))  # they need T_gen = T
])
def test_topk(pool, form, variant):
    """Every tail × divergence, padding entries, indices owned by every rank (and the last column)."""
    check(pool, "topk_divergence_loss", dict(form, reduction="none", **TOPK_VARIANTS[variant]), upstream="random")


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
@pytest.mark.parametrize("tail", ["renormalize", "renormalize_both", "bucket", "truncate"])
def test_topk_low_precision(pool, tail, dtype):
    check(pool, "topk_divergence_loss", dict(tail=tail, alpha=0.7, temperature=1.5), dtype=dtype)


# --- DTensor --------------------------------------------------------------------------------------

@pytest.mark.parametrize("loss, options, upstream", [
    ("kd_loss", dict(alpha=0.5), None),
    ("divergence_loss", dict(divergence="jsd", beta=0.3, alpha=0.6, reduction="none"), "random"),
    ("skd_loss", dict(), 3.0),
    ("topk_divergence_loss", dict(tail="renormalize", alpha=0.7, temperature=1.5), 3.0),
], ids=["kd", "jsd", "skd", "topk"])
def test_dtensor(pool, loss, options, upstream):
    """Logits as DTensors sharded on the vocabulary by torch (V = 11: uneven last shard): the loss
    equals the reference and .grad is a DTensor with the same placements whose full_tensor()
    equals the reference gradient."""
    results = pool.run(dtensor_task, loss, "f64", options, upstream)
    want_loss, want_grad = reference(loss, dtensor_splits(pool.world_size), "f64", options, upstream)
    loss_tol, grad_tol = tolerance(F64)
    widths = [r["local_width"] for r in results]
    assert tuple(widths) == dtensor_splits(pool.world_size) and len(set(widths)) == 2, \
        f"torch's chunking gave {widths}: not uneven"
    for rank, result in enumerate(results):
        assert_matches(result["loss"], want_loss, loss_tol, f"{loss} DTensor rank {rank} loss", per_entry=True)
        assert result["is_dtensor"], f"rank {rank}: .grad is not a DTensor"
        assert result["grad_placements"] == result["placements"]
        assert result["grad_local"].shape[-1] == widths[rank]
        assert_matches(result["grad"], want_grad, grad_tol, f"{loss} DTensor rank {rank} grad", per_entry=False)
    check_collectives(results, expected_ops(loss, options), f"{loss} DTensor")


# --- collectives ----------------------------------------------------------------------------------

@pytest.mark.parametrize("loss, options, count", [
    ("divergence_loss", dict(divergence="forward_kl"), 2),
    ("divergence_loss", dict(divergence="reverse_kl", alpha=0.5), 2),
    ("divergence_loss", dict(divergence="mixed_kl"), 2),
    ("kd_loss", dict(alpha=0.5), 2),
    ("divergence_loss", dict(divergence="jsd", beta=0.3), 3),
    ("divergence_loss", dict(divergence="tvd", alpha=0.5), 3),
    ("divergence_loss", dict(divergence="skew_forward_kl"), 3),
    ("divergence_loss", dict(divergence="skew_reverse_kl"), 3),
    ("skd_loss", dict(normalize="l2"), 3),
    ("topk_divergence_loss", dict(tail="truncate"), 2),
    ("topk_divergence_loss", dict(tail="renormalize_both", alpha=0.5), 2),
    ("topk_divergence_loss", dict(tail="renormalize_both"), 1),
], ids=lambda v: v if isinstance(v, str) else None)
def test_collective_count(pool, loss, options, count):
    """The table of kdfast/parallel/vocab.py, written out: all-reduces per call (MAX + SUM = 2,
    MAX + SUM + SUM = 3, top-k renormalize_both with α = 1: SUM only), none in the backward, and
    record_collectives() agrees with torch.distributed (checked by every test through check())."""
    results, _ = check(pool, loss, options)
    for result in results:
        assert len(result["forward"]) == count and len(result["records"]) == count
        # O(rows) values per collective: [8 rows, a few sums], never the [rows, V] logits
        assert all(shape[0] == 8 and len(shape) <= 2 for _, shape, _ in result["records"]), result["records"]


# --- errors ---------------------------------------------------------------------------------------

def test_errors(pool):
    messages = pool.run(errors_task)
    for rank, found in enumerate(messages):
        assert "vocab_parallel_group" in found["start_without_group"]
        assert "vocab_parallel_group" in found["kd_start_without_group"]
        for name in ("float", "tensor", "bool", "negative"):
            assert "vocab_start_index" in found[f"start_{name}"], (rank, name, found[f"start_{name}"])
        assert "target" in found["label_out_of_vocab"] and "11" in found["label_out_of_vocab"]
        assert "target" in found["label_out_of_vocab_kd"]
        assert "teacher_topk_indices" in found["topk_index_out_of_vocab"]
        assert "teacher_logits" in found["plain_student_dtensor_teacher"]
        assert "vocab_start_index" in found["dtensor_with_start"]


def test_dtensor_student_with_plain_local_teacher(pool):
    """A DTensor student with a plain teacher whose shape happens to equal the student's local
    shard is ambiguous (the full teacher or a shard?) and must raise like the reverse mix."""
    assert pool.run(dtensor_plain_local_teacher_task) == [True] * pool.world_size


# --- undefined rows -------------------------------------------------------------------------------

def _undefined_param(loss, options, id):
    return pytest.param(loss, options, id=id)


@pytest.mark.parametrize("loss, options", [
    _undefined_param("divergence_loss", dict(divergence="forward_kl"), "forward_kl"),
    _undefined_param("divergence_loss", dict(divergence="forward_kl", alpha=0.5), "forward_kl-ce"),
    _undefined_param("kd_loss", dict(), "kd"),
    _undefined_param("divergence_loss", dict(divergence="reverse_kl"), "reverse_kl"),
    _undefined_param("divergence_loss", dict(divergence="mixed_kl"), "mixed_kl"),
    _undefined_param("divergence_loss", dict(divergence="jsd", beta=0.3, alpha=0.5), "jsd-ce"),
    _undefined_param("divergence_loss", dict(divergence="tvd"), "tvd"),
    _undefined_param("divergence_loss", dict(divergence="skew_forward_kl"), "skew_forward_kl"),
    _undefined_param("divergence_loss", dict(divergence="skew_reverse_kl"), "skew_reverse_kl"),
    _undefined_param("topk_divergence_loss", dict(tail="renormalize"), "topk_renormalize"),
    _undefined_param("topk_divergence_loss", dict(tail="renormalize_both", alpha=0.5), "topk_renormalize_both"),
    _undefined_param("topk_divergence_loss", dict(tail="bucket"), "topk_bucket"),
])
def test_undefined_rows(pool, loss, options):
    """Rows whose student (row 5), teacher (row 6) or both (row 7) are wholly −inf: NaN loss and a
    wholly NaN gradient row, as the reference; the other rows unaffected."""
    results, (want_loss, _) = check(pool, loss, dict(options, reduction="none"), upstream="random",
                                    problem=dict(undefined=True))
    grad = torch.cat([r["grad"] for r in results], dim=-1)
    assert want_loss.reshape(-1)[5].isnan()
    assert_nan_rows_whole(results[0]["loss"], grad, f"{loss} {options}")


@pytest.mark.parametrize("tail", ["renormalize", "renormalize_both", "bucket", "truncate"])
def test_topk_nan_logprob(pool, tail):
    """A NaN teacher log-prob (row 1): that row's loss and whole gradient row NaN, as the reference."""
    results, (want_loss, _) = check(pool, "topk_divergence_loss", dict(tail=tail, reduction="none"),
                                    upstream="random", problem=dict(topk_nan=True))
    assert want_loss.reshape(-1)[1].isnan()


def test_empty_shard(pool):
    """Splits with an empty shard ((0, 11), (6, 0, 5)) equal the reference."""
    splits = EMPTY[pool.world_size]
    loss, options = "divergence_loss", dict(divergence="jsd", beta=0.3, alpha=0.6, reduction="none")
    results = pool.run(guarded_loss_task, loss, splits, "f64", options, "random")
    errors = {rank: r["error"] for rank, r in enumerate(results) if "error" in r}
    assert not errors, f"splits {splits}: {errors}"
    want_loss, want_grad = reference(loss, splits, "f64", options, "random")
    for result in results:
        assert_matches(result["loss"], want_loss, tolerance(F64)[0], "loss", per_entry=True)
    assert_matches(torch.cat([r["grad"] for r in results], dim=-1), want_grad, tolerance(F64)[1], "grad",
                   per_entry=False)


# --- chunks of rows -------------------------------------------------------------------------------

def chunked_loss_task(rank, world, *args, chunk_elements=8):
    """``loss_task`` with the engine's chunk of rows shrunk to a few rows (the default holds every
    row of these small problems in one chunk)."""
    from kdfast.parallel import vocab
    saved = vocab.CHUNK_ELEMENTS
    vocab.CHUNK_ELEMENTS = chunk_elements
    try:
        return loss_task(rank, world, *args)
    finally:
        vocab.CHUNK_ELEMENTS = saved


@pytest.mark.parametrize("loss, options", [
    ("kd_loss", dict(alpha=0.5, temperature=2.0)),
    ("divergence_loss", dict(divergence="jsd", beta=0.3, alpha=0.7)),
    ("skd_loss", dict(normalize="layernorm", alpha=0.7)),
    ("topk_divergence_loss", dict(tail="bucket", alpha=0.6)),
], ids=["kd", "jsd", "skd", "topk"])
def test_chunked_rows_equal_the_reference_with_the_same_collectives(pool, loss, options):
    """Rows split into chunks of 1–2 rows: the same loss and gradient, and still one collective per
    level (the chunks are joined before each all-reduce)."""
    splits = SPLITS[pool.world_size]
    options = dict(options, reduction="none")
    results = pool.run(chunked_loss_task, loss, splits, "f64", options, "random")
    want_loss, want_grad = reference(loss, splits, "f64", options, "random")
    for result in results:
        assert_matches(result["loss"], want_loss, tolerance(F64)[0], "loss", per_entry=True)
    assert_matches(torch.cat([r["grad"] for r in results], dim=-1), want_grad, tolerance(F64)[1], "grad",
                   per_entry=False)
    check_collectives(results, expected_ops(loss, options), f"{loss} chunked")


# --- the loss alone -------------------------------------------------------------------------------

def no_grad_loss_task(rank, world, loss, splits, dtype_name, options):
    """This rank's loss under torch.no_grad (no Jacobian sums travel) and its collectives."""
    student, args, target = build(loss, splits, dtype_name)
    start = sum(splits[:rank])
    stop = start + splits[rank]
    with torch.no_grad(), count_collectives() as forward:
        out = getattr(kdfast, loss)(student[..., start:stop], *shard_args(loss, args, start, stop), target,
                                    vocab_parallel_group=dist.group.WORLD, vocab_start_index=start, **options)
    return dict(loss=out, forward=forward)


@pytest.mark.parametrize("loss, options", [
    ("kd_loss", dict(alpha=0.5)),
    ("divergence_loss", dict(divergence="jsd", beta=0.3)),
    ("divergence_loss", dict(divergence="tvd")),
    ("skd_loss", dict(normalize="standardize", alpha=0.7)),
    ("topk_divergence_loss", dict(tail="bucket")),
], ids=["kd", "jsd", "tvd", "skd", "topk"])
def test_loss_without_gradient(pool, loss, options):
    """Under torch.no_grad (evaluation) the two-level forms send no Jacobian sums: the same loss as
    the reference with the same collectives."""
    splits = SPLITS[pool.world_size]
    options = dict(options, reduction="none")
    results = pool.run(no_grad_loss_task, loss, splits, "f64", options)
    want_loss, _ = reference(loss, splits, "f64", options, "random")
    for result in results:
        assert_matches(result["loss"], want_loss, tolerance(F64)[0], "loss", per_entry=True)
    check_collectives([dict(r, backward=[]) for r in results], expected_ops(loss, options), f"{loss} no_grad")
