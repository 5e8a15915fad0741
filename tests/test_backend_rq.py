"""The training queue on a real redis-server with a real rq worker (subprocess).

Fake Label Studio API + the real engine with enough epochs that a job lasts seconds, so that
events arrive while it runs; the real Label Studio is in tests/e2e.
"""
from __future__ import annotations

import functools
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import pytest
import redis
from rq.job import Job, JobStatus

from ml_backend.app import create_app
from ml_backend.training_queue import RQTrainingQueue, job_events
from ml_backend.settings import Settings
from ml_backend.store import ProjectStore
from tests.conftest import REPO, free_port
from tests.test_backend_fake_ls import PAT, FakeLabelStudio

pytestmark = pytest.mark.redis


@pytest.fixture
def rq_env(backend_env, redis_url, monkeypatch):
    monkeypatch.setenv("ALR_USE_REDIS", "true")
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("RQ_QUEUE_NAME", "alr-test")
    return redis_url


@pytest.fixture
def fake_ls(rq_env, monkeypatch):
    with FakeLabelStudio() as ls:
        ls.add_project(1)
        for tid in range(1, 31):
            k = tid % 3
            ls.add_task(1, tid, label=str(k), pixel=(20, 128, 235)[k])
        monkeypatch.setenv("LABEL_STUDIO_URL", ls.url)
        monkeypatch.setenv("LABEL_STUDIO_API_KEY", PAT)
        yield ls


