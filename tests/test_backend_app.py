"""Flask test-client tests of the backend app: /setup, /predict, /webhook, /health, bad input.

Training runs in the in-process fallback (no redis) against a fake Label Studio API and the
real engine on 8 px images with few epochs, so a full train -> push -> predict cycle takes seconds.
"""
from __future__ import annotations

import json
import re
import threading
import time
from html import escape

import numpy as np
import pytest

from ml_backend.app import create_app
from ml_backend.settings import Settings
from ml_backend.store import ProjectStore
from ml_backend.training import run_training_job
from tests.test_backend_fake_ls import DIGITS_CONFIG, LEGACY_TOKEN, PAT, FakeLabelStudio, png_bytes

# pixel value per class: 0 -> dark, 1 -> mid, 2 -> bright
PIXEL = {0: 20, 1: 128, 2: 235}


@pytest.fixture
def fake_ls(backend_env, monkeypatch):
    with FakeLabelStudio(legacy_enabled=False) as ls:
        ls.add_project(1)
        tid = 100
        for k in range(3):
            for _ in range(6):
                ls.add_task(1, tid, label=str(k), pixel=PIXEL[k])
                tid += 1
        # two mislabelled tasks (bright image labelled "0", dark image labelled "2")
        ls.add_task(1, 200, label="0", pixel=PIXEL[2])
        ls.add_task(1, 201, label="2", pixel=PIXEL[0])
        ls.add_task(1, 202, label=None, pixel=PIXEL[1])          # no label: scored only
        ls.add_task(1, 203, label="1", pixel=0, image=b"not a png")   # broken image: skipped
        monkeypatch.setenv("LABEL_STUDIO_URL", ls.url)
        monkeypatch.setenv("LABEL_STUDIO_API_KEY", PAT)
        yield ls


def setup_body(ls):
    return {"project": "1.1700000000", "schema": DIGITS_CONFIG, "hostname": ls.url, "access_token": "x",
            "extra_params": None}


def predict_body(tasks):
    return {"tasks": tasks, "project": "1.1700000000", "label_config": DIGITS_CONFIG,
            "params": {"login": None, "password": None, "context": None}}


def test_setup_before_training_says_untrained(fake_ls):
    client = create_app().test_client()
    r = client.post("/setup", json=setup_body(fake_ls))
    assert r.status_code == 200 and r.get_json() == {"model_version": "alr-untrained"}


def test_predict_before_training_returns_one_empty_item_per_task(fake_ls):
    client = create_app().test_client()
    tasks = [fake_ls.tasks[100], fake_ls.tasks[101]]
    r = client.post("/predict", json=predict_body(tasks))
    assert r.status_code == 200
    assert [x["result"] for x in r.get_json()["results"]] == [[], []]


def test_training_job_publishes_version_pushes_all_and_predict_serves_cache(fake_ls):
    summary = run_training_job(1, settings=Settings.from_env(), reason="test")
    assert summary["status"] == "trained" and summary["phase"] == 1
    version = summary["model_version"]
    assert fake_ls.projects[1]["model_version"] == version
    pushed = {p["task"]: p for p in fake_ls.predictions}
    assert set(pushed) == set(fake_ls.tasks) - {203}                     # all but the broken image
    assert all(p["model_version"] == version for p in pushed.values())
    lowest = sorted(pushed.values(), key=lambda p: p["score"])[:2]
    assert {p["task"] for p in lowest} == {200, 201}                    # the mislabelled ones first
    region = pushed[200]["result"][0]
    assert region["value"]["choices"] == ["2"] and region["meta"]["given_label"] == "0"
    assert region["meta"]["prob_label_wrong"] > 0.5

    client = create_app().test_client()
    assert client.post("/setup", json=setup_body(fake_ls)).get_json()["model_version"] == version
    tasks = [fake_ls.tasks[t] for t in (200, 100, 203, 202)]
    r = client.post("/predict", json=predict_body(tasks))
    results = r.get_json()["results"]
    assert len(results) == 4
    assert results[0] == {k: pushed[200][k] for k in ("result", "score", "model_version")}
    assert results[2] == {"result": [], "model_version": version}     # broken image: empty item
    assert results[3]["result"][0]["value"]["choices"] == ["1"]


def test_predict_scores_unseen_tasks_by_forward_pass(fake_ls):
    run_training_job(1, settings=Settings.from_env())
    fake_ls.add_task(1, 300, label="0", pixel=PIXEL[2])              # imported after training
    client = create_app().test_client()
    r = client.post("/predict", json=predict_body([fake_ls.tasks[300]]))
    (item,) = r.get_json()["results"]
    assert item["result"][0]["value"]["choices"] == ["2"] and item["score"] < 0.5


def test_predict_between_a_labelling_config_change_and_its_retraining_reads_labels_by_name(fake_ls):
    """The config gains a class and its order changes before the retraining is published: the version
    still scores an unseen task with its given label read by name ("0" is the version's "0", not the
    new config's fourth class), and a suggestion the config no longer has is no pre-selection."""
    run_training_job(1, settings=Settings.from_env())
    fake_ls.add_task(1, 300, label="0", pixel=PIXEL[2])              # imported after training
    client = create_app().test_client()
    reordered = DIGITS_CONFIG.replace('<Choice value="0"/><Choice value="1"/><Choice value="2"/>',
                                      '<Choice value="mass"/><Choice value="2"/><Choice value="1"/><Choice value="0"/>')
    r = client.post("/predict", json={**predict_body([fake_ls.tasks[300]]), "label_config": reordered})
    assert r.status_code == 200, r.get_data(as_text=True)
    (region,) = r.get_json()["results"][0]["result"]
    assert region["value"]["choices"] == ["2"] and region["meta"]["given_label"] == "0"
    assert region["meta"]["prob_label_wrong"] > 0.5
    without_2 = DIGITS_CONFIG.replace('<Choice value="2"/>', "")
    (item,) = client.post("/predict", json={**predict_body([fake_ls.tasks[200]]), "label_config": without_2}
                          ).get_json()["results"]
    assert item["result"] == [] and item["score"] < 0.5        # suggested "2": still ranked, nothing pre-selected


