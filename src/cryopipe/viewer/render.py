"""PNG images made on demand from MRC files, cached outside the project.

* micrographs: binned to at most ``max_size`` pixels a side (block mean), low-pass filtered (Gaussian in
  Fourier space, amplitude 1/2 at ``lowpass_A`` Å), grey levels mean ± 3 σ;
* 2D images (class averages, stack images): up-scaled (bicubic) to at least ``min_size`` pixels;
* volumes: a central (or chosen) slice or the sum along an axis; grey levels from the 0.5 / 99.5 percentiles;
* maps for the isosurface viewer: volumes larger than ``max_voxels`` a side are block-averaged to fit
  (written as MRC into the cache).

Image orientation: row 0 of the array is the top row of the PNG (RELION's display and the pick coordinates:
x = column, y = row). Volume axes: ``z`` slices are ``[y, x]`` images, ``y`` slices ``[z, x]``, ``x`` slices
``[z, y]``.

The cache (:class:`RenderCache`) keys every image by the source file's path, modification time and size plus
the rendering parameters, so a map that a running job rewrites is rendered again. It lives in a folder outside
the project (see :func:`default_cache_dir`) and is pruned to ``max_bytes`` (oldest files first).
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np

from cryopipe.io.mrc import MrcStack, mrc_info
from cryopipe.viewer.files import file_key, is_inside

__all__ = ["RenderCache", "default_cache_dir", "to_png", "micrograph_png", "image_png", "volume_png",
           "isosurface_map", "bin_image"]


def default_cache_dir(project_root: str | os.PathLike) -> Path:
    """``$XDG_CACHE_HOME/cryopipe/viewer/<hash of the project path>`` (``~/.cache`` by default), or the same
    under the temporary folder when that one would lie inside the project."""
    root = os.path.abspath(project_root)
    tag = hashlib.sha1(root.encode()).hexdigest()[:16]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    for cand in (Path(base) / "cryopipe" / "viewer" / tag,
                 Path(tempfile.gettempdir()) / f"cryopipe-viewer-{os.getuid() if hasattr(os, 'getuid') else 0}" / tag):
        if not is_inside(cand, root):
            return cand
    raise RuntimeError(f"no cache folder outside the project {root}: give one with --cache")


class RenderCache:
    """Rendered images on disk (and the most recent ones in memory).

    Args:
        folder: where the files go (created on first use); None keeps images in memory only.
        max_bytes: disk budget; the oldest files are removed when it is exceeded.
        memory_bytes: in-memory budget.
    """

    def __init__(self, folder: str | os.PathLike | None, max_bytes: int = 1 << 30, memory_bytes: int = 64 << 20):
        self.folder = Path(folder) if folder is not None else None
        self.max_bytes = int(max_bytes)
        self.memory_bytes = int(memory_bytes)
        self._mem: OrderedDict[str, bytes] = OrderedDict()
        self._mem_size = 0
        self._lock = threading.Lock()
        self._writes = 0

    def key(self, source: str | os.PathLike, *params: object) -> str:
        """Cache key of an image of ``source`` rendered with ``params``."""
        return hashlib.sha1(repr((file_key(source), params)).encode()).hexdigest()

    def get(self, key: str, make: Callable[[], bytes], suffix: str = ".png") -> bytes:
        """The cached bytes under ``key``, made by ``make()`` when absent."""
        with self._lock:
            data = self._mem.get(key)
            if data is not None:
                self._mem.move_to_end(key)
                return data
        path = None
        if self.folder is not None:
            path = self.folder / key[:2] / (key + suffix)
            try:
                data = path.read_bytes()
            except OSError:
                data = None
        if data is None:
            data = make()
            if path is not None:
                self._write(path, data)
        self._remember(key, data)
        return data

    def _remember(self, key: str, data: bytes) -> None:
        with self._lock:
            self._mem[key] = data
            self._mem_size += len(data)
            while self._mem_size > self.memory_bytes and len(self._mem) > 1:
                _, old = self._mem.popitem(last=False)
                self._mem_size -= len(old)

    def _write(self, path: Path, data: bytes) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(path.suffix + f".{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except OSError:
            return  # a full or read-only cache folder only costs speed
        self._writes += 1
        if self._writes % 200 == 0:
            self.prune()

    def prune(self) -> None:
        """Remove the oldest cached files until the folder holds at most ``max_bytes``."""
        if self.folder is None or not self.folder.is_dir():
            return
        files = []
        for dirpath, _, names in os.walk(self.folder):
            for n in names:
                p = os.path.join(dirpath, n)
                try:
                    st = os.stat(p)
                except OSError:
                    continue
                files.append((st.st_mtime, st.st_size, p))
        total = sum(f[1] for f in files)
        for _, size, p in sorted(files):
            if total <= self.max_bytes:
                break
            try:
                os.remove(p)
                total -= size
            except OSError:
                pass


# ---------------------------------------------------------------------------------------------- images

def to_png(img: np.ndarray, lo: float | None = None, hi: float | None = None) -> bytes:
    """8-bit grey PNG of a 2D array; grey levels ``lo``..``hi`` (default: 0.5 / 99.5 percentiles)."""
    from PIL import Image

    a = np.asarray(img, dtype=np.float32)
    finite = a[np.isfinite(a)]
    if lo is None or hi is None:
        if finite.size:
            sample = finite[:: max(1, finite.size // 200_000)]
            lo, hi = (float(v) for v in np.percentile(sample, [0.5, 99.5]))
        else:
            lo, hi = 0.0, 1.0
    if not hi > lo:
        hi = lo + 1.0
    u8 = np.clip((np.nan_to_num(a, nan=lo) - lo) * (255.0 / (hi - lo)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(u8, mode="L").save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def bin_image(img: np.ndarray, factor: int) -> np.ndarray:
    """Block mean over ``factor`` x ``factor`` pixels (the edge remainder is dropped). ``[y, x]`` -> smaller."""
    if factor <= 1:
        return np.asarray(img, dtype=np.float32)
    ny, nx = (img.shape[0] // factor) * factor, (img.shape[1] // factor) * factor
    a = np.asarray(img[:ny, :nx], dtype=np.float32)
    return a.reshape(ny // factor, factor, nx // factor, factor).mean(axis=(1, 3))


def _lowpass(img: np.ndarray, pixel_size: float, lowpass_A: float) -> np.ndarray:
    """Gaussian low-pass in Fourier space, amplitude 1/2 at 1/``lowpass_A`` Å⁻¹ (no-op if it is beyond Nyquist)."""
    if lowpass_A <= 0 or pixel_size <= 0 or lowpass_A <= 2 * pixel_size:
        return img
    ny, nx = img.shape
    fy = np.fft.fftfreq(ny)[:, None] / pixel_size
    fx = np.fft.rfftfreq(nx)[None, :] / pixel_size
    k2 = fx * fx + fy * fy
    sigma2 = (1.0 / lowpass_A) ** 2 / (2 * math.log(2.0))
    f = np.fft.rfft2(img - img.mean())
    f *= np.exp(-k2 / (2 * sigma2))
    return np.fft.irfft2(f, s=img.shape).astype(np.float32)


def micrograph_png(path: str | os.PathLike, lowpass_A: float = 20.0, max_size: int = 1024) -> bytes:
    """A micrograph for display: binned to ``<= max_size`` px a side, low-passed at ``lowpass_A`` Å, mean ± 3σ."""
    with MrcStack(path) as st:
        img = st[0]
        apix = st.pixel_size or 1.0
    factor = max(1, math.ceil(max(img.shape) / max_size))
    small = bin_image(img, factor)
    small = _lowpass(small, apix * factor, lowpass_A)
    m, s = float(small.mean()), float(small.std()) or 1.0
    return to_png(small, m - 3 * s, m + 3 * s)


def _display_png(img: np.ndarray, min_size: int, max_size: int) -> bytes:
    """PNG of a 2D array binned to ``<= max_size`` px a side, up-scaled (bicubic) to ``>= min_size``."""
    factor = max(1, math.ceil(max(img.shape) / max_size))
    img = bin_image(img, factor)
    png = to_png(img)
    if max(img.shape) >= min_size:
        return png
    from PIL import Image

    scale = min_size / max(img.shape)
    im = Image.open(io.BytesIO(png))
    im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def image_png(path: str | os.PathLike, index: int = 0, min_size: int = 128, max_size: int = 1024) -> bytes:
    """Image ``index`` (0-based) of a stack (or the single image / the first slice), scaled for display."""
    with MrcStack(path) as st:
        img = st[int(index)]
    return _display_png(img, min_size, max_size)


def volume_png(path: str | os.PathLike, view: str = "slice", axis: str = "z", index: int | None = None,
               min_size: int = 128, max_size: int = 1024) -> bytes:
    """A slice (``view="slice"``, central unless ``index``) or projection (``view="proj"``: sum along ``axis``)
    of a volume ``[z, y, x]`` (memory-mapped: a slice of a large tomogram reads only that slice)."""
    if axis not in ("x", "y", "z") or view not in ("slice", "proj"):
        raise ValueError(f"axis {axis!r} / view {view!r}: axis is x, y or z, view slice or proj")
    with MrcStack(path) as st:
        nz, ny, nx = st.shape
        data = st._open()
        if view == "slice":
            n = {"z": nz, "y": ny, "x": nx}[axis]
            i = n // 2 if index is None else int(min(max(index, 0), n - 1))
            sl = data[i] if axis == "z" else (data[:, i, :] if axis == "y" else data[:, :, i])
            img = np.asarray(sl, dtype=np.float32)
        else:
            step = max(1, math.ceil(max(nz, ny, nx) / 512))  # very large volumes: every step-th voxel
            vol = np.asarray(data[::step, ::step, ::step], dtype=np.float32)
            img = vol.sum(axis={"z": 0, "y": 1, "x": 2}[axis])
    return _display_png(img, min_size, max_size)


def isosurface_map(path: str | os.PathLike, max_voxels: int = 160) -> bytes:
    """The MRC file for the in-browser isosurface: the file itself when no side exceeds ``max_voxels``, else a
    block-averaged copy (float32, pixel size scaled accordingly)."""
    info = mrc_info(path)
    if max(info.shape) <= max_voxels and info.mode == 2:
        return Path(path).read_bytes()
    import mrcfile

    with MrcStack(path) as st:
        vol = np.asarray(st._open(), dtype=np.float32)
    f = max(1, math.ceil(max(vol.shape) / max_voxels))
    if f > 1:
        nz, ny, nx = (s // f * f for s in vol.shape)
        vol = vol[:nz, :ny, :nx].reshape(nz // f, f, ny // f, f, nx // f, f).mean(axis=(1, 3, 5))
    with tempfile.NamedTemporaryFile(suffix=".mrc", delete=False) as tmp:
        name = tmp.name
    try:
        with mrcfile.new(name, overwrite=True) as m:
            m.set_data(np.ascontiguousarray(vol, dtype=np.float32))
            m.voxel_size = (info.pixel_size or 1.0) * f
        return Path(name).read_bytes()
    finally:
        os.remove(name)
