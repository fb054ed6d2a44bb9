"""Data-parallel training under torchrun: who this process is, the process group, and rank-0-decides helpers.

torchrun (`python -m torch.distributed.run`) starts one process per device and sets RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR/PORT and TORCHELASTIC_RESTART_COUNT in each. Without them (a plain `seg3d train`) everything here is a
no-op for a world of one, so the single-process path runs exactly as before.

Backend: on a machine with CUDA the group is "cpu:gloo,cuda:nccl" (gradients of a CUDA model go through NCCL,
the small pickled objects rank 0 shares go through gloo); without CUDA, gloo. The group has an explicit timeout
(SEG3D_DIST_TIMEOUT_MIN, default 30 minutes): a rank that waits longer than that for the others fails instead of
hanging, which is the last line of defence behind torchrun's own tear-down of a group whose worker died.
"""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as tdist

from pipeline.errors import Seg3dError

T = TypeVar("T")
TIMEOUT_ENV = "SEG3D_DIST_TIMEOUT_MIN"
DEFAULT_TIMEOUT_MIN = 30.0


def timeout_from_env() -> datetime.timedelta:
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    if not text:
        return datetime.timedelta(minutes=DEFAULT_TIMEOUT_MIN)
    try:
        minutes = float(text)
    except ValueError:
        minutes = -1.0
    if not minutes > 0:
        raise Seg3dError(f"{TIMEOUT_ENV}={text!r} must be a positive number of minutes, e.g. {TIMEOUT_ENV}=30")
    return datetime.timedelta(minutes=minutes)


def restart_count() -> int:
    """How often torchrun has restarted this worker group (0 on the first attempt and outside torchrun)."""
    try:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    except ValueError:
        return 0


