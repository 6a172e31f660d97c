"""The engine loop of ``vidloom serve``: one thread that owns the generator and advances jobs one
unit of work at a time through the task API (text encoding, each denoising step, decoding).

Up to ``max_active`` jobs are in flight; each round gives every one of them one unit, so a short
job finishes while a long one is still denoising instead of waiting behind it, and the denoising
steps of jobs that fit together (same expert, latent shape and dtype) run as one batched
transformer forward, each job's video equal to the one it gets alone. A job's failure
(a bad request found late, NaN latents, out of memory) fails that job with its reason; the loop
and the other jobs go on. Finished videos are written to a temporary file and renamed into place
before the job is marked completed.

A job's outcome is never lost to a store outage or a full disk: until the store has recorded it
(and, for a finished video, until the file is written), the job stays held by this loop and the
write is tried again every RETRY_S. Leases (a store shared by replicas) are renewed by a
heartbeat thread, so a unit of work longer than the lease does not lose the job. ``stop()``
(SIGTERM) lets the unit under way finish and hands the running jobs back to the queue.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
import uuid
from pathlib import Path

from ..errors import (AdaptersBusy, InvalidRequestError, NumericalError, ResourceExhausted, TaskCancelled,
                      VidloomError, engine_error)
from .engine import Engine
from .store import Job, JobStore, StoreUnavailable

log = logging.getLogger(__name__)

# progress written and cancels read from the store at most this often (each write is a synced
# commit: once per unit of work it cost ~30 ms per denoising step on the shipped model)
STORE_INTERVAL_S = 0.25
RETRY_S = 1.0  # an outcome the store or the disk refused is tried again this often
OUTAGE_LOG_S = 30.0  # a store outage is logged once per this many seconds, not once per round


class Metrics:
    """What the loop measures, for ``/metrics`` (prometheus-client objects on one registry)."""

    def __init__(self, registry, store: JobStore):
        from prometheus_client import Histogram
        from prometheus_client.core import GaugeMetricFamily

        self.step_seconds = Histogram("vidloom_unit_seconds", "seconds per unit of work (one denoising step, ...)",
                                      ["phase"], registry=registry,
                                      buckets=(0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30, 100))
        self.job_seconds = Histogram("vidloom_job_seconds", "seconds from acceptance to completion", registry=registry,
                                     buckets=(1, 3, 10, 30, 100, 300, 1000, 3000))
        self.batch_size = Histogram("vidloom_batch_size", "jobs sharing one transformer forward (2 or more)",
                                    registry=registry, buckets=(2, 3, 4, 8, 16))

        class _Jobs:
            def collect(self):
                counts = store.counts()  # one query per scrape
                family = GaugeMetricFamily("vidloom_jobs", "jobs by state", labels=["state"])
                for state, count in counts.items():
                    family.add_metric([state], count)
                yield family
                yield GaugeMetricFamily("vidloom_queue_depth", "jobs waiting", value=counts["queued"])

        registry.register(_Jobs())


# requests checked on arrival that wait for the loop with their decoded images, at most (beyond,
# the oldest are let go and checked again when their job is claimed): 128 Mpx is ~384 MiB of RGB
MAX_WAITING_REQUESTS = 1024
MAX_WAITING_PIXELS = 2**27


class WaitingRequests:
    """Requests checked when they arrived (``VideoGenerator.check``: fields validated, images
    decoded), by job id, until the loop claims the job and submits the checked request as it is:
    a job is checked and its images decoded once. Bounded in count and in decoded pixels, oldest
    let go first; a job whose request is not waiting here (let go, recovered after a restart,
    accepted by another replica) is checked from its record when claimed. Thread-safe: the
    routes put, the loop takes."""

    def __init__(self, max_requests: int = MAX_WAITING_REQUESTS, max_pixels: int = MAX_WAITING_PIXELS):
        self.max_requests, self.max_pixels = max_requests, max_pixels
        self._waiting: dict[str, tuple[object, int]] = {}  # job id -> (checked request, pixels), oldest first
        self._pixels = 0
        self._lock = threading.Lock()

    def put(self, job_id: str, checked) -> None:
        pixels = sum(image.width * image.height for image in checked.images)
        with self._lock:
            self._pop(job_id)
            self._waiting[job_id] = (checked, pixels)
            self._pixels += pixels
            while self._waiting and (len(self._waiting) > self.max_requests or self._pixels > self.max_pixels):
                self._pop(next(iter(self._waiting)))

    def take(self, job_id: str):
        """The checked request waiting for ``job_id`` (no longer waiting), or None."""
        with self._lock:
            return self._pop(job_id)

    def __len__(self) -> int:
        return len(self._waiting)

    def _pop(self, job_id: str):
        checked, pixels = self._waiting.pop(job_id, (None, 0))
        self._pixels -= pixels
        return checked


class EngineLoop:
    """Claims jobs from ``store`` and runs them on ``generator``; ``output_dir`` receives the videos.
    ``waiting``: requests checked on arrival, submitted as they are when their job is claimed."""

    def __init__(self, generator: Engine, store: JobStore, output_dir: Path, metrics: Metrics | None = None,
                 max_active: int = 4, idle_wait_s: float = 0.2, batch_steps: bool = True, ranks=None):
        self.generator = generator
        self.store = store
        self.output_dir = Path(output_dir)
        self.metrics = metrics
        self.max_active = max_active
        self.batch_steps = batch_steps
        self.ranks = ranks  # RankBroadcast when several processes share each forward (rank 0 here)
        self.idle_wait_s = idle_wait_s
        self.owner = f"{os.uname().nodename}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.active: list[tuple[Job, object]] = []  # (job, task)
        # claimed jobs waiting for adapter room (AdaptersBusy: the max_loras adapters in memory are
        # all in use): (job, checked request or None); submitted as soon as a running job finishes
        self.parked: list[tuple[Job, object]] = []
        # finished jobs whose outcome is not recorded yet: (job, write) where write() records it
        # (export included) and raises StoreUnavailable / a disk-full OSError to be tried again
        self.unrecorded: list[tuple[Job, object]] = []
        self._cancelled: set[str] = set()
        self._pending_submits: list = []  # submitted since the last plan (for the other ranks)
        self._looked = 0.0
        self._outage_logged = 0.0
        self._retry_at = 0.0
        self._heartbeat: threading.Thread | None = None
        self.waiting = WaitingRequests()

    # -- control ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Run the loop in a thread of its own (tests, embedding). ``vidloom serve`` runs it in the
        main thread instead (:meth:`run`): torch's CPU kernels ran 1.9x slower from a second thread
        (measured on the shipped model, 2 cores: denoising 0.82 s vs 0.43 s per video)."""
        self._thread = threading.Thread(target=self.run, name="vidloom-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the unit of work under way; the held jobs go back to the queue (``run``)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def held(self) -> list[str]:
        """The ids of the jobs this loop holds (running, or finished and not yet recorded)."""
        return [job.id for job, _ in [*self.active, *self.unrecorded, *self.parked]]

    def wake(self) -> None:
        """A job was queued: look now, not at the next idle tick."""
        self._wake.set()

    def cancel(self, job_id: str) -> None:
        """A job of this process was cancelled (the store has it too): stop it at its next unit."""
        self.waiting.take(job_id)
        self._cancelled.add(job_id)
        self._wake.set()

    # -- the loop --------------------------------------------------------------------------------

    def run(self) -> None:
        """The loop, in the calling thread, until :meth:`stop`; then the jobs still running go back
        to the queue (this start not counted as an attempt) and outcomes not yet recorded are
        tried once more."""
        self._stop.clear()
        self._start_heartbeat()
        try:
            while not self._stop.is_set():
                try:
                    self._record()
                    self._fill()
                    if not self.active:
                        self._broadcast([])  # the other ranks wait in the broadcast, not in a timeout
                        self._wake.wait(self.idle_wait_s)
                        self._wake.clear()  # a wake after this is seen by the next _fill
                        continue
                    self._advance_all()
                except StoreUnavailable as exc:
                    self._outage(exc)
                    time.sleep(self.idle_wait_s)
                except Exception:  # the loop itself must survive anything a job does
                    log.exception("engine loop error")
                    time.sleep(self.idle_wait_s)
        finally:
            self._broadcast(None)  # the other ranks stop too
            self._drain()

    def _drain(self) -> None:
        for _, task in self.active:
            task.cancel()
        self.active = []
        try:
            self._record(force=True)
            released = self.store.release(self.owner)
            if released:
                log.warning("stopping: %d running job(s) back in the queue", released)
        except StoreUnavailable as exc:  # they go back when the store is next opened (recover / lease)
            log.warning("stopping with the store unavailable: %s", exc)

    def _outage(self, exc: StoreUnavailable) -> None:
        now = time.monotonic()
        if now - self._outage_logged >= OUTAGE_LOG_S:
            self._outage_logged = now
            log.warning("job store unavailable, retrying: %s", exc)

    def _start_heartbeat(self) -> None:
        """Leases renewed every third of a lease from a thread of their own, whatever a unit of
        work costs."""
        if not self.store.lease_s or (self._heartbeat is not None and self._heartbeat.is_alive()):
            return

        def beat():
            while not self._stop.wait(self.store.lease_s / 3):
                try:
                    self.store.renew(self.owner, self.held())
                except StoreUnavailable as exc:
                    self._outage(exc)
                except Exception:  # noqa: BLE001 - the heartbeat must outlive any one failure
                    log.exception("lease heartbeat error")

        self._heartbeat = threading.Thread(target=beat, name="vidloom-lease", daemon=True)
        self._heartbeat.start()

    def _broadcast(self, plan) -> None:
        if self.ranks is not None:
            self.ranks.send(plan)

    def _fill(self) -> None:
        parked, self.parked = self.parked, []
        for job, checked in parked:  # first the jobs that waited for adapter room, in order
            if job.id in self._cancelled:
                self._cancelled.discard(job.id)
                self.store.fail(job.id, "cancelled", "the job was cancelled", owner=self.owner)
                continue
            self._submit(job, checked)
        while (len(self.active) + len(self.unrecorded) + len(self.parked) < self.max_active
               and not self._stop.is_set()):
            job = self.store.claim(self.owner)
            if job is None:
                return
            if job.error_code == "corrupt_record":  # a damaged row fails alone
                self.store.fail(job.id, job.error_code, job.error_message, owner=self.owner)
                continue
            self._submit(job, self.waiting.take(job.id))

    def _submit(self, job: Job, checked) -> None:
        sampling = job.sampling()
        try:  # checked on arrival: submitted as it is; else (recovered, another replica's) checked now
            task = (self.generator.submit(checked) if checked is not None
                    else self.generator.submit(job.request["prompt"], **sampling))
        except AdaptersBusy:  # its adapter is loaded when a running job finishes
            self.parked.append((job, checked))
            return
        except VidloomError as exc:  # e.g. the model's weight files changed since the request was accepted
            self._fail(job, exc)
            return
        self.active.append((job, task))
        self._pending_submits.append((job.id, job.request["prompt"], sampling))

    def _advance_all(self) -> None:
        """One unit of every active job; their denoising steps that fit together share one
        transformer forward (``VideoGenerator.step_many``)."""
        now = time.monotonic()
        look = now - self._looked >= STORE_INTERVAL_S  # the store is read and written at most this often
        if look:
            self._looked = now
        cancels = []
        for job, task in list(self.active):
            if job.id in self._cancelled or (look and self._quietly(self.store.cancel_requested, job.id)):
                self._cancelled.discard(job.id)
                task.cancel()
                self.active.remove((job, task))
                cancels.append(job.id)
                self._settle(job, lambda job=job: self.store.fail(job.id, "cancelled", "the job was cancelled",
                                                                 owner=self.owner))
        # every rank runs the same units of the same tasks in the same order (their collectives meet)
        self._broadcast({"submit": self._pending_submits, "cancel": cancels, "batch": self.batch_steps,
                         "step": [job.id for job, _ in self.active]})
        self._pending_submits = []
        if not self.active:
            return
        start = time.perf_counter()
        if self.batch_steps:
            shared = self.generator.step_many([task for _, task in self.active])
        else:
            shared = []
            for _, task in self.active:
                self.generator.step_quietly(task)
        if self.metrics is not None:
            elapsed = time.perf_counter() - start
            for _, task in self.active:
                self.metrics.step_seconds.labels(task.state.value).observe(elapsed / len(self.active))
            for size in shared:
                self.metrics.batch_size.observe(size)
        for job, task in list(self.active):
            if task.is_finished:
                self.active.remove((job, task))
                self._finish(job, task)
            elif look:
                self._quietly(self.store.set_progress, job.id, self.owner, min(99, int(100 * task.progress)))

    def _quietly(self, write, *args):
        """A store call whose failure can wait for the next look (progress, a cancel check)."""
        try:
            return write(*args)
        except StoreUnavailable as exc:
            self._outage(exc)
            return None

    def _settle(self, job: Job, write) -> None:
        """Record a job's outcome now, or keep it held and try again every round until the store
        (and the disk) take it."""
        try:
            write()
        except (StoreUnavailable, DiskFull) as exc:
            if isinstance(exc, StoreUnavailable):
                self._outage(exc)
            else:
                log.warning("job %s: %s", job.id, exc)
            self.unrecorded.append((job, write))
            self._retry_at = time.monotonic() + RETRY_S

    def _record(self, force: bool = False) -> None:
        """Try the outcomes not yet recorded again, oldest first (at most every RETRY_S)."""
        if not self.unrecorded or (not force and time.monotonic() < self._retry_at):
            return
        pending, self.unrecorded = self.unrecorded, []
        for job, write in pending:
            self._settle(job, write)

    def _finish(self, job: Job, task) -> None:
        if task.state.value != "done":
            self._fail(job, task.error or RuntimeError(f"task ended {task.state.value}"))
            return
        frames, report = task.result.frames, task.result.cache
        self._settle(job, lambda: self._export_and_complete(job, frames, report))

    def _export_and_complete(self, job: Job, frames, report: dict | None = None) -> None:
        from ..io import save_video

        # the id is the server's own (no user input in a path); the attempt keeps the file of a
        # replica that lost the job (its lease expired) from replacing the one that finished it
        path = self.output_dir / f"{job.id}.{job.attempts}.mp4"
        if not path.exists():
            try:  # a temporary file renamed onto the path: a failed export leaves no partial file
                save_video(frames, path, fps=job.request.get("fps", 16))
            except Exception as exc:  # noqa: BLE001 - a full disk waits; anything else fails this job alone
                if _is_disk_full(exc):
                    raise DiskFull(f"the video cannot be written yet ({exc}); trying again") from exc
                self._fail(job, exc)
                return
        if not self.store.complete(job.id, self.owner, str(path), report):
            path.unlink(missing_ok=True)  # deleted (or taken over) meanwhile: this file is nobody's
        elif self.metrics is not None:
            self.metrics.job_seconds.observe(time.time() - job.created_at)

    def _fail(self, job: Job, exc: BaseException) -> None:
        exc = engine_error(exc)
        code = next((code for kind, code in ERROR_CODES if isinstance(exc, kind)), "generation_failed")
        log.warning("job %s failed: %s", job.id, exc)
        message = str(exc)[:2000] or type(exc).__name__
        self._settle(job, lambda: self.store.fail(job.id, code, message, owner=self.owner))


# a failed job's error code, by the error's type (first match)
ERROR_CODES = ((InvalidRequestError, "invalid_request"), (NumericalError, "numerical_error"),
               (TaskCancelled, "cancelled"), (ResourceExhausted, "out_of_memory"))


class DiskFull(OSError):
    """A finished video could not be written for want of space: tried again, not failed."""


def _is_disk_full(exc: BaseException) -> bool:
    # export_video gives an OSError with the cause's errno, ffmpeg's exit status included
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


class RankBroadcast:
    """Rank 0's plan of each round (tasks to submit, to cancel, to step, in order) to the other
    ranks of a multi-process server, over a gloo group of its own (control messages stay off
    NCCL). None means stop."""

    def __init__(self):
        import torch.distributed as dist

        self._dist = dist
        self.group = dist.new_group(backend="gloo")
        self.rank = dist.get_rank()

    def send(self, plan) -> None:
        self._dist.broadcast_object_list([plan], src=0, group=self.group)

    def receive(self):
        box = [None]
        self._dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]


def follow(generator: Engine, ranks: RankBroadcast) -> None:
    """A rank other than 0: run rank 0's plans on this rank's share of each forward until told to
    stop. The results stay on rank 0 (it exports and records them)."""
    tasks: dict[str, object] = {}
    while (plan := ranks.receive()) is not None:
        if not plan:  # rank 0 is idle
            continue
        for job_id, prompt, sampling in plan["submit"]:
            tasks[job_id] = generator.submit(prompt, **sampling)
        for job_id in plan["cancel"]:
            tasks.pop(job_id).cancel()
        order = [tasks[job_id] for job_id in plan["step"]]
        if plan["batch"]:
            generator.step_many(order)
        else:
            for task in order:
                generator.step_quietly(task)
        for job_id in [j for j, t in tasks.items() if t.is_finished]:
            del tasks[job_id]
