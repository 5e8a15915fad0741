"""Unit tests of ml_backend's pieces: settings, label config, the label rule, store, client auth."""
from __future__ import annotations

import json

import pytest

from ml_backend.app import create_app
from ml_backend.labelconfig import LabelConfigError, parse_label_config
from ml_backend.labels import extract_labels, extract_task_labels
from ml_backend.ls_client import LabelStudioAuthError, LabelStudioClient
from ml_backend.settings import Settings
from ml_backend.store import ProjectStore, ResultsCache
from tests.test_backend_fake_ls import DIGITS_CONFIG, LEGACY_TOKEN, PAT, FakeLabelStudio

INFO = parse_label_config(DIGITS_CONFIG)


# -- settings ---------------------------------------------------------------------------
def test_settings_defaults_and_env():
    s = Settings.from_env({})
    assert s.label_source == "data" and s.label_field == "label" and s.redis_port == 6379
    s = Settings.from_env({"REDIS_PORT": "6390", "ALR_LABEL_SOURCE": "annotation", "ALR_FORGET_RATE": "0.2",
                           "LABEL_STUDIO_URL": "http://ls:8080/", "ALR_USE_REDIS": "no", "ALR_RUNNING_LOCK_TTL": "90"})
    assert (s.redis_port, s.label_source, s.forget_rate, s.label_studio_url, s.use_redis, s.running_lock_ttl) == \
        (6390, "annotation", 0.2, "http://ls:8080", False, 90)


def test_settings_bad_values_name_the_variable():
    with pytest.raises(ValueError, match="REDIS_PORT"):
        Settings.from_env({"REDIS_PORT": "abc"})
    with pytest.raises(ValueError, match="ALR_LABEL_SOURCE"):
        Settings.from_env({"ALR_LABEL_SOURCE": "both"})
    with pytest.raises(ValueError, match="ALR_RUNNING_LOCK_TTL must be at least 3"):
        Settings.from_env({"ALR_RUNNING_LOCK_TTL": "2"})     # renewed every third: sub-second beats


def test_per_label_forget_rates_are_read_by_label_name_and_checked_against_the_project():
    s = Settings.from_env({"ALR_CLASS_FORGET_RATES": " Benign=0.05, Malignant = 0.4,"})
    assert s.class_forget_rates == (("Benign", 0.05), ("Malignant", 0.4))
    assert s.class_forget_rates_for(["Malignant", "Benign"]) == (0.4, 0.05)
    assert Settings.from_env({}).class_forget_rates_for(["a", "b"]) is None
    with pytest.raises(ValueError, match=r"missing \['Cyst'\]"):
        s.class_forget_rates_for(["Benign", "Malignant", "Cyst"])
    for bad, why in (("Benign=1.0", r"\[0, 1\)"), ("Benign", "not <label>=<rate>"), ("Benign=0.1,Benign=0.2", "twice"),
                     ("Benign=lots", "could not convert")):
        with pytest.raises(ValueError, match="ALR_CLASS_FORGET_RATES.*" + why):
            Settings.from_env({"ALR_CLASS_FORGET_RATES": bad})


def test_settings_repr_hides_key():
    assert "secret" not in repr(Settings(label_studio_api_key="secret"))


# -- label config -----------------------------------------------------------------------
def test_parse_digits_config():
    assert INFO.from_name == "label" and INFO.to_name == "image" and INFO.image_field == "image"
    assert INFO.class_names == ("0", "1", "2")


@pytest.mark.parametrize("config, message", [
    ("", "empty"),
    ("<View><Image", "not valid XML"),
    ('<View><Text name="t" value="$text"/><Choices name="c" toName="t"><Choice value="a"/>'
     '<Choice value="b"/></Choices></View>', "Image"),
    ('<View><Image name="i" value="$image"/><Choices name="c" toName="i" choice="multiple">'
     '<Choice value="a"/><Choice value="b"/></Choices></View>', "single-choice"),
    ('<View><Image name="i" value="$image"/><RectangleLabels name="r" toName="i"><Label value="a"/>'
     '</RectangleLabels></View>', "Choices"),
    ('<View><Image name="i" value="$image"/><Choices name="c" toName="i"><Choice value="a"/></Choices></View>',
     "at least two"),
    ('<View><Image name="i" value="$image"/><Image name="j" value="$other"/><Choices name="c" toName="i">'
     '<Choice value="a"/><Choice value="b"/></Choices></View>', "exactly one"),
])
def test_bad_configs_have_clear_errors(config, message):
    with pytest.raises(LabelConfigError, match=message):
        parse_label_config(config)


