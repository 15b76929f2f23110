"""Gradient and modified-backward attribution: gradient, input × gradient, SmoothGrad, integrated gradients,
GradientSHAP, guided backprop, deconvnet, LRP, DeepLIFT.

Everything public is re-exported from :mod:`lightning_interp.methods`."""
