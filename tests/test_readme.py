"""The README documents every command-line flag of the front ends and keeps the CI test command."""
from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _parser(relpath: str) -> argparse.ArgumentParser:
    spec = importlib.util.spec_from_file_location(relpath.replace("/", "_").removesuffix(".py"), ROOT / relpath)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_parser()


@pytest.mark.parametrize("relpath", ["common/cli/llm.py", "common/cli/vit.py", "spinquant/optimize_rotation.py",
                                     "spinquant/main.py", "fake_quant/quickstart.py", "vit_quant/quickstart.py"])
def test_every_flag_is_documented(relpath):
    flags = [o for a in _parser(relpath)._actions if a.help != argparse.SUPPRESS for o in a.option_strings
             if o.startswith("--") and o != "--help"]
    missing = [f for f in flags if f"`{f}`" not in README and f"`{f} " not in README]
    assert not missing, f"{relpath}: flags missing from README.md: {missing}"


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python -m pytest tests" in README
    assert ci.strip().splitlines()[-1] == "python -m pytest tests"
