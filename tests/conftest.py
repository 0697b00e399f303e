"""Shared pytest fixtures and the tiny model configs the tests build (one place for all of them).

Test modules import the configs with `from conftest import TINY_DPG` (pytest puts tests/ on the path).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from haodiff_model.bench import osd as osd_bench
from haodiff_model.nets.dpg import DPGConfig
from haodiff_model.nets.prompt import PromptEmbedderConfig

# DPG at toy width, the one the stage-2 smoke configs use too: a 64 px input gives a 16x16 token grid,
# 2x2 windows of 8 with shift 4; head dims 4 and 6 take the zero-padded SDPA path.
TINY_DPG = DPGConfig.from_dict(osd_bench.TINY_DPG)
# Two performer layers (the official duplicate keys of each layer take part in the checkpoint tests).
TINY_PROMPT = PromptEmbedderConfig(dim_head=16, embed_dim=32, out_tokens=5, num_layers=2, num_heads_performer=2,
                                   num_heads_pool=4, pool_patch=4)
# The `dpg:` section of tiny stage-1 runs: one block per branch RSTB keeps a training step short;
# drop path on, so its generator takes part in the resume checks.
TINY_STAGE1_DPG: dict[str, Any] = {"img_size": 64, "embed_dim": 12, "depths": [2, 2, 1, 1], "num_heads": [3, 3, 2, 2],
                                   "window_size": 8, "drop_path_rate": 0.1}


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread: on a shared, busy 2-core machine two spinning OpenMP threads can make
    small training steps 100x slower; results do not depend on the thread count. Modules opt in
    with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def no_onednn() -> Iterator[None]:
    """oneDNN compiles kernels per new conv shape (seconds each on busy cores); native kernels don't.
    Modules with many differently shaped convs opt in with `pytest.mark.usefixtures("no_onednn")`."""
    previous = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    yield
    torch.backends.mkldnn.enabled = previous


def spawn_ranks(fn: Any, args: tuple, world: int, what: str, limit_s: float = 600) -> None:
    """Run fn(rank, world, port, *args) in `world` spawned processes on a free loopback port; fail
    the test if they take longer than `limit_s` (generous: on a busy shared machine ranks start slowly)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = torch.multiprocessing.spawn(fn, args=(world, port, *args), nprocs=world, join=False)
    deadline = time.monotonic() + limit_s
    while not procs.join(timeout=1):
        if time.monotonic() > deadline:
            for p in procs.processes:
                p.terminate()
            pytest.fail(f"{what} did not finish within {limit_s:.0f} s")


def interrupt_after_shards(cmd: list[str], out: Path, shards: int, how: str) -> subprocess.CompletedProcess:
    """Start ``cmd`` (a haodiff-data run writing to ``out``) in a process group of its own, stop it
    once ``shards`` shards are committed, the way a user would (``ctrl-c``: SIGINT to the whole
    group, as a terminal sends it), `kill PID` or a batch scheduler would (``term``: SIGTERM to the
    main process) or the OOM killer would (``kill``: SIGKILL to the main process), and check that
    no process of the group outlives the run."""
    def default_sigint() -> None:
        # A job started in the background by a non-interactive shell (nohup ... &, some CI runners)
        # inherits SIGINT ignored, and Python then never raises KeyboardInterrupt: give the run the
        # default a terminal user has.
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=default_sigint)
    deadline = time.monotonic() + 300
    while len(list(out.glob("*.tar"))) < shards and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be stopped; make it longer"
    if how == "ctrl-c":
        os.killpg(proc.pid, signal.SIGINT)
    else:
        os.kill(proc.pid, signal.SIGTERM if how == "term" else signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=60)
    deadline = time.monotonic() + 20
    while True:  # workers, a segmentation process, the fork server: all of them end
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        if how == "kill" and time.monotonic() > deadline - 15:
            os.killpg(proc.pid, signal.SIGKILL)  # orphans of a SIGKILLed parent are not this test's subject
        assert time.monotonic() < deadline, f"processes of the interrupted run are still alive: {stderr[-2000:]}"
        time.sleep(0.1)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
