"""HDF5 run files: exact round trip, atomic writes (exceptions and KeyboardInterrupt), clear errors, and the
summary / event display (valid PNGs for a cylinder and a sphere)."""

from __future__ import annotations

import hashlib
import math

import h5py
import numpy as np
import pytest
import torch

import physics
import physics.io as pio
from physics.config import ConfigError
from physics.display import event_display, summary, unrolled_coordinates
from physics.io import RunFileError, list_runs, read_run, write_run
from physics.records import CathodeHits, Hits


def cylinder_detector(radius=2.0, height=4.0, n_phi=48, n_z=16, n_ring=6):
    """Barrel grid + cap rings with inward normals (small WCTE-like layout, independent of geometry.py)."""
    phi = (np.arange(n_phi) + 0.5) * 2 * np.pi / n_phi
    z = (np.arange(n_z) + 0.5) * height / n_z - height / 2
    P, Z = np.meshgrid(phi, z, indexing="ij")
    barrel = np.stack([radius * np.cos(P).ravel(), radius * np.sin(P).ravel(), Z.ravel()], 1)
    bn = -np.stack([np.cos(P).ravel(), np.sin(P).ravel(), np.zeros(P.size)], 1)
    caps, cn = [], []
    for sgn in (1, -1):
        for i in range(n_ring):
            r = (i + 0.5) * radius / n_ring
            m = max(1, int(2 * np.pi * r / (radius / n_ring)))
            a = np.arange(m) * 2 * np.pi / m
            caps.append(np.stack([r * np.cos(a), r * np.sin(a), np.full(m, sgn * height / 2)], 1))
            cn.append(np.tile([0.0, 0.0, -sgn], (m, 1)))
    pos = np.concatenate([barrel] + caps)
    nrm = np.concatenate([bn] + cn)
    return {
        "name": "test-cyl",
        "shape": "cylinder",
        "radius": radius,
        "height": height,
        "pmt_pos": torch.tensor(pos),
        "pmt_normal": torch.tensor(nrm),
        "pmt_radius": torch.full((len(pos),), 0.04),
    }


def sphere_detector(radius=17.7, n=3000):
    """Fibonacci-sphere layout (JUNO-like)."""
    i = np.arange(n) + 0.5
    cz = 1 - 2 * i / n
    phi = np.pi * (1 + 5**0.5) * i
    s = np.sqrt(1 - cz**2)
    u = np.stack([s * np.cos(phi), s * np.sin(phi), cz], 1)
    return {
        "name": "test-sphere",
        "shape": "sphere",
        "radius": radius,
        "height": None,
        "pmt_pos": torch.tensor(radius * u),
        "pmt_normal": torch.tensor(-u),
        "pmt_radius": torch.full((n,), 0.254),
    }


