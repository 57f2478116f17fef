"""Bring remote bytes into the trainkit cache: atomically, resumably (HTTP Range), size- and hash-checked.

Only `trainkit.checkpoints.sources` uses this. Every path written is inside the cache dir: names are sanitized and
checked, and a finished file appears only by rename from its `.part` file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import json
import os
import pathlib
import posixpath
import re
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator

from etils import epath

from trainkit.errors import TrainkitError
from trainkit.checkpoints.manifest import file_sha256

_CHUNK = 1 << 20
_TIMEOUT_S = 60
_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def redact_url(url: str) -> str:
    """`url` without user:password and without its query string (either may hold a secret)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "<redacted>" if parts.query else "", ""))


def safe_name(name: str) -> str:
    """A file name that cannot leave its directory: letters, digits, `._-` only, no leading dot."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")[:100] or "download"


def inside(root: pathlib.Path, relative: str) -> pathlib.Path:
    """`root / relative`, refusing any path that would end up outside `root`."""
    target = root / relative
    if not target.resolve().is_relative_to(root.resolve()) or os.path.isabs(relative):
        raise TrainkitError(f"refusing to write {relative!r} outside the cache dir {root}; the source is unsafe")
    return target


@contextlib.contextmanager
def locked(lock_file: pathlib.Path) -> Iterator[None]:
    """Hold an exclusive lock (several processes on one host may fetch the same SOURCE at once)."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _write_json(path: pathlib.Path, value: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    tmp.write_text(json.dumps(value, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _read_json(path: pathlib.Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def sha256_memo(file: pathlib.Path, cache: pathlib.Path) -> str:
    """sha256 of `file`, remembered in the cache while the file's inode, size and mtime stay the same."""
    st = os.stat(file)
    key = hashlib.sha256(os.path.realpath(file).encode()).hexdigest()[:32]
    memo_file = cache / "hashes" / f"{key}.json"
    stamp = {"ino": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    memo = _read_json(memo_file)
    if memo is not None and memo.get("stamp") == stamp and isinstance(memo.get("sha256"), str):
        return memo["sha256"]
    sha = file_sha256(file)
    memo_file.parent.mkdir(parents=True, exist_ok=True)
    _write_json(memo_file, {"stamp": stamp, "sha256": sha})
    return sha


def _sidecar(file: pathlib.Path) -> pathlib.Path:
    return file.with_name(file.name + ".json")


def _cached_download(
    cache: pathlib.Path, key: str, name: str, fetch: Callable[[pathlib.Path], tuple[int, str]]
) -> tuple[pathlib.Path, str]:
    """Return `cache/downloads/<key>-<name>` and its sha256, calling `fetch(part_file)` only if it is absent."""
    downloads = cache / "downloads"
    final = inside(downloads, f"{key}-{safe_name(name)}")

    def cached() -> tuple[pathlib.Path, str] | None:
        if not final.is_file():
            return None
        record = _read_json(_sidecar(final))
        if record and record.get("size") == final.stat().st_size and isinstance(record.get("sha256"), str):
            return final, record["sha256"]
        sha = file_sha256(final)
        _write_json(_sidecar(final), {"size": final.stat().st_size, "sha256": sha})
        return final, sha

    if hit := cached():
        return hit
    with locked(cache / "locks" / f"download-{key}.lock"):
        if hit := cached():
            return hit
        part = final.with_name(final.name + ".part")
        size, sha = fetch(part)
        os.replace(part, final)
        _write_json(_sidecar(final), {"size": size, "sha256": sha})
        return final, sha


def forget_download(file: pathlib.Path) -> None:
    """Delete a downloaded file and its sidecar (e.g. it turned out not to be a checkpoint)."""
    file.unlink(missing_ok=True)
    _sidecar(file).unlink(missing_ok=True)


def download_url(url: str, cache: pathlib.Path) -> tuple[pathlib.Path, str]:
    """Download an https:// (or loopback http://) URL into the cache once; return (local file, sha256)."""
    shown = redact_url(url)
    parts = urllib.parse.urlsplit(url)
    if not parts.hostname:
        raise TrainkitError(f"URL {shown} has no host; write it as https://HOST/path/model.ckpt")
    if parts.scheme == "http" and parts.hostname not in _LOOPBACK_HOSTS:
        raise TrainkitError(f"plain http:// is accepted only for localhost; use https:// for {shown}")
    key = hashlib.sha256(url.encode()).hexdigest()[:24]
    name = posixpath.basename(urllib.parse.unquote(parts.path))
    return _cached_download(cache, key, name, lambda part: _http_fetch(url, shown, part))


def _reason(error: BaseException) -> str:
    reason = getattr(error, "reason", error)
    text = getattr(reason, "strerror", None) or str(reason) or type(reason).__name__
    return " ".join(str(text).split()).lower()


def _status_message(code: int, shown: str) -> str:
    if code == 404:
        return f"{shown} was not found (HTTP 404); check the URL"
    if code in (401, 403):
        return (f"{shown} refused access (HTTP {code}); use a public or pre-signed https:// URL, or for the Hugging "
                "Face Hub hf://ORG/REPO/path/model.ckpt with --hf_token or HF_TOKEN")
    return f"downloading {shown} failed with HTTP {code}; check the URL, or retry later"


def _http_fetch(url: str, shown: str, part: pathlib.Path, *, retry: bool = True) -> tuple[int, str]:
    """Fetch `url` into `part`, continuing a partial `part` with a Range request; return (size, sha256)."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "trainkit", "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=_TIMEOUT_S)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 416 and have and retry:  # the partial file is stale: start over
            part.unlink()
            return _http_fetch(url, shown, part, retry=False)
        raise TrainkitError(_status_message(e.code, shown)) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        host = urllib.parse.urlsplit(url).hostname
        raise TrainkitError(
            f"cannot reach {host} for {shown} ({_reason(e)}); check the URL and your network, or pass a local SOURCE"
        ) from None
    with response:
        digest = hashlib.sha256()
        total: int | None = None
        if response.status == 206 and have:
            match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", response.headers.get("Content-Range", "").strip())
            if not match or int(match[1]) != have:
                if not retry:
                    raise TrainkitError(f"{shown} answered a resume request wrongly; delete {part} and retry")
                response.close()
                part.unlink()
                return _http_fetch(url, shown, part, retry=False)
            total = int(match[2]) if match[2] != "*" else None
            with open(part, "rb") as f:  # the hash covers the bytes fetched before as well
                while chunk := f.read(_CHUNK):
                    digest.update(chunk)
            mode = "ab"
        else:  # a full answer (also when the server ignores Range)
            have, mode = 0, "wb"
            length = response.headers.get("Content-Length", "")
            total = int(length) if length.isdigit() else None
        got = have
        part.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(part, mode) as f:
                while chunk := response.read(_CHUNK):
                    digest.update(chunk)
                    f.write(chunk)
                    got += len(chunk)
        except (OSError, http.client.HTTPException) as e:
            raise TrainkitError(
                f"download of {shown} was interrupted after {got} of {total or '?'} bytes ({_reason(e)}); "
                "run the same command again to resume"
            ) from None
    if total is not None and got < total:
        raise TrainkitError(
            f"download of {shown} stopped at {got} of the {total} bytes the server announced (size mismatch); "
            "run the same command again to resume"
        )
    if total is not None and got > total:
        part.unlink(missing_ok=True)
        raise TrainkitError(
            f"download of {shown} gave {got} bytes, more than the {total} the server announced (size mismatch); "
            "check the URL"
        )
    return got, digest.hexdigest()


def copy_file(remote: epath.Path, target: pathlib.Path, *, shown: str) -> tuple[int, str]:
    """Copy one remote (epath) file to local `target`; check its size; return (size, sha256)."""
    expected = remote.stat().length
    target.parent.mkdir(parents=True, exist_ok=True)
    digest, got = hashlib.sha256(), 0
    with remote.open("rb") as src, open(target, "wb") as dst:
        while chunk := src.read(_CHUNK):
            digest.update(chunk)
            dst.write(chunk)
            got += len(chunk)
    if got != expected:
        target.unlink(missing_ok=True)
        raise TrainkitError(f"copying {shown} gave {got} bytes, expected {expected} (size mismatch); try again")
    return got, digest.hexdigest()


def copy_remote_file(remote: epath.Path, cache: pathlib.Path) -> tuple[pathlib.Path, str]:
    """Copy a remote (gs://) file into the cache once; return (local file, sha256)."""
    key = hashlib.sha256(os.fspath(remote).encode()).hexdigest()[:24]
    shown = os.fspath(remote)
    return _cached_download(cache, key, remote.name, lambda part: copy_file(remote, part, shown=shown))