def test_relabel_makes_task_trusted_and_phase_2(fake_ls):
    run_training_job(1, settings=Settings.from_env())
    fake_ls.annotate(200, "2")                                            # the expert fixes task 200
    summary = run_training_job(1, settings=Settings.from_env())
    assert summary["phase"] == 2 and summary["n_trusted"] == 1
    meta = ProjectStore(Settings.from_env().model_dir, 1).load_meta(summary["model_version"])
    assert meta["phase"] == 2 and meta["phase_reason"] == ""
    assert meta["trusted_task_ids"] == [200] and meta["trained_task_labels"]["200"] == 2
    pushed = [p for p in fake_ls.predictions if p["model_version"] == summary["model_version"] and p["task"] == 200]
    assert pushed[0]["result"][0]["meta"]["trusted"] is True
    # the first version's predictions were deleted from Label Studio (keep_prediction_versions=1)
    assert {p["model_version"] for p in fake_ls.predictions} == {summary["model_version"]}


def test_a_version_whose_push_failed_is_published_by_the_next_job_without_training_again(fake_ls):
    """Label Studio goes away while a trained version's predictions are pushed: the job fails and the
    previous version stays served. A job on unchanged inputs publishes that version as it is (no
    image fetched, nothing trained); while Label Studio is still away it fails the same way, with the
    previous version served. Once an input changes, a job trains again."""
    from ml_backend.ls_client import LabelStudioError

    settings = Settings.from_env()
    store = ProjectStore(settings.model_dir, 1)
    first = run_training_job(1, settings=settings)["model_version"]
    fake_ls.annotate(200, "2")
    fake_ls.fail_next("import_predictions", 100)
    with pytest.raises(LabelStudioError):
        run_training_job(1, settings=settings)
    trained = store.list_versions()[-1]
    assert trained != first and store.current_version() == first == fake_ls.projects[1]["model_version"]
    assert {p["model_version"] for p in fake_ls.predictions} == {first}     # the half push was deleted

    fake_ls.fail_next("import_predictions", 0)
    fake_ls.fail_next("model_versions", 100)                        # away again as that version is published
    downloads = fake_ls.requests["upload"]
    with pytest.raises(LabelStudioError, match="model-versions.*HTTP 503"):
        run_training_job(1, settings=settings, reason="RECOVER")
    assert store.current_version() == first == fake_ls.projects[1]["model_version"]
    assert store.list_versions()[-1] == trained and fake_ls.requests["upload"] == downloads

    fake_ls.fail_next("model_versions", 0)
    summary = run_training_job(1, settings=settings, reason="RECOVER")
    assert summary["status"] == "published" and summary["model_version"] == trained
    assert fake_ls.requests["upload"] == downloads and store.list_versions()[-1] == trained
    assert store.current_version() == trained == fake_ls.projects[1]["model_version"]
    assert {p["task"] for p in fake_ls.predictions if p["model_version"] == trained} == set(store.load(trained).items)
    assert 200 in store.load_meta(trained)["trusted_task_ids"]

    fake_ls.fail_next("import_predictions", 100)                   # fails again, then an input changes
    fake_ls.annotate(201, "0")
    with pytest.raises(LabelStudioError):
        run_training_job(1, settings=settings)
    fake_ls.fail_next("import_predictions", 0)
    fake_ls.annotate(202, "1")
    assert run_training_job(1, settings=settings)["status"] == "trained"


def test_a_job_asks_label_studio_again_through_a_blip_and_trains(fake_ls, caplog):
    """Label Studio's API (or its proxy) answers 503 to the job's first reads of the project and of
    the tasks: the job asks again (1 s, then 2 s later) and trains, where one blip failed it before."""
    caplog.set_level("INFO", logger="ml_backend.ls_client")
    fake_ls.fail_next("project", 1)
    fake_ls.fail_next("tasks", 2)
    summary = run_training_job(1, settings=Settings.from_env())
    assert summary["status"] == "trained" and fake_ls.projects[1]["model_version"] == summary["model_version"]
    assert "HTTP 503" in caplog.text and "asking again" in caplog.text


def test_a_job_with_a_newer_one_queued_leaves_the_older_predictions_to_it(fake_ls):
    """Label Studio deletes a version's predictions one by one (95 s for 5,000 tasks): a job after
    which a newer one is queued (relabels came while it trained) publishes and leaves the deletion
    to that job, which does it also when it finds nothing to train."""
    settings = Settings.from_env()
    first = run_training_job(1, settings=settings)["model_version"]
    fake_ls.annotate(200, "2")
    second = run_training_job(1, settings=settings, newer_job_queued=lambda: True)
    assert second["pruned_versions"] == [] and fake_ls.projects[1]["model_version"] == second["model_version"]
    assert {p["model_version"] for p in fake_ls.predictions} == {first, second["model_version"]}
    unchanged = run_training_job(1, settings=settings, reason="ANNOTATION_CREATED", newer_job_queued=lambda: False)
    assert unchanged["status"] == "unchanged" and unchanged["pruned_versions"] == [first]
    assert {p["model_version"] for p in fake_ls.predictions} == {second["model_version"]}


def test_keep_prediction_versions_zero_keeps_all_and_keep_checkpoints_one_only_the_current(fake_ls):
    settings = Settings.from_env().replace(keep_prediction_versions=0, keep_checkpoints=1)
    store = ProjectStore(settings.model_dir, 1)
    first = run_training_job(1, settings=settings)["model_version"]
    fake_ls.annotate(200, "2")
    second = run_training_job(1, settings=settings)["model_version"]
    assert first != second and {p["model_version"] for p in fake_ls.predictions} == {first, second}
    assert not (store.version_dir(first) / "checkpoint.pt").exists()
    assert (store.version_dir(second) / "checkpoint.pt").exists()
    assert store.load(first).meta["n_trusted"] == 0           # its results and meta stay, for the report


