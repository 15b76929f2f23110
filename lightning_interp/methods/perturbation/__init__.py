"""Perturbation attribution: occlusion, LIME, KernelSHAP.

Everything public is re-exported from :mod:`lightning_interp.methods`."""
