"""Perturbation attribution: occlusion, LIME, KernelSHAP, feature ablation, feature permutation, Shapley value sampling.

Everything public is re-exported from :mod:`lightning_interp.methods`."""
