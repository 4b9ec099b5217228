"""Runs one command as N local ranks with torchrun's environment variables, for
tests/test_tensor_parallel.py and benchmarks/bench_tp.py (each puts tools/ on sys.path: neither
folder imports the other's).

Design decision: the caller hosts the rendezvous store, as torchrun's agent does
(TORCHELASTIC_USE_AGENT_STORE), so a rank's failure report (kv_paged/engine/tensor_parallel.py)
outlives the rank that wrote it.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch.distributed as dist


def free_port() -> int:
    """A TCP port of 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, nproc: int, port: int, threads: int, root: str | Path) -> dict[str, str]:
    """os.environ plus what torchrun sets for `rank` of `nproc` on this machine (the store at
    127.0.0.1:port, hosted by the launcher), OMP_NUM_THREADS = threads, and root on PYTHONPATH."""
    return dict(
        os.environ,
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(nproc),
        LOCAL_WORLD_SIZE=str(nproc),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        TORCHELASTIC_USE_AGENT_STORE="True",
        OMP_NUM_THREADS=str(threads),
        PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )


@contextlib.contextmanager
def start_ranks(
    cmd: Sequence[str],
    nproc: int,
    *,
    threads: int,
    cwd: str | Path,
    store_timeout_s: float,
    logs: Sequence[Path] | None = None,
) -> Iterator[list[subprocess.Popen]]:
    """Hosts the store and starts cmd as ranks 0..nproc-1 in cwd (also put on PYTHONPATH); yields
    their processes. logs: one file per rank for its stdout and stderr (None: this process's).
    On exit, from the block or an error, kills the ranks still running and closes the store."""
    port = free_port()
    store = dist.TCPStore(
        "127.0.0.1",
        port,
        nproc,
        is_master=True,
        wait_for_workers=False,
        timeout=datetime.timedelta(seconds=store_timeout_s),
    )
    procs: list[subprocess.Popen] = []
    try:
        for rank in range(nproc):
            env = rank_env(rank, nproc, port, threads, cwd)
            if logs is None:
                procs.append(subprocess.Popen(list(cmd), cwd=cwd, env=env))
                continue
            with open(logs[rank], "w") as log:  # the child keeps its own descriptor
                procs.append(
                    subprocess.Popen(
                        list(cmd), cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT
                    )
                )
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        del store
