"""Scale-out through Dask (issue 15): class2d and reconstruct on a 2-worker loopback ``LocalCluster`` (worker
processes that read the particles themselves from their stack files) equal the in-process run within float
tolerance, with 1, 2 and 3 chunks per worker; cryopipe does not import Dask unless asked."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("distributed")

from cryopipe.engine.backend import InProcess, make_backend, split_chunks  # noqa: E402
from cryopipe.engine.classify2d import Class2DSettings, Optimiser2D, ParticleSet2D  # noqa: E402
from cryopipe.io.mrc import ImageReader, write_mrc  # noqa: E402

from engine_helpers import simulate, write_particle_stack  # noqa: E402

torch.set_num_threads(2)

N = 64


@pytest.fixture(scope="module")
def cluster():
    be = make_backend("local:2")
    assert be.n_workers == 2
    yield be
    be.close()


@pytest.fixture(scope="module")
def particles(relion_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("dask2d")
    sim = simulate(relion_dir, N=N, n=32, snr=0.5, seed=2)
    write_mrc(d / "parts.mrcs", sim.images, sim.pixel_size)
    reader = ImageReader([f"{i + 1:06d}@parts.mrcs" for i in range(N)], root_dir=d)
    return ParticleSet2D(sim.n, sim.pixel_size, reader.read, sim.ctf, np.zeros(N, dtype=np.int64),
                         np.arange(N, dtype=np.int64) % 2)


def _class2d(ps, backend, n_iter=2):
    s = Class2DSettings(n_classes=3, particle_diameter=100, zero_mask=False, psi_step=20, offset_range=2,
                        offset_step=1, oversampling=0, random_seed=11, batch_size=8, n_accuracy_particles=10,
                        do_norm=True, do_scale=True)
    opt = Optimiser2D(ps, s, backend=backend)
    opt.initialise()
    for _ in range(n_iter):
        opt.iterate()
    return opt


def test_split_chunks_whole_batches():
    idx = np.arange(50)
    for k in (1, 2, 3, 4, 7, 100):
        parts = split_chunks(idx, k, 8)
        assert np.array_equal(np.concatenate(parts), idx)
        assert all(p.size % 8 == 0 for p in parts[:-1]) and len(parts) <= k


def test_class2d_on_two_workers_equals_in_process(particles, cluster):
    ref = _class2d(particles, InProcess())
    for per_worker in (1, 2, 3):
        cluster.batches_per_worker = per_worker
        got = _class2d(particles, cluster)
        a, b = ref.model.refs, got.model.refs
        assert torch.allclose(a, b, rtol=0, atol=1e-5 * float(a.abs().max())), per_worker
        assert np.array_equal(ref.state.klass, got.state.klass)
        assert np.allclose(ref.state.psi, got.state.psi, atol=1e-4)
        assert np.allclose(ref.state.origin, got.state.origin, atol=1e-6)
        assert np.allclose(ref.state.norm, got.state.norm, rtol=1e-4)  # float32 sums: 1 vs 2 threads
        assert torch.allclose(ref.model.sigma2_noise, got.model.sigma2_noise, rtol=1e-4)
        assert torch.allclose(ref.model.scale_correction, got.model.scale_correction, rtol=1e-4)
        assert got.model.LL == pytest.approx(ref.model.LL, rel=1e-5)


def _optimiser3d(ps, backend, relion_dir, grad: bool):
    from cryopipe.engine.optimiser3d import Optimiser3D, Refine3DSettings
    from cryopipe.core.fourier import fourier_rescale
    from cryopipe.engine.vdam import initial_model_rule
    from cryopipe.io.mrc import read_mrc

    s = Refine3DSettings(n_iter=4, healpix_order=1, oversampling=0, offset_range=2.0, offset_step=1.0,
                         particle_diameter=100.0, batch_size=8, ini_high=25.0, sigma_noise_particles=N,
                         n_accuracy_particles=10, random_seed=3, do_norm=True, do_scale=True, grad=grad,
                         split_halves=not grad, auto_refine=not grad, max_significant=40)
    rule = initial_model_rule(s.n_iter, s.tau2_fudge, {"ini_subset": 40, "fin_subset": N}) if grad else None
    opt = Optimiser3D(ps, s, backend=backend, update_rule=rule)
    if grad:
        opt.initialise()
    else:
        vol = fourier_rescale(torch.from_numpy(read_mrc(relion_dir / "ref_map.mrc")[0]), ps.n)
        opt.initialise(vol, absolute_greyscale=False)
    for _ in range(2):
        opt.iterate()
    return opt


@pytest.mark.parametrize("grad", [False, True], ids=["gold_standard", "initial_model"])
def test_refine3d_on_two_workers_equals_in_process(particles, cluster, relion_dir, grad):
    """3D iterations (gold-standard halves, or VDAM pseudo-halves) as chunks on two worker processes give the
    in-process maps, poses and noise spectra (issue 15)."""
    ref = _optimiser3d(particles, InProcess(), relion_dir, grad)
    for per_worker in (3,):  # more chunks than workers: results come back and are added in chunk order
        cluster.batches_per_worker = per_worker
        got = _optimiser3d(particles, cluster, relion_dir, grad)
        a, b = ref.model.vols, got.model.vols
        assert torch.allclose(a, b, rtol=0, atol=1e-4 * float(a.abs().max())), (grad, per_worker)
        assert np.allclose(ref.state.angles, got.state.angles, atol=1e-3)
        assert np.allclose(ref.state.origin, got.state.origin, atol=1e-5)
        assert np.array_equal(ref.state.klass, got.state.klass)
        # norm corrections: square roots of float32 residual sums (2 threads here, 1 per worker): ~1e-3
        assert np.allclose(ref.state.norm, got.state.norm, rtol=3e-3)
        assert torch.allclose(ref.model.sigma2_noise, got.model.sigma2_noise, rtol=1e-3)
        assert got.model.ave_pmax == pytest.approx(ref.model.ave_pmax, rel=1e-4, abs=1e-6)


def test_3d_chunk_is_pure_and_carries_only_its_rows(particles, relion_dir):
    """A 3D chunk (issue 15) run twice on the same snapshot and item gives the same sums and poses (what a task
    re-run by Dask does), changes neither its item's poses nor the optimiser's state, returns poses for its own
    rows only (O(chunk)), and its state refuses rows of other chunks."""
    from cryopipe.engine.refine3d_step import ChunkState, PoseRecords, Refine3DItem, Refine3DSnapshot, refine3d_chunk

    opt = _optimiser3d(particles, InProcess(), relion_dir, False)
    snap = Refine3DSnapshot(opt.iteration + 1, opt.model, opt.sampling, False)
    rows = np.nonzero(opt.state.subset == 1)[0][:12]
    item = Refine3DItem(0, rows, PoseRecords.take(opt.state, rows))
    start = {f: v.copy() for f, v in item.start.values.items()}
    state = opt.state.copy()
    a, b = refine3d_chunk(opt, snap, item), refine3d_chunk(opt, snap, item)
    assert torch.equal(a.data, b.data) and torch.equal(a.weight, b.weight)
    assert np.array_equal(a.records.index, rows)
    for f, v in a.records.values.items():
        assert v.shape[0] == rows.size and np.array_equal(v, b.records.values[f]), f
        assert np.array_equal(item.start.values[f], start[f]), f  # the item is not written
        assert np.array_equal(getattr(opt.state, f), getattr(state, f)), f  # nor the optimiser's state
    assert not np.array_equal(a.records.values["origin"], start["origin"])  # the chunk did move its particles
    other = np.setdiff1d(np.arange(N), rows)[:1]
    with pytest.raises(IndexError):
        ChunkState(item.start).angles[other]


def test_reconstruct_on_two_workers_equals_in_process(cluster, tmp_path, monkeypatch):
    from cryopipe.cli import main as cli
    from cryopipe.jobs.reconstruct import reconstruct_particles

    monkeypatch.chdir(tmp_path)
    assert cli(["simulate", "--what", "particles", "--n", "60", "--box", "24", "--angpix", "4", "--snr", "1",
                "--seed", "3"]) == 0
    star = "Simulate/job001/particles_truth.star"  
    ref = reconstruct_particles(star, ctf=True, sym="C2", batch_size=8, progress=False).volume
    for per_worker in (1, 2, 3):
        cluster.batches_per_worker = per_worker
        got = reconstruct_particles(star, ctf=True, sym="C2", batch_size=8, progress=False, backend=cluster).volume
        assert np.allclose(ref, got, rtol=0, atol=1e-5 * np.abs(ref).max()), per_worker


def test_no_dask_import_without_the_option():
    code = ("import sys, cryopipe.cli, cryopipe.jobs.class2d, cryopipe.jobs.reconstruct, cryopipe.engine.backend;"
            "assert 'distributed' not in sys.modules and 'dask' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def _die_once(fn, marker, static, snapshot, item, **kwargs):
    """Run ``fn``, except that the first task to get here (atomically: the marker file) kills its worker process
    mid-iteration, as a crashed node would."""
    import os

    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return fn(static, snapshot, item, **kwargs)
    os._exit(1)


class _KillOneWorker:
    """A Dask backend whose first task of the first iteration kills its worker."""

    distributed = True

    def __init__(self, backend, marker):
        self.be, self.marker = backend, str(marker)

    def n_chunks(self, hint):
        return self.be.n_chunks(hint)

    def map(self, fn, static, snapshot, items, **kwargs):
        import functools

        return self.be.map(functools.partial(_die_once, fn, self.marker), static, snapshot, items, **kwargs)


def test_killed_worker_changes_nothing(particles, cluster, tmp_path):
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module
    cluster.batches_per_worker = 2
    ref = _class2d(particles, InProcess(), n_iter=1)
    got = _class2d(particles, _KillOneWorker(cluster, tmp_path / "killed"), n_iter=1)
    assert (tmp_path / "killed").exists()  # a worker did die
    assert torch.allclose(ref.model.refs, got.model.refs, rtol=0, atol=1e-5 * float(ref.model.refs.abs().max()))
    assert np.array_equal(ref.state.klass, got.state.klass)
    assert np.allclose(ref.state.norm, got.state.norm, rtol=1e-4)


def test_cli_reconstruct_with_dask(tmp_path, monkeypatch):
    from cryopipe.cli import main as cli
    from cryopipe.io.mrc import read_mrc

    monkeypatch.chdir(tmp_path)
    assert cli(["simulate", "--what", "particles", "--n", "40", "--box", "24", "--angpix", "4", "--seed", "2"]) == 0
    star = "Simulate/job001/particles_truth.star"
    assert cli(["reconstruct", "--i", star, "--ctf", "--o", "a.mrc", "--batch_size", "8"]) == 0
    assert cli(["reconstruct", "--i", star, "--ctf", "--o", "b.mrc", "--batch_size", "8", "--dask", "local:2:threads",
                "--dask_batches_per_worker", "2"]) == 0
    a, b = read_mrc("a.mrc")[0], read_mrc("b.mrc")[0]
    assert np.allclose(a, b, rtol=0, atol=1e-5 * np.abs(a).max())


def test_cli_class2d_with_dask(relion_dir, tmp_path, monkeypatch):
    from cryopipe.cli import main as cli
    from cryopipe.io.mrc import read_mrc

    write_particle_stack(relion_dir, tmp_path)
    monkeypatch.chdir(tmp_path)
    common = ["class2d", "--i", "particles.star", "--K", "2", "--iter", "2", "--ctf", "--particle_diameter", "110",
              "--psi_step", "20", "--offset_range", "2", "--offset_step", "1", "--oversampling", "0",
              "--random_seed", "7", "--batch_size", "8"]
    assert cli(common + ["--o", "a/run"]) == 0
    assert cli(common + ["--o", "b/run", "--dask", "local:2:threads", "--dask_batches_per_worker", "2"]) == 0
    a, b = read_mrc("a/run_it002_classes.mrcs")[0], read_mrc("b/run_it002_classes.mrcs")[0]
    assert np.allclose(a, b, rtol=0, atol=1e-5 * np.abs(a).max())


def test_cli_initialmodel_with_dask(relion_dir, tmp_path, monkeypatch):
    """``cryopipe initialmodel --dask``: the same map as in-process (issue 15)."""
    from cryopipe.cli import main as cli
    from cryopipe.io.mrc import read_mrc

    write_particle_stack(relion_dir, tmp_path)
    monkeypatch.chdir(tmp_path)
    common = ["initialmodel", "--i", "particles.star", "--iter", "2", "--ctf", "--particle_diameter", "110",
              "--healpix_order", "1", "--offset_range", "2", "--offset_step", "1", "--oversampling", "0",
              "--random_seed", "7", "--batch_size", "8", "--grad_ini_subset", "16", "--grad_fin_subset", "32"]
    assert cli(common + ["--o", "a/run"]) == 0
    assert cli(common + ["--o", "b/run", "--dask", "local:2:threads", "--dask_batches_per_worker", "2"]) == 0
    a, b = read_mrc("a/initial_model.mrc")[0], read_mrc("b/initial_model.mrc")[0]
    assert np.allclose(a, b, rtol=0, atol=1e-4 * np.abs(a).max())


def test_unreachable_scheduler_is_a_one_line_error():
    from cryopipe.engine.dask_backend import DaskBackend
    from cryopipe.errors import CryopipeError

    with pytest.raises(CryopipeError, match="cannot reach the Dask scheduler"):
        DaskBackend("tcp://127.0.0.1:9", timeout="2s")


def test_gpu_pinning_round_robin():
    """``--dask local:N`` on a machine with G GPUs: worker i computes on cuda:(i mod G); without GPUs on the CPU
    (issue 15, multi-GPU nodes)."""
    from cryopipe.engine.dask_backend import worker_device_name

    assert [worker_device_name(i, 3) for i in range(5)] == ["cuda:0", "cuda:1", "cuda:2", "cuda:0", "cuda:1"]
    assert [worker_device_name(i, 1) for i in range(3)] == ["cuda:0"] * 3
    assert [worker_device_name(i, 0) for i in range(2)] == ["cpu", "cpu"]


def _device_of_this_worker():
    from cryopipe.engine.dask_backend import _worker_device

    return str(_worker_device())


def test_local_workers_are_pinned_to_fake_gpus(monkeypatch):
    """A ``local:3:threads`` cluster told that the machine has 2 GPUs pins its workers 0, 1, 2 to cuda:0, cuda:1,
    cuda:0 (what each task is then given as its device; nothing runs on a GPU here); with 0 GPUs nothing is pinned."""
    monkeypatch.delenv("CRYOPIPE_WORKER_DEVICE", raising=False)
    be = make_backend("local:3:threads", gpus=2)
    try:
        info = be.client.scheduler_info()["workers"]
        names = {addr: int(w["name"]) for addr, w in info.items()}
        got = {a: be.client.submit(_device_of_this_worker, workers=[a], pure=False).result() for a in names}
        assert sorted((names[a], d) for a, d in got.items()) == [(0, "cuda:0"), (1, "cuda:1"), (2, "cuda:0")]
        assert "pinned round-robin to 2 GPU(s)" in be.describe()
    finally:
        be.close()
    be = make_backend("local:1:threads", gpus=0)
    try:
        assert be.client.submit(_device_of_this_worker, pure=False).result() == "cpu"
    finally:
        be.close()


def test_workers_retired_during_a_broadcast_scatter_count_as_a_lost_scheduler():
    """A scheduler shut down during ``scatter(broadcast=True)`` retires its workers first and answers the client
    with a ValueError from ``replicate`` while the client still reports ``running``: the job must get the one-line
    "lost the Dask scheduler" error (seen once in the suite under load), while a task's own ValueError is not
    taken for a lost scheduler."""
    from types import SimpleNamespace

    from cryopipe.engine.dask_backend import DaskBackend
    from cryopipe.errors import CryopipeError

    backend = DaskBackend.__new__(DaskBackend)
    backend.spec, backend._static = "tcp://127.0.0.1:1", None

    def scatter(*args, **kwargs):
        raise ValueError("Can not use replicate to delete data")

    backend.client = SimpleNamespace(status="running", scatter=scatter)
    with pytest.raises(CryopipeError, match="lost the Dask scheduler"):
        backend.map(lambda *a: a, object(), object(), [1, 2])
    assert not backend._scheduler_lost(ValueError("images are 40x40, expected 48x48"))