def make_run(n_events=6, n_pmts=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = 300
    hits = Hits(
        pmt=torch.randint(0, n_pmts, (n,), generator=g),
        charge=torch.rand(n, generator=g) * 5,
        time=torch.randn(n, generator=g, dtype=torch.float64) * 3 + 20,
        event=torch.randint(0, n_events, (n,), generator=g),
    )  # deliberately unsorted
    truth = {
        "vertex": torch.randn(n_events, 3, generator=g),
        "direction": torch.randn(n_events, 3, generator=g),
        "energy": torch.rand(n_events, generator=g, dtype=torch.float64) * 500,
        "particle": np.array(["mu-", "e-", "gamma", "mu+", "e+", "mu-"][:n_events]),
        "custom_gain": torch.arange(n_events, dtype=torch.int32),
    }
    m = 200
    photons = CathodeHits(
        pmt=torch.randint(0, n_pmts, (m,), generator=g),
        t=torch.rand(m, generator=g),
        wavelength=300 + 300 * torch.rand(m, generator=g),
        cos_incidence=torch.rand(m, generator=g),
        event=torch.randint(0, n_events, (m,), generator=g),
        indirect=torch.rand(m, generator=g) < 0.3,
    )
    c, s = 50, 128
    waveforms = {
        "samples": torch.randint(-100, 4000, (c, s), generator=g, dtype=torch.int16),
        "event": torch.randint(0, n_events, (c,), generator=g),
        "pmt": torch.randint(0, n_pmts, (c,), generator=g),
        "t_start": torch.rand(c, generator=g) * 100,
        "sampling_ns": 2.0,
    }
    config = {
        "detector": "wcte",
        "medium": {"name": "water", "abs_scale": 1.0},
        "sensors": "default",
        "list": [1, 2.5, "x"],
        "nested": {"a": None, "b": True},
    }
    return dict(
        config=config,
        seed=1234567890123,
        truth=truth,
        hits=hits,
        n_events=n_events,
        photons=photons,
        waveforms=waveforms,
        truth_units={"custom_gain": "1"},
    )


def _files(folder):
    return sorted(p.name for p in folder.iterdir())


def test_round_trip_preserves_every_field(tmp_path):
    kw = make_run()
    det = cylinder_detector()
    path = write_run(tmp_path / "r.h5", detector=det, **kw)
    assert _files(tmp_path) == ["r.h5"]
    run = read_run(path)
    assert run.config == kw["config"] and run.seed == kw["seed"] and run.version == physics.__version__
    assert run.n_events == kw["n_events"] and run.name == "run0" and run.created.endswith("+00:00")
    order = torch.argsort(kw["hits"].event, stable=True)
    for f in ("pmt", "charge", "time", "event"):
        a, b = getattr(kw["hits"], f)[order], getattr(run.hits, f)
        assert a.dtype == b.dtype and torch.equal(a, b), f
    counts = np.bincount(kw["hits"].event.numpy(), minlength=kw["n_events"])
    assert run.offsets.tolist() == [0] + np.cumsum(counts).tolist()
    for k, v in kw["truth"].items():
        if isinstance(v, np.ndarray):
            assert (run.truth[k] == v).all()
        else:
            assert run.truth[k].dtype == v.dtype and torch.equal(run.truth[k], v), k
    assert type(run.photons) is CathodeHits
    for f in ("pmt", "t", "wavelength", "cos_incidence", "event", "indirect"):
        assert torch.equal(getattr(run.photons, f), getattr(kw["photons"], f)), f
    for k in ("samples", "event", "pmt", "t_start"):
        assert torch.equal(run.waveforms[k], kw["waveforms"][k]), k
    assert run.waveforms["samples"].dtype == torch.int16 and run.waveforms["sampling_ns"] == 2.0
    for k in ("pmt_pos", "pmt_normal", "pmt_radius"):
        assert torch.equal(run.detector[k], det[k])
    assert run.detector["shape"] == "cylinder" and run.detector["height"] == 4.0
    # units on every dataset
    with h5py.File(path) as f:
        names = []
        f["run0"].visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        assert all("unit" in f["run0"][n].attrs for n in names)
        ds = f["run0/waveforms/samples"]
        assert ds.compression == "gzip" and ds.chunks is not None
    assert set(run.units) == set(names)
    expect_units = {
        "hits/time": "ns",
        "hits/charge": "p.e.",
        "truth/vertex": "m",
        "truth/energy": "MeV",
        "photons/wavelength": "nm",
        "photons/t": "ns",
        "waveforms/t_start": "ns",
        "waveforms/samples": "ADC counts",
        "detector/pmt_pos": "m",
        "truth/custom_gain": "1",
    }
    for k, u in expect_units.items():
        assert run.units[k] == u, k
    # CSR slice gives the event's hits
    e = run.event_hits(2)
    assert (e.event == 2).all() and len(e) == counts[2]


def test_existing_file_overwrite_and_append(tmp_path):
    kw = make_run()
    p = tmp_path / "r.h5"
    write_run(p, **kw)
    with pytest.raises(FileExistsError, match="already exists"):
        write_run(p, **kw)
    kw2 = make_run(seed=5)
    write_run(p, run_name="second", append=True, **kw2)
    assert list_runs(p) == ["run0", "second"]
    assert read_run(p, "second").seed == kw2["seed"]
    assert torch.equal(read_run(p, "run0").truth["vertex"], kw["truth"]["vertex"])
    with pytest.raises(RunFileError, match="pass run="):
        read_run(p)
    with pytest.raises(FileExistsError, match="second"):
        write_run(p, run_name="second", append=True, **kw2)
    write_run(p, overwrite=True, **kw2)  # replaces the whole file
    assert list_runs(p) == ["run0"] and read_run(p).seed == kw2["seed"]
    assert _files(tmp_path) == ["r.h5"]


@pytest.mark.parametrize("exc", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_interrupted_write_leaves_no_file(tmp_path, monkeypatch, exc):
    real = pio._write_dataset
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] > 1:
            raise exc
        return real(*a, **k)

    monkeypatch.setattr(pio, "_write_dataset", flaky)
    with pytest.raises(type(exc)):
        write_run(tmp_path / "r.h5", **make_run())
    assert calls["n"] == 2
    assert _files(tmp_path) == []


def test_interrupted_append_keeps_original(tmp_path, monkeypatch):
    p = tmp_path / "r.h5"
    write_run(p, **make_run())
    digest = hashlib.sha256(p.read_bytes()).hexdigest()

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pio, "_write_dataset", boom)
    with pytest.raises(KeyboardInterrupt):
        write_run(p, run_name="b", append=True, **make_run(seed=3))
    assert _files(tmp_path) == ["r.h5"]
    assert hashlib.sha256(p.read_bytes()).hexdigest() == digest


