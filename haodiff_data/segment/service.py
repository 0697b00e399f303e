"""One Sapiens process per device, shared by every ``synth`` worker.

Workers decode, crop and degrade on the CPUs; each sends a source's images (the person search,
then its K crops) to the service as one request and waits for the labels. The service holds the
model once and packs the crops of several requests into forwards of up to ``seg_batch`` images,
so a device is fed by all workers instead of each worker loading (and underfeeding) its own copy.

A crop's labels do not depend on the crops sharing its forward: every input is padded and resized
to the same 1024x768 and labelled on its own by argmax. Output bytes therefore depend neither on
the worker count nor on ``seg_batch``. On a GPU the kernels picked for a batch size may change the
low bits of the logits; argmax rarely flips on that, which is why the byte-identity tests run on
the CPU.
"""

from __future__ import annotations

import queue
import signal
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any

import numpy as np

from haodiff_data.run import RunError
from haodiff_data.segment import Segmentation, check_rgb, instances_from_parts

# Images per forward when --seg-batch is not given. CUDA: 16 leaves room to pack one source's
# crops with other workers' person searches, and larger forwards amortise launch overhead on big
# GPUs (on an H200 the 0.3B model ran 10.2 / 11.4 / 11.0 images/s at batch 1 / 4 / 16, so it costs
# nothing there). CPU: one 1024x768 image already keeps every core's matrix products busy, so
# larger forwards only delay the replies the workers wait on and grow the activation memory.
DEFAULT_SEG_BATCH = {"cuda": 16, "cpu": 4}
# How often the main process looks at a loading or stopping service that has not answered yet.
POLL_S = 0.2
# Every slot is in its queue before the pool starts: a worker that waits this long finds none.
SLOT_WAIT_S = 30.0


def default_seg_batch(device: str) -> int:
    return DEFAULT_SEG_BATCH["cuda" if device.startswith("cuda") else "cpu"]


class ServiceError(RunError):
    """The segmentation process cannot load its model or is gone: the run stops."""


@dataclass
class Request:
    slot: int  # the requesting worker's reply queue
    images: list[np.ndarray]


def forward_stats(forwards: int, images: int, mixed: int, process: str, seg_batch: int) -> dict[str, Any]:
    """What the run summary reports about the Sapiens forwards of one invocation."""
    return {"process": process, "seg_batch": seg_batch, "forwards": forwards, "images": images,
            "images_per_forward": round(images / forwards, 2) if forwards else None,
            "forwards_mixing_requests": mixed}


def _serve(checkpoint: str, device: str, precision: str | None, seg_batch: int, threads: int,
           requests: Any, replies: list[Any], control: Any) -> None:
    """The service process: load, say ``ready`` (or the load error), answer requests until ``None``."""
    # Ctrl-C reaches the whole process group: the main process decides when the service ends.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import torch

    from haodiff_data.segment.sapiens import SapiensSegmenter

    if device == "cpu":
        # torch's default counts the machine's cores, not the ones this job may use (SLURM, taskset).
        torch.set_num_threads(threads)
    try:
        seg = SapiensSegmenter(checkpoint, device=device, batch_size=seg_batch, precision=precision)
    except Exception as exc:  # noqa: BLE001 - any load failure is reported to the main process as text
        control.put(("error", str(exc) or type(exc).__name__))
        return
    control.put(("ready", seg.model_id))
    mixed = 0
    stop = False
    while not stop:
        first = requests.get()
        if first is None:
            break
        batch = [first]
        # Take the requests already waiting, never wait for more: when the device is the bottleneck
        # they pile up during a forward and the next one is full; when it is not, waiting would
        # only slow the workers down.
        while sum(len(r.images) for r in batch) < seg_batch:
            try:
                more = requests.get_nowait()
            except queue.Empty:
                break
            if more is None:
                stop = True
                break
            batch.append(more)
        mixed += _answer(seg, batch, replies)
    # Replies to workers that are gone must not keep this process from exiting.
    for reply in replies:
        reply.cancel_join_thread()
    control.put(("stats", forward_stats(seg.forwards, seg.images, mixed, "service", seg_batch)))


def _answer(seg: Any, batch: list[Request], replies: list[Any]) -> int:
    """Label the images of ``batch`` in forwards of ``seg.forward_size`` and reply to each request;
    returns how many forwards held images of more than one request."""
    images = [im for r in batch for im in r.images]
    owner = [n for n, r in enumerate(batch) for _ in r.images]
    step = seg.forward_size
    labels: list[np.ndarray] = []
    mixed = 0
    try:
        for start in range(0, len(images), step):
            labels += seg.labels(images[start : start + step])
            mixed += len(set(owner[start : start + step])) > 1
    except Exception as exc:  # noqa: BLE001 - a failed forward fails its requests, not the service
        for r in batch:
            replies[r.slot].put(("error", f"{type(exc).__name__}: {exc}"))
        return mixed
    start = 0
    for r in batch:
        replies[r.slot].put(("ok", labels[start : start + len(r.images)]))
        start += len(r.images)
    return mixed


