"""A small Label Studio API client (plain requests) for the training job and /health.

Two kinds of LABEL_STUDIO_API_KEY are accepted:

* a personal access token (PAT): a JWT refresh token.  It is exchanged at
  ``POST /api/token/refresh/`` for a short-lived access token sent as ``Bearer``; on a
  401 the exchange is repeated once.
* a legacy token (40 hex characters), sent as ``Authorization: Token <key>``.  Label
  Studio 1.23.2 refuses these unless legacy tokens are enabled for the organisation.

The kind is guessed from the key's shape (a JWT has three dot-separated parts); when the
guess is refused with 401 the other kind is tried once.  The key is never logged: errors
name the URL and the status only.
"""
from __future__ import annotations

import ipaddress
import json
import logging
import re
import socket
import time
from typing import Callable, Iterator, Sequence, TypeVar
from urllib.parse import urljoin, urlparse

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

logger = logging.getLogger(__name__)


class LabelStudioError(RuntimeError):
    """A Label Studio API call failed (the message has the method, path and status).

    ``unreachable``: no answer came (connection refused or dropped, timeout), as when the
    server went away; :attr:`transient` says whether the same call may work later.
    ``untrusted_certificate``: the server's TLS certificate was refused (not transient: asking
    again changes nothing until REQUESTS_CA_BUNDLE names the CA that signed it).
    """

    def __init__(self, message: str, status: int | None = None, *, unreachable: bool = False,
                 untrusted_certificate: bool = False):
        super().__init__(message)
        self.status = status
        self.unreachable = unreachable
        self.untrusted_certificate = untrusted_certificate

    @property
    def transient(self) -> bool:
        """No answer, or an answer that says "not now" (429 or 5xx), rather than one about the request."""
        return self.unreachable or self.status == 429 or (self.status or 0) >= 500


T = TypeVar("T")

#: HTTP methods whose repetition changes nothing more than the first call did (RFC 9110, 9.2.2)
_IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})


def retry_transient(call: Callable[[], T], *, attempts: int, first_wait: float) -> T:
    """``call()``, asked again while it fails with a transient :class:`LabelStudioError` (no answer,
    429 or 5xx): at most ``attempts`` tries, waiting ``first_wait`` seconds, then twice that, ... in
    between.  Any other error, or the last attempt's, is raised as it came."""
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except LabelStudioError as exc:
            if not exc.transient or attempt == attempts:
                raise
            wait = first_wait * 2 ** (attempt - 1)
            logger.info("%s: asking again in %g s (attempt %d of %d)", exc, wait, attempt + 1, attempts)
            time.sleep(wait)


_SSL_REASON = re.compile(r"\[SSL[^\]]*\][^'\"]*")


def _no_answer(what: str, exc: requests.RequestException) -> LabelStudioError:
    """The error for a request ``what`` ("GET /api/tasks", "GET host") that got no answer.  A TLS
    certificate the backend does not trust (a hospital's own CA) says what to do, in place of a
    bare "SSLError" asked again and again; the exception's text is not kept whole, since its URL may
    carry a presigned query."""
    if isinstance(exc, ValueError):       # requests' InvalidURL, InvalidSchema, ...: the URL, not the server
        return LabelStudioError(f"{what}: malformed URL ({type(exc).__name__})")
    if isinstance(exc, requests.exceptions.SSLError):
        reason = _SSL_REASON.search(str(exc))
        return LabelStudioError(
            f"{what}: the server's TLS certificate was refused ({reason.group(0).strip() if reason else 'SSLError'}). "
            "If it is signed by your organisation's own certificate authority, set REQUESTS_CA_BUNDLE to that CA's "
            "certificate file (PEM) for the backend and its workers", untrusted_certificate=True)
    return LabelStudioError(f"{what}: {type(exc).__name__}", unreachable=True)


