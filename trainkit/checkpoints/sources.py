"""SOURCE → a local step directory: the one place that understands every way to name a checkpoint.

```
resolve_source("W")                           # a workdir: its `last` alias, else its newest complete step
resolve_source("W/checkpoints/000040")        # a step dir;  "W/checkpoints/best" an alias file;  "W/checkpoints"
resolve_source("model.ckpt")                  # a packed file, unpacked into the cache
resolve_source("https://host/model.ckpt")     # downloaded into the cache (resumable, size- and hash-checked)
resolve_source("hf://ORG/REPO@rev/dir/model.ckpt", hf_token=...)   # via huggingface_hub; token never stored
resolve_source("gs://bucket/W")               # any of the above on GCS, copied into the cache
```

Cache (`cache_dir`, else `$TRAINKIT_CACHE`, else `~/.cache/trainkit`): `downloads/` fetched files (+ a `.json`
sidecar with size and sha256), `hf/` huggingface_hub's cache, `unpacked/<sha256>/000040/` unpacked packed files,
`gs/<key>/000040/` step dirs copied from GCS. Nothing is written outside it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import re
import urllib.parse

from etils import epath

from trainkit.checkpoints import fetching
from trainkit.checkpoints.layout import (
    MAX_ALIAS_BYTES,
    directory_atomically,
    find_step_dir,
    is_complete_step_dir,
    list_steps,
    parse_alias,
    read_alias,
    step_dir_name,
)
from trainkit.errors import TrainkitError
from trainkit.checkpoints.manifest import MANIFEST_NAME, list_files, verify_manifest
from trainkit.checkpoints.packing import read_pack_info, unpack
from trainkit.paths import absolute_path, default_cache_dir, is_local

_TMP_DIR_MARK = ".orbax-checkpoint-tmp"
_STEP_FILES = ("_CHECKPOINT_METADATA", MANIFEST_NAME)
_HF_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_HF_REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}


@dataclasses.dataclass(frozen=True)
class ResolvedSource:
    """A checkpoint SOURCE resolved to a complete step dir on this machine.

    `origin` is what the user passed (URL credentials and query strings removed); `kind` says which form it was:
    "workdir", "checkpoints_dir", "step_dir", "alias", "packed", "url", "hf" or "gs". `sha256` is the packed
    file's hash when the checkpoint came as one file.
    """

    step_dir: pathlib.Path
    step: int
    origin: str
    kind: str
    sha256: str | None = None
    workdir: pathlib.Path | None = None  # the local workdir (holding checkpoints/) the step lies in, if any


def resolve_source(source: str, *, hf_token: str | None = None, cache_dir: str | None = None,
                   verify: bool = True) -> ResolvedSource:
    """Resolve any SOURCE (see the module docstring) to a local step dir; raise TrainkitError if it cannot.

    Example: `resolve_source("runs/mnist").step_dir == Path("runs/mnist/checkpoints/000040")`.
    `hf_token` (else `$HF_TOKEN`) is used only for hf:// and is never written anywhere. With `verify`, a damaged
    step (it fails its manifest) is refused; `python -m trainkit.ckpt verify` passes False to list the damage.
    """
    source = absolute_path(os.fspath(source).strip())
    if not source:
        raise TrainkitError("the checkpoint SOURCE is empty; pass a workdir, step dir, model.ckpt file or URL")
    cache = pathlib.Path(absolute_path(cache_dir)) if cache_dir else default_cache_dir()
    scheme = urllib.parse.urlsplit(source).scheme.lower() if "://" in source else ""
    if scheme == "hf":
        return _resolve_hf(source, hf_token or os.environ.get("HF_TOKEN") or None, cache)
    if scheme in ("http", "https"):
        return _resolve_url(source, cache)
    if scheme == "gs":
        return _resolve_gs(source, cache)
    if scheme == "file":
        path = pathlib.Path(urllib.parse.unquote(urllib.parse.urlsplit(source).path))
        return _intact(_resolve_local(path, source, cache), verify)
    if scheme:
        raise TrainkitError(
            f"checkpoint SOURCE {fetching.redact_url(source)} uses the unsupported scheme {scheme}://; "
            "use a local path, https://, hf:// or gs://"
        )
    return _intact(_resolve_local(pathlib.Path(source), source, cache), verify)


# ---------------------------------------------------------------------------------------------------------------
# Paths: workdir / checkpoints dir / step dir / alias / packed file (local or epath).


def _find_step(path: epath.Path, shown: str) -> tuple[epath.Path, int, str]:
    """Classify `path`: (step dir, step, kind), or (the file, -1, "packed") for a candidate packed file."""
    if not path.exists():
        raise TrainkitError(
            f"checkpoint SOURCE {shown} does not exist; pass a workdir, a step dir like W/checkpoints/000040, "
            "an alias like W/checkpoints/last, a model.ckpt file or a URL"
        )
    if path.is_file():
        size = os.path.getsize(path) if is_local(path) else path.stat().length
        if size <= MAX_ALIAS_BYTES:
            text = path.read_bytes().decode("utf-8", "replace")
            if text.strip().isdigit():
                step = parse_alias(text, shown)
                return _alias_target(path.parent, step, shown), step, "alias"
        return path, -1, "packed"
    if _TMP_DIR_MARK in path.name:
        steps = list_steps(path.parent)
        hint = f"such as {path.parent / step_dir_name(steps[-1])}" if steps else "(there is none yet)"
        raise TrainkitError(
            f"{shown} is an unfinished save (Orbax tmp dir, killed mid-save); pass a complete step dir {hint}"
        )
    if (path / "checkpoints").is_dir():
        return _from_checkpoints_dir(path / "checkpoints", shown, "workdir")
    if path.name.isdigit():
        if is_complete_step_dir(path) and any((path / f).exists() for f in _STEP_FILES):
            return path, int(path.name), "step_dir"
        raise TrainkitError(
            f"{shown} is not a complete checkpoint step (no {' or '.join(_STEP_FILES)}); "
            "pass a finished step dir or the workdir"
        )
    if list_steps(path) or read_alias(path, "last") is not None:
        return _from_checkpoints_dir(path, shown, "checkpoints_dir")
    raise TrainkitError(
        f"{shown} is not a checkpoint: it has no checkpoints/ directory and no step files; pass a workdir "
        "(containing checkpoints/), a step dir like W/checkpoints/000040 or a model.ckpt file"
    )


def _from_checkpoints_dir(checkpoints_dir: epath.Path, shown: str, kind: str) -> tuple[epath.Path, int, str]:
    step = read_alias(checkpoints_dir, "last")
    if step is not None:
        return _alias_target(checkpoints_dir, step, f"{checkpoints_dir}/last"), step, kind
    steps = list_steps(checkpoints_dir)
    if not steps:
        raise TrainkitError(
            f"{shown} has no complete checkpoint in {checkpoints_dir} (unfinished saves are ignored); "
            "train until a checkpoint is saved, or pass another SOURCE"
        )
    return epath.Path(find_step_dir(checkpoints_dir, steps[-1])), steps[-1], kind


def _alias_target(checkpoints_dir: epath.Path, step: int, shown: str) -> epath.Path:
    step_dir = find_step_dir(checkpoints_dir, step)
    if step_dir is None:
        steps = list_steps(checkpoints_dir)
        hint = (f"pass an existing step dir such as {checkpoints_dir / step_dir_name(steps[-1])}" if steps
                else "no complete steps are left in that directory")
        raise TrainkitError(
            f"alias {shown} points at step {step_dir_name(step)}, which is missing from {checkpoints_dir} "
            f"(deleted or never finished); {hint}"
        )
    return step_dir


def _intact(resolved: ResolvedSource, verify: bool) -> ResolvedSource:
    """A local step is read in place, so check it against its manifest first (a packed file was checked when it
    was unpacked). A step without a manifest yet (Orbax finished it, the run died before the manifest) is read as
    Orbax left it."""
    if verify and resolved.kind != "packed" and (resolved.step_dir / MANIFEST_NAME).exists():
        problems = verify_manifest(resolved.step_dir)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise TrainkitError(
                f"checkpoint {resolved.origin} is damaged: {problems[0]}{more}; pass another step "
                "(`python -m trainkit.ckpt ls W` lists them) or restore this one from a copy"
            )
    return resolved


def _resolve_local(path: pathlib.Path, origin: str, cache: pathlib.Path) -> ResolvedSource:
    found, step, kind = _find_step(epath.Path(path), origin)
    if kind != "packed":
        step_dir = pathlib.Path(os.fspath(found)).absolute()
        workdir = step_dir.parent.parent if step_dir.parent.name == "checkpoints" else None
        return ResolvedSource(step_dir, step, origin, kind, workdir=workdir)
    step_dir, sha = _unpack_cached(path, cache, shown=origin)
    return ResolvedSource(step_dir, int(step_dir.name), origin, "packed", sha)


def _unpack_cached(
    file: pathlib.Path, cache: pathlib.Path, *, shown: str, sha256: str | None = None
) -> tuple[pathlib.Path, str]:
    """Unpack `file` into `cache/unpacked/<sha256>/`, reusing an earlier unpack of the same bytes."""
    try:
        info = read_pack_info(file)  # fails fast, before hashing a large file that is not ours
    except TrainkitError:
        raise TrainkitError(
            f"{shown} is not a packed trainkit checkpoint (no {'trainkit-packed.json'} marker); pass a file made "
            "by `python -m trainkit.ckpt pack`, a workdir or a step dir"
        ) from None
    sha = sha256 or fetching.sha256_memo(file, cache)
    dest = cache / "unpacked" / sha
    done = dest / step_dir_name(info.step)
    if done.is_dir():
        return done, sha
    with fetching.locked(cache / "locks" / f"unpack-{sha}.lock"):
        if not done.is_dir():
            try:
                unpack(file, dest)
            except TrainkitError as e:
                raise TrainkitError(str(e).replace(os.fspath(file), shown)) from None
    return done, sha


# ---------------------------------------------------------------------------------------------------------------
# Remote sources.


def _resolve_url(url: str, cache: pathlib.Path) -> ResolvedSource:
    shown = fetching.redact_url(url)
    file, sha = fetching.download_url(url, cache)
    try:
        step_dir, sha = _unpack_cached(file, cache, shown=shown, sha256=sha)
    except TrainkitError:
        fetching.forget_download(file)  # a fixed file on the server is fetched afresh next time
        raise
    return ResolvedSource(step_dir, int(step_dir.name), shown, "url", sha)


def _parse_hf(source: str) -> tuple[str, str, str | None, str]:
    """hf://[datasets/]ORG/REPO[@revision]/path/in/repo → (repo_type, repo_id, revision, filename)."""
    parts = source[len("hf://"):].split("/")
    repo_type = "model"
    if parts and parts[0] in _HF_REPO_TYPES:
        repo_type = _HF_REPO_TYPES[parts.pop(0)]
    usage = "; write it as hf://ORG/REPO/path/model.ckpt or hf://ORG/REPO@revision/path/model.ckpt"
    if len(parts) < 3:
        raise TrainkitError(f"{source} names no file in the repo{usage}")
    org, repo_rev, *path = parts
    repo, _, revision = repo_rev.partition("@")
    if not (_HF_NAME.match(org) and _HF_NAME.match(repo)):
        raise TrainkitError(f"{source} has an invalid repo name {org}/{repo}{usage}")
    if any(p in ("", ".", "..") for p in path):
        raise TrainkitError(f"{source} has an invalid path in the repo{usage}")
    return repo_type, f"{org}/{repo}", urllib.parse.unquote(revision) or None, "/".join(path)


