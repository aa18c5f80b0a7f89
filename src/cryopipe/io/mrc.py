"""MRC / MRCS files (maps, micrographs, image stacks) via ``mrcfile``.

Conventions (as RELION, ``src/rwMRC.h``):

* Arrays are ``[z, y, x]`` (volumes), ``[n, y, x]`` (stacks) or ``[y, x]`` (single images), MRC order.
* Pixel size (Å) is ``cella.x / mx``; written as ``voxel_size`` on all axes. 0.0 means "not set".
* ``.mrcs`` files are image stacks (``ispg 0``, ``nz`` = number of images); ``.mrc`` with 3D data is a volume
  (``ispg 1``); ``.mrc`` with 2D data a single image.
* Supported modes: 0 int8, 1 int16, 2 float32, 6 uint16, 12 float16 (RELION extension). Data are returned as
  float32 whatever the mode.
* Image names in STAR files are ``"000123@Particles/a.mrcs"``: the number is **1-based**; the API here uses
  0-based indices (:func:`parse_image_name` converts).

Bad files (missing, not MRC, truncated, unsupported mode, index out of range) raise
:class:`cryopipe.errors.InputFileError` with one line naming the file and the problem.
"""

from __future__ import annotations

import datetime
import os
import sys
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mrcfile
import numpy as np
import pandas as pd

from cryopipe.errors import CryopipeError, InputFileError
from cryopipe.io.atomic import atomic_path

__all__ = [
    "MODES", "MrcInfo", "mrc_info", "read_mrc", "write_mrc", "MrcStack", "MrcStackWriter", "parse_image_name",
    "parse_image_names", "format_image_name", "ImageReader",
]

#: Supported MRC modes and their numpy dtypes.
MODES: dict[int, np.dtype] = {
    0: np.dtype(np.int8), 1: np.dtype(np.int16), 2: np.dtype(np.float32), 6: np.dtype(np.uint16),
    12: np.dtype(np.float16),
}
_DTYPE_TO_MODE = {dt: mode for mode, dt in MODES.items()}
_HEADER_BYTES = 1024


@dataclass(frozen=True)
class MrcInfo:
    """Header information of an MRC file. ``shape`` is ``(nz, ny, nx)``; stats are from the header."""

    path: Path
    shape: tuple[int, int, int]
    mode: int
    dtype: np.dtype
    pixel_size: float
    is_stack: bool
    dmin: float
    dmax: float
    dmean: float
    rms: float


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise InputFileError(path, "file not found", "check the path (image paths in STAR files are relative "
                                                     "to the project directory)")
    if path.is_dir():
        raise InputFileError(path, "is a directory, not an MRC file", "give the path of a .mrc/.mrcs file")


def _open_mmap(path: Path, mode: str = "r") -> Any:
    """Open an MRC file memory-mapped after validating header, mode and size; clear errors otherwise."""
    _check_exists(path)
    size = path.stat().st_size
    if size < _HEADER_BYTES:
        raise InputFileError(path, f"not an MRC file (only {size} bytes, an MRC header has 1024)",
                             "re-create or re-copy the file")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            mrc = mrcfile.mmap(path, mode=mode, permissive=True)
        except Exception as exc:  # mrcfile raises ValueError / OSError / EOFError for corrupt headers
            raise InputFileError(path, f"cannot be opened as MRC ({exc})", "check that it is an MRC file") from None
    try:
        h = mrc.header
        file_mode = int(h.mode)
        has_map_id = bytes(h.map) == b"MAP "
        if file_mode not in MODES:
            if not has_map_id:
                raise InputFileError(path, "not an MRC file (no 'MAP ' id and invalid mode field)",
                                     "check that it is an MRC file")
            raise InputFileError(path, f"unsupported MRC mode {file_mode} (supported: 0 int8, 1 int16, 2 float32, "
                                       "6 uint16, 12 float16)", "convert the file to mode 2 (float32)")
        nx, ny, nz = int(h.nx), int(h.ny), int(h.nz)
        if min(nx, ny, nz) <= 0:
            raise InputFileError(path, f"invalid dimensions in MRC header (nx={nx}, ny={ny}, nz={nz})",
                                 "the file is corrupt; re-create it")
        expected = _HEADER_BYTES + int(h.nsymbt) + nx * ny * nz * MODES[file_mode].itemsize
        if size < expected:
            raise InputFileError(path, f"truncated: {size} bytes but the header ({nx}x{ny}x{nz}, mode {file_mode}) "
                                       f"needs {expected}", "the file was not completely written or copied; "
                                                            "re-create or re-copy it")
        if size > expected:  # exactly the size another mode would need: the mode field is wrong
            data_bytes = size - _HEADER_BYTES - int(h.nsymbt)
            other = [m for m, dt in MODES.items() if m != file_mode and data_bytes == nx * ny * nz * dt.itemsize]
            if other:
                raise InputFileError(path, f"header mode {file_mode} ({MODES[file_mode]}) does not match the data: "
                                           f"{data_bytes} bytes for {nx}x{ny}x{nz} values are "
                                           f"{MODES[other[0]].itemsize} bytes each (mode {other[0]}?)",
                                     "fix the header's mode field or re-write the file")
        if mrc.data is None:
            msgs = "; ".join(str(w.message) for w in caught) or "no data block"
            raise InputFileError(path, f"cannot read the MRC data ({msgs})", "re-create the file")
    except BaseException:
        mrc.close()
        raise
    return mrc


