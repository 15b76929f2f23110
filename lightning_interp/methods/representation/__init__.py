"""What layers know and how they relate: features, CKA and RSA, linear probes, TCAV, activation maps, attention,
feature visualisation.

Everything public is re-exported from :mod:`lightning_interp.methods`."""
