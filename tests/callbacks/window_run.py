"""The unsharded window on 2 CPU processes (gloo), without Lightning: launched by ``test_window.py``.

Each rank trains three copies of the tiny CNN under ``fully_shard`` on the same data for two steps: "window" opens a
window between the steps (rank zero explains the model alone inside; rank one waits at a barrier), "failing window"
too, but rank zero's first map raises inside its backward pass, and "none" opens none. Every rank writes
``OUT_DIR/rank<r>.pt``: per copy its final weights and, for the windows, the collectives counted on entering and
inside rank zero's work, rank zero's maps and an unsharded replica's maps of the same weights, the error caught, and
the parameter groups' sharded state before and after.

Usage: ``python tests/callbacks/window_run.py OUT_DIR``
"""

from __future__ import annotations

import argparse
import copy
import os
import socket
import sys
from datetime import timedelta

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from tests.callbacks.collectives import Counter  # noqa: E402 (after the path set-up)

WORLD_SIZE = 2
PG_TIMEOUT_S = 60


def work(rank: int, port: int, out_dir: str) -> None:
    try:
        run(rank, port, out_dir)
    except BaseException:  # the launcher reports the first rank that failed only: keep each rank's own error
        import traceback

        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as file:
            file.write(traceback.format_exc())
        raise


def run(rank: int, port: int, out_dir: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lightning_interp.callbacks._window import fsdp2_modules, unsharded_window
    from lightning_interp.demo import shapes_cnn
    from lightning_interp.methods import cam, grad_cam, gradient

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE, timeout=timedelta(seconds=PG_TIMEOUT_S))
    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    torch.manual_seed(0)
    initial = shapes_cnn(num_classes=4, width=4)

    def sharded() -> torch.nn.Module:
        net = copy.deepcopy(initial)
        for layer in net:
            if any(True for _ in layer.parameters()):
                fully_shard(layer, mesh=mesh)
        fully_shard(net, mesh=mesh)
        return net

    def step(net: torch.nn.Module, optimizer: torch.optim.Optimizer, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed * 10 + rank)  # each rank its own batch
        x = torch.randn(8, 3, 16, 16, generator=generator)
        y = torch.randint(0, 4, (8,), generator=generator)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        optimizer.step()

    def full_state(net: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.full_tensor().detach().clone() for k, v in net.state_dict().items()}

    probe = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(123))
    report: dict = {"rank": rank}
    for mode in ("window", "failing window", "none"):
        net = sharded()
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        step(net, optimizer, 1)
        fail = mode == "failing window"
        if mode != "none":
            out = report.setdefault(mode, {})
            groups = [g for m in fsdp2_modules(net) for g in m._get_fsdp_state()._fsdp_param_groups]
            out["sharded_before"] = [g.is_sharded for g in groups]
            replica = copy.deepcopy(initial)
            replica.load_state_dict(full_state(net))  # every rank gathers: the weights the window should show
            error = None
            entering, inside = Counter(), Counter()
            try:
                entering.start()
                with unsharded_window(net):
                    entering.stop()  # what opening the window took
                    inside.start()  # what rank zero's work takes inside it
                    if rank == 0:
                        handle = None
                        if fail:  # raises inside the backward pass of the first map, after some groups ran theirs

                            def explode(module, grad_input, grad_output):
                                raise RuntimeError("injected failure inside the window's backward pass")

                            handle = net[3].register_full_backward_hook(explode)
                        try:
                            maps = {
                                "gradient": gradient(net, probe, 0),
                                "grad_cam": grad_cam(net, probe, 0, layer="6"),
                                "cam": cam(net, probe, 0, layer="7", classifier="10"),
                            }
                        finally:
                            if handle is not None:
                                handle.remove()
                        out["maps"] = maps
                        out["replica_maps"] = {
                            "gradient": gradient(replica, probe, 0),
                            "grad_cam": grad_cam(replica, probe, 0, layer="6"),
                            "cam": cam(replica, probe, 0, layer="7", classifier="10"),
                        }
                    inside.stop()
            except RuntimeError as caught:
                error = caught
            finally:
                entering.stop()
                inside.stop()
            out["inside_calls"] = dict(inside.calls)
            dist.barrier()  # rank one waited here while rank zero worked
            out["error"] = None if error is None else str(error)
            out["entering_calls"] = dict(entering.calls)
            out["parameter_groups"] = len(groups)
            out["sharded_after"] = [g.is_sharded for g in groups]
        step(net, optimizer, 2)
        report.setdefault(mode, {})["weights"] = full_state(net)
    torch.save(report, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out_dir")
    args = parser.parse_args()
    import torch.multiprocessing as mp

    mp.start_processes(work, args=(free_port(), args.out_dir), nprocs=WORLD_SIZE, start_method="spawn")


if __name__ == "__main__":
    main()