def test_a_project_deleted_in_label_studio_does_not_stop_the_reconciliation_of_the_others(fake_ls, caplog):
    """Two served projects; project 1 is deleted in Label Studio (404) and project 2 gets an annotation
    no event brought: project 2 is still found stale, project 1 is named once in a warning that says
    what to do. Before, the 404 ended every period's round, and no project was reconciled again."""
    from ml_backend.ls_client import LabelStudioClient
    from ml_backend.reconcile import stale_projects

    settings = Settings.from_env()
    fake_ls.add_project(2)
    for tid in range(400, 412):
        fake_ls.add_task(2, tid, label=str(tid % 3), pixel=PIXEL[tid % 3])
    run_training_job(1, settings=settings)
    run_training_job(2, settings=settings)
    fake_ls.annotate(400, "0")
    del fake_ls.projects[1]
    client, refused = LabelStudioClient(settings.label_studio_url, settings.label_studio_api_key), set()
    assert stale_projects(client, settings, refused=refused) == [2] and refused == {1}
    assert stale_projects(client, settings, refused=refused) == [2]
    warnings = [r.getMessage() for r in caplog.records if "refuses it" in r.getMessage()]
    assert len(warnings) == 1 and "project 1:" in warnings[0] and "HTTP 404" in warnings[0]
    assert "project-1" in warnings[0]


def test_a_job_with_nothing_to_learn_keeps_the_version_and_a_train_request_retrains(fake_ls):
    """A skipped task moves Label Studio's counts (reconciliation queues a job) but no label: the job
    downloads nothing, trains nothing, pushes nothing, and marks the state as seen."""
    from ml_backend.ls_client import LabelStudioClient
    from ml_backend.reconcile import stale_projects

    settings = Settings.from_env()
    store = ProjectStore(settings.model_dir, 1)
    client = LabelStudioClient(settings.label_studio_url, settings.label_studio_api_key)
    version = run_training_job(1, settings=settings)["model_version"]
    fake_ls.annotate(101, "", cancelled=True)
    assert stale_projects(client, settings) == [1]
    pushed, downloads = len(fake_ls.predictions), fake_ls.requests["upload"]
    assert run_training_job(1, settings=settings, reason="RECONCILE") == {
        "status": "unchanged", "project": 1, "model_version": version, "pruned_versions": []}
    assert (len(fake_ls.predictions), fake_ls.requests["upload"]) == (pushed, downloads)
    assert store.list_versions() == [version] and stale_projects(client, settings) == []

    assert run_training_job(1, settings=settings, reason="ANNOTATION_UPDATED,TRAIN")["model_version"] != version
    resources = settings.replace(dataloader_workers=settings.dataloader_workers + 1)   # how, not what, it trains
    assert run_training_job(1, settings=resources, reason="RECONCILE")["status"] == "unchanged"
    changed = settings.replace(epochs=settings.epochs + 1)        # a setting that shapes the model
    assert run_training_job(1, settings=changed, reason="RECONCILE")["status"] == "trained"
    fake_ls.tasks[100]["data"]["label"] = "2"                      # a given label changed in the task data
    assert run_training_job(1, settings=changed, reason="RECONCILE")["status"] == "trained"


def test_relabel_budget_stops_retraining(fake_ls, monkeypatch):
    monkeypatch.setenv("ALR_RELABEL_BUDGET", "1")
    run_training_job(1, settings=Settings.from_env())
    fake_ls.annotate(200, "2")
    assert run_training_job(1, settings=Settings.from_env())["status"] == "trained"
    fake_ls.annotate(201, "0")
    assert run_training_job(1, settings=Settings.from_env())["status"] == "budget_spent"


def test_per_label_forget_rates_from_an_audit_reach_the_engine_and_a_wrong_list_fails_before_any_work(
        fake_ls, monkeypatch):
    import torch

    monkeypatch.setenv("ALR_CLASS_FORGET_RATES", "2=0.3, 0=0.1, 1 = 0.2")       # any order, by label name
    version = run_training_job(1, settings=Settings.from_env())["model_version"]
    store = ProjectStore(Settings.from_env().model_dir, 1)
    checkpoint = torch.load(store.version_dir(version) / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert checkpoint["class_forget_rates"] == pytest.approx([0.1, 0.2, 0.3])
    assert store.load_meta(version)["settings"]["class_forget_rates"] == [["2", 0.3], ["0", 0.1], ["1", 0.2]]

    monkeypatch.setenv("ALR_CLASS_FORGET_RATES", "0=0.1, 1=0.2, 7=0.3")
    downloads = fake_ls.requests["upload"]
    with pytest.raises(ValueError, match=r"missing \['2'\], not a label of the project \['7'\]"):
        run_training_job(1, settings=Settings.from_env())
    assert fake_ls.requests["upload"] == downloads                  # failed before fetching any image
    assert store.current_version() == version and store.list_versions() == [version]


@pytest.mark.parametrize("stream_above_tasks", ["5000", "1"])
def test_failed_training_leaves_no_half_written_version(fake_ls, monkeypatch, stream_above_tasks):
    """Nor, for a streamed project, the file of its decoded images."""
    import model.engine

    def boom(images, *a, **k):
        assert isinstance(images, np.ndarray if stream_above_tasks == "5000" else model.engine.DecodedImages)
        raise RuntimeError("engine crashed")

    monkeypatch.setenv("ALR_STREAM_ABOVE_TASKS", stream_above_tasks)
    monkeypatch.setattr(model.engine, "train_and_score", boom)    # a crash mid-training
    with pytest.raises(RuntimeError, match="engine crashed"):
        run_training_job(1, settings=Settings.from_env())
    store = ProjectStore(Settings.from_env().model_dir, 1)
    assert store.current_version() is None and store.list_versions() == []
    assert not list(store.root.glob(".tmp-*"))


def test_invalid_api_key_fails_job_with_clear_error(fake_ls, monkeypatch):
    from ml_backend.ls_client import LabelStudioAuthError

    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "not-a-key")
    with pytest.raises(LabelStudioAuthError, match="refused"):
        run_training_job(1, settings=Settings.from_env())


