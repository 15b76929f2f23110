"""Model utilities: module lookup and modes, the shared forward and backward, output kinds, tracing, token layouts and
layer lookup.

Everything public is re-exported from :mod:`lightning_interp.methods`."""
