"""Scoring maps and models: localisation and stability of maps, explanation quality, dataset bias, uncertainty and
calibration.

Everything public is re-exported from :mod:`lightning_interp.methods`."""
