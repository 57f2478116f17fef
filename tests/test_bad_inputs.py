"""The bad-input catalogue: every way a user can hand trainkit something wrong, through the real CLIs.

Each case is one command that must fail the same way: a non-zero exit, exactly one stderr line
`trainkit: error: ...` naming the cause (the fragments in `expect`), no traceback anywhere, and nothing on disk
lost (tree hashes of the shared workdir and inputs, and of a case's own workdir copy, before and after).

Placeholders in the arguments: {W} a trained workdir (read-only use), {WCOPY} a private copy of it for cases that
write into their workdir, {IN} prepared bad inputs, {NEW} a fresh path, {OUT} the case's own (existing) directory,
{FILE} a regular file, {RO} a read-only directory (the `read_only_dir` fixture), {URL} a real http.server on
127.0.0.1, {DOWN} a closed port there. hf:// sources reach a Hugging Face Hub look-alike (tests/test_remote.py's
hub_handler, via HF_ENDPOINT) that accepts another token than the one given.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import http.server
import json
import shutil
import subprocess
import tarfile
import threading
from pathlib import Path

import pytest
from conftest import assert_user_error, cli_env, run_cli, train, tree_hash
from test_remote import closed_port, hub_handler, serving

from trainkit.workdir import LOCK_FILE

pytestmark = pytest.mark.slow  # ~70 fresh interpreters (~90 s): CI runs them; the inner loop skips them

MAIN, EXPORT, CKPT, PLOT = "trainkit.main", "trainkit.export", "trainkit.ckpt", "trainkit.plot"
DEFAULT = "--config=configs/default.py"
SHORT = ("--config.num_steps=20", "--config.batch_size=32", "--config.log_every=10", "--config.eval_every=10",
         "--config.checkpoint.every=10", "--config.checkpoint.keep_last=5", "--config.export.formats=()")


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    module: str
    args: tuple[str, ...]
    expect: tuple[str, ...]  # fragments of the one error line
    devices: int = 1

    @property
    def read_only(self) -> bool:
        return any("{RO}" in a for a in self.args)


def main(*args: str) -> tuple[str, ...]:
    """`python -m trainkit.main` of the default config into a fresh workdir, plus `args`."""
    return MAIN, DEFAULT, "--workdir={NEW}", *args


def case(id: str, command: tuple[str, ...], *expect: str, devices: int = 1) -> Case:
    return Case(id, command[0], command[1:], expect, devices)


CASES = [
    # -- config files and flags ---------------------------------------------------------------------------------
    case("config-syntax-error", (MAIN, "--config={IN}/syntax.py", "--workdir={NEW}"), "syntax.py", "syntax error"),
    case("config-without-get_config", (MAIN, "--config={IN}/noget.py", "--workdir={NEW}"), "noget.py",
         "get_config"),
    case("config-file-missing", (MAIN, "--config={IN}/nope.py", "--workdir={NEW}"), "nope.py", "does not exist"),
    case("config-argument-rejected", (MAIN, "--config=configs/potential.py:bogus", "--workdir={NEW}"),
         "potential.py", "bogus"),
    case("config-empty-file", (MAIN, "--config={IN}/empty.py", "--workdir={NEW}"), "empty.py", "get_config"),
    case("unknown-config-key", main("--config.nmu_steps=3"), "nmu_steps"),
    case("unknown-nested-key", main("--config.checkpoint.keep_lats=3"), "keep_lats"),
    case("mistyped-int", main("--config.num_steps=many"), "num_steps"),
    case("mistyped-bool", main("--config.checkpoint.async_save=maybe"), "async_save"),
    case("unknown-flag", main("--workdri=/tmp/x"), "workdri"),
    case("workdir-missing", (MAIN, DEFAULT), "--workdir"),
    case("negative-num-steps", main("--config.num_steps=-5"), "num_steps=-5"),
    case("zero-batch-size", main("--config.batch_size=0"), "batch_size=0"),
    case("keep-last-zero", main("--config.checkpoint.keep_last=0"), "keep_last"),
    case("best-mode-unknown", main("--config.checkpoint.best_mode=median"), "best_mode", "median"),
    case("export-format-unknown", main("--config.export.formats=('onnx',)"), "export.formats", "onnx"),
    case("log-every-zero", main("--config.log_every=0"), "log_every=0"),
    # -- meshes and batches --------------------------------------------------------------------------------------
    case("mesh-zero", main("--config.mesh.data=0"), "mesh", "data=0"),
    case("mesh-negative", main("--config.mesh.data=-2"), "mesh", "data=-2"),
    case("mesh-two-rests", main("--config.mesh.data=-1", "--config.mesh.fsdp=-1"), "mesh", "at most one"),
    case("mesh-not-dividing", main("--config.mesh.data=3"), "mesh", "8", devices=8),
    case("batch-not-divisible", main("--config.batch_size=100"), "batch_size=100", "8", devices=8),
    # -- checkpoints to resume or fine-tune from -----------------------------------------------------------------
    case("resume-from-missing", main("--resume_from={IN}/nope"), "nope", "does not exist"),
    case("resume-from-empty-dir", main("--resume_from={IN}/emptydir"), "emptydir", "not a checkpoint"),
    case("resume-from-other-model", (MAIN, "--config=configs/default.py:mlp", "--workdir={NEW}",
                                     "--resume_from={W}"), "'cnn'", "'mlp'", "--init_from"),
    case("workdir-of-other-model", (MAIN, "--config=configs/default.py:mlp", "--workdir={WCOPY}", *SHORT,
                                    "--config.num_steps=30"), "'cnn'", "'mlp'"),
    case("structural-change", (MAIN, DEFAULT, "--workdir={WCOPY}", *SHORT, "--config.num_steps=30",
                               "--config.model.hidden=64"), "model.hidden", "--init_from"),
    case("resume-from-newer-version", main("--resume_from={IN}/newer/checkpoints/000020"), "format version 99",
         "upgrade trainkit"),
    case("resume-from-flipped-byte", main("--resume_from={IN}/corrupt/checkpoints/000020"), "damaged", "crc32c"),
    case("init-from-flipped-byte", main("--init_from={IN}/corrupt/checkpoints/000020"), "damaged"),
    case("resume-from-truncated-pack", main("--resume_from={IN}/truncated.ckpt"), "truncated.ckpt",
         "truncated or corrupted"),
    case("init-from-empty-file", main("--init_from={IN}/empty.ckpt"), "empty.ckpt", "not a packed"),
    case("init-from-other-shapes", main("--init_from={W}", "--config.model.hidden=64"), "--partial"),
    case("resume-from-alias-to-nowhere", main("--resume_from={IN}/dangling/checkpoints/last"), "000999", "missing"),
    case("resume-from-unfinished-save", main("--resume_from={IN}/unfinished/checkpoints/000030.orbax-checkpoint-tmp"),
         "unfinished save"),
    case("resume-from-partial-step", main("--resume_from={IN}/partial/checkpoints/000010"), "000010",
         "not a complete checkpoint step"),
    case("resume-from-closed-port", main("--resume_from={DOWN}/model.ckpt"), "cannot reach 127.0.0.1"),
    case("resume-from-404", main("--resume_from={URL}/missing.ckpt"), "HTTP 404"),
    case("init-from-url-not-a-checkpoint", main("--init_from={URL}/junk.ckpt"), "junk.ckpt", "not a packed"),
    case("init-from-hf-bad-token", main("--init_from=hf://org/repo/model.ckpt", "--hf_token=hf_wrong_token_7"),
         "rejected the token", "HTTP 403"),
    case("unsupported-scheme", main("--init_from=ftp://host/model.ckpt"), "ftp://", "unsupported scheme"),
    # -- workdirs ------------------------------------------------------------------------------------------------
    case("fresh-without-overwrite", (MAIN, DEFAULT, "--workdir={WCOPY}", *SHORT, "--fresh"), "--fresh",
         "--overwrite"),
    case("workdir-under-a-file", (MAIN, DEFAULT, "--workdir={FILE}/w"), "workdir", "notes.txt"),
    case("workdir-read-only", (MAIN, DEFAULT, "--workdir={RO}/w"), "workdir"),
    # -- export --------------------------------------------------------------------------------------------------
    case("export-unknown-suffix", (EXPORT, "{W}", "-o", "{NEW}/model.onnx"), ".onnx", ".pt"),
    case("export-no-suffix", (EXPORT, "{W}", "-o", "{NEW}/model"), "export format"),
    case("export-output-exists", (EXPORT, "{W}", "-o", "{IN}/exists.pt"), "exists.pt", "--overwrite"),
    case("export-missing-source", (EXPORT, "{IN}/nope", "-o", "{NEW}/m.safetensors"), "does not exist"),
    case("export-flipped-pack", (EXPORT, "{IN}/flipped.ckpt", "-o", "{NEW}/m.safetensors"), "flipped.ckpt",
         "damaged"),
    case("export-under-a-file", (EXPORT, "{W}", "-o", "{FILE}/m.safetensors"), "notes.txt", "not a directory"),
    case("export-read-only", (EXPORT, "{W}", "-o", "{RO}/m.safetensors"), "not writable"),
    case("export-without-output", (EXPORT, "{W}"), "-o"),
    case("export-bad-tolerance", (EXPORT, "{W}", "-o", "{NEW}/m.pt", "--tolerance=tight"), "tolerance", "tight"),
    # -- ckpt ----------------------------------------------------------------------------------------------------
    case("ckpt-no-command", (CKPT,), "command"),
    case("ckpt-unknown-command", (CKPT, "frobnicate", "{W}"), "frobnicate"),
    case("ckpt-ls-not-a-workdir", (CKPT, "ls", "{IN}/emptydir"), "emptydir", "no checkpoints/"),
    case("ckpt-inspect-random-bytes", (CKPT, "inspect", "{IN}/random.ckpt"), "random.ckpt", "not a packed"),
    case("ckpt-inspect-newer-version", (CKPT, "inspect", "{IN}/newer/checkpoints/000020"), "format version 99"),
    case("ckpt-inspect-hf-without-file", (CKPT, "inspect", "hf://org"), "hf://org", "names no file"),
    case("ckpt-verify-missing", (CKPT, "verify", "{IN}/nope"), "nope", "does not exist"),
    case("ckpt-diff-missing-source", (CKPT, "diff", "{W}", "{IN}/nope"), "nope", "does not exist"),
    case("ckpt-diff-flipped-byte", (CKPT, "diff", "{W}", "{IN}/corrupt/checkpoints/000020"), "damaged"),
    case("ckpt-pack-damaged-step", (CKPT, "pack", "{IN}/corrupt/checkpoints/000020", "-o", "{NEW}/m.ckpt"),
         "damaged"),
    case("ckpt-pack-read-only", (CKPT, "pack", "{W}", "-o", "{RO}/model.ckpt"), "not writable"),
    case("ckpt-pack-under-a-file", (CKPT, "pack", "{W}", "-o", "{FILE}/sub/model.ckpt"), "notes.txt",
         "not a directory"),
    case("ckpt-inspect-hf-no-token", (CKPT, "inspect", "hf://org/repo/model.ckpt"), "needs a Hugging Face token"),
]
PLOT_CASES = [
    case("plot-not-a-workdir", (PLOT, "{IN}/emptydir", "-o", "{OUT}/c.png"), "metrics.jsonl"),
    case("plot-unknown-suffix", (PLOT, "{W}", "-o", "{OUT}/c.xyz"), "suffix", ".xyz"),
    case("plot-unknown-metric", (PLOT, "{W}", "--metrics=nonsense", "-o", "{OUT}/c.png"), "nonsense"),
    case("plot-read-only", (PLOT, "{W}", "-o", "{RO}/c.png"), "cannot write"),
]
if (Path(__file__).parents[1] / "trainkit" / "plot.py").exists():
    CASES += PLOT_CASES


@dataclasses.dataclass
class Outcome:
    proc: subprocess.CompletedProcess
    hash_before: str | None = None  # of the case's own workdir copy
    hash_after: str | None = None


@dataclasses.dataclass
class World:
    root: Path
    places: dict[str, str]
    env: dict[str, str]
    hashes: dict[str, str]


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def build_inputs(workdir: Path, inputs: Path) -> None:
    """The bad inputs the cases point at, each made from the real trained workdir."""
    from trainkit.checkpoints.packing import pack

    inputs.mkdir()
    (inputs / "syntax.py").write_text("def get_config(:\n    return None\n")
    (inputs / "noget.py").write_text("import ml_collections\nCONFIG = ml_collections.ConfigDict()\n")
    (inputs / "empty.py").write_text("")
    (inputs / "empty.ckpt").write_bytes(b"")
    (inputs / "random.ckpt").write_bytes(bytes(range(256)) * 40)
    (inputs / "exists.pt").write_text("keep me")
    (inputs / "notes.txt").write_text("a regular file, not a directory")
    (inputs / "emptydir").mkdir()
    step = workdir / "checkpoints" / "000020"

    packed = pack(step, inputs / "model.ckpt")
    (inputs / "truncated.ckpt").write_bytes(packed.read_bytes()[: packed.stat().st_size // 2])
    shutil.copy(packed, inputs / "flipped.ckpt")
    with tarfile.open(packed) as tar:
        biggest = max(tar.getmembers(), key=lambda m: m.size)
    flip_byte(inputs / "flipped.ckpt", biggest.offset_data + biggest.size // 2)

    newer = inputs / "newer" / "checkpoints" / "000020"
    shutil.copytree(step, newer)
    manifest = json.loads((newer / "manifest.json").read_text())
    (newer / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))

    corrupt = inputs / "corrupt" / "checkpoints" / "000020"
    shutil.copytree(step, corrupt)
    victim = max((p for p in (corrupt / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    flip_byte(victim, victim.stat().st_size // 2)

    (inputs / "dangling" / "checkpoints").mkdir(parents=True)
    (inputs / "dangling" / "checkpoints" / "last").write_text("000999\n")
    (inputs / "unfinished" / "checkpoints" / "000030.orbax-checkpoint-tmp" / "state").mkdir(parents=True)
    shutil.copytree(step / "state", inputs / "partial" / "checkpoints" / "000010" / "state")
    (inputs / "served").mkdir()
    (inputs / "served" / "junk.ckpt").write_bytes(b"<html>not a checkpoint</html>" * 10)


class QuietFileHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs")
    workdir, inputs = root / "W", root / "inputs"
    train(workdir, *SHORT)
    build_inputs(workdir, inputs)
    handler = functools.partial(QuietFileHandler, directory=str(inputs / "served"))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    with serving(hub_handler({"org/repo/model.ckpt": (inputs / "model.ckpt").read_bytes()})) as hub:
        env = cli_env(TRAINKIT_CACHE=str(root / "cache"), HF_ENDPOINT=hub.url, HF_HOME=str(root / "hf_home"),
                      HOME=str(root / "home"), HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_ETAG_TIMEOUT="5",
                      HF_HUB_DOWNLOAD_TIMEOUT="5")
        places = {"W": str(workdir), "IN": str(inputs), "FILE": str(inputs / "notes.txt"),
                  "URL": f"http://127.0.0.1:{httpd.server_address[1]}", "DOWN": f"http://127.0.0.1:{closed_port()}"}
        yield World(root, places, env, {"W": tree_hash(workdir), "IN": tree_hash(inputs)})
    httpd.shutdown()
    httpd.server_close()


def run_case(case: Case, world: World, ro: Path | None = None) -> Outcome:
    own = world.root / "cases" / case.id
    own.mkdir(parents=True)
    places = {**world.places, "NEW": str(own / "new"), "OUT": str(own), "WCOPY": str(own / "w"), "RO": str(ro)}
    copy = any("{WCOPY}" in a for a in case.args)
    if copy:
        shutil.copytree(world.places["W"], own / "w")
    before = tree_hash(own / "w") if copy else None
    env = {**world.env, "XLA_FLAGS": f"--xla_force_host_platform_device_count={case.devices}"}
    proc = run_cli(*(a.format(**places) for a in case.args), module=case.module, env=env, timeout=300)
    return Outcome(proc, before, tree_hash(own / "w") if copy else None)


@pytest.fixture(scope="module")
def outcomes(world) -> dict[str, Outcome]:
    """Every case that needs no read-only directory, two at a time (each is a fresh interpreter)."""
    cases = [c for c in CASES if not c.read_only]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        return dict(zip([c.id for c in cases], pool.map(lambda c: run_case(c, world), cases)))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, world, outcomes, request):
    if case.read_only:
        outcome = run_case(case, world, ro=request.getfixturevalue("read_only_dir")())
    else:
        outcome = outcomes[case.id]
    line = assert_user_error(outcome.proc, *case.expect)
    assert outcome.proc.returncode == 2, line
    assert [s for s in outcome.proc.stderr.splitlines() if s.strip()] == [line], "more than one line on stderr"
    assert outcome.hash_before == outcome.hash_after, "the case changed its workdir"


def test_refusals_name_their_causes_and_leave_nothing_behind(world, outcomes):
    # trainkit words each cause its own way, not with a catch-all (a case's own paths made alike first).
    messages = set()
    for case_id, outcome in outcomes.items():
        line = next((s for s in outcome.proc.stderr.splitlines() if s.startswith("trainkit: error:")), "")
        messages.add(line.replace(str(world.root / "cases" / case_id), "<case>").replace(str(world.root), "<root>"))
    assert len(messages) >= 30, sorted(messages)
    # A refused command leaves no file in the paths it was given (no half-made checkpoint, export or pack), only
    # the lock file of a workdir it had opened: the lock is a flock that ends with the process, the file stays.
    cases = world.root / "cases"
    left = sorted(p.relative_to(cases).as_posix() for p in cases.rglob("*")
                  if p.is_file() and p.relative_to(cases).parts[1] != "w")  # w: a case's workdir copy, hashed above
    assert [p for p in left if Path(p).name != LOCK_FILE] == [], left
    assert tree_hash(Path(world.places["W"])) == world.hashes["W"], "a case changed the shared workdir"
    assert tree_hash(Path(world.places["IN"])) == world.hashes["IN"], "a case changed the shared inputs"
