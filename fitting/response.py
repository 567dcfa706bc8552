"""Response models: what the fitting loop calls to get per-PMT expectations from event parameters.

The loop sees only :class:`ResponseModel` (design §3, §5): ``expected(event_params) -> dict`` with

* ``mu`` (E,P) expected direct p.e. per PMT,
* ``t_mean`` (E,P) [ns] mean arrival time of the direct light (incl. the PMT time offset, before TTS),
* ``t_var`` (E,P) [ns^2] its variance from the optics (track length, dispersion; no TTS),
* optionally ``mu_indirect`` (E,P) expected scattered/reflected p.e.

:class:`PhysicsResponse` is the first implementation, wrapping the exact quadrature of
:mod:`physics.expected`; a learned surrogate implements the same interface. Detector constants are the
parameters of the wrapped stages (``medium.abs_scale``, ``medium.rayleigh_scale``, ``sensors.qe_scale``,
``sensors.time_offset``, ``optics.pmt_reflectivity``), so calibration optimises
``PhysicsResponse.parameters()``.
Units: m, ns, MeV (kinetic), nm.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor, nn

from physics import emission
from physics import expected as px
from physics import indirect as pind
from physics.config import ConfigError, check_number
from physics.constants import PARTICLE_MASS, SHOWER_PARTICLES, TRACK_PARTICLES
from physics.optics import orthonormal_basis
from physics.sensors import spe_moments

from .uncertainty import highland_kink_variance

__all__ = ["ResponseModel", "PhysicsResponse", "check_event_params", "indirect_template"]


def check_event_params(params: dict[str, Tensor], required: tuple[str, ...]) -> int:
    """Validate an event-parameter dict; returns E. Raises ConfigError naming the key, shape or bad value.

    vertex (E,3) [m], direction (E,3) (non-zero), energy (E,) [MeV] >= 0, t0 (E,) [ns],
    n_photons (E,) >= 0."""
    if not isinstance(params, dict):
        raise ConfigError(f"event_params: got {type(params).__name__}, expected a dict of tensors")
    missing = [k for k in required if k not in params]
    if missing:
        raise ConfigError(f"event_params: missing {missing}; required: {list(required)}")
    v = params["vertex"]
    if not torch.is_tensor(v) or v.dim() != 2 or v.shape[1] != 3 or v.shape[0] == 0:
        raise ConfigError(
            f"event_params['vertex']: got shape {tuple(getattr(v, 'shape', ()))}, expected (E,3), E>0"
        )
    e = v.shape[0]
    shapes = {"vertex": (e, 3), "direction": (e, 3), "energy": (e,), "t0": (e,), "n_photons": (e,)}
    for k, x in params.items():
        if k not in shapes:
            continue
        if not torch.is_tensor(x) or tuple(x.shape) != shapes[k]:
            raise ConfigError(
                f"event_params[{k!r}]: got shape {tuple(getattr(x, 'shape', ()))}, expected {shapes[k]}"
            )
        if not bool(torch.isfinite(x).all()):
            raise ConfigError(f"event_params[{k!r}]: contains NaN/inf; allowed: finite values")
    if "direction" in params and bool((params["direction"].norm(dim=-1) == 0).any()):
        raise ConfigError("event_params['direction']: zero vector; allowed: non-zero 3-vectors")
    for k in ("energy", "n_photons"):
        if k in params and bool((params[k] < 0).any()):
            raise ConfigError(f"event_params[{k!r}]: negative value; allowed: >= 0")
    return e


# optional event-parameter key (E,) long: each row's index in the parameters last given to freeze_indirect
# (fitting.reconstruct passes it, so that a fit evaluating a subset of its events, or repeated copies of
# them, keeps each event's frozen indirect template); responses without a frozen template ignore it
FROZEN_ROW = "frozen_row"


def indirect_template(indirect_trace: int) -> dict[str, Any] | None:
    """The ``indirect`` argument of :class:`PhysicsResponse` for a frozen per-PMT template of
    ``indirect_trace`` traced photons per event (0: None, direct light only); ConfigError if negative or
    not an integer."""
    n = check_number(indirect_trace, "indirect_trace", minimum=0, integer=True)
    return {"n_trace": int(n), "template": True} if n > 0 else None


def _frozen_rows(st: dict[str, Any], rows: Tensor) -> dict[str, Any]:
    """The frozen indirect template of the events ``rows`` (R,) (indices into the frozen events, repeats
    allowed), in that order. Only the template is row-addressable: the traced photons' propagation draws
    its random numbers in photon order, so a subset of them would not reproduce its rows' light."""
    n = st["n"]
    bad = rows.dim() != 1
    if not bad and rows.numel():
        lo, hi = torch.stack(torch.aminmax(rows)).tolist()  # one device sync
        bad = lo < 0 or hi >= n
    if bad:
        raise ConfigError(f"event_params[{FROZEN_ROW!r}]: got {rows.tolist()}, allowed: indices in [0, {n})")
    return {"n": rows.numel(), "template": st["template"][rows]}


