"""The toy worlds, one module each (worlds/<name>.py; worlds/common.py holds what they share). A world is
looked up by its name, so grading, eval.py and compare.py never name one, and a new world touches none of
them."""
import importlib
from pathlib import Path

NAMES = tuple(sorted(p.stem for p in Path(__file__).parent.glob("*.py")
                     if p.stem not in ("__init__", "common")))


def get(name: str):
    """The world module called `name`, or an error listing the worlds there are."""
    if name not in NAMES:
        raise ValueError(f"no world {name!r} (worlds: {', '.join(NAMES)})")
    return importlib.import_module(f"worlds.{name}")
