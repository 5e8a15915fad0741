"""What a task's image URL may make the backend fetch: Label Studio, ALR_IMAGE_HOSTS, nothing else.

Real HTTP servers on loopback stand in for a foreign host, an allowed image server and a
redirecting one; each records the requests it got, so a refused fetch is seen to send nothing.
"""
from __future__ import annotations

import http.server
import io
import threading

import numpy as np
import pytest
from PIL import Image

from ml_backend.ls_client import FetchRefused, LabelStudioClient, fetch_refusal
from model.data import MAX_IMAGE_PIXELS, load_image


def png(size=(4, 4), value=200) -> bytes:
    buf = io.BytesIO()
    Image.new("L", size, value).save(buf, format="PNG")
    return buf.getvalue()


class Server:
    """A loopback HTTP server answering every GET with ``body`` or a redirect to ``redirect``;
    with ``cut_after`` it announces the whole body, sends that many bytes and hangs up."""

    def __init__(self, *, body: bytes = b"", redirect: str | None = None, cut_after: int | None = None):
        self.requests: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.requests.append(self.path)
                if redirect:
                    self.send_response(302)
                    self.send_header("Location", redirect)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[:cut_after])
                if cut_after is not None:
                    self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def servers():
    made = []

    def make(**kwargs):
        made.append(Server(**kwargs))
        return made[-1]
    yield make
    for server in made:
        server.close()


def client(*image_hosts) -> LabelStudioClient:
    return LabelStudioClient("http://127.0.0.1:9", "", timeout=5, image_hosts=image_hosts)   # LS elsewhere


def test_a_host_not_allowed_is_refused_and_gets_no_request(servers):
    foreign = servers(body=png())
    with pytest.raises(FetchRefused, match="not in ALR_IMAGE_HOSTS"):
        client().download(f"{foreign.url}/scan.png")
    assert foreign.requests == []


def test_an_allowed_host_named_exactly_is_fetched_even_on_a_private_address(servers):
    images = servers(body=png())
    assert client("127.0.0.1").download(f"{images.url}/scan.png") == png()
    assert images.requests == ["/scan.png"]


def test_a_redirect_to_a_host_not_allowed_is_refused_before_it_is_followed(servers):
    # both on 127.0.0.1: the allowed one is named "127.0.0.1", the target is reached as "localhost"
    target = servers(body=png())
    hop = servers(redirect=target.url.replace("127.0.0.1", "localhost") + "/metadata")
    with pytest.raises(FetchRefused, match="localhost"):
        client("127.0.0.1").download(f"{hop.url}/scan.png")
    assert hop.requests == ["/scan.png"] and target.requests == []


def test_only_label_studios_storage_resolver_may_redirect_to_its_presigned_bucket(servers):
    bucket = servers(body=png())
    presigned = bucket.url.replace("127.0.0.1", "localhost") + "/scans/ct-1.png?X-Amz-Signature=abc"
    ls = servers(redirect=presigned)          # Label Studio: every path answers with that redirect
    api = LabelStudioClient(ls.url, "key", timeout=5)           # no ALR_IMAGE_HOSTS at all
    assert api.download("/tasks/7/resolve/?fileuri=czM6Ly9zY2Fucy9jdC0xLnBuZw==") == png()
    with pytest.raises(FetchRefused, match="localhost"):       # any other Label Studio path: checked
        api.download("/data/upload/1/scan.png")
    assert bucket.requests == ["/scans/ct-1.png?X-Amz-Signature=abc"]


def test_patterns_never_open_loopback_private_or_link_local_addresses():
    for url in ("http://169.254.169.254/latest/meta-data", "http://10.0.0.7/x.png", "http://127.0.0.1:8080/x"):
        assert "non-public address" in fetch_refusal(url, ["*.254", "*.7", "*.1"]), url
    assert "unsupported URL scheme" in fetch_refusal("file:///etc/passwd", ["*.example.org"])
    assert "unsupported URL scheme" in fetch_refusal("gopher://example.org/", ["example.org"])


@pytest.fixture
def rebinding_dns(monkeypatch) -> list[str]:
    """DNS rebinding: ``scans.images.example`` resolves to a public address when the backend checks
    it and to loopback when the download connects (a DNS server whose answers the task's author
    controls: the first answer's TTL is zero).  Returns the answers given, in order."""
    import socket

    real_getaddrinfo, answers = socket.getaddrinfo, []

    def resolve(host, port, *args, **kwargs):
        if host != "scans.images.example":
            return real_getaddrinfo(host, port, *args, **kwargs)
        answers.append("93.184.216.34" if not answers else "127.0.0.1")
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (answers[-1], int(port)))]
    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    return answers


REBOUND = r"scans\.images\.example.*non-public address 127\.0\.0\.1 when the backend connected"


def test_a_pattern_host_whose_dns_turns_to_loopback_after_the_check_gets_no_request(servers, rebinding_dns):
    """The download is refused at the connection, before any byte is sent: the loopback server,
    standing in for the backend's neighbours, gets no request."""
    neighbour = servers(body=png())
    port = int(neighbour.url.rsplit(":", 1)[1])
    with pytest.raises(FetchRefused, match=REBOUND):
        client("*.images.example").download(f"http://scans.images.example:{port}/scan.png")
    assert rebinding_dns == ["93.184.216.34", "127.0.0.1"] and neighbour.requests == []
    # the same server named exactly is trusted at any address, as before
    assert client("scans.images.example").download(f"http://scans.images.example:{port}/scan.png") == png()


