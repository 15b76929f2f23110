"""``python -m lightning_interp.report LOGDIR [-o FILE]``: see :mod:`lightning_interp.report`."""

from lightning_interp.report import main

if __name__ == "__main__":
    main()
