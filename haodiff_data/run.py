"""What ``synth`` and ``degrade`` share: tasks mapped over worker processes in order, results
written to a node's shard sink, stage timers.

A run is a list of tasks; a worker (one object per process, built by a picklable factory) turns
a task into a :class:`TaskResult`; the main process writes results in task order, so output
bytes never depend on the worker count.
"""

from __future__ import annotations

import multiprocessing as mp
import resource
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from haodiff_data.shards import writer


class RunError(RuntimeError):
    """A run that cannot start (e.g. existing output without --resume, a segmenter that cannot load)."""


@dataclass
class TaskResult:
    samples: list[dict[str, Any]] = field(default_factory=list)
    rejects: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    cpu_s: float = 0.0  # CPU time the worker spent on the task (all its threads)
    peak_rss_mib: float = 0.0  # the worker process's peak resident memory so far


class Timer:
    """Accumulates wall time per stage name into a dict: ``with timer("segment"): ...``."""

    def __init__(self, into: dict[str, float]):
        self.into = into

    def __call__(self, name: str) -> _Span:
        return _Span(self.into, name)


class _Span:
    def __init__(self, into: dict[str, float], name: str):
        self.into, self.name = into, name

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.into[self.name] = self.into.get(self.name, 0.0) + time.perf_counter() - self.t0


Worker = Callable[[Any], TaskResult]
# The worker of this process when tasks run in a pool: built once by the pool's initializer.
_worker: Worker | None = None


def _start_worker(factory: Callable[[], Worker]) -> None:
    global _worker
    # Ctrl-C reaches the whole process group; the main process alone stops the run (and the pool),
    # so the workers do not print a traceback each.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker = factory()


def _run_task(task: Any) -> TaskResult:
    assert _worker is not None, "pool worker used before its initializer ran"
    return _timed(_worker, task)


def _timed(worker: Worker, task: Any) -> TaskResult:
    t0 = time.process_time()
    result = worker(task)
    result.cpu_s = time.process_time() - t0
    result.peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    return result


def process_context(preload: tuple[str, ...] = ()) -> Any:
    """How a run starts its processes (workers, a segmentation service). ``preload`` modules are
    imported once by the fork server, so processes do not pay for importing them; it counts only
    if given before the context's first process starts."""
    # forkserver, not fork: a process must not inherit model runtimes or threads from the parent.
    ctx = mp.get_context("forkserver")
    if preload:
        ctx.set_forkserver_preload(list(preload))
    return ctx


def ordered_map(factory: Callable[[], Worker], tasks: Iterable, workers: int,
                preload: tuple[str, ...] = (), ctx: Any = None) -> Iterator[TaskResult]:
    """Each task through a worker built by ``factory`` (once per process), results in task order;
    in this process when ``workers <= 1``. Pool processes come from ``ctx`` (default:
    ``process_context(preload)``)."""
    if workers <= 1:
        worker = factory()
        for task in tasks:
            yield _timed(worker, task)
        return
    ctx = ctx or process_context(preload)
    with ctx.Pool(workers, initializer=_start_worker, initargs=(factory,)) as pool:
        yield from pool.imap(_run_task, tasks, chunksize=1)


def drive(results: Iterator[TaskResult], sink: writer.ShardSink, first_task: int, n_tasks: int,
          total: int, progress: bool) -> tuple[int, Counter]:
    """Write task results in order, committing shards; returns (samples made, stage seconds). The
    workers' CPU seconds are counted under ``"cpu"``, the largest worker peak RSS (MiB) under
    ``"peak_rss_mib"``."""
    timings: Counter[str] = Counter()
    made = 0
    bar = tqdm(total=total or None, unit="sample", disable=not progress, dynamic_ncols=True)
    try:
        for n, result in enumerate(results, start=first_task + 1):
            for sample in result.samples:
                sink.add(sample)
            for record in result.rejects:
                sink.reject(record)
            timings.update(result.timings)
            timings["cpu"] += result.cpu_s
            timings["peak_rss_mib"] = max(timings["peak_rss_mib"], result.peak_rss_mib)
            made += len(result.samples)
            bar.update(len(result.samples) + sum(len(r["samples"]) for r in result.rejects))
            sink.task_done(n)
        sink.finish(n_tasks)
    except BaseException:
        sink.abort()
        raise
    finally:
        bar.close()
    return made, timings


def open_sink(out: Path, prefix: str, node_rank: int, identity: dict, resume: bool, samples_per_shard: int,
              listing_rejects: list[dict] | None = None) -> writer.ShardSink:
    """The node's shard sink, continuing a committed state under ``resume``; a new state starts
    with ``listing_rejects`` (inputs that never became sources)."""
    out.mkdir(parents=True, exist_ok=True)
    state = writer.load_state(out, prefix, node_rank)
    if state is not None and not resume:
        raise RunError(f"{out} already holds a run of prefix {prefix!r} node {node_rank}: pass --resume or a new --out")
    if state is not None and state.config != identity:
        changed = sorted(k for k in identity if state.config.get(k) != identity[k])
        raise RunError(f"--resume: the run in {out} used different settings ({', '.join(changed)})")
    if state is None:
        state = writer.NodeState(config=identity, rejects=list(listing_rejects or []))
    writer.clean_uncommitted(out, prefix, node_rank, state.next_shard)
    return writer.ShardSink(out, prefix, node_rank, samples_per_shard, state)
