"""photonfit.fitting: response models, likelihoods, reconstruction, calibration and the CLI."""