def _pixel_size(header: Any) -> float:
    mx = int(header.mx)
    cx = float(header.cella.x)
    return cx / mx if mx > 0 and cx > 0 else 0.0


def _is_stack(path: Path, header: Any) -> bool:
    return path.suffix.lower() == ".mrcs" or (int(header.ispg) == 0 and int(header.nz) > 1 and int(header.mz) == 1)


def mrc_info(path: str | os.PathLike) -> MrcInfo:
    """Header of an MRC file (no data read): shape (nz, ny, nx), mode, pixel size (Å), stack flag, stats."""
    path = Path(path)
    mrc = _open_mmap(path)
    try:
        h = mrc.header
        mode = int(h.mode)
        return MrcInfo(path=path, shape=(int(h.nz), int(h.ny), int(h.nx)), mode=mode, dtype=MODES[mode],
                       pixel_size=_pixel_size(h), is_stack=_is_stack(path, h), dmin=float(h.dmin),
                       dmax=float(h.dmax), dmean=float(h.dmean), rms=float(h.rms))
    finally:
        mrc.close()


def read_mrc(path: str | os.PathLike, *, finite: bool = False) -> tuple[np.ndarray, float]:
    """Read a whole MRC/MRCS file: (float32 array, pixel size in Å from ``cella.x / mx``; 0.0 if unset).

    Shapes: volume ``[z, y, x]``, single image ``[y, x]``, ``.mrcs`` stack always ``[n, y, x]``. ``finite``:
    NaN/inf values are a one-line :class:`InputFileError` naming the file, how many and where the first is
    (:func:`require_finite`), so that no job turns them silently into a wrong result.
    """
    path = Path(path)
    mrc = _open_mmap(path)
    try:
        data = _float16_to_float32(np.asarray(mrc.data))
        if path.suffix.lower() == ".mrcs" and data.ndim == 2:
            data = data[None]
        if finite:
            require_finite(data, path)
        return data, _pixel_size(mrc.header)
    finally:
        mrc.close()


def require_finite(data: np.ndarray, path: str | os.PathLike, what: str = "") -> None:
    """Raise :class:`InputFileError` (one line: file, count, first ``[z, y, x]`` index) when ``data`` holds NaN or
    inf values; ``what`` names the array in the message (default: the file's values)."""
    bad = ~np.isfinite(data)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise InputFileError(path, f"{what + ' ' if what else ''}holds {int(bad.sum())} non-finite value(s) (NaN/inf), "
                                   f"the first at index {list(first)}", "fix or re-make that file")


#: smallest normal float16; RELION reads float16 (mode 12) subnormals as 0
_F16_MIN_NORMAL = np.float32(2.0 ** -14)


def _float16_to_float32(data: np.ndarray) -> np.ndarray:
    """float32 copy of MRC data; float16 subnormals (|x| < 2^-14) become 0 as in RELION's half-float reader."""
    out = np.array(data, dtype=np.float32, copy=True)
    if data.dtype == np.float16:
        out[np.abs(out) < _F16_MIN_NORMAL] = 0.0
    return out


def _to_numpy(data: Any) -> np.ndarray:
    if hasattr(data, "detach"):  # torch tensor
        data = data.detach().cpu().numpy()
    return np.asarray(data)


def _cast(data: np.ndarray, dtype: Any, path: Path) -> np.ndarray:
    dt = np.dtype(dtype)
    if dt not in _DTYPE_TO_MODE:
        raise ValueError(f"{path}: unsupported MRC dtype {dt} (use float32, float16, int8, int16 or uint16)")
    if np.issubdtype(dt, np.integer):
        if not np.issubdtype(data.dtype, np.integer):
            data = np.rint(data)
        info = np.iinfo(dt)
        if data.size and (data.min() < info.min or data.max() > info.max):
            raise ValueError(f"{path}: values [{data.min()}, {data.max()}] do not fit MRC dtype {dt}")
    return np.ascontiguousarray(data, dtype=dt)


