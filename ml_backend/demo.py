"""Demo: Label Studio + redis + this backend + an rq worker on loopback, with a digits project.

    bash scripts/demo.sh                 # installs what is missing, then runs this module
    python -m ml_backend.demo --help

It starts (on 127.0.0.1 only) redis-server, Label Studio 1.23.2 from ``.ls-venv``, the backend
(``python ml_backend/_wsgi.py``) and ``rq worker``; creates a project of upscaled sklearn
digits made long-tailed (imbalanced) with seeded wrong labels in ``data.label``; connects the
backend (which sets the project's sampling to "Uncertainty sampling"), triggers training and, once
the first model version is in, prints the URL and the login.  Label Studio runs with a task lock
of DEMO_TASK_LOCK_TTL seconds (its default is a day: a task served before the first version would
stay locked to its reviewer that long).  Ctrl-C, SIGTERM and SIGHUP stop everything it started.
The end-to-end tests (tests/e2e) drive the same functions.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import mimetypes
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import requests

from model.processes import kill_process_tree

logger = logging.getLogger("ml_backend.demo")

REPO = Path(__file__).resolve().parents[1]
#: Label Studio's TASK_LOCK_TTL for review: a served task stays reserved for its reviewer this long
DEMO_TASK_LOCK_TTL = 300
DIGITS_LABEL_CONFIG = """<View>
  <Image name="image" value="$image" zoom="true"/>
  <Choices name="label" toName="image" choice="single" showInLine="true">
""" + "".join(f'    <Choice value="{k}"/>\n' for k in range(10)) + """  </Choices>
</View>"""


def choice_annotation(label, completed_by: int | None = None) -> dict:
    """An annotation choosing ``label`` in DIGITS_LABEL_CONFIG: the body of POST
    /api/tasks/<id>/annotations, or one of a task's ``annotations`` in an import (``completed_by``:
    a member's id; without it, the user who makes the call)."""
    annotation = {"was_cancelled": False, "result": [
        {"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": [str(label)]}}]}
    if completed_by is not None:
        annotation["completed_by"] = completed_by
    return annotation


# -- the data set -----------------------------------------------------------------------
@dataclass
class DigitsProject:
    files: list[tuple[str, bytes]]      # (file name, PNG bytes)
    given: list[int]                    # noisy label per file (goes into data.label)
    truth: list[int]                    # true label per file (kept outside Label Studio)

    @property
    def wrong(self) -> np.ndarray:
        return np.asarray(self.given) != np.asarray(self.truth)


