"""The torch process group of a local run, with its rendezvous store on 127.0.0.1.

Ray Train's torch backend lets rank 0 host the `TCPStore` that the workers meet
at, and torch binds that server to every interface (`::`), with no
authentication: anyone who reaches the port could join or poison the
rendezvous. For the private local Ray (every worker on this machine) rank 0
instead hosts the store on a socket it binds to 127.0.0.1 itself (torch's
`master_listen_fd`), and every rank, rank 0 included, joins it as a client
(torch's agent-store mode). The process group itself is then the usual one
(gloo on CPU, NCCL on GPU). On a cluster the store has to be reachable from the
other nodes, so Ray's own backend is used there (see the README's security notes).
"""
from __future__ import annotations

import os
import socket
from datetime import timedelta

from ray.train.torch import TorchConfig
from ray.train.torch.config import _set_torch_distributed_env_vars, _setup_torch_process_group, _TorchBackend

LOOPBACK = "127.0.0.1"
_store = None  # rank 0's server, alive as long as its worker process


def _serve(world_size: int, timeout_s: int) -> int:
    """On rank 0: start the store on a loopback socket; returns its port."""
    import torch.distributed as dist

    global _store
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((LOOPBACK, 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    _store = dist.TCPStore(LOOPBACK, port, world_size, True, timedelta(seconds=timeout_s),
                           wait_for_workers=False, master_listen_fd=sock.detach())
    return port


def _join(port: int) -> None:
    os.environ.update(MASTER_ADDR=LOOPBACK, MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="True")


class _LoopbackBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config: "LoopbackTorchConfig") -> None:
        import ray

        n = len(worker_group)
        port = worker_group.execute_single(0, _serve, world_size=n, timeout_s=backend_config.timeout_s)
        worker_group.execute(_join, port=port)
        worker_group.execute(_set_torch_distributed_env_vars)
        ray.get([worker_group.execute_single_async(i, _setup_torch_process_group, backend=backend_config.backend,
                                                   world_rank=i, world_size=n, init_method="env://",
                                                   timeout_s=backend_config.timeout_s) for i in range(n)])


class LoopbackTorchConfig(TorchConfig):
    @property
    def backend_cls(self):
        return _LoopbackBackend