@pytest.fixture
def rq_worker(fake_ls, tmp_path):
    """The training worker (`python -m ml_backend.worker`, rq's Worker) on the test queue, with the test's environment."""
    env = dict(os.environ, ALR_EPOCHS="60", PYTHONPATH=str(REPO))   # a job lasts seconds: bursts overlap it
    log = open(tmp_path / "worker.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "ml_backend.worker", "--url", os.environ["REDIS_URL"],
                             "alr-test"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    conn = redis.Redis.from_url(os.environ["REDIS_URL"])
    from rq import Worker
    deadline = time.monotonic() + 60
    while not Worker.all(connection=conn) and time.monotonic() < deadline:
        time.sleep(0.1)
    yield proc
    proc.terminate()
    proc.wait(20)
    log.close()
    print((tmp_path / "worker.log").read_text()[-3000:])


def wait_for_jobs(conn, project: int, timeout: float = 60.0) -> list[Job]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        n = int(conn.get(f"alr:train:{project}:seq") or 0)
        jobs = [Job.fetch(f"train-{project}-{i}", connection=conn) for i in range(1, n + 1)]
        if n and all(j.get_status().value in ("finished", "failed") for j in jobs) \
                and not conn.get(f"alr:train:{project}:pending"):
            return jobs
        time.sleep(0.2)
    raise TimeoutError("training jobs did not finish")


def test_concurrent_requests_create_one_pending_job(rq_env):
    conn = redis.Redis.from_url(rq_env)
    queue = RQTrainingQueue(conn, "alr-race", job_timeout=60)
    answers = []
    threads = [threading.Thread(target=lambda: answers.append(queue.request_training(5, "X"))) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({a["job_id"] for a in answers}) == 1
    assert sum(not a["coalesced"] for a in answers) == 1
    assert job_events(conn, 5, answers[0]["job_id"]) == (20, ["X"]) and queue.queue.count == 1


def test_an_event_is_never_folded_into_a_job_rq_has_started(rq_env):
    conn = redis.Redis.from_url(rq_env)
    queue = RQTrainingQueue(conn, "alr-started", job_timeout=60)
    first = queue.request_training(6, "ANNOTATION_CREATED")
    assert queue.request_training(6, "ANNOTATION_UPDATED,ANNOTATION_CREATED", events=2)["job_id"] == first["job_id"]
    assert job_events(conn, 6, first["job_id"]) == (3, ["ANNOTATION_CREATED", "ANNOTATION_UPDATED"])
    Job.fetch(first["job_id"], connection=conn).set_status(JobStatus.STARTED)   # what a worker does first
    later = queue.request_training(6, "ANNOTATION_DELETED")
    assert not later["coalesced"] and later["job_id"] != first["job_id"]
    assert job_events(conn, 6, first["job_id"]) == (3, ["ANNOTATION_CREATED", "ANNOTATION_UPDATED"])
    assert job_events(conn, 6, later["job_id"]) == (1, ["ANNOTATION_DELETED"])


def test_the_running_lock_outlives_its_ttl_while_held_and_lapses_after_its_holder_stops(rq_env, caplog):
    from ml_backend.training_queue import RunningLock, mark_dirty, orphaned_projects

    conn = redis.Redis.from_url(rq_env)
    lock = RunningLock(conn, 5, ttl=2)            # renewed every 2/3 s by its heartbeat thread
    assert lock.acquire()
    mark_dirty(conn, 5, "job-5")
    try:
        time.sleep(5)                              # 2.5 TTLs: a job longer than the lock's TTL
        assert conn.exists("alr:train:5:running"), "the heartbeat did not renew the lock"
        assert 5 not in orphaned_projects(conn)    # the watchdog must not queue a second job
        assert not RunningLock(conn, 5, ttl=2).acquire()
        assert "could not renew" not in caplog.text
    finally:
        lock._stop.set()                           # the holder dies without releasing (SIGKILL)
        lock._thread.join(5)
    time.sleep(2.5)
    assert not conn.exists("alr:train:5:running") and 5 in orphaned_projects(conn)
    conn.delete("alr:train:5:dirty")


def test_a_lapsed_running_lock_is_taken_back_when_free_and_lost_for_good_when_another_job_took_it(rq_env, caplog):
    """The key expired under a live job (redis away for longer than the TTL): still_held() takes it
    back if nobody holds it; if another job does, the lock is lost, and releasing it frees nothing."""
    from ml_backend.training_queue import RunningLock

    conn = redis.Redis.from_url(rq_env)
    key = "alr:train:9:running"
    lock = RunningLock(conn, 9, ttl=30)
    assert lock.acquire()
    token = conn.get(key)
    try:
        conn.delete(key)                                  # what redis' expiry did while it was away
        assert lock.still_held() and conn.get(key) == token and conn.ttl(key) > 0
        assert "taken back" in caplog.text
        conn.delete(key)
        other = RunningLock(conn, 9, ttl=30)                 # a second worker's job, queued by the watchdog
        assert other.acquire()
        assert not lock.still_held() and lock.lost.is_set()
        held_by_other = conn.get(key)
        lock.release()                                    # frees nothing: the lock is the other job's
        assert conn.get(key) == held_by_other != token
        other.release()
        assert not lock.still_held() and not conn.exists(key)     # lost for good, even once free again
    finally:
        lock._stop.set()
        conn.delete(key)


def test_the_worker_waits_for_an_orphaned_work_horse_and_stops_waiting_when_asked():
    """What `python -m ml_backend.worker` does when rq's worker died under a running horse: it
    waits for the horse and reaps it (no zombie); SIGTERM meanwhile ends the wait (stop serving)."""
    from types import SimpleNamespace

    from ml_backend.worker import _wait_for_orphaned_horse

    horse = subprocess.Popen(["sleep", "0.5"])
    assert _wait_for_orphaned_horse(SimpleNamespace(name="w1", horse_pid=horse.pid)) is False
    with pytest.raises(ChildProcessError):
        os.waitpid(horse.pid, os.WNOHANG)                  # reaped: no zombie left
    assert _wait_for_orphaned_horse(SimpleNamespace(name="w2", horse_pid=0)) is False

    horse = subprocess.Popen(["sleep", "60"])
    handler = signal.getsignal(signal.SIGTERM)
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    t0 = time.monotonic()
    try:
        assert _wait_for_orphaned_horse(SimpleNamespace(name="w3", horse_pid=horse.pid)) is True
        assert time.monotonic() - t0 < 30 and horse.poll() is None     # the horse goes on with its job
        assert signal.getsignal(signal.SIGTERM) is handler
    finally:
        timer.cancel()
        horse.kill()
        horse.wait()


def test_burst_of_50_webhooks_at_most_2_jobs_final_model_has_every_annotation(fake_ls, rq_worker):
    """A served version, then 50 annotations: at most two jobs; a first job that ends with the second
    queued leaves the older predictions to it (Label Studio deletes them one by one), and the second
    deletes them: Label Studio holds the final version's predictions only."""
    from ml_backend.training import run_training_job

    served = run_training_job(1, settings=Settings.from_env())["model_version"]
    client = create_app().test_client()
    conn = redis.Redis.from_url(os.environ["REDIS_URL"])
    annotated = {}
    t0 = time.monotonic()
    for i in range(50):
        tid = 1 + i % 30
        label = str((tid + 1) % 3)                     # the expert disagrees with the given label
        ann = fake_ls.annotate(tid, label)
        annotated[tid] = int(label)
        r = client.post("/webhook", json={"action": "ANNOTATION_CREATED", "project": {"id": 1},
                                          "annotation": {**ann, "project": 1}})
        assert r.status_code == 201
        if i == 0:
            # let the worker start the first job so the rest arrive while it runs
            deadline = time.monotonic() + 10
            while conn.get("alr:train:1:pending") and time.monotonic() < deadline:
                time.sleep(0.02)
    burst_seconds = time.monotonic() - t0
    jobs = wait_for_jobs(conn, 1)
    assert 1 <= len(jobs) <= 2, [j.id for j in jobs]
    assert all(j.get_status().value == "finished" for j in jobs), [j.exc_info for j in jobs]
    assert sum(j.meta["events"] for j in jobs) == 50                  # every event accounted for
    settings = Settings.from_env()
    store = ProjectStore(settings.model_dir, 1)
    final = store.current_version()
    meta = store.load_meta(final)
    assert set(meta["trusted_task_ids"]) == set(annotated)             # every annotation is in
    assert {int(k): v for k, v in meta["trained_task_labels"].items() if int(k) in annotated} == annotated
    assert fake_ls.projects[1]["model_version"] == final
    assert jobs[-1].meta["progress"]["stage"] == "done"
    # the second job may find nothing to train: the first read the tasks after the last annotation came
    pruned = [set(job.return_value()["pruned_versions"]) for job in jobs]
    first = jobs[0].return_value()["model_version"]
    assert pruned == ([{served}] if len(jobs) == 1 else [set(), {first, served} - {final}])
    assert {p["model_version"] for p in fake_ls.predictions} == {final}
    print(f"50 webhooks in {burst_seconds:.2f}s -> {len(jobs)} job(s)")


def test_health_sees_redis_and_worker(fake_ls, rq_worker):
    body = create_app().test_client().get("/health").get_json()
    assert body["queue"]["redis"] is True and body["queue"]["workers"] >= 1
    assert body["training_ready"] is True and body["label_studio"]["reachable"] is True


def test_redis_down_webhook_is_503_with_message_and_server_stays_up(backend_env, monkeypatch):
    monkeypatch.setenv("ALR_USE_REDIS", "true")
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")     # nothing listens
    client = create_app().test_client()
    t0 = time.monotonic()
    r = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 1}})
    assert r.status_code == 503 and "redis" in r.get_json()["error"]
    assert time.monotonic() - t0 < 1.0                     # Label Studio waits 1 s at most
    body = client.get("/health").get_json()
    assert body["status"] == "UP" and body["queue"]["redis"] is False and body["training_ready"] is False
    assert client.get("/is_training?project=1").status_code == 503


