"""Property-based fuzzing of the routes Label Studio calls (hypothesis, 1,000 cases each).

Bodies are arbitrary JSON (and some non-JSON bytes), headers arbitrary; the app is the real one
(thread queue, a temporary MODEL_DIR, basic auth on).  Whatever arrives: never a 5xx, never a
traceback or a secret in the answer, and the app still answers /health afterwards.
"""
from __future__ import annotations

import base64

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from ml_backend.app import create_app
from ml_backend.settings import Settings
from ml_backend.training_queue import ThreadTrainingQueue

PASSWORD = "fuzz-password-1"
AUTH = {"Authorization": "Basic " + base64.b64encode(f"label-studio:{PASSWORD}".encode()).decode()}
CASES = settings(max_examples=1000, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**63) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12)
# bodies that look like Label Studio's, with every field free to be anything
ls_like = st.fixed_dictionaries({}, optional={
    "action": st.sampled_from(["ANNOTATION_CREATED", "ANNOTATIONS_DELETED", "START_TRAINING", "PROJECT_UPDATED",
                               "TASKS_CREATED"]) | json_values,
    "project": st.integers(-5, 5) | st.text(max_size=12) | json_values,
    "annotation": json_values, "tasks": st.lists(json_values, max_size=3) | json_values,
    "label_config": st.just('<View><Image name="image" value="$image"/><Choices name="label" toName="image">'
                            '<Choice value="a"/><Choice value="b"/></Choices></View>') | json_values,
    "schema": json_values, "params": json_values,
})
bodies = ls_like | json_values
headers = st.dictionaries(st.sampled_from(["Content-Type", "X-Forwarded-For", "Accept", "User-Agent"]),
                          st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=30), max_size=3)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("fuzz-models")
    app_settings = Settings(model_dir=str(model_dir), use_redis=False, label_studio_url="http://127.0.0.1:9",
                            basic_auth_user="label-studio", basic_auth_pass=PASSWORD, reconcile_seconds=0)
    app = create_app(app_settings, training_queue=ThreadTrainingQueue(lambda project, reason: None))
    return app.test_client()


def check(response) -> None:
    text = response.get_data(as_text=True)
    assert response.status_code < 500, text
    assert "Traceback" not in text and PASSWORD not in text


@pytest.mark.parametrize("route", ["/webhook", "/predict", "/setup", "/train"])
def test_routes_never_fail_on_any_body(client, route):
    @CASES
    @given(body=bodies, extra=headers, authenticated=st.booleans())
    def one(body, extra, authenticated):
        check(client.post(route, json=body, headers={**extra, **(AUTH if authenticated else {})}))

    one()
    assert client.get("/health").status_code == 200


@pytest.mark.parametrize("route", ["/webhook", "/predict", "/setup", "/train"])
def test_routes_never_fail_on_any_bytes(client, route):
    @settings(max_examples=200, deadline=None, derandomize=True)
    @given(raw=st.binary(max_size=200), content_type=st.sampled_from(["application/json", "text/plain", ""]))
    def one(raw, content_type):
        check(client.post(route, data=raw, headers={**AUTH, "Content-Type": content_type}))

    one()
    assert client.get("/health").status_code == 200