def death_message(checkpoint: str, device: str, exitcode: int | None, when: str) -> str:
    killed = exitcode is not None and exitcode < 0
    how = f"was killed by signal {-exitcode}" if killed else f"exited with code {exitcode}"
    hint = " (SIGKILL: out of memory?)" if exitcode == -signal.SIGKILL else ""
    return (f"the sapiens segmentation process for {checkpoint} on {device} {how}{hint} {when}; "
            "the committed shards are kept: rerun with --resume")


class ServiceClient:
    """The segmenter a worker holds: the service's model behind the Segmenter interface. Instances
    are computed here, in the worker, where CPU time is plentiful."""

    name = "sapiens"
    per_source = False

    def __init__(self, model_id: str, checkpoint: str, device: str, requests: Any, replies: list[Any], slots: Any,
                 dead: Any, exitcode: Any) -> None:
        self.model_id, self._checkpoint, self._device = model_id, checkpoint, device
        self._requests, self._replies, self._slots = requests, replies, slots
        self._dead, self._exitcode = dead, exitcode
        self._slot: int | None = None

    def segment(self, images: Sequence[np.ndarray]) -> list[Segmentation]:
        check_rgb(images)  # here, so that one bad image cannot fail the other requests of a forward
        if self._slot is None:
            try:
                # Not get_nowait: workers starting together contend for the queue's lock.
                self._slot = self._slots.get(timeout=SLOT_WAIT_S)
            except queue.Empty:
                raise ServiceError("segmentation service: every reply slot is taken "
                                   "(a worker was restarted?)") from None
            # This worker waits on a reply for every request it sends; if the service is gone,
            # unsent request bytes must not keep the worker from exiting.
            self._requests.cancel_join_thread()
        self._requests.put(Request(self._slot, list(images)))
        status, payload = self._reply()
        if status == "error":
            raise RuntimeError(f"segmentation service: {payload}")
        return [Segmentation(parts, instances_from_parts(parts)) for parts in payload]

    def _reply(self) -> tuple[str, Any]:
        # The death notice is an event, not a message in the reply queue: a service killed while
        # sending a reply leaves that queue's write lock taken for good.
        while True:
            try:
                return self._replies[self._slot].get(timeout=POLL_S)
            except queue.Empty:
                if self._dead.is_set():
                    raise ServiceError(death_message(self._checkpoint, self._device, self._exitcode.value,
                                                     "mid-run")) from None


class SegmentationService:
    """The main process's handle on the service: start (the model is loaded when ``start``
    returns), hand out clients to ``slots`` workers, stop. If the process dies mid-run, a watchdog
    thread tells every worker (see ServiceClient._reply), so none waits forever."""

    def __init__(self, ctx: Any, checkpoint: str, device: str, precision: str | None, seg_batch: int,
                 slots: int, threads: int) -> None:
        self.checkpoint, self.device = checkpoint, device
        self._requests = ctx.Queue()
        self._replies = [ctx.Queue() for _ in range(slots)]
        self._slots = ctx.Queue()
        for slot in range(slots):
            self._slots.put(slot)
        self._control = ctx.Queue()
        self._dead, self._exitcode = ctx.Event(), ctx.Value("i", 0)
        self._process = ctx.Process(
            target=_serve, name="haodiff-sapiens",
            args=(checkpoint, device, precision, seg_batch, threads, self._requests, self._replies, self._control))
        self._closing = False
        self._watchdog = threading.Thread(target=self._watch, name="haodiff-sapiens-watchdog", daemon=True)
        self.model_id = ""

    def start(self) -> None:
        self._process.start()
        kind, payload = self._control_message("while loading")
        if kind == "error":
            self._process.join()
            raise ServiceError(f"segmenter 'sapiens' cannot start: {payload}")
        self.model_id = payload
        self._watchdog.start()

    def client(self) -> ServiceClient:
        return ServiceClient(self.model_id, self.checkpoint, self.device, self._requests, self._replies, self._slots,
                             self._dead, self._exitcode)

    def close(self, graceful: bool = True) -> dict[str, Any] | None:
        """Stop the service and wait for it; returns its forward statistics when ``graceful``
        (after a finished run), else ends it at once (after an error or Ctrl-C) and returns None."""
        self._closing = True
        stats = None
        if graceful and self._process.is_alive():
            self._requests.put(None)
            kind, payload = self._control_message("while stopping")
            stats = payload if kind == "stats" else None
        if self._process.is_alive():
            self._process.terminate()
        self._process.join()
        if self._watchdog.is_alive():
            self._watchdog.join()
        return stats

    def _control_message(self, when: str) -> tuple[str, Any]:
        while True:
            try:
                return self._control.get(timeout=POLL_S)
            except queue.Empty:
                if self._process.exitcode is None:
                    continue
            try:  # it may have written its last word just before exiting
                return self._control.get(timeout=POLL_S)
            except queue.Empty:
                raise ServiceError(death_message(self.checkpoint, self.device, self._process.exitcode, when)) from None

    def _watch(self) -> None:
        wait([self._process.sentinel])
        if not self._closing:
            self._exitcode.value = self._process.exitcode
            self._dead.set()

