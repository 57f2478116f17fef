"""The guides in docs/ as specifications: every command in their ```bash blocks runs, in order, against real
workdirs, and the configuration reference lists exactly the keys (and defaults) the code has.

How a guide's bash blocks run:
- `NAME=value` lines set a shell variable, as typed: a relative path (`W=runs/digits`) under the scratch directory.
- Every other line must be a trainkit command (`python -m trainkit...` or `trainkit ...`), optionally with
  `VAR=value` prefixes; it runs under bash in a scratch directory (with `configs/` linked in).
- Step counts shrink by SCALE: `num_steps`, `log_every`, `eval_every`, `checkpoint.every`, `checkpoint.keep_every`,
  `warmup_steps` given in a `python -m trainkit.main` command are divided by it, the config's own values too
  (appended as overrides), and so are six-digit step dirs such as `checkpoints/000500`.
- `https://example.com/...` is served by a local server, `hf://...` by a local Hub look-alike (HF_ENDPOINT), both
  serving the files the commands wrote into the scratch directory, by name.
- A trailing `# exit status N` expects that exit status (2: one `trainkit: error:` line); otherwise 0.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterator

import ml_collections
import pytest
from conftest import ROOT, assert_user_error, cli_env

from trainkit import config as config_lib
from trainkit.config import base_config

GUIDES = ("docs/checkpoints.md", "docs/resuming.md", "docs/configuration.md", "docs/exporting.md")
SCALE = 20
STEP_KEYS = ("num_steps", "log_every", "eval_every", "checkpoint.every", "checkpoint.keep_every", "warmup_steps")
# Commands not run, each with the reason. Keep this short.
SKIPPED = {
    "gs://": "needs a GCS bucket; tests/test_gcs_workdir.py and test_remote.py run gs:// on a local GCS server",
}
EXAMPLE_URL = "https://example.com"
ASSIGNMENT = re.compile(r"^([A-Z][A-Z0-9_]*)=(\S+)$")
ENV_PREFIX = re.compile(r"^([A-Z][A-Z0-9_]*)=(\S+)\s+")
EXIT_STATUS = re.compile(r"#\s*exit status (\d+)")


# -- reading the guides -------------------------------------------------------------------------------------------

def bash_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, line) of every non-empty, non-comment line in the guide's ```bash blocks, in order."""
    out, in_bash = [], False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("```"):
            in_bash = not in_bash and stripped == "```bash"
            continue
        if in_bash and stripped and not stripped.startswith("#"):
            out.append((number, stripped))
    return out


