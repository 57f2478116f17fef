"""SOURCE resolution, aliases, manifests and packing, on a workdir that trainkit's CheckpointManager writes.

The workdir built here has steps 40 and 80 (real saves: eval/loss 0.1 then 0.3), a save killed mid-way
(`000120.orbax-checkpoint-tmp-*`), and the aliases the manager wrote: `last` = `final` = 80, `best` = 40.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from trainkit.checkpoints.layout import find_step_dir, list_steps, read_alias, write_alias
from trainkit.checkpoints.meta import FORMAT_VERSION
from trainkit.errors import TrainkitError
from trainkit.checkpoints.manifest import read_manifest, verify_manifest
from trainkit.checkpoints.packing import MARKER_NAME, pack, read_pack_info, unpack
from trainkit.checkpoints.sources import resolve_source


def state_tree(step: int) -> dict:
    """The small pytree saved at `step` (different values per step, so a wrong step is caught)."""
    return {
        "params": {"w": np.arange(12, dtype=np.float32).reshape(3, 4) * step, "b": np.full(4, step, np.float32)},
        "step": np.int32(step),
    }


def build_workdir(root: Path) -> Path:
    """Save steps 40 and 80 into `root/W` with trainkit's CheckpointManager, as training does; return W."""
    from trainkit.checkpoints.meta import CheckpointMeta
    from trainkit.checkpoints.manager import CheckpointManager
    from trainkit.config import base_config

    workdir = root / "W"
    config = base_config()
    config.model.name = "mlp"  # named in train_config.json (test_unpack_verifies_the_manifest edits it)
    config.checkpoint.update(keep_last=5, keep_best=1, best_metric="eval/loss", best_mode="min", keep_every=0,
                             async_save=False)
    manager = CheckpointManager(workdir, config)
    for step, loss in ((40, 0.1), (80, 0.3)):  # 40 stays the best
        manager.save(step, state_tree(step), {"next_index": step}, CheckpointMeta(model=config.model.name, step=step),
                     {"eval/loss": loss})
    manager.mark_final(80)
    manager.close()
    # A save killed mid-way: Orbax leaves a tmp dir that must never be listed or loaded.
    checkpoints = workdir / "checkpoints"
    shutil.copytree(checkpoints / "000080", checkpoints / "000120.orbax-checkpoint-tmp-1700000000")
    return workdir


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return build_workdir(tmp_path_factory.mktemp("orbax"))


@pytest.fixture(scope="module")
def packed(workdir, tmp_path_factory) -> Path:
    return pack(workdir / "checkpoints" / "000080", tmp_path_factory.mktemp("packed") / "model.ckpt")


@pytest.fixture
def cache(tmp_path) -> str:
    return str(tmp_path / "cache")


def copy_workdir(workdir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(workdir, tmp_path / "W"))


def error_of(source: str, **kw) -> str:
    """The message of the TrainkitError that resolving `source` raises (asserted to be one line)."""
    with pytest.raises(TrainkitError) as info:
        resolve_source(source, **kw)
    message = str(info.value)
    assert "\n" not in message
    return message


def restore(step_dir: Path) -> dict:
    import orbax.checkpoint as ocp

    manager = ocp.CheckpointManager(
        step_dir.parent, options=ocp.CheckpointManagerOptions(step_format_fixed_length=6), item_names=("state",)
    )
    restored = manager.restore(int(step_dir.name), args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    manager.close()
    return restored["state"]


# --- step dirs and aliases -------------------------------------------------------------------------------------


def test_list_steps_lists_complete_steps_only(workdir):
    checkpoints = workdir / "checkpoints"
    assert any(p.name.startswith("000120.orbax-checkpoint-tmp") for p in checkpoints.iterdir())
    assert list_steps(checkpoints) == [40, 80]  # the killed save 000120 is not a step
    assert list_steps(workdir / "nowhere") == []
    assert find_step_dir(checkpoints, 120) is None
    assert find_step_dir(checkpoints, 40) == checkpoints / "000040"


def test_aliases_are_pointer_files(workdir, tmp_path):
    checkpoints = workdir / "checkpoints"
    assert (checkpoints / "last").read_text() == "000080\n"
    assert (read_alias(checkpoints, "last"), read_alias(checkpoints, "best"), read_alias(checkpoints, "final")) \
        == (80, 40, 80)
    assert read_alias(checkpoints, "nope") is None
    write_alias(tmp_path, "best", 1234567)
    assert read_alias(tmp_path, "best") == 1234567
    write_alias(tmp_path, "best", 8)  # replaced atomically, no temporary file left behind
    assert [p.name for p in tmp_path.iterdir()] == ["best"] and read_alias(tmp_path, "best") == 8
    with pytest.raises(TrainkitError, match="alias name"):
        write_alias(tmp_path, "../escape", 8)


# --- every SOURCE form --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "relative, step, kind",
    [
        ("", 80, "workdir"),  # W means its `last`
        ("checkpoints", 80, "checkpoints_dir"),
        ("checkpoints/000040", 40, "step_dir"),
        ("checkpoints/000080/", 80, "step_dir"),
        ("checkpoints/best", 40, "alias"),
        ("checkpoints/last", 80, "alias"),
        ("checkpoints/final", 80, "alias"),
    ],
)
def test_resolves_local_forms(workdir, cache, relative, step, kind):
    source = str(workdir / relative) if relative else str(workdir)
    resolved = resolve_source(source, cache_dir=cache)
    assert (resolved.step, resolved.kind, resolved.origin) == (step, kind, source)
    assert resolved.step_dir == workdir / "checkpoints" / f"{step:06d}"
    assert not Path(cache).exists()  # local step dirs are used in place