def _json_of(r: requests.Response, what: str):
    """The JSON of a 2xx answer (None when empty).  An answer that is not JSON came from something in
    front of Label Studio's API (a login or maintenance page of a proxy, an SSO redirect followed to its
    form): an error saying so, counted like no answer (asked again, the project kept for later)."""
    if not r.content:
        return None
    try:
        return r.json()
    except ValueError:
        kind = r.headers.get("Content-Type", "no content type").split(";")[0]
        raise LabelStudioError(
            f"{what}: HTTP {r.status_code} answered with {kind}, not JSON (from {_host(r.url or '')}): something in "
            "front of Label Studio (a proxy's login or maintenance page) answered instead of its API; check "
            "LABEL_STUDIO_URL", unreachable=True) from None


class LabelStudioAuthError(LabelStudioError):
    """The API key was refused (401/403) in both its legacy and its PAT form."""

    transient = False          # asking again with the same key changes nothing


def _looks_like_jwt(key: str) -> bool:
    parts = key.split(".")
    return len(parts) == 3 and all(parts) and key.startswith("ey")


class LabelStudioClient:
    """Talks to one Label Studio instance with one API key.

    Parameters
    ----------
    url : the Label Studio base URL, e.g. ``http://127.0.0.1:8080``.
    api_key : a legacy token or a personal access token.
    timeout : seconds per request.
    image_hosts : hosts other than Label Studio's that task images may be fetched from
        (ALR_IMAGE_HOSTS; see :func:`fetch_refusal`).
    attempts : how many times an API call that is safe to repeat (GET, PUT, DELETE, the project
        PATCH, and prediction imports: :meth:`import_predictions`) is tried while Label Studio
        answers transiently (no answer, 429, 5xx: :func:`retry_transient`), ``retry_wait`` seconds
        apart, then twice that, ...  The training job asks 3 times, so that one 502 of a proxy on
        page 57 of a 20,000-task listing does not throw the listing away; the web app asks once
        (whoever asked it, a person or Label Studio, asks again).  File downloads are not repeated
        here: :class:`ml_backend.images.ImageCache` has its own allowance.
    """

    def __init__(self, url: str, api_key: str, *, timeout: float = 30.0,
                 session: requests.Session | None = None, image_hosts: Sequence[str] = (),
                 attempts: int = 1, retry_wait: float = 1.0):
        if attempts < 1:
            raise ValueError(f"attempts must be >= 1, got {attempts}")
        if not url:
            raise ValueError("LABEL_STUDIO_URL is empty")
        self.url = url.rstrip("/")
        self._key = api_key or ""
        self.timeout = timeout
        self.image_hosts = tuple(image_hosts)      # hosts besides Label Studio images may come from
        self.session = session or requests.Session()
        # hosts of ALR_IMAGE_HOSTS' *.domain patterns are fetched through a session that checks the
        # address it connected to (see _PublicPeerAdapter)
        self._pattern_session = _public_peer_session() if any(h.startswith("*.") for h in self.image_hosts) else None
        self._mode = "pat" if _looks_like_jwt(self._key) else "legacy"
        self._access: str | None = None
        self.attempts, self.retry_wait = attempts, retry_wait

    def __repr__(self) -> str:  # never show the key
        return f"LabelStudioClient(url={self.url!r}, auth={self._mode})"

    # -- authentication ---------------------------------------------------------------
    def _refresh_access(self) -> None:
        try:
            r = self.session.post(f"{self.url}/api/token/refresh/", json={"refresh": self._key},
                                  timeout=self.timeout)
        except requests.RequestException as exc:      # Label Studio down: the same error as any other call
            raise _no_answer("POST /api/token/refresh/", exc) from None
        if r.status_code == 429 or r.status_code >= 500:      # "not now", not "no": asked again like any call
            raise LabelStudioError(f"POST /api/token/refresh/: HTTP {r.status_code}", r.status_code)
        if r.status_code != 200:
            raise LabelStudioAuthError(
                f"LABEL_STUDIO_API_KEY was refused: exchanging it as a personal access token "
                f"at /api/token/refresh/ failed: "
                f"HTTP {r.status_code}", r.status_code)
        answer = _json_of(r, "POST /api/token/refresh/")
        if not isinstance(answer, dict) or "access" not in answer:
            raise LabelStudioError(f"POST /api/token/refresh/: HTTP 200 without an access token", r.status_code)
        self._access = answer["access"]

    def auth_headers(self) -> dict[str, str]:
        if not self._key:
            raise LabelStudioAuthError("LABEL_STUDIO_API_KEY is not set")
        if self._mode == "pat":
            if self._access is None:
                self._refresh_access()
            return {"Authorization": f"Bearer {self._access}"}
        return {"Authorization": f"Token {self._key}"}

    def request(self, method: str, path_or_url: str, *, raw: bool = False, repeatable: bool | None = None,
                **kwargs):
        """One API call with authentication; returns JSON (or the Response when ``raw``, which is
        never repeated: a streamed file is its caller's to ask again).  ``repeatable``: whether the call
        may be sent again after a transient error (``attempts``); by default the idempotent methods."""
        if repeatable is None:
            repeatable = method.upper() in _IDEMPOTENT_METHODS
        if raw or not repeatable or self.attempts == 1:
            return self._request_once(method, path_or_url, raw=raw, **kwargs)
        return retry_transient(lambda: self._request_once(method, path_or_url, raw=raw, **kwargs),
                               attempts=self.attempts, first_wait=self.retry_wait)

    def _request_once(self, method: str, path_or_url: str, *, raw: bool, **kwargs):
        url = path_or_url if path_or_url.startswith(("http://", "https://")) \
            else f"{self.url}{path_or_url}"
        kwargs.setdefault("timeout", self.timeout)
        tried_other = False
        refreshed = False
        while True:
            try:
                headers = {**kwargs.pop("headers", {}), **self.auth_headers()}
            except LabelStudioAuthError:
                if self._mode == "pat" and not tried_other:
                    tried_other, self._mode = True, "legacy"
                    continue
                raise
            try:
                r = self.session.request(method, url, headers=headers, **kwargs)
            except requests.RequestException as exc:
                raise _no_answer(f"{method} {_path(url)}", exc) from None
            if r.status_code == 401:
                if self._mode == "pat" and not refreshed and self._access is not None:
                    refreshed, self._access = True, None      # access token expired
                    continue
                if not tried_other:
                    tried_other = True
                    self._mode = "legacy" if self._mode == "pat" else "pat"
                    self._access = None
                    continue
                raise LabelStudioAuthError(
                    f"{method} {_path(url)}: HTTP 401, LABEL_STUDIO_API_KEY was refused "
                    "(neither a valid personal access token nor an enabled legacy token)", 401)
            if r.status_code >= 400:
                raise LabelStudioError(
                    f"{method} {_path(url)}: HTTP {r.status_code} {r.text[:300]}".rstrip(), r.status_code)
            if raw:
                return r
            return _json_of(r, f"{method} {_path(url)}")

    # -- API --------------------------------------------------------------------------
    def whoami(self) -> dict:
        return self.request("GET", "/api/current-user/whoami")

    def get_project(self, project_id: int) -> dict:
        return self.request("GET", f"/api/projects/{int(project_id)}")

    def get_project_summary(self, project_id: int) -> dict:
        """The project's summary (its ``created_labels``: how many annotations chose each label).
        The route is internal (outside Label Studio's API schema): other versions may lack it."""
        return self.request("GET", f"/api/projects/{int(project_id)}/summary/")

    def newest_task_update(self, project_id: int) -> list | None:
        """[task id, updated_at] of the project's most recently updated task (one task of the Data
        Manager's list ordered by ``-tasks:updated_at``); None for a project without tasks.

        Label Studio bumps a task's ``updated_at`` when its data is edited and when one of its
        annotations is created, edited or deleted, but not when predictions are imported in bulk or a
        model version's predictions are deleted: the backend's own pushes leave it as it was."""
        body = self.request("GET", "/api/tasks", params={
            "project": int(project_id), "page": 1, "page_size": 1, "resolve_uri": "false",
            "query": json.dumps({"ordering": ["-tasks:updated_at"]})})
        tasks = body.get("tasks", []) if isinstance(body, dict) else body
        return [tasks[0].get("id"), tasks[0].get("updated_at")] if tasks else None

    def patch_project(self, project_id: int, **fields) -> dict:
        # setting the same fields twice leaves the project as once: safe to send again
        return self.request("PATCH", f"/api/projects/{int(project_id)}", json=fields, repeatable=True)

    def iter_tasks(self, project_id: int, *, page_size: int = 200, predictions: bool = False) -> Iterator[dict]:
        """All tasks of a project with their annotations, page by page.

        Label Studio sends each task's predictions with its annotations (``fields=all``); they are
        dropped unless ``predictions``: the backend's jobs never read them, and they made up 40% of
        a listing held in memory (6.1 -> 3.7 KB a task with one prediction of this backend: 50 MB
        at 20,000 tasks)."""
        page, listed = 1, 0
        while True:
            try:
                body = self.request("GET", "/api/tasks", params={
                    "project": int(project_id), "page": page, "page_size": page_size,
                    "fields": "all", "resolve_uri": "false"})
            except LabelStudioError as exc:
                if exc.status == 404 and page > 1:   # past the last page
                    return
                raise
            tasks = body.get("tasks", []) if isinstance(body, dict) else body
            for task in tasks:
                if not predictions and isinstance(task, dict):
                    task.pop("predictions", None)
                yield task
            listed += len(tasks)
            total = body.get("total") if isinstance(body, dict) else None
            # a short page ends the listing only without a total: Label Studio cuts pages to its
            # TASK_API_PAGE_SIZE_MAX, and numbers them by the size it served
            if not tasks or (listed >= total if total is not None else len(tasks) < page_size):
                return
            page += 1

    def import_predictions(self, project_id: int, predictions: list[dict], *,
                           batch_size: int = 500) -> int:
        """Create predictions in bulk (POST /api/projects/{id}/import/predictions), batched.

        Each batch is tried ``attempts`` times while the error is transient (no answer, 429 or 5xx),
        and never created twice: before a batch is sent again, Label Studio's count of the
        predictions of the batch's model versions says whether the last try landed and only its
        answer was lost (a proxy's 502 or 504 after Label Studio had created them, a connection
        dropped on the way back); such a batch counts as created.  Returns the number created.
        """
        versions = {p.get("model_version") for p in predictions}
        held = self._held_predictions(project_id, versions) if self.attempts > 1 else 0
        created = 0
        for start in range(0, len(predictions), batch_size):
            sent = self._import_batch(project_id, predictions[start:start + batch_size], versions, held)
            created, held = created + sent, held + sent
        return created

    def _import_batch(self, project_id: int, batch: list[dict], versions: set, held: int) -> int:
        """One batch of :meth:`import_predictions`; ``held``: the project's predictions of ``versions``
        before it."""
        path = f"/api/projects/{int(project_id)}/import/predictions"
        tries = 0

        def send() -> int:
            nonlocal tries
            tries += 1
            if tries > 1 and self._held_predictions(project_id, versions, repeatable=False) >= held + len(batch):
                logger.info("POST %s: the previous try had created the %d predictions (its answer was lost): "
                            "not sent again", path, len(batch))
                return len(batch)
            body = self._request_once("POST", path, raw=False, json=batch, timeout=max(self.timeout, 120))
            return int((body or {}).get("created", len(batch)))

        return retry_transient(send, attempts=self.attempts, first_wait=self.retry_wait)

    def _held_predictions(self, project_id: int, versions: set, *, repeatable: bool = True) -> int:
        """How many predictions of these model versions the project holds."""
        counts = self.prediction_versions(project_id, repeatable=repeatable)
        return sum(int(counts.get(v, 0)) for v in versions)

    def prediction_versions(self, project_id: int, *, repeatable: bool = True) -> dict[str, int]:
        """model_version -> number of predictions, newest first."""
        return self.request("GET", f"/api/projects/{int(project_id)}/model-versions/", repeatable=repeatable) or {}

    def delete_prediction_version(self, project_id: int, model_version: str) -> None:
        self.request("DELETE", f"/api/projects/{int(project_id)}/model-versions/",
                     json={"model_version": model_version})

    def download(self, url: str, *, max_bytes: int = 64 * 1024 * 1024) -> bytes:
        """Fetch a task's file: relative /data/... paths and this instance's URLs with the API
        key, other http(s) URLs without it and only on an allowed host (:func:`fetch_refusal`).
        Redirects are followed by hand, at most 3, each target checked the same way, except the
        one Label Studio's storage resolver (``/tasks/<id>/resolve/``) answers with: that is a
        presigned URL of the project's own cloud storage, whose host its managers configured.
        A malformed URL or redirect target (an unclosed IPv6 bracket, a port out of range) is
        refused like a forbidden one: that task's image is broken, the others are not."""
        try:
            return self._download(url, max_bytes)
        except ValueError as exc:           # urlparse / urljoin / .port on a malformed URL
            raise FetchRefused(f"refused to fetch {url[:80]!r}: malformed URL ({exc})") from None

    def _download(self, url: str, max_bytes: int) -> bytes:
        target = url if url.startswith(("http://", "https://")) else urljoin(self.url + "/", url.lstrip("/"))
        path = urlparse(target).path
        if path.startswith(("/data/upload/", "/data/local-files")) or _STORAGE_RESOLVER.match(path):
            # served by Label Studio whatever host name it put in the URL (--host may be a
            # public name while LABEL_STUDIO_URL is the internal one)
            target = f"{self.url}{_path(target)}"
        presigned = False
        for _ in range(4):
            # the key goes to Label Studio only: same scheme too, never over plain HTTP to an HTTPS instance
            if _origin(target) == _origin(self.url):
                r = self.request("GET", target, raw=True, stream=True, allow_redirects=False)
                presigned = bool(_STORAGE_RESOLVER.match(urlparse(target).path))
            else:
                if presigned:
                    reason = None if urlparse(target).scheme in ("http", "https") else "not an http(s) URL"
                    session = self.session
                else:
                    reason = fetch_refusal(target, self.image_hosts)
                    session = self.session if _named_exactly(target, self.image_hosts) else self._pattern_session
                if reason:
                    raise FetchRefused(f"refused to fetch {_host(target)}: {reason}")
                presigned = False
                try:
                    r = session.get(target, timeout=self.timeout, stream=True, allow_redirects=False)
                except requests.RequestException as exc:
                    raise _no_answer(f"GET {_host(target)}", exc) from None
                if r.status_code >= 400:
                    raise LabelStudioError(f"GET {_host(target)}{urlparse(target).path}: HTTP {r.status_code}",
                                           r.status_code)
            if not r.is_redirect:
                break
            target = urljoin(target, r.headers.get("location", ""))
        else:
            raise LabelStudioError(f"GET {url[:80]!r}: more than 3 redirects")
        chunks, size = [], 0
        try:
            for chunk in r.iter_content(65536):
                size += len(chunk)
                if size > max_bytes:
                    raise LabelStudioError(f"GET {_path(target)}: file larger than {max_bytes} bytes")
                chunks.append(chunk)
        except requests.RequestException as exc:         # the host went away mid-file
            raise LabelStudioError(f"GET {_host(target)}: {type(exc).__name__} mid-file", unreachable=True) from None
        finally:
            r.close()
        return b"".join(chunks)


