"""docker/: the compose file, the Dockerfile and .env.example, checked against the code.

Docker does not run here, so nothing is built or started: the files are parsed and every name
they use is looked up in the code as it is now.  What the code reads is derived at test time
(ml_backend.settings._ENV, plus every os.environ / os.getenv read with a literal name in
ml_backend/ and model/), so a new variable, a renamed entry point or a moved port makes one of
these tests fail and say what to add where.
"""
from __future__ import annotations

import ast
import importlib
import importlib.metadata
import importlib.util
import inspect
import posixpath
import re
import shlex
from pathlib import Path

import pytest
import yaml  # PyYAML (in the venv; setup.py's test extras should declare it)

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
COMPOSE_FILE = DOCKER / "docker-compose.yml"
ENV_EXAMPLE = DOCKER / ".env.example"
DOCKERFILE = DOCKER / "Dockerfile"
CODE_DIRS = ("ml_backend", "model")

BACKEND = "backend"
WORKERS = ("worker", "worker-gpu")
APP_SERVICES = (BACKEND, *WORKERS)      # services running this project's image
# Settings whose value in the stack differs from the code default on purpose (container paths,
# service names on the private network, redis always on).
STACK_OVERRIDES = {"LABEL_STUDIO_URL", "LABEL_STUDIO_PUBLIC_URL", "REDIS_URL", "REDIS_HOST", "MODEL_DIR", "ALR_IMAGE_CACHE_DIR", "ALR_USE_REDIS",
                   "BASIC_AUTH_USER", "BASIC_AUTH_PASS"}   # the stack turns auth on; the code alone does not


# ---------------------------------------------------------------------------------------------
# parsing helpers


def _interpolate(text: str, env: dict[str, str], used: set[str] | None = None) -> str:
    """Compose variable interpolation: $$, $NAME, ${NAME}, ${NAME:-d}, ${NAME-d}, ${NAME:?e}, nested."""
    out, i = [], 0
    while i < len(text):
        ch = text[i]
        if ch != "$":
            out.append(ch)
            i += 1
            continue
        if text.startswith("$$", i):
            out.append("$")
            i += 2
            continue
        if text.startswith("${", i):
            depth, j = 1, i + 2
            while j < len(text) and depth:
                if text.startswith("${", j):
                    depth, j = depth + 1, j + 2
                    continue
                depth += {"{": 0, "}": -1}.get(text[j], 0)
                j += 1
            if depth:
                raise ValueError(f"unbalanced ${{...}} in {text!r}")
            body = text[i + 2: j - 1]
            m = re.match(r"([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])(.*))?$", body, re.S)
            if not m:
                raise ValueError(f"cannot parse ${{{body}}} in {text!r}")
            name, op, arg = m.group(1), m.group(2), m.group(3) or ""
            if used is not None:
                used.add(name)
            value = env.get(name)
            empty = value is None or (op is not None and op.startswith(":") and value == "")
            if op in (":-", "-"):
                out.append(_interpolate(arg, env, used) if empty else value)
            elif op in (":?", "?"):
                if empty:
                    raise ValueError(f"required variable {name} is missing: {arg}")
                out.append(value)
            elif op in (":+", "+"):
                out.append("" if empty else _interpolate(arg, env, used))
            else:
                out.append(value or "")
            i = j
            continue
        m = re.match(r"\$([A-Za-z_][A-Za-z0-9_]*)", text[i:])
        if m:
            if used is not None:
                used.add(m.group(1))
            out.append(env.get(m.group(1), ""))
            i += m.end()
            continue
        out.append(ch)
        i += 1
    return "".join(out)


def _walk_strings(node, used: set[str]) -> None:
    if isinstance(node, str):
        _interpolate(node, REQUIRED_SECRETS, used)
    elif isinstance(node, dict):
        for key, value in node.items():
            _walk_strings(key, used)
            _walk_strings(value, used)
    elif isinstance(node, list):
        for value in node:
            _walk_strings(value, used)


