"""Training requests: coalesced per project, on redis + rq or (fallback) in a thread.

Coalescing contract (both implementations): per project at most ONE job running and ONE
pending.  An event that arrives while a job is pending is folded into that pending job;
no event is ever dropped, because the pending job fetches the tasks and annotations only
after it has *claimed* itself (stopped being pending) - so it sees every annotation made
before any event it absorbed.  An event that arrives after the claim creates the next
pending job.

redis keys (``<p>`` = project id):

``alr:train:<p>:pending``       id of the pending rq job (set and cleared under the lock); one whose job
                                died unclaimed counts as none (:func:`live_pending_job`)
``alr:train:<p>:lock``          short lock around "read/replace pending" (enqueue + claim); an event
                                folded into a pending job takes no lock (see below)
``alr:train:<p>:events:<job>``  hash: how many events job ``<job>`` stands for (``events``) and
                                their actions (``reason:<action>``); read by the job when it claims
``alr:train:<p>:running``       held by the job while it trains (so that two workers never
                                train the same project at once): a short TTL (ALR_RUNNING_LOCK_TTL)
                                renewed by a heartbeat thread while the job lives, so a killed
                                work horse or worker frees the project within that TTL
``alr:train:<p>:dirty``         set when a job claims its project, deleted when it ends; still there
                                with no running lock = the job died: the web app's watchdog
                                (:class:`Watchdog`) queues the project again
``alr:train:<p>:seq``           counter for job ids ``train-<p>-<n>``

Folding an event is one atomic script in redis (:data:`_FOLD_SCRIPT`): it checks that the
pending job is still waiting in rq (its status field) and counts the event, in one round trip
and without the lock.  Under a burst of webhooks for one project, waiters polling the lock
spent the web app's CPU (a burst of 50 on 2 cores: p99 of 300-600 ms against Label Studio's 1 s
timeout; benchmarks/bench_webhook.py).  A job that rq has started is no longer pending, so an
event folded in is one the job has not yet read: the job reads its events only after it claims.

A job that finds its project's running lock held waits a few seconds at most, then hands its
events to a new pending job at the back of the queue and frees its worker (no worker sits idle
for an hour behind another job).
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

logger = logging.getLogger(__name__)

_PENDING_STATES = ("queued", "deferred", "scheduled")
#: seconds the per-job event counts outlive their last event (as long as rq keeps a job's result)
EVENTS_TTL = 7 * 86400

# KEYS[1] the project's pending key, KEYS[2] the prefix of its events hashes;
# ARGV[1] rq's job key prefix, ARGV[2] events, ARGV[3] EVENTS_TTL, ARGV[4..] the actions.
# Returns the pending job's id, or false when none waits (the caller then enqueues under the lock).
_FOLD_SCRIPT = """
local pending = redis.call('GET', KEYS[1])
if not pending then return false end
local status = redis.call('HGET', ARGV[1] .. pending, 'status')
if status ~= '%s' and status ~= '%s' and status ~= '%s' then return false end
local events = KEYS[2] .. pending
redis.call('HINCRBY', events, 'events', ARGV[2])
for i = 4, #ARGV do redis.call('HSET', events, 'reason:' .. ARGV[i], 1) end
redis.call('EXPIRE', events, ARGV[3])
return pending
""" % _PENDING_STATES

#: seconds a job waits for its project's running lock before it re-queues itself
LOCK_WAIT_SECONDS = 3
#: how often a webhook polls the short per-project lock: redis-py's default (0.1 s) put a burst's
#: events for one project 100 ms apart each
LOCK_POLL_SECONDS = 0.005


def _key(project_id: int, what: str) -> str:
    return f"alr:train:{int(project_id)}:{what}"


class QueueUnavailable(RuntimeError):
    """The training queue (redis) cannot be reached; the message says which address."""


class RQTrainingQueue:
    """Training jobs on an rq queue (run ``python -m ml_backend.worker <RQ_QUEUE_NAME>``, see README)."""

    kind = "rq"

    def __init__(self, connection, queue_name: str, *, job_timeout: int = 3600,
                 job_func: str = "ml_backend.training.train_project_job"):
        from rq import Queue

        self.redis = connection
        self.queue = Queue(queue_name, connection=connection)
        self.job_timeout = job_timeout
        self.job_func = job_func
        self._fold_script = connection.register_script(_FOLD_SCRIPT)      # loaded on first use

    def request_training(self, project_id: int, reason: str, *, events: int = 1) -> dict:
        """Fold the request into the project's pending job, or enqueue one (``events``: how many
        webhook events the request stands for; ``reason``: their actions, comma-separated)."""
        from redis.exceptions import RedisError

        p = int(project_id)
        reasons = [one for one in reason.split(",") if one]
        try:
            job_id = self._fold(p, events, reasons)
            if job_id is not None:
                return {"job_id": job_id, "coalesced": True, "queue": self.kind}
            with self.redis.lock(_key(p, "lock"), timeout=10, blocking_timeout=5, sleep=LOCK_POLL_SECONDS):
                job_id = self._fold(p, events, reasons)      # another request enqueued while we waited
                if job_id is not None:
                    return {"job_id": job_id, "coalesced": True, "queue": self.kind}
                job_id = f"train-{p}-{self.redis.incr(_key(p, 'seq'))}"
                counts = _key(p, f"events:{job_id}")
                with self.redis.pipeline() as pipe:
                    pipe.hset(counts, mapping={"events": events, **{f"reason:{one}": 1 for one in reasons}})
                    pipe.expire(counts, EVENTS_TTL)
                    pipe.execute()
                self.queue.enqueue_call(
                    self.job_func, args=(p, reason), job_id=job_id, timeout=self.job_timeout,
                    result_ttl=EVENTS_TTL, failure_ttl=EVENTS_TTL, description=f"train project {p} ({reason})",
                    meta={"project": p, "progress": {"stage": "queued", "fraction": 0.0}})
                self.redis.set(_key(p, "pending"), job_id)
                return {"job_id": job_id, "coalesced": False, "queue": self.kind}
        except RedisError as exc:
            raise QueueUnavailable(f"redis is unreachable: {type(exc).__name__}: {exc}") from None

    def _fold(self, project_id: int, events: int, reasons: list[str]) -> str | None:
        from rq.job import Job

        job_id = self._fold_script(keys=[_key(project_id, "pending"), _key(project_id, "events:")],
                                   args=[Job.redis_job_namespace_prefix, int(events), EVENTS_TTL, *reasons])
        return job_id.decode() if isinstance(job_id, bytes) else job_id

    def status(self) -> dict:
        from redis.exceptions import RedisError
        from rq import Worker

        try:
            self.redis.ping()
        except RedisError as exc:
            return {"kind": self.kind, "redis": False, "error": f"{type(exc).__name__}: {exc}",
                    "workers": 0, "queued": None}
        try:
            workers = Worker.all(queue=self.queue)
            live = [w for w in workers if _worker_alive(self.redis, w.name)]
            return {"kind": self.kind, "redis": True, "queue": self.queue.name,
                    "workers": len(live), "dead_workers": len(workers) - len(live), "queued": self.queue.count}
        except RedisError as exc:
            return {"kind": self.kind, "redis": False, "error": str(exc), "workers": 0, "queued": None}

    def project_status(self, project_id: int) -> dict:
        running = self.redis.get(_key(project_id, "running"))
        return {"pending_job": live_pending_job(self.redis, project_id), "running": bool(running)}


def _worker_alive(connection, worker_name: str) -> bool:
    """An rq worker is alive while its connection holds its pub/sub subscription: redis drops it
    the moment the process dies, whereas the worker's key outlives it by up to its worker TTL."""
    channel = f"rq:pubsub:{worker_name}"
    subscribed = dict(connection.pubsub_numsub(channel))
    count = subscribed.get(channel.encode(), subscribed.get(channel, 0))
    return count > 0