# -- the label rule ---------------------------------------------------------------------
def ann(aid, choice, *, cancelled=False, updated=None, from_name="label"):
    return {"id": aid, "was_cancelled": cancelled, "created_at": f"2026-01-01T00:00:{aid:02d}",
            "updated_at": updated or f"2026-01-01T00:00:{aid:02d}",
            "result": [] if choice is None else [{"from_name": from_name, "to_name": "image", "type": "choices",
                                                  "value": {"choices": [choice]}}]}


def task(anns, label="1"):
    return {"id": 7, "data": {"image": "/x.png", "label": label}, "annotations": anns}


def test_source_data_noisy_from_field_untrusted_without_annotations():
    tl = extract_task_labels(task([]), INFO)
    assert (tl.noisy, tl.trusted, tl.label, tl.is_trusted) == (1, None, 1, False)


def test_source_data_every_annotation_trusted_latest_update_wins():
    tl = extract_task_labels(task([ann(1, "2"), ann(2, "0", updated="2026-01-01T00:00:01"),
                                   ann(3, "2", updated="2026-01-02T00:00:00")]), INFO)
    assert (tl.noisy, tl.trusted, tl.label) == (1, 2, 2)


def test_cancelled_and_foreign_annotations_are_ignored():
    tl = extract_task_labels(task([ann(1, None, cancelled=True), ann(2, "0", from_name="other")]), INFO)
    assert tl.trusted is None and tl.label == 1


def test_label_missing_from_config_is_ignored_and_reported(caplog):
    tasks = [task([ann(1, "9")], label="7")]
    (tl,) = extract_labels(tasks, INFO)
    assert tl.noisy is None and tl.trusted is None and tl.label is None
    assert set(tl.invalid_labels) == {"9", "7"}
    assert "not in the labelling config" in caplog.text


def test_a_label_spelt_in_another_unicode_form_is_the_config_s_label():
    """"Bénin" as e + combining accent (NFD, as some exports write it), with spaces around it, is the
    config's "Bénin" (NFC), in the task data, in ALR_CLASS_FORGET_RATES, and back in the config's spelling."""
    import unicodedata

    nfc, nfd = "Bénin", unicodedata.normalize("NFD", "Bénin")
    assert nfc != nfd
    info = parse_label_config(DIGITS_CONFIG.replace('"0"', f'"{nfc}"'))
    assert extract_task_labels(task([], label=f" {nfd} "), info).noisy == 0
    assert info.class_names[0] == nfc
    rates = Settings.from_env({"ALR_CLASS_FORGET_RATES": f"{nfd}=0.3, 1=0.1, 2=0.2"})
    assert rates.class_forget_rates_for(info.class_names) == (0.3, 0.1, 0.2)


def test_source_data_integer_label_is_matched_as_string():
    assert extract_task_labels(task([], label=2), INFO).noisy == 2


def test_source_annotation_first_is_noisy_later_ones_trusted():
    only_first = extract_task_labels(task([ann(1, "0")], label=None), INFO, label_source="annotation")
    assert (only_first.noisy, only_first.trusted) == (0, None)
    later = extract_task_labels(task([ann(3, "1"), ann(1, "0"), ann(2, "2")], label=None), INFO,
                                label_source="annotation")
    assert (later.noisy, later.trusted, later.label) == (0, 1, 1)   # first by creation, latest update wins


# -- store ------------------------------------------------------------------------------
def test_store_publishes_atomically_and_cache_reloads_per_version(tmp_path):
    store = ProjectStore(tmp_path, 3)
    assert store.current_version() is None
    cache = ResultsCache(tmp_path)
    assert cache.get(3) is None
    for n in (1, 2):
        version = f"alr-v{n}-x"
        tmp = store.begin(version)
        (tmp / "results.json").write_text(json.dumps({"class_names": ["a", "b"], "items": {"5": {"n": n}}}))
        assert store.current_version() == (None if n == 1 else "alr-v1-x")   # not visible yet
        store.commit(version, tmp)
        assert cache.get(3).items[5] == {"n": n}
    assert store.list_versions() == ["alr-v1-x", "alr-v2-x"]
    assert store.next_version().startswith("alr-v3-")
    half = store.begin("alr-v3-x")
    store.clean_temp()
    assert not half.exists() and store.current_version() == "alr-v2-x"