@functools.cache
def _seconds_per_epoch() -> float:
    """One Co-teaching epoch of a job on the fake project (30 images of 8 x 8 px, 3 classes), timed on
    this machine under its load of the moment (the difference of two trainings, so that set-up and
    scoring cancel out)."""
    from model import engine
    from ml_backend.training import engine_config

    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (30, 8, 8), dtype=np.uint8), np.arange(30) % 3
    settings = Settings.from_env()

    def train(epochs: int) -> float:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            engine.train_and_score(images, labels, class_names=["0", "1", "2"], checkpoint_path=f"{tmp}/c.pt",
                                   config=engine_config(engine, settings.replace(epochs=epochs)),
                                   progress_bar=False)
            return time.perf_counter() - t0

    train(5)                                                    # imports and first-call costs
    return max((train(45) - train(15)) / 30, 1e-3)


@pytest.fixture
def short_running_lock(monkeypatch) -> int:
    """ALR_RUNNING_LOCK_TTL for the workers a test starts: a killed job's lock lapses in seconds, not in
    the default's 30 (each test that waits for a lapse would wait that long).  Returns the TTL."""
    ttl = 6
    monkeypatch.setenv("ALR_RUNNING_LOCK_TTL", str(ttl))
    return ttl


def _epochs_lasting(seconds: float) -> int:
    """Epochs for a job whose training lasts about ``seconds`` here: long enough to be hit mid-way, no
    longer (a fixed count lasted 20 s on an idle 2-core machine and 130 s on a loaded CI one)."""
    return max(20, math.ceil(seconds / _seconds_per_epoch()))