@dataclass
class Dist:
    """This process's place in the job. `world == 1` means no process group and every helper is a plain call."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1  # ranks on this machine
    backend: str | None = None

    @classmethod
    def from_env(cls) -> Dist:
        try:
            world = int(os.environ.get("WORLD_SIZE", "1"))
            rank = int(os.environ.get("RANK", "0"))
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        except ValueError as e:
            raise Seg3dError(f"RANK/LOCAL_RANK/WORLD_SIZE must be integers ({e}); launch with torchrun") from None
        if world < 1 or not 0 <= rank < world:
            raise Seg3dError(f"RANK={rank} does not fit WORLD_SIZE={world}; launch with torchrun")
        return cls(rank=rank, world=world, local_rank=local_rank, local_world=max(1, local_world))

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def init(self) -> None:
        """Join the process group (all ranks must call this); a no-op for a world of one."""
        if not self.enabled or tdist.is_initialized():
            self.backend = tdist.get_backend() if tdist.is_initialized() else None
            return
        timeout = timeout_from_env()
        if torch.cuda.is_available():
            if self.local_rank >= torch.cuda.device_count():
                raise Seg3dError(
                    f"LOCAL_RANK {self.local_rank} but only {torch.cuda.device_count()} CUDA device(s) on this machine;"
                    " start at most that many processes per node (--nproc / --nproc_per_node)"
                )
            torch.cuda.set_device(self.local_rank)  # NCCL binds each rank to the device it is current on
            self.backend = "cpu:gloo,cuda:nccl"
        else:
            self.backend = "gloo"
        # torchrun's agent keeps one TCPStore across restarts, so a restarted group would read the addresses the
        # dead attempt left under the same keys (gloo: "connectFullMesh failed ... Connection refused"). A prefix per
        # attempt gives every attempt keys of its own.
        store, rank, world = next(tdist.rendezvous("env://", timeout=timeout))
        store = tdist.PrefixStore(f"seg3d/attempt{restart_count()}", store)
        tdist.init_process_group(backend=self.backend, store=store, rank=rank, world_size=world, timeout=timeout)

    def close(self) -> None:
        if self.enabled and tdist.is_initialized():
            tdist.destroy_process_group()

    def device(self, device: torch.device) -> torch.device:
        """The rank's own device: cuda:LOCAL_RANK for CUDA training, the CPU otherwise."""
        if device.type == "cuda" and self.enabled:
            return torch.device("cuda", self.local_rank)
        return device

    def partition(self, items: list[T]) -> list[T]:
        """Every world-th item from the rank-th: disjoint shares that together are all items, in sorted order."""
        return items[self.rank :: self.world]

    # -- collectives on picklable objects (CPU, gloo) ------------------------------------------------------------

    def barrier(self) -> None:
        if self.enabled:
            tdist.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if not self.enabled:
            return obj
        box = [obj if self.is_main else None]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world
        tdist.all_gather_object(out, obj)
        return out

    def all_mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a tensor over ranks (on its own device: NCCL for CUDA tensors, gloo for CPU ones)."""
        if not self.enabled:
            return value
        total = value.detach().clone()
        tdist.all_reduce(total)
        return total / self.world

    def on_main(self, fn: Callable[[], T], share: Callable[[T], Any] | None = None) -> T:
        """Run `fn` on rank 0 and hand its result to every rank; if it fails, every rank fails with its message.

        `share` picks what the other ranks get of the result (all of it by default), for a result that holds
        objects which must stay on rank 0 (an MLflow tracker, say); rank 0 itself gets the whole result.
        Rank 0 re-raises its own exception; the others raise Seg3dError with the same text for a user error (so each
        prints the one line the CLI prints on rank 0) and RuntimeError for anything else, instead of waiting for a
        result that will never come.
        """
        if not self.enabled:
            return fn()
        outcome: tuple[str, Any]
        if self.is_main:
            try:
                value = fn()
            except BaseException as e:
                kind = "user" if isinstance(e, Seg3dError) else "error"
                self.broadcast((kind, str(e) if kind == "user" else f"{type(e).__name__}: {e}"))
                raise
            self.broadcast(("ok", value if share is None else share(value)))
            return value
        outcome = self.broadcast(None)
        return _unwrap(outcome)

    def agree(self, fn: Callable[[], T]) -> T:
        """Run `fn` on every rank; if it fails on any rank, every rank fails (the first failing rank's message)."""
        error: BaseException | None = None
        value: Any = None
        try:
            value = fn()
        except BaseException as e:
            if not self.enabled:
                raise
            error = e
        if not self.enabled:
            return value
        kind = "ok" if error is None else ("user" if isinstance(error, Seg3dError) else "error")
        message = "" if error is None else (str(error) if kind == "user" else f"{type(error).__name__}: {error}")
        statuses = self.gather((kind, message))
        if error is not None:
            raise error
        for rank, (kind, message) in enumerate(statuses):
            if kind != "ok":
                _unwrap((kind, message), rank)
        return value


def _unwrap(outcome: tuple[str, Any], rank: int = 0) -> Any:
    kind, value = outcome
    if kind == "ok":
        return value
    if kind == "user":
        raise Seg3dError(value)
    raise RuntimeError(f"rank {rank} failed: {value}")


def relaunch_under_torchrun(nproc: int, max_restarts: int, train_args: list[str]) -> int:
    """`seg3d train --nproc N`: start `python -m torch.distributed.run --standalone` with N copies of
    `python -m pipeline.cli train TRAIN_ARGS` on this machine and return its exit status."""
    if nproc < 1:
        raise Seg3dError(f"--nproc must be at least 1, got {nproc}")
    if max_restarts < 0:
        raise Seg3dError(f"--max-restarts must be 0 or more, got {max_restarts}")
    if "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ:
        raise Seg3dError("--nproc inside a torchrun job would start torchrun again; drop --nproc (torchrun sets it)")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        "--max-restarts",
        str(max_restarts),
        "-m",
        "pipeline.cli",
        "train",
        *train_args,
    ]
    child = subprocess.Popen(command)
    try:
        return child.wait()
    except KeyboardInterrupt:
        # Ctrl-C reaches the whole foreground group anyway; SIGTERM (docker stop, a scheduler) reaches only this
        # launcher, so pass it on: torchrun stops its workers, whose own handlers end the run cleanly.
        child.send_signal(signal.SIGTERM)
        child.wait()
        raise
