"""The review loop as annotators meet it: real Label Studio UI in headless Chromium (Selenium).

Nobody but the backend touches the project's sampling.  Users sign up through the invite link,
open the project's Data Manager and press "Label All Tasks", as a new reviewer would:

* a reviewer who looked BEFORE the first version (a random task, locked to them) is served a
  suspect once the version is in and Label Studio's task lock (TASK_LOCK_TTL of the session's
  server, 120 s) has run out;
* a fresh reviewer gets the lowest-scored, truly mislabelled task, picks the true class in the
  UI, submits, and is served the next suspect; the retrain that follows trusts the annotation;
* a second reviewer pressing "Label All Tasks" while the first is still on their suspect gets
  another one.  (At the very same moment Label Studio guarantees that only on PostgreSQL: on
  SQLite, its default and this test's, it runs the next-task query outside a transaction, so two
  presses within a few milliseconds can get the same task; seen once in CI, 2026-12-01.)

Needs Debian's chromium + chromium-driver and Selenium (scripts/setup.sh installs them); nothing
is downloaded (the driver's path is given, so Selenium Manager never runs).  Screenshots are
saved in the test's temporary directory (printed).
"""
from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest
import requests

from ml_backend.demo import build_demo_project, choice_annotation, make_digits_project
from tests.e2e.conftest import TASK_LOCK_TTL_SECONDS, backend_stack, current_predictions, ls_api, print_logs, \
    wait_idle

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
BACKEND_ENV = {"ALR_IMAGE_SIZE": "8", "ALR_CHANNELS": "1", "ALR_EPOCHS": "25", "ALR_FINETUNE_EPOCHS": "3",
               "ALR_FORGET_RATE": "0.2", "ALR_SEED": "0", "LOG_LEVEL": "INFO"}
TOP = 8          # "among the lowest-scored few"