class ResponseModel(nn.Module, ABC):
    """Abstract detector response for fitting. Subclasses set ``n_pmts`` and implement :meth:`expected`."""

    n_pmts: int
    #: event-parameter keys the model needs (e.g. ('vertex', 'direction', 'energy', 't0'))
    event_keys: tuple[str, ...] = ()

    @abstractmethod
    def expected(self, event_params: dict[str, Tensor]) -> dict[str, Tensor]:
        """Per-PMT expectations: mu (E,P), t_mean (E,P) [ns], t_var (E,P) [ns^2], optional
        mu_indirect (E,P)."""

    def forward(self, event_params: dict[str, Tensor]) -> dict[str, Tensor]:
        return self.expected(event_params)

    def expected_mu(self, event_params: dict[str, Tensor]) -> Tensor:
        """The ``mu`` entry (E,P) of :meth:`expected` alone, for callers that need only counts (the pre-fit's
        energy seed); a model may skip its time moments here. Default: ``expected(event_params)['mu']``."""
        return self.expected(event_params)["mu"]

    def likelihood_config(self) -> dict[str, Any]:
        """Sensor constants for :class:`fitting.likelihood.HitLikelihood` (spe_rel_var, threshold,
        dark_rate_hz, tts); empty when the model does not know them."""
        return {}

    def contained_energy(self, event_params: dict[str, Tensor]) -> Tensor | None:
        """Kinetic energy (E,) [MeV] at which the particle's light ends where its straight path from the
        vertex along the direction leaves the detector (a stopping track's range reaching the wall), for the
        reconstruction's restart of fits whose track runs past the wall (fitting.reconstruct). Default: None
        (not modelled)."""
        return None

    def ms_kink_expectations(
        self, event_params: dict[str, Tensor], antithetic: bool = False
    ) -> Tensor | None:
        """Direct expectations (E,S,P) of S sampled realisations of the event fluctuations that ``expected``
        averages over (e.g. a track's multiple-scattering kinks), whose mean ``expected`` is (antithetic:
        in pairs of opposite fluctuations). Default: None (not modelled)."""
        return None

    def ms_relative_variance(
        self, event_params: dict[str, Tensor], sets: Tensor | None = None
    ) -> Tensor | None:
        """Relative variance (E,P) of the direct expectation over event fluctuations it averages over (the
        likelihood's obs['mu_rel_var'], negative-binomial counts; see :mod:`fitting.likelihood`); ``sets``:
        this model's :meth:`ms_kink_expectations` at the same parameters, when already computed. Default:
        None (not modelled: Poisson counts)."""
        return None

    #: whether the NLL through this model is smooth enough (twice continuously differentiable) for the
    #: observed Hessian to measure its curvature; False: the reconstruction polishes by Fisher scoring and
    #: reports the inverse expected information (fitting.reconstruct, status bit 'fisher_cov')
    hessian_reliable: bool = True

    def ms_kinks(self, event_params: dict[str, Tensor]) -> dict[str, Tensor] | None:
        """Multiple-scattering kinks of the track for the reported covariance: dict s (E,K) [m] (the track
        nodes that ``expected`` accepts offsets for as event_params['node_offset'] (E,K,6)) and var (E,K)
        [rad^2] per transverse axis; see :func:`fitting.uncertainty.kink_response_covariance`. Default: None
        (not modelled). A model that returns kinks implements :meth:`expected_kinked`."""
        return None

    def expected_kinked(self, event_params: dict[str, Tensor]) -> dict[str, Tensor]:
        """Per-PMT expectations (as :meth:`expected`) of one realisation of the fluctuations that
        :meth:`expected` averages over, given explicitly: the track bent by event_params['node_offset']
        (E,K,6) on the nodes of :meth:`ms_kinks` (displacement [m], direction change [rad]), its rings
        smeared only by the kinks it leaves out, whose per-node moments are the optional
        event_params['node_ms'] (E,K,3) (:func:`fitting.uncertainty.kink_modes`); differentiable in every
        parameter (the hybrid Cramér-Rao bound, :func:`fitting.fisher.hybrid_fisher`). Default:
        NotImplementedError (no kinks modelled)."""
        raise NotImplementedError(f"{type(self).__name__}.expected_kinked: this model has no explicit kinks")


