"""End to end: the real Label Studio 1.23.2 + redis-server + this backend + an rq worker + the real engine.

Needs ``bash scripts/setup_label_studio.sh`` (Label Studio in .ls-venv) and
``apt-get install -y redis-server``.  Run: ``pytest -m e2e tests/e2e`` (about 3-5 minutes on
2 CPU cores: ~60 s Label Studio start-up, ~40 s Phase 1 on 8 px images, a few s Phase 2).
"""
from __future__ import annotations

import json
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import requests

from ml_backend.demo import LS, Stack, build_demo_project, choice_annotation, make_digits_project
from tests.e2e.conftest import backend_stack, current_predictions, ls_api, print_logs, wait_idle

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

N_IMAGES = 200
NOISE_RATE = 0.2
BACKEND_ENV = {   # small and fast: digits are 8x8 originally; 30 epochs of a small CNN
    "ALR_IMAGE_SIZE": "8", "ALR_CHANNELS": "1", "ALR_EPOCHS": "30", "ALR_FINETUNE_EPOCHS": "5",
    "ALR_FORGET_RATE": str(NOISE_RATE), "ALR_SEED": "0", "LOG_LEVEL": "INFO",
    "ALR_RECONCILE_SECONDS": "5",     # events refused while redis is down are found within seconds
}


