"""e/mu identification by likelihood ratio (fitting.pid).

Independent expectation: the Monte-Carlo truth of physics.simulate (the particle type that made the event,
its vertex and energy). Events: 500 MeV e- and mu- in the WCTE-like detector, contained (vertex near one
end cap, direction within 30 deg of the axis towards the far end; a 500 MeV muon's CSDA range is ~2.3 m),
direct light only (wall/PMT reflection and Rayleigh scattering switched off) with the direct-light
responses, and with the detector's full optics fitted by responses that add their indirect-light template.
"""

from __future__ import annotations

import argparse

import h5py
import pytest
import torch
from scipy.stats import binom

from fitting.pid import add_pid_parser, binomial_upper_limit, contained_sample, identify, sample_models
from physics.config import ConfigError
from physics.records import Hits

MARGIN = 50.0  # |Delta| well above this: a likelihood ratio of e^50 against the wrong type


@pytest.fixture(scope="module")
def mu_events():
    torch.set_num_threads(1)
    return contained_sample("mu-", 3, seed=31)


@pytest.fixture(scope="module")
def e_events():
    torch.set_num_threads(1)
    return contained_sample("e-", 3, seed=30)


# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("particle", ["e-", "mu-"])
def test_contained_events_identified(particle, e_events, mu_events):
    """3 contained 500 MeV events per type: all fits ok, every event's type right with |Delta| > 50 of the
    right sign; the true hypothesis' fit is within 0.3 m and 10% of the MC vertex and energy; the muon
    hypothesis always needs more energy than the electron one for the same light (a muon radiates less
    Cherenkov light per MeV: no light below its ~160 MeV threshold, ionisation losses only)."""
    sim, res = e_events if particle == "e-" else mu_events
    resp, like = sample_models(sim)
    r = identify(res["hits"], 3, resp, like, max_iter=30)
    tr = res["truth"]
    fit = r["fits"][particle]
    dv = (fit["vertex"] - tr["vertex"].double()).norm(dim=-1)
    de = fit["energy"] / tr["energy"].double() - 1
    print(f"{particle}: delta {r['delta'].tolist()} dv {dv.tolist()} de {de.tolist()} {r['seconds']:.1f} s")
    assert bool(r["ok"].all())
    assert r["particle"] == [particle] * 3
    sign = 1.0 if particle == "e-" else -1.0
    assert float((sign * r["delta"]).min()) > MARGIN
    assert float(dv.max()) < 0.3 and float(de.abs().max()) < 0.10
    assert bool((r["fits"]["mu-"]["energy"] > r["fits"]["e-"]["energy"]).all())
    # Delta is the difference of the reported per-hypothesis NLLs
    i_mu, i_e = r["hypotheses"].index("mu-"), r["hypotheses"].index("e-")
    assert torch.allclose(r["delta"], r["nll"][:, i_mu] - r["nll"][:, i_e])


def test_bad_input_flagged(mu_events):
    """A good event next to one with a NaN charge and one without hits: the bad ones are flagged (ok False,
    choice -1, Delta NaN) and the good one is still identified; bad hypothesis sets raise ConfigError."""
    sim, res = mu_events
    resp, like = sample_models(sim)
    h = res["hits"]
    m = h.event == 0
    n0 = int(m.sum())
    q = torch.cat([h.charge[m], h.charge[m]]).clone()
    q[n0 + 3] = float("nan")
    hits = Hits(
        pmt=torch.cat([h.pmt[m], h.pmt[m]]),
        charge=q,
        time=torch.cat([h.time[m], h.time[m]]),
        event=torch.cat([torch.zeros(n0), torch.ones(n0)]).long(),
    )
    r = identify(hits, 3, resp, like, max_iter=15)
    print(r["particle"], r["delta"].tolist(), r["status"].tolist())
    assert r["ok"].tolist() == [True, False, False]
    assert r["choice"].tolist()[1:] == [-1, -1] and r["particle"] == ["mu-", "", ""]
    assert bool(torch.isnan(r["delta"][1:]).all()) and float(r["delta"][0]) < -MARGIN
    with pytest.raises(ConfigError, match="responses"):
        identify(hits, 3, {"mu-": resp["mu-"]}, like)
    with pytest.raises(ConfigError, match="shower"):
        identify(hits, 3, {"a": resp["mu-"], "b": resp["mu-"]}, like)
    with pytest.raises(ConfigError, match="hits.event"):
        identify(hits, 1, resp, like)