def _resolve_hf(source: str, token: str | None, cache: pathlib.Path) -> ResolvedSource:
    repo_type, repo_id, revision, filename = _parse_hf(source)
    try:
        import huggingface_hub
    except ImportError:
        raise TrainkitError("hf:// sources need huggingface_hub; pip install 'trainkit[hub]'") from None
    endpoint = os.environ.get("HF_ENDPOINT") or None  # read now, not when huggingface_hub was imported
    try:
        local = huggingface_hub.hf_hub_download(
            repo_id, filename, repo_type=repo_type, revision=revision, cache_dir=cache / "hf",
            token=token or False,  # False: never fall back to a token file on disk
            endpoint=endpoint,
        )
    except Exception as e:  # noqa: BLE001 - every failure becomes one clean line without the token
        message = _hf_error_message(e, source, repo_id, has_token=token is not None, endpoint=endpoint)
        raise TrainkitError(message.replace(token, "***") if token else message) from None
    blob = pathlib.Path(os.path.realpath(local))
    step_dir, sha = _unpack_cached(blob, cache, shown=source)
    return ResolvedSource(step_dir, int(step_dir.name), source, "hf", sha)


def _hf_error_message(e: BaseException, source: str, repo_id: str, *, has_token: bool, endpoint: str | None) -> str:
    chain, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or e.__context__
    status = next((r.status_code for x in chain if (r := getattr(x, "response", None)) is not None
                   and isinstance(getattr(r, "status_code", None), int)), None)
    names = {type(x).__name__ for x in chain}
    how = "pass --hf_token or set HF_TOKEN"
    if status in (401, 403) and has_token:
        return (f"the Hugging Face Hub rejected the token for {repo_id} (HTTP {status}: invalid, expired or without "
                f"access to this repo); {how} with a token that can read it")
    if status in (401, 403) or "GatedRepoError" in names:
        return (f"{source} needs a Hugging Face token (HTTP {status or 401}: private or gated repo, or it does not "
                f"exist); {how}")
    if "RevisionNotFoundError" in names:
        return f"{source}: revision not found in {repo_id}; check the @revision (a branch, tag or commit)"
    if "RepositoryNotFoundError" in names:
        return f"{source}: repository {repo_id} not found on the Hub; check ORG/REPO (if it is private, {how})"
    if status == 404 or "RemoteEntryNotFoundError" in names:
        return f"{source}: file not found in {repo_id} (HTTP 404); check the path inside the repo"
    if any(n in names for n in ("ConnectError", "ConnectionRefusedError", "ConnectTimeout", "TimeoutException",
                                "OfflineModeIsEnabled", "LocalEntryNotFoundError")):
        where = endpoint or "https://huggingface.co"
        return f"cannot reach the Hugging Face Hub at {where} for {source}; check your network or HF_ENDPOINT"
    detail = f"HTTP {status}" if status else type(chain[-1]).__name__
    return f"downloading {source} from the Hugging Face Hub failed ({detail}); check the repo, path and revision"