def _start_worker(tmp_path, name: str, epochs: int) -> subprocess.Popen:
    env = dict(os.environ, ALR_EPOCHS=str(epochs), PYTHONPATH=str(REPO))
    log = open(tmp_path / f"{name}.log", "w")
    return subprocess.Popen([sys.executable, "-m", "ml_backend.worker", "--url", os.environ["REDIS_URL"], "alr-test"],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _stop_workers(workers: list[subprocess.Popen]) -> None:
    """SIGTERM to each worker still running (its process group: worker and horse), then wait for it."""
    for proc in workers:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def test_every_work_horse_starts_with_the_training_code_the_worker_imported_once(rq_env, tmp_path):
    """rq forks a work horse per job: without the worker's preload, each retraining imported torch and
    the engine first, 2-5 s of a job that fine-tunes for one."""
    from rq import Queue

    worker = _start_worker(tmp_path, "worker", epochs=20)
    try:
        job = Queue("alr-test", connection=redis.Redis.from_url(rq_env)).enqueue("tests.rq_jobs.imported",
                                                                               "model.engine")
        deadline = time.monotonic() + 120
        while job.get_status() not in (JobStatus.FINISHED, JobStatus.FAILED):
            assert time.monotonic() < deadline, "the worker did not run the job"
            time.sleep(0.2)
        assert job.return_value() is True
    finally:
        _stop_workers([worker])
    assert "training code loaded in" in (tmp_path / "worker.log").read_text()


@pytest.mark.parametrize("victim", ["work horse", "worker and horse"])
def test_a_killed_job_frees_its_project_and_its_events_reach_a_model(fake_ls, tmp_path, monkeypatch,
                                                                    short_running_lock, victim):
    """kill -9 mid-training: the running lock expires within its TTL, the web app's watchdog queues
    the project again, a live worker trains it; /health counts live workers only."""
    monkeypatch.setenv("ALR_WATCHDOG_SECONDS", "1")
    app = create_app()
    client = app.test_client()
    conn = redis.Redis.from_url(os.environ["REDIS_URL"])
    first = _start_worker(tmp_path, "worker-1", epochs=_epochs_lasting(15))    # killed 1.5 s in
    survivors = [first]
    try:
        ann = fake_ls.annotate(7, "2")
        assert client.post("/webhook", json={"action": "ANNOTATION_CREATED", "project": {"id": 1},
                                             "annotation": {**ann, "project": 1}}).status_code == 201
        deadline = time.monotonic() + 60
        while not (conn.get("alr:train:1:dirty") and conn.get("alr:train:1:running")):
            assert time.monotonic() < deadline, "the job did not start"
            time.sleep(0.1)
        horse = _children(first.pid)
        assert horse, "no work horse"
        time.sleep(1.0)
        killed_lock = conn.get("alr:train:1:running")       # the killed job's token
        t_kill = time.monotonic()
        for pid in horse:              # the horse runs in a session of its own (rq calls setsid)
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)                # the killed heartbeat renews nothing from here on
        freed = time.monotonic() - t_kill + conn.pttl("alr:train:1:running") / 1000    # when the lock lapses
        assert conn.get("alr:train:1:running") == killed_lock and freed <= short_running_lock + 2
        if victim == "worker and horse":
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(10)
            survivors = [_start_worker(tmp_path, "worker-2", epochs=10)]
            deadline = time.monotonic() + 60                    # the new worker registers (seconds on a busy machine)
            while (health := client.get("/health").get_json())["queue"]["workers"] == 0:
                assert time.monotonic() < deadline, health
                time.sleep(0.2)
            assert health["queue"]["workers"] == 1, health      # the dead worker is not counted
        # it lapses then, however long the new worker took to start (on a loaded CI machine, more than the
        # TTL: timing the loop below from the kill once read 32 s)
        while conn.get("alr:train:1:running") == killed_lock:
            assert time.monotonic() - t_kill < short_running_lock + 60, "the killed job's lock never lapsed"
            time.sleep(0.2)
        store = ProjectStore(Settings.from_env().model_dir, 1)
        # a hang guard, not a speed target: the "work horse" re-run is a whole job of worker-1's epochs
        deadline = time.monotonic() + 600
        while True:
            version = store.current_version()
            if version and 7 in store.load_meta(version)["trusted_task_ids"]:
                break
            assert time.monotonic() < deadline, "the killed job's annotation never reached a model"
            time.sleep(0.5)
        recovered = time.monotonic() - t_kill
        # the version is on disk before the job pushes its predictions, sets model_version and clears the
        # project's dirty mark: wait for the job's end (the mark), then check what it left
        deadline = time.monotonic() + 60
        while conn.get("alr:train:1:dirty"):
            assert time.monotonic() < deadline, "the re-run job published its version but never finished"
            time.sleep(0.2)
        assert fake_ls.projects[1]["model_version"] == version
        print(f"kill -9 of the {victim}: project freed after {freed:.1f}s, new version {version} after {recovered:.1f}s")
    finally:
        app.extensions["alr_watchdog"].stop()
        _stop_workers(survivors)