def make_digits_project(*, n_images: int = 200, imbalance_ratio: float = 10.0, noise_rate: float = 0.2,
                        pixel_size: int = 32, seed: int = 0) -> DigitsProject:
    """Upscaled sklearn digits, long-tailed class sizes (largest / smallest = imbalance_ratio),
    labels flipped uniformly to another class for ``noise_rate`` of the images (seeded)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    rng = np.random.default_rng(seed)
    digits = load_digits()
    k = 10
    weights = imbalance_ratio ** (-np.arange(k) / (k - 1))
    sizes = np.maximum(2, np.round(weights / weights.sum() * n_images)).astype(int)
    chosen = []
    for c in range(k):
        idx = np.flatnonzero(digits.target == c)
        chosen.extend(rng.choice(idx, size=min(sizes[c], len(idx)), replace=False).tolist())
    chosen = rng.permutation(chosen)
    truth = digits.target[chosen].astype(int)
    given = truth.copy()
    flip = rng.choice(len(given), size=int(round(noise_rate * len(given))), replace=False)
    for i in flip:
        given[i] = int(rng.choice([c for c in range(k) if c != truth[i]]))
    files = []
    for n, i in enumerate(chosen):
        pixels = (digits.images[i] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        image = Image.fromarray(pixels, mode="L").resize((pixel_size, pixel_size), Image.BICUBIC)
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        files.append((f"digit_{n:04d}.png", buf.getvalue()))
    return DigitsProject(files=files, given=given.tolist(), truth=truth.tolist())


# -- processes ---------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"process for {url} exited with {proc.returncode}:\n{tail}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer 200 within {timeout:.0f}s")


@dataclass
class Stack:
    """The processes this demo started (and only those are stopped, by pid)."""

    workdir: Path
    ls_venv: Path = REPO / ".ls-venv"
    python: str = sys.executable
    ls_port: int = 0
    backend_port: int = 0
    redis_port: int = 0
    username: str = "demo@example.com"
    password: str = "demo-password-1"
    token: str = field(default_factory=lambda: secrets.token_hex(20))
    backend_user: str = "label-studio"    # the backend's basic-auth credentials (generated per stack)
    backend_password: str = field(default_factory=lambda: secrets.token_urlsafe(18), repr=False)
    backend_env: dict = field(default_factory=dict)
    task_lock_ttl: int | None = None      # Label Studio's TASK_LOCK_TTL (seconds); None = its default
    label_studio_env: dict = field(default_factory=dict)  # more of Label Studio's settings (e.g. DJANGO_DB, POSTGRE_*)
    procs: dict = field(default_factory=dict)

    def __post_init__(self):
        self.workdir = Path(self.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ls_port = self.ls_port or free_port()
        self.backend_port = self.backend_port or free_port()
        self.redis_port = self.redis_port or free_port()

    @property
    def ls_url(self) -> str:
        return f"http://127.0.0.1:{self.ls_port}"

    @property
    def backend_url(self) -> str:
        return f"http://127.0.0.1:{self.backend_port}"

    @property
    def backend_auth(self) -> tuple[str, str]:
        return self.backend_user, self.backend_password

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    def _spawn(self, name: str, argv: list[str], env: dict | None = None, cwd: Path = REPO) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "ab")
        proc = subprocess.Popen(argv, cwd=cwd, env=env or os.environ.copy(), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        logger.info("started %s (pid %d), log %s", name, proc.pid, self.workdir / f"{name}.log")
        return proc

    def start_redis(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is missing: apt-get install -y redis-server")
        (self.workdir / "redis").mkdir(exist_ok=True)
        self._spawn("redis", [binary, "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "yes", "--dir", str(self.workdir / "redis")])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.redis_port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.1)
        raise TimeoutError("redis-server did not start")

    def ls_env(self) -> dict:
        return dict(os.environ, LABEL_STUDIO_BASE_DATA_DIR=str(self.workdir / "label-studio"),
                    LABEL_STUDIO_USERNAME=self.username, LABEL_STUDIO_PASSWORD=self.password,
                    LABEL_STUDIO_USER_TOKEN=self.token, ML_BLOCK_LOCAL_IP="false",
                    SSRF_PROTECTION_ENABLED="false", COLLECT_ANALYTICS="false",
                    LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK="true",
                    **({"TASK_LOCK_TTL": str(self.task_lock_ttl)} if self.task_lock_ttl else {}),
                    **self.label_studio_env)

    def start_label_studio(self, timeout: float = 240) -> None:
        exe = self.ls_venv / "bin" / "label-studio"
        if not exe.exists():
            raise RuntimeError(f"{exe} is missing: run `bash scripts/setup_label_studio.sh` first")
        env = self.ls_env()
        if not (self.workdir / ".ls-initialised").exists():
            logger.info("initialising Label Studio (migrations, about 35 s)")
            out = subprocess.run([str(exe), "init", "alr", "--username", self.username, "--password",
                                  self.password, "--user-token", self.token, "--enable-legacy-api-token"],
                                 cwd=self.workdir, env=env,
                                 capture_output=True, text=True, timeout=600)
            if out.returncode != 0:
                raise RuntimeError(f"label-studio init failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
            (self.workdir / ".ls-initialised").write_text("ok\n")
        proc = self._spawn("label-studio", [str(exe), "start", "alr", "--no-browser", "--internal-host",
                                            "127.0.0.1", "--port", str(self.ls_port), "--host", self.ls_url,
                                            "--enable-legacy-api-token"], env=env, cwd=self.workdir)
        wait_http(f"{self.ls_url}/health", timeout, proc, self.workdir / "label-studio.log")

    def start_backend(self, api_key: str, extra_env: dict | None = None, timeout: float = 60) -> None:
        """The backend's web app and one rq worker."""
        env = dict(os.environ, LABEL_STUDIO_URL=self.ls_url, LABEL_STUDIO_API_KEY=api_key,
                   REDIS_URL=self.redis_url, RQ_QUEUE_NAME="alr-training", ALR_USE_REDIS="true",
                   MODEL_DIR=str(self.workdir / "models"), PYTHONPATH=str(REPO),
                   BASIC_AUTH_USER=self.backend_user, BASIC_AUTH_PASS=self.backend_password)
        env.update(extra_env or {})         # may point LABEL_STUDIO_URL elsewhere (a proxy in the fault tests)
        self.backend_env = env
        self.start_web_app(timeout)
        self.start_worker()

    def start_worker(self, timeout: float = 60) -> None:
        """One rq worker (again, after it was stopped or killed) with the environment of start_backend;
        returns once the web app's /health counts it."""
        self._spawn("worker", [self.python, "-m", "ml_backend.worker", "--url", self.redis_url,
                               "alr-training"], env=self.backend_env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if requests.get(f"{self.backend_url}/health", auth=self.backend_auth, timeout=5).json()["queue"].get("workers"):
                return
            time.sleep(0.3)
        raise TimeoutError("the rq worker did not register")

    def start_web_app(self, timeout: float = 60) -> None:
        """The backend's web app (again, after ``stop("backend")``) with the environment of start_backend."""
        proc = self._spawn("backend", [self.python, str(REPO / "ml_backend" / "_wsgi.py"), "--host",
                                       "127.0.0.1", "--port", str(self.backend_port)], env=self.backend_env)
        wait_http(f"{self.backend_url}/health", timeout, proc, self.workdir / "backend.log")

    def stop(self, *names: str) -> None:
        """Stop these processes ("redis", "backend", "worker", "label-studio"), or all of them, newest first."""
        for name in [n for n in reversed(list(self.procs)) if not names or n in names]:
            proc = self.procs.pop(name)
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)      # its own session: only what we started
                except ProcessLookupError:
                    continue
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)

    def kill(self, name: str) -> None:
        """SIGKILL a process and everything it started, in their own sessions too (an rq worker's
        work horse): a crash or an OOM kill, with no chance to clean up."""
        proc = self.procs.pop(name)
        kill_process_tree(proc.pid)
        proc.wait(20)