def worker_asked_to_stop(connection, worker_name: str | None) -> bool:
    """rq records a warm shutdown (SIGTERM, SIGINT) that comes while its worker is busy in the
    worker's hash, where the work horse's job can read it: the worker waits for that job to end."""
    from rq import Worker

    return bool(worker_name) and bool(connection.hexists(Worker.redis_worker_namespace_prefix + worker_name,
                                                          "shutdown_requested_date"))


def live_pending_job(connection, project_id: int) -> str | None:
    """The project's pending job if it is still coming: waiting in rq, or started by a worker that
    lives (it waits for the running lock and claims itself once it has it).  A pending key whose job
    died unclaimed (its worker killed while it waited for another job's lock) or ended names no job
    that will read the project's events: None, so that the watchdog and the reconciliation queue one."""
    from rq.job import Job

    pending = connection.get(_key(project_id, "pending"))
    if not pending:
        return None
    job_id = pending.decode() if isinstance(pending, bytes) else pending
    status, worker = (v.decode() if isinstance(v, bytes) else v
                      for v in connection.hmget(Job.redis_job_namespace_prefix + job_id, "status", "worker_name"))
    if status in _PENDING_STATES or (status == "started" and worker and _worker_alive(connection, worker)):
        return job_id
    return None


def claim_pending(connection, project_id: int, job_id: str) -> bool:
    """Called by a job when it starts: stop being the pending job of its project.

    From this moment new events create a new pending job.  Returns True when ``job_id``
    was the pending job (False for a job enqueued by hand).
    """
    p = int(project_id)
    with connection.lock(_key(p, "lock"), timeout=10, blocking_timeout=30, sleep=LOCK_POLL_SECONDS):
        pending = connection.get(_key(p, "pending"))
        pending = pending.decode() if isinstance(pending, bytes) else pending
        if pending == job_id:
            connection.delete(_key(p, "pending"))
            return True
        return False