def test_a_job_killed_while_it_waited_for_the_project_s_lock_does_not_hide_the_project_from_the_watchdog(
        fake_ls, tmp_path, monkeypatch, short_running_lock):
    """Two workers: job A trains, job B (a later annotation) is started by the second worker and waits
    for A's running lock, still the project's pending job.  Both workers are killed (-9, worker and
    horse): the pending key names B, which will never come; the watchdog does not take it for a job
    on its way, queues the project, and a third worker trains both annotations."""
    from rq.job import Job

    monkeypatch.setenv("ALR_WATCHDOG_SECONDS", "1")
    app = create_app()
    client = app.test_client()
    conn = redis.Redis.from_url(os.environ["REDIS_URL"])
    workers = [_start_worker(tmp_path, "worker-1", epochs=_epochs_lasting(60))]    # A outlasts B's start

    def annotate(tid, choice):
        ann = fake_ls.annotate(tid, choice)
        r = client.post("/webhook", json={"action": "ANNOTATION_CREATED", "project": {"id": 1},
                                          "annotation": {**ann, "project": 1}})
        assert r.status_code == 201, r.get_data(as_text=True)
        return r.get_json()["job_id"]

    def kill(proc):
        for pid in _children(proc.pid):       # the horse runs in a session of its own
            os.kill(pid, signal.SIGKILL)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)

    def wait_until(condition, what, timeout=60.0):
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, what
            time.sleep(0.2)

    try:
        annotate(7, "2")
        wait_until(lambda: conn.get("alr:train:1:running"), "job A did not start")
        waiting = annotate(8, "0")
        workers.append(_start_worker(tmp_path, "worker-2", epochs=10))
        wait_until(lambda: Job.fetch(waiting, connection=conn).get_status() == "started", "job B was not started")
        assert app.extensions["alr"]["queue"].project_status(1)["pending_job"] == waiting   # on its way
        for proc in workers:
            kill(proc)
        assert conn.get("alr:train:1:pending").decode() == waiting and conn.get("alr:train:1:dirty")
        # it will never come: so it reads once redis has dropped the dead worker's connection (a moment
        # after the kill, longer on a loaded machine)
        wait_until(lambda: app.extensions["alr"]["queue"].project_status(1)["pending_job"] is None,
                   "the job of a killed worker is still taken for one on its way", timeout=10)
        workers = [_start_worker(tmp_path, "worker-3", epochs=10)]
        store = ProjectStore(Settings.from_env().model_dir, 1)

        def both_trained():
            version = store.current_version()
            return version and {7, 8} <= set(store.load_meta(version)["trusted_task_ids"])
        # A's lock lapses within its TTL, then the watchdog queues the project (a hang guard, not a target)
        wait_until(both_trained, "the annotations of the killed jobs never reached a model", timeout=300)
    finally:
        app.extensions["alr_watchdog"].stop()
        _stop_workers(workers)


def test_a_worker_asked_to_stop_while_its_job_waits_for_the_project_s_lock_hands_the_events_on_and_stops(
        fake_ls, tmp_path, monkeypatch):
    """Another worker's job trains the project (here the test holds its running lock) and this worker's
    job waits for it, nothing else queued.  SIGTERM (docker compose stop, a scale-down): the worker
    does not wait for the other training to end (compose grants a worker 10 minutes): its job hands
    the events to a pending job at the back of the queue and the worker stops within seconds; that
    job trains the annotation once the other training is over."""
    from ml_backend.training_queue import live_pending_job

    app = create_app()
    client = app.test_client()
    conn = redis.Redis.from_url(os.environ["REDIS_URL"])
    assert conn.set("alr:train:1:running", b"another-job", ex=600)
    workers = [_start_worker(tmp_path, "worker-1", epochs=10)]
    try:
        ann = fake_ls.annotate(7, "2")
        r = client.post("/webhook", json={"action": "ANNOTATION_CREATED", "project": {"id": 1},
                                          "annotation": {**ann, "project": 1}})
        assert r.status_code == 201, r.get_data(as_text=True)
        waiting = r.get_json()["job_id"]
        deadline = time.monotonic() + 60
        while Job.fetch(waiting, connection=conn).get_status() != "started":
            assert time.monotonic() < deadline, "the job was not started"
            time.sleep(0.2)
        time.sleep(1.0)                                   # in its wait for the running lock
        t_signal = time.monotonic()
        os.killpg(workers[0].pid, signal.SIGTERM)
        assert workers[0].wait(60) == 0, "the worker did not stop"    # it waited for the lock, forever
        print(f"SIGTERM under a waiting job: the worker stopped {time.monotonic() - t_signal:.1f}s after it")
        result = Job.fetch(waiting, connection=conn).return_value()
        assert result["status"] == "deferred", result
        assert live_pending_job(conn, 1) == result["to"] != waiting
        assert "(this worker is asked to stop)" in (tmp_path / "worker-1.log").read_text()

        conn.delete("alr:train:1:running")                # the other training ends
        workers = [_start_worker(tmp_path, "worker-2", epochs=10)]
        store = ProjectStore(Settings.from_env().model_dir, 1)
        deadline = time.monotonic() + 300                 # a hang guard
        while not ((version := store.current_version()) and 7 in store.load_meta(version)["trusted_task_ids"]):
            assert time.monotonic() < deadline, "the handed-on events never reached a model"
            time.sleep(0.5)
    finally:
        app.extensions["alr_watchdog"].stop()
        _stop_workers(workers)