# -- webhook ----------------------------------------------------------------------------
def test_webhook_events_queue_and_return_201_thread_fallback(fake_ls, caplog):
    app = create_app()
    assert "in-process fallback" in caplog.text
    client = app.test_client()
    queue = app.extensions["alr"]["queue"]
    r = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 1}})
    assert r.status_code == 201 and r.get_json()["status"] == "queued"
    assert queue.wait_idle(30)
    assert fake_ls.projects[1]["model_version"].startswith("alr-v1-")
    for action, payload in [
        ("ANNOTATION_CREATED", {"annotation": {"id": 1, "project": 1, "was_cancelled": False}, "project": {"id": 1}}),
        ("ANNOTATION_UPDATED", {"annotation": {"id": 1, "project": 1}, "project": {"id": 1}}),
        ("ANNOTATIONS_DELETED", {"annotations": [{"id": 1}], "project": {"id": 1}}),
        ("ANNOTATION_DELETED", {"annotation": {"id": 1, "project": 1}, "project": 1}),
    ]:
        r = client.post("/webhook", json={"action": action, **payload})
        assert r.status_code == 201, (action, r.get_json())
    assert queue.wait_idle(30)
    assert queue.jobs_started <= 3       # 1 + at most (one running + one pending)


def test_webhook_ignores_own_project_update_and_skips(fake_ls):
    app = create_app()
    client = app.test_client()
    run_training_job(1, settings=Settings.from_env())
    project = dict(fake_ls.projects[1])
    r = client.post("/webhook", json={"action": "PROJECT_UPDATED", "project": project})
    assert r.status_code == 200 and r.get_json()["status"] == "ignored"
    r = client.post("/webhook", json={"action": "ANNOTATION_CREATED", "project": {"id": 1},
                                      "annotation": {"id": 9, "project": 1, "was_cancelled": True}})
    assert r.status_code == 200 and r.get_json()["status"] == "ignored"
    changed = dict(project, label_config=DIGITS_CONFIG.replace('<Choice value="2"/>', '<Choice value="2"/><Choice value="3"/>'))
    r = client.post("/webhook", json={"action": "PROJECT_UPDATED", "project": changed})
    assert r.status_code == 201
    r = client.post("/webhook", json={"action": "TASKS_CREATED", "project": {"id": 1}})
    assert r.status_code == 200 and r.get_json()["status"] == "ignored"
    app.extensions["alr"]["queue"].wait_idle(30)


# -- bad input --------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/setup", "/predict", "/webhook", "/versions", "/train"])
def test_malformed_json_is_400(backend_env, path):
    client = create_app().test_client()
    r = client.post(path, data="{not json", content_type="application/json")
    assert r.status_code == 400 and "JSON" in r.get_json()["error"]
    r = client.post(path, data=json.dumps([1, 2]), content_type="application/json")
    assert r.status_code == 400


def test_bad_requests_get_messages(backend_env):
    client = create_app().test_client()
    r = client.post("/setup", json={"project": "1.1", "schema": "<View><Text name='t' value='$t'/></View>"})
    assert r.status_code == 400 and "Image" in r.get_json()["error"]
    r = client.post("/predict", json={"tasks": "nope", "label_config": DIGITS_CONFIG})
    assert r.status_code == 400 and "tasks" in r.get_json()["error"]
    r = client.post("/predict", json={"tasks": [{"id": 1, "data": {}}]})
    assert r.status_code == 400 and "label_config" in r.get_json()["error"]
    for route, field in (("/predict", "label_config"), ("/setup", "schema")):    # not XML at all (found by fuzzing)
        r = client.post(route, json={"tasks": [], field: "0"})
        assert r.status_code == 400 and "not valid XML" in r.get_json()["error"]
    r = client.post("/webhook", json={"project": 1})
    assert r.status_code == 400 and "action" in r.get_json()["error"]
    r = client.post("/webhook", json={"action": "ANNOTATION_CREATED"})
    assert r.status_code == 400 and "project" in r.get_json()["error"]
    r = client.get("/is_training")
    assert r.status_code == 400


def test_tasks_without_images_predict_empty_items(fake_ls):
    run_training_job(1, settings=Settings.from_env())
    client = create_app().test_client()
    tasks = [{"id": 900, "data": {}}, {"id": 901, "data": {"image": "http://127.0.0.1:9/missing.png"}}]
    r = client.post("/predict", json=predict_body(tasks))
    assert r.status_code == 200
    assert [x["result"] for x in r.get_json()["results"]] == [[], []]


def test_request_size_is_capped(backend_env, monkeypatch):
    monkeypatch.setenv("ALR_MAX_REQUEST_BYTES", "1000")
    client = create_app().test_client()
    r = client.post("/predict", data=json.dumps({"tasks": [{"id": 1, "data": {"x": "y" * 5000}}]}),
                    content_type="application/json")
    assert r.status_code == 413


def test_health_reports_queue_ls_and_versions(fake_ls):
    run_training_job(1, settings=Settings.from_env())
    r = create_app().test_client().get("/health")
    body = r.get_json()
    assert r.status_code == 200 and body["status"] == "UP"
    assert body["label_studio"]["reachable"] is True and body["label_studio"]["api_key_accepted"] is True
    assert body["queue"]["kind"] == "thread"
    assert body["model_versions"]["1"].startswith("alr-v1-")


