"""docs/export_coverage.md (issue #14 item 3) is generated from the converter's registry by
tests/export_coverage.py: it must be current, and every rule must show up in it as supported."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from trainkit.export.torchscript.emitter import CONSTANT_PRIMITIVES
from trainkit.export.torchscript.registry import RULES

ROOT = Path(__file__).resolve().parent.parent
TABLE = ROOT / "docs" / "export_coverage.md"


def test_every_rule_is_in_the_table_as_supported():
    text = TABLE.read_text()
    status = dict(re.findall(r"^\| `([^`]+)` \| `[^`]*` \| ([^|]+?) \|", text, re.M))
    other_versions = re.search(r"^Rules for names .*$", text, re.M)
    aliases = set(re.findall(r"`([^`]+)`", other_versions[0])) if other_versions else set()
    expected = {name: "constant inputs only" if name in CONSTANT_PRIMITIVES else "supported" for name in RULES}
    wrong = {name: status.get(name) for name, want in expected.items()
             if status.get(name) != want and not (name not in status and name in aliases)}
    assert not wrong, f"{wrong}: regenerate with `python tests/export_coverage.py`"


@pytest.mark.slow
def test_the_committed_table_is_current():
    for extra in ("jax_md", "e3nn_jax", "equinox", "transformers"):  # the corpus' cases are part of "tested by"
        pytest.importorskip(extra, reason="the [corpus] extra is installed by .ci/run")
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "export_coverage.py"), "--check"], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