class PhysicsResponse(ResponseModel):
    """Exact direct-light expectation (physics.expected) for a track particle or an isotropic source.

    Args:
      detector: physics.geometry.Detector; medium: physics.medium.Medium;
      sensors: physics.sensors.PMTResponse;
      particle: one of TRACK_PARTICLES ('mu-', 'mu+', 'pi-', 'pi+'), SHOWER_PARTICLES ('e-', 'e+', 'gamma';
      EM cascade, expected.shower_direct_light) or 'isotropic';
      optics: physics.optics.Optics (its pmt_reflectivity removes light from the photocathode) or None;
      n_track_nodes: track quadrature cells K; n_depth_nodes: cascade longitudinal-profile cells;
      nodes_per_segment: Gauss-Legendre nodes per wavelength segment
      (segments between the knots of the QE and absorption tables); source_wavelength [nm] (isotropic source,
      a single line) or None (source spectrum = the band, uniform in wavelength);
      max_elements: chunk events so that E_chunk * P * K * L stays below it (memory bound);
      fold_wavelength: tracks only -- fold the wavelength sum analytically (expected.direct_light_folded,
      O(E P K) instead of O(E P K L); agrees with the exact sum to ~1%, the fast path for reconstruction);
      colour_groups: with fold_wavelength, the number of wavelength bands G folded separately (default 1;
      cost ~G x; 3 brings the folded model's times and ring pattern to the exact sum's, see
      expected.direct_light_folded);
      ms_covariance: tracks only -- model the multiple-scattering kinks of :meth:`ms_kinks` (the
      reconstruction's kink-response covariance; False: pure-Hessian uncertainties) and
      :meth:`ms_relative_variance`;
      ms_samples: sampled kink sets per event of :meth:`ms_relative_variance` (0, the default: not modelled,
      the likelihood stays Poisson; 16 closes the closure's log E pulls, as 32 does, at 0.9-1.45x the fit
      time in WCTE and SK, benchmarks/bench_closure_pulls.py --ms-samples); ms_seed: their common random
      numbers (a fixed seed, so the variance is a deterministic function of the event parameters);
      indirect: None (direct light only) or a mapping with optional keys n_trace (traced photons per event,
      default 2000), seed (default 0), max_rounds (default 4), template (default False): then ``expected``
      also returns
      ``mu_indirect`` (E,P), the scattered and reflected light of :func:`physics.indirect.indirect_light`
      (needs ``optics``). The traced photons come from the simulator's emission in the event frame with fixed
      random numbers and move rigidly with vertex/direction (differentiable); their weights scale with the
      photon yield (tracks: :func:`physics.indirect.track_photon_yield`, showers: energy, source: n_photons).
      :meth:`freeze_indirect` fixes the traced photons for a fit (the reconstruction does this at its seed),
      so that the expectation is a smooth function of the parameters; without it each call draws them anew
      at the current energies (same seed, so equal inputs give equal outputs). template=True: the frozen
      indirect light is traced once, at the parameters given to :meth:`freeze_indirect`, and held as a
      per-PMT template scaled by the photon yield (mu_indirect = mu_0 Y(params) / Y_0: its energy
      derivative kept, its vertex and direction derivatives dropped; the scattered and reflected light
      changes slowly with them). The reconstruction freezes at its seed, at each restart and before the
      Hessian, and passes each row's index in the frozen set (``FROZEN_ROW``), so the subsets and copies of
      its events that it evaluates keep their own templates; the template is thus retraced a few times per
      fit instead of at every evaluation (the traced light costs ~50x the direct kernel in WCTE). Without a
      frozen state it is traced as above. Without the template, a subset of the frozen events is traced
      anew (the propagation's random numbers follow the photon order): a fit whose events converge at
      different iterations then sees a changing function (WCTE full optics, 200 traced photons: 2 of 2 fits
      ended at max_iter, 133 s/event).

    Event parameters: vertex (E,3) [m], t0 (E,) [ns] (optional, default 0), and direction (E,3), energy (E,)
    [MeV kinetic] for tracks and showers, or n_photons (E,) for the source; optional node_offset (E,K,6)
    [m, rad] for tracks with fold_wavelength: per track node a displacement and a direction change of a bent
    track (physics.expected.direct_light_folded), e.g. zeros with requires_grad to differentiate with respect
    to multiple-scattering kinks (benchmarks/ms_fit_response.py); with ``expected(..., sharp_rings=True)``
    also node_ms (E,K,3): the multiple-scattering moments of the kinks node_offset leaves out, which smear
    the sharp rings (:func:`fitting.uncertainty.kink_modes`). Returns mu, t_mean, t_var (E,P).
    """

    def __init__(
        self,
        detector: Any,
        medium: nn.Module,
        sensors: nn.Module,
        particle: str = "mu-",
        optics: nn.Module | None = None,
        *,
        n_track_nodes: int = 128,
        n_depth_nodes: int = 48,
        nodes_per_segment: int = 1,
        source_wavelength: float | None = None,
        max_elements: int = 20_000_000,
        fold_wavelength: bool = False,
        colour_groups: int = 1,
        ms_covariance: bool = True,
        ms_samples: int = 0,
        ms_seed: int = 0,
        indirect: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        allowed = TRACK_PARTICLES + SHOWER_PARTICLES + ("isotropic",)
        if particle not in allowed:
            raise ConfigError(f"particle: got {particle!r}, allowed: {list(allowed)}")
        self.detector = detector
        self.medium = medium
        self.sensors = sensors
        self.optics = optics
        self.particle = particle
        # the cascade's Raedel-Wiebusch angular density has a cusp at the Cherenkov angle (|cos - 1/n|^C,
        # C < 1): its cell average is once differentiable only, and the observed Hessian of a shower fit is
        # spiky (fitting.reconstruct._fisher_polish)
        self.hessian_reliable = particle not in SHOWER_PARTICLES
        self.fold_wavelength = bool(fold_wavelength)
        self.colour_groups = check_number(colour_groups, "colour_groups", minimum=1, integer=True)
        if self.colour_groups != 1 and not (self.fold_wavelength and particle in TRACK_PARTICLES):
            raise ConfigError(
                f"colour_groups: got {colour_groups} for particle {particle!r} with fold_wavelength="
                f"{self.fold_wavelength}; allowed: 1, or more for tracks {list(TRACK_PARTICLES)} with folding"
            )
        self.ms_covariance = bool(ms_covariance)
        self.ms_samples = check_number(ms_samples, "ms_samples", minimum=0, integer=True)
        if self.ms_samples == 1:
            raise ConfigError("ms_samples: got 1, allowed: 0 (off) or >= 2 (a variance needs two samples)")
        self.ms_seed = check_number(ms_seed, "ms_seed", minimum=0, integer=True)
        self.n_pmts = int(detector.n_pmts)
        if int(sensors.n_pmts) != self.n_pmts:
            raise ConfigError(f"sensors.n_pmts: got {sensors.n_pmts}, expected the detector's {self.n_pmts}")
        self.n_track_nodes = check_number(n_track_nodes, "n_track_nodes", minimum=1, integer=True)
        self.n_depth_nodes = check_number(n_depth_nodes, "n_depth_nodes", minimum=2, integer=True)
        # R&W angular distribution centre, the same 1/n_eff as the simulator (physics.emission)
        self._n_eff = emission._effective_index(medium) if particle in SHOWER_PARTICLES else None
        self.nodes_per_segment = check_number(nodes_per_segment, "nodes_per_segment", minimum=1, integer=True)
        self.max_elements = check_number(max_elements, "max_elements", minimum=1, integer=True)
        self.source_wavelength = (
            None
            if source_wavelength is None
            else check_number(
                source_wavelength, "source_wavelength", minimum=medium.wl_min, maximum=medium.wl_max
            )
        )
        if particle == "isotropic":
            self.event_keys = ("vertex", "n_photons")
        else:
            self.event_keys = ("vertex", "direction", "energy")
        self.indirect = None
        if indirect is not None:
            unknown = set(indirect) - {"n_trace", "seed", "max_rounds", "template"}
            if unknown:
                raise ConfigError(
                    f"indirect: unknown keys {sorted(unknown)}, allowed: n_trace, seed, max_rounds, template"
                )
            template = indirect.get("template", False)
            if not isinstance(template, bool):
                raise ConfigError(f"indirect.template: got {template!r}, allowed: True or False")
            if optics is None:
                raise ConfigError("indirect: needs optics (wall and PMT reflectivities), got optics=None")
            self.indirect = {
                "n_trace": check_number(
                    indirect.get("n_trace", 2000), "indirect.n_trace", minimum=1, integer=True
                ),
                "seed": check_number(indirect.get("seed", 0), "indirect.seed", minimum=0, integer=True),
                "max_rounds": check_number(
                    indirect.get("max_rounds", 4), "indirect.max_rounds", minimum=1, integer=True
                ),
                "template": template,
            }
        self._frozen: dict[str, Any] | None = None

    # ------------------------------------------------------------------------------------------------------
    def _wavelength_nodes(self, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        m = self.medium
        if self.particle == "isotropic" and self.source_wavelength is not None:
            wl = torch.tensor([self.source_wavelength], dtype=dtype, device=device)
            return wl, torch.ones_like(wl)
        knots = [float(x) for x in self.sensors.qe_wavelength]
        knots += [float(x) for x in getattr(m, "_abs_wl", torch.zeros(0))]  # absorption-table knots
        wl, w = px.wavelength_quadrature(
            m.wl_min, m.wl_max, knots, self.nodes_per_segment, dtype=dtype, device=device
        )
        if self.particle == "isotropic":
            w = w / (m.wl_max - m.wl_min)  # uniform emission over the band, probability weights
        return wl, w

    def _pmt_terms(self, dtype: torch.dtype, device: torch.device) -> dict[str, Tensor]:
        det = self.detector
        keep = self.sensors.qe_scale.to(device=device, dtype=dtype)
        if self.optics is not None:
            keep = keep * (1.0 - self.optics.pmt_reflectivity.to(device=device, dtype=dtype))
        return {
            "pmt_pos": det.pmt_pos.to(device=device, dtype=dtype),
            "pmt_normal": det.pmt_normal.to(device=device, dtype=dtype),
            "pmt_radius": det.pmt_radius.to(device=device, dtype=dtype),
            "det_pmt": keep,
            "time_offset": self.sensors.time_offset.to(device=device, dtype=dtype),
        }

    def expected(self, event_params: dict[str, Tensor], *, sharp_rings: bool = False) -> dict[str, Tensor]:
        """See the class doc; sharp_rings: a track's rings without the accumulated multiple-scattering
        smearing, for a track whose kinks are explicit in event_params['node_offset'] (the spread of
        directions inside each node's own cell stays, and event_params['node_ms'] (E,K,3), when given,
        smears them by the kinks that node_offset leaves out; physics.expected.direct_light_folded)."""
        return self._expected(event_params, sharp_rings)

    def expected_mu(self, event_params: dict[str, Tensor]) -> Tensor:
        """Direct-light mu (E,P) [p.e.] as :meth:`expected` gives it, without the time moments (tracks with
        the folded kernel skip them: physics.expected.direct_light_folded mu_only; the indirect light,
        ``mu_indirect``, is not computed)."""
        return self._expected(event_params, mu_only=True)["mu"]

    def expected_kinked(self, event_params: dict[str, Tensor]) -> dict[str, Tensor]:
        """:meth:`expected` with ``sharp_rings=True``: the track bent by event_params['node_offset']."""
        return self._expected(event_params, True)

    def _expected(
        self,
        event_params: dict[str, Tensor],
        sharp_rings: bool = False,
        group: int = 1,
        mu_only: bool = False,
    ) -> dict[str, Tensor]:
        """:meth:`expected`; sharp_rings: tracks' rings without the MS smearing, group: consecutive copies
        of one straight track sharing the pruning bound (both for :meth:`ms_relative_variance`'s explicitly
        kinked tracks; physics.expected.direct_light_folded); mu_only: the direct mu alone
        (:meth:`expected_mu`)."""
        n_ev = check_event_params(event_params, self.event_keys)
        vertex = event_params["vertex"]
        dtype, dev = vertex.dtype, vertex.device
        t0 = event_params.get("t0")
        t0 = torch.zeros(n_ev, dtype=dtype, device=dev) if t0 is None else t0
        wl, w = self._wavelength_nodes(dtype, dev)
        m = self.medium
        inv_att = 1.0 / m.absorption_length(wl) + 1.0 / m.rayleigh_length(wl) + 1.0 / m.mie_length(wl)
        common = dict(
            wl_weight=w,
            inv_att=inv_att.to(dtype),
            n_group=m.group_index(wl).to(dtype),
            det_wl=(self.sensors.quantum_efficiency(wl) * self.sensors.collection_efficiency).to(dtype),
            acceptance=self.sensors.acceptance,
            **self._pmt_terms(dtype, dev),
        )
        k = 1 if self.particle == "isotropic" else self.n_track_nodes
        shower = self.particle in SHOWER_PARTICLES
        node_offset, node_ms = event_params.get("node_offset"), event_params.get("node_ms")
        if node_ms is not None and not sharp_rings:
            raise ConfigError(
                "event_params['node_ms']: given with sharp_rings=False; allowed only with sharp_rings=True"
            )
        for key, x, width in (("node_offset", node_offset, 6), ("node_ms", node_ms, 3)):
            if x is None:
                continue
            if self.particle not in TRACK_PARTICLES or not self.fold_wavelength:
                raise ConfigError(
                    f"event_params[{key!r}]: given for particle {self.particle!r} with fold_wavelength="
                    f"{self.fold_wavelength}; allowed only for tracks {list(TRACK_PARTICLES)} with folding"
                )
            if not torch.is_tensor(x) or tuple(x.shape) != (n_ev, self.n_track_nodes, width):
                raise ConfigError(
                    f"event_params[{key!r}]: got shape {tuple(getattr(x, 'shape', ()))}, expected "
                    f"{(n_ev, self.n_track_nodes, width)} (per track node)"
                )
        if shower:
            k = 3 * self.n_depth_nodes  # cell centre and both edges
        n_l = (
            12 * self.colour_groups if (self.fold_wavelength or shower) else wl.numel()
        )  # folded: (E,P,K,12 G) Hermite rows dominate
        chunk = max(1, self.max_elements // max(1, self.n_pmts * k * n_l))
        chunk = max(group, chunk - chunk % group)  # whole groups per chunk
        outs = []
        for a in range(0, n_ev, chunk):
            sl = slice(a, a + chunk)
            if shower:
                det = self.detector
                o = px.shower_direct_light(
                    vertex[sl],
                    event_params["direction"][sl],
                    event_params["energy"][sl].to(dtype),
                    t0[sl],
                    particle=self.particle,
                    wl=wl,
                    refr_index=m.refractive_index(wl).to(dtype),
                    radiation_length=m.radiation_length,
                    density=m.density,
                    n_eff=self._n_eff,
                    n_depth_nodes=self.n_depth_nodes,
                    wall=(det.shape, det.radius, det.height),
                    **common,
                )
            elif self.particle == "isotropic":
                o = px.isotropic_direct_light(
                    vertex[sl], event_params["n_photons"][sl].to(dtype), t0[sl], **common
                )
            else:
                o = self._track(
                    vertex[sl],
                    event_params["direction"][sl],
                    event_params["energy"][sl].to(dtype),
                    t0[sl],
                    wl,
                    m,
                    common,
                    None if node_offset is None else node_offset[sl],
                    sharp_rings,
                    group,
                    None if node_ms is None else node_ms[sl],
                    mu_only,
                )
            outs.append(o)
        if mu_only:
            return {"mu": torch.cat([o["mu"] for o in outs])}
        out = {key: torch.cat([o[key] for o in outs]) for key in ("mu", "t_mean", "t_var")}
        if self.indirect is not None:
            out["mu_indirect"] = self._indirect(event_params, t0)
        return out

    # ------------------------------------------------------------------------------------------------------
    def _yield(self, event_params: dict[str, Tensor]) -> Tensor:
        """Emitted photons per event (E,), differentiable: the weight scale of the traced photons."""
        if self.particle == "isotropic":
            return event_params["n_photons"]
        e = event_params["energy"]
        if self.particle in SHOWER_PARTICLES:
            return e  # Raedel-Wiebusch: the Cherenkov track length of a cascade is proportional to E
        return pind.track_photon_yield(self.particle, e, self.medium).to(e.dtype)

    def _indirect_state(self, event_params: dict[str, Tensor]) -> dict[str, Any]:
        v = event_params["vertex"]
        n_ev = v.shape[0]
        with torch.no_grad():
            key = event_params["n_photons"] if self.particle == "isotropic" else event_params["energy"]
            gen = torch.Generator().manual_seed(self.indirect["seed"])
            ph, w, pol = pind.canonical_photons(
                self.particle,
                key.detach().double().cpu(),
                self.medium,
                self.indirect["n_trace"],
                gen,
                source_wavelength=self.source_wavelength,
                dtype=v.dtype,
            )
            if self.particle == "isotropic":
                w = w / self.indirect["n_trace"]  # times n_photons (differentiable) in _indirect
                d0 = torch.tensor([[0.0, 0.0, 1.0]], dtype=v.dtype, device=v.device).expand(n_ev, 3)
                y0 = torch.ones(n_ev, dtype=v.dtype, device=v.device)
            else:
                d0 = event_params["direction"].detach()
                y0 = self._yield({k: x.detach() for k, x in event_params.items()}).to(v.dtype)
            ref = orthonormal_basis(d0 / d0.norm(dim=-1, keepdim=True))[0]  # any vector perpendicular to d0
        dev = v.device
        return {
            "n": n_ev,
            "photons": ph.to(dev),
            "w": w.to(dev),
            "pol": None if pol is None else pol.to(dev),
            "ref": ref,
            "y0": y0,
        }

    def freeze_indirect(self, event_params: dict[str, Tensor]) -> None:
        """Fix the traced photons of the indirect light at these parameters (for the duration of a fit)."""
        if self.indirect is not None:
            check_event_params(event_params, self.event_keys)
            self._frozen = self._indirect_state(event_params)
            if self.indirect["template"]:
                with torch.no_grad():
                    p = {k: v.detach() for k, v in event_params.items()}
                    t0 = p.get("t0", torch.zeros_like(p["vertex"][:, 0]))
                    y = self._yield(p).to(p["vertex"].dtype)
                    # per emitted photon; the traced photons are not needed after this
                    self._frozen = {"n": self._frozen["n"], "template": self._indirect(p, t0) / y[:, None]}

    def release_indirect(self) -> None:
        """Forget the frozen traced photons (the next call draws them at its own parameters)."""
        self._frozen = None

    def _indirect(self, event_params: dict[str, Tensor], t0: Tensor) -> Tensor:
        v = event_params["vertex"]
        st = self._frozen
        rows = event_params.get(FROZEN_ROW)
        if st is not None and rows is not None and "template" in st:
            st = _frozen_rows(st, rows.to(device=v.device, dtype=torch.long))
        if st is None or st["n"] != v.shape[0]:
            st = self._indirect_state(event_params)
        elif "template" in st:
            return st["template"].to(v.dtype) * self._yield(event_params).to(v.dtype)[:, None]
        if self.particle == "isotropic":
            d = torch.tensor([[0.0, 0.0, 1.0]], dtype=v.dtype, device=v.device).expand_as(v)
            scale = event_params["n_photons"].to(v.dtype)
        else:
            d = event_params["direction"]
            scale = self._yield(event_params).to(v.dtype) / st["y0"]
        ph, pol = pind.place_photons(st["photons"], st["pol"], v, d, st["ref"], t0)
        gen = torch.Generator(device=v.device).manual_seed(self.indirect["seed"] + 1)
        return pind.indirect_light(
            ph,
            self.detector,
            self.medium,
            self.optics,
            self.sensors,
            v.shape[0],
            gen,
            weight=st["w"] * scale[ph.event],
            polarization=pol,
            max_rounds=self.indirect["max_rounds"],
        )["mu"]

    def _track(
        self,
        vertex: Tensor,
        direction: Tensor,
        energy: Tensor,
        t0: Tensor,
        wl: Tensor,
        m: nn.Module,
        common: dict[str, Any],
        node_offset: Tensor | None = None,
        sharp_rings: bool = False,
        group: int = 1,
        node_ms: Tensor | None = None,
        mu_only: bool = False,
    ) -> dict[str, Tensor]:
        mass = PARTICLE_MASS[self.particle]
        spin_half = self.particle.startswith("mu")

        def dedx(kin: Tensor) -> Tensor:
            return emission.bethe_dedx(kin, mass, m, spin_half=spin_half)

        det = self.detector
        return px.track_direct_light(
            vertex,
            direction,
            energy,
            t0,
            mass=mass,
            wl=wl,
            refr_index=m.refractive_index(wl).to(vertex.dtype),
            dedx=dedx,
            radiation_length=m.radiation_length,
            n_track_nodes=self.n_track_nodes,
            wall=(det.shape, det.radius, det.height),
            fold_wavelength=self.fold_wavelength,
            node_offset=node_offset,
            sharp_rings=sharp_rings,
            node_ms=node_ms,
            prune_group=group,
            colour_groups=self.colour_groups,
            mu_only=mu_only,
            **common,
        )

    def ms_kinks(self, event_params: dict[str, Tensor]) -> dict[str, Tensor] | None:
        """The track's multiple-scattering kinks per quadrature cell, for the reconstruction's kink-response
        covariance (:func:`fitting.uncertainty.kink_response_covariance`): s (E,K) [m] the nodes' mean
        positions along the track (those of ``node_offset``), path (E,K) [m] their path lengths along the
        scattered track, and var (E,K) [rad^2] projected kink variance per axis over each cell's path length
        (Highland,
        PDG eq. 34.16, :func:`fitting.uncertainty.highland_kink_variance`), float64, no gradient. None when
        not modelled: showers, the isotropic source, fold_wavelength=False or ms_covariance=False."""
        if self.particle not in TRACK_PARTICLES or not self.fold_wavelength or not self.ms_covariance:
            return None
        check_event_params(event_params, self.event_keys)
        m = self.medium
        mass = PARTICLE_MASS[self.particle]
        spin_half = self.particle.startswith("mu")
        energy = event_params["energy"].detach().to(torch.float64)
        with torch.no_grad():
            wl, _ = self._wavelength_nodes(torch.float64, energy.device)
            nodes = px.muon_track_nodes(
                energy,
                mass,
                float(m.refractive_index(wl).max()),
                self.n_track_nodes,
                lambda kin: emission.bethe_dedx(kin, mass, m, spin_half=spin_half),
                m.radiation_length,
            )
            path, ds = nodes["path"], nodes["ds"]
            x0 = m.radiation_length
            var = highland_kink_variance(path - 0.5 * ds, path + 0.5 * ds, nodes["kin"], mass, x0)
        return {"s": nodes["s"], "path": path, "var": var}

    def ms_kink_expectations(
        self, event_params: dict[str, Tensor], antithetic: bool = False
    ) -> Tensor | None:
        """Sharp-ring direct expectations (E,S,P) [p.e.] of S = ms_samples sampled multiple-scattering kink
        sets per event (float32, no gradient): bent tracks whose mean is the smeared :meth:`expected`.
        None when not modelled (``ms_kinks`` is None, or ms_samples = 0).

        The kinks are Gaussian with the cells' Highland variances of :meth:`ms_kinks` on both transverse
        axes, drawn from ms_seed (common random numbers: a deterministic function of the event parameters);
        antithetic: in pairs (set S/2 + j is set j with every kink negated, S even), so that the sets' mean
        has no term linear in the kinks (benchmarks/closure_bias_decomposition.py --asimov-sets). Each set
        is propagated to the nodes as in :func:`fitting.uncertainty.kink_response_covariance` (node j turned
        by the kinks before it plus half its own, displaced by sum_k kappa_k (s_j - s_k)), and its
        sharp-ring expectation is evaluated (the chromatic and disk widths plus the spread of directions
        inside each node's own cell, about the renormalised kinked axis; the pairs evaluated are those the
        smeared rings' pruning bound keeps; physics.expected.direct_light_folded).
        Cost: ms_samples expectations per event sharing one pruning bound (prune_group): 0.25 s/event for
        32 sets in WCTE on 2 busy CPU threads, 1.7x less than a bound per set. Raises ConfigError for
        antithetic sets with an odd ms_samples.
        """
        if self.ms_samples == 0:
            return None
        if antithetic and self.ms_samples % 2:
            raise ConfigError(
                f"ms_samples: got {self.ms_samples} with antithetic=True; allowed: an even number (pairs)"
            )
        kinks = self.ms_kinks(event_params)
        if kinks is None:
            return None
        with torch.no_grad():
            n_ev, n_k = kinks["s"].shape
            smp = self.ms_samples
            v = event_params["vertex"]
            gen = torch.Generator().manual_seed(self.ms_seed)
            if antithetic:
                half = torch.randn(smp // 2, n_k, 2, generator=gen, dtype=torch.float64)
                z = torch.cat([half, -half]).to(v.device)
            else:
                z = torch.randn(smp, n_k, 2, generator=gen, dtype=torch.float64).to(v.device)
            kap = z[None] * kinks["var"].sqrt()[:, None, :, None]  # (E,S,K,2) [rad]
            d = event_params["direction"].detach().double()
            e1, e2 = orthonormal_basis(d / d.norm(dim=-1, keepdim=True))
            kv = kap[..., :1] * e1[:, None, None, :] + kap[..., 1:] * e2[:, None, None, :]  # (E,S,K,3)
            s = kinks["s"][:, None, :, None]
            before = torch.cumsum(kv, 2) - kv  # kinks of the cells before node j
            turn = before + 0.5 * kv
            disp = s * before - (torch.cumsum(kv * s, 2) - kv * s)
            off = torch.cat([disp, turn], -1).reshape(n_ev * smp, n_k, 6).float()
            rep = {
                k: x.detach().float().repeat_interleave(smp, 0)
                for k, x in event_params.items()
                if k in ("vertex", "direction", "energy", "t0")
            }
            mu = self._expected({**rep, "node_offset": off}, True, smp, mu_only=True)["mu"]
            return mu.view(n_ev, smp, -1)

    def ms_relative_variance(
        self, event_params: dict[str, Tensor], sets: Tensor | None = None
    ) -> Tensor | None:
        """Relative variance (E,P) of each PMT's direct light over the track's multiple-scattering kinks
        (variance / mean^2 over the kink sets of :meth:`ms_kink_expectations`, or over ``sets`` (E,S,P) from
        there at the same parameters; 0 where that mean is below 1e-9 p.e.): the over-dispersion that the
        likelihood's negative-binomial counts take as obs['mu_rel_var'] (:mod:`fitting.likelihood`). None
        when not modelled (``ms_kinks`` is None, or ms_samples = 0).

        The expectation of :meth:`expected` is the mean over kinks: each node's ring is smeared by the
        accumulated Highland angle. A real event has one bent track whose sharp ring moves as a whole, so a
        PMT near the ring edge sees much more or much less light than the mean.
        Measured at the closure events' truth (500 MeV mu- in WCTE, benchmarks/bench_closure_pulls.py, 400
        MC events, 32 sets, K = 32): summed P(hit) of the PMTs with 0.02 < P(hit) < 0.98 is 539.5 against the
        MC's 532.8 hits (Poisson counts: 589.2), per-PMT chi^2/ndf 2.85 (Poisson: 18.4).
        """
        if sets is None:
            sets = self.ms_kink_expectations(event_params)
        if sets is None:
            return None
        mu = sets.double()
        mean = mu.mean(1)
        lit = mean > 1e-9
        w = mu.var(1) / torch.where(lit, mean, torch.ones_like(mean)) ** 2
        return torch.where(lit, w, torch.zeros_like(w)).to(event_params["vertex"].dtype)

    def contained_energy(self, event_params: dict[str, Tensor]) -> Tensor | None:
        """Tracks (muons, pions): the kinetic energy (E,) [MeV] whose CSDA range (physics.emission.csda_range,
        inverted by physics.emission.range_energy) equals the distance from the vertex to the wall along the
        direction; None for showers and the isotropic source; no gradient; a vertex outside the detector
        gives 0."""
        if self.particle not in TRACK_PARTICLES:
            return None
        check_event_params(event_params, self.event_keys)
        with torch.no_grad():
            v = event_params["vertex"].detach().to(torch.float64)
            d = event_params["direction"].detach().to(torch.float64)
            d = d / d.norm(dim=-1, keepdim=True)
            det = self.detector
            dist = px.wall_exit_distance(v, d, det.shape, float(det.radius), det.height).clamp_min(0.0)
            e = emission.range_energy(self.particle, dist, self.medium)
            return torch.where(dist > 0, e, torch.zeros_like(e)).to(event_params["energy"].dtype)

    def likelihood_config(self) -> dict[str, Any]:
        s = self.sensors
        _, rel_var = spe_moments(s.spe_family, s.spe_sigma)
        return {
            "spe_rel_var": rel_var,
            "threshold": s.threshold_pe,
            "dark_rate_hz": s.dark_rate_hz,
            "tts": s.tts_ns,
        }

    def extra_repr(self) -> str:
        return (
            f"particle={self.particle!r}, n_pmts={self.n_pmts}, n_track_nodes={self.n_track_nodes}, "
            f"n_depth_nodes={self.n_depth_nodes}, "
            f"nodes_per_segment={self.nodes_per_segment}, fold_wavelength={self.fold_wavelength}, "
            f"colour_groups={self.colour_groups}"
        )