# -- client auth ------------------------------------------------------------------------
@pytest.mark.parametrize("key, legacy_enabled", [(LEGACY_TOKEN, True), (PAT, False), (PAT, True)],
                         ids=["legacy", "pat-legacy-disabled", "pat"])
def test_client_accepts_legacy_tokens_and_pats(key, legacy_enabled):
    with FakeLabelStudio(legacy_enabled=legacy_enabled) as ls:
        ls.add_project(1)
        client = LabelStudioClient(ls.url, key)
        assert client.get_project(1)["id"] == 1
        assert key not in repr(client)


def test_client_refuses_bad_key_without_logging_it(caplog):
    with FakeLabelStudio(legacy_enabled=False) as ls:
        ls.add_project(1)
        with pytest.raises(LabelStudioAuthError) as err:
            LabelStudioClient(ls.url, LEGACY_TOKEN).get_project(1)
        assert LEGACY_TOKEN not in str(err.value) and LEGACY_TOKEN not in caplog.text
        with pytest.raises(LabelStudioAuthError):
            LabelStudioClient(ls.url, "wrong").get_project(1)


def test_a_blip_on_the_token_exchange_is_asked_again_not_taken_for_a_refused_key():
    """A proxy's 502 on POST /api/token/refresh/ says "not now", not "wrong key": the job's client
    asks again and goes on; a client that asks once fails with a transient error, not a refused key."""
    from ml_backend.ls_client import LabelStudioError

    with FakeLabelStudio(legacy_enabled=False) as ls:
        ls.add_project(1)
        ls.fail_next("refresh", 1, status=502)
        with pytest.raises(LabelStudioError, match="refresh.*HTTP 502") as err:
            LabelStudioClient(ls.url, PAT).get_project(1)
        assert err.value.transient and not isinstance(err.value, LabelStudioAuthError)
        ls.fail_next("refresh", 2, status=502)
        assert LabelStudioClient(ls.url, PAT, attempts=3, retry_wait=0.01).get_project(1)["id"] == 1
        assert ls.requests["refresh"] == 4


def test_a_login_page_in_front_of_label_studio_is_an_error_that_says_so_and_lets_webhooks_through(backend_env):
    """A proxy that answers Label Studio's API with its own 200 HTML page (an SSO login, a maintenance
    notice): a transient LabelStudioError naming it, for the API and the token exchange alike, and a
    webhook is still queued (the project check cannot be asked, so the event is let through)."""
    import http.server
    import threading

    from ml_backend.ls_client import LabelStudioError
    from ml_backend.training_queue import ThreadTrainingQueue

    class LoginPage(http.server.BaseHTTPRequestHandler):
        def answer(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            page = b"<html><body>Sign in to the hospital network</body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        do_GET = do_POST = answer

        def log_message(self, *args):
            pass

    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), LoginPage)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{proxy.server_address[1]}"
    try:
        for key in (LEGACY_TOKEN, PAT):
            with pytest.raises(LabelStudioError, match="text/html, not JSON .*LABEL_STUDIO_URL") as err:
                LabelStudioClient(url, key).get_project(1)
            assert err.value.transient and not isinstance(err.value, LabelStudioAuthError)
        jobs: list = []
        queue = ThreadTrainingQueue(lambda project, reason: jobs.append(project))
        app = create_app(Settings.from_env().replace(label_studio_url=url, label_studio_api_key=LEGACY_TOKEN),
                         training_queue=queue)
        r = app.test_client().post("/webhook", json={"action": "ANNOTATION_CREATED", "project": {"id": 1},
                                                     "annotation": {"id": 5}, "task": {"id": 3}})
        assert r.status_code == 201 and queue.wait_idle(10) and jobs == [1]
    finally:
        proxy.shutdown()
        proxy.server_close()


