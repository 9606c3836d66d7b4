"""The documents: the README stays short, relative links resolve, the demo's flags are documented."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = ["README.md", "docs/design.md", "docs/demo.md", "docs/huggingface.md", "benchmarks/README.md"]


def test_readme_is_at_most_250_lines():
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 250


@pytest.mark.parametrize("document", DOCUMENTS)
def test_relative_links_resolve(document):
    path = ROOT / document
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text(encoding="utf-8"))
    missing = [link for link in links if "://" not in link and not (path.parent / link).exists()]
    assert not missing, f"{document} links to missing files: {missing}"


def test_every_demo_flag_is_documented():
    from fused_trim.demo import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    flags = {s for action in parser._actions for s in action.option_strings if s.startswith("--") and s != "--help"}
    text = (ROOT / "docs/demo.md").read_text(encoding="utf-8")
    assert flags and not {f for f in flags if f"`{f}`" not in text}