def test_health_says_why_label_studio_cannot_be_used(fake_ls, monkeypatch):
    """The setup mistakes a job would fail on, seen before any job: a refused API key (Label Studio
    answered), no API key, Label Studio gone; each with the error a job would log, never the key."""
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "0123456789abcdef0123456789abcdef01234567")
    ls_status = create_app().test_client().get("/health").get_json()["label_studio"]
    assert ls_status["reachable"] is True and ls_status["api_key_accepted"] is False
    assert "LABEL_STUDIO_API_KEY was refused" in ls_status["error"] and "0123456789abcdef" not in ls_status["error"]

    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "")
    ls_status = create_app().test_client().get("/health").get_json()["label_studio"]
    assert ls_status["api_key_accepted"] is None and "LABEL_STUDIO_API_KEY is not set" in ls_status["error"]

    monkeypatch.setenv("LABEL_STUDIO_API_KEY", PAT)
    monkeypatch.setenv("LABEL_STUDIO_URL", "http://127.0.0.1:9")        # nothing listens there
    r = create_app().test_client().get("/health")
    assert r.status_code == 200 and r.get_json()["status"] == "UP"
    ls_status = r.get_json()["label_studio"]
    assert ls_status["reachable"] is False and ls_status["api_key_accepted"] is None
    assert "ConnectionError" in ls_status["error"]


@pytest.mark.parametrize("failing", ["webhooks", "ml_backends"])     # GET /api/webhooks/, then GET /api/ml
def test_the_webhook_gets_the_credentials_behind_a_proxy_and_again_after_label_studio_failed(fake_ls, failing):
    """Label Studio knows the backend as https://ml.hospital.example/alr (a TLS proxy with a path
    prefix) while /setup arrives at http://localhost/: the webhook of the project's only ML backend
    gets the credentials.  When Label Studio failed that first time (its webhook list, or its list of
    the project's ML backends), the next /setup tries again."""
    import base64

    from ml_backend.training_queue import ThreadTrainingQueue

    fake_ls.ml_backend_url = "https://ml.hospital.example/alr"
    fake_ls.webhooks.append({"id": 4, "project": 1, "url": "https://ml.hospital.example/alr/webhook", "headers": {}})
    fake_ls.webhooks.append({"id": 5, "project": 1, "url": "https://audit.hospital.example/hook", "headers": {}})
    settings = Settings.from_env().replace(basic_auth_user="ls", basic_auth_pass="a-long-enough-password")
    app = create_app(settings, training_queue=ThreadTrainingQueue(lambda project, reason: None))
    auth = {"Authorization": "Basic " + base64.b64encode(b"ls:a-long-enough-password").decode()}
    expected = auth["Authorization"]

    def set_up_and_wait() -> bool:
        assert app.test_client().post("/setup", json=setup_body(fake_ls), headers=auth).status_code == 200
        for thread in threading.enumerate():
            if thread.name == "alr-setup-1":
                thread.join(30)
        return fake_ls.webhooks[0]["headers"].get("Authorization") == expected

    fake_ls.fail_next(failing, 1)                       # Label Studio fails the first look
    assert not set_up_and_wait()
    assert set_up_and_wait()                            # the next /setup tries again, through the proxy's URL
    assert fake_ls.webhooks[1]["headers"] == {}         # another project webhook keeps its own headers


def test_settings_are_read_at_app_setup_not_import(backend_env, monkeypatch, tmp_path):
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "elsewhere"))
    app = create_app()
    assert app.extensions["alr"]["settings"].model_dir == str(tmp_path / "elsewhere")


def test_thread_fallback_coalesces_a_burst_and_drops_nothing():
    import threading
    import time

    from ml_backend.training_queue import ThreadTrainingQueue

    seen_at_start = []
    events = []
    lock = threading.Lock()

    def runner(project, reason):
        with lock:
            seen_at_start.append(len(events))     # what a job "fetches" when it starts
        time.sleep(0.3)

    queue = ThreadTrainingQueue(runner)
    for i in range(50):
        with lock:
            events.append(i)
        queue.request_training(1, "ANNOTATION_CREATED")
        if i == 0:
            time.sleep(0.05)                      # the first run starts; the rest arrive while it runs
    assert queue.wait_idle(10)
    assert queue.jobs_started <= 2
    assert seen_at_start[-1] == 50                # the last run saw every event


def test_a_corrupt_checkpoint_results_or_meta_file_is_survived(fake_ls, caplog):
    """A truncated checkpoint: the next job trains Phase 1 instead of failing, and its version says
    so; a corrupt results.json: /predict answers (no predictions) instead of a 500; a corrupt
    meta.json: the reconciliation passes the project by and the next job trains as if the version
    knew nothing (before, every job of the project failed on it, for good); the next job replaces them."""
    from ml_backend.ls_client import LabelStudioClient
    from ml_backend.reconcile import stale_projects

    settings = Settings.from_env()
    store = ProjectStore(settings.model_dir, 1)
    first = run_training_job(1, settings=settings)["model_version"]
    checkpoint = store.version_dir(first) / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    fake_ls.annotate(200, "2")
    summary = run_training_job(1, settings=settings)
    second = summary["model_version"]
    meta = store.load_meta(second)                        # the version says it is a Phase 1, and why
    assert summary["phase"] == meta["phase"] == 1 and f"{checkpoint} cannot be read" in meta["phase_reason"]
    assert meta["trusted_task_ids"] == [200]

    (store.version_dir(second) / "results.json").write_text('{"version": "alr-v1", "items": {')
    (store.version_dir(second) / "meta.json").write_bytes(b'{"annotation_state": {"counts": [\xff')
    client = create_app(settings).test_client()
    r = client.post("/predict", json=predict_body([fake_ls.tasks[100]]))
    assert r.status_code == 200 and r.get_json()["results"] == [{"result": [], "model_version": "alr-untrained"}]
    fake_ls.annotate(201, "2")
    assert stale_projects(LabelStudioClient(settings.label_studio_url, settings.label_studio_api_key), settings) == []
    summary = run_training_job(1, settings=settings)
    assert summary["status"] == "trained" and store.current_version() == summary["model_version"] != second
    assert "cannot be read" in caplog.text and "meta.json" in caplog.text
    meta = store.load_meta(summary["model_version"])
    assert meta["phase"] == 1 and "meta.json records no labelling config" in meta["phase_reason"]
    assert client.post("/predict", json=predict_body([fake_ls.tasks[100]])).get_json()["results"][0]["result"]


