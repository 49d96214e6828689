"""Data-parallel training with PyTorch's DistributedDataParallel: under torchrun, or `--nproc N`, which
runs torchrun itself. NCCL on GPUs, gloo on CPUs. Process 0 writes checkpoints and outputs."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        """Element-wise sum over the processes (the values themselves with one process)."""
        if self.size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
        dist.all_reduce(t)
        return t.tolist()

    def broadcast_buffers(self, model: torch.nn.Module) -> None:
        for b in model.buffers():
            dist.broadcast(b.data, 0)

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


def launched() -> bool:
    """Started by torchrun (or by --nproc) as one of several processes."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def current() -> World:
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def init(device: torch.device) -> tuple[World, torch.device]:
    """Join the process group torchrun describes in the environment; each process gets its own GPU, or
    an equal share of the CPU cores (torchrun would otherwise leave every process one thread)."""
    if not launched():
        return World(), device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
        torch.set_num_threads(max(1, (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1) // per_node))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return current(), device


def backend() -> str | None:
    return dist.get_backend() if dist.is_available() and dist.is_initialized() else None


def finish() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def launch(args: list[str], nproc: int) -> int:
    """Run `compress ARGS` as `nproc` processes on this machine through torchrun. The processes' own
    one-line errors are shown once, torchrun's report of them is not; exit 2 when a process refused."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "cli.main", *args]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}  # init() sets threads per process
    r = subprocess.run(cmd, stderr=subprocess.PIPE, text=True, env=env)
    errors = list(dict.fromkeys(line for line in r.stderr.splitlines() if line.startswith(("error:", "gate failed:"))))
    if r.returncode == 0:
        sys.stderr.write(r.stderr)
        return 0
    if errors:
        print("\n".join(errors), file=sys.stderr)
        return 2 if errors[0].startswith("error:") else 1
    print(f"error: the {nproc} training processes failed (torchrun exit {r.returncode}): "
          f"{(r.stderr.strip().splitlines() or ['no output'])[-1][:200]}", file=sys.stderr)
    return 1