class RunningLock:
    """The per-project lock a job holds while it trains, kept alive by a heartbeat thread.

    ``acquire()`` waits ``LOCK_WAIT_SECONDS`` at most; while held, the lock's ``ttl`` (seconds,
    ``Settings.running_lock_ttl``) is renewed every third of it, so it outlives a long job but
    expires within the TTL of its holder's death (SIGKILL, OOM kill, machine gone).

    redis away for longer than the TTL lets the lock lapse under a job that lives on: once redis
    answers, :meth:`still_held` takes it back if it is free, or finds that another job took it
    (the web app's watchdog queued the project again and a second worker started it). From then
    on the lock is ``lost`` for good: the job stops and must not publish, the other one trains on
    newer labels.
    """

    def __init__(self, connection, project_id: int, *, ttl: int):
        self.project_id = int(project_id)
        self.ttl = ttl
        # thread_local=False: the token must be seen by the heartbeat thread, which renews the lock
        # (with redis-py's default, reacquire() from that thread fails and the lock lapses after ttl)
        self._lock = connection.lock(_key(project_id, "running"), timeout=ttl, blocking_timeout=LOCK_WAIT_SECONDS,
                                     thread_local=False)
        self._renewing = threading.Lock()     # the heartbeat and the job both call still_held()
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> bool:
        if not self._lock.acquire():
            return False
        self._thread = threading.Thread(target=self._beat, name=f"alr-lock-{self.project_id}", daemon=True)
        self._thread.start()
        return True

    def still_held(self) -> bool:
        """Renew the lock; if it lapsed, take it back when free. False once another job holds it.
        With redis unreachable the answer is True: nobody else can take the lock meanwhile."""
        from redis.exceptions import LockNotOwnedError, RedisError

        with self._renewing:
            if self.lost.is_set():
                return False
            try:
                self._lock.reacquire()
                return True
            except LockNotOwnedError:
                pass
            except RedisError as exc:
                logger.warning("project %d: could not renew the running lock (%s: %s); it lapses %d s after "
                               "redis went away, and another job may then start on the project",
                               self.project_id, type(exc).__name__, exc, self.ttl)
                return True
            try:
                if self._lock.acquire(blocking=False, token=self._lock.local.token):
                    logger.warning("project %d: the running lock lapsed while redis was away; taken back",
                                   self.project_id)
                    return True
            except RedisError as exc:
                logger.warning("project %d: could not take the lapsed running lock back (%s: %s)",
                               self.project_id, type(exc).__name__, exc)
                return True
            self.lost.set()
            logger.error("project %d: the running lock lapsed while redis was away and another job holds it now: "
                         "this job stops and will not publish (the other one trains on the newer labels)",
                         self.project_id)
            return False

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            if not self.still_held():
                return

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self.lost.is_set():
            return                 # the other job's now
        try:
            self._lock.release()
        except Exception:          # noqa: BLE001 - expired or redis gone: it frees itself
            logger.debug("running lock of project %d already gone", self.project_id)


def job_events(connection, project_id: int, job_id: str) -> tuple[int, list[str]]:
    """How many webhook events a job stands for and their actions (sorted); (0, []) if unknown."""
    counts = connection.hgetall(_key(project_id, f"events:{job_id}"))
    counts = {(k.decode() if isinstance(k, bytes) else k): v for k, v in counts.items()}
    reasons = sorted(k[len("reason:"):] for k in counts if k.startswith("reason:"))
    return int(counts.get("events", 0)), reasons