def test_no_space_left_while_saving_fails_the_job_and_leaves_the_served_version_whole(fake_ls, monkeypatch):
    import errno

    import ml_backend.training as training

    settings = Settings.from_env()
    first = run_training_job(1, settings=settings)["model_version"]
    real = training.atomic_write_json

    def disk_full(path, obj):
        if path.name == "meta.json":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, obj)
    monkeypatch.setattr(training, "atomic_write_json", disk_full)
    fake_ls.annotate(200, "2")
    with pytest.raises(OSError, match="No space left"):
        run_training_job(1, settings=settings)
    store = ProjectStore(settings.model_dir, 1)
    assert store.current_version() == first and store.list_versions() == [first]
    assert not list(store.root.glob(".tmp-*"))                        # nothing half-written left
    assert fake_ls.projects[1]["model_version"] == first
    monkeypatch.setattr(training, "atomic_write_json", real)
    assert run_training_job(1, settings=settings)["status"] == "trained"    # and the next job works


def test_webhook_for_a_project_the_key_cannot_read_is_404_and_queues_nothing(fake_ls):
    from ml_backend.training_queue import ThreadTrainingQueue

    jobs = []
    queue = ThreadTrainingQueue(lambda project, reason: jobs.append(project))
    client = create_app(Settings.from_env(), training_queue=queue).test_client()
    r = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 999}})
    assert r.status_code == 404 and "cannot be read" in r.get_json()["error"]
    assert client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 1}}).status_code == 201
    assert queue.wait_idle(10) and jobs == [1]


def test_the_report_page_shows_the_suspects_and_the_progress_of_relabels(fake_ls):
    client = create_app(Settings.from_env()).test_client()
    assert client.get("/report?project=1").status_code == 404            # no version yet: said so
    assert client.get("/report").status_code == 400
    run_training_job(1, settings=Settings.from_env())
    fake_ls.annotate(200, "2")                                            # a relabel that changes the label
    run_training_job(1, settings=Settings.from_env())
    page = client.get("/report?project=1")
    assert page.status_code == 200 and page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    first = html.index('href="' + fake_ls.url + '/projects/1/data?task=')
    assert html[first:].split("task=")[1].split('"')[0] == "201"          # the remaining wrong label leads
    assert f'src="{fake_ls.url}/data/upload/1/task-201.png"' in html      # its thumbnail, from Label Studio
    assert "<td>1</td><td>1</td><td>100%</td>" in html                    # v2: one relabel, it changed the label
    assert [cell.split("<")[0] for cell in html.split('<td class="trained">')[1:]] == ["from scratch", "fine-tuned"]
    assert html.count('src="data:image/png;base64,') == 2                  # the two plots


def test_labels_in_any_language_and_with_markup_characters_train_predict_and_report(backend_env, monkeypatch):
    """A French project whose label names carry accents, an em dash, "<", "&" and quotes: the job trains
    on them, /predict answers with them exactly as the labelling config spells them, per-label forget
    rates are read by those names, and the report shows them escaped."""
    names = ["Bénin", "Lésion — incertaine", 'Malin <grade "3"> & plus']
    config = ('<View><Image name="image" value="$image"/><Choices name="label" toName="image" choice="single">'
              + "".join(f'<Choice value="{escape(n, quote=True)}"/>' for n in names) + "</Choices></View>")
    with FakeLabelStudio(legacy_enabled=False) as ls:
        ls.add_project(1, label_config=config)
        for tid in range(100, 118):
            ls.add_task(1, tid, label=names[tid % 3], pixel=PIXEL[tid % 3])
        ls.add_task(1, 200, label=names[0], pixel=PIXEL[2])                  # a wrong label
        monkeypatch.setenv("LABEL_STUDIO_URL", ls.url)
        monkeypatch.setenv("LABEL_STUDIO_API_KEY", PAT)
        monkeypatch.setenv("ALR_CLASS_FORGET_RATES", "Bénin=0.1, Lésion — incertaine=0.05, "
                                                     'Malin <grade "3"> & plus=0.05')
        settings = Settings.from_env()
        summary = run_training_job(1, settings=settings)
        assert summary["status"] == "trained"
        chosen = {p["result"][0]["value"]["choices"][0] for p in ls.predictions if p["result"]}
        assert chosen <= set(names) and len(chosen) >= 2
        client = create_app(settings).test_client()
        r = client.post("/predict", json={"tasks": [ls.tasks[101]], "project": "1.1700000000", "label_config": config})
        assert r.status_code == 200 and r.get_json()["results"][0]["result"][0]["value"]["choices"][0] in names
        html = client.get("/report?project=1").get_data(as_text=True)
        assert "Lésion — incertaine" in html and "Malin &lt;grade &quot;3&quot;&gt; &amp; plus" in html
        assert '<grade "3">' not in html


class ImageHost:
    """A real HTTP server of scans on another host than Label Studio's (ALR_IMAGE_HOSTS), which can go
    away (its port then refuses connections) and come back on the same port."""

    def __init__(self, files: dict[str, bytes], port: int = 0):
        from flask import Flask
        from werkzeug.serving import make_server

        app = Flask("image-host")
        app.add_url_rule("/scans/<name>", "scan", lambda name: files[name])
        self.server = make_server("127.0.0.1", port, app, threaded=True)
        self.port = self.server.server_port
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_an_image_host_that_went_away_fails_the_training_and_the_served_version_stays(fake_ls, monkeypatch,
                                                                                        caplog):
    from ml_backend.images import ImageHostDown

    first = run_training_job(1, settings=Settings.from_env())["model_version"]
    scans = {f"{tid}.png": png_bytes(PIXEL[tid % 3]) for tid in range(300, 330)}
    host = ImageHost(scans)
    host.stop()                                              # gone before the retraining downloads
    monkeypatch.setenv("ALR_IMAGE_HOSTS", "127.0.0.1")
    for tid in range(300, 330):
        fake_ls.add_task(1, tid, label=str(tid % 3), pixel=0, url=f"http://127.0.0.1:{host.port}/scans/{tid}.png")
    with pytest.raises(ImageHostDown, match=r"their host did not answer .* e\.g\. task 3\d\d: .*ConnectionError"):
        run_training_job(1, settings=Settings.from_env())
    assert "Version " + first + " stays served" in caplog.text
    store = ProjectStore(Settings.from_env().model_dir, 1)
    assert store.current_version() == first and store.list_versions() == [first]
    assert not list(store.root.glob(".tmp-*"))
    back = ImageHost(scans, port=host.port)                  # the host is back: nothing was lost
    try:
        summary = run_training_job(1, settings=Settings.from_env())
    finally:
        back.stop()
    assert summary["status"] == "trained" and summary["skipped_images"] == 1      # the broken PNG only
    assert set(range(300, 330)) <= set(store.load(summary["model_version"]).items)