@pytest.mark.parametrize(
    "particle,n,n_trace",
    [
        ("e-", 1, 200),
        ("mu-", 1, 200),
        pytest.param("e-", 3, 500, marks=pytest.mark.slow),
        pytest.param("mu-", 3, 500, marks=pytest.mark.slow),
    ],
)
def test_full_optics_identified_with_indirect_template(particle, n, n_trace):
    """n contained 500 MeV events per type simulated with the detector's wall/PMT reflection and Rayleigh
    scattering on, each hypothesis' response with its expected indirect light as a frozen template of
    n_trace traced photons: every event's type right with |Delta| > 50, the true hypothesis within 0.3 m and
    6 % of the MC vertex and energy. For electrons (energy ~ total light) the same events fitted with the
    direct-light responses put the indirect charge into the energy: the paired shift of the fitted energy is
    at most f / (1 - f) (all of it; f = the expected indirect fraction of the charge at the truth) and more
    than half of that (the light far from the ring, where the direct model has no place for it, stays out of
    the energy; measured 0.65-0.73 of it)."""
    torch.set_num_threads(1)
    sim, res = contained_sample(particle, n, seed=62 if particle == "e-" else 63, full_optics=True)
    tr = res["truth"]
    resp, like = sample_models(sim, indirect_trace=n_trace)
    r = identify(res["hits"], n, resp, like, max_iter=30)
    fit = r["fits"][particle]
    dv = (fit["vertex"] - tr["vertex"].double()).norm(dim=-1)
    de = fit["energy"] / tr["energy"].double() - 1
    print(f"{particle}: delta {r['delta'].tolist()} dv {dv.tolist()} de {de.tolist()} {r['seconds']:.1f} s")
    assert bool(r["ok"].all())
    assert r["particle"] == [particle] * n
    sign = 1.0 if particle == "e-" else -1.0
    assert float((sign * r["delta"]).min()) > MARGIN
    assert float(dv.max()) < 0.3 and float(de.abs().max()) < 0.06
    if particle == "e-":
        with torch.no_grad():
            out = resp["e-"].expected({k: tr[k].double() for k in ("vertex", "direction", "energy")})
        f = float(out["mu_indirect"].sum() / (out["mu"].sum() + out["mu_indirect"].sum()))
        direct, like0 = sample_models(sim)
        e0 = identify(res["hits"], n, direct, like0, max_iter=30)["fits"]["e-"]["energy"]
        shift = float((e0 / fit["energy"]).log().mean().exp()) - 1
        print(f"indirect fraction {f:.3f}, energy shift without the template {shift:+.3f}")
        assert 0.5 * f / (1 - f) < shift < 1.05 * f / (1 - f)


