"""kdfast's benchmark suite: ``python -m benchmarks`` (see ``python -m benchmarks --help``).

Three kernel families (row-softmax, feature–centre, landmark-Gram), each loss timed for every
provider available on the device — the plain-PyTorch reference eager and under ``torch.compile``,
each fused kdfast backend, Liger-Kernel where it applies — in the modes forward, backward and full,
with peak memory and, for memory-bound families, achieved bandwidth against the device's measured
copy bandwidth. Results go to ``benchmarks/results/`` as CSV, markdown and PNG.

Modules: one per family (:mod:`.rowsoftmax`, :mod:`.feature_centre`, :mod:`.landmark_gram`), the
shared helpers (:mod:`.timing`, :mod:`.memory`, :mod:`.roofline`, :mod:`.providers`), the run
loop (:mod:`.suite`) and the writers (:mod:`.report`).
"""