def test_an_image_host_answering_503_is_asked_again_and_one_that_keeps_failing_stops_the_downloads(fake_ls):
    from ml_backend.images import ImageHostDown

    fake_ls.fail_next("upload", 5)                            # a blip: five answers of 503
    summary = run_training_job(1, settings=Settings.from_env())
    assert summary["status"] == "trained" and summary["skipped_images"] == 1
    assert fake_ls.requests["upload"] == len(fake_ls.tasks) + 5  # each of the five was asked again, once
    for tid in range(300, 340):
        fake_ls.add_task(1, tid, label=str(tid % 3), pixel=PIXEL[tid % 3])
    before = fake_ls.requests["upload"]
    fake_ls.fail_next("upload", 10**6)                        # overloaded for good
    with pytest.raises(ImageHostDown, match="at most 1 of these 62 tasks"):
        run_training_job(1, settings=Settings.from_env())
    # at most 1 may be skipped: the downloads stop after the second, with the 8 in flight finishing
    # their 3 attempts, instead of 3 attempts at each of the 40 new images
    assert fake_ls.requests["upload"] - before <= (2 + 8) * 3


def test_the_report_still_opens_when_label_studio_is_down(fake_ls, monkeypatch):
    run_training_job(1, settings=Settings.from_env())
    monkeypatch.setenv("LABEL_STUDIO_URL", "http://127.0.0.1:9")          # nothing listens there
    page = create_app(Settings.from_env()).test_client().get("/report?project=1")
    html = page.get_data(as_text=True)
    assert page.status_code == 200 and "no thumbnails: Label Studio could not be reached" in html
    assert html.count('class="card"') > 0 and "<img src=" not in html.split('id="suspects"')[1]


def test_fast_mode_predict_embeds_unseen_tasks_where_the_next_training_finds_them(fake_ls, monkeypatch, caplog):
    monkeypatch.setenv("ALR_FROZEN_BACKBONE", "true")
    monkeypatch.setenv("ALR_ARCH", "resnet18")
    monkeypatch.setenv("ALR_IMAGE_SIZE", "32")
    run_training_job(1, settings=Settings.from_env())
    fake_ls.add_task(1, 300, label="0", pixel=PIXEL[2], image=png_bytes(PIXEL[2], size=9))  # new, after training
    fake_ls.add_task(1, 301, label="1", pixel=0, image=b"not a png")  # ... and one that cannot be read
    client = create_app().test_client()
    r = client.post("/predict", json=predict_body([fake_ls.tasks[300], fake_ls.tasks[301]]))
    scored, broken = r.get_json()["results"]
    assert scored["result"] and scored["score"] < 1 and not broken["result"]
    caplog.clear()
    with caplog.at_level("INFO", logger="model.embeddings"):
        run_training_job(1, settings=Settings.from_env())
    # 22 readable tasks (the training's and the others it scores): 21 of the first training and the one
    # /predict embedded, none computed again
    counts = [tuple(map(int, m)) for m in re.findall(r"fast mode: (\d+) embeddings from the cache, (\d+) computed",
                                                    caplog.text)]
    assert counts and sum(c for c, _ in counts) == 22 and all(n == 0 for _, n in counts), counts


def test_reconciliation_sees_an_annotation_edited_to_another_label(fake_ls):
    """An edit moves no count (the webhook lost while redis was down): the labels' counts move."""
    from ml_backend.reconcile import stale_projects
    from ml_backend.ls_client import LabelStudioClient

    settings = Settings.from_env()
    annotation = fake_ls.annotate(200, "2")
    run_training_job(1, settings=settings)
    client = LabelStudioClient(settings.label_studio_url, settings.label_studio_api_key)
    assert stale_projects(client, settings) == []
    annotation["result"][0]["value"]["choices"] = ["1"]           # the expert changes their mind
    assert stale_projects(client, settings) == [1]
    run_training_job(1, settings=settings)
    assert stale_projects(client, settings) == []


def test_reconciliation_sees_a_given_label_edited_in_the_task_data(fake_ls):
    """Label Studio sends no webhook when a task's data changes (a given label corrected by a script or
    an import); no annotation count moves, but the task's updated_at does; the backend's own
    prediction pushes do not move it."""
    from ml_backend.reconcile import stale_projects
    from ml_backend.ls_client import LabelStudioClient

    settings = Settings.from_env()
    run_training_job(1, settings=settings)
    client = LabelStudioClient(settings.label_studio_url, settings.label_studio_api_key)
    assert stale_projects(client, settings) == []
    fake_ls.edit_task_data(201, label="0")             # the dark image was labelled "2": corrected
    assert stale_projects(client, settings) == [1]
    version = run_training_job(1, settings=settings)["model_version"]
    assert ProjectStore(settings.model_dir, 1).load_meta(version)["trained_task_labels"]["201"] == 0
    assert stale_projects(client, settings) == []


