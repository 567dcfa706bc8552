"""MC vs expected-model mean first-hit time per PMT: the timing check behind the closure's z bias.

Events: N contained 500 MeV mu- from the closure vertex along (0.2, 0.1, 1), direct light only
(bench_closure_pulls.closure_simulator; WCTE from (0, 0, -1.2) m, ``--detector sk``: SK from (0, 0, -5) m).
Per PMT the MC's mean hit time over the events that hit it is compared with the model's mean first-hit time
given a hit, E[t | hit] = int t f(t | hit) dt from the likelihood's own time density
(fitting.likelihood.time_log_density: direct Gaussian with the TTS, flat dark noise), integrated on a grid of
4001 points over [-8, +12] sigma about the direct peak. Both means are over that range: MC hits outside it
(dark p.e. far from the peak: 2.6 % of SK's hits) are left out. (Before this range was applied to the MC, SK's
dark hits far before the peak made the MC look 73-108 ps early.)
The likelihood's density includes the threshold: a hit needs charge >= threshold, so with n p.e. (direct
+ dark) it survives with probability 1 - f_n, f_n = P(q_1 + .. + q_n < threshold) from the likelihood's
Gaussian n-p.e. charge model (fitting.likelihood.sub_threshold_probs); for Poisson counts the first-hit
density is lambda(t) [exp(-Lambda(t)) - exp(-M) sum_k (M - Lambda(t))^k / k! f_(k+1)], M the total mean.
Two more columns: the density without the threshold, and a quadrature with f_n of the sensors' real SPE
shape (sample_spe, 2^22 draws each; SK f_1 0.047 against the Gaussian model's 0.051, f_2 8e-4 against
3.5e-3). ``--ms-samples S`` (with MS): the fit's negative-binomial model, the direct light's scale
G ~ Gamma(mean 1, variance w) with w from S kink sets (PhysicsResponse.ms_relative_variance); the quadrature
averages over 64 quantiles of G, and the script checks it (with the model's f_n) against
time_log_density's closed form (rel_var, below).
Reported per expected-p.e. band: number of PMTs, mean and median of MC - model [ps] and the standard error
of the mean, the means of MC - the other two columns, and the standard deviation of the per-PMT
differences beside the rms statistical error of one PMT's MC mean. Default: the MC with multiple
scattering (MS) against the default fit model (folded wavelengths, K = 32). ``--no-ms``: the MC without
MS against the MC's own physics (X0 -> inf, K = 64, the exact wavelength sum; ``--folded``: the folded
wavelength kernel instead, the no-MS closure's model). ``--track-nodes`` overrides K; ``--colour-groups G``
folds the wavelengths in G bands (physics.expected.direct_light_folded).

    python benchmarks/first_hit_timing.py [--events 400] [--detector wcte|sk] [--no-ms [--folded]]
        [--track-nodes K] [--colour-groups G] [--ms-samples S] [--threads 2]
Writes benchmarks/results/first_hit_timing[_noms][_folded][_sk][_nb][_colourG].json.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import scipy.stats
import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._util import write_json  # noqa: E402
from benchmarks.bench_closure_pulls import DIRECTION, VERTICES, closure_simulator, fit_model  # noqa: E402
from fitting.likelihood import time_log_density  # noqa: E402
from physics.sensors import sample_spe  # noqa: E402

BANDS = ((0.5, 2.0), (2.0, 5.0), (5.0, 20.0), (20.0, 1e9))
GRID = (-8.0, 12.0, 4001)  # the model's integration range [sigma about the direct peak] and points


def below_threshold(sensors, n_max: int = 4, draws: int = 1 << 22, seed: int = 3) -> list[float]:
    """f_n = P(sum of n single-p.e. charges < threshold), n = 1..n_max (unit gain), by sampling."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.zeros(draws, dtype=torch.float64)
    out = []
    for _ in range(n_max):
        q += sample_spe(draws, sensors.spe_family, sensors.spe_sigma, gen, "cpu", torch.float64)
        out.append(float((q < sensors.threshold_pe).double().mean()))
    return out


