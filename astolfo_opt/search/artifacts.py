"""Per-trial artifacts for optuna-dashboard: the labelled image grid (PNG) and the recipe (JSON).

Stored with Optuna's own artifact API (``FileSystemArtifactStore`` at ``runs/<study>/artifacts`` +
``upload_artifact``) so ``astolfo-opt dashboard`` shows them beside each trial with no extra server.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _grid(images: Sequence[Any], labels: Sequence[str], title: str | None):
    """The renderer's grid when available; a plain fallback grid otherwise (labels in the image)."""
    try:
        from astolfo_opt.render.grid import make_grid

        return make_grid(list(images), list(labels), title=title)
    except ImportError:
        pass
    from PIL import Image, ImageDraw

    w, h = images[0].size
    cols = min(len(images), 4)
    rows = (len(images) + cols - 1) // cols
    pad = 14
    top = pad if title else 0
    grid = Image.new("RGB", (cols * w, top + rows * (h + pad)), "white")
    d = ImageDraw.Draw(grid)
    if title:
        d.text((2, 1), title, fill="black")
    for i, (img, lab) in enumerate(zip(images, labels, strict=False)):
        x, y = (i % cols) * w, top + (i // cols) * (h + pad)
        grid.paste(img.convert("RGB"), (x, y))
        d.text((x + 2, y + h + 1), lab[: max(w // 6, 4)], fill="black")
    return grid


class ArtifactWriter:
    """Uploads a trial's grid and recipe to a filesystem artifact store."""

    def __init__(self, root: str | Path, max_images: int = 16):
        from optuna.artifacts import FileSystemArtifactStore

        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.store = FileSystemArtifactStore(str(self.root))
        self.max_images = max_images

    def upload(self, trial, recipe_spec: dict[str, Any], images: Sequence[Any], labels: Sequence[str], title: str) -> list[str]:
        from optuna.artifacts import upload_artifact

        ids = []
        with tempfile.TemporaryDirectory(prefix="astolfo-art-") as tmp:
            rp = Path(tmp) / f"trial{trial.number:05d}-recipe.json"
            rp.write_text(json.dumps(recipe_spec, indent=1, sort_keys=True))
            ids.append(upload_artifact(artifact_store=self.store, file_path=str(rp), study_or_trial=trial, mimetype="application/json"))
            if images:
                gp = Path(tmp) / f"trial{trial.number:05d}-grid.png"
                _grid(list(images)[: self.max_images], list(labels)[: self.max_images], title).save(gp)
                ids.append(upload_artifact(artifact_store=self.store, file_path=str(gp), study_or_trial=trial, mimetype="image/png"))
        return ids