def test_the_task_listing_reads_every_page_when_label_studio_serves_smaller_pages_than_asked():
    """Label Studio with TASK_API_PAGE_SIZE_MAX=100 answers a page_size=200 listing with pages of 100:
    every task is listed once, not just the first page's."""
    with FakeLabelStudio() as ls:
        ls.add_project(1)
        for tid in range(1, 451):
            ls.add_task(1, tid, label="0", pixel=20)
        ls.max_page_size = 100
        ids = [t["id"] for t in LabelStudioClient(ls.url, LEGACY_TOKEN).iter_tasks(1, page_size=200)]
        assert sorted(ids) == list(range(1, 451)) and ls.requests["tasks"] == 5


def test_client_asks_again_through_a_blip_only_where_repeating_is_safe(caplog):
    """attempts=3: a GET, a DELETE, a PATCH of the project and a prediction import are sent again
    after 503s and succeed, and an import Label Studio carried out but whose answer was lost is not
    created twice; a POST not marked repeatable and a file download are sent once; a 400 is never
    repeated; attempts=1 (the web app's) sends everything once."""
    from ml_backend.ls_client import LabelStudioError

    caplog.set_level("INFO", logger="ml_backend.ls_client")
    with FakeLabelStudio() as ls:
        ls.add_project(1)
        ls.add_task(1, 10, label="0", pixel=20)
        client = LabelStudioClient(ls.url, LEGACY_TOKEN, attempts=3, retry_wait=0.01)
        ls.fail_next("tasks", 2)
        assert [t["id"] for t in client.iter_tasks(1)] == [10] and ls.requests["tasks"] == 3
        assert "predictions" not in next(client.iter_tasks(1))           # the jobs never read them
        assert "predictions" in next(client.iter_tasks(1, predictions=True))
        assert "HTTP 503" in caplog.text and "attempt 3 of 3" in caplog.text
        ls.fail_next("project", 2)
        assert client.patch_project(1, model_version="v1")["model_version"] == "v1"
        ls.fail_next("import_predictions", 2)
        assert client.import_predictions(1, [{"task": 10, "model_version": "v1", "result": []}]) == 1
        ls.fail_next("import_predictions", 1, status=504, answer_lost=True)     # created, answer lost: not again
        assert client.import_predictions(1, [{"task": 10, "model_version": "v1", "result": []}]) == 1
        assert [p["task"] for p in ls.predictions] == [10, 10] and "answer was lost" in caplog.text
        ls.fail_next("import_predictions", 1)                  # refused, then the count read before the
        ls.fail_next("model_versions", 1, status=502)          # second try fails too: the third counts, sends once
        sent, counted = ls.requests["import_predictions"], ls.requests["model_versions"]
        assert client._import_batch(1, [{"task": 10, "model_version": "v1", "result": []}], {"v1"}, 2) == 1
        assert [p["task"] for p in ls.predictions] == [10, 10, 10]
        assert (ls.requests["import_predictions"] - sent, ls.requests["model_versions"] - counted) == (2, 2)
        ls.fail_next("model_versions", 2)
        before = ls.requests["model_versions"]
        client.delete_prediction_version(1, "v1")
        assert ls.predictions == [] and ls.requests["model_versions"] == before + 3

        ls.fail_next("tasks", 3)                       # away for longer than the attempts
        with pytest.raises(LabelStudioError, match="HTTP 503"):
            list(client.iter_tasks(1))
        ls.fail_next("tasks", 0)
        before = ls.requests["import_predictions"]
        with pytest.raises(LabelStudioError, match="HTTP 400"):      # a task of no project: not a blip
            client.import_predictions(1, [{"task": 99, "model_version": "v1", "result": []}])
        assert ls.requests["import_predictions"] == before + 1
        ls.fail_next("upload", 1)
        with pytest.raises(LabelStudioError, match="HTTP 503"):      # a file: ImageCache's to ask again
            client.download("/data/upload/1/task-10.png")
        ls.fail_next("import_predictions", 1)
        with pytest.raises(LabelStudioError, match="HTTP 503"):      # a POST not marked repeatable
            client.request("POST", "/api/projects/1/import/predictions", json=[])

        once = LabelStudioClient(ls.url, LEGACY_TOKEN)
        ls.fail_next("project", 1)
        before = ls.requests["project"]
        with pytest.raises(LabelStudioError, match="HTTP 503"):
            once.get_project(1)
        assert ls.requests["project"] == before + 1 and once.get_project(1)["id"] == 1