def model_first_hit(
    mu: Tensor,
    t_mean: Tensor,
    sig: Tensor,
    mu_dark: float,
    window,
    rel_var: Tensor | None,
    below_model: Tensor,
    below_sampled: list[float],
    n_g: int = 64,
) -> tuple[Tensor, Tensor, Tensor, float]:
    """Model mean first-hit times given a hit (C,) [ns] -- the likelihood's density (time_log_density with its
    threshold ``below_model`` (K,)), the same without threshold, and the quadrature below with the sampled
    sub-threshold probabilities -- and the largest relative L1 difference between the quadrature with
    ``below_model`` and time_log_density (a check of both).

    Direct light mu N(t_mean, sig^2) with its mean scaled by G (rel_var w: G ~ Gamma(mean 1, variance w) at
    n_g equal-probability quantiles; None: G = 1, Poisson), flat dark mu_dark over the window; per G the
    first-hit density lambda(t) [exp(-Lambda(t)) - exp(-M) sum_k (M - Lambda(t))^k / k! f_(k+1)], averaged
    over G and normalised on the grid."""
    x = torch.linspace(*GRID[:2], GRID[2], dtype=torch.float64)
    grid = t_mean[:, None] + x[None] * sig[:, None]
    t_lo, t_hi = window
    width = t_hi - t_lo
    if rel_var is None:
        gs = torch.ones(1, mu.numel(), dtype=torch.float64)
    else:
        shape = 1.0 / rel_var.clamp_min(1e-9).double().numpy()
        u = (np.arange(n_g) + 0.5) / n_g
        gs = torch.from_numpy(scipy.stats.gamma.ppf(u[:, None], shape[None], scale=1.0 / shape[None]))
    quad = {"model": torch.zeros_like(grid), "sampled": torch.zeros_like(grid)}
    fs = {"model": below_model.tolist(), "sampled": below_sampled}
    cum_dark = mu_dark * ((grid - t_lo) / width).clamp(0, 1)
    for g in gs:  # quadrature over the direct light's scale
        m = (g * mu)[:, None]
        rate = m * torch.exp(-0.5 * x[None] ** 2) / (sig[:, None] * math.sqrt(2 * math.pi)) + mu_dark / width
        cum = m * torch.special.ndtr(x[None]) + cum_dark
        total = m + mu_dark
        for key, f in fs.items():
            lost = sum(fk * (total - cum) ** k / math.factorial(k) for k, fk in enumerate(f))
            quad[key] += rate * (torch.exp(-cum) - torch.exp(-total) * lost)

    def like(below: Tensor | None) -> Tensor:
        return torch.exp(
            time_log_density(
                grid,
                mu[:, None],
                t_mean[:, None],
                (sig * sig)[:, None],
                torch.full_like(grid, mu_dark),
                window,
                rel_var=None if rel_var is None else rel_var[:, None],
                below=below,
            )
        )

    ref, ref_none = like(below_model), like(None)
    norm = quad["model"] / quad["model"].sum(1, keepdim=True) * (ref.sum(1, keepdim=True))
    check = float(((norm - ref).abs().sum(1) / ref.sum(1)).max())

    def mean(d: Tensor) -> Tensor:
        return (d * grid).sum(1) / d.sum(1)

    return mean(ref), mean(ref_none), mean(quad["sampled"]), check


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=400)
    ap.add_argument("--detector", default="wcte", choices=sorted(VERTICES))
    ap.add_argument("--no-ms", action="store_true", help="MC without MS, fitted model = the MC's physics")
    ap.add_argument("--folded", action="store_true", help="with --no-ms: the folded wavelength kernel")
    ap.add_argument("--track-nodes", type=int, default=None, help="model track nodes (default 64 / 32)")
    ap.add_argument("--colour-groups", type=int, default=1, help="folded model's wavelength bands")
    ap.add_argument("--ms-samples", type=int, default=0, help="with MS: NB first-hit model from S kink sets")
    ap.add_argument("--seed", type=int, default=17)
    ap.add_argument("--min-hits", type=int, default=20, help="PMTs hit in fewer events are skipped")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.ms_samples and a.no_ms:
        raise SystemExit("--ms-samples: only with the MS model (without --no-ms)")
    if a.folded and not a.no_ms:
        raise SystemExit("--folded: only with --no-ms (the default model is already folded)")
    if a.colour_groups != 1 and a.no_ms and not a.folded:
        raise SystemExit("--colour-groups: only with the folded model (with --folded when --no-ms)")
    sim = closure_simulator(a.no_ms, detector=a.detector)
    cfg = sim.cfg
    n_pmt = sim.detector.n_pmts
    hits = sim.run(a.events, seed=a.seed, batch_size=100)["hits"]
    nodes = a.track_nodes or (64 if a.no_ms else 32)
    exact = a.no_ms and not a.folded  # the exact wavelength sum: only the no-MS model without --folded
    resp, like = fit_model(
        sim,
        nodes,
        exact_wavelength=exact,
        no_ms=a.no_ms,
        ms_samples=a.ms_samples,
        colour_groups=a.colour_groups,
    )
    like = like.double()
    d = torch.tensor([DIRECTION], dtype=torch.float64)
    with torch.no_grad():
        params = {
            "vertex": torch.tensor([VERTICES[a.detector]], dtype=torch.float64),
            "direction": d / d.norm(),
            "energy": torch.tensor([500.0], dtype=torch.float64),
            "t0": torch.zeros(1, dtype=torch.float64),
        }
        o = resp.expected(params)
        mu, t_mean = o["mu"][0], o["t_mean"][0]
        sig = (o["t_var"][0] + sim.sensors.tts_ns**2).sqrt()
        sel = mu > BANDS[0][0]  # the PMTs reported
        w = None if not a.ms_samples else resp.ms_relative_variance(params)[0][sel]
        below = like.time.below
        assert below.dim() == 1  # one gain for all PMTs in these detectors
        t_model, t_none, t_sampled, check = model_first_hit(
            mu[sel],
            t_mean[sel],
            sig[sel],
            float(like.mu_dark),
            cfg.dark_window_ns,
            w,
            below,
            below_threshold(sim.sensors),
        )
    # MC hits inside the model's integration range of their PMT
    lo_t, hi_t = t_mean + GRID[0] * sig, t_mean + GRID[1] * sig
    inside = (hits.time >= lo_t[hits.pmt]) & (hits.time <= hi_t[hits.pmt])
    pmt, t_hit = hits.pmt[inside], hits.time[inside].double()
    count = torch.bincount(pmt, minlength=n_pmt).double()[sel]
    t_sum = torch.zeros(n_pmt, dtype=torch.float64).index_add_(0, pmt, t_hit)[sel]
    t2_sum = torch.zeros(n_pmt, dtype=torch.float64).index_add_(0, pmt, t_hit**2)[sel]
    t_mc = t_sum / count.clamp_min(1)
    var_mc = (t2_sum / count.clamp_min(1) - t_mc**2).clamp_min(0) / count.clamp_min(1)
    mu = mu[sel]
    rows = []
    for lo, hi in BANDS:
        m = (mu > lo) & (mu <= hi) & (count >= a.min_hits)
        if not bool(m.any()):
            continue
        diff = (t_mc - t_model)[m]
        rows.append(
            {
                "mu_band_pe": [lo, hi],
                "pmts": int(m.sum()),
                "mean_ps": 1e3 * float(diff.mean()),
                "median_ps": 1e3 * float(diff.median()),
                "mean_err_ps": 1e3 * math.sqrt(float(var_mc[m].sum())) / int(m.sum()),
                "mean_vs_no_threshold_ps": 1e3 * float((t_mc - t_none)[m].mean()),
                "mean_vs_sampled_spe_ps": 1e3 * float((t_mc - t_sampled)[m].mean()),
                # spread of the per-PMT differences against what the MC statistics alone give
                "std_ps": 1e3 * float(diff.std()),
                "stat_rms_ps": 1e3 * math.sqrt(float(var_mc[m].mean())),
            }
        )
        r = rows[-1]
        print(
            f"mu in ({lo:g}, {hi:g}] p.e.: {r['pmts']} PMTs, MC - model first-hit time "
            f"{r['mean_ps']:+.0f} +- {r['mean_err_ps']:.0f} ps (median {r['median_ps']:+.0f}); "
            f"without threshold {r['mean_vs_no_threshold_ps']:+.0f}, sampled SPE "
            f"{r['mean_vs_sampled_spe_ps']:+.0f} ps; "
            f"per-PMT std {r['std_ps']:.0f} ps (statistics {r['stat_rms_ps']:.0f})"
        )
    print(f"quadrature vs fitting.likelihood.time_log_density (threshold): largest L1 difference {check:.2e}")
    name = "first_hit_timing" + ("_noms" if a.no_ms else "") + ("_folded" if a.folded else "")
    name += "" if a.detector == "wcte" else f"_{a.detector}"
    name += "_nb" if a.ms_samples else ""
    name += f"_colour{a.colour_groups}" if a.colour_groups != 1 else ""
    out = {"events": a.events, "detector": a.detector, "multiple_scattering": not a.no_ms, "seed": a.seed}
    out |= {"track_nodes": nodes, "fold_wavelength": not exact, "colour_groups": a.colour_groups}
    out |= {"grid_sigma": list(GRID[:2])}
    out |= {"hits_outside_grid": int((~inside).sum()), "hits": len(hits), "ms_samples": a.ms_samples}
    out |= {"density_check": check, "bands": rows}
    write_json(name, out)


if __name__ == "__main__":
    main()
