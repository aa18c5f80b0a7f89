"""The unit of work of ``cryopipe reconstruct`` as a pure function (issue 15 item 1).

:func:`backproject_rows` inserts a contiguous range of the selected particles (known angles, origins, optional
CTF) into a fresh :class:`~cryopipe.core.backprojector.BackProjector` and returns its additive sums. Chunks can run
in any order, in this process or on Dask workers (:mod:`cryopipe.engine.backend`); adding their sums in chunk
order gives the in-process statistics (up to float summation order).

Units: pixels (origins at the image's pixel size, rescaled to the output box), Å, degrees (RELION Euler angles).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from cryopipe.core.backprojector import BackProjector
from cryopipe.core.ctf import ctf_2d
from cryopipe.core.fourier import fourier_rescale, phase_shift_2d, rfft2_centered
from cryopipe.core.geometry import euler_to_matrix

__all__ = ["ReconstructInputs", "BackProjectionSums", "backproject_rows", "new_backprojector"]


@dataclass
class ReconstructInputs:
    """What every chunk needs (sent once; image *names* and a root directory, not pixels).

    Attributes:
        image_names: ``[M]`` ``rlnImageName`` values of the selected particles; root_dir: what they are relative to.
        angles: ``[M, 3]`` rot, tilt, psi (degrees); origins: ``[M, 2]`` origins (pixels of the input images).
        ctf: per-particle CTF parameters of the selected particles (``ctf_parameters`` keys, ``[M]`` each) or None.
        n_img, n_out: input image and output box (pixels); apix_out: output pixel size (Å).
        pad: padding factor; r_max: highest frequency inserted (Fourier pixels of the output box) or None.
        batch_size: images read and inserted at once.
    """

    image_names: np.ndarray
    root_dir: str
    angles: np.ndarray
    origins: np.ndarray
    ctf: dict | None
    n_img: int
    n_out: int
    apix_out: float
    pad: int
    r_max: float | None
    batch_size: int
    _reader: object = field(default=None, repr=False, compare=False)

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_reader"] = None  # a worker opens its own memory maps
        return d

    @property
    def size(self) -> int:
        return int(len(self.image_names))

    def reader(self):
        if self._reader is None:
            from cryopipe.io.mrc import ImageReader

            self._reader = ImageReader(self.image_names, root_dir=self.root_dir)
        return self._reader


@dataclass
class BackProjectionSums:
    """Additive back-projection statistics: ``data`` (complex) and ``weight`` (real) on the padded half grid."""

    data: torch.Tensor
    weight: torch.Tensor


def new_backprojector(inputs: ReconstructInputs, device) -> BackProjector:
    """An empty back-projector of the run's set-up on ``device``."""
    return BackProjector(inputs.n_out, pad=inputs.pad, r_max=inputs.r_max, device=device)


def backproject_rows(inputs: ReconstructInputs, snapshot, rows: tuple[int, int], device=None,
                     into: BackProjector | None = None) -> BackProjectionSums | BackProjector:
    """Insert the selected particles ``rows = (start, stop)`` (positions in ``inputs``) in batches; ``snapshot``
    is unused (reconstruction has no model). Returns the chunk's :class:`BackProjectionSums`, or ``into`` with
    the chunk added when given (the in-process loop)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    bp = into if into is not None else new_backprojector(inputs, dev)
    reader = inputs.reader()
    n_img, n_out = inputs.n_img, inputs.n_out
    start, stop = int(rows[0]), int(rows[1])
    for s0 in range(start, stop, max(1, int(inputs.batch_size))):
        sl = slice(s0, min(s0 + int(inputs.batch_size), stop))
        imgs = torch.from_numpy(reader.read(np.arange(sl.start, sl.stop))).to(dev)
        if n_out != n_img:
            imgs = fourier_rescale(imgs, n_out)
        ft = rfft2_centered(imgs)
        # undo the particle's origin: the observation is the prediction shifted by -origin
        shifts = torch.from_numpy(inputs.origins[sl] * (n_out / n_img)).to(dev, torch.float32)
        ft = phase_shift_2d(ft, shifts, n_out)
        rot = euler_to_matrix(*[torch.from_numpy(inputs.angles[sl, i]).to(dev, torch.float32) for i in range(3)])
        c = None
        if inputs.ctf is not None:
            p = {k: torch.from_numpy(np.asarray(v)[sl]).to(dev, torch.float32) for k, v in inputs.ctf.items()}
            c = ctf_2d(n_out, inputs.apix_out, p["defocus_u"], p["defocus_v"], p["defocus_angle"],
                       voltage=p["voltage"], cs=p["cs"], amplitude_contrast=p["amplitude_contrast"],
                       phase_shift=p["phase_shift"], bfactor=p["bfactor"], scale=p["scale"])
        bp.insert(ft, rot, ctf=c, zero_dc=True)
    if into is not None:
        return bp
    return BackProjectionSums(bp.data, bp.weight)
