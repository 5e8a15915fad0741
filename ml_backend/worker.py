"""The training worker: an rq worker that outlives redis going away.

    python -m ml_backend.worker                        # REDIS_URL, RQ_QUEUE_NAME from the environment
    python -m ml_backend.worker --url redis://host:6379/0 alr-a100 alr-training

``rq worker`` retries while it waits for a job, but not when redis is gone at the moment its
work horse ends a job (rq 3.0 reads the job's status then): it logs "found an unhandled
exception, quitting", its teardown cannot reach redis either, and the process exits.  The
version the job trained is published, but no worker is left to train the next event unless a
supervisor restarts it (docker compose's ``restart: unless-stopped`` does; a worker started by
hand stays dead).  Measured in tests/test_backend_rq.py with a real redis-server stopped over a
job's end.

This entry point runs rq's own Worker and, when it ends without being asked to (SIGTERM, SIGINT,
rq's shutdown command), waits until redis answers and serves the same queues with a fresh
worker.  The dead worker's job is the project's: it stays marked dirty in redis, and the web
app's watchdog queues the project again (a run that finds nothing new publishes nothing).
A worker can also die while its work horse trains on (redis away for longer than rq's horse
monitor allows); the horse ends its job by itself, and the fresh worker starts only once it has.

The training code (torch, torchvision, the engine) is imported once, before the first job: rq
forks a work horse per job, and each would otherwise import it again, 2-5 s before every
retraining that a relabel asks for.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import time

import redis
from rq import Worker

from .settings import Settings

logger = logging.getLogger("ml_backend.worker")

#: seconds between two tries to reach redis again
RETRY_SECONDS = 2.0


class TrainingWorker(Worker):
    """rq's Worker that remembers whether it was asked to stop (a signal or rq's shutdown command)."""

    stop_requested = False

    def request_stop(self, signum, frame):
        self.stop_requested = True
        super().request_stop(signum, frame)


def serve(queues: list[str], connection: redis.Redis, *, logging_level: str = "INFO",
          retry_seconds: float = RETRY_SECONDS) -> None:
    """Serve ``queues`` with a TrainingWorker until one is asked to stop; a worker that ends
    otherwise (redis gone) is followed, once redis answers, by a fresh one."""
    while True:
        worker = TrainingWorker(queues, connection=connection)
        try:
            worker.work(logging_level=logging_level)
        except redis.exceptions.RedisError as exc:     # its teardown could not reach redis either
            logger.error("worker %s: redis went away (%s)", worker.name, exc)
        finally:
            _stop_listening(worker)
        if worker.stop_requested or _wait_for_orphaned_horse(worker):
            return
        logger.error("worker %s ended without being asked to (redis gone?): serving %s again with a new worker "
                     "once redis answers; the project it was training is queued again by the web app's watchdog",
                     worker.name, ", ".join(queues))
        wait_for_redis(connection, retry_seconds=retry_seconds)


class _StopWaiting(Exception):
    """SIGTERM or SIGINT while waiting for an orphaned work horse."""


def _wait_for_orphaned_horse(worker: Worker) -> bool:
    """rq's worker can die while its work horse trains on (redis away for longer than the horse
    monitor's timeout: "HorseMonitorTimeoutException ... quitting"); the horse runs in a session of
    its own and ends its job by itself. Wait for it before a fresh worker starts, so that this
    process never trains two jobs at once (two trainings on one GPU) and leaves no zombie behind.
    True when SIGTERM or SIGINT came meanwhile: stop serving, the horse finishes its job alone."""
    pid = worker.horse_pid
    if not pid:
        return False
    try:
        if os.waitpid(pid, os.WNOHANG)[0]:
            return False
    except ChildProcessError:
        return False
    logger.warning("worker %s: its work horse (pid %d) still runs its job: waiting for it to end before serving "
                   "again", worker.name, pid)

    def stop(signum, frame):
        raise _StopWaiting

    handlers = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        os.waitpid(pid, 0)
    except _StopWaiting:
        logger.info("asked to stop: the work horse (pid %d) finishes its job on its own", pid)
        return True
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    logger.info("worker %s: its work horse (pid %d) ended", worker.name, pid)
    return False


def wait_for_redis(connection: redis.Redis, *, retry_seconds: float = RETRY_SECONDS) -> None:
    """Return once redis answers a PING; log how long it took."""
    t0 = time.monotonic()
    while True:
        try:
            connection.ping()
            break
        except redis.exceptions.RedisError as exc:
            logger.warning("redis unreachable (%s): trying again in %.0f s", exc, retry_seconds)
            time.sleep(retry_seconds)
    logger.info("redis answers again after %.1f s", time.monotonic() - t0)


def _stop_listening(worker: Worker) -> None:
    """End the worker's pub/sub thread, which its failed teardown may have left running: once redis
    is back it would subscribe again and the backend's /health would count the dead worker live."""
    thread = getattr(worker, "pubsub_thread", None)
    if thread is None:
        return
    thread.stop()
    try:
        worker.pubsub.close()
    except redis.exceptions.RedisError:
        pass
    thread.join(5)


def preload_training_code() -> None:
    """Import the job's module and the engine (torch, torchvision) in the worker, so that every work
    horse forked from it starts with them.  Safe to fork after: the worker itself runs no tensor
    operation and never touches a GPU (CUDA is initialised in the horse, by its job)."""
    from .training import load_engine

    t0 = time.monotonic()
    load_engine()
    logger.info("training code loaded in %.1f s; every job's work horse starts with it", time.monotonic() - t0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ml_backend.worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("queues", nargs="*", help="queues to serve, the first before the others (default: RQ_QUEUE_NAME)")
    parser.add_argument("--url", help="redis URL (default: REDIS_URL, else REDIS_HOST/REDIS_PORT/REDIS_DB)")
    parser.add_argument("--logging-level", default="INFO")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.logging_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings.from_env()
    connection = (redis.Redis.from_url(args.url) if args.url else
                  redis.Redis.from_url(settings.redis_url) if settings.redis_url else
                  redis.Redis(host=settings.redis_host, port=settings.redis_port, db=settings.redis_db))
    preload_training_code()
    serve(args.queues or [settings.rq_queue_name], connection, logging_level=args.logging_level.upper())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
