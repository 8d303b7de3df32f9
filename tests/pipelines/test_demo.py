"""`zoo demo` (the README's quick-start command 1) runs its steps offline and writes its files."""
import os

import pytest

from pipelines.cli import main


def test_demo_steps_run(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "demo"
    assert main(["demo", "--only", "digits", "freeswim", "probes", "--epochs", "1", "--quiet", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    for step in ("digits", "freeswim", "probes"):
        assert f"{step}:" in text
    assert "ninformer_small" in text
    assert os.path.getsize(out / "freeswim_tiny.mp4") > 0 and os.path.getsize(out / "freeswim_window.png") > 0


def test_demo_rejects_unknown_step_and_bad_epochs(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--only", "nothing"])
    with pytest.raises(SystemExit):
        main(["demo", "--epochs", "0"])
    assert "invalid choice" in capsys.readouterr().err