def _resolve(node, env: dict[str, str]):
    """The compose model after interpolation with ``env`` (defaults where unset)."""
    if isinstance(node, str):
        return _interpolate(node, env)
    if isinstance(node, dict):
        return {_resolve(k, env): _resolve(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve(v, env) for v in node]
    return node


def _env_example() -> tuple[dict[str, str], dict[str, str]]:
    """(active NAME=value lines, documented-only "# NAME=value" lines) of docker/.env.example."""
    active, documented = {}, {}
    for raw in ENV_EXAMPLE.read_text().splitlines():
        line = raw.strip()
        m = re.match(r"^([A-Z][A-Z0-9_]*)=(.*)$", line)
        if m:
            active[m.group(1)] = m.group(2)
            continue
        m = re.match(r"^#\s*([A-Z][A-Z0-9_]*)=(.*)$", line)
        if m:
            documented[m.group(1)] = m.group(2)
    return active, documented


def _service_env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def _command(service: dict) -> list[str]:
    cmd = service.get("command")
    if cmd is None:
        return []
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def _shell_words(cmd: list[str]) -> list[str]:
    """The argv a `sh -c "exec ..."` command runs (variables left as $NAME)."""
    if len(cmd) >= 3 and cmd[0] in ("sh", "/bin/sh", "bash") and cmd[1] == "-c":
        words = shlex.split(cmd[2])
        return words[1:] if words and words[0] == "exec" else words
    return cmd


def _code_env_reads() -> dict[str, str]:
    """Variables the code reads: {name: where}.  Settings._ENV plus literal os.environ/getenv reads."""
    settings = importlib.import_module("ml_backend.settings")
    reads = {var: "ml_backend/settings.py _ENV" for var, _ in settings._ENV.values()}
    for folder in CODE_DIRS:
        for path in sorted((REPO / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                name = None
                if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
                    func = node.func
                    if isinstance(func, ast.Attribute) and func.attr in ("get", "setdefault", "pop") \
                            and _is_environ(func.value):
                        name = node.args[0].value
                    elif isinstance(func, ast.Attribute) and func.attr == "getenv":
                        name = node.args[0].value
                elif isinstance(node, ast.Subscript) and _is_environ(node.value) \
                        and isinstance(node.slice, ast.Constant):
                    name = node.slice.value
                elif isinstance(node, ast.Compare) and isinstance(node.left, ast.Constant) \
                        and any(isinstance(op, (ast.In, ast.NotIn)) for op in node.ops) \
                        and any(_is_environ(c) for c in node.comparators):
                    name = node.left.value
                # a variable's name, not a WSGI environ key such as "wsgi.input"
                if isinstance(name, str) and re.fullmatch(r"[A-Z_][A-Z0-9_]*", name):
                    reads.setdefault(name, f"{path.relative_to(REPO)}:{node.lineno}")
    return reads


def _is_environ(node) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "environ") or \
        (isinstance(node, ast.Name) and node.id == "environ")


def _mounts(service: dict, top_volumes: dict) -> list[tuple[str, str]]:
    """(source, container path) of each mount of a service."""
    result = []
    for item in service.get("volumes") or []:
        if isinstance(item, dict):
            result.append((str(item.get("source", "")), str(item["target"])))
        else:
            parts = str(item).split(":")
            if len(parts) == 1:
                result.append(("", parts[0]))
            else:
                result.append((parts[0], parts[1]))
    return result


def _inside(path: str, root: str) -> bool:
    path, root = posixpath.normpath(path), posixpath.normpath(root)
    return path == root or path.startswith(root.rstrip("/") + "/")


def _parse_port(spec) -> tuple[str | None, str | None, str]:
    """(host ip, host port, container port) of a short-syntax port mapping."""
    if isinstance(spec, dict):
        return spec.get("host_ip"), str(spec.get("published", "")), str(spec["target"])
    parts = str(spec).split("/")[0].split(":")
    if len(parts) == 3:
        return parts[0], parts[1], parts[2]
    if len(parts) == 2:
        return None, parts[0], parts[1]
    return None, None, parts[0]


def _urls(test) -> list[str]:
    text = " ".join(test) if isinstance(test, list) else str(test)
    return re.findall(r"https?://[^\s'\"]+", text)


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines, current = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        if raw.lstrip().startswith("#") and not current:
            continue
        if raw.rstrip().endswith("\\"):
            current += raw.rstrip()[:-1] + " "
            continue
        current += raw
        if current.strip():
            word, _, rest = current.strip().partition(" ")
            lines.append((word.upper(), rest.strip()))
        current = ""
    return lines


# ---------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def raw_compose() -> dict:
    assert COMPOSE_FILE.is_file(), f"{COMPOSE_FILE.relative_to(REPO)} is missing"
    return yaml.safe_load(COMPOSE_FILE.read_text())


REQUIRED_SECRETS = {"BASIC_AUTH_PASS": "generated-in-docker-env", "POSTGRES_PASSWORD": "generated-db-password"}


@pytest.mark.parametrize("secret", sorted(REQUIRED_SECRETS))
def test_compose_refuses_to_start_without_each_password(raw_compose, secret):
    others = {name: value for name, value in REQUIRED_SECRETS.items() if name != secret}
    with pytest.raises(ValueError, match=secret):
        _resolve(raw_compose, others)


@pytest.fixture(scope="module")
def compose(raw_compose) -> dict:
    """The compose model interpolated with a .env holding only the required secrets (every
    ${NAME:-default} at its default; ${BASIC_AUTH_PASS:?...} makes compose refuse to start without one)."""
    return _resolve(raw_compose, REQUIRED_SECRETS)


@pytest.fixture(scope="module")
def code_env() -> dict[str, str]:
    return _code_env_reads()


# ---------------------------------------------------------------------------------------------
# services and their commands


def test_expected_services_exist(compose):
    services = compose.get("services") or {}
    missing = [s for s in ("label-studio", "postgres", "redis", *APP_SERVICES) if s not in services]
    assert not missing, f"docker-compose.yml has no service(s) {missing}; found {sorted(services)}"


def test_backend_command_is_gunicorn_serving_an_app_that_imports(compose, tmp_path, monkeypatch):
    cmd = _shell_words(_command(compose["services"][BACKEND]))
    assert cmd and cmd[0] == "gunicorn", f"backend command must start with gunicorn, got {cmd}"
    scripts = {ep.name for ep in importlib.metadata.entry_points(group="console_scripts")}
    assert "gunicorn" in scripts, "the gunicorn console script is not installed (setup.py install_requires)"
    app_spec = cmd[-1]
    assert ":" in app_spec, f"the last argument of the backend command must be MODULE:APP, got {app_spec!r}"
    module_name = app_spec.split(":", 1)[0]
    assert importlib.util.find_spec(module_name) is not None, \
        f"backend command serves {app_spec!r} but module {module_name!r} does not exist"

    # resolve it exactly as gunicorn does, with the environment isolated from the repository
    from gunicorn.util import import_app

    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("ALR_USE_REDIS", "false")
    module = importlib.import_module(module_name)
    if hasattr(module, "_app"):                  # lazily built app: build a fresh one for this test
        monkeypatch.setattr(module, "_app", None)
    try:
        app = import_app(app_spec)
    except Exception as exc:                     # gunicorn's AppImportError, ImportError, ...
        pytest.fail(f"gunicorn cannot load the backend's app {app_spec!r}: {type(exc).__name__}: {exc}")
    assert callable(app), f"{app_spec} is not a WSGI callable"
    rules = {rule.rule: rule.methods for rule in app.url_map.iter_rules()} if hasattr(app, "url_map") else {}
    assert "GET" in rules.get("/health", set()), \
        f"{app_spec} has no GET /health route (the health checks call it); routes: {sorted(rules)}"


def test_worker_commands_run_the_training_worker_on_the_job_queue(compose):
    from ml_backend import worker
    from ml_backend.training_queue import RQTrainingQueue

    for name in WORKERS:
        service = compose["services"][name]
        words = _shell_words(_command(service))
        assert words[:3] == ["python", "-m", "ml_backend.worker"], \
            f"{name}: command must run `python -m ml_backend.worker ...`, got {words}"
        worker.build_parser().parse_args(words[3:])          # options the worker takes
        env = _service_env(service)
        queues = [w for w in words[3:] if not w.startswith("-")]
        url_idx = [i for i, w in enumerate(words) if w in ("--url", "-u")]
        url_args = {words[i + 1] for i in url_idx}
        queues = [q for q in queues if q not in url_args]
        assert queues == ["$RQ_QUEUE_NAME"], \
            f"{name}: the worker must listen on $RQ_QUEUE_NAME (the queue the backend enqueues on), got {queues}"
        assert "RQ_QUEUE_NAME" in env, f"{name}: RQ_QUEUE_NAME is not in its environment"
        assert url_args == {"$REDIS_URL"}, \
            f"{name}: the worker's --url must be $REDIS_URL (what the backend connects with), got {url_args}"
        assert env.get("REDIS_URL"), f"{name}: REDIS_URL must be set (the command passes it)"

    job_func = inspect.signature(RQTrainingQueue.__init__).parameters["job_func"].default
    module_name, _, func_name = job_func.rpartition(".")
    module = importlib.import_module(module_name)
    assert callable(getattr(module, func_name, None)), \
        f"the rq job {job_func} (RQTrainingQueue's job_func) does not exist: workers would fail every job"


def test_backend_and_workers_agree_on_queue_and_redis(compose):
    services = compose["services"]
    backend_env = _service_env(services[BACKEND])
    for name in WORKERS:
        env = _service_env(services[name])
        for var in ("RQ_QUEUE_NAME", "REDIS_URL", "REDIS_HOST", "REDIS_PORT", "REDIS_DB", "MODEL_DIR",
                    "LABEL_STUDIO_URL"):
            assert env.get(var) == backend_env.get(var), \
                f"{var} differs between {BACKEND} ({backend_env.get(var)!r}) and {name} ({env.get(var)!r})"
        assert env.get("ALR_USE_REDIS", "true").lower() in ("1", "true", "yes", "on")
    assert backend_env.get("ALR_USE_REDIS", "true").lower() in ("1", "true", "yes", "on"), \
        "the backend must use redis in the stack (ALR_USE_REDIS=false trains inside gunicorn)"
    redis_url = backend_env["REDIS_URL"]
    host = re.match(r"rediss?://(?:[^@/]*@)?([^:/]+)", redis_url)
    assert host and host.group(1) in services, \
        f"REDIS_URL {redis_url!r} does not point at a service of the stack by default"


def test_train_module_for_torchrun_exists():
    spec = importlib.util.find_spec("model.train")
    assert spec is not None, "python -m model.train (the torchrun entry) does not exist"
    source = Path(spec.origin).read_text()
    assert "__main__" in source and "def main" in source, "model/train.py has no main() / __main__ guard"
    readme = DOCKER / "README.md"
    if readme.is_file():
        for module_name in set(re.findall(r"-m\s+([A-Za-z_][\w.]*)", readme.read_text())):
            if module_name.split(".")[0] in CODE_DIRS:
                assert importlib.util.find_spec(module_name) is not None, \
                    f"docker/README.md runs `-m {module_name}`, which does not exist"


# ---------------------------------------------------------------------------------------------
# environment variables


def test_every_variable_the_code_reads_is_set_or_documented(compose, code_env):
    active, documented = _env_example()
    example = set(active) | set(documented)
    problems = []
    for name in APP_SERVICES:
        env = set(_service_env(compose["services"][name]))
        missing = {var: where for var, where in code_env.items() if var not in env and var not in example}
        for var, where in sorted(missing.items()):
            problems.append(f"{var} (read at {where}) is neither in service {name}'s environment "
                            f"in docker/docker-compose.yml nor in docker/.env.example")
    assert not problems, "\n".join(problems)


def test_env_example_and_compose_interpolation_match(raw_compose):
    active, documented = _env_example()
    used: set[str] = set()
    _walk_strings(raw_compose, used)
    not_passed = sorted(set(active) - used)
    assert not not_passed, (f"docker/.env.example sets {not_passed}, but docker-compose.yml never uses "
                            f"them (${{NAME}}): setting them would change nothing")
    undocumented = sorted(used - set(active))
    assert not undocumented, (f"docker-compose.yml interpolates {undocumented}, which docker/.env.example "
                              f"does not list as NAME=default")
    both = sorted(set(active) & set(documented))
    assert not both, f"docker/.env.example both sets and documents-as-unset {both}"


def test_env_example_values_are_the_stack_defaults(raw_compose):
    """A value in .env.example must be what the stack uses without it (the file says so)."""
    active, _ = _env_example()
    defaults = {}

    def collect(node):
        if isinstance(node, str):
            for m in re.finditer(r"\$\{([A-Za-z_][A-Za-z0-9_]*):?-", node):
                # the default of the outermost ${NAME:-...}: interpolate the expression alone
                start = m.start()
                depth, j = 0, start
                while j < len(node):
                    if node.startswith("${", j):
                        depth, j = depth + 1, j + 2
                        continue
                    if node[j] == "}":
                        depth -= 1
                        if depth == 0:
                            break
                    j += 1
                defaults.setdefault(m.group(1), _interpolate(node[start:j + 1], {}))
        elif isinstance(node, dict):
            for v in node.values():
                collect(v)
        elif isinstance(node, list):
            for v in node:
                collect(v)

    collect(raw_compose)
    wrong = [f"{name}: .env.example says {value!r}, docker-compose.yml defaults to {defaults[name]!r}"
             for name, value in active.items() if value and name in defaults and defaults[name] != value]
    assert not wrong, "\n".join(wrong)


def test_stack_defaults_match_the_code_defaults(compose):
    from ml_backend.settings import _ENV, Settings

    defaults = Settings()
    env = _service_env(compose["services"][BACKEND])
    wrong = []
    for field_name, (var, conv) in _ENV.items():
        if var in STACK_OVERRIDES or not env.get(var):
            continue
        value, default = conv(env[var]), getattr(defaults, field_name)
        if value != default:
            wrong.append(f"{var}: the stack sets {env[var]!r}, the code's default is {default!r} "
                         f"(update docker-compose.yml and .env.example, or add it to STACK_OVERRIDES)")
    assert not wrong, "\n".join(wrong)
    Settings.from_env(env)      # and the stack's values are valid settings


# ---------------------------------------------------------------------------------------------
# ports and health checks


def _gunicorn_bind(compose) -> tuple[str, str]:
    cmd = _shell_words(_command(compose["services"][BACKEND]))
    for i, word in enumerate(cmd):
        if word in ("--bind", "-b"):
            host, _, port = cmd[i + 1].rpartition(":")
            return host, port
        if word.startswith("--bind="):
            host, _, port = word.split("=", 1)[1].rpartition(":")
            return host, port
    raise AssertionError(f"the backend's gunicorn command has no --bind: {cmd}")


def test_backend_port_is_consistent(compose):
    service = compose["services"][BACKEND]
    host, port = _gunicorn_bind(compose)
    assert host == "0.0.0.0", \
        f"gunicorn binds {host}:{port}; inside a container it must bind 0.0.0.0 to be reachable on the network"
    env = _service_env(service)
    assert env.get("ALR_PORT", port) == port, \
        f"ALR_PORT={env.get('ALR_PORT')} but gunicorn binds port {port}"
    container_ports = {_parse_port(p)[2] for p in service.get("ports") or []}
    assert container_ports <= {port}, \
        f"backend publishes container port(s) {sorted(container_ports)} but gunicorn binds {port}"
    urls = _urls(service["healthcheck"]["test"])
    assert urls, f"backend healthcheck calls no URL: {service['healthcheck']['test']}"
    for url in urls:
        m = re.match(r"https?://([^/:]+)(?::(\d+))?(/[^?]*)?", url)
        assert m.group(2) == port, f"backend healthcheck calls {url}, gunicorn binds port {port}"
        assert m.group(3) == "/health", f"backend healthcheck calls {url}, not /health"


def test_published_ports_bind_loopback_only(compose):
    problems = []
    for name, service in compose["services"].items():
        for spec in service.get("ports") or []:
            ip, published, _ = _parse_port(spec)
            if ip != "127.0.0.1" or not published:
                problems.append(f"{name}: port {spec!r} is not published on 127.0.0.1 only")
    assert not problems, "\n".join(problems)


def test_health_checks(compose):
    services = compose["services"]
    for name in ("redis", BACKEND, *WORKERS):
        assert (services[name].get("healthcheck") or {}).get("test"), f"{name} has no healthcheck"
    assert "ping" in " ".join(services["redis"]["healthcheck"]["test"]), "redis healthcheck must be redis-cli ping"
    for name in APP_SERVICES:
        condition = ((services[name].get("depends_on") or {}).get("redis") or {}).get("condition")
        assert condition == "service_healthy", f"{name} must depend on redis with condition service_healthy"
    instructions = _dockerfile_instructions()
    checks = [args for word, args in instructions if word == "HEALTHCHECK"]
    assert checks and "/health" in checks[-1], "docker/Dockerfile's HEALTHCHECK must call the backend's /health"
    ls_env = _service_env(services["label-studio"])
    for var in ("ML_BLOCK_LOCAL_IP", "SSRF_PROTECTION_ENABLED"):
        assert ls_env.get(var, "").lower() == "false", \
            f"label-studio needs {var}=false, or it refuses the backend on the private network"


def test_label_studio_runs_on_the_postgres_service(compose):
    """On SQLite Label Studio takes the next task outside a transaction: two reviewers pressing "Label
    All Tasks" at once can get the same suspect.  The stack's Label Studio uses the postgres service,
    with that service's credentials, once it is ready, and the database stays private and persistent."""
    services = compose["services"]
    ls_env, db = _service_env(services["label-studio"]), services["postgres"]
    db_env = _service_env(db)
    assert ls_env.get("DJANGO_DB") == "default", "DJANGO_DB=default is Label Studio's name for PostgreSQL"
    assert ls_env.get("POSTGRE_HOST") == "postgres" and ls_env.get("POSTGRE_PORT") == "5432"
    assert (ls_env.get("POSTGRE_NAME"), ls_env.get("POSTGRE_USER"), ls_env.get("POSTGRE_PASSWORD")) == \
        (db_env["POSTGRES_DB"], db_env["POSTGRES_USER"], db_env["POSTGRES_PASSWORD"])
    assert db_env["POSTGRES_PASSWORD"] == REQUIRED_SECRETS["POSTGRES_PASSWORD"]
    condition = ((services["label-studio"].get("depends_on") or {}).get("postgres") or {}).get("condition")
    assert condition == "service_healthy", "label-studio must wait for postgres to be healthy (it migrates at start)"
    assert "pg_isready" in " ".join(db["healthcheck"]["test"])
    assert not db.get("ports"), "postgres must not be published: only Label Studio talks to it"
    assert db.get("networks") == services["label-studio"].get("networks")
    assert any(target == "/var/lib/postgresql/data" and source in (compose.get("volumes") or {})
               for source, target in _mounts(db, compose.get("volumes") or {})), \
        "postgres's data directory must be a declared volume"


def test_label_studio_reserves_a_served_task_for_minutes_not_a_day(compose):
    from ml_backend.demo import DEMO_TASK_LOCK_TTL

    ttl = _service_env(compose["services"]["label-studio"]).get("TASK_LOCK_TTL")
    assert ttl is not None and int(ttl) == DEMO_TASK_LOCK_TTL, \
        f"label-studio's TASK_LOCK_TTL is {ttl!r}: without it a look before the first version locks a task for a day"


# ---------------------------------------------------------------------------------------------
# volumes


def test_volumes_are_declared_and_data_dirs_are_mounted(compose):
    top = compose.get("volumes") or {}
    problems = []
    for name, service in compose["services"].items():
        for source, target in _mounts(service, top):
            if source and not source.startswith((".", "/", "~")) and source not in top:
                problems.append(f"{name} mounts volume {source!r} at {target}, not declared under top-level volumes")
    mounts_of = {name: _mounts(compose["services"][name], top) for name in APP_SERVICES}
    from ml_backend.settings import Settings

    for name in APP_SERVICES:
        settings = Settings.from_env(_service_env(compose["services"][name]))
        for label, path in (("MODEL_DIR", settings.model_dir), ("image cache", settings.cache_dir)):
            if not path.startswith("/"):
                problems.append(f"{name}: {label} {path!r} must be an absolute path inside a volume")
                continue
            if not any(_inside(path, target) for _, target in mounts_of[name]):
                problems.append(f"{name}: {label} {path} is not inside any mounted volume (lost on restart)")
    # the backend serves what the workers train: the same volume at the same MODEL_DIR
    backend_settings = Settings.from_env(_service_env(compose["services"][BACKEND]))
    backend_src = {src for src, target in mounts_of[BACKEND] if _inside(backend_settings.model_dir, target)}
    for name in WORKERS:
        settings = Settings.from_env(_service_env(compose["services"][name]))
        src = {s for s, target in mounts_of[name] if _inside(settings.model_dir, target)}
        if src != backend_src:
            problems.append(f"{name} keeps models in volume {sorted(src)}, the backend reads {sorted(backend_src)}")
    redis = compose["services"]["redis"]
    if "appendonly" not in " ".join(_command(redis)) or "yes" not in _command(redis):
        problems.append("redis must run with --appendonly yes (persistence)")
    if not any(target == "/data" for _, target in _mounts(redis, top)):
        problems.append("redis's /data (where the append-only file lives) is not a volume")
    if not any(_inside("/label-studio/data", t) for _, t in _mounts(compose["services"]["label-studio"], top)):
        problems.append("label-studio's /label-studio/data is not a volume")
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------------
# the image


def test_dockerfile_matches_the_build(compose):
    problems = []
    declared_args = set()
    copies = []
    users = []
    for word, args in _dockerfile_instructions():
        if word == "ARG":
            declared_args.add(args.split("=", 1)[0].strip())
        elif word in ("COPY", "ADD"):
            parts = [p for p in shlex.split(args) if not p.startswith("--")]
            if not any(p.startswith("--from") for p in shlex.split(args)):
                copies.extend(parts[:-1])
        elif word == "USER":
            users.append(args.split(":")[0])
    if not users or users[-1] in ("root", "0"):
        problems.append("docker/Dockerfile must switch to a non-root USER")
    contexts = set()
    for name in APP_SERVICES:
        build = compose["services"][name].get("build")
        if not build:
            continue
        context = (COMPOSE_FILE.parent / build.get("context", ".")).resolve()
        contexts.add(context)
        dockerfile = context / build.get("dockerfile", "Dockerfile")
        if dockerfile.resolve() != DOCKERFILE.resolve():
            problems.append(f"{name} builds {dockerfile}, not docker/Dockerfile")
        for arg in (build.get("args") or {}):
            if arg not in declared_args:
                problems.append(f"{name} passes build arg {arg}, which docker/Dockerfile does not declare")
    assert contexts, f"none of {APP_SERVICES} has a build section"
    for context in sorted(contexts):
        for src in copies:
            if not (context / src).exists():
                problems.append(f"docker/Dockerfile copies {src!r}, which does not exist in the context {context}")
    ignore = DOCKERFILE.with_name(DOCKERFILE.name + ".dockerignore")
    if ignore.is_file():
        patterns = [p.strip() for p in ignore.read_text().splitlines() if p.strip() and not p.startswith("#")]
        if patterns and patterns[0] == "**":
            allowed = {p[1:].rstrip("/").removesuffix("/**") for p in patterns if p.startswith("!")}
            for src in copies:
                if src.rstrip("/") not in allowed:
                    problems.append(f"docker/Dockerfile copies {src!r}, which {ignore.name} leaves out")
    assert not problems, "\n".join(problems)


def test_gpu_worker_reserves_an_nvidia_gpu_under_a_profile(compose):
    service = compose["services"]["worker-gpu"]
    assert "gpu" in (service.get("profiles") or []), "worker-gpu must be under the compose profile 'gpu'"
    devices = (((service.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices")
    assert devices and any(d.get("driver") == "nvidia" and "gpu" in (d.get("capabilities") or [])
                           for d in devices), "worker-gpu must reserve devices with driver nvidia, capabilities [gpu]"
    assert (service.get("build") or {}).get("args", {}).get("VARIANT") == "gpu", \
        "worker-gpu must build the image with VARIANT=gpu"
    assert "profiles" not in compose["services"]["worker"], "the CPU worker must run by default (no profile)"
