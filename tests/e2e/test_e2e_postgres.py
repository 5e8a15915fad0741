"""Label Studio on PostgreSQL, configured as docker/docker-compose.yml configures it: reviewers who
press "Label All Tasks" at the very same moment are served different suspects.

Label Studio 1.23.2 takes the next task inside a transaction that locks it only on PostgreSQL; on
SQLite it skips the transaction (``projects/functions/next_task.py``,
``conditional_atomic(predicate=db_is_not_sqlite)``).  Measured by hand on 2026-12-01 with this
test's method (pairs of reviewers released by one barrier): 3 of 15 pairs got the same task on
SQLite, 0 of 15 on PostgreSQL.  That is why the compose stack runs a ``postgres`` service.

The database settings Label Studio gets here are the compose file's (``DJANGO_DB`` and
``POSTGRE_*`` of its label-studio service), with the host, port and password of a throwaway
PostgreSQL cluster on loopback (Debian package ``postgresql``, started by the test), so that a
wrong variable name in the compose file fails here.  It needs its own Label Studio (about a minute
to migrate a new database), not the session's SQLite one.
"""
from __future__ import annotations

import glob
import os
import secrets
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest
import requests
import yaml

from ml_backend.demo import LS, REPO, Stack, free_port
from tests.test_docker_compose import COMPOSE_FILE, REQUIRED_SECRETS, _resolve, _service_env

pytestmark = pytest.mark.e2e

PAIRS = 12
CHOICES = '<Choice value="a"/><Choice value="b"/>'
LABEL_CONFIG = (f'<View><Image name="image" value="$image"/><Choices name="label" toName="image">{CHOICES}'
                '</Choices></View>')


def _postgres_bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(p.split("/")[4]))
    return found[-1] if found else shutil.which(name)


@pytest.fixture(scope="module")
def compose_database_env() -> dict[str, str]:
    """Label Studio's database settings in the compose file, interpolated with its defaults."""
    compose = _resolve(yaml.safe_load(COMPOSE_FILE.read_text()), REQUIRED_SECRETS)
    env = _service_env(compose["services"]["label-studio"])
    return {key: value for key, value in env.items() if key == "DJANGO_DB" or key.startswith("POSTGRE_")}


