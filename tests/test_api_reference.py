"""docs/api.md is what scripts/api_reference.py writes, and every public name has a docstring."""

from __future__ import annotations

import importlib.util
import inspect
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "api_reference.py"


def load_script():
    spec = importlib.util.spec_from_file_location("api_reference", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_api_reference_is_up_to_date(tmp_path):
    # A fresh interpreter: the signatures as a user's import sees them, without the
    # runtime type-checking hooks of this test session.
    output = tmp_path / "api.md"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--output", str(output)], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    committed = (ROOT / "docs" / "api.md").read_text()
    assert output.read_text() == committed, "docs/api.md is out of date: run python scripts/api_reference.py"


def test_every_public_name_has_a_docstring():
    script = load_script()
    objects = script.public_objects()
    assert {"tl_transcoders", "tl_transcoders.attribution", "tl_transcoders.training"} <= set(objects)
    assert all(members for members in objects.values()), "a documented module exports nothing"
    assert script.undocumented(objects) == []


def test_entries_follow_the_code():
    """Each public function's entry shows every parameter it has and its docstring."""
    script = load_script()
    objects = script.public_objects()
    text = script.render(objects)
    for module, members in objects.items():
        assert f"## {module}\n" in text
        for name, obj in members:
            assert f"### `{name}`\n" in text
            if inspect.isfunction(obj):
                signature = script.format_signature(obj, name)
                assert all(f"{parameter}" in signature for parameter in inspect.signature(obj).parameters)
                assert f"```python\n{signature}\n```\n\n{script.as_markdown(script.own_docstring(obj))}" in text
