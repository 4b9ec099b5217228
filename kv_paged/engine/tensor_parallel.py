"""Tensor parallelism for the Engine: the group's first rank decides every step, every rank runs it.

Design decision (vLLM's driver worker; the "TP driver" of transformers' continuous batching): under
torch.distributed, with a model sharded by transformers' tensor-parallel plan, each rank holds its
shard of the weights and a KV pool of its own KV heads (hf.kv_cache_spec), but only the driver (the
tensor-parallel group's first rank) has requests, the Scheduler and the BlockManager. Each step the
driver broadcasts the step's inputs (a StepPlan: the ModelRunner.forward arguments) over a gloo
group of the Engine's own; every rank runs the same forward, the model's collectives combine the
shards, and only the driver samples. There is one decision and one token per sequence per step, so
the ranks' pools always hold the same blocks.

Failures: a rank whose step fails (an exception, Ctrl-C, a collective that broke) writes why into
the default process group's store (under torchrun the agent hosts it, so it outlives any rank),
aborts and destroys its process groups, closes its Engine and raises. A rank blocked in a
collective with it fails when its connections close: at once when it dies or exits (as under
torchrun, which ends every rank once one fails; gloo has no abort), else at the group's timeout;
it then raises with the failed rank's report first, or names the rank that reported nothing.
"""

from __future__ import annotations

import datetime
import pickle
import time
import uuid

import torch
import torch.distributed as dist

from kv_paged.engine.step import StepPlan

# How long a failing rank waits for the other ranks' reports before it raises without them.
REPORT_WAIT_S = 5.0


class TensorParallelGroup:
    """The Engine's view of its tensor-parallel group: who drives, the control messages, failures.

    Construct on every rank of the group at the same point (it creates a process group). timeout:
    seconds a rank waits for a control message (a worker waits for the driver's next step: keep it
    long for a server that idles); None = the default process group's timeout.
    """

    def __init__(self, model, timeout: float | None = None) -> None:
        group = _model_tp_group(model)
        self.ranks: list[int] = dist.get_process_group_ranks(group)
        self.rank = dist.get_rank()
        self.driver = self.ranks[0]
        self.size = len(self.ranks)  # the tensor-parallel degree
        kwargs = {}
        if self.size < dist.get_world_size():
            kwargs["use_local_synchronization"] = True
        self.control = dist.new_group(
            ranks=self.ranks,
            backend="gloo",
            timeout=None if timeout is None else datetime.timedelta(seconds=timeout),
            **kwargs,
        )
        self.failure: str | None = None  # set once the group broke: why
        self.driver_closed = False  # a worker got the driver's "close"
        # Store keys of this engine's failure reports, the same on every rank.
        self._prefix = f"kv_paged/engine/{self._broadcast(uuid.uuid4().hex)}/failed/"

    @classmethod
    def of(cls, model, timeout: float | None = None) -> TensorParallelGroup | None:
        """The group when model is sharded by tensor parallelism over an initialized process
        group, else None (one process, or a whole model per rank)."""
        from kv_paged.integrations import hf

        if hf.tensor_parallel_size(model) <= 1:
            return None
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "Engine: the model is sharded for tensor parallelism but torch.distributed is not "
                "initialized in this process"
            )
        return cls(model, timeout)

    @property
    def is_driver(self) -> bool:
        return self.rank == self.driver

    # ---- control messages --------------------------------------------------------------------------

    def _broadcast(self, obj):
        holder = [obj if self.is_driver else None]
        dist.broadcast_object_list(holder, src=self.driver, group=self.control)
        return holder[0]

    def send(self, kind: str, payload=None) -> None:
        """Driver: one control message to every other rank ("step", "end" or "close")."""
        self._broadcast((kind, payload))

    def receive(self) -> tuple[str, object]:
        """Worker: the driver's next control message (kind, payload)."""
        return self._broadcast(None)

    def drive(self, runner, plan: StepPlan) -> torch.Tensor:
        """Driver: sends the step to every rank and runs its own part of the forward; returns the
        logits (ModelRunner.forward). On any failure the group breaks (fail())."""
        try:
            self.send("step", plan)
            return runner.forward(*plan.args())
        except BaseException as e:
            raise self.fail(e)

    def serve(self, runner, until: tuple[str, ...]) -> tuple[str, object]:
        """Worker: runs the driver's steps until a message of a kind in `until` comes; returns it.
        On any failure the group breaks (fail())."""
        while True:
            try:
                kind, payload = self.receive()
                if kind == "step":
                    runner.forward(*payload.args())
                    continue
            except BaseException as e:
                raise self.fail(e)
            if kind in until:
                return kind, payload

    def lead(self, generate):
        """Driver side of a collective Engine.generate(): returns generate()'s outputs after
        telling the other ranks it ended, or sends them what it raised and raises it."""
        try:
            outputs = generate()
        except BaseException as e:
            if self.failure is None:  # the group is in step: the other ranks raise it too
                self.send("end", _picklable(e))
            raise
        self.send("end", None)
        return outputs

    def follow(self, runner) -> None:
        """Worker side of Engine.generate(): runs the driver's steps until its generate() ends;
        raises what it raised, or a RuntimeError if the driver closed its Engine instead."""
        kind, error = self.serve(runner, ("end", "close"))
        if kind == "close":
            self.driver_closed = True
            raise RuntimeError("generate: rank 0 closed its Engine instead of generating")
        if error is not None:
            raise error

    def agree_min(self, value: int) -> int:
        """The smallest of every rank's value (e.g. the pool size each rank's memory allows)."""
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.control)
        return int(t.item())

    # ---- failures ----------------------------------------------------------------------------------

    def fail(self, exc: BaseException) -> BaseException:
        """This rank's step failed with exc: report it, break the group (so no rank waits on us)
        and return what to raise: exc itself for an interrupt, else a RuntimeError naming the
        rank that failed. When exc is a broken collective (another rank failed or died first),
        wait up to REPORT_WAIT_S for the other ranks' reports and name theirs first."""
        mine = f"rank {self.rank}: {type(exc).__name__}: {exc}"
        store = _default_store()  # kept: it outlives the groups destroyed below
        _store_set(store, f"{self._prefix}{self.rank}", mine)
        _destroy_process_groups()
        collective = _is_collective_error(exc)
        others = self._reports(store) if collective else []
        if others:
            self.failure = "; ".join([*others, f"then here, {mine}"])
        elif collective:
            silent = ", ".join(str(r) for r in self.ranks if r != self.rank)
            self.failure = (
                f"rank {silent} reported nothing (it died, or it exited and took the store with "
                f"it); here, {mine}"
            )
        else:
            self.failure = mine
        if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit: the user's, as is
            return exc
        err = RuntimeError(f"tensor-parallel step failed: {self.failure}")
        err.__cause__ = exc
        return err

    def _reports(self, store) -> list[str]:
        """The other ranks' failure reports, waiting up to REPORT_WAIT_S for the first."""
        if store is None:
            return []
        keys = {r: f"{self._prefix}{r}" for r in self.ranks if r != self.rank}
        deadline = time.monotonic() + REPORT_WAIT_S
        found: dict[int, str] = {}
        while True:
            for r, key in keys.items():
                try:
                    if r not in found and store.check([key]):
                        found[r] = store.get(key).decode(errors="replace")
                except Exception:  # the store went away with its host
                    return [found[r] for r in sorted(found)]
            if found or time.monotonic() > deadline:
                return [found[r] for r in sorted(found)]
            time.sleep(0.05)


