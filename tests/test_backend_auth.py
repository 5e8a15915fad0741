"""Authentication of the backend's routes (BASIC_AUTH_USER / BASIC_AUTH_PASS) and ALR_PROJECTS.

Every route but the health check answers 401 without the credentials or with wrong ones and
does nothing (no job queued); with the right ones it works.  The health check answers anyone,
but says nothing about projects unless the caller is authenticated.
"""
from __future__ import annotations

import base64

import pytest

from ml_backend.app import create_app
from ml_backend.settings import Settings
from ml_backend.training_queue import ThreadTrainingQueue
from tests.test_backend_fake_ls import DIGITS_CONFIG

USER, PASSWORD = "label-studio", "s3cret-pass-word"


def basic(user: str, password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


ROUTES = [
    ("POST", "/setup", {"project": "1.1700000000", "schema": DIGITS_CONFIG}),
    ("POST", "/predict", {"tasks": [{"id": 1, "data": {"image": "/data/upload/1/a.png"}}],
                          "label_config": DIGITS_CONFIG, "project": "1.1700000000"}),
    ("POST", "/webhook", {"action": "START_TRAINING", "project": {"id": 1}}),
    ("POST", "/train", {"project": 1}),
    ("POST", "/versions", {"project": 1}),
    ("GET", "/is_training?project=1", None),
    ("GET", "/metrics", None),
]


@pytest.fixture
def app_and_jobs(backend_env, tmp_path):
    jobs: list = []
    queue = ThreadTrainingQueue(lambda project, reason: jobs.append((project, reason)))
    settings = Settings.from_env().replace(basic_auth_user=USER, basic_auth_pass=PASSWORD,
                                           allowed_projects=frozenset({1}))
    app = create_app(settings, training_queue=queue)
    return app.test_client(), queue, jobs


@pytest.mark.parametrize("user, password, warning", [
    ("", "", "only clients on this host"), (USER, "short-pass", "has 10 characters"), (USER, PASSWORD, None)])
def test_the_app_warns_at_start_where_its_routes_are_open_or_the_password_is_short(
        backend_env, user, password, warning, caplog):
    settings = Settings.from_env().replace(basic_auth_user=user, basic_auth_pass=password)
    create_app(settings, training_queue=ThreadTrainingQueue(lambda project, reason: None))
    credentials = [r.getMessage() for r in caplog.records if "BASIC_AUTH" in r.getMessage()]
    assert (credentials and warning in credentials[0]) if warning else not credentials
    assert not password or password not in caplog.text


@pytest.mark.parametrize("method, path, body", ROUTES)
@pytest.mark.parametrize("headers", [{}, basic(USER, "wrong"), basic("someone", PASSWORD),
                                     {"Authorization": "Bearer " + PASSWORD}])
def test_every_route_refuses_missing_or_wrong_credentials(app_and_jobs, method, path, body, headers):
    client, queue, jobs = app_and_jobs
    r = client.open(path, method=method, json=body, headers=headers)
    assert r.status_code == 401
    assert r.headers["WWW-Authenticate"].startswith("Basic")
    assert PASSWORD not in r.get_data(as_text=True)
    queue.wait_idle(5)
    assert jobs == []


@pytest.mark.parametrize("method, path, body", ROUTES)
def test_every_route_works_with_the_right_credentials(app_and_jobs, method, path, body):
    client, queue, jobs = app_and_jobs
    r = client.open(path, method=method, json=body, headers=basic(USER, PASSWORD))
    assert r.status_code in (200, 201), r.get_data(as_text=True)


def test_webhook_with_credentials_queues_a_job(app_and_jobs):
    client, queue, jobs = app_and_jobs
    r = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 1}}, headers=basic(USER, PASSWORD))
    assert r.status_code == 201
    assert queue.wait_idle(10) and jobs == [(1, "START_TRAINING")]


def test_health_answers_anyone_but_details_need_credentials(app_and_jobs):
    client, _, _ = app_and_jobs
    open_body = client.get("/health").get_json()
    assert open_body["status"] == "UP" and set(open_body) == {"status", "model_class", "training_ready"}
    full = client.get("/health", headers=basic(USER, PASSWORD)).get_json()
    assert {"queue", "label_studio", "model_versions"} <= set(full)


def test_a_project_outside_alr_projects_is_refused_and_queues_nothing(app_and_jobs):
    client, queue, jobs = app_and_jobs
    r = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 999}}, headers=basic(USER, PASSWORD))
    assert r.status_code == 403 and "ALR_PROJECTS" in r.get_json()["error"]
    assert client.post("/train", json={"project": 999}, headers=basic(USER, PASSWORD)).status_code == 403
    assert client.post("/versions", json={"project": 999}, headers=basic(USER, PASSWORD)).status_code == 403
    for path in ("/is_training?project=999", "/report?project=999"):
        assert client.get(path, headers=basic(USER, PASSWORD)).status_code == 403, path
    assert queue.wait_idle(5) and jobs == []


def test_credentials_come_in_pairs():
    with pytest.raises(ValueError, match="BASIC_AUTH_USER and BASIC_AUTH_PASS"):
        Settings.from_env({"BASIC_AUTH_USER": "alone"})
    settings = Settings.from_env({"BASIC_AUTH_USER": USER, "BASIC_AUTH_PASS": PASSWORD, "ALR_PROJECTS": "3, 5"})
    assert PASSWORD not in repr(settings) and settings.allowed_projects == {3, 5}


def from_address(app, address: str):
    """The app as a server sees it called from ``address`` (the test client sends no REMOTE_ADDR)."""
    inner = app.wsgi_app
    app.wsgi_app = lambda environ, start_response: inner({**environ, "REMOTE_ADDR": address}, start_response)
    return app.test_client()


def test_without_credentials_only_this_host_is_answered_unless_the_network_is_opened(backend_env, caplog):
    """No BASIC_AUTH_*: a peer on another host gets 403 saying what to set on every route but /health
    (which tells it only that the backend is up), and nothing is queued; loopback peers (Label Studio
    on the same host, the demo) are answered; ALR_OPEN_TO_NETWORK=true opens the routes to every host,
    with a warning at start."""
    jobs: list = []
    queue = ThreadTrainingQueue(lambda project, reason: jobs.append(project))
    elsewhere = from_address(create_app(Settings.from_env(), training_queue=queue), "192.0.2.7")
    for method, path, body in ROUTES:
        r = elsewhere.open(path, method=method, json=body)
        assert r.status_code == 403 and "BASIC_AUTH_USER" in r.get_json()["error"], path
    assert set(elsewhere.get("/health").get_json()) == {"status", "model_class", "training_ready"}
    assert queue.wait_idle(5) and jobs == []
    for address in ("127.0.0.1", "::1"):
        local = from_address(create_app(Settings.from_env(), training_queue=queue), address)
        assert local.post("/versions", json={"project": 1}).status_code == 200
        assert "queue" in local.get("/health").get_json()
    opened = from_address(create_app(Settings.from_env().replace(open_to_network=True), training_queue=queue),
                          "192.0.2.7")
    assert opened.post("/versions", json={"project": 1}).status_code == 200
    assert "ALR_OPEN_TO_NETWORK is true: anyone who can reach" in caplog.text