class Reviewer:
    """One person in one headless Chromium: signs up, presses buttons, reads the screen."""

    def __init__(self, ls_url: str, name: str, shots: Path):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    "--no-first-run", "--window-size=1400,1000", f"--user-data-dir={shots / ('profile-' + name)}"):
            options.add_argument(arg)
        self.driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        self.ls_url, self.name, self.shots = ls_url, name, shots
        self.email = f"{name}-{int(time.time() * 1000)}@example.com"

    def screenshot(self, what: str) -> None:
        path = self.shots / f"{self.name}-{what}.png"
        self.driver.save_screenshot(str(path))
        print("screenshot:", path)

    def sign_up(self, invite_path: str) -> None:
        from selenium.webdriver.common.by import By

        self.driver.get(self.ls_url + invite_path)
        self.driver.find_element(By.NAME, "email").send_keys(self.email)
        self.driver.find_element(By.NAME, "password").send_keys("review-password-1")
        self.driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        self._wait(lambda: "/user/signup" not in self.driver.current_url, "sign-up to finish")

    def label_all_tasks(self, project_id: int) -> int:
        """Open the project's Data Manager, press "Label All Tasks"; the id of the task served."""
        from selenium.webdriver.common.by import By

        self.driver.get(f"{self.ls_url}/projects/{project_id}/data")
        button = self._wait(lambda: next((b for b in self.driver.find_elements(By.TAG_NAME, "button")
                                          if b.text.strip() == "Label All Tasks"), None), "Label All Tasks")
        button.click()
        return self.task_on_screen()

    def task_on_screen(self, previous: int | None = None) -> int:
        """The id the labelling view shows in its corner ("#<id>"), once it differs from ``previous``."""
        def shown():      # the corner reads "#<id>" ("#" drawn by CSS) above "<n> of <total>"
            m = re.search(r"(?:^|\n)#?(\d+)\n\d+ of \d+", self.driver.execute_script("return document.body.innerText"))
            return int(m.group(1)) if m and int(m.group(1)) != previous else None
        return self._wait(shown, "the labelling view")

    def choose_and_submit(self, label: str) -> None:
        from selenium.webdriver.common.by import By

        box = self._wait(lambda: self.driver.find_element(By.CSS_SELECTOR, f"input.ant-checkbox-input[name='{label}']"),
                         f"choice {label}")
        if not box.is_selected():          # the suggested label arrives pre-selected; a click would clear it
            box.find_element(By.XPATH, "./ancestor::label").click()
        self._wait(lambda: self.driver.find_element(By.CSS_SELECTOR, f"input.ant-checkbox-input[name='{label}']")
                   .is_selected() or None, f"choice {label} selected")     # found again: React re-renders it
        self.driver.find_element(By.CSS_SELECTOR, "button[aria-label='Submit current annotation']").click()

    def _wait(self, find, what: str, timeout: float = 60.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                found = find()
            except Exception:      # noqa: BLE001 - the page is still rendering
                found = None
            if found:
                return found
            time.sleep(0.3)
        self.screenshot("timeout")
        raise TimeoutError(f"{self.name}: {what} did not appear within {timeout:.0f}s")

    def quit(self) -> None:
        self.driver.quit()


@pytest.fixture(scope="module")
def review(label_studio, admin_pat, tmp_path_factory):
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        pytest.skip("chromium / chromium-driver are not installed (apt-get install -y chromium chromium-driver)")
    pytest.importorskip("selenium")
    workdir = tmp_path_factory.mktemp("browser")
    shots = workdir / "screenshots"
    shots.mkdir()
    stack = backend_stack(label_studio, workdir)
    ls = ls_api(label_studio)
    invite = ls.call("GET", "/api/invite")["invite_url"]
    reviewers: list[Reviewer] = []
    try:
        stack.start_redis()
        stack.start_backend(admin_pat, BACKEND_ENV)
        data = make_digits_project(n_images=150, noise_rate=0.2, seed=3)
        project_id = ls.create_project("Browser review")
        mapping = ls.upload_images(project_id, data)
        truth = {tid: (data.given[i], data.truth[i]) for tid, i in mapping.items()}

        early = Reviewer(label_studio.ls_url, "early", shots)      # looks before any model exists
        reviewers.append(early)
        early.sign_up(invite)
        early_task = early.label_all_tasks(project_id)
        early_look = time.monotonic()
        early.screenshot("before-first-version")

        ls.connect_backend(project_id, stack.backend_url, stack.backend_auth)
        ls.wait_model_version(project_id, timeout=400)
        wait_idle(stack, project_id)
        yield {"stack": stack, "ls": ls, "project": project_id, "truth": truth, "invite": invite,
               "shots": shots, "reviewers": reviewers, "early": early, "early_task": early_task,
               "early_look": early_look, "workdir": workdir}
    finally:
        for reviewer in reviewers:
            reviewer.quit()
        stack.stop()
        print_logs(stack)


def suspects(ls, project_id: int) -> list[int]:
    """Unlabelled tasks of the current version, lowest score first."""
    version = ls.project(project_id)["model_version"]
    preds = current_predictions(ls, project_id, version)
    labelled = {t["id"] for t in ls.tasks(project_id) if t.get("is_labeled")}
    return sorted((tid for tid in preds if tid not in labelled), key=lambda tid: preds[tid]["score"])


def test_backend_set_the_sampling_nobody_else_did(review):
    project = review["ls"].project(review["project"])
    assert project["sampling"] == "Uncertainty sampling"
    assert project["model_version"].startswith("alr-v")


def test_a_new_reviewer_gets_the_suspects_in_order_and_the_retrain_trusts_them(review):
    ls, pid, truth = review["ls"], review["project"], review["truth"]
    ranked = suspects(ls, pid)
    version = ls.project(pid)["model_version"]
    reviewer = Reviewer(ls.url, "first", review["shots"])
    review["reviewers"].append(reviewer)
    reviewer.sign_up(review["invite"])
    first = reviewer.label_all_tasks(pid)
    reviewer.screenshot("first-suspect")
    given, true = truth[first]
    print(f"first task served: {first} (rank {ranked.index(first)}; given {given}, true {true})")
    assert first in ranked[:TOP] and given != true

    reviewer.choose_and_submit(str(true))
    second = reviewer.task_on_screen(previous=first)
    reviewer.screenshot("second-suspect")
    print(f"next task served: {second} (rank {ranked.index(second)})")
    assert second in ranked[:TOP] and second != first

    annotations = ls.call("GET", f"/api/tasks/{first}/annotations")
    assert [a["result"][0]["value"]["choices"] for a in annotations] == [[str(true)]]
    new = ls.wait_model_version(pid, not_in={version}, timeout=400)       # the annotation's webhook
    wait_idle(review["stack"], pid)
    new = ls.project(pid)["model_version"]
    meta = json.loads((Path(review["workdir"]) / "models" / f"project-{pid}" / "versions" / new / "meta.json").read_text())
    assert first in meta["trusted_task_ids"] and meta["trained_task_labels"][str(first)] == true


def test_a_second_reviewer_gets_another_suspect_while_the_first_is_on_theirs(review):
    ls, pid = review["ls"], review["project"]
    ranked = suspects(ls, pid)
    pair = [Reviewer(ls.url, f"team{k}", review["shots"]) for k in (1, 2)]
    review["reviewers"].extend(pair)
    for reviewer in pair:
        reviewer.sign_up(review["invite"])
    served = {reviewer.name: reviewer.label_all_tasks(pid) for reviewer in pair}   # the first stays on its task
    print("served one after the other:", served, "ranks:", {n: ranked.index(t) for n, t in served.items()})
    assert len(set(served.values())) == 2
    assert all(tid in ranked[:TOP] for tid in served.values())


@pytest.fixture(scope="module")
def annotation_project(label_studio, admin_pat, tmp_path_factory):
    """A project whose given labels are annotations (the usual existing project), every task
    labelled, its backend run with ALR_LABEL_SOURCE=annotation and ALR_REOPEN_SUSPECTS=20."""
    pytest.importorskip("selenium")
    workdir = tmp_path_factory.mktemp("annotation-labels")
    stack = backend_stack(label_studio, workdir)
    ls = ls_api(label_studio)
    try:
        stack.start_redis()
        stack.start_backend(admin_pat, {**BACKEND_ENV, "ALR_LABEL_SOURCE": "annotation", "ALR_REOPEN_SUSPECTS": "20",
                                        "ALR_CREATE_VIEW": "true"})
        data = make_digits_project(n_images=120, noise_rate=0.2, seed=5)
        project_id = ls.create_project("Labels as annotations")
        earlier_team = {i: [choice_annotation(label)] for i, label in enumerate(data.given)}   # as a team made them
        mapping = ls.upload_images(project_id, data, label_field="label_at_import", annotations=earlier_team)
        labelled_before = sum(t["is_labeled"] for t in ls.tasks(project_id))
        ls.connect_backend(project_id, stack.backend_url, stack.backend_auth)
        ls.wait_model_version(project_id, timeout=400)
        wait_idle(stack, project_id)
        yield {"stack": stack, "ls": ls, "project": project_id, "workdir": workdir,
               "truth": {tid: (data.given[i], data.truth[i]) for tid, i in mapping.items()},
               "labelled_before": labelled_before}
    finally:
        stack.stop()
        print_logs(stack)


def test_a_project_labelled_by_annotations_gets_its_suspects_reopened_and_the_review_is_trusted(
        annotation_project, review):
    """Every task is labelled by its imported annotation; the backend reopens the 20 lowest-scored
    (their own overlap + 1, the project's annotations per task untouched), so "Label All Tasks"
    serves the top suspect; the reviewer's annotation, made in the labelling view, labels the
    task again and is trusted by the retrain.  The "Suspects first" tab is there for browsing."""
    ls, pid, truth = annotation_project["ls"], annotation_project["project"], annotation_project["truth"]
    project = ls.project(pid)
    assert annotation_project["labelled_before"] == len(truth)
    assert project["maximum_annotations"] == 1 and project["sampling"] == "Uncertainty sampling"
    version = project["model_version"]
    preds = current_predictions(ls, pid, version)
    lowest = sorted(preds, key=lambda tid: preds[tid]["score"])[:20]
    open_tasks = [t["id"] for t in ls.tasks(pid) if not t["is_labeled"]]
    assert sorted(open_tasks) == sorted(lowest)
    tabs = ls.call("GET", "/api/dm/views/", params={"project": pid})
    assert tabs[0]["data"]["title"] == "Suspects first" and tabs[0]["data"]["ordering"] == ["tasks:predictions_score"]
    ranked = suspects(ls, pid)
    reviewer = Reviewer(ls.url, "annotations", review["shots"])
    review["reviewers"].append(reviewer)
    reviewer.sign_up(review["invite"])
    served = reviewer.label_all_tasks(pid)
    given, true = truth[served]
    print(f"annotation-labelled project: served {served} (rank {ranked.index(served)}; given {given}, true {true})")
    assert served == ranked[0] and given != true
    reviewer.choose_and_submit(str(true))
    reviewer.screenshot("annotation-project-suspect")
    deadline = time.monotonic() + 30
    while not ls.call("GET", f"/api/tasks/{served}")["is_labeled"]:      # the imported annotation + the review
        assert time.monotonic() < deadline, "the review did not label the served task again"
        time.sleep(0.5)
    assert ls.call("GET", f"/api/tasks/{served}/annotations")[-1]["result"][0]["value"]["choices"] == [str(true)]
    ls.wait_model_version(pid, not_in={version}, timeout=400)
    wait_idle(annotation_project["stack"], pid)
    new = ls.project(pid)["model_version"]
    meta = json.loads((Path(annotation_project["workdir"]) / "models" / f"project-{pid}" / "versions" / new
                       / "meta.json").read_text())
    assert served in meta["trusted_task_ids"] and meta["trained_task_labels"][str(served)] == true


def test_the_label_quality_report_opens_in_the_browser_with_its_plots_and_suspects(review):
    """The backend's /report page, opened by a reviewer who is logged in to Label Studio (the
    thumbnails come from Label Studio with that session): warnings area, both plots, the
    suspects in the stream's order, each linking to its task, the progress table."""
    from selenium.webdriver.common.by import By

    stack, pid, ls = review["stack"], review["project"], review["ls"]
    wait_idle(stack, pid)
    reviewer = review["early"]                      # signed up, so logged in to Label Studio
    user, password = stack.backend_auth
    reviewer.driver.get(f"http://{user}:{password}@127.0.0.1:{stack.backend_port}/report?project={pid}")
    cards = reviewer._wait(lambda: reviewer.driver.find_elements(By.CSS_SELECTOR, "#suspects a.card"), "the suspects")
    loaded = "return Array.from(arguments[0]).every(i => i.complete && i.naturalWidth > 0)"
    reviewer._wait(lambda: reviewer.driver.execute_script(loaded, reviewer.driver.find_elements(By.TAG_NAME, "img")),
                   "every image of the report")
    for plot in ("noise-per-label", "confusion"):
        assert reviewer.driver.find_element(By.ID, plot).size["width"] > 200
    ranked = suspects(ls, pid)
    shown = [int(card.get_attribute("href").split("task=")[1]) for card in cards]
    assert len(shown) == 24 and shown == ranked[:24]
    assert all(f"/projects/{pid}/data?task=" in card.get_attribute("href") for card in cards)
    assert reviewer.driver.find_elements(By.CSS_SELECTOR, "#progress tr")        # one row per version
    cells = reviewer.driver.find_elements(By.CSS_SELECTOR, "#progress td.trained")     # how each was trained
    trained = [cell.text.splitlines()[0] for cell in cells]
    assert "from scratch" in trained and set(trained) <= {"from scratch", "fine-tuned"}, trained
    reviewer.screenshot("label-quality-report")


def test_an_early_look_does_not_lock_a_random_task_past_the_lock_ttl(review):
    """Last in the module: the tests before it outlast Label Studio's task lock, so it waits for nothing."""
    early, pid = review["early"], review["project"]
    wait = TASK_LOCK_TTL_SECONDS + 2 - (time.monotonic() - review["early_look"])
    if wait > 0:
        time.sleep(wait)
    ranked = suspects(review["ls"], pid)
    served = early.label_all_tasks(pid)
    early.screenshot("after-first-version")
    print(f"before the first version: task {review['early_task']}; after: {served} (rank {ranked.index(served)})")
    assert served in ranked[:TOP]
    given, true = review["truth"][served]
    assert given != true
