"""Throughput of the Fourier-slice projector / back-projector and the machine's FFT rate.

Usage::

    python bench/bench_projection.py [--device cpu|cuda] [--n-images 1000] [--repeats 3] [--boxes 64 128]
                                     [--threads N] [--note TEXT] [--out bench/results/projection.json]

For box sizes 64 and 128 (padding 2, trilinear) it times, on each device (CPU, plus CUDA when present unless
``--device`` picks one):

* ``project``: :meth:`Projector.project` of ``n_images`` orientations — all different ("many") or one matrix
  repeated ("one", best-case memory locality);
* ``insert``: :meth:`BackProjector.insert` of the same images/orientations;
* ``insert_ctf``: :meth:`BackProjector.insert` with a per-image CTF and ``zero_dc=True`` (the
  ``cryopipe reconstruct`` path), all orientations different;
* ``ctf``: :func:`cryopipe.core.ctf.ctf_2d` on the half-complex grid, per-image parameters (astigmatic defocus,
  phase shift, B-factor), batches of 256;
* ``reconstruct``: one :meth:`BackProjector.reconstruct`;
* FFT rate: batched 2D ``rfft2`` of 128² images and 3D ``rfftn`` of a 128³ volume (float32).

Times are the median of ``--repeats`` runs after one warm-up. Results go to JSON (with machine information);
a short summary is printed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from cryopipe.core.backprojector import BackProjector
from cryopipe.core.ctf import ctf_2d
from cryopipe.core.geometry import euler_to_matrix
from cryopipe.core.projector import Projector


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _time(fn, dev: torch.device, repeats: int) -> float:
    fn()
    _sync(dev)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _blob_volume(n: int, dev: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    c = torch.arange(n, dtype=torch.float32) - n // 2
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    vol = torch.zeros(n, n, n)
    for _ in range(20):
        p = (torch.rand(3, generator=g) - 0.5) * n * 0.5
        vol += torch.exp(-((x - p[0]) ** 2 + (y - p[1]) ** 2 + (z - p[2]) ** 2) / (2 * (n / 24) ** 2))
    return vol.to(dev)


def _rotations(m: int, dev: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    rot = torch.rand(m, generator=g, dtype=torch.float64) * 360
    tilt = torch.rad2deg(torch.acos(2 * torch.rand(m, generator=g, dtype=torch.float64) - 1))
    psi = torch.rand(m, generator=g, dtype=torch.float64) * 360
    return euler_to_matrix(rot, tilt, psi).to(dev)


def _ctf_params(m: int, dev: torch.device) -> dict:
    g = torch.Generator().manual_seed(2)
    du = torch.rand(m, generator=g, dtype=torch.float64) * 20000 + 5000
    return {
        "defocus_u": du.float().to(dev),
        "defocus_v": (du - torch.rand(m, generator=g, dtype=torch.float64) * 1000).float().to(dev),
        "defocus_angle": (torch.rand(m, generator=g, dtype=torch.float64) * 360 - 180).float().to(dev),
        "voltage": torch.full((m,), 300.0, device=dev),
        "cs": torch.full((m,), 2.7, device=dev),
        "amplitude_contrast": torch.full((m,), 0.1, device=dev),
        "phase_shift": (torch.rand(m, generator=g) * 10).to(dev),
        "bfactor": (torch.rand(m, generator=g) * 50).to(dev),
        "scale": torch.ones(m, device=dev),
    }


def _ctf_images(n: int, par: dict, batch: int = 256) -> torch.Tensor:
    m = par["defocus_u"].numel()
    return torch.cat([ctf_2d(n, 1.5, **{k: v[b:b + batch] for k, v in par.items()}) for b in range(0, m, batch)])


def bench_device(dev: torch.device, n_images: int, repeats: int, boxes=(64, 128)) -> dict:
    out: dict = {"device": str(dev), "boxes": {}}
    if dev.type == "cuda":
        out["device_name"] = torch.cuda.get_device_name(dev)
    for n in boxes:
        vol = _blob_volume(n, dev)
        t0 = time.perf_counter()
        proj = Projector(vol, pad=2)
        _sync(dev)
        t_init = time.perf_counter() - t0
        many = _rotations(n_images, dev)
        one = many[:1].expand(n_images, 3, 3).contiguous()
        res = {"projector_init_s": t_init, "n_images": n_images}
        for label, rots in (("many", many), ("one", one)):
            t = _time(lambda: proj.project(rots), dev, repeats)
            res[f"project_{label}_images_per_s"] = n_images / t
            F = proj.project(rots)
            bp = BackProjector(n, pad=2, device=dev)
            t = _time(lambda: bp.insert(F, rots), dev, repeats)
            res[f"insert_{label}_images_per_s"] = n_images / t
            del F
        par = _ctf_params(n_images, dev)
        t = _time(lambda: _ctf_images(n, par), dev, repeats)
        res["ctf_images_per_s"] = n_images / t
        C = _ctf_images(n, par)
        F = proj.project(many) * C
        bp = BackProjector(n, pad=2, device=dev)
        t = _time(lambda: bp.insert(F, many, ctf=C, zero_dc=True), dev, repeats)
        res["insert_ctf_many_images_per_s"] = n_images / t
        del F, C
        bp = BackProjector(n, pad=2, device=dev)
        bp.insert(proj.project(many), many)
        res["reconstruct_s"] = _time(lambda: bp.reconstruct(), dev, max(1, repeats // 2))
        out["boxes"][str(n)] = res
        del proj, bp, vol
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    # FFT rates
    nb = 256 if dev.type == "cpu" else 4096
    imgs = torch.randn(nb, 128, 128, device=dev)
    t = _time(lambda: torch.fft.rfft2(imgs), dev, repeats)
    flops2 = 2.5 * 128 * 128 * math.log2(128 * 128)  # ~ real-input FFT flop count (5 N log2 N / 2)
    out["fft2d_128"] = {"batch": nb, "transforms_per_s": nb / t, "gflops_est": nb * flops2 / t / 1e9}
    v = torch.randn(128, 128, 128, device=dev)
    t = _time(lambda: torch.fft.rfftn(v), dev, repeats)
    flops3 = 2.5 * 128**3 * math.log2(128**3)
    out["fft3d_128"] = {"transforms_per_s": 1.0 / t, "seconds": t, "gflops_est": flops3 / t / 1e9}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None, help="only this device (default: all)")
    ap.add_argument("--n-images", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--boxes", type=int, nargs="+", default=[64, 128], help="box sizes (default 64 128)")
    ap.add_argument("--note", default=None, help="free-text note stored in the JSON (e.g. machine load)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's choice; 1 gives steadier numbers on a shared machine)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "projection.json"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    if args.device:
        devices = [d for d in devices if d.type == args.device]
        if not devices:
            print(f"device {args.device} is not available", file=sys.stderr)
            return 1
    result = {
        "benchmark": "projection",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "pad": 2,
        "interpolation": "trilinear",
        "note": args.note,
        "results": [bench_device(d, args.n_images, args.repeats, tuple(args.boxes)) for d in devices],
    }
    result["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, out)

    print(f"torch {result['torch']}, {result['cpu_count']} CPUs ({result['torch_threads']} torch threads), "
          f"load average {result['load_average']} (start) {result['load_average_end']} (end)")
    for r in result["results"]:
        name = r.get("device_name", r["device"])
        print(f"[{name}]")
        for n, b in r["boxes"].items():
            print(f"  box {n}: project {b['project_many_images_per_s']:.0f} img/s ({b['n_images']} orientations), "
                  f"{b['project_one_images_per_s']:.0f} img/s (one orientation); insert "
                  f"{b['insert_many_images_per_s']:.0f} / {b['insert_one_images_per_s']:.0f} img/s, with CTF "
                  f"{b['insert_ctf_many_images_per_s']:.0f} img/s; CTF {b['ctf_images_per_s']:.0f} img/s; "
                  f"reconstruct {b['reconstruct_s']:.2f} s")
        print(f"  FFT: 2D rfft 128² {r['fft2d_128']['transforms_per_s']:.0f}/s "
              f"(~{r['fft2d_128']['gflops_est']:.1f} GFLOP/s), 3D rfftn 128³ "
              f"{r['fft3d_128']['transforms_per_s']:.1f}/s (~{r['fft3d_128']['gflops_est']:.1f} GFLOP/s)")
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
