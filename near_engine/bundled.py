"""What ships inside `near_engine`: the trained near-tiny weights and the sample object of the main job.

A weights argument anywhere in the engine, the CLI and the add-on may be a folder or the name of a bundled model
("near-tiny"); `weights_folder` turns either into a folder, so the product works offline out of the box.
"""

from __future__ import annotations

from pathlib import Path

from .errors import CheckpointError

__all__ = ["BUNDLED_WEIGHTS", "DEFAULT_WEIGHTS", "SAMPLE_MESH", "weights_folder"]

_HERE = Path(__file__).resolve().parent

#: Bundled weights folders by model name.
BUNDLED_WEIGHTS: dict[str, Path] = {"near-tiny": _HERE / "weights" / "near-tiny"}
#: The model used when no weights are chosen.
DEFAULT_WEIGHTS = "near-tiny"
#: The main job's sample object: a textured mesh (OBJ + MTL + PNG) that was never in the training data.
SAMPLE_MESH = _HERE / "samples" / "vase.obj"


def weights_folder(name_or_folder: str | Path) -> Path:
    """The weights folder of a bundled model name or of a folder path (checked to exist)."""
    bundled = BUNDLED_WEIGHTS.get(str(name_or_folder))
    if bundled is not None:
        if not (bundled / "pipeline.json").is_file():
            raise CheckpointError(f"the bundled {name_or_folder} weights are missing from {bundled}: reinstall "
                                  "near_engine, or pass a weights folder")
        return bundled
    folder = Path(name_or_folder).expanduser()
    if not folder.is_dir():
        raise CheckpointError(f"{name_or_folder}: not a weights folder (nor a bundled model: "
                              f"{', '.join(BUNDLED_WEIGHTS)})")
    return folder