def _without_redis(monkeypatch):
    """The web app (test client) and its reconciler with redis gone: nothing listens on the port of
    REDIS_URL until the test starts a redis-server there.  Returns (port, settings, client, reconciler)."""
    from ml_backend.reconcile import Reconciler

    port = free_port()
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{port}/0")
    monkeypatch.setenv("ALR_RECONCILE_SECONDS", "0")  # the test runs the reconciliation's periods itself
    settings = Settings.from_env()
    reconciler = Reconciler(RQTrainingQueue(redis.Redis.from_url(settings.redis_url), settings.rq_queue_name),
                            settings)
    return port, settings, create_app(settings).test_client(), reconciler


def test_a_first_training_refused_while_redis_was_down_still_comes(fake_ls, tmp_path, monkeypatch):
    """A project without a model version has no state to compare: its START_TRAINING (the Start
    Training button), refused while redis is down, is recorded, and once redis answers the
    reconciliation queues its first training (real redis-server, rq worker)."""
    from rq import SimpleWorker

    from tests.conftest import start_redis_server

    port, settings, client, reconciler = _without_redis(monkeypatch)
    r = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 1}})
    assert r.status_code == 503 and "recorded" in r.get_json()["error"]
    store = ProjectStore(settings.model_dir, 1)
    assert store.current_version() is None and len(store.refused_events()) == 1
    with pytest.raises(redis.exceptions.ConnectionError):
        reconciler.check_once()                          # still down: this period is skipped, nothing forgotten
    assert len(store.refused_events()) == 1
    redis_proc = start_redis_server(port, tmp_path)
    try:
        assert reconciler.check_once() == [1]
        SimpleWorker([settings.rq_queue_name], connection=redis.Redis.from_url(settings.redis_url)).work(burst=True)
        assert store.current_version() is not None
        assert store.refused_events() == [] and reconciler.check_once() == []
    finally:
        redis_proc.terminate()
        redis_proc.wait(10)


def test_a_swap_refused_while_redis_was_down_reaches_a_model(fake_ls, tmp_path, monkeypatch):
    """Two edits that swap two tasks' labels move none of Label Studio's counts; their webhooks,
    refused while redis is down, are recorded by the web app (and the tasks' updated_at moved), and
    once redis answers the reconciliation queues one training that trusts both new labels."""
    from rq import SimpleWorker

    from ml_backend.training import run_training_job
    from tests.conftest import start_redis_server

    first, second = fake_ls.annotate(4, "1"), fake_ls.annotate(5, "2")
    run_training_job(1, settings=Settings.from_env())
    port, settings, client, reconciler = _without_redis(monkeypatch)
    store = ProjectStore(settings.model_dir, 1)
    version = store.current_version()
    for annotation, other in ((first, "2"), (second, "1")):
        annotation["result"][0]["value"]["choices"] = [other]
        fake_ls.touch(annotation["task"])
        r = client.post("/webhook", json={"action": "ANNOTATION_UPDATED", "project": {"id": 1},
                                          "annotation": {**annotation, "project": 1}})
        assert r.status_code == 503 and "recorded" in r.get_json()["error"]
    assert len(store.refused_events()) == 2
    assert client.get("/health").get_json()["refused_events"] == {"1": 2}
    redis_proc = start_redis_server(port, tmp_path)
    try:
        assert reconciler.check_once() == [1]
        assert reconciler.check_once() == []             # its job is pending: nothing more to queue
        SimpleWorker([settings.rq_queue_name], connection=redis.Redis.from_url(settings.redis_url)).work(burst=True)
        new = store.current_version()
        assert new != version
        meta = store.load_meta(new)
        assert meta["trained_task_labels"]["4"] == 2 and meta["trained_task_labels"]["5"] == 1
        assert {4, 5} <= set(meta["trusted_task_ids"])
        assert store.refused_events() == [] and reconciler.check_once() == []
        assert client.get("/health").get_json()["refused_events"] == {}
    finally:
        redis_proc.terminate()
        redis_proc.wait(10)


def test_a_job_for_a_project_deleted_in_label_studio_fails_once_and_forgets_its_records(fake_ls):
    """Label Studio answers 404 for the project: the job fails, the watchdog does not queue it again
    and the reconciliation has no record left to queue it for (real redis-server, rq worker)."""
    from rq import SimpleWorker

    from ml_backend.reconcile import Reconciler
    from ml_backend.training_queue import Watchdog

    settings = Settings.from_env()
    store = ProjectStore(settings.model_dir, 99)                 # a project Label Studio does not have
    store.record_refused_event("ANNOTATION_CREATED")
    conn = redis.Redis.from_url(settings.redis_url)
    queue = RQTrainingQueue(conn, settings.rq_queue_name)
    assert Reconciler(queue, settings).check_once() == [99]
    SimpleWorker([settings.rq_queue_name], connection=conn).work(burst=True)
    assert Job.fetch("train-99-1", connection=conn).get_status() == JobStatus.FAILED
    assert store.refused_events() == [] and not conn.exists("alr:train:99:dirty")
    assert Watchdog(queue, period=1).check_once() == [] and Reconciler(queue, settings).check_once() == []