# -- Label Studio API --------------------------------------------------------------------
class LS:
    """Thin helper over the Label Studio API for the demo and the tests (legacy token)."""

    def __init__(self, url: str, token: str):
        self.url = url
        self.s = requests.Session()
        self.s.headers["Authorization"] = f"Token {token}"

    def call(self, method: str, path: str, **kwargs):
        r = self.s.request(method, f"{self.url}{path}", timeout=kwargs.pop("timeout", 60), **kwargs)
        if r.status_code >= 400:
            raise RuntimeError(f"{method} {path}: HTTP {r.status_code} {r.text[:500]}")
        return r.json() if r.content else None

    def create_pat(self) -> str:
        return self.call("POST", "/api/token/")["token"]

    def create_project(self, title: str, label_config: str = DIGITS_LABEL_CONFIG) -> int:
        return self.call("POST", "/api/projects", json={"title": title, "label_config": label_config})["id"]

    def upload_images(self, project_id: int, data: DigitsProject, label_field: str = "label",
                      batch: int = 50, annotations: dict[int, list[dict]] | None = None) -> dict[int, int]:
        """Upload the PNGs, then import one task per image: {"image": "/data/upload/...",
        <label_field>: noisy label}.  Returns task id -> position in ``data``.

        ``annotations``: position in ``data`` -> the annotations imported with that task, as an
        export of an earlier team's project holds them (``result``, ``completed_by`` a member's id;
        without it, the importing user).  Label Studio counts them toward the task's overlap.

        The files are uploaded without creating tasks (commit_to_project=false) so that the
        tasks can be imported with their label in one request (a PATCH per task, or a POST per
        annotation, is slow: a quarter of a second each)."""
        urls: dict[str, str] = {}
        for start in range(0, len(data.files), batch):
            # one form field per file (Label Studio keeps one file per field name)
            files = [(f"file{n}", (name, png, mimetypes.guess_type(name)[0] or "application/octet-stream"))
                     for n, (name, png) in enumerate(data.files[start:start + batch])]
            body = self.call("POST", f"/api/projects/{project_id}/import", params={"commit_to_project": "false"},
                             files=files, timeout=300)
            for upload in self.call("GET", f"/api/projects/{project_id}/file-uploads",
                                    params={"ids": json.dumps(body["file_upload_ids"])}):
                urls[upload["file"].rsplit("/", 1)[-1].split("-", 1)[-1]] = f"/data/{upload['file']}"
        tasks = [{"data": {"image": urls[name], label_field: str(data.given[i])},
                  "annotations": (annotations or {}).get(i, [])} for i, (name, _) in enumerate(data.files)]
        self.call("POST", f"/api/projects/{project_id}/import", json=tasks, timeout=300)
        position = {urls[name]: i for i, (name, _) in enumerate(data.files)}
        mapping = {task["id"]: position[task["data"]["image"]] for task in self.tasks(project_id)}
        if len(mapping) != len(data.files):
            raise RuntimeError(f"uploaded {len(data.files)} images but the project has {len(mapping)} tasks")
        return mapping

    def tasks(self, project_id: int) -> list[dict]:
        out, page = [], 1
        while True:
            body = self.call("GET", "/api/tasks", params={"project": project_id, "page": page, "page_size": 100,
                                                          "fields": "all"})
            out.extend(body["tasks"])
            if len(out) >= body["total"] or not body["tasks"]:
                return out
            page += 1

    def connect_backend(self, project_id: int, backend_url: str, auth: tuple[str, str] | None = None,
                        title: str = "active-label-refinement") -> int:
        """Settings -> Model -> Connect model, with the backend's basic-auth credentials when given."""
        body = {"project": project_id, "url": backend_url, "title": title, "is_interactive": False}
        if auth:
            body.update(auth_method="BASIC_AUTH", basic_auth_user=auth[0], basic_auth_pass=auth[1])
        return self.call("POST", "/api/ml", json=body)["id"]

    def train(self, ml_id: int) -> None:
        self.call("POST", f"/api/ml/{ml_id}/train", json={})

    def project(self, project_id: int) -> dict:
        return self.call("GET", f"/api/projects/{project_id}")

    def predictions(self, project_id: int) -> list[dict]:
        return self.call("GET", "/api/predictions", params={"project": project_id})

    def wait_model_version(self, project_id: int, *, not_in: set[str] = frozenset(), timeout: float = 300) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            version = self.project(project_id).get("model_version") or ""
            if version.startswith("alr-v") and version not in not_in:
                return version
            time.sleep(1.0)
        raise TimeoutError(f"project {project_id} got no new model version within {timeout:.0f}s")


