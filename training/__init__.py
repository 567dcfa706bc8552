"""photonfit.training: Lightning modules, data modules and the training CLI."""