@pytest.fixture(scope="module")
def e2e(label_studio, admin_pat, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("e2e")
    stack = backend_stack(label_studio, workdir)
    timings = {}
    try:
        stack.start_redis()
        ls = ls_api(label_studio)
        stack.start_backend(admin_pat, BACKEND_ENV)          # a personal access token
        data = make_digits_project(n_images=N_IMAGES, noise_rate=NOISE_RATE, seed=0)
        project_id, ml_id, mapping = build_demo_project(stack, ls, data)
        truth = {tid: (data.given[i], data.truth[i]) for tid, i in mapping.items()}
        t1 = time.monotonic()
        ls.train(ml_id)                   # the Start Training button -> START_TRAINING webhook
        ls.wait_model_version(project_id, timeout=400)
        wait_idle(stack, project_id)      # connecting / setting the sampling sent PROJECT_UPDATED too
        version = ls.project(project_id)["model_version"]
        timings["first_version"] = time.monotonic() - t1
        yield {"stack": stack, "ls": ls, "project": project_id, "ml": ml_id, "truth": truth,
               "version": version, "timings": timings, "workdir": workdir}
    finally:
        stack.stop()
        print_logs(stack)


def test_every_task_has_a_prediction_of_the_current_version(e2e):
    ls, pid, version = e2e["ls"], e2e["project"], e2e["version"]
    assert ls.project(pid)["model_version"] == version
    preds = current_predictions(ls, pid, version)
    assert set(preds) == set(e2e["truth"])
    item = next(iter(preds.values()))
    region = item["result"][0]
    assert region["type"] == "choices" and region["from_name"] == "label" and region["to_name"] == "image"
    assert {"given_label", "prob_label_wrong", "loss", "vog"} <= set(region["meta"])
    print("timings:", e2e["timings"])


def test_lowest_scores_are_mostly_truly_mislabelled(e2e):
    preds = current_predictions(e2e["ls"], e2e["project"], e2e["version"])
    lowest = sorted(preds, key=lambda tid: preds[tid]["score"])[:20]
    wrong = {tid for tid, (given, true) in e2e["truth"].items() if given != true}
    precision = len(wrong & set(lowest)) / 20
    noise = len(wrong) / len(e2e["truth"])
    print(f"precision@20 = {precision:.2f} (noise rate {noise:.2f})")
    assert precision >= max(0.5, 2.5 * noise)
    e2e["lowest"] = lowest


def test_next_task_under_uncertainty_sampling_is_from_the_top_list(e2e):
    ls, pid = e2e["ls"], e2e["project"]
    assert ls.project(pid)["sampling"] == "Uncertainty sampling"
    preds = current_predictions(ls, pid, e2e["version"])
    lowest = sorted(preds, key=lambda tid: preds[tid]["score"])[:20]
    task = ls.call("GET", f"/api/projects/{pid}/next")
    assert task["id"] in lowest, (task["id"], lowest)
    e2e["next_task"] = task["id"]


def test_relabel_through_the_api_makes_a_new_version_with_that_label_trusted(e2e):
    ls, pid, old = e2e["ls"], e2e["project"], e2e["version"]
    tid = e2e.get("next_task") or min(current_predictions(ls, pid, old).items(), key=lambda kv: kv[1]["score"])[0]
    given, true = e2e["truth"][tid]
    t0 = time.monotonic()
    ls.call("POST", f"/api/tasks/{tid}/annotations", json=choice_annotation(true))
    new = ls.wait_model_version(pid, not_in={old}, timeout=300)      # ANNOTATION_CREATED webhook -> job
    wait_idle(e2e["stack"], pid)
    new = ls.project(pid)["model_version"]
    print(f"relabel -> new version in {time.monotonic() - t0:.1f}s")
    meta = json.loads((Path(e2e["workdir"]) / "models" / f"project-{pid}" / "versions" / new / "meta.json").read_text())
    assert meta["phase"] == 2 and tid in meta["trusted_task_ids"]
    assert meta["trained_task_labels"][str(tid)] == true
    preds = current_predictions(ls, pid, new)
    assert set(preds) == set(e2e["truth"])
    assert preds[tid]["result"][0]["meta"]["trusted"] is True


def versions(stack: Stack, project_id: int) -> list[str]:
    return requests.post(f"{stack.backend_url}/versions", json={"project": project_id}, auth=stack.backend_auth,
                         timeout=10).json()["versions"]


def test_annotation_burst_and_deletion_through_label_studio_reach_the_model(e2e):
    """Annotations made through the real Label Studio in quick succession: no webhook lost; a
    deleted annotation (ANNOTATIONS_DELETED) stops being trusted."""
    ls, stack, pid = e2e["ls"], e2e["stack"], e2e["project"]
    before = len(versions(stack, pid))
    annotated = {}
    for tid, (given, true) in list(e2e["truth"].items())[:15]:
        ann = ls.call("POST", f"/api/tasks/{tid}/annotations", json=choice_annotation(true))
        annotated[tid] = ann["id"]
    wait_idle(stack, pid)
    jobs = len(versions(stack, pid)) - before
    version = ls.project(pid)["model_version"]
    meta = json.loads((Path(e2e["workdir"]) / "models" / f"project-{pid}" / "versions" / version / "meta.json").read_text())
    assert set(annotated) <= set(meta["trusted_task_ids"])
    print(f"15 annotations through Label Studio -> {jobs} training job(s)")
    assert 1 <= jobs <= 15

    tid, aid = next(iter(annotated.items()))
    requests.delete(f"{ls.url}/api/annotations/{aid}", headers=ls.s.headers, timeout=30).raise_for_status()
    ls.wait_model_version(pid, not_in={version}, timeout=300)
    wait_idle(stack, pid)
    version = ls.project(pid)["model_version"]
    meta = json.loads((Path(e2e["workdir"]) / "models" / f"project-{pid}" / "versions" / version / "meta.json").read_text())
    assert tid not in meta["trusted_task_ids"]
    assert meta["trained_task_labels"][str(tid)] == e2e["truth"][tid][0]     # back to the noisy label
    # older versions' predictions were deleted: one prediction per task, of the current version
    remaining = ls.call("GET", f"/api/projects/{pid}/model-versions/")
    assert {v for v in remaining if v.startswith("alr-")} == {version}, remaining


def test_annotations_made_while_redis_was_down_reach_a_model(e2e):
    """redis stopped: Label Studio's webhooks get 503 and are never retried; redis restarted (its
    append-only file on): the reconciliation sees the project's annotation counts moved and queues
    a training, whose version trusts every annotation made meanwhile."""
    ls, stack, pid = e2e["ls"], e2e["stack"], e2e["project"]
    wait_idle(stack, pid)
    version = ls.project(pid)["model_version"]
    annotated = [tid for tid in e2e["truth"] if not ls.call("GET", f"/api/tasks/{tid}/annotations")][:3]
    stack.stop("redis")
    t0 = time.monotonic()
    for tid in annotated:
        ls.call("POST", f"/api/tasks/{tid}/annotations", json=choice_annotation(e2e["truth"][tid][1]))
    assert f"webhook ANNOTATION_CREATED for project {pid} NOT queued" in (Path(e2e["workdir"]) / "backend.log").read_text()
    stack.start_redis()
    new = ls.wait_model_version(pid, not_in={version}, timeout=300)
    wait_idle(stack, pid)
    new = ls.project(pid)["model_version"]
    print(f"redis down during 3 annotations: new version {new} {time.monotonic() - t0:.0f}s after the first")
    meta = json.loads((Path(e2e["workdir"]) / "models" / f"project-{pid}" / "versions" / new / "meta.json").read_text())
    assert set(annotated) <= set(meta["trusted_task_ids"])
    assert set(current_predictions(ls, pid, new)) == set(e2e["truth"])


def test_an_annotation_edited_while_redis_was_down_reaches_a_model(e2e):
    """An edit to another label moves none of the project's counts; its webhook refused while
    redis is down, the reconciliation sees it in the project summary's label counts."""
    ls, stack, pid = e2e["ls"], e2e["stack"], e2e["project"]
    wait_idle(stack, pid)
    tid = next(t for t in e2e["truth"] if not ls.call("GET", f"/api/tasks/{t}/annotations"))
    version = ls.project(pid)["model_version"]
    annotation = ls.call("POST", f"/api/tasks/{tid}/annotations",      # with redis up: a model trusts it
                         json=choice_annotation(e2e["truth"][tid][1]))
    ls.wait_model_version(pid, not_in={version}, timeout=300)
    wait_idle(stack, pid)
    version = ls.project(pid)["model_version"]
    meta_dir = Path(e2e["workdir"]) / "models" / f"project-{pid}" / "versions"
    assert tid in json.loads((meta_dir / version / "meta.json").read_text())["trusted_task_ids"]
    other = str((e2e["truth"][tid][1] + 1) % 10)
    counts_before = [ls.project(pid)[f] for f in ("total_annotations_number", "num_tasks_with_annotations")]
    stack.stop("redis")
    t0 = time.monotonic()
    ls.call("PATCH", f"/api/annotations/{annotation['id']}", json={"result": choice_annotation(other)["result"]})
    assert [ls.project(pid)[f] for f in ("total_annotations_number", "num_tasks_with_annotations")] == counts_before
    assert f"webhook ANNOTATION_UPDATED for project {pid} NOT queued" in \
        (Path(e2e["workdir"]) / "backend.log").read_text()
    stack.start_redis()
    ls.wait_model_version(pid, not_in={version}, timeout=300)
    wait_idle(stack, pid)
    new = ls.project(pid)["model_version"]
    print(f"redis down during an edit: new version {new} {time.monotonic() - t0:.0f}s after the edit")
    meta = json.loads((meta_dir / new / "meta.json").read_text())
    assert meta["trained_task_labels"][str(tid)] == int(other) and tid in meta["trusted_task_ids"]


@pytest.mark.parametrize("down", ["redis", "backend"])
def test_a_swap_made_while_redis_or_the_backend_was_down_reaches_a_model(e2e, down):
    """Two edits that swap two tasks' labels move neither the project's counts nor its label counts.
    redis down: their webhooks get 503 and the web app records them; the backend's web app down:
    they get no answer and nothing is recorded, but both tasks' updated_at move. Either way, once
    the process is back, the reconciliation queues a training that trusts both new labels."""
    ls, stack, pid = e2e["ls"], e2e["stack"], e2e["project"]
    wait_idle(stack, pid)
    tids = [t for t in e2e["truth"] if not ls.call("GET", f"/api/tasks/{t}/annotations")]
    first = tids[0]
    second = next(t for t in tids[1:] if e2e["truth"][t][1] != e2e["truth"][first][1])
    labels = {first: str(e2e["truth"][first][1]), second: str(e2e["truth"][second][1])}
    version = ls.project(pid)["model_version"]
    annotations = {tid: ls.call("POST", f"/api/tasks/{tid}/annotations", json=choice_annotation(label))
                   for tid, label in labels.items()}
    ls.wait_model_version(pid, not_in={version}, timeout=300)
    wait_idle(stack, pid)
    version = ls.project(pid)["model_version"]

    def state():
        project = ls.project(pid)
        return ([project[f] for f in ("total_annotations_number", "num_tasks_with_annotations")],
                ls.call("GET", f"/api/projects/{pid}/summary/")["created_labels"])

    before = state()
    stack.stop(down)
    t0 = time.monotonic()
    for tid, other in ((first, labels[second]), (second, labels[first])):
        ls.call("PATCH", f"/api/annotations/{annotations[tid]['id']}", json={"result": choice_annotation(other)["result"]})
    assert state() == before                             # nothing Label Studio counts moved
    refused = Path(e2e["workdir"]) / "models" / f"project-{pid}" / "refused-events"
    assert len(list(refused.glob("*.json"))) == (2 if down == "redis" else 0)
    if down == "redis":
        stack.start_redis()
    else:
        stack.start_web_app()
    ls.wait_model_version(pid, not_in={version}, timeout=300)
    wait_idle(stack, pid)
    new = ls.project(pid)["model_version"]
    print(f"{down} down during a swap: new version {new} {time.monotonic() - t0:.0f}s after the edits")
    meta = json.loads((Path(e2e["workdir"]) / "models" / f"project-{pid}" / "versions" / new / "meta.json").read_text())
    assert meta["trained_task_labels"][str(first)] == int(labels[second])
    assert meta["trained_task_labels"][str(second)] == int(labels[first])
    assert {first, second} <= set(meta["trusted_task_ids"])
    assert not list(refused.glob("*.json"))


def test_a_given_label_edited_in_the_task_data_reaches_a_model_and_pushes_queue_nothing(e2e):
    """Label Studio sends no webhook when a task's data is edited (a given label corrected by a
    script): the reconciliation sees the task's updated_at move and a new version trains on the new
    label. The backend's own prediction pushes move no updated_at: no training follows them."""
    ls, stack, pid = e2e["ls"], e2e["stack"], e2e["project"]
    wait_idle(stack, pid)
    tid = next(t for t, (given, true) in e2e["truth"].items()
               if given != true and not ls.call("GET", f"/api/tasks/{t}/annotations"))
    version = ls.project(pid)["model_version"]
    task = ls.call("GET", f"/api/tasks/{tid}")
    t0 = time.monotonic()
    ls.call("PATCH", f"/api/tasks/{tid}", json={"data": {**task["data"], "label": str(e2e["truth"][tid][1])}})
    ls.wait_model_version(pid, not_in={version}, timeout=300)
    wait_idle(stack, pid)
    new = ls.project(pid)["model_version"]
    print(f"a given label edited in the task data: new version {new} {time.monotonic() - t0:.0f}s after the edit")
    meta = json.loads((Path(e2e["workdir"]) / "models" / f"project-{pid}" / "versions" / new / "meta.json").read_text())
    assert meta["trained_task_labels"][str(tid)] == e2e["truth"][tid][1] and tid not in meta["trusted_task_ids"]
    log = Path(e2e["workdir"]) / "backend.log"
    queued = log.read_text().count("reconciliation queued")
    time.sleep(3 * int(BACKEND_ENV["ALR_RECONCILE_SECONDS"]))        # three periods after the pushes
    assert log.read_text().count("reconciliation queued") == queued
    assert ls.project(pid)["model_version"] == new


def test_health_reports_everything(e2e):
    body = requests.get(f"{e2e['stack'].backend_url}/health", auth=e2e["stack"].backend_auth, timeout=10).json()
    assert body["queue"]["redis"] is True and body["queue"]["workers"] >= 1
    assert body["label_studio"]["reachable"] is True
    assert body["model_versions"][str(e2e["project"])].startswith("alr-v")
    assert body["refused_events"] == {}             # every event refused while redis was down reached a model


def test_secrets_never_reach_logs_or_redis(e2e, admin_pat):
    """The API key and the backend's password appear in no log and in no redis value (rq job
    arguments and meta included) after a full run: training, relabels, a burst, a deletion."""
    import redis as redis_lib

    stack = e2e["stack"]
    secrets = {"LABEL_STUDIO_API_KEY": admin_pat, "BASIC_AUTH_PASS": stack.backend_password}
    for name in ("backend", "worker", "redis"):
        text = (Path(e2e["workdir"]) / f"{name}.log").read_text(errors="replace")
        leaked = [k for k, v in secrets.items() if v in text]
        assert not leaked, f"{name}.log holds {leaked}"
    conn = redis_lib.Redis.from_url(stack.redis_url)
    keys = list(conn.scan_iter(count=1000))
    assert keys, "redis holds nothing: the check would prove nothing"
    for key in keys:
        blobs = [key, conn.dump(key) or b""]
        if conn.type(key) == b"hash":           # rq keeps a job's call (arguments) zlib-compressed
            for value in conn.hgetall(key).values():
                try:
                    blobs.append(zlib.decompress(value))
                except zlib.error:
                    blobs.append(value)
        leaked = [k for k, v in secrets.items() if any(v.encode() in blob for blob in blobs)]
        assert not leaked, f"redis key {key!r} holds {leaked}"