def test_a_label_studio_whose_tls_certificate_is_not_trusted_says_to_set_requests_ca_bundle(tmp_path, monkeypatch,
                                                                                            caplog, backend_env):
    """Label Studio over HTTPS with a certificate of the hospital's own CA (here self-signed): the API
    call and the image download fail at once, not asked again, saying to set REQUESTS_CA_BUNDLE (for
    the images, as a host failure, which stops a job past its allowance; /health, as the reason
    Label Studio is not reachable); with it set, both work."""
    import shutil
    import subprocess

    from ml_backend.images import ImageCache, ImageHostError
    from ml_backend.ls_client import LabelStudioError

    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make the certificate")
    cert, key = tmp_path / "ca.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    caplog.set_level("INFO", logger="ml_backend.ls_client")
    with FakeLabelStudio(tls=(str(cert), str(key))) as ls:
        ls.add_project(1)
        ls.add_task(1, 10, label="0", pixel=20)
        client = LabelStudioClient(ls.url, LEGACY_TOKEN, attempts=3, retry_wait=0.01)
        with pytest.raises(LabelStudioError, match="certificate was refused .*CERTIFICATE_VERIFY_FAILED.*"
                                                   "REQUESTS_CA_BUNDLE") as err:
            client.get_project(1)
        assert not err.value.transient and "asking again" not in caplog.text
        monkeypatch.setenv("LABEL_STUDIO_URL", ls.url)
        monkeypatch.setenv("LABEL_STUDIO_API_KEY", LEGACY_TOKEN)
        ls_status = create_app().test_client().get("/health").get_json()["label_studio"]   # what /health says
        assert ls_status["reachable"] is False and "REQUESTS_CA_BUNDLE" in ls_status["error"]
        cache = ImageCache(tmp_path / "cache", client, retry_wait=0.01)
        with pytest.raises(ImageHostError, match="REQUESTS_CA_BUNDLE"):
            cache.fetch("/data/upload/1/task-10.png")

        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert))           # the CA the hospital's certificates come from
        assert client.get_project(1)["id"] == 1
        assert cache.fetch("/data/upload/1/task-10.png").read_bytes() == ls.files["/data/upload/1/task-10.png"]


# -- the bounded image cache -------------------------------------------------------------
class _Bytes:
    """A client whose every image is 1000 bytes."""

    def download(self, url, *, max_bytes):
        return b"x" * 1000


def _cache_bytes(root) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def test_image_cache_evicts_lru_files_under_the_cap_never_ones_in_use(tmp_path):
    import os

    from ml_backend.images import ImageCache

    old = ImageCache(tmp_path, _Bytes())                  # an earlier job filled the cache
    for i in range(8):
        path = old.fetch(f"http://x/{i}.png")
        os.utime(path, (1_000_000 + i, 1_000_000 + i))    # least recently used: 0, then 1, ...
    old.fetch("http://x/7.png")                           # ... and 7 used again just now
    job = ImageCache(tmp_path, _Bytes(), max_cache_bytes=6000, protect_seconds=3600)
    needed = [job.fetch("http://x/5.png"), job.fetch("http://x/6.png")]   # this job uses two old files
    for i in range(8, 11):
        needed.append(job.fetch(f"http://x/{i}.png"))
        assert _cache_bytes(tmp_path) <= 6000
    assert all(p.exists() for p in needed)                # in use by the job: kept
    assert old.path_for("http://x/7.png").exists()        # touched within the job timeout: kept
    assert not any(old.path_for(f"http://x/{i}.png").exists() for i in range(4))   # LRU evicted first
    assert job.evicted >= 4


def test_image_cache_over_cap_only_with_files_in_use_keeps_them_and_warns(tmp_path, caplog):
    from ml_backend.images import ImageCache

    job = ImageCache(tmp_path, _Bytes(), max_cache_bytes=2500)
    paths = [job.fetch(f"http://x/{i}.png") for i in range(5)]
    assert all(p.exists() for p in paths) and job.evicted == 0
    assert "every remaining file is in use" in caplog.text


