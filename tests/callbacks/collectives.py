"""Counting the collective calls of ``torch.distributed`` in the multi-process test scripts (``window_run.py``,
``sharded_run.py``)."""

from __future__ import annotations


class Counter:
    """Counts the calls of ``torch.distributed``'s collectives while it is active, from ``start()`` to ``stop()``.

    FSDP2, FSDP1, DeepSpeed and Lightning call them as attributes of the ``torch.distributed`` module, so replacing
    the attributes sees each of their calls once (a call that another makes inside ``distributed_c10d``, such as
    ``broadcast_object_list``'s own broadcasts, is not counted again).
    """

    NAMES = (
        "all_gather_single",
        "all_gather_into_tensor",
        "_all_gather_base",
        "all_gather",
        "all_gather_object",
        "reduce_scatter_single",
        "reduce_scatter_tensor",
        "_reduce_scatter_base",
        "all_reduce",
        "broadcast",
        "broadcast_object_list",
        "barrier",
    )
    GATHERS = frozenset({"all_gather_single", "all_gather_into_tensor", "_all_gather_base", "all_gather"})
    """The names that gather parameters (or other tensors) from every rank."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self._saved: dict = {}

    def start(self) -> Counter:
        import torch.distributed as dist

        self._saved = {name: getattr(dist, name) for name in self.NAMES if hasattr(dist, name)}
        for name, original in self._saved.items():

            def counted(*args, _name=name, _original=original, **kwargs):
                self.calls[_name] = self.calls.get(_name, 0) + 1
                return _original(*args, **kwargs)

            setattr(dist, name, counted)
        return self

    def stop(self) -> None:
        import torch.distributed as dist

        for name, original in self._saved.items():
            setattr(dist, name, original)
        self._saved = {}