class _RedisRestartProject:
    """Project 1 of the fake Label Studio behind the web app (test client, watchdog every second) and
    one training worker, on a redis-server (append-only, as in docker/) that the test stops and
    restarts on its files."""

    def __init__(self, fake_ls, tmp_path, monkeypatch, *, epochs: int):
        self.fake_ls, self.tmp_path = fake_ls, tmp_path
        self.port = free_port()
        self.redis_dir = tmp_path / "redis"
        self.redis_dir.mkdir()
        self.start_redis()
        monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{self.port}/0")
        monkeypatch.setenv("ALR_WATCHDOG_SECONDS", "1")
        self.app = create_app()
        self.client = self.app.test_client()
        self.conn = redis.Redis.from_url(os.environ["REDIS_URL"])
        self.worker = _start_worker(tmp_path, "worker", epochs=epochs)
        self.store = ProjectStore(Settings.from_env().model_dir, 1)

    def stop_redis(self) -> None:
        self.redis_proc.terminate()
        self.redis_proc.wait(10)

    def start_redis(self) -> None:
        from tests.conftest import start_redis_server

        self.redis_proc = start_redis_server(self.port, self.redis_dir, appendonly=True)

    def annotate(self, tid: int) -> None:
        ann = self.fake_ls.annotate(tid, "2")
        assert self.client.post("/webhook", json={"action": "ANNOTATION_CREATED", "project": {"id": 1},
                                                  "annotation": {**ann, "project": 1}}).status_code == 201

    def wait_training(self) -> str:
        """Wait until a job holds the project's running lock; its job id."""
        deadline = time.monotonic() + 60
        while not (self.conn.get("alr:train:1:running") and self.conn.get("alr:train:1:dirty")):
            assert time.monotonic() < deadline, "the job did not start"
            time.sleep(0.1)
        return self.conn.get("alr:train:1:dirty").decode()

    def wait_for_a_model_trusting(self, tid: int) -> str:
        deadline = time.monotonic() + 600        # a hang guard, not a speed target
        while True:
            version = self.store.current_version()
            if version and tid in self.store.load_meta(version)["trusted_task_ids"]:
                return version
            assert time.monotonic() < deadline, f"task {tid}'s annotation never reached a model"
            time.sleep(0.2)

    def wait_clean(self) -> None:
        deadline = time.monotonic() + 120
        while any(self.conn.get(f"alr:train:1:{k}") for k in ("dirty", "running", "pending")):
            assert time.monotonic() < deadline, "the project never ended clean"
            time.sleep(0.2)

    def close(self) -> None:
        self.app.extensions["alr_watchdog"].stop()
        try:
            if self.worker.poll() is None:
                os.killpg(self.worker.pid, signal.SIGTERM)
                try:
                    self.worker.wait(30)
                except subprocess.TimeoutExpired:        # a failed test: its job still trains
                    os.killpg(self.worker.pid, signal.SIGKILL)
                    self.worker.wait(10)
        finally:
            self.redis_proc.terminate()
            self.redis_proc.wait(10)
        for log in sorted(self.tmp_path.glob("worker*.log")):
            print(log.name, log.read_text()[-3000:])