def test_settings_for_scale_out_and_large_projects():
    s = Settings.from_env({})
    assert (s.gpus_per_job, s.train_processes, s.training_processes) == (1, 0, 1)
    assert (s.image_cache_max_mb, s.stream_above_tasks, s.dataloader_workers) == (2048, 5000, 2)
    assert Settings.from_env({"ALR_GPUS_PER_JOB": "4"}).training_processes == 4
    assert Settings.from_env({"ALR_TRAIN_PROCESSES": "2"}).training_processes == 2
    with pytest.raises(ValueError, match="ALR_IMAGE_CACHE_MAX_MB"):
        Settings.from_env({"ALR_IMAGE_CACHE_MAX_MB": "-1"})
    with pytest.raises(ValueError, match="gpus_per_job"):
        Settings.from_env({"ALR_GPUS_PER_JOB": "0"})


@pytest.mark.parametrize("preselect, choices", [("suggested", ["2"]), ("given", ["1"]), ("none", None)])
def test_prediction_preselects_the_chosen_label(preselect, choices):
    from ml_backend.training import prediction_for

    info = parse_label_config(DIGITS_CONFIG)
    record = {"suggested": "2", "given": "1", "trusted": False, "score": 0.12, "prob_label_wrong": 0.9,
              "loss": 2.3, "vog": 0.01, "priority": 0.88}
    pred = prediction_for(record, info, "alr-v1-x", preselect=preselect)
    assert pred["score"] == 0.12 and pred["model_version"] == "alr-v1-x"
    if choices is None:
        assert pred["result"] == []
    else:
        assert pred["result"][0]["value"]["choices"] == choices
        assert pred["result"][0]["meta"]["suggested_label"] == "2"
    # a label the config does not have (it changed since the version was trained): ranked, nothing pre-selected
    gone = prediction_for({**record, "suggested": "7", "given": "7"}, info, "alr-v1-x", preselect=preselect)
    assert gone == {"result": [], "score": 0.12, "model_version": "alr-v1-x"}


def test_review_changes_respect_the_opt_out_and_only_point_at_complete_versions():
    from ml_backend.review import review_project_changes

    project = {"sampling": "Sequential sampling", "maximum_annotations": 1, "model_version": "title"}
    on = Settings()
    assert review_project_changes(project, on, served_version="alr-v2", served_version_complete=True) == {
        "sampling": "Uncertainty sampling", "model_version": "alr-v2"}
    assert review_project_changes(project, on, served_version="alr-v2", served_version_complete=False) == {
        "sampling": "Uncertainty sampling"}
    assert review_project_changes(project, Settings(set_sampling=False), served_version=None,
                                  served_version_complete=False) == {}
    with pytest.raises(ValueError, match="ALR_PRESELECT"):
        Settings.from_env({"ALR_PRESELECT": "first"})


def _ann(aid, user, label, *, created, updated=None, gt=False, cancelled=False):
    return {"id": aid, "completed_by": user, "ground_truth": gt, "was_cancelled": cancelled,
            "created_at": created, "updated_at": updated or created,
            "result": [{"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": [label]}}]}


def test_team_rule_majority_of_annotators_experts_trusted_ground_truth_on_request():
    info = parse_label_config(DIGITS_CONFIG)           # classes "0", "1", "2"
    team = [_ann(1, 11, "0", created="2026-01-01"), _ann(2, 12, "1", created="2026-01-02"),
            _ann(3, 13, "1", created="2026-01-03"), _ann(4, 12, "1", created="2026-01-04"),   # 12 again: one vote
            _ann(5, 14, "2", created="2026-01-05", cancelled=True)]                          # skipped: ignored
    task = {"id": 9, "data": {}, "annotations": team}
    tl = extract_task_labels(task, info, label_source="annotation", experts=frozenset({99}))
    assert tl.noisy == info.index_of("1") and tl.trusted is None
    assert tl.agreement == pytest.approx(2 / 3) and tl.annotators == 3
    expert = _ann(6, 99, "2", created="2026-01-06")
    tl = extract_task_labels({**task, "annotations": team + [expert]}, info, label_source="annotation",
                             experts=frozenset({99}))
    assert tl.trusted == info.index_of("2") and tl.label == info.index_of("2") and tl.noisy == info.index_of("1")
    # a tie goes to the label chosen earliest; ground truth is trusted with or without experts
    tie = [_ann(1, 11, "0", created="2026-01-01"), _ann(2, 12, "1", created="2026-01-02")]
    assert extract_task_labels({**task, "annotations": tie}, info, label_source="annotation",
                               experts=frozenset({99})).noisy == info.index_of("0")
    gt = _ann(7, 15, "2", created="2026-01-07", gt=True)     # Label Studio marks every imported annotation so
    assert extract_task_labels({**task, "annotations": tie + [gt]}, info, label_source="annotation",
                               trust_ground_truth=True).trusted == info.index_of("2")
    assert extract_task_labels({**task, "annotations": [gt]}, info, label_source="annotation").trusted is None
    # label source data with experts: the data field is the given label, only experts are trusted
    data_task = {"id": 9, "data": {"label": "2"}, "annotations": tie}
    tl = extract_task_labels(data_task, info, label_source="data", experts=frozenset({99}))
    assert tl.noisy == info.index_of("2") and tl.trusted is None
    # no experts named: the single-annotator rules are unchanged
    assert extract_task_labels(data_task, info, label_source="data").trusted == info.index_of("1")
    legacy = extract_task_labels({**task, "annotations": tie}, info, label_source="annotation")
    assert legacy.noisy == info.index_of("0") and legacy.trusted == info.index_of("1")


