"""A Google Cloud Storage JSON-API server on 127.0.0.1, in memory, for tests.

It speaks the part of the API that gcsfs (behind etils.epath) and tensorstore's `gcs` driver (behind Orbax) use:
object metadata and media reads with Range and generation preconditions, media/multipart/resumable uploads,
listing with prefix/delimiter/pages, delete, rewrite/copy and batch requests. Point the clients at it with

    STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT          (gcsfs)
    TENSORSTORE_GCS_HTTP_URL=http://127.0.0.1:PORT        (tensorstore)
    GOOGLE_AUTH_TOKEN_FOR_TESTING=fake                    (tensorstore: no credential lookup)

Run standalone with `python tests/gcs_emulator.py PORT`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import sys
import threading
import time
from dataclasses import dataclass
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlsplit

import google_crc32c


@dataclass
class Blob:
    data: bytes
    generation: int
    content_type: str = "application/octet-stream"

    def resource(self, bucket: str, name: str) -> dict:
        crc = google_crc32c.value(self.data).to_bytes(4, "big")
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(self.generation / 1e6))
        return {"kind": "storage#object", "bucket": bucket, "name": name, "id": f"{bucket}/{name}/{self.generation}",
                "size": str(len(self.data)), "generation": str(self.generation), "metageneration": "1",
                "contentType": self.content_type, "timeCreated": stamp, "updated": stamp, "storageClass": "STANDARD",
                "md5Hash": base64.b64encode(hashlib.md5(self.data).digest()).decode(),
                "crc32c": base64.b64encode(crc).decode()}


class Store:
    """Buckets of blobs behind one lock; generations are unique and increasing, as on GCS."""

    def __init__(self, buckets: tuple[str, ...] | None = None) -> None:
        self.buckets: dict[str, dict[str, Blob]] = {name: {} for name in buckets or ()}
        self.any_bucket = buckets is None  # otherwise only these exist (and those created through the API)
        self.lock = threading.Lock()
        self._clock = 0
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, for tests that want to look
        self.refuse_uploads = False  # tests set it to answer every upload 403 Forbidden

    def next_generation(self) -> int:
        self._clock = max(self._clock + 1, int(time.time() * 1e6))
        return self._clock

    def objects(self, bucket: str) -> dict[str, Blob]:
        if bucket not in self.buckets and not self.any_bucket:
            raise Reply(404, {"error": {"code": 404, "message": "The specified bucket does not exist."}})
        return self.buckets.setdefault(bucket, {})


class Reply(Exception):
    def __init__(self, status: int, body: bytes | dict = b"", headers: dict | None = None):
        super().__init__(status)
        self.status, self.body, self.headers = status, body, headers or {}


def _check_preconditions(blob: Blob | None, query: dict) -> None:
    if "ifGenerationMatch" in query:
        want = int(query["ifGenerationMatch"])
        if (blob.generation if blob else 0) != want:
            raise Reply(412, {"error": {"code": 412, "message": "Precondition Failed"}})
    if "ifGenerationNotMatch" in query and blob is not None and blob.generation == int(query["ifGenerationNotMatch"]):
        raise Reply(304)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    store: Store
    uploads: dict[str, dict]

    def log_message(self, *args) -> None:  # quiet
        pass

    def _serve(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        try:
            status, payload, headers = self.route(method, self.path, dict(self.headers.items()), body)
        except Reply as reply:
            status, payload, headers = reply.status, reply.body, reply.headers
        self._send(status, payload, headers, head_only=method == "HEAD")

    def _send(self, status: int, payload: bytes | dict, headers: dict, head_only: bool = False) -> None:
        if isinstance(payload, dict):
            payload, headers = json.dumps(payload).encode(), {"Content-Type": "application/json", **headers}
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if not head_only and status not in (204, 304):
            try:
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):  # a client that read only what it needed
                self.close_connection = True

    do_GET = lambda self: self._serve("GET")  # noqa: E731
    do_HEAD = lambda self: self._serve("HEAD")  # noqa: E731
    do_POST = lambda self: self._serve("POST")  # noqa: E731
    do_PUT = lambda self: self._serve("PUT")  # noqa: E731
    do_DELETE = lambda self: self._serve("DELETE")  # noqa: E731
    do_PATCH = lambda self: self._serve("PATCH")  # noqa: E731

    # --- routing -----------------------------------------------------------------------------------------------

    def route(self, method: str, target: str, headers: dict, body: bytes) -> tuple[int, bytes | dict, dict]:
        url = urlsplit(target)
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        path = url.path
        with self.store.lock:
            self.store.requests.append((method, target))
        if path == "/batch/storage/v1":
            return self.batch(headers, body)
        if m := re.fullmatch(r"/upload/storage/v1/b/([^/]+)/o", path):
            return self.upload(method, unquote(m[1]), query, headers, body)
        m = re.fullmatch(r"(?:/download)?/storage/v1/b/([^/]+)/o/(.+?)/(rewriteTo|copyTo)/b/([^/]+)/o/(.+)", path)
        if m and method == "POST":
            return self.copy(unquote(m[1]), unquote(m[2]), unquote(m[4]), unquote(m[5]), m[3], query)
        if m := re.fullmatch(r"(?:/download)?/storage/v1/b/([^/]+)/o/(.+)", path):
            return self.object(method, unquote(m[1]), unquote(m[2]), query, headers)
        if m := re.fullmatch(r"/storage/v1/b/([^/]+)/o/?", path):
            return self.listing(unquote(m[1]), query)
        if path.rstrip("/") == "/storage/v1/b" and method == "POST":  # create a bucket
            name = json.loads(body)["name"]
            with self.store.lock:
                self.store.buckets.setdefault(name, {})
            return 200, {"kind": "storage#bucket", "name": name, "id": name, "location": "US"}, {}
        if m := re.fullmatch(r"/storage/v1/b/([^/]+)/storageLayout", path):
            return 200, {"kind": "storage#storageLayout", "bucket": unquote(m[1]), "location": "US"}, {}
        if m := re.fullmatch(r"/storage/v1/b/([^/]+)/?", path):
            with self.store.lock:
                self.store.objects(unquote(m[1]))  # 404 for a bucket that does not exist
            return 200, {"kind": "storage#bucket", "name": unquote(m[1]), "id": unquote(m[1]), "location": "US"}, {}
        return 404, {"error": {"code": 404, "message": f"no route for {method} {path}"}}, {}

    def object(self, method: str, bucket: str, name: str, query: dict, headers: dict):
        with self.store.lock:
            objects = self.store.objects(bucket)
            blob = objects.get(name)
            if method == "DELETE":
                if blob is None:
                    raise Reply(404, {"error": {"code": 404, "message": "No such object"}})
                _check_preconditions(blob, query)
                del objects[name]
                return 204, b"", {}
        if blob is None:
            raise Reply(404, {"error": {"code": 404, "message": f"No such object: {bucket}/{name}"}})
        _check_preconditions(blob, query)
        meta = {"x-goog-generation": str(blob.generation), "x-goog-metageneration": "1",
                "x-goog-stored-content-length": str(len(blob.data)), "ETag": f'"{blob.generation}"'}
        if query.get("alt") != "media" and "/download/" not in self.path:
            return 200, blob.resource(bucket, name), meta
        data, status = blob.data, 200
        if rng := headers.get("Range") or headers.get("range"):
            first, _, last = rng.removeprefix("bytes=").partition("-")
            if first == "":  # suffix range: the last N bytes
                start, end = max(0, len(data) - int(last)), len(data) - 1
            else:
                start, end = int(first), min(int(last) if last else len(data) - 1, len(data) - 1)
            if start >= len(data) and len(data) > 0:
                raise Reply(416, {"error": {"code": 416, "message": "Requested range not satisfiable"}})
            meta["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data, status = data[start:end + 1], 206
        if status == 200:
            crc = google_crc32c.value(blob.data).to_bytes(4, "big")
            meta["x-goog-hash"] = f"crc32c={base64.b64encode(crc).decode()}"
        return status, data, {"Content-Type": blob.content_type, **meta}

    def listing(self, bucket: str, query: dict):
        prefix, delimiter = query.get("prefix", ""), query.get("delimiter", "")
        start, end = query.get("startOffset", ""), query.get("endOffset")
        limit = int(query.get("maxResults") or 1000)
        with self.store.lock:
            names = sorted(n for n in self.store.objects(bucket) if n.startswith(prefix) and n >= start
                           and (end is None or n < end))
            blobs = {n: self.store.objects(bucket)[n] for n in names}
        items, prefixes, seen = [], [], set()
        for n in names:
            rest = n[len(prefix):]
            if delimiter and delimiter in rest:
                p = prefix + rest[:rest.index(delimiter) + len(delimiter)]
                if p not in seen:
                    seen.add(p)
                    prefixes.append((p, n))
            else:
                items.append((n, n))
        entries = sorted([("item", n, key) for n, key in items] + [("prefix", p, key) for p, key in prefixes],
                         key=lambda e: e[1])
        token = query.get("pageToken", "")
        entries = [e for e in entries if e[1] > token] if token else entries
        page, more = entries[:limit], len(entries) > limit
        reply = {"kind": "storage#objects",
                 "items": [blobs[n].resource(bucket, n) for kind, n, _ in page if kind == "item"],
                 "prefixes": [p for kind, p, _ in page if kind == "prefix"]}
        if more:
            reply["nextPageToken"] = page[-1][1]
        return 200, reply, {}

    def _put(self, bucket: str, name: str, data: bytes, query: dict, content_type: str | None) -> dict:
        with self.store.lock:
            objects = self.store.objects(bucket)
            _check_preconditions(objects.get(name), {k: v for k, v in query.items() if k == "ifGenerationMatch"})
            blob = Blob(data, self.store.next_generation(), content_type or "application/octet-stream")
            objects[name] = blob
        return blob.resource(bucket, name)

    def upload(self, method: str, bucket: str, query: dict, headers: dict, body: bytes):
        if self.store.refuse_uploads:
            raise Reply(403, {"error": {"code": 403, "message": "storage.objects.create access denied (test)"}})
        kind = query.get("uploadType", "media")
        if method == "PUT" or (kind == "resumable" and "upload_id" in query):
            return self.resume_upload(bucket, query, headers, body)
        if kind == "media":
            return 200, self._put(bucket, query["name"], body, query, headers.get("Content-Type")), {}
        if kind == "multipart":
            message = BytesParser(policy=HTTP).parsebytes(
                b"Content-Type: " + headers["Content-Type"].encode() + b"\r\n\r\n" + body)
            meta_part, media_part = list(message.iter_parts())[:2]
            meta = json.loads(meta_part.get_payload(decode=True))
            name = meta.get("name") or query["name"]
            return 200, self._put(bucket, name, media_part.get_payload(decode=True), {**meta, **query},
                                  meta.get("contentType")), {}
        if kind == "resumable":
            meta = json.loads(body or b"{}")
            upload_id = f"{time.monotonic_ns()}-{threading.get_ident()}"
            with self.store.lock:
                self.uploads[upload_id] = {"name": meta.get("name") or query.get("name"), "query": query,
                                           "data": bytearray(), "contentType": meta.get("contentType")}
            host = headers.get("Host") or headers.get("host")
            location = f"http://{host}/upload/storage/v1/b/{quote(bucket)}/o?uploadType=resumable&upload_id={upload_id}"
            return 200, b"", {"Location": location}
        raise Reply(400, {"error": {"code": 400, "message": f"uploadType {kind}"}})

    def resume_upload(self, bucket: str, query: dict, headers: dict, body: bytes):
        state = self.uploads[query["upload_id"]]
        state["data"] += body
        total = (headers.get("Content-Range") or "*/*").rpartition("/")[2]
        if total == "*":
            return 308, b"", {"Range": f"bytes=0-{len(state['data']) - 1}"} if state["data"] else {}
        del self.uploads[query["upload_id"]]
        return 200, self._put(bucket, state["name"], bytes(state["data"]), state["query"], state["contentType"]), {}

    def copy(self, bucket: str, name: str, to_bucket: str, to_name: str, how: str, query: dict):
        with self.store.lock:
            blob = self.store.objects(bucket).get(name)
        if blob is None:
            raise Reply(404, {"error": {"code": 404, "message": "No such object"}})
        resource = self._put(to_bucket, to_name, blob.data, query, blob.content_type)
        if how == "copyTo":
            return 200, resource, {}
        size = resource["size"]
        return 200, {"kind": "storage#rewriteResponse", "done": True, "resource": resource,
                     "totalBytesRewritten": size, "objectSize": size}, {}

    def batch(self, headers: dict, body: bytes):
        message = BytesParser(policy=HTTP).parsebytes(
            b"Content-Type: " + headers["Content-Type"].encode() + b"\r\n\r\n" + body)
        boundary, out = "batch_reply_boundary", []
        for part in message.iter_parts():
            raw = part.get_payload(decode=True)
            head, _, inner_body = raw.partition(b"\r\n\r\n")
            request_line, *header_lines = head.decode().split("\r\n")
            method, target = request_line.split()[:2]
            inner_headers = dict(line.split(": ", 1) for line in header_lines if ": " in line)
            try:
                status, payload, _ = self.route(method, urlsplit(target)._replace(scheme="", netloc="").geturl(),
                                                inner_headers, inner_body)
            except Reply as reply:
                status, payload = reply.status, reply.body
            payload = json.dumps(payload).encode() if isinstance(payload, dict) else payload
            cid = part.get("Content-ID", "")
            out.append(f"--{boundary}\r\nContent-Type: application/http\r\nContent-ID: response-{cid.strip('<>')}"
                       f"\r\n\r\nHTTP/1.1 {status} OK\r\nContent-Type: application/json\r\n"
                       f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload + b"\r\n")
        reply = b"".join(out) + f"--{boundary}--\r\n".encode()
        return 200, reply, {"Content-Type": f"multipart/mixed; boundary={boundary}"}


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:  # clients hanging up early are normal
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


class GCSEmulator:
    """`with GCSEmulator() as gcs: gcs.env` — a running server and the environment that points clients at it.
    Every bucket exists (created on first use) unless `buckets` names the ones that do."""

    def __init__(self, port: int = 0, buckets: tuple[str, ...] | None = None):
        self.store = Store(buckets)
        handler = type("BoundHandler", (Handler,), {"store": self.store, "uploads": {}})
        self.server = _QuietServer(("127.0.0.1", port), handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.env = {"STORAGE_EMULATOR_HOST": self.url, "TENSORSTORE_GCS_HTTP_URL": self.url,
                    "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake-token", "GCE_METADATA_HOST": "127.0.0.1:1",
                    "GCE_METADATA_ROOT": "127.0.0.1:1", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "GCSEmulator":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def names(self, bucket: str, prefix: str = "") -> list[str]:
        with self.store.lock:
            return sorted(n for n in self.store.objects(bucket) if n.startswith(prefix))

    @property
    def refuse_uploads(self) -> bool:
        return self.store.refuse_uploads

    @refuse_uploads.setter
    def refuse_uploads(self, value: bool) -> None:
        self.store.refuse_uploads = value

    def read(self, bucket: str, name: str) -> bytes:
        with self.store.lock:
            return self.store.objects(bucket)[name].data


if __name__ == "__main__":
    with GCSEmulator(int(sys.argv[1]) if len(sys.argv) > 1 else 0) as emulator:
        print(" ".join(f"{k}={v}" for k, v in emulator.env.items()), flush=True)
        threading.Event().wait()