# training seconds: redis is back about 4 s into the training mid-training; it goes 1 s after the job's start.
# Mid-training, the outage (5 s) is shorter than the running lock's TTL (the default, 30 s); over the job's end,
# the lock of the job that could not release it lapses, and a short TTL spares the test the default's wait.
@pytest.mark.parametrize("outage, seconds, lock_lapses", [("mid-training", 20, False), ("over the job's end", 6, True)])
def test_redis_restarted_under_a_job_loses_nothing_and_the_worker_trains_on(fake_ls, tmp_path, monkeypatch, request,
                                                                             outage, seconds, lock_lapses):
    """redis (append-only, as in docker/) stopped while a job trains and restarted on its files,
    5 s later ("mid-training") or once the job has published and found redis gone when it came to
    clear its dirty mark ("over the job's end"): the annotation reaches a model, the project ends
    clean (no running lock, no dirty mark: the watchdog's re-run found nothing new), and the same
    rq worker trains the next event."""
    if lock_lapses:
        request.getfixturevalue("short_running_lock")
    stack = _RedisRestartProject(fake_ls, tmp_path, monkeypatch, epochs=_epochs_lasting(seconds))
    try:
        stack.annotate(7)
        stack.wait_training()
        time.sleep(1.0)
        stack.stop_redis()
        if outage == "mid-training":
            time.sleep(5)
            assert stack.store.current_version() is None, "the job ended before redis came back: lower the machine's load"
        else:
            stack.wait_for_a_model_trusting(7)
            time.sleep(3)                        # the job came to clear its dirty mark: redis refused
        stack.start_redis()
        t_back = time.monotonic()
        version = stack.wait_for_a_model_trusting(7)
        stack.wait_clean()
        print(f"redis down {outage}: version {version}, project clean {time.monotonic() - t_back:.1f}s after redis came back")
        assert fake_ls.projects[1]["model_version"] == version
        assert stack.worker.poll() is None, "the worker died with redis"
        assert stack.client.get("/health").get_json()["queue"]["workers"] == 1      # a dead worker is not counted
        stack.annotate(8)
        second = stack.wait_for_a_model_trusting(8)
        stack.wait_clean()
        assert second != version and fake_ls.projects[1]["model_version"] == second
        os.killpg(stack.worker.pid, signal.SIGTERM)              # asked to stop, it stops: no new worker
        assert stack.worker.wait(30) == 0
    finally:
        stack.close()


def test_a_job_whose_lock_lapsed_and_was_taken_stops_and_the_worker_serves_on_without_a_zombie(
        fake_ls, tmp_path, monkeypatch, short_running_lock):
    """redis away for longer than the running lock's TTL under a training job: the lock lapses (and
    rq's worker quits while its work horse trains on). Once redis is back a second worker's job
    could take the project (here the test takes the lock, as that job would): the first job stops
    training (`superseded`, nothing kept, the project still marked dirty), and the process waits for
    its orphaned horse before it serves again, never two trainings at once, no zombie left. Once the
    lock is free, the watchdog queues the project and the annotation reaches a model."""
    stack = _RedisRestartProject(fake_ls, tmp_path, monkeypatch,      # the job outlives an outage of the lock's TTL
                                 epochs=_epochs_lasting(5 * short_running_lock))
    try:
        stack.annotate(7)
        job_id = stack.wait_training()
        time.sleep(1.0)
        stack.stop_redis()
        time.sleep(short_running_lock + 3)
        assert not stack.store.list_versions(), "the job ended before redis came back: lower the machine's load"
        horse = _children(stack.worker.pid)
        assert horse, "no work horse"
        for pid in horse:            # frozen until the test holds the lock: its heartbeat would take it back
            os.kill(pid, signal.SIGSTOP)
        try:
            stack.start_redis()
            deadline = time.monotonic() + 10
            while True:                               # redis may answer LOADING for a moment
                try:
                    took = stack.conn.set("alr:train:1:running", b"another-job", nx=True, ex=600)
                    break
                except redis.exceptions.BusyLoadingError:
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
        finally:
            for pid in horse:
                os.kill(pid, signal.SIGCONT)
        assert took, "the lapsed lock was still there when redis came back"
        deadline = time.monotonic() + 600             # a hang guard
        while (result := Job.fetch(job_id, connection=stack.conn).return_value()) is None:
            assert time.monotonic() < deadline, "the job never ended"
            time.sleep(0.5)
        assert result == {"status": "superseded", "project": 1}
        log = (tmp_path / "worker.log").read_text()
        assert "will not publish" in log and "', nothing kept" in log
        assert not stack.store.list_versions() and not fake_ls.predictions
        assert stack.conn.get("alr:train:1:dirty").decode() == job_id
        if "quitting" in log:                         # rq's worker died under its horse: the process waited
            assert "waiting for it to end before serving again" in log
        time.sleep(1.0)
        states = subprocess.run(["ps", "-o", "stat=", "--ppid", str(stack.worker.pid)], capture_output=True,
                                text=True).stdout.split()
        assert not [s for s in states if s.startswith("Z")], f"zombie children of the worker: {states}"
        os.killpg(stack.worker.pid, signal.SIGTERM)  # it serves on, and stops when asked
        assert stack.worker.wait(30) == 0
        stack.worker = _start_worker(tmp_path, "worker-2", epochs=60)   # the re-run need not be long

        stack.conn.delete("alr:train:1:running")     # the other job ends (here: dies) and frees the lock
        version = stack.wait_for_a_model_trusting(7)
        stack.wait_clean()
        assert fake_ls.projects[1]["model_version"] == version and stack.store.list_versions() == [version]
        assert {p["task"] for p in fake_ls.predictions} == set(fake_ls.tasks)
    finally:
        stack.close()