def _resolve_gs(source: str, cache: pathlib.Path) -> ResolvedSource:
    shown = source.rstrip("/")
    try:
        found, step, kind = _find_step(epath.Path(shown), shown)
    except TrainkitError:
        raise
    except ImportError:
        raise TrainkitError("gs:// sources need gcsfs; pip install 'trainkit[gcs]'") from None
    except Exception as e:  # noqa: BLE001 - auth and network errors of the GCS client
        raise TrainkitError(
            f"cannot read {shown} ({type(e).__name__}); check the path and your credentials "
            "(gcloud auth application-default login)"
        ) from None
    if kind == "packed":
        file, sha = fetching.copy_remote_file(found, cache)
        step_dir, sha = _unpack_cached(file, cache, shown=shown, sha256=sha)
        return ResolvedSource(step_dir, step=int(step_dir.name), origin=shown, kind="gs", sha256=sha)
    return ResolvedSource(copy_step_dir(found, cache), step, shown, "gs")


def copy_step_dir(remote: epath.Path, cache: pathlib.Path) -> pathlib.Path:
    """Copy a finished remote step dir to `cache/gs/<key>/<name>` once. A finished step dir never changes, but a
    path can be saved again (`--fresh --overwrite`), so the key covers the path and the manifest's bytes."""
    manifest = remote / MANIFEST_NAME
    tag = manifest.read_bytes() if manifest.exists() else b""
    key = hashlib.sha256(os.fspath(remote).encode() + b"\0" + tag).hexdigest()[:32]
    done = cache / "gs" / key / remote.name
    if done.is_dir():
        return done
    with fetching.locked(cache / "locks" / f"gs-{key}.lock"):
        if done.is_dir():
            return done
        with directory_atomically(done, "copying") as tmp:
            for rel in list_files(remote):
                fetching.copy_file(remote / rel, fetching.inside(tmp, rel), shown=f"{remote}/{rel}")
            if (tmp / MANIFEST_NAME).exists() and (problems := verify_manifest(tmp)):
                raise TrainkitError(f"the copy of {remote} fails its manifest ({problems[0]}); try again")
    return done
