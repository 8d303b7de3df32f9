"""The README's self-contained examples run as written."""
import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _block(after_heading: str) -> str:
    text = README.read_text()
    section = text[text.index(after_heading):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_attention_op_example_runs():
    ns = {}
    exec(_block("### The attention op"), ns)  # as written: the block imports what it uses
    assert ns["out"].shape == (1, 4, 256, 64)
    assert ns["probs"].shape[:3] == (2, 1, 1)
    assert abs(ns["probs"].sum(-1) - 1).max() < 1e-5


def test_quick_start_commands_match_ci():
    ci = (README.parent / ".ci" / "run").read_text()
    test_cmd = re.search(r"# 2\..*?\n(.*?)\n```", README.read_text(), re.S).group(1).strip()
    assert test_cmd in ci
    assert "zoo demo" in README.read_text()


def test_model_table_lists_every_model():
    import zoo

    text = README.read_text()
    missing = [name for name in zoo.list_models() if f"`{name}`" not in text]
    assert not missing, f"README model table lacks {missing}; regenerate it with `zoo list --markdown`"
