"""Federations started by tests write nothing to the operator's home."""

import os
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def isolated_home(home: Path):
    """Points ``HOME`` at ``home`` (created) while the block runs."""
    home.mkdir(parents=True, exist_ok=True)
    saved = os.environ.get("HOME")
    os.environ["HOME"] = str(home)
    try:
        yield home
    finally:
        if saved is None:
            os.environ.pop("HOME")
        else:
            os.environ["HOME"] = saved