def test_full_optics_options(tmp_path):
    """contained_sample(full_optics=True) keeps the detector's reflectivities and Rayleigh scattering (the
    default sample has them off); sample_models / photonfit pid --indirect N give every hypothesis an
    N-photon indirect template; bad values raise ConfigError naming the field."""
    from fitting.pid import _responses_for_run

    sim_d, _ = contained_sample("mu-", 1, seed=70)
    sim_f, res = contained_sample("mu-", 1, seed=70, full_optics=True)
    assert sim_d.optics.wall_reflectivity.item() == 0.0 and sim_d.optics.pmt_reflectivity.item() == 0.0
    assert sim_f.optics.wall_reflectivity.item() > 0.0 and sim_f.optics.pmt_reflectivity.item() > 0.0
    assert torch.isinf(sim_d.medium.rayleigh_scale).all()
    assert torch.isfinite(sim_f.medium.rayleigh_scale).all()
    resp, _ = sample_models(sim_f, indirect_trace=300)
    assert all(r.indirect["n_trace"] == 300 and r.indirect["template"] for r in resp.values())
    assert all(r.indirect is None for r in sample_models(sim_f)[0].values())
    for n in (None, 300):
        args = ["e-", "mu-"], 16, 12, *(() if n is None else (n,))
        out, _, _ = _responses_for_run(sim_f.config_dict(), *args)
        assert all((r.indirect is None) if n is None else r.indirect["n_trace"] == n for r in out.values())
    with pytest.raises(ConfigError, match="indirect_trace"):
        sample_models(sim_f, indirect_trace=-1)
    with pytest.raises(ConfigError, match="indirect_trace"):
        _responses_for_run(sim_f.config_dict(), ["e-", "mu-"], 16, 12, 2.5)
    with pytest.raises(ConfigError, match="full_optics"):
        contained_sample("mu-", 1, seed=70, full_optics="yes")


def test_binomial_upper_limit():
    """Clopper-Pearson: k = 0 closed form 1 - (1-CL)^(1/n); for k > 0 P(X <= k | n, p_up) = 1 - CL."""
    assert binomial_upper_limit(0, 230) == pytest.approx(1 - 0.1 ** (1 / 230), rel=1e-9)
    assert binomial_upper_limit(0, 230) < 0.01  # zero misID in 230 events: < 1% at 90% CL
    for k, n in ((1, 10), (3, 200)):
        assert float(binom.cdf(k, n, binomial_upper_limit(k, n))) == pytest.approx(0.1, abs=1e-9)
    with pytest.raises(ConfigError):
        binomial_upper_limit(5, 3)


def test_cli_pid(tmp_path):
    """photonfit pid on a 1-event electron run file (coarse, short fits to keep it quick): writes /pid with
    both hypotheses' fits, the event identified as e- (Delta > 0)."""
    from physics.io import write_run

    sim2, res = contained_sample("e-", 1, seed=40)
    path = write_run(
        tmp_path / "ev.h5",
        config=sim2.config_dict(),
        seed=40,
        truth=res["truth"],
        hits=res["hits"],
        n_events=1,
        detector=sim2.detector,
    )
    ap = argparse.ArgumentParser()
    add_pid_parser(ap.add_subparsers())
    args = ap.parse_args(
        [
            "pid",
            str(path),
            "-o",
            str(tmp_path / "pid.h5"),
            "--max-iter",
            "10",
            "--depth-nodes",
            "12",
            "--track-nodes",
            "16",
        ]
    )
    assert args.func(args) == 0
    with h5py.File(tmp_path / "pid.h5") as f:
        g = f["pid"]
        assert g["delta"].shape == (1,) and g["nll"].shape == (1, 2)
        assert (g["delta"][:] > 0).all() and g["ok"][:].all()
        assert "fit_e-" in g and "fit_mu-" in g


# --------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_misid_rate_slow():
    """32 e- and 32 mu- contained 500 MeV events: no misidentification either way (the 90% CL upper limit
    from 0/32 is 7%; benchmarks/bench_pid.py runs more events), all |Delta| > 50."""
    torch.set_num_threads(1)
    for particle, seed, sign in (("e-", 50, 1.0), ("mu-", 51, -1.0)):
        sim, res = contained_sample(particle, 32, seed=seed)
        resp, like = sample_models(sim)
        r = identify(res["hits"], 32, resp, like, max_iter=30, batch_size=8)
        ok = r["ok"]
        wrong = int((sign * r["delta"][ok] < 0).sum())
        print(
            f"{particle}: ok {int(ok.sum())}/32, misID {wrong}, 90% UL "
            f"{binomial_upper_limit(wrong, int(ok.sum())):.3f}, "
            f"min |Delta| {float((sign * r['delta'][ok]).min()):.0f}"
        )
        assert int(ok.sum()) >= 31 and wrong == 0
        assert float((sign * r["delta"][ok]).min()) > MARGIN