_STORAGE_RESOLVER = re.compile(r"^/tasks/\d+/(resolve|presign)/?$")


class FetchRefused(LabelStudioError):
    """A task's image URL points somewhere the backend may not fetch from (the message says why)."""


def fetch_refusal(url: str, allowed_hosts: Sequence[str]) -> str | None:
    """Why the backend must not GET ``url`` (a host other than Label Studio's), or None.

    ``allowed_hosts`` (ALR_IMAGE_HOSTS) holds exact host names, trusted at any address (an
    image server on the hospital's network), and ``*.domain`` patterns, whose hosts must
    resolve to public addresses only: a pattern never opens loopback, private or link-local
    addresses (cloud metadata, the backend's neighbours) to whoever writes a task.  The
    download itself checks the address it connects to again (:class:`_PublicPeerAdapter`).
    """
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https"):
        return f"unsupported URL scheme {parsed.scheme!r}"
    host = (parsed.hostname or "").lower()
    if not host:
        return "no host in the URL"
    if _named_exactly(url, allowed_hosts):
        return None
    if not any(h.startswith("*.") and host.endswith(h[1:].lower()) for h in allowed_hosts):
        return "host is not Label Studio's and not in ALR_IMAGE_HOSTS"
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, parsed.port or 443, proto=socket.IPPROTO_TCP)}
    except (OSError, UnicodeError) as exc:      # UnicodeError: a name IDNA refuses (a label over 63 characters)
        return f"cannot resolve the host ({exc})"
    private = sorted(a for a in addresses if not _is_public(a))
    if private:
        return f"resolves to a non-public address {private[0]} (name the host exactly in ALR_IMAGE_HOSTS to allow it)"
    return None