def test_expert_emails_resolve_to_user_ids(caplog):
    from ml_backend.training import expert_ids

    with FakeLabelStudio() as ls:
        ls.users = [{"id": 5, "email": "Radiologist@Hospital.org"}, {"id": 6, "email": "resident@hospital.org"}]
        client = LabelStudioClient(ls.url, PAT)
        settings = Settings.from_env({"ALR_EXPERT_EMAILS": "radiologist@hospital.org, nobody@hospital.org",
                                      "ALR_EXPERT_USER_IDS": "7"})
        assert expert_ids(client, settings) == {5, 7}
    assert "nobody@hospital.org" in caplog.text


def test_reopening_leaves_exactly_the_lowest_scored_untrusted_tasks_open():
    from ml_backend.review import overlap_changes

    records = {1: {"score": 0.1, "trusted": False}, 2: {"score": 0.05, "trusted": True},
               3: {"score": 0.2, "trusted": False}, 4: {"score": 0.9, "trusted": False},
               5: {"score": 0.8, "trusted": False}}
    tasks = [{"id": 1, "overlap": 1, "total_annotations": 1, "is_labeled": True},
             {"id": 2, "overlap": 1, "total_annotations": 2, "is_labeled": True},     # reviewed: trusted
             {"id": 3, "overlap": 2, "total_annotations": 1, "is_labeled": False},    # already open
             {"id": 4, "overlap": 2, "total_annotations": 1, "is_labeled": False},    # opened earlier, no suspect now
             {"id": 5, "overlap": 1, "total_annotations": 0, "is_labeled": False}]    # never labelled: left alone
    assert overlap_changes(tasks, records, maximum_annotations=1, reopen=2) == {
        1: {"overlap": 2, "is_labeled": False}, 4: {"overlap": 1, "is_labeled": True}}
    # a project with 3 annotations per task: a task with 3 gets a 4th slot, a closed one gets 3 back
    team = [{"id": 1, "overlap": 3, "total_annotations": 3, "is_labeled": True},
            {"id": 4, "overlap": 4, "total_annotations": 3, "is_labeled": False}]
    assert overlap_changes(team, records, maximum_annotations=3, reopen=1) == {
        1: {"overlap": 4, "is_labeled": False}, 4: {"overlap": 3, "is_labeled": True}}
    assert overlap_changes(tasks, records, maximum_annotations=1, reopen=0) == {     # switched off: all closed
        3: {"overlap": 1, "is_labeled": True}, 4: {"overlap": 1, "is_labeled": True}}


def test_cloud_storage_uris_are_fetched_through_label_studio():
    import base64

    from ml_backend.images import task_image_url

    s3 = {"id": 7, "data": {"image": "s3://scans/ct/0001.png"}}
    url = task_image_url(s3, "image")
    assert url.startswith("/tasks/7/resolve/?fileuri=")
    assert base64.urlsafe_b64decode(url.split("fileuri=")[1]).decode() == "s3://scans/ct/0001.png"
    for plain in ("/data/upload/1/a.png", "http://ls:8080/data/local-files/?d=a.png", "https://cdn.example.org/a.png"):
        assert task_image_url({"id": 1, "data": {"image": plain}}, "image") == plain
    assert task_image_url({"id": 1, "data": {}}, "image") is None