def test_a_job_forgets_only_the_refused_events_recorded_before_it_read_the_tasks(fake_ls):
    """A job that cannot read the tasks (Label Studio down) forgets no record; a webhook refused
    while a job lists the tasks may be for an annotation the listing missed: its record stays too,
    so the reconciliation queues another training for it."""
    from ml_backend.ls_client import LabelStudioClient, LabelStudioError
    from tests.conftest import free_port

    settings = Settings.from_env()
    store = ProjectStore(settings.model_dir, 1)
    before = store.record_refused_event("ANNOTATION_UPDATED")
    with pytest.raises(LabelStudioError):
        run_training_job(1, settings=settings, client=LabelStudioClient(f"http://127.0.0.1:{free_port()}", PAT))
    assert store.refused_events() == [before]

    class RefusedWhileListing(LabelStudioClient):
        def iter_tasks(self, project_id, **kwargs):
            during.append(store.record_refused_event("ANNOTATION_CREATED"))
            yield from super().iter_tasks(project_id, **kwargs)

    during = []
    client = RefusedWhileListing(settings.label_studio_url, settings.label_studio_api_key)
    assert run_training_job(1, settings=settings, client=client)["status"] == "trained"
    assert store.refused_events() == during and before not in during


def test_a_task_deleted_while_the_job_trained_is_left_out_and_the_version_is_published(fake_ls, caplog):
    """Label Studio refuses a whole import batch (400) for one task it no longer has: the job
    publishes the version without the deleted task rather than throw the training away."""
    from ml_backend.ls_client import LabelStudioClient

    class DeletedWhileTraining(LabelStudioClient):
        def iter_tasks(self, project_id, **kwargs):
            yield from super().iter_tasks(project_id, **kwargs)
            with fake_ls.lock:
                fake_ls.tasks.pop(105, None)         # an annotator deletes a task after the job read them

    settings = Settings.from_env()
    client = DeletedWhileTraining(settings.label_studio_url, settings.label_studio_api_key)
    result = run_training_job(1, settings=settings, client=client)
    assert result["status"] == "trained"
    version = result["model_version"]
    assert fake_ls.projects[1]["model_version"] == version
    pushed = [p["task"] for p in fake_ls.predictions if p["model_version"] == version]
    assert sorted(pushed) == sorted(set(fake_ls.tasks) - {203})       # each once; 203's image is broken
    assert "1 task(s) were deleted while the job trained (e.g. task 105)" in caplog.text


def test_a_task_deleted_while_the_job_trained_and_label_studio_gone_at_the_re_listing_fail_the_job_cleanly(
        fake_ls):
    """As above, but Label Studio stops answering (503) when the job lists the tasks again after the
    refusal: the job fails with a transient error (the project stays dirty: the watchdog runs it
    again), nothing of its version is left in Label Studio, the project keeps no model version; once
    Label Studio answers, the next job publishes a version without the deleted task."""
    from ml_backend.ls_client import LabelStudioClient, LabelStudioError

    class DeletedWhileTrainingThenGone(LabelStudioClient):
        listings = 0

        def iter_tasks(self, project_id, **kwargs):
            self.listings += 1
            yield from super().iter_tasks(project_id, **kwargs)
            if self.listings == 1:
                with fake_ls.lock:
                    fake_ls.tasks.pop(105, None)
                fake_ls.fail_next("tasks", 10**6)            # gone by the time the job lists again

    settings = Settings.from_env().replace(predictions_batch_size=2)    # batches before 105's landed
    client = DeletedWhileTrainingThenGone(settings.label_studio_url, settings.label_studio_api_key)
    with pytest.raises(LabelStudioError) as failure:
        run_training_job(1, settings=settings, client=client)
    assert failure.value.transient and client.listings == 2
    assert fake_ls.projects[1].get("model_version") in (None, "") and not fake_ls.predictions

    fake_ls.fail_next("tasks", 0)
    result = run_training_job(1, settings=settings)
    assert result["status"] in ("trained", "published") and fake_ls.projects[1]["model_version"] == result["model_version"]
    pushed = [p["task"] for p in fake_ls.predictions if p["model_version"] == result["model_version"]]
    assert sorted(pushed) == sorted(set(fake_ls.tasks) - {203})


def test_refused_events_are_capped_per_project_keeping_the_newest(tmp_path, monkeypatch, caplog):
    """Redis down for a day under a busy team must not fill the disk with records: past the cap the
    oldest go, the newest (the one a running job may not have seen) stays, and a job that listed a
    dropped record still forgets the rest."""
    from ml_backend import store as store_module

    monkeypatch.setattr(store_module, "REFUSED_EVENTS_KEPT", 5)
    store = ProjectStore(tmp_path, 3)
    recorded = [store.record_refused_event("ANNOTATION_CREATED") for _ in range(5)]
    listed_by_a_job = store.refused_events()
    with caplog.at_level("WARNING", logger="ml_backend.store"):
        recorded += [store.record_refused_event("ANNOTATION_UPDATED") for _ in range(3)]
    assert store.refused_events() == recorded[-5:]
    assert "dropped the 1 oldest" in caplog.text and "project 3" in caplog.text
    store.forget_refused_events(listed_by_a_job)
    assert store.refused_events() == recorded[-3:]


@pytest.mark.parametrize("status", [404, 500])
def test_without_the_project_summary_training_works_and_reconciliation_compares_counts(fake_ls, status, caplog):
    from ml_backend.ls_client import LabelStudioClient
    from ml_backend.reconcile import stale_projects

    fake_ls.fail_next("summary", 10**6, status=status)   # a Label Studio without the route, or failing on it
    settings = Settings.from_env()
    version = run_training_job(1, settings=settings)["model_version"]
    meta = ProjectStore(settings.model_dir, 1).load_meta(version)
    assert meta["annotation_state"]["labels"] is None
    client = LabelStudioClient(settings.label_studio_url, settings.label_studio_api_key)
    fake_ls.fail_next("summary", 0)                      # back: no labels recorded to compare with, so not stale
    assert stale_projects(client, settings) == []
    assert ("label counts of the project summary" in caplog.text and "compares without it" in caplog.text) \
        == (status == 500)