def test_workdir_without_last_alias_means_newest_complete_step(workdir, tmp_path, cache):
    w = copy_workdir(workdir, tmp_path)
    (w / "checkpoints" / "last").unlink()
    assert resolve_source(str(w), cache_dir=cache).step == 80  # not the unfinished 000120


def test_packed_file_round_trips_and_restores_with_orbax(workdir, packed, tmp_path, cache):
    # Deterministic: packing the same step again gives the same bytes; the marker is the first member.
    again = pack(workdir / "checkpoints" / "000080", tmp_path / "again.ckpt")
    assert again.read_bytes() == packed.read_bytes()
    with tarfile.open(packed) as tar:
        members = tar.getmembers()
    assert members[0].name == MARKER_NAME and {m.mtime for m in members} == {0}
    assert all(m.isfile() or m.isdir() for m in members)
    assert read_pack_info(packed).step == 80

    resolved = resolve_source(str(packed), cache_dir=cache)
    assert (resolved.step, resolved.kind, resolved.step_dir.name) == (80, "packed", "000080")
    assert resolved.step_dir.is_relative_to(Path(cache)) and len(resolved.sha256) == 64
    assert verify_manifest(resolved.step_dir) == []
    assert read_manifest(resolved.step_dir) == read_manifest(workdir / "checkpoints" / "000080")
    restored = restore(resolved.step_dir)
    expected = state_tree(80)
    np.testing.assert_array_equal(restored["params"]["w"], expected["params"]["w"])
    np.testing.assert_array_equal(restored["params"]["b"], expected["params"]["b"])
    assert int(restored["step"]) == 80

    # The unpacked copy is keyed by the file's sha256 and reused, not unpacked again.
    marker = resolved.step_dir / "train_config.json"
    before = marker.stat().st_ino
    assert resolve_source(str(packed), cache_dir=cache).step_dir == resolved.step_dir
    assert marker.stat().st_ino == before


def test_unpack_refuses_an_existing_target(packed, tmp_path):
    unpack(packed, tmp_path)
    with pytest.raises(TrainkitError, match="already exists"):
        unpack(packed, tmp_path)


# --- manifests ----------------------------------------------------------------------------------------------------


def test_manifest_lists_every_file_but_itself(workdir):
    step_dir = workdir / "checkpoints" / "000040"
    manifest = read_manifest(step_dir)
    on_disk = {p.relative_to(step_dir).as_posix() for p in step_dir.rglob("*") if p.is_file()}
    assert set(manifest["files"]) == on_disk - {"manifest.json"}
    assert (manifest["step"], manifest["format_version"]) == (40, FORMAT_VERSION)
    assert {"train_config.json", "_CHECKPOINT_METADATA"} <= set(manifest["files"])
    assert verify_manifest(step_dir) == []