def test_pretrained_weights_reach_the_engine_and_need_a_resnet(tmp_path):
    import torch
    import torchvision

    from ml_backend.training import engine_config, load_engine
    from model.networks import build_network

    weights = tmp_path / "radiology-resnet18.pth"          # a user's own file; nothing is downloaded
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    settings = Settings.from_env({"ALR_ARCH": "resnet18", "ALR_IMAGE_SIZE": "64",
                                  "ALR_PRETRAINED_WEIGHTS": str(weights)})
    config = engine_config(load_engine(), settings)
    assert config.pretrained_weights == str(weights)
    net = build_network(config.arch, num_classes=3, in_channels=1, image_size=64,
                        pretrained_weights=config.pretrained_weights)
    assert net(torch.zeros(2, 1, 64, 64)).shape == (2, 3)
    assert engine_config(load_engine(), Settings()).pretrained_weights is None
    with pytest.raises(ValueError, match="ALR_PRETRAINED_WEIGHTS needs a ResNet"):
        Settings.from_env({"ALR_IMAGE_SIZE": "32", "ALR_PRETRAINED_WEIGHTS": str(weights)})


def test_fast_mode_settings_reach_the_engine_in_one_process(tmp_path):
    from ml_backend.training import engine_config, load_engine

    settings = Settings.from_env({"ALR_FROZEN_BACKBONE": "true", "ALR_IMAGE_SIZE": "224", "ALR_GPUS_PER_JOB": "2",
                                  "MODEL_DIR": str(tmp_path)})
    config = engine_config(load_engine(), settings)
    assert config.frozen_backbone and config.backbone_arch == "resnet18"
    assert config.embedding_cache_dir == str(tmp_path / "embedding_cache")
    assert settings.training_processes == 1                   # the heads train in seconds: no torchrun
    assert engine_config(load_engine(), Settings()).embedding_cache_dir is None
    with pytest.raises(ValueError, match="ALR_FROZEN_BACKBONE needs a ResNet"):
        Settings.from_env({"ALR_FROZEN_BACKBONE": "true", "ALR_ARCH": "smallcnn"})


def test_versions_are_listed_by_number_not_as_text(tmp_path):
    from ml_backend.store import ProjectStore

    store = ProjectStore(tmp_path, 1)
    for name in ("alr-v1-20261130T070000", "alr-v10-20261130T090000", "alr-v2-20261130T071000"):
        (store.versions_dir / name).mkdir(parents=True)
    assert store.list_versions() == ["alr-v1-20261130T070000", "alr-v2-20261130T071000", "alr-v10-20261130T090000"]
    assert store.next_version().startswith("alr-v11-")


def test_old_checkpoints_are_pruned_but_the_current_and_every_versions_results_stay(tmp_path):
    """Five versions, the current one old (a newer version's push was cut off): the newest three
    and the current keep their checkpoint; every version keeps its results and meta."""
    from ml_backend.store import ProjectStore

    store = ProjectStore(tmp_path, 1)
    names = [f"alr-v{n}-20261201T0{n}0000" for n in range(1, 6)]
    for name in names:
        tmp = store.begin(name)
        for file in ("checkpoint.pt", "results.json", "meta.json"):
            (tmp / file).write_text("{}")
        store.commit(name, tmp, make_current=False)
    store.set_current(names[0])
    assert store.prune_checkpoints(keep=3) == [names[1]]
    assert [(store.version_dir(v) / "checkpoint.pt").exists() for v in names] == [True, False, True, True, True]
    assert all((store.version_dir(v) / f).exists() for v in names for f in ("results.json", "meta.json"))
    assert store.prune_checkpoints(keep=0) == [] and store.prune_checkpoints(keep=3) == []
    store.set_current(names[-1])
    assert store.prune_checkpoints(keep=1) == [names[0], names[2], names[3]]
    with pytest.raises(ValueError, match="ALR_KEEP_CHECKPOINTS"):
        Settings.from_env({"ALR_KEEP_CHECKPOINTS": "-1"})
