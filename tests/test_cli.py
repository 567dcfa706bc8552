"""The photonfit command and the end-to-end simulation chain (small, fast runs)."""

from __future__ import annotations

import h5py
import pytest
import torch

from fitting.cli import main
from physics.config import ConfigError
from physics.io import read_run
from physics.simulate import SimConfig, Simulator


def test_simulate_show_round_trip(tmp_path, capsys):
    out = tmp_path / "ev.h5"
    rc = main(
        [
            "simulate",
            "--events",
            "3",
            "--particle",
            "mu-",
            "--energy",
            "300",
            "--vertex",
            "0,0,0",
            "--direction",
            "1,0,0",
            "--waveforms",
            "--seed",
            "5",
            "-q",
            "-o",
            str(out),
        ]
    )
    assert rc == 0 and out.exists()
    run = read_run(out)
    assert run.seed == 5
    assert run.config["simulation"]["particle"] == "mu-"
    assert len(run.hits) > 0 and int(run.hits.event.max()) <= 2
    # one waveform per hit PMT, and its peak is where the hit is
    assert run.waveforms["samples"].shape[0] == len(run.hits)
    png = tmp_path / "ev0.png"
    assert main(["show", str(out), "--event", "1", "--png", str(png)]) == 0
    text = capsys.readouterr().out
    assert "events" in text and png.stat().st_size > 10_000
    with h5py.File(out) as f:  # every dataset carries its unit
        units = []
        f.visititems(lambda _n, o: units.append("unit" in o.attrs) if isinstance(o, h5py.Dataset) else None)
        assert units and all(units)


def test_detectors_lists_every_preset(capsys):
    assert main(["detectors"]) == 0
    text = capsys.readouterr().out
    for name in ("wcte", "iwcd", "sk", "hk", "juno"):
        assert name in text


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--particle", "proton"], "particle"),
        (["--energy", "-5"], "energy"),
        (["--vertex", "0,0,9"], "vertex"),
        (["--detector", "nosuchdetector"], "nosuchdetector"),
        (["--events", "0"], "events"),
        (["--direction", "0,0,0"], "direction"),
    ],
)
def test_bad_arguments_exit_2_naming_the_field(tmp_path, capsys, args, field):
    out = tmp_path / "x.h5"
    rc = main(["simulate", "-q", "-o", str(out), *args])
    err = capsys.readouterr().err
    assert rc == 2 and field in err, err
    assert not out.exists()


def test_existing_output_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "ev.h5"
    out.write_bytes(b"precious")
    rc = main(["simulate", "--events", "1", "--energy", "200", "-q", "-o", str(out)])
    assert rc == 2 and out.read_bytes() == b"precious"


def test_same_seed_same_events_other_seed_different():
    cfg = SimConfig(particle="e-", energy=200.0)
    a = Simulator(cfg).run(2, seed=11)
    b = Simulator(cfg).run(2, seed=11)
    c = Simulator(cfg).run(2, seed=12)
    assert torch.equal(a["hits"].pmt, b["hits"].pmt) and torch.equal(a["hits"].charge, b["hits"].charge)
    assert not torch.equal(a["truth"]["vertex"], c["truth"]["vertex"])
    # random vertices lie inside the detector's fiducial volume
    det = Simulator(cfg).detector
    assert bool(det.inside(a["truth"]["vertex"]).all())


def test_calibration_sources_through_the_chain():
    """An isotropic source at the centre lights both caps and the barrel all around; a laser fired along +x
    from the centre puts its light on the barrel PMTs around (R, 0, 0)."""
    iso = Simulator(
        SimConfig(particle="isotropic", n_photons=2e5, vertex=[0.0, 0.0, 0.0], direction=[1.0, 0.0, 0.0])
    ).run(2, seed=3)
    las_sim = Simulator(
        SimConfig(
            particle="laser",
            n_photons=2e4,
            vertex=[0.0, 0.0, 0.0],
            direction=[1.0, 0.0, 0.0],
            laser_divergence_deg=2.0,
        )
    )
    las = las_sim.run(2, seed=3)
    det = las_sim.detector
    pos = det.pmt_pos[iso["hits"].pmt]
    q = iso["hits"].charge
    for sel in (pos[:, 2] > 1.9, pos[:, 2] < -1.9, pos[:, 0] > 1.5, pos[:, 0] < -1.5):
        assert float(q[sel].sum()) > 0.05 * float(q.sum())
    lp = det.pmt_pos[las["hits"].pmt]
    lq = las["hits"].charge
    centre = (lp * lq[:, None]).sum(0) / lq.sum()
    assert float(centre[0]) > 1.5 and abs(float(centre[1])) < 0.3 and abs(float(centre[2])) < 0.3


def test_scintillator_medium_adds_scintillation_light():
    """A muon in liquid scintillator gives far more light than Cherenkov alone: the LAB yield
    (~1e4 photons/MeV, Birks-quenched) exceeds the Cherenkov yield (~2e2 photons/MeV in the band) by > 10x."""
    kw = dict(
        detector="wcte", particle="mu-", energy=200.0, vertex=[0.0, 0.0, 0.0], direction=[0.0, 0.0, 1.0]
    )
    water = Simulator(SimConfig(medium="water", **kw)).run(1, seed=1)
    ls = Simulator(SimConfig(medium="juno_ls", **kw)).run(1, seed=1)
    assert float(ls["hits"].charge.sum()) > 10 * float(water["hits"].charge.sum())


def test_per_event_kinematics_and_their_errors():
    """run(vertices=, directions=) simulates exactly the given events; bad shapes or points are refused."""
    sim = Simulator(SimConfig(particle="mu-", energy=300.0))
    v = torch.tensor([[0.5, 0.0, 0.0], [-0.5, 0.2, 1.0], [0.0, 0.0, -1.0]])
    d = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0]])
    res = sim.run(3, seed=1, batch_size=2, vertices=v, directions=d)
    assert torch.equal(res["truth"]["vertex"], v)
    assert torch.allclose(res["truth"]["direction"], d / d.norm(dim=1, keepdim=True))
    with pytest.raises(ConfigError, match="vertices"):
        sim.run(3, seed=1, vertices=v[:2], directions=d[:2])
    with pytest.raises(ConfigError, match="outside"):
        sim.run(1, seed=1, vertices=torch.tensor([[0.0, 0.0, 9.0]]), directions=d[:1])
    with pytest.raises(ConfigError, match="both"):
        sim.run(3, seed=1, vertices=v)