def _set_header(mrc: Any, pixel_size: float, stack: bool, ndim: int) -> None:
    if stack:
        mrc.set_image_stack()
    elif ndim == 3:
        mrc.set_volume()
    mrc.voxel_size = float(pixel_size)
    h = mrc.header
    h.nlabl = 1
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    h.label[0] = f"cryopipe {stamp}".ljust(80)[:80].encode()


def write_mrc(path: str | os.PathLike, data: Any, pixel_size: float, dtype: Any = np.float32,
              stack: bool | None = None) -> None:
    """Write an array to an MRC file atomically (header: mode from ``dtype``, voxel size, stats, one label).

    Args:
        path: output; ``.mrcs`` → image stack (``ispg 0``), ``.mrc`` → volume (3D) or single image (2D).
        data: ``[z, y, x]`` volume, ``[n, y, x]`` stack or ``[y, x]`` image (numpy or torch).
        pixel_size: Å per pixel.
        dtype: float32 (mode 2), float16 (12), int8 (0), int16 (1) or uint16 (6); integer dtypes round and
            raise ValueError when values do not fit.
        stack: force stack (True) / not stack (False); None decides by extension.
    """
    path = Path(path)
    arr = _to_numpy(data)
    if arr.ndim not in (2, 3):
        raise ValueError(f"{path}: MRC data must be 2D or 3D, got shape {arr.shape}")
    is_stack = path.suffix.lower() == ".mrcs" if stack is None else bool(stack)
    if is_stack and arr.ndim == 2:
        arr = arr[None]
    arr = _cast(arr, dtype, path)
    with atomic_path(path) as tmp:
        with mrcfile.new(tmp) as mrc:
            mrc.set_data(arr)
            _set_header(mrc, pixel_size, is_stack, arr.ndim)
            mrc.update_header_stats()


class MrcStackWriter:
    """Write a large image stack incrementally (memory-mapped), atomically renamed on successful close.

    ``with MrcStackWriter(path, n, (ny, nx), pixel_size) as w: w[i0:i1] = batch`` — header statistics are
    accumulated from the written batches (every image must be written once).
    """

    def __init__(self, path: str | os.PathLike, n_images: int, shape: tuple[int, int], pixel_size: float,
                 dtype: Any = np.float32):
        self.path = Path(path)
        self.n_images = int(n_images)
        self.shape = (int(shape[0]), int(shape[1]))
        self.pixel_size = float(pixel_size)
        self.dtype = np.dtype(dtype)
        if self.dtype not in _DTYPE_TO_MODE:
            raise ValueError(f"{self.path}: unsupported MRC dtype {self.dtype}")
        self._ctx: Any = None
        self._mrc: Any = None
        self._stats = [np.inf, -np.inf, 0.0, 0.0, 0]  # min, max, sum, sum of squares, count

    def __enter__(self) -> MrcStackWriter:
        self._ctx = atomic_path(self.path)
        tmp = self._ctx.__enter__()
        try:
            self._mrc = mrcfile.new_mmap(tmp, shape=(self.n_images, *self.shape),
                                         mrc_mode=_DTYPE_TO_MODE[self.dtype])
            _set_header(self._mrc, self.pixel_size, True, 3)
        except BaseException:
            self._ctx.__exit__(*sys.exc_info())
            raise
        return self

    def __setitem__(self, index: int | slice | np.ndarray, images: Any) -> None:
        arr = _cast(_to_numpy(images), self.dtype, self.path)
        self._mrc.data[index] = arr
        a64 = arr.astype(np.float64)
        s = self._stats
        if a64.size:
            s[0] = min(s[0], float(a64.min()))
            s[1] = max(s[1], float(a64.max()))
            s[2] += float(a64.sum())
            s[3] += float((a64 * a64).sum())
            s[4] += a64.size

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is None:
                h = self._mrc.header
                mn, mx, sm, sq, cnt = self._stats
                if cnt:
                    mean = sm / cnt
                    h.dmin, h.dmax, h.dmean = mn, mx, mean
                    h.rms = np.sqrt(max(sq / cnt - mean * mean, 0.0))
            self._mrc.close()
        finally:
            self._ctx.__exit__(exc_type, exc, tb)
        return False


