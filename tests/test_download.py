"""Downloads against a loopback HTTP server: good, corrupt, truncated, missing, server down."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import os
import socket
import threading

import numpy as np
import pytest

from fastconv.datasets import DownloadError, download, load_mnist

from test_datasets import NAMES, idx_bytes

GOOD = gzip.compress(idx_bytes(np.arange(24, dtype=np.uint8).reshape(2, 3, 4)))
MD5 = hashlib.md5(GOOD).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
    files: dict = {}  # path -> bytes, set per server

    def do_GET(self):  # noqa: N802 - http.server's name
        mode, _, name = self.path.strip("/").partition("/")
        body = self.files.get(name)
        if body is None or mode == "missing":
            self.send_error(404)
            return
        if mode == "corrupt":
            body = body[:-5] + b"XXXXX"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        # "truncated": promise the whole body, send half, close the connection
        self.wfile.write(body[: len(body) // 2] if mode == "truncated" else body)
        self.wfile.flush()
        if mode == "truncated":
            self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    """A loopback server on a free port; yields ``(base_url, files dict)``."""
    handler = type("Handler", (_Handler,), {"files": {"f.gz": GOOD}})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", handler.files
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


@pytest.fixture
def down_url():
    """A URL on a port where nothing listens (bound, then closed)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"


def _only(tmp_path, name):
    """The directory holds exactly ``name`` (or nothing when None): no temporary leftovers."""
    assert os.listdir(tmp_path) == ([name] if name else [])


def test_good_mirror(server, tmp_path):
    base, _ = server
    path = download("f.gz", tmp_path, [base + "/good/"], md5=MD5, progress=False)
    assert path.read_bytes() == GOOD
    _only(tmp_path, "f.gz")


@pytest.mark.parametrize("bad", ["corrupt", "truncated", "missing", "down"])
def test_bad_mirror_falls_through_to_the_next(bad, server, down_url, tmp_path):
    base, _ = server
    first = down_url if bad == "down" else f"{base}/{bad}/"
    path = download("f.gz", tmp_path, [first, f"{base}/good"], md5=MD5, progress=False)
    assert path.read_bytes() == GOOD
    _only(tmp_path, "f.gz")


def test_all_mirrors_failing_is_a_clear_error_and_leaves_no_file(server, down_url, tmp_path):
    base, _ = server
    mirrors = [f"{base}/corrupt/", f"{base}/truncated/", f"{base}/missing/", down_url]
    with pytest.raises(DownloadError) as info:
        download("f.gz", tmp_path, mirrors, md5=MD5, progress=False)
    msg = str(info.value)
    assert "tried 4 mirror(s)" in msg and "does not match" in msg and "404" in msg
    assert msg.count("f.gz") >= 5 and isinstance(info.value, OSError)
    _only(tmp_path, None)


def test_corrupt_download_never_replaces_a_good_file(server, tmp_path):
    base, _ = server
    download("f.gz", tmp_path, [base + "/good/"], md5=MD5, progress=False)
    with pytest.raises(DownloadError):
        download("f.gz", tmp_path, [base + "/corrupt/"], md5=MD5, progress=False)
    assert (tmp_path / "f.gz").read_bytes() == GOOD
    _only(tmp_path, "f.gz")


def test_md5_none_skips_verification(server, tmp_path):
    base, _ = server
    path = download("f.gz", tmp_path, [base + "/corrupt/"], md5=None, progress=False)
    assert path.read_bytes() != GOOD and len(path.read_bytes()) == len(GOOD)


def test_load_mnist_downloads_missing_files_with_checksums(server, down_url, tmp_path, rng):
    base, files = server
    table = {}
    for i, name in enumerate(NAMES):
        shape = (5 - 2 * (i >= 2), 28, 28) if "images" in name else (5 - 2 * (i >= 2),)
        high = 256 if "images" in name else 10
        files[name] = gzip.compress(idx_bytes(rng.integers(0, high, shape)))
        table[name] = hashlib.md5(files[name]).hexdigest()
    root = tmp_path / "cache"
    (xtr, ytr), (xte, yte) = load_mnist(root, mirrors=[down_url, f"{base}/good/"], files=table,
                                        progress=False)
    assert xtr.shape == (5, 28, 28) and yte.shape == (3,) and ytr.dtype == np.int64
    assert sorted(os.listdir(root)) == sorted(NAMES)
    # A second call reads the cache: no server needed.
    (xtr2, _), _ = load_mnist(root, mirrors=[down_url], files=table, progress=False)
    np.testing.assert_array_equal(xtr2, xtr)