@pytest.fixture(scope="module")
def postgres(compose_database_env):
    """A PostgreSQL cluster on a free loopback port with the compose file's database and user."""
    initdb, pg_ctl = _postgres_bin("initdb"), _postgres_bin("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("PostgreSQL is not installed: apt-get install postgresql (scripts/setup.sh --label-studio does)")
    # initdb refuses to run as root: the cluster belongs to the postgres user then
    as_owner = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    root = Path(tempfile.mkdtemp(prefix="alr-postgres-"))
    password = secrets.token_urlsafe(16)
    (root / "pwfile").write_text(password + "\n")
    if as_owner:
        shutil.chown(root, "postgres")
        shutil.chown(root / "pwfile", "postgres")
    data, port = root / "data", free_port()
    user, database = compose_database_env["POSTGRE_USER"], compose_database_env["POSTGRE_NAME"]
    subprocess.run([*as_owner, initdb, "-D", str(data), "-U", user, "--auth=scram-sha-256",
                    f"--pwfile={root / 'pwfile'}"], check=True, capture_output=True)
    subprocess.run([*as_owner, pg_ctl, "-D", str(data), "-l", str(root / "server.log"), "-w", "start", "-o",
                    f"-p {port} -k {root} -c listen_addresses=127.0.0.1"], check=True, capture_output=True)
    try:
        subprocess.run([_postgres_bin("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", user,
                        database], check=True, capture_output=True, env=dict(os.environ, PGPASSWORD=password))
        yield {"host": "127.0.0.1", "port": port, "password": password}
    finally:
        subprocess.run([*as_owner, pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def label_studio_on_postgres(tmp_path_factory, postgres, compose_database_env):
    if not (REPO / ".ls-venv" / "bin" / "label-studio").exists():
        pytest.skip("Label Studio is not installed: bash scripts/setup_label_studio.sh")
    database = dict(compose_database_env, POSTGRE_HOST=postgres["host"], POSTGRE_PORT=str(postgres["port"]),
                    POSTGRE_PASSWORD=postgres["password"])
    stack = Stack(tmp_path_factory.mktemp("label-studio-postgres"), task_lock_ttl=300, label_studio_env=database)
    try:
        stack.start_label_studio()
        yield stack
    finally:
        stack.stop()


def _tasks_in_postgres(postgres, compose_database_env) -> int:
    """Tasks counted in the PostgreSQL database itself: Label Studio really stores them there."""
    psql = _postgres_bin("psql")
    out = subprocess.run([psql, "-h", postgres["host"], "-p", str(postgres["port"]), "-U",
                          compose_database_env["POSTGRE_USER"], "-d", compose_database_env["POSTGRE_NAME"], "-tAc",
                          "select count(*) from task"], check=True, capture_output=True, text=True,
                         env=dict(os.environ, PGPASSWORD=postgres["password"]))
    return int(out.stdout.strip())


def _add_reviewers(stack: Stack, count: int) -> list[str]:
    """``count`` members of the organisation, each with an API token (Django's shell, as an admin would)."""
    tokens = [secrets.token_hex(20) for _ in range(count)]
    code = ("from users.models import User\nfrom organizations.models import Organization\n"
            "from rest_framework.authtoken.models import Token\norg = Organization.objects.first()\n"
            f"for i, key in enumerate({tokens!r}):\n"
            "    user = User.objects.create_user(email=f'reviewer{i}@example.com', password=key)\n"
            "    org.add_user(user); user.active_organization = org; user.save()\n"
            "    Token.objects.filter(key=user.auth_token.key).update(key=key)\n")
    package = next((REPO / ".ls-venv" / "lib").glob("python*/site-packages/label_studio"))
    env = dict(stack.ls_env(), DJANGO_SETTINGS_MODULE="core.settings.label_studio")
    subprocess.run([str(REPO / ".ls-venv" / "bin" / "python"), "manage.py", "shell", "-c", code], cwd=package,
                   env=env, check=True, capture_output=True, timeout=300)
    return tokens


def test_reviewers_pressing_at_the_same_moment_get_different_suspects(label_studio_on_postgres, postgres,
                                                                       compose_database_env):
    stack = label_studio_on_postgres
    admin = LS(stack.ls_url, stack.token)
    pid = admin.create_project("simultaneous review", LABEL_CONFIG)
    # scored as the backend scores them (lower = review sooner), under the project's model version
    tasks = [{"data": {"image": f"{stack.ls_url}/static/images/{i}.png"},
              "predictions": [{"model_version": "v1", "score": i / (3 * PAIRS), "result": []}]}
             for i in range(3 * PAIRS)]
    admin.call("POST", f"/api/projects/{pid}/import", json=tasks)
    admin.call("PATCH", f"/api/projects/{pid}", json={"sampling": "Uncertainty sampling", "model_version": "v1"})
    assert _tasks_in_postgres(postgres, compose_database_env) == 3 * PAIRS
    tokens = _add_reviewers(stack, 2 * PAIRS)

    served: list[tuple[int, int]] = []
    for pair in range(PAIRS):
        got: list[int | str] = [0, 0]
        start = threading.Barrier(2)

        def press(k: int) -> None:
            session = requests.Session()
            session.headers["Authorization"] = f"Token {tokens[2 * pair + k]}"
            start.wait()
            response = session.get(f"{stack.ls_url}/api/projects/{pid}/next", timeout=60)
            got[k] = response.json()["id"] if response.ok else f"HTTP {response.status_code}: {response.text[:200]}"

        threads = [threading.Thread(target=press, args=(k,)) for k in (0, 1)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert all(isinstance(task, int) for task in got), got
        served.append((got[0], got[1]))
    print(f"tasks served to {PAIRS} pairs pressing at once: {served}")
    same = [pair for pair in served if pair[0] == pair[1]]
    assert not same, f"{len(same)} of {PAIRS} pairs pressing at the same moment got the same task: {same}"
    every = [task for pair in served for task in pair]
    assert len(set(every)) == len(every), f"a task locked to one reviewer was served to another: {served}"