class MrcStack:
    """Lazy, memory-mapped view of an MRC stack (or a single image / volume viewed as a stack of z-slices).

    ``len(stack)`` images; ``stack[i]`` → ``[ny, nx]``; ``stack[slice | array of 0-based indices]`` →
    ``[B, ny, nx]``; all float32 copies. Only the requested images are read, so stacks larger than RAM can
    be streamed. Picklable (re-opens lazily), usable as a context manager; ``close()`` releases the mmap.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._mrc: Any = None
        self._open()

    def _open(self) -> Any:
        if self._mrc is None:
            self._mrc = _open_mmap(self.path)
            data = self._mrc.data
            self._data = data if data.ndim == 3 else data.reshape(1, *data.shape)
            self.pixel_size = _pixel_size(self._mrc.header)
        return self._data

    @property
    def shape(self) -> tuple[int, int, int]:
        """(n_images, ny, nx)."""
        return tuple(self._open().shape)  # type: ignore[return-value]

    @property
    def mode(self) -> int:
        self._open()
        return int(self._mrc.header.mode)

    def __len__(self) -> int:
        return self.shape[0]

    def _check_index(self, idx: np.ndarray) -> None:
        n = len(self)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            bad = int(idx[(idx < 0) | (idx >= n)][0])
            raise InputFileError(self.path, f"image index {bad + 1} (1-based) out of range: the stack has {n} images",
                                 "check the image names / indices in the STAR file")

    def __getitem__(self, key: int | slice | Sequence[int] | np.ndarray) -> np.ndarray:
        data = self._open()
        if isinstance(key, slice):
            return _float16_to_float32(data[key])
        if isinstance(key, (int, np.integer)):
            self._check_index(np.array([int(key)]))
            return _float16_to_float32(data[int(key)])
        idx = np.asarray(key, dtype=np.int64).reshape(-1)
        self._check_index(idx)
        if idx.size > 1 and np.all(idx[1:] > idx[:-1]):
            return _float16_to_float32(data[idx])
        # read each needed image once, in file order, then scatter
        uniq, inverse = np.unique(idx, return_inverse=True)
        return _float16_to_float32(data[uniq])[inverse]

    def close(self) -> None:
        if self._mrc is not None:
            self._mrc.close()
            self._mrc = None
            self._data = None

    def __enter__(self) -> MrcStack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict:
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.path = state["path"]
        self._mrc = None
        self._open()

    def __repr__(self) -> str:
        return f"MrcStack({str(self.path)!r}, shape={self.shape}, pixel_size={self.pixel_size})"


def parse_image_name(name: str) -> tuple[int, str]:
    """``"000123@Particles/a.mrcs"`` → ``(122, "Particles/a.mrcs")`` (0-based index).

    A name without ``@`` is a whole single-image file: index 0. Raises CryopipeError for a malformed name or
    a non-positive number (RELION numbers images from 1).
    """
    if "@" not in name:
        return 0, name
    num, _, file = name.partition("@")
    try:
        k = int(num)
    except ValueError:
        raise CryopipeError(f"invalid image name {name!r}: expected 'NNNNNN@stack.mrcs' with a number before '@'") \
            from None
    if k < 1 or not file:
        raise CryopipeError(f"invalid image name {name!r}: image numbers start at 1 and a file name must follow '@'")
    return k - 1, file


def parse_image_names(names: Sequence[str] | pd.Series | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised :func:`parse_image_name`: (0-based indices int64 [N], file names object [N])."""
    s = pd.Series(np.asarray(names, dtype=object)).astype(str)
    parts = s.str.partition("@")
    has_at = parts[1] == "@"
    files = np.where(has_at, parts[2], parts[0]).astype(object)
    nums = pd.to_numeric(parts[0].where(has_at, "1"), errors="coerce")
    bad = nums.isna() | (nums < 1) | (has_at & (parts[2] == ""))
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise CryopipeError(f"invalid image name {s.iloc[i]!r} (row {i + 1}): expected 'NNNNNN@stack.mrcs' with "
                            "a number >= 1 before '@'")
    return nums.to_numpy(dtype=np.int64) - 1, files


def format_image_name(index: int | np.ndarray, file: str) -> str | list[str]:
    """0-based index (or array) + stack file → RELION image name(s) ``"00000123@file"`` (1-based, 8 digits as
    RELION 5 writes them; any number of digits is read)."""
    if np.ndim(index) == 0:
        return f"{int(index) + 1:08d}@{file}"
    return [f"{int(i) + 1:08d}@{file}" for i in np.asarray(index).tolist()]


