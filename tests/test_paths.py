"""`trainkit.paths`: how a typed path becomes absolute (the rule every command module applies first)."""

from __future__ import annotations

from trainkit.paths import absolute_flags, absolute_path


def test_absolute_path_rules(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert absolute_path("runs/a") == str(tmp_path / "runs/a")
    assert absolute_path("./runs/x/") == str(tmp_path / "runs/x")
    assert absolute_path("~/runs") == str(tmp_path / "home/runs")
    for url in ("gs://bucket/run", "https://example.com/model.ckpt", "hf://org/repo/model.ckpt"):
        assert absolute_path(url) == url
    argv = ["--config=configs/potential.py:tiny", "--workdir", "runs/w", "--init_from=hf://o/r/m.ckpt",
            "--config.num_steps=3"]
    assert absolute_flags(argv, ("--config", "--workdir", "--init_from")) == [
        f"--config={tmp_path}/configs/potential.py:tiny", "--workdir", f"{tmp_path}/runs/w",
        "--init_from=hf://o/r/m.ckpt", "--config.num_steps=3"]