def scaled(value: int) -> int:
    return max(1, value // SCALE) if value > 0 else 0


def shrink(command: str) -> str:
    """The command with its step counts (given or from its config) divided by SCALE."""
    command = re.sub(r"(checkpoints/)(\d{6})\b", lambda m: f"{m[1]}{scaled(int(m[2])):06d}", command)
    if "trainkit.main" not in command and not command.startswith("trainkit train"):
        return command
    command, comment = re.match(r"(.*?)(\s+#.*)?$", command).groups()  # overrides go before a trailing comment
    for key in STEP_KEYS:
        command, found = re.subn(rf"(--config\.{re.escape(key)}=)(\d+)\b", lambda m: f"{m[1]}{scaled(int(m[2]))}",
                                 command)
        if not found:
            default = config_value(command, key)
            if default:
                command += f" --config.{key}={scaled(default)}"
    return command + (comment or "")


def config_value(command: str, key: str) -> Any:
    """The value of `key` in the config file a training command names (`--config=configs/x.py:arg`)."""
    match = re.search(r"--config=(\S+)", command)
    assert match, f"a training command without --config: {command}"
    file, _, arg = match[1].partition(":")
    value: Any = config_for(ROOT / file, arg or None)
    for part in key.split("."):
        value = value[part]
    return value


class FilesByName(Mapping):
    """Serves the files of `root` by the last component of the requested path (for the local servers)."""

    def __init__(self, root: Path):
        self.root = root

    def _file(self, key: str) -> Path:
        return self.root / key.rstrip("/").rsplit("/", 1)[-1]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self._file(key).is_file()

    def __getitem__(self, key: str) -> bytes:
        return self._file(key).read_bytes()

    def __iter__(self) -> Iterator[str]:
        return (p.name for p in self.root.iterdir())

    def __len__(self) -> int:
        return len(list(self.root.iterdir()))


# -- the commands of each guide run --------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("guide", GUIDES)
def test_guide_commands_run(guide, tmp_path):
    from test_remote import TOKEN, hub_handler, serving, url_handler  # the local URL and Hub servers

    lines = bash_lines(ROOT / guide)
    assert lines, f"{guide} has no ```bash commands"
    scratch = tmp_path / "cwd"
    scratch.mkdir()
    (scratch / "configs").symlink_to(ROOT / "configs")
    files = FilesByName(scratch)
    with serving(url_handler(files)) as web, serving(hub_handler(files)) as hub:
        env = cli_env(TRAINKIT_CACHE=str(tmp_path / "cache"), HOME=str(tmp_path / "home"),
                      HF_HOME=str(tmp_path / "hf_home"), HF_ENDPOINT=hub.url, HF_HUB_DISABLE_TELEMETRY="1")
        for number, line in lines:
            where = f"{guide}:{number}: {line}"
            assignment = ASSIGNMENT.match(line)
            if assignment:  # relative, as users type them: under the scratch working directory
                assert not assignment[2].startswith(("/", "~")), f"{where}: use a relative path such as runs/x"
                env[assignment[1]] = assignment[2]
                continue
            skip = next((why for marker, why in SKIPPED.items() if marker in line), None)
            if skip:
                print(f"skipped {where} ({skip})")
                continue
            prefixes = ""
            while match := ENV_PREFIX.match(line[len(prefixes):]):
                prefixes += match[0]
            command = line[len(prefixes):]
            assert command.startswith(("python -m trainkit", "trainkit ")), \
                f"{where}: only trainkit commands belong in ```bash blocks (use ```text for other shell)"
            assert "/tmp/" not in command, f"{where}: use a relative path or a variable such as $W"
            command = shrink(command).replace(EXAMPLE_URL, web.url)
            if "HF_TOKEN=" in prefixes:
                prefixes = re.sub(r"HF_TOKEN=\S+", f"HF_TOKEN={TOKEN}", prefixes)
            expected = int(m[1]) if (m := EXIT_STATUS.search(command)) else 0
            proc = subprocess.run(["bash", "-c", prefixes + command], cwd=scratch, env=env, capture_output=True,
                                  text=True, timeout=600)
            if expected == 2:
                assert_user_error(proc)
            assert proc.returncode == expected, (
                f"{where}\nran: {prefixes + command}\nexit status {proc.returncode}, expected {expected}\n"
                f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")


def test_guides_link_to_existing_files():
    for guide in GUIDES:
        text = (ROOT / guide).read_text()
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
            assert (ROOT / guide).parent.joinpath(target).exists(), f"{guide} links to missing {target}"


# -- the configuration reference matches the code -----------------------------------------------------------------

def flat_items(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """{"checkpoint.every": 100, ...} in the order the code sets them, tuples kept (the values users write)."""
    def value(key: str) -> Any:
        node: Any = config
        for part in key.split("."):
            node = node[part]
        return node

    return {key: value(key) for key in config_lib.flatten(config_lib.to_dict(config))}  # to_json keeps order


def config_file_keys() -> dict[str, str]:
    """Keys the config files add to base_config(): {key: "`lm_chars`: `128`; `lm_chars:tiny`: `32`"}."""
    base = flat_items(base_config())
    values: dict[str, list[str]] = {}
    for path in sorted((ROOT / "configs").glob("*.py")):
        variants = [None, *re.findall(r'arg == "(\w+)"', path.read_text())]
        seen: dict[str, Any] = {}
        for arg in variants:
            name = path.stem + (f":{arg}" if arg else "")
            flat = flat_items(config_for(path, arg))
            for key, value in flat.items():
                if key in base or (key in seen and seen[key] == value):
                    continue
                seen.setdefault(key, value)
                values.setdefault(key, []).append(f"`{name}`: `{value!r}`")
    return {key: "; ".join(v) for key, v in sorted(values.items())}


def config_for(path: Path, arg: str | None) -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location(f"configs_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def generated_sections(text: str) -> list[tuple[str, dict[str, tuple[str, str]]]]:
    """Each `<!-- generated: NAME -->` table: (NAME, {key: (second column, meaning)})."""
    sections = []
    for name, body in re.findall(r"<!-- generated: (.+?) -->\n(.*?)<!-- end generated -->", text, re.S):
        rows = {}
        for line in body.splitlines()[2:]:
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            rows[cells[0].strip("`")] = (cells[1], cells[2] if len(cells) > 2 else "")
        sections.append((name, rows))
    return sections


def render(name: str, header: str, expected: dict[str, str], old: dict[str, tuple[str, str]]) -> str:
    rows = [f"| key | {header} | meaning |", "|---|---|---|"]
    rows += [f"| `{k}` | {v} | {old.get(k, ('', 'TODO: describe'))[1]} |" for k, v in expected.items()]
    return f"<!-- generated: {name} -->\n" + "\n".join(rows) + "\n<!-- end generated -->"


def test_configuration_reference_lists_every_key_with_its_default():
    path = ROOT / "docs" / "configuration.md"
    text = path.read_text()
    expected = [
        ("default", {k: f"`{v!r}`" for k, v in flat_items(base_config()).items()}),
        ("set in", config_file_keys()),
    ]
    sections = generated_sections(text)
    assert len(sections) == len(expected), "docs/configuration.md lost a <!-- generated: ... --> table"
    if os.environ.get("TRAINKIT_UPDATE_DOCS"):
        for (name, old), (header, want) in zip(sections, expected):
            text = re.sub(rf"<!-- generated: {re.escape(name)} -->\n.*?<!-- end generated -->",
                          lambda _: render(name, header, want, old), text, count=1, flags=re.S)
        path.write_text(text)
        sections = generated_sections(text)
    hint = "; run TRAINKIT_UPDATE_DOCS=1 python -m pytest tests/test_docs.py -k configuration_reference"
    for (name, rows), (_, want) in zip(sections, expected):
        assert list(rows) == list(want), f"{name}: keys differ from the code{hint}"
        for key, (value, meaning) in rows.items():
            assert value == want[key], f"{name}: {key} is {want[key]} in the code, {value} in the doc{hint}"
            assert meaning and "TODO" not in meaning, f"{name}: describe {key} in docs/configuration.md"


def test_tuple_override_as_documented_parses():
    """The override syntax the reference shows (a tuple in quotes) is what the CLI accepts."""
    code = ("import sys; from trainkit.main import FLAGS, parse_flags; "
            "parse_flags(sys.argv); print(tuple(FLAGS.config.model.features))")
    args = ["--config=configs/default.py", "--workdir=unused", '--config.model.features=(16, 32)']
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=cli_env(), capture_output=True,
                          text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "(16, 32)", proc.stderr