def build_demo_project(stack: Stack, ls: LS, data: DigitsProject, title: str = "Digits with noisy labels"):
    project_id = ls.create_project(title)
    mapping = ls.upload_images(project_id, data)
    ml_id = ls.connect_backend(project_id, stack.backend_url, stack.backend_auth)   # the backend sets the sampling
    return project_id, ml_id, mapping


def demo_pat(ls: "LS", pat_file: Path) -> str:
    """The demo user's personal access token, created once and kept in the workdir.

    Label Studio allows one PAT per user and answers 409 to a second request, so a
    re-run of the demo reuses the token it saved (owner-only file)."""
    if pat_file.exists():
        return pat_file.read_text().strip()
    try:
        pat = ls.create_pat()
    except RuntimeError as exc:
        if "HTTP 409" in str(exc):
            raise RuntimeError(f"the demo user already has a personal access token but {pat_file} is gone: "
                               "revoke it in Label Studio (Account & Settings) or start over with a new "
                               "--workdir") from None
        raise
    pat_file.write_text(pat)
    pat_file.chmod(0o600)
    return pat


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=str(REPO / "runs" / "demo"))
    parser.add_argument("--ls-port", type=int, default=8080)
    parser.add_argument("--backend-port", type=int, default=9090)
    parser.add_argument("--redis-port", type=int, default=0, help="default: a free port")
    parser.add_argument("--n-images", type=int, default=400)
    parser.add_argument("--noise-rate", type=float, default=0.2)
    parser.add_argument("--imbalance-ratio", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--exit-after-training", action="store_true", help="stop once the first version is in")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    workdir = Path(args.workdir)
    token_file = workdir / "ls-token"
    token = token_file.read_text().strip() if token_file.exists() else secrets.token_hex(20)
    workdir.mkdir(parents=True, exist_ok=True)
    token_file.write_text(token)
    stack = Stack(workdir, ls_port=args.ls_port, backend_port=args.backend_port, redis_port=args.redis_port,
                  token=token, task_lock_ttl=DEMO_TASK_LOCK_TTL)
    stop_on_signals()
    try:
        stack.start_redis()
        stack.start_label_studio()
        ls = LS(stack.ls_url, stack.token)
        pat = demo_pat(ls, workdir / "ls-pat")   # the backend authenticates like a real user's PAT would
        stack.start_backend(pat, {"ALR_IMAGE_SIZE": "16", "ALR_CHANNELS": "1", "ALR_EPOCHS": "20",
                                  "ALR_FINETUNE_EPOCHS": "5"})
        data = make_digits_project(n_images=args.n_images, imbalance_ratio=args.imbalance_ratio,
                                   noise_rate=args.noise_rate, seed=args.seed)
        project_id, ml_id, mapping = build_demo_project(stack, ls, data)
        truth = {tid: {"given": data.given[i], "true": data.truth[i]} for tid, i in mapping.items()}
        (workdir / f"project-{project_id}-truth.json").write_text(json.dumps(truth))
        ls.train(ml_id)
        print(f"\nTraining the first model version on {len(data.files)} images "
              f"({int(data.wrong.sum())} with a wrong label in data.label); the login is printed when it "
              f"is in (about a minute). Logs: {workdir}\n", flush=True)
        version = ls.wait_model_version(project_id, timeout=900)
        print(f"\nModel version {version} is in.\n"
              f"Label Studio: {stack.ls_url}/projects/{project_id}/data\n"
              f"login: {stack.username} / {stack.password}\n"
              f"backend: {stack.backend_url} (basic auth {stack.backend_user} / {stack.backend_password})\n"
              f"label-quality report: {stack.backend_url}/report?project={project_id} (the backend's login; "
              "open Label Studio first for the thumbnails)\n"
              f"the true labels are in {workdir}/project-{project_id}-truth.json\n"
              "Press \"Label All Tasks\": the most suspicious labels come first, the model's suggested "
              "label pre-selected. Ctrl-C stops everything.\n", flush=True)
        if not args.exit_after_training:
            while all(p.poll() is None for p in stack.procs.values()):
                time.sleep(1)
            print("a process exited; see the logs in", workdir, file=sys.stderr)
    except KeyboardInterrupt:
        pass
    finally:
        stack.stop()
    return 0


def stop_on_signals() -> None:
    """SIGTERM and SIGHUP stop the demo like Ctrl-C: the ``finally`` of main stops every process."""
    def interrupt(signum, frame):
        for other in (signal.SIGTERM, signal.SIGHUP):       # a second signal must not cut the clean-up short
            signal.signal(other, signal.SIG_IGN)
        raise KeyboardInterrupt(signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)


if __name__ == "__main__":
    sys.exit(main())
