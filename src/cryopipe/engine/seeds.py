"""Per-particle random numbers that do not depend on how particles are grouped (issues 14 item 3, 15 item 1).

Every random draw made for one particle in one iteration comes from its own generator, seeded by a 64-bit hash
of ``(run seed, iteration, particle index, stream)``. A particle therefore gets the same numbers whatever the
batch size, the order of the batches, the worker that handles it or the device (the draws are made on the CPU
with torch's Mersenne Twister and then moved), so a run is reproducible from ``--random_seed`` alone and a
distributed run equals the in-process one.

``stream`` separates independent uses within an iteration (e.g. the background noise fill of the E-step and that
of the initial noise spectra), so they do not share numbers.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["NOISE_FILL", "NOISE_FILL_INITIAL", "particle_seeds", "particle_normal"]

#: stream of the E-step's background noise fill (``mask_images`` without ``--zero_mask``)
NOISE_FILL = 1
#: stream of the noise fill used for the initial noise spectra / initial references (iteration 0)
NOISE_FILL_INITIAL = 2

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on ``uint64`` arrays (wrap-around arithmetic): a bijective 64-bit mix."""
    with np.errstate(over="ignore"):
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def particle_seeds(seed: int, iteration: int, indices: np.ndarray, stream: int = NOISE_FILL) -> np.ndarray:
    """64-bit seeds ``[B] uint64`` for particles ``indices [B]`` (0-based positions in the particle table) in
    ``iteration`` of a run with ``--random_seed seed``; a pure function of its arguments."""
    idx = np.asarray(indices, dtype=np.int64).astype(np.uint64)
    z = _splitmix64(np.full(idx.shape, np.uint64(int(seed) & 0xFFFFFFFFFFFFFFFF), dtype=np.uint64))
    z = _splitmix64(z ^ np.uint64(int(iteration) & 0xFFFFFFFFFFFFFFFF))
    z = _splitmix64(z ^ np.uint64(int(stream) & 0xFFFFFFFFFFFFFFFF))
    return _splitmix64(z ^ idx)


def particle_normal(seeds: np.ndarray, shape: tuple[int, ...], device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal draws ``[B, *shape]``: row ``b`` from a CPU generator seeded with ``seeds[b]`` (so each row
    is the same whatever else is drawn, on any device), moved to ``device``."""
    seeds = np.asarray(seeds, dtype=np.uint64).reshape(-1)
    out = torch.empty((seeds.size, *shape), dtype=torch.float32)
    gen = torch.Generator()
    for b, sd in enumerate(seeds.tolist()):
        gen.manual_seed(int(sd))
        torch.randn(shape, generator=gen, out=out[b])
    return out.to(device=device, dtype=dtype)
