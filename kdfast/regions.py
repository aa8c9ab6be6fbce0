"""L2RKD's locally linear regions (spec §5a): points on segments between pairs of training inputs."""
from __future__ import annotations

from typing import Optional

import torch

from . import _checks


def _sample_beta(concentration: float, size: int, generator: Optional[torch.Generator]) -> torch.Tensor:
    """λ ~ Beta(a, a) on the CPU. torch.distributions takes no generator, so draw under a forked
    global RNG seeded from ``generator``: the same generator state gives the same λ."""
    if generator is None:
        return torch.distributions.Beta(concentration, concentration).sample((size,))
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.distributions.Beta(concentration, concentration).sample((size,))


def l2rkd_mix(inputs: torch.Tensor, *, alpha: float = 1.0, lam_min: Optional[float] = None,
              generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mix every input with a random partner from the same batch.

    Returns ``(mixed_inputs, permutation, lam)`` with ``mixed[i] = lam[i]·inputs[i] +
    (1 − lam[i])·inputs[permutation[i]]``. ``lam`` has one value per row, drawn from
    Beta(alpha, alpha), or from U[lam_min, 1] when ``lam_min`` is given. Draws use ``generator``
    (a CPU ``torch.Generator``) so a run can be replayed; the teacher is then evaluated at the
    mixed inputs. No gradient is needed through the mixing (inputs are data).
    """
    _checks.tensor("inputs", inputs, min_ndim=1)
    _checks.positive("alpha", alpha)
    if lam_min is not None:
        _checks.in_unit_interval("lam_min", lam_min)
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(f"generator must be a CPU torch.Generator, got one on {generator.device}")
    batch = inputs.shape[0]
    permutation = torch.randperm(batch, generator=generator)
    if lam_min is None:
        lam = _sample_beta(alpha, batch, generator)
    else:
        lam = lam_min + (1 - lam_min) * torch.rand(batch, generator=generator)
    permutation = permutation.to(inputs.device)
    lam = lam.to(device=inputs.device, dtype=inputs.dtype)
    weight = lam.reshape(batch, *([1] * (inputs.dim() - 1)))
    mixed = weight * inputs + (1 - weight) * inputs[permutation]
    return mixed, permutation, lam
