"""docs/ARCHITECTURE.md is the map of the code: every module, class, function and file it
names must exist."""
from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("recstack", "retrieval", "coarse_rank", "fine_rank")
DOTTED = re.compile(r"`((?:%s)(?:\.[A-Za-z_][A-Za-z0-9_]*)+)`" % "|".join(PACKAGES))
PATH = re.compile(r"`((?:%s|tests|docs|protos|tools)/[A-Za-z0-9_./]*)`" % "|".join(PACKAGES))


def _resolve(name: str) -> bool:
    """Import the longest module prefix of `name`, then look the rest up as attributes."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def _text() -> str:
    return (REPO / "docs" / "ARCHITECTURE.md").read_text()


def test_the_map_names_something():
    assert len(DOTTED.findall(_text())) > 30


@pytest.mark.parametrize("name", sorted(set(DOTTED.findall(_text()))))
def test_every_dotted_name_in_the_map_exists(name):
    assert _resolve(name), f"docs/ARCHITECTURE.md names {name}, which does not exist"


@pytest.mark.parametrize("path", sorted(set(PATH.findall(_text()))))
def test_every_path_in_the_map_exists(path):
    assert (REPO / path.rstrip("/")).exists(), f"docs/ARCHITECTURE.md names {path}, which does not exist"
