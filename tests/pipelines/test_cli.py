import json
import subprocess
import sys

import pytest

import zoo
from pipelines.cli import build_parser, main


def test_help_everywhere(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name in sub.choices:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        assert "usage" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--help"])


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_list_and_info(capsys):
    names = zoo.list_models("test_*")
    assert main(["list", "test_*"]) == 0
    out = capsys.readouterr().out
    for name in names:
        assert name in out
    assert main(["info", names[0]]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["name"] == names[0] and info["params"] > 0 and len(info["input_size"]) == 3


def test_unknown_names(capsys):
    assert main(["list", "no_such_family_*"]) == 1
    assert main(["info", "resnet50"]) == 1
    assert "unknown zoo model" in capsys.readouterr().out


def test_console_script_entry_point():
    out = subprocess.run([sys.executable, "-m", "pipelines.cli", "list", "test_*"], capture_output=True, text=True,
                         check=True).stdout
    assert "attention zoo models" in out