def _named_exactly(url: str, allowed_hosts: Sequence[str]) -> bool:
    """Whether ``url``'s host is one of ``allowed_hosts`` by name (trusted at any address)."""
    return (urlparse(url).hostname or "").lower() in (h.lower() for h in allowed_hosts)


def _is_public(address: str) -> bool:
    return ipaddress.ip_address(address.split("%")[0]).is_global      # "%": an IPv6 zone index


class _PublicPeerConnection:
    """Mixed into urllib3's connections: the socket must have connected to a public address.

    :func:`fetch_refusal` resolves a pattern host and checks its addresses, and the download
    resolves it again to connect: a DNS server that answers with a public address to the first
    and with a loopback or private one a moment later (DNS rebinding) would turn the download to
    the backend's neighbours.  This checks the address the socket is connected to, before any
    byte is sent.  Through a proxy (HTTP(S)_PROXY) the socket goes to the proxy, which is not
    checked: the proxy resolves the host, and only :func:`fetch_refusal`'s check applies.
    """

    def _new_conn(self):
        sock = super()._new_conn()
        peer = sock.getpeername()[0]
        if not _is_public(peer):
            sock.close()
            raise FetchRefused(f"refused to fetch {self.host}: it resolved to the non-public address {peer} when "
                               f"the backend connected, after public addresses a moment before (DNS rebinding?)")
        return sock


class _PublicPeerHTTPConnection(_PublicPeerConnection, HTTPConnection):
    pass


class _PublicPeerHTTPSConnection(_PublicPeerConnection, HTTPSConnection):
    pass


class _PublicPeerHTTPPool(HTTPConnectionPool):
    ConnectionCls = _PublicPeerHTTPConnection


class _PublicPeerHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _PublicPeerHTTPSConnection


class _PublicPeerAdapter(HTTPAdapter):
    """requests' adapter whose connections refuse a non-public peer (:class:`_PublicPeerConnection`)."""

    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _PublicPeerHTTPPool, "https": _PublicPeerHTTPSPool}


def _public_peer_session() -> requests.Session:
    session = requests.Session()
    adapter = _PublicPeerAdapter()
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def _origin(url: str) -> tuple[str, str]:
    p = urlparse(url)
    return p.scheme, p.netloc.lower()


def _host(url: str) -> str:
    p = urlparse(url)
    return f"{p.scheme}://{p.netloc}"


def _path(url: str) -> str:
    p = urlparse(url)
    return p.path + (f"?{p.query}" if p.query else "")