def test_an_https_pattern_host_rebound_to_loopback_gets_not_even_the_tls_hello(rebinding_dns):
    """Over HTTPS the address is checked once the socket is connected, before the TLS handshake:
    the loopback listener accepts the connection and receives no byte, not even the ClientHello."""
    import socket

    listener, received = socket.create_server(("127.0.0.1", 0)), []

    def read_first_bytes():
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(5)
            received.append(conn.recv(4096))     # b"": the backend hung up without sending anything
    reader = threading.Thread(target=read_first_bytes, daemon=True)
    reader.start()
    try:
        with pytest.raises(FetchRefused, match=REBOUND):
            client("*.images.example").download(f"https://scans.images.example:{listener.getsockname()[1]}/s.png")
        reader.join(10)
    finally:
        listener.close()
    assert rebinding_dns == ["93.184.216.34", "127.0.0.1"] and received == [b""]


def test_decompression_bombs_are_refused_before_decoding():
    side = int(np.sqrt(MAX_IMAGE_PIXELS)) + 100
    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, format="PNG")        # a few kB on disk, 40+ MP decoded
    assert len(buf.getvalue()) < 1_000_000
    with pytest.raises(ValueError, match="decompression bomb"):
        load_image(buf.getvalue(), image_size=8, channels=1)


def test_exif_orientation_is_applied():
    pixels = np.zeros((20, 40), np.uint8)
    pixels[:, :20] = 255                                          # left half bright, landscape
    exif = Image.Exif()
    exif[0x0112] = 6                                              # "rotate 90 CW to display"
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    out = load_image(buf.getvalue(), image_size=40, channels=1)[..., 0]
    assert out[:20].mean() > 200 and out[20:].mean() < 50         # displayed portrait: top half bright


def test_non_square_images_are_stretched_padded_or_cropped_as_asked():
    wide = np.full((20, 60), 255, np.uint8)                       # a bright 60 x 20 strip
    wide[:, :10] = 0                                              # dark left edge
    buf = io.BytesIO()
    Image.fromarray(wide).save(buf, format="PNG")
    stretched, padded, cropped = (load_image(buf.getvalue(), image_size=30, channels=1, resize=mode)[..., 0]
                                  for mode in ("stretch", "pad", "crop"))
    assert stretched.shape == padded.shape == cropped.shape == (30, 30)
    assert stretched[:, :4].mean() < 30 and stretched[:, 8:].mean() > 220     # the edge kept, squeezed
    assert padded[:8].mean() < 10 and padded[-8:].mean() < 10 and padded[15, 15] > 220   # letter-boxed
    assert cropped.mean() > 240                                   # the centre square has no dark edge
    with pytest.raises(ValueError, match="resize must be one of"):
        load_image(buf.getvalue(), image_size=30, channels=1, resize="squash")


def test_a_host_that_hangs_up_mid_file_is_asked_again_then_named_never_a_crash(servers, tmp_path):
    from ml_backend.images import ImageCache, ImageHostError

    cut = servers(body=png(size=(64, 64)), cut_after=20)
    cache = ImageCache(tmp_path, client("127.0.0.1"), attempts=2, retry_wait=0)
    with pytest.raises(ImageHostError, match=r"GET http://127\.0\.0\.1:\d+: \w+ mid-file \(2 attempts\)"):
        cache.fetch(f"{cut.url}/scan.png")
    assert len(cut.requests) == 2 and not list(tmp_path.rglob("*"))   # asked twice, nothing half-written


def test_malformed_image_urls_are_broken_images_not_a_failed_job(servers, tmp_path):
    """An unclosed IPv6 bracket, a port out of range, a host name IDNA refuses, a redirect to a
    malformed Location: each is that task's broken image, skipped with its reason; the good image
    of the same batch loads and no host is asked for the bad ones."""
    from ml_backend.images import ImageCache, load_task_images

    good = servers(body=png())
    bad_hop = servers(redirect="http://[bad/scan.png")
    urls = {1: f"{good.url}/scan.png", 2: "http://[oops/scan.png", 3: "http://127.0.0.1:99999/scan.png",
            4: f"http://{'a' * 64}.example.org/scan.png", 5: f"{bad_hop.url}/scan.png"}
    tasks = [{"id": tid, "data": {"image": url}} for tid, url in urls.items()]
    cache = ImageCache(tmp_path, client("127.0.0.1", "*.example.org"), retry_wait=0)
    ok_idx, images, errors = load_task_images(tasks, "image", cache, load_image, image_size=4, channels=1)
    assert ok_idx == [0] and images.shape == (1, 4, 4, 1) and set(errors) == {2, 3, 4, 5}
    assert all("malformed URL" in errors[t] for t in (2, 3, 5)) and "cannot resolve" in errors[4]
    assert good.requests == ["/scan.png"] and bad_hop.requests == ["/scan.png"]


def test_the_api_key_never_goes_over_plain_http_to_an_https_label_studio(servers):
    """LABEL_STUDIO_URL is https://host:port: a task URL http://host:port/... is not Label Studio's
    (another scheme, unencrypted) and gets no request, with the key or without."""
    plain = servers(body=png())
    api = LabelStudioClient(plain.url.replace("http://", "https://"), "key", timeout=5)
    with pytest.raises(FetchRefused, match="not in ALR_IMAGE_HOSTS"):
        api.download(f"{plain.url}/scan.png")
    assert plain.requests == []