def _picklable(exc: BaseException) -> BaseException:
    """exc, or a RuntimeError with its text when exc cannot travel to another rank (pickle)."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"rank 0: {type(exc).__name__}: {exc}")


def _store_set(store, key: str, value: str) -> None:
    """store.set, if there is a store and its host is still there (else the local report stands)."""
    if store is not None:
        try:
            store.set(key, value)
        except Exception:
            pass


def _is_collective_error(exc: BaseException) -> bool:
    """Whether exc is a collective that broke (a peer closed its connection, a timeout) rather
    than this rank's own failure."""
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc)
    return any(s in text for s in ("gloo", "Gloo", "NCCL", "Connection closed", "Connection reset"))


def _model_tp_group(model):
    """The process group of model's tensor-parallel dimension (transformers' device mesh)."""
    mesh = getattr(model, "_device_mesh", None)
    if mesh is None:
        return dist.group.WORLD
    names = getattr(mesh, "mesh_dim_names", None)
    if names is not None and "tp" in names:
        mesh = mesh["tp"]
    return mesh.get_group()


def _default_store():
    """The default process group's key-value store (where failure reports go), or None."""
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:
        return None


def _destroy_process_groups() -> None:
    """Aborts and destroys every process group of this process. Aborting stops NCCL
    communicators; gloo has no abort, so a rank waiting on this one in a gloo collective fails
    when this process exits (connection closed), or at the group's timeout if it lives on."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    for group in list(dist.distributed_c10d._world.pg_names):
        try:
            group.abort()
        except Exception:
            pass
    try:
        dist.destroy_process_group()
    except Exception:
        pass
