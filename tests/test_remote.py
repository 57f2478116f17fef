"""Remote SOURCEs against real local servers: an https-style URL server and a Hugging Face Hub look-alike.

Both servers are `http.server.ThreadingHTTPServer`s on 127.0.0.1 in a thread. The Hub tests run `resolve_source`
in a subprocess because huggingface_hub reads HF_HOME, HF_HUB_CACHE, ... when it is imported: the subprocess
starts with HF_ENDPOINT pointing at the local server and HOME, HF_HOME and TRAINKIT_CACHE inside tmp_path, so
every byte it could write lands where the test greps for the token afterwards.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from etils import epath
from etils.epath import backend as epath_backend
from gcs_emulator import GCSEmulator
from test_sources import build_workdir  # the same real Orbax workdir

from trainkit.checkpoints.layout import list_steps, read_alias, write_alias
from trainkit.errors import TrainkitError
from trainkit.checkpoints.manifest import verify_manifest
from trainkit.checkpoints.packing import pack
from trainkit.checkpoints.sources import resolve_source

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_test_SECRET_0123456789abcdef"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return build_workdir(tmp_path_factory.mktemp("orbax"))


@pytest.fixture(scope="module")
def packed_bytes(workdir, tmp_path_factory) -> bytes:
    return pack(workdir / "checkpoints" / "000080", tmp_path_factory.mktemp("packed") / "model.ckpt").read_bytes()


class Server:
    """A ThreadingHTTPServer on 127.0.0.1; `handle(handler) -> (status, headers, body)` answers each request."""

    def __init__(self, handle):
        self.requests: list[tuple[str, str, dict]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self):
                server.requests.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))
                status, headers, body = handle(self)
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                if "Content-Length" not in headers:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_HEAD = _answer

            def log_message(self, *args):  # keep test output quiet
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def paths(self, method: str = "GET") -> list[str]:
        return [path for m, path, _ in self.requests if m == method]


@contextmanager
def serving(handle) -> Iterator[Server]:
    server = Server(handle)
    server.thread.start()
    try:
        yield server
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()


def closed_port() -> int:
    """A port on 127.0.0.1 that nobody listens on (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def error_of(source: str, **kw) -> str:
    with pytest.raises(TrainkitError) as info:
        resolve_source(source, **kw)
    assert "\n" not in str(info.value)
    return str(info.value)


def files_containing(root: Path, needle: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink() and needle in p.read_bytes()]


# --- https:// URLs ------------------------------------------------------------------------------------------------


def url_handler(files: dict[str, bytes], cut_first_get: set[str] = frozenset()):
    """Serve `files` by raw path with HTTP Range support; the first GET of a path in `cut_first_get` sends half
    of the body after announcing all of it, then closes the connection (a dropped transfer)."""
    cut_done: set[str] = set()

    def handle(request):
        path = request.path.split("?")[0]
        if path == "/private.ckpt":
            return 401, {}, b"no"
        if path not in files:
            return 404, {}, b"not found"
        body = files[path]
        if request.command == "GET" and path in cut_first_get and path not in cut_done:
            cut_done.add(path)
            request.close_connection = True
            return 200, {"Content-Length": str(len(body))}, body[: len(body) // 2]
        match = re.fullmatch(r"bytes=(\d+)-", request.headers.get("Range", ""))
        if match:
            start = int(match[1])
            headers = {"Content-Range": f"bytes {start}-{len(body) - 1}/{len(body)}"}
            return 206, headers, body[start:]
        return 200, {}, body

    return handle


def test_url_download_is_cached_and_reused(packed_bytes, tmp_path):
    cache = tmp_path / "cache"
    with serving(url_handler({"/models/model.ckpt": packed_bytes})) as server:
        url = f"{server.url}/models/model.ckpt"
        first = resolve_source(url, cache_dir=str(cache))
        assert (first.step, first.kind, first.origin) == (80, "url", url)
        assert first.sha256 == hashlib.sha256(packed_bytes).hexdigest()
        assert first.step_dir.is_relative_to(cache)
        second = resolve_source(url, cache_dir=str(cache))
        assert server.paths() == ["/models/model.ckpt"]  # downloaded once
    assert second == first
    assert resolve_source(url, cache_dir=str(cache)) == first  # server gone: the cached copy is used
    downloaded = [p for p in (cache / "downloads").iterdir() if p.name.endswith("model.ckpt")]
    assert len(downloaded) == 1 and downloaded[0].read_bytes() == packed_bytes
    assert json.loads((cache / "downloads" / (downloaded[0].name + ".json")).read_text())["sha256"] \
        == first.sha256
    assert not list(cache.rglob("*.part"))


def test_url_dropped_transfer_is_a_size_mismatch_and_resumes(packed_bytes, tmp_path):
    cache = tmp_path / "cache"
    with serving(url_handler({"/model.ckpt": packed_bytes}, cut_first_get={"/model.ckpt"})) as server:
        message = error_of(f"{server.url}/model.ckpt", cache_dir=str(cache))
        assert "size mismatch" in message and f"of the {len(packed_bytes)} bytes" in message
        assert "run the same command again to resume" in message
        resolved = resolve_source(f"{server.url}/model.ckpt", cache_dir=str(cache))
        ranges = [headers.get("range") for _, _, headers in server.requests]
    assert resolved.step == 80 and resolved.sha256 == hashlib.sha256(packed_bytes).hexdigest()
    assert ranges == [None, f"bytes={len(packed_bytes) // 2}-"]  # the second request continued the first


def test_url_errors(packed_bytes, tmp_path):
    cache = tmp_path / "cache"
    with serving(url_handler({"/junk.bin": os.urandom(4096)})) as server:
        message = error_of(f"{server.url}/missing.ckpt", cache_dir=str(cache))
        assert "was not found (HTTP 404)" in message and "/missing.ckpt" in message
        message = error_of(f"{server.url}/private.ckpt", cache_dir=str(cache))
        assert "HTTP 401" in message and "--hf_token" in message
        message = error_of(f"{server.url}/junk.bin", cache_dir=str(cache))
        assert message.startswith(f"{server.url}/junk.bin is not a packed trainkit checkpoint")
        assert not [p for p in (cache / "downloads").iterdir() if p.name.endswith("junk.bin")]  # not kept
    message = error_of(f"http://127.0.0.1:{closed_port()}/model.ckpt", cache_dir=str(cache))
    assert "cannot reach 127.0.0.1" in message and "connection refused" in message
    assert "only for localhost" in error_of("http://example.com/model.ckpt", cache_dir=str(cache))


def test_url_secrets_and_names_stay_out_of_the_cache(packed_bytes, tmp_path):
    cache = tmp_path / "cache"
    evil_path = "/..%2F..%2F..%2Fescape.ckpt"
    with serving(url_handler({"/model.ckpt": packed_bytes, evil_path: packed_bytes})) as server:
        resolved = resolve_source(f"{server.url}/model.ckpt?sig=SECRETSIG", cache_dir=str(cache))
        assert resolved.origin == f"{server.url}/model.ckpt?<redacted>"
        assert "SECRETSIG" not in error_of(f"{server.url}/nope.ckpt?sig=SECRETSIG", cache_dir=str(cache))
        assert resolve_source(server.url + evil_path, cache_dir=str(cache)).step == 80
    assert not files_containing(tmp_path, b"SECRETSIG")
    assert {p.parent for p in (cache / "downloads").iterdir()} == {cache / "downloads"}
    assert not list(tmp_path.rglob("escape.ckpt")) and not (tmp_path.parent / "escape.ckpt").exists()


# --- hf:// (a local server speaking the Hub's file API) ------------------------------------------------------------


def hub_handler(files: dict[str, bytes]):
    """`/{org}/{repo}/resolve/{revision}/{path}` as huggingface_hub's hf_hub_download uses it (HEAD, then GET):
    X-Repo-Commit, ETag and Content-Length; 401 without `Authorization: Bearer TOKEN`, 403 with another token."""

    def handle(request):
        match = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", request.path)
        auth = request.headers.get("Authorization")
        if auth is None:
            return 401, {"X-Error-Message": "Unauthorized"}, b""
        if auth != f"Bearer {TOKEN}":
            return 403, {}, b""
        key = f"{match[1]}/{match[3]}" if match and match[2] in ("main", "v1.0") else None
        if key not in files:
            return 404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT}, b""
        body = files[key]
        etag = hashlib.sha256(body).hexdigest()
        return 200, {"X-Repo-Commit": COMMIT, "ETag": f'"{etag}"', "Content-Type": "application/octet-stream"}, \
            body

    return handle


HUB_SCRIPT = """
import json, os, sys, logging
logging.basicConfig(level=logging.DEBUG)  # any library that logs the token would put it on stderr
from trainkit.errors import TrainkitError
from trainkit.checkpoints.sources import resolve_source
for case in json.loads(sys.argv[1]):
    os.environ.pop("HF_TOKEN", None)
    os.environ.update(case.get("env", {}))
    try:
        r = resolve_source(case["source"], hf_token=case.get("hf_token"))
        print(json.dumps({"step": r.step, "kind": r.kind, "origin": r.origin, "step_dir": str(r.step_dir)}))
    except TrainkitError as e:
        print(json.dumps({"error": str(e)}))
"""


def run_hub_cases(tmp_path: Path, endpoint: str, cases: list[dict]) -> tuple[list[dict], str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(
        PYTHONPATH=str(ROOT), HOME=str(tmp_path / "home"), HF_HOME=str(tmp_path / "hf_home"),
        HF_HUB_CACHE=str(tmp_path / "hf_home" / "hub"), HF_HUB_DISABLE_TELEMETRY="1", HF_ENDPOINT=endpoint,
        TRAINKIT_CACHE=str(tmp_path / "cache"), HF_HUB_ETAG_TIMEOUT="5", HF_HUB_DOWNLOAD_TIMEOUT="5",
    )
    proc = subprocess.run([sys.executable, "-c", HUB_SCRIPT, json.dumps(cases)], env=env, cwd=tmp_path,
                          check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines()], proc.stdout + proc.stderr


@pytest.mark.slow
def test_hub_download_needs_the_token_and_never_stores_it(packed_bytes, tmp_path):
    repo_file = "org/trainkit-mlp/runs/model.ckpt"
    down = f"http://127.0.0.1:{closed_port()}"
    with serving(hub_handler({repo_file: packed_bytes})) as server:
        source = "hf://org/trainkit-mlp/runs/model.ckpt"
        results, output = run_hub_cases(tmp_path, server.url, [
            {"source": source},                                            # no token
            {"source": source, "hf_token": "hf_wrong_token_42"},           # rejected token
            {"source": source, "hf_token": TOKEN},                         # the token, as --hf_token
            {"source": "hf://org/trainkit-mlp@v1.0/runs/model.ckpt", "env": {"HF_TOKEN": TOKEN}},
            {"source": "hf://org/trainkit-mlp/runs/other.ckpt", "hf_token": TOKEN},
            {"source": source, "hf_token": TOKEN, "env": {"HF_ENDPOINT": down}},  # offline: the cached copy
        ])
        seen = server.requests
    no_token, wrong, ok, via_env, missing, offline = results

    assert "needs a Hugging Face token" in no_token["error"] and "--hf_token" in no_token["error"] \
        and "HF_TOKEN" in no_token["error"]
    assert "rejected the token" in wrong["error"] and "HTTP 403" in wrong["error"]
    assert "hf_wrong_token_42" not in wrong["error"]
    assert (ok["step"], ok["kind"], ok["origin"]) == (80, "hf", source)
    assert Path(ok["step_dir"]).is_relative_to(tmp_path / "cache")
    assert via_env["step"] == 80 and via_env["step_dir"] == ok["step_dir"]  # same bytes: same unpacked dir
    assert any("/resolve/v1.0/runs/model.ckpt" in path for _, path, _ in seen)
    assert "file not found" in missing["error"] and "HTTP 404" in missing["error"]
    assert offline["step_dir"] == ok["step_dir"]  # HF_ENDPOINT is read per call, not at import

    # The token went over the wire only as a header, and nowhere else: not to disk, logs or messages.
    assert {h.get("authorization") for _, _, h in seen} == {None, "Bearer hf_wrong_token_42", f"Bearer {TOKEN}"}
    assert TOKEN not in output and "hf_wrong_token_42" not in output
    assert not files_containing(tmp_path, TOKEN.encode())
    assert not (tmp_path / "hf_home" / "token").exists() and not (tmp_path / "home").exists()


@pytest.mark.slow  # ~25 s: huggingface_hub retries a refused connection 5 times with backoff before giving up
def test_hub_unreachable(tmp_path):
    down = f"http://127.0.0.1:{closed_port()}"
    [result], _ = run_hub_cases(tmp_path, down, [{"source": "hf://org/repo/model.ckpt", "hf_token": TOKEN}])
    assert result["error"] == (f"cannot reach the Hugging Face Hub at {down} for hf://org/repo/model.ckpt; "
                               "check your network or HF_ENDPOINT")


# --- gs:// (a GCS JSON-API server on 127.0.0.1; gcsfs behind etils.epath talks to it as it would to GCS) ---------


@pytest.fixture
def gcs(monkeypatch):
    if importlib.util.find_spec("tensorflow"):
        pytest.skip("with TensorFlow installed, etils routes gs:// to tf.io.gfile instead of gcsfs")
    with GCSEmulator(buckets=("bucket",)) as emulator:
        for key, value in emulator.env.items():
            monkeypatch.setenv(key, value)
        epath_backend.fsspec_backend._get_filesystem.cache_clear()
        yield emulator
        epath_backend.fsspec_backend._get_filesystem.cache_clear()


def upload(local: Path, remote: str) -> None:
    for file in local.rglob("*"):
        if file.is_file():
            target = epath.Path(remote) / file.relative_to(local).as_posix()
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(file.read_bytes())


@pytest.mark.slow
def test_gs_sources_are_copied_into_the_cache(gcs, workdir, packed_bytes, tmp_path):
    upload(workdir, "gs://bucket/W")
    epath.Path("gs://bucket/model.ckpt").write_bytes(packed_bytes)
    checkpoints = "gs://bucket/W/checkpoints"
    assert list_steps(checkpoints) == [40, 80]  # the uploaded tmp dir 000120.orbax-checkpoint-tmp-* is not a step
    write_alias(checkpoints, "best", 80)  # on an object store: one plain object write
    assert read_alias(checkpoints, "best") == 80 and read_alias(checkpoints, "last") == 80
    assert verify_manifest("gs://bucket/W/checkpoints/000040") == []

    cache = tmp_path / "cache"
    for source, step in [("gs://bucket/W", 80), ("gs://bucket/W/checkpoints/000040", 40),
                         ("gs://bucket/W/checkpoints/best", 80), ("gs://bucket/model.ckpt", 80)]:
        resolved = resolve_source(source, cache_dir=str(cache))
        assert (resolved.step, resolved.kind, resolved.origin) == (step, "gs", source)
        assert resolved.step_dir.is_relative_to(cache) and verify_manifest(resolved.step_dir) == []
    assert resolve_source("gs://bucket/W", cache_dir=str(cache)).step_dir.is_relative_to(cache / "gs")
    assert "does not exist" in error_of("gs://bucket/nope", cache_dir=str(cache))
