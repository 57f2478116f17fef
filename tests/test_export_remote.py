"""Export from remote checkpoints through the real CLI: an https-style URL and a private Hub repo, both served
by real HTTP servers on 127.0.0.1; the token works, its absence fails clearly, and it is never written down."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import ROOT, assert_user_error, cli_env, run_cli, train
from test_remote import TOKEN, files_containing, hub_handler, serving, url_handler
from trainkit.checkpoints.packing import pack

SHORT = ("--config.num_steps=4", "--config.log_every=2", "--config.eval_every=4", "--config.checkpoint.every=4")


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> bytes:
    workdir = tmp_path_factory.mktemp("trained")
    train(workdir, *SHORT)
    return pack(workdir / "checkpoints" / "000004", workdir / "model.ckpt").read_bytes()


def export_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = cli_env(HOME=str(tmp_path / "home"), HF_HOME=str(tmp_path / "hf_home"),
                  TRAINKIT_CACHE=str(tmp_path / "cache"),
                  HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_ETAG_TIMEOUT="5", HF_HUB_DOWNLOAD_TIMEOUT="5", **extra)
    if "HF_TOKEN" not in extra:
        env.pop("HF_TOKEN", None)
    return env


def test_export_from_url(packed, tmp_path):
    with serving(url_handler({"/runs/model.ckpt": packed})) as server:
        out = tmp_path / "out" / "model.safetensors"
        proc = run_cli(f"{server.url}/runs/model.ckpt", "-o", str(out), module="trainkit.export",
                       env=export_env(tmp_path))
        assert proc.returncode == 0, proc.stderr
        sidecar = json.loads(out.with_suffix(".json").read_text())
        assert sidecar["source"] == {"origin": f"{server.url}/runs/model.ckpt", "step": 4}
        missing = run_cli(f"{server.url}/runs/gone.ckpt", "-o", str(tmp_path / "x.pt"), module="trainkit.export",
                          env=export_env(tmp_path))
        assert_user_error(missing, "404")


def test_export_from_private_hub_repo(packed, tmp_path):
    with serving(hub_handler({"org/potential/runs/model.ckpt": packed})) as server:
        source = "hf://org/potential/runs/model.ckpt"
        out = tmp_path / "out" / "model.pt"
        denied = run_cli(source, "-o", str(out), module="trainkit.export",
                         env=export_env(tmp_path, HF_ENDPOINT=server.url))
        assert_user_error(denied, "token", "HF_TOKEN")
        assert not out.exists()
        ok = run_cli(source, "-o", str(out), module="trainkit.export",
                     env=export_env(tmp_path, HF_ENDPOINT=server.url, HF_TOKEN=TOKEN))
        assert ok.returncode == 0, ok.stderr
        assert out.exists() and json.loads(out.with_suffix(".json").read_text())["source"]["step"] == 4
        flag = run_cli(source, "-o", str(tmp_path / "out" / "m.safetensors"), f"--hf_token={TOKEN}",
                       module="trainkit.export", env=export_env(tmp_path, HF_ENDPOINT=server.url))
        assert flag.returncode == 0, flag.stderr
    for proc in (denied, ok, flag):
        assert TOKEN not in proc.stdout + proc.stderr
    assert not files_containing(tmp_path, TOKEN.encode()), "the token was written to disk"
    assert not files_containing(ROOT / "runs", TOKEN.encode()) if (ROOT / "runs").exists() else True
    assert os.environ.get("HF_TOKEN") != TOKEN
