"""photonfit.surrogate: learned components (CBAE waveform model, neural response surrogates).

``CBAE`` / ``load_cbae``: constrained bottleneck autoencoder for PMT waveforms (arXiv:2203.04604); its
decoder is a learned electronics stage (``expect``), its encoder a parameter estimator (``estimate``).
"""

from surrogate.cbae import CBAE, load_cbae, save_cbae

__all__ = ["CBAE", "load_cbae", "save_cbae"]