def test_verify_manifest_names_each_damaged_file(workdir, tmp_path):
    step_dir = copy_workdir(workdir, tmp_path) / "checkpoints" / "000040"
    data_files = sorted(p for p in (step_dir / "state").rglob("*") if p.is_file() and p.stat().st_size > 8)
    flipped, truncated, deleted = data_files[0], data_files[1], data_files[2]
    raw = bytearray(flipped.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size, different bytes
    flipped.write_bytes(bytes(raw))
    truncated.write_bytes(truncated.read_bytes()[:-3])
    deleted.unlink()
    problems = verify_manifest(step_dir)
    assert len(problems) == 3
    assert any(str(flipped) in p and "crc32c" in p for p in problems)
    assert any(str(truncated) in p and "bytes" in p for p in problems)
    assert any(str(deleted) in p and "missing" in p for p in problems)
    (step_dir / "manifest.json").unlink()
    assert len(verify_manifest(step_dir)) == 1 and "manifest.json is missing" in verify_manifest(step_dir)[0]


# --- errors: one line, naming the cause and the fix -----------------------------------------------------------------


def test_error_path_does_not_exist(tmp_path, cache):
    message = error_of(str(tmp_path / "nope"), cache_dir=cache)
    assert "does not exist" in message and "step dir" in message


def test_error_directory_is_not_a_checkpoint(tmp_path, cache):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("hello")
    message = error_of(str(tmp_path / "notes"), cache_dir=cache)
    assert "is not a checkpoint" in message and "checkpoints/" in message


def test_error_workdir_without_complete_step(workdir, tmp_path, cache):
    w = copy_workdir(workdir, tmp_path)
    for name in ("000040", "000080", "last", "best", "final"):
        shutil.rmtree(w / "checkpoints" / name) if name.isdigit() else (w / "checkpoints" / name).unlink()
    message = error_of(str(w), cache_dir=cache)
    assert "no complete checkpoint" in message and "unfinished saves are ignored" in message


def test_error_unfinished_save_passed_directly(workdir, cache):
    tmp_dir = next((workdir / "checkpoints").glob("000120.orbax-checkpoint-tmp-*"))
    message = error_of(str(tmp_dir), cache_dir=cache)
    assert "unfinished save" in message and "000080" in message


def test_error_file_is_not_a_packed_checkpoint(tmp_path, cache):
    (tmp_path / "weights.bin").write_bytes(b"\x00" * 5000)
    message = error_of(str(tmp_path / "weights.bin"), cache_dir=cache)
    assert "is not a packed trainkit checkpoint" in message and "trainkit.ckpt pack" in message
    plain_tar = tmp_path / "plain.tar"
    with tarfile.open(plain_tar, "w") as tar:
        tar.add(tmp_path / "weights.bin", arcname="weights.bin")
    assert "is not a packed trainkit checkpoint" in error_of(str(plain_tar), cache_dir=cache)


def test_error_alias_points_at_missing_step(workdir, tmp_path, cache):
    w = copy_workdir(workdir, tmp_path)
    shutil.rmtree(w / "checkpoints" / "000040")  # retention deleted the step that `best` names
    message = error_of(str(w / "checkpoints" / "best"), cache_dir=cache)
    assert "points at step 000040" in message and "missing" in message and "000080" in message
    shutil.rmtree(w / "checkpoints" / "000080")
    assert "points at step 000080" in error_of(str(w), cache_dir=cache)  # W -> its dangling `last`


def test_error_unsupported_scheme(cache):
    assert "unsupported scheme" in error_of("ftp://host/model.ckpt", cache_dir=cache)


# --- unsafe or damaged packed files -----------------------------------------------------------------------------


def forge(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    """A tar that starts with a valid trainkit marker, followed by `members`."""
    marker = json.dumps({"trainkit_packed": 1, "step": 7, "format_version": 1}).encode()
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo(MARKER_NAME)
        info.size = len(marker)
        tar.addfile(info, io.BytesIO(marker))
        for info, data in members:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("name", ["../escape.txt", "/tmp/escape.txt", "a/../../escape.txt"])
def test_unpack_rejects_path_traversal(tmp_path, name):
    evil = forge(tmp_path / "evil.ckpt", [(tarfile.TarInfo(name), b"pwned")])
    with pytest.raises(TrainkitError, match="unsafe member name"):
        unpack(evil, tmp_path / "dest")
    assert not (tmp_path / "escape.txt").exists() and not list((tmp_path / "dest").glob("*"))


def test_unpack_rejects_links(tmp_path):
    link = tarfile.TarInfo("state/link")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    with pytest.raises(TrainkitError, match="link or device"):
        unpack(forge(tmp_path / "evil.ckpt", [(link, b"")]), tmp_path / "dest")


def test_unpack_verifies_the_manifest(packed, tmp_path, cache):
    # Same layout, one file's bytes changed inside the tar: the manifest catches it, nothing is left behind.
    with tarfile.open(packed) as tar:
        members = [(m, tar.extractfile(m).read() if m.isfile() else b"") for m in tar.getmembers()]
    damaged = tmp_path / "damaged.ckpt"
    with tarfile.open(damaged, "w") as tar:
        for info, data in members:
            if info.name == "train_config.json":
                data = data.replace(b"mlp", b"cnn")
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    message = error_of(str(damaged), cache_dir=cache)
    assert "is damaged" in message and "train_config.json" in message and "crc32c" in message
    assert not list((Path(cache) / "unpacked").rglob("000080"))

    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(packed.read_bytes()[: packed.stat().st_size // 2])
    message = error_of(str(truncated), cache_dir=cache)
    assert "truncated.ckpt" in message and ("damaged" in message or "truncated or corrupted" in message)
