"""ClassCenters: per-class means in fp32, ignore_index, empty classes, and a 2-process gloo group
that must give the single-process result."""
import os
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import kdfast

NUM_CLASSES, DIM = 5, 3


def data(n=40, seed=0):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(n, DIM, generator=generator)
    target = torch.randint(0, NUM_CLASSES, (n,), generator=generator)
    target[:NUM_CLASSES] = torch.arange(NUM_CLASSES)  # every class present
    return features, target


def test_means_match_a_per_class_numpy_mean():
    features, target = data()
    target[7] = -100
    centres = kdfast.ClassCenters(NUM_CLASSES, DIM)
    for chunk in range(0, 40, 9):  # uneven batches
        centres.update(features[chunk:chunk + 9].half(), target[chunk:chunk + 9])
    table = centres.compute()
    assert table.dtype == torch.float32
    f, t = features.half().float().numpy(), target.numpy()
    expected = np.stack([f[t == k].mean(0) for k in range(NUM_CLASSES)])
    np.testing.assert_allclose(table.numpy(), expected, rtol=1e-6, atol=1e-6)
    assert centres.counts.sum().item() == 39


def test_empty_classes_raise_or_are_zero_never_nan():
    centres = kdfast.ClassCenters(NUM_CLASSES, DIM)
    centres.update(torch.randn(4, DIM), torch.tensor([0, 0, 2, 2]))
    assert centres.empty_classes() == [1, 3, 4]
    with pytest.raises(ValueError, match=r"3 of 5 classes received no sample.*1, 3, 4"):
        centres.compute()
    table = centres.compute(empty="zero")
    assert torch.isfinite(table).all() and table[[1, 3, 4]].abs().sum() == 0


def test_update_errors():
    centres = kdfast.ClassCenters(NUM_CLASSES, DIM)
    with pytest.raises(ValueError, match="features"):
        centres.update(torch.randn(4, DIM + 1), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"target .*found 5"):
        centres.update(torch.randn(2, DIM), torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="num_classes"):
        kdfast.ClassCenters(0, DIM)


def _rank_main(rank, world_size, init_file, result_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        features, target = data()
        centres = kdfast.ClassCenters(NUM_CLASSES, DIM)
        centres.update(features[rank::world_size], target[rank::world_size])  # each rank sees half the data
        table = centres.compute()
        # the local state is not changed by the all-reduce, so computing twice gives the same table
        torch.testing.assert_close(centres.compute(), table)
        if rank == 0:
            torch.save(table, result_file)
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_equals_single_process():
    features, target = data()
    single = kdfast.ClassCenters(NUM_CLASSES, DIM)
    single.update(features, target)
    with tempfile.TemporaryDirectory() as folder:
        init_file, result_file = os.path.join(folder, "init"), os.path.join(folder, "table.pt")
        mp.spawn(_rank_main, args=(2, init_file, result_file), nprocs=2, join=True)
        distributed = torch.load(result_file)
    torch.testing.assert_close(distributed, single.compute(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cast", [lambda m: m.half(), lambda m: m.to(torch.bfloat16), lambda m: m.double()])
def test_sums_stay_fp32_whatever_the_module_dtype(cast):
    """A dtype cast of the module must not round the sums (fp16 turned a sum of 100,333 into inf)."""
    centres = kdfast.ClassCenters(2, 3)
    centres.update(torch.full((1, 3), 100333.0), torch.tensor([0]))
    centres.update(torch.full((1, 3), 1.0 + 2**-20), torch.tensor([1]))
    before = centres.sums.clone()
    cast(centres)
    assert centres.sums.dtype == torch.float32 and centres.counts.dtype == torch.int64
    assert torch.equal(centres.sums, before)
    module = torch.nn.Sequential(kdfast.ClassCenters(2, 3)).half()
    assert module[0].sums.dtype == torch.float32