def test_read_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_run(tmp_path / "missing.h5")
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"this is not hdf5" * 100)
    with pytest.raises(RunFileError, match="not an HDF5 file"):
        read_run(garbage)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = np.arange(3)
    with pytest.raises(RunFileError, match="not a photonfit run file"):
        read_run(other)
    p = tmp_path / "r.h5"
    write_run(p, **make_run())
    with pytest.raises(RunFileError, match="'nope' not found"):
        read_run(p, "nope")
    with h5py.File(p, "a") as f:
        del f["run0/hits/charge"]
    with pytest.raises(RunFileError, match="hits/charge is missing"):
        read_run(p)
    write_run(p, overwrite=True, **make_run())
    with h5py.File(p, "a") as f:
        f["run0"].attrs["version"] = "99.0.0"
    with pytest.raises(RunFileError, match="major version"):
        read_run(p)


def test_write_validation(tmp_path):
    kw = make_run()
    bad = dict(kw, truth={**kw["truth"], "vertex": torch.zeros(3, 3)})
    with pytest.raises(ConfigError, match="vertex"):
        write_run(tmp_path / "a.h5", **bad)
    bad = dict(kw, truth_units=None)
    with pytest.raises(ConfigError, match="custom_gain"):
        write_run(tmp_path / "a.h5", **bad)
    bad = dict(kw, config={"x": object()})
    with pytest.raises(ConfigError, match="config"):
        write_run(tmp_path / "a.h5", **bad)
    bad = dict(kw, waveforms={"samples": torch.zeros(3, 4)})
    with pytest.raises(ConfigError, match="waveforms"):
        write_run(tmp_path / "a.h5", **bad)
    assert _files(tmp_path) == []


def test_summary_numbers(tmp_path):
    kw = make_run()
    run = read_run(write_run(tmp_path / "r.h5", **kw))
    txt = summary(run)
    ev = kw["hits"].event.numpy()
    nh = np.bincount(ev, minlength=6)
    q = np.bincount(ev, weights=kw["hits"].charge.double().numpy(), minlength=6)
    assert "events: 6, hits: 300" in txt
    assert f"hits/event: {nh.mean():.3f} +- {nh.std():.3f}" in txt
    assert f"charge/event [p.e.]: {q.mean():.3f} +- {q.std():.3f}" in txt
    assert "config keys: ['detector', 'list', 'medium', 'nested', 'sensors']" in txt


def test_unrolled_coordinates_geometry():
    det = cylinder_detector()
    xy = unrolled_coordinates(det["pmt_pos"].numpy(), det["pmt_normal"].numpy(), 2.0, 4.0)
    pos = det["pmt_pos"].numpy()
    barrel = np.abs(det["pmt_normal"].numpy()[:, 2]) < 0.5
    # barrel: |x| <= pi R and y = z; caps: inside disks of radius R centred at +-(H/2 + R)
    assert np.all(np.abs(xy[barrel, 0]) <= math.pi * 2.0 + 1e-9)
    assert np.allclose(xy[barrel, 1], pos[barrel, 2])
    top = ~barrel & (pos[:, 2] > 0)
    assert np.all(np.hypot(xy[top, 0], xy[top, 1] - 4.0) <= 2.0 + 1e-9)
    bot = ~barrel & (pos[:, 2] < 0)
    assert np.all(np.hypot(xy[bot, 0], xy[bot, 1] + 4.0) <= 2.0 + 1e-9)


@pytest.mark.parametrize("kind", ["cylinder", "sphere"])
def test_event_display_png(tmp_path, kind):
    det = cylinder_detector() if kind == "cylinder" else sphere_detector()
    kw = make_run(n_pmts=len(det["pmt_radius"]))
    run = read_run(write_run(tmp_path / "r.h5", detector=det, **kw))
    out = event_display(run, 1, tmp_path / f"{kind}.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    import matplotlib.image as mpimg

    img = mpimg.imread(out)
    assert img.ndim == 3 and img.shape[0] > 400 and img.shape[1] > 1000
    assert img[..., :3].std() > 0.05  # not a blank canvas
    assert sorted(_files(tmp_path)) == sorted(["r.h5", f"{kind}.png"])
    with pytest.raises(ConfigError, match="event"):
        event_display(run, 99, tmp_path / "x.png")
