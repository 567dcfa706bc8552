"""photonfit.surrogate: learned components (CBAE waveform model, neural response surrogates)."""