class ImageReader:
    """Read images named in a STAR column (``"000123@stack.mrcs"``) in batches, grouped by file, memory-mapped.

    Args:
        image_names: the ``rlnImageName`` (or ``rlnMicrographName``) values, one per particle.
        root_dir: directory relative paths are resolved against (the RELION project directory).
        max_open: how many stacks to keep memory-mapped at once (least recently used are closed).

    ``read(indices)`` returns ``[B, ny, nx]`` float32 for the given row indices (0-based positions in
    ``image_names``); each stack involved is opened once (cached) and read with one fancy-indexing call.
    """

    def __init__(self, image_names: Sequence[str] | pd.Series | np.ndarray, root_dir: str | os.PathLike = ".",
                 max_open: int = 128):
        self.root_dir = Path(root_dir)
        self.max_open = max(1, int(max_open))
        self.image_index, files = parse_image_names(image_names)
        codes, uniques = pd.factorize(pd.Series(files, dtype=object))
        self.file_code = codes.astype(np.int64)
        self.files: list[str] = [str(u) for u in uniques]
        self._names = np.asarray(image_names, dtype=object)
        self._cache: OrderedDict[int, MrcStack] = OrderedDict()
        self._shape: tuple[int, int] | None = None
        self._pixel_size: float | None = None

    def __len__(self) -> int:
        return len(self.image_index)

    def path_of(self, code: int) -> Path:
        p = Path(self.files[code])
        return p if p.is_absolute() else self.root_dir / p

    def _stack(self, code: int) -> MrcStack:
        st = self._cache.get(code)
        if st is not None:
            self._cache.move_to_end(code)
            return st
        st = MrcStack(self.path_of(code))
        self._cache[code] = st
        if len(self._cache) > self.max_open:
            _, old = self._cache.popitem(last=False)
            old.close()
        return st

    @property
    def image_shape(self) -> tuple[int, int]:
        """(ny, nx) of the images (from the first file)."""
        if self._shape is None:
            st = self._stack(int(self.file_code[0])) if len(self) else None
            if st is None:
                raise CryopipeError("ImageReader: no image names given")
            self._shape = st.shape[1:]
            self._pixel_size = st.pixel_size
        return self._shape

    @property
    def pixel_size(self) -> float:
        """Pixel size (Å) in the header of the first file."""
        self.image_shape
        return float(self._pixel_size)  # type: ignore[arg-type]

    def read(self, indices: Sequence[int] | np.ndarray | slice) -> np.ndarray:
        """Images for rows ``indices`` (0-based positions in ``image_names``) → ``[B, ny, nx]`` float32."""
        rows = np.arange(len(self))[indices] if isinstance(indices, slice) else \
            np.asarray(indices, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"ImageReader: row index out of range 0..{len(self) - 1}")
        ny, nx = self.image_shape
        out = np.empty((rows.size, ny, nx), dtype=np.float32)
        if rows.size == 0:
            return out
        codes = self.file_code[rows]
        order = np.argsort(codes, kind="stable")
        sorted_codes = codes[order]
        starts = np.flatnonzero(np.r_[True, sorted_codes[1:] != sorted_codes[:-1]])
        ends = np.r_[starts[1:], rows.size]
        for s, e in zip(starts.tolist(), ends.tolist()):
            code = int(sorted_codes[s])
            pos = order[s:e]
            stack = self._stack(code)
            if stack.shape[1:] != (ny, nx):
                raise InputFileError(stack.path, f"images are {stack.shape[2]}x{stack.shape[1]} but other stacks "
                                                 f"are {nx}x{ny}", "all particles must have the same box size")
            img_idx = self.image_index[rows[pos]]
            n = len(stack)
            if img_idx.max() >= n:
                bad = int(rows[pos][np.argmax(img_idx >= n)])
                raise InputFileError(stack.path, f"image {self._names[bad]!r} out of range: the stack has {n} "
                                                 "images", "check rlnImageName against the stack files")
            out[pos] = stack[img_idx]
            finite = np.isfinite(out[pos]).all(axis=(1, 2))
            if not finite.all():
                bad = int(rows[pos][np.argmin(finite)])
                raise InputFileError(stack.path, f"image {self._names[bad]!r} (particle {bad + 1}) holds non-finite "
                                                 f"values (NaN/inf); {int((~finite).sum())} such image(s) in this "
                                                 "batch", "remove those particles (e.g. cryopipe star --select) or "
                                                          "re-extract them")
        return out

    def close(self) -> None:
        for st in self._cache.values():
            st.close()
        self._cache.clear()

    def __enter__(self) -> ImageReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_cache"] = OrderedDict()
        return state
