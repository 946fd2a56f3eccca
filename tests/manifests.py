"""The official NeAR checkpoint manifests the weight-compatibility tests compare against (copies in tests/data)."""

from __future__ import annotations

import json
from pathlib import Path

MANIFEST_DIR = Path(__file__).resolve().parent / "data" / "manifests"


def load_manifest(name: str) -> dict:
    """The manifest `name` (e.g. "near_decoder"), as a dict."""
    return json.loads((MANIFEST_DIR / f"{name}.json").read_text())
