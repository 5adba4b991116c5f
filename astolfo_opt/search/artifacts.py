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

from astolfo_opt.render.grid import make_grid


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
                make_grid(list(images)[: self.max_images], list(labels)[: self.max_images], title=title).save(gp)
                ids.append(upload_artifact(artifact_store=self.store, file_path=str(gp), study_or_trial=trial, mimetype="image/png"))
        return ids