def mark_dirty(connection, project_id: int, job_id: str) -> None:
    connection.set(_key(project_id, "dirty"), job_id)


def clear_dirty(connection, project_id: int) -> None:
    connection.delete(_key(project_id, "dirty"))


def orphaned_projects(connection) -> list[int]:
    """Projects whose last job died mid-way: dirty, no running lock, no pending job still coming
    (:func:`live_pending_job`)."""
    out = []
    for key in connection.scan_iter(match="alr:train:*:dirty", count=500):
        key = key.decode() if isinstance(key, bytes) else key
        p = int(key.split(":")[2])
        if not connection.exists(_key(p, "running")) and live_pending_job(connection, p) is None:
            out.append(p)
    return out


class Watchdog:
    """A thread of the web app: every ``period`` seconds, queue a training for each project whose
    job died mid-way (see :func:`orphaned_projects`), so the events it held reach a model."""

    def __init__(self, queue: "RQTrainingQueue", *, period: float):
        self.queue, self.period = queue, period
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="alr-watchdog", daemon=True)

    def start(self) -> "Watchdog":
        self.thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def check_once(self) -> list[int]:
        requeued = []
        for p in orphaned_projects(self.queue.redis):
            job = self.queue.request_training(p, "RECOVER")
            logger.warning("project %d: its last training job died mid-way (worker killed?): queued %s again",
                           p, job["job_id"])
            requeued.append(p)
        return requeued

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            try:
                self.check_once()
            except Exception as exc:       # noqa: BLE001 - redis down: try again next period
                logger.debug("watchdog: %s", exc)


class ThreadTrainingQueue:
    """In-process fallback without redis: one background thread per project, same coalescing.

    For a laptop: jobs die with the web process and are not shared between web workers.
    """

    kind = "thread"

    def __init__(self, runner: Callable[[int, str], Any]):
        self._runner = runner
        self._lock = threading.Lock()
        self._state: dict[int, dict] = {}
        self.jobs_started = 0
        logger.warning("redis is not used: training runs in a thread inside the web process "
                       "(in-process fallback; set ALR_USE_REDIS=true and run an rq worker for production)")

    def request_training(self, project_id: int, reason: str) -> dict:
        p = int(project_id)
        with self._lock:
            st = self._state.setdefault(p, {"running": False, "pending": False, "reasons": []})
            coalesced = st["pending"]
            st["pending"] = True
            st["reasons"].append(reason)
            if not st["running"]:
                st["running"] = True
                threading.Thread(target=self._loop, args=(p,), name=f"alr-train-{p}",
                                 daemon=True).start()
        return {"job_id": f"thread-{p}", "coalesced": coalesced, "queue": self.kind}

    def _loop(self, p: int) -> None:
        while True:
            with self._lock:
                st = self._state[p]
                if not st["pending"]:
                    st["running"] = False
                    return
                st["pending"] = False            # claim: later events make a new pending run
                reason = ",".join(sorted(set(st["reasons"])))
                st["reasons"] = []
                self.jobs_started += 1
            try:
                self._runner(p, reason)
            except Exception:                    # the thread must survive a failed job
                logger.exception("training of project %d failed", p)

    def wait_idle(self, timeout: float = 60.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not any(s["running"] or s["pending"] for s in self._state.values()):
                    return True
            time.sleep(0.05)
        return False

    def status(self) -> dict:
        with self._lock:
            busy = {p: dict(running=s["running"], pending=s["pending"]) for p, s in self._state.items()}
        return {"kind": self.kind, "redis": None, "workers": 1, "projects": busy}

    def project_status(self, project_id: int) -> dict:
        with self._lock:
            s = self._state.get(int(project_id), {})
            return {"pending_job": "thread" if s.get("pending") else None, "running": bool(s.get("running"))}


def make_redis(settings):
    """A redis client from settings (REDIS_URL wins over host/port/db); no connection yet."""
    import redis

    # short connect timeout: a webhook must answer within Label Studio's 1 s even when redis is gone
    kwargs = dict(socket_connect_timeout=0.5, socket_timeout=5)
    if settings.redis_url:
        return redis.Redis.from_url(settings.redis_url, **kwargs)
    return redis.Redis(host=settings.redis_host, port=settings.redis_port, db=settings.redis_db, **kwargs)
