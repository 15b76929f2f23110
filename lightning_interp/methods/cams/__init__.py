"""Class activation maps: Grad-CAM and its variants (one weights function each), Score-CAM, CAM.

Everything public is re-exported from :mod:`lightning_interp.methods`."""
