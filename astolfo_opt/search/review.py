"""Review: a person marks the worst of a few grids in optuna-dashboard's preference UI; the answers calibrate the
objective (:mod:`astolfo_opt.search.calibration`).

How it maps onto optuna-dashboard (``optuna_dashboard.preferential``):

- The review is a *preferential study* named ``<study>+review`` in the study's own storage. Each of its trials is one
  appearance of a candidate: user attribute ``source_trial`` (the searched trial) and ``grid`` (the id of a copy of
  that trial's image grid, title bar cut off so the person judges the pictures, not the objective value printed on
  them). The feedback component is that artifact, so the page shows grids.
- The page shows every RUNNING / COMPLETE review trial that was neither marked worst (in a history entry not undone)
  nor skipped. :meth:`Review.refill` keeps ``show`` of them on screen: the survivors of an answer stay and challengers
  come in, the candidates shown least so far (ties: the best under the current calibration). One exception: "mark
  the worst of three" never says which of the two survivors is better, and the two best candidates would survive
  together forever without ever being compared. So when two grids that never met directly are left on the page,
  the next round is just those two, head to head.
- Candidates are the top ``top`` finished trials by the study's objective, near-duplicates folded: a trial whose
  objective on every prompt is within ``fold`` (default 0.05) of a better candidate's renders pictures a person
  cannot tell apart (typically the same inclusion set at a slightly different alpha), and asking someone to tell
  them apart wastes a click.

Answers are read back as (better, worse) pairs of searched trials from the dashboard's own records (undo and skip
included) by :meth:`Review.answers`, and :meth:`Review.calibrate` fits the calibration. :class:`DashboardAPI` calls
the dashboard's HTTP API in process (its WSGI app), so a simulated user clicks through the same endpoints as the
browser does.
"""

from __future__ import annotations

import io
import json
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from astolfo_opt.errors import ConfigError
from astolfo_opt.search.calibration import DEFAULT_PRIOR, Calibration, ObjectiveForm, fit, prompt_features, stored_rows

SUFFIX = "+review"


@dataclass
class ReviewCandidate:
    number: int
    value: float
    grid: str  # artifact id of the searched trial's grid PNG
    features: dict[str, dict[str, float]]
    folded: list[int] = field(default_factory=list)  # near-duplicate trials shown through this one


def grid_artifact(trial: Any) -> str | None:
    """The id of the trial's uploaded image grid (optuna stores artifact metadata in the trial's system attributes)."""
    for k, v in trial.system_attrs.items():
        if k.startswith("artifacts:"):
            meta = json.loads(v) if isinstance(v, str) else v
            if str(meta.get("mimetype", "")).startswith("image/"):
                return str(meta["artifact_id"])
    return None


def review_candidates(study: Any, form: ObjectiveForm, top: int, fold: float = 0.05) -> list[ReviewCandidate]:
    """The best ``top`` distinct finished trials that have a grid, best first (see the module docstring)."""
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.values and "cached_from" not in t.user_attrs]
    done.sort(key=lambda t: (-t.values[0], t.number))
    out: list[ReviewCandidate] = []
    for t in done:
        grid, rows = grid_artifact(t), stored_rows(study, t)
        if grid is None or not rows:
            continue
        feats = prompt_features(rows, form)
        twin = next((c for c in out if c.features.keys() == feats.keys() and all(
            abs(sum(form.weights[k] * (c.features[p][k] - feats[p][k]) for k in form.scorers)) <= fold for p in feats)), None)
        if twin is not None:
            twin.folded.append(t.number)
            continue
        if len(out) < top:
            out.append(ReviewCandidate(t.number, float(t.values[0]), grid, feats))
    return out


def untitled_grid(data: bytes) -> bytes:
    """A grid PNG without its title bar (the rows at the top filled with the title colour, text included)."""
    from PIL import Image

    from astolfo_opt.render.grid import TITLE_BG

    im = Image.open(io.BytesIO(data)).convert("RGB")
    y = 0
    while y < im.height and im.getpixel((0, y)) == TITLE_BG:
        y += 1
    buf = io.BytesIO()
    im.crop((0, y, im.width, im.height)).save(buf, format="PNG")
    return buf.getvalue()


class DashboardAPI:
    """optuna-dashboard's HTTP API, called in process through its WSGI app (the endpoints its web page uses)."""

    def __init__(self, storage: Any, artifact_store: Any = None):
        import optuna_dashboard

        self.app = optuna_dashboard.wsgi(storage, artifact_store=artifact_store)

    def call(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> tuple[int, Any]:
        raw = json.dumps(body).encode() if body is not None else b""
        path, _, query = path.partition("?")
        env = {"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": query, "SERVER_NAME": "localhost",
               "SERVER_PORT": "80", "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(raw), "CONTENT_LENGTH": str(len(raw)),
               "CONTENT_TYPE": "application/json", "wsgi.errors": io.StringIO(), "wsgi.version": (1, 0),
               "wsgi.multithread": False, "wsgi.multiprocess": False, "wsgi.run_once": False}
        status: list[str] = []
        chunks = self.app(env, lambda s, h, *a: status.append(s))
        data = b"".join(chunks)
        code = int(status[0].split()[0])
        if code >= 400:
            raise ConfigError(f"optuna-dashboard {method} {path}: {status[0]} {data[:200]!r}")
        return code, (json.loads(data) if data and data[:1] in b"{[" else None)

    def choose_worst(self, study_id: int, candidates: Sequence[int], clicked: int) -> None:
        self.call("POST", f"/api/studies/{study_id}/preference",
                  {"mode": "ChooseWorst", "candidates": list(candidates), "clicked": int(clicked)})

    def skip(self, study_id: int, trial_id: int) -> None:
        self.call("POST", f"/api/studies/{study_id}/{trial_id}/skip")

    def undo(self, study_id: int, history_id: str) -> None:
        self.call("DELETE", f"/api/studies/{study_id}/preference/{history_id}")


class Review:
    """One study's review: candidates, the preference study, what is on screen, the answers, the calibration."""

    def __init__(self, storage: str, study: str, *, top: int = 8, show: int = 3, artifacts: str | Path | None = None,
                 prior: float = DEFAULT_PRIOR, fold: float = 0.05):
        import optuna
        from optuna.artifacts import FileSystemArtifactStore

        from astolfo_opt.commands.dashboard import default_artifacts
        from astolfo_opt.search.study import open_storage_url

        if not 2 <= show <= 4:
            raise ConfigError(f"--show {show}: the preference page compares 2 to 4 grids at a time")
        self.storage_url = storage
        self.storage = open_storage_url(storage)
        try:
            self.src = optuna.load_study(study_name=study, storage=self.storage)
        except KeyError:
            names = [s.study_name for s in optuna.get_all_study_summaries(self.storage) if not s.study_name.endswith(SUFFIX)]
            raise ConfigError(f"no study {study!r} in {storage} (studies there: {', '.join(names) or 'none'}; give --study)") from None
        art = Path(artifacts).expanduser() if artifacts else default_artifacts(storage)
        if art is None or not art.is_dir():
            raise ConfigError(f"artifact folder not found: {art} (the study's grids; give --artifacts runs/<study>/artifacts)")
        self.artifacts_dir = art
        self.store = FileSystemArtifactStore(str(art))
        self.form = ObjectiveForm.of_study(self.src.user_attrs, study)
        self.prior_cal = (Calibration.from_json(self.src.user_attrs["calibration"])
                          if "calibration" in self.src.user_attrs else None)
        self.candidates = review_candidates(self.src, self.form, top, fold)
        if len(self.candidates) < 2:
            raise ConfigError(f"study {study!r} has {len(self.candidates)} finished trial(s) with a grid to compare; "
                              "review needs 2 or more (run more trials, with artifacts=true)")
        self.by_number = {c.number: c for c in self.candidates}
        self.show, self.prior = show, prior
        self.pref = self._open_preferential(f"{study}{SUFFIX}")
        self.study_id = self.pref._study._study_id
        self.api = DashboardAPI(self.storage, self.store)
        self.calibration = self.calibrate()

    def _open_preferential(self, name: str) -> Any:
        import optuna
        from optuna_dashboard import register_preference_feedback_component
        from optuna_dashboard.preferential import create_study

        pref = create_study(n_generate=self.show, storage=self.storage, study_name=name, load_if_exists=True,
                            sampler=optuna.samplers.RandomSampler(seed=0))  # proposals come from the study, not a sampler
        register_preference_feedback_component(pref, "artifact", artifact_key="grid")
        pref.set_user_attr("reviews", {"study": self.src.study_name, "candidates": [c.number for c in self.candidates]})
        return pref

    # -------------------------------------------------------------------------------------------- the page's state
    def history(self) -> list[dict[str, Any]]:
        """The page's answer history: ``{"id", "candidates", "clicked", "is_removed"}`` per answer (undo removes)."""
        from optuna_dashboard._serializer import serialize_preference_history

        attrs = self.storage.get_study_system_attrs(self.study_id)
        return [{**h["history"], "is_removed": h["is_removed"]} for h in serialize_preference_history(attrs)]

    def on_screen(self) -> list[dict[str, Any]]:
        """The review trials the preference page shows (its own rule: running or complete, not marked worst in an
        answer that was not undone, not skipped), each with its ``source_trial``. Read from the storage, as the
        page's API does (the API caches trial lists for two seconds, the storage does not)."""
        from optuna.trial import TrialState
        from optuna_dashboard.preferential._system_attrs import get_skipped_trial_ids

        gone = {h["clicked"] for h in self.history() if not h["is_removed"]}
        skipped = set(get_skipped_trial_ids(self.storage.get_study_system_attrs(self.study_id)))
        return [{"number": t.number, "trial_id": t._trial_id, "source_trial": int(t.user_attrs["source_trial"])}
                for t in self.pref.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.COMPLETE))
                if t.number not in gone and t._trial_id not in skipped and "source_trial" in t.user_attrs]

    def times_shown(self) -> dict[int, int]:
        counts = dict.fromkeys(self.by_number, 0)
        for t in self.pref.get_trials(deepcopy=False):
            n = t.user_attrs.get("source_trial")
            if n in counts:
                counts[n] += 1
        return counts

    def refill(self) -> list[int]:
        """Add review trials until ``show`` are on screen, except when the page shows exactly two grids that were
        never compared directly: then they meet head to head first. Returns the searched trials added."""
        screen = {s["source_trial"] for s in self.on_screen()}
        if len(screen) == 2 and len(self.candidates) > 2:
            a, b = screen
            met = {frozenset(p) for p in self.answers()}
            if frozenset((a, b)) not in met:
                return []
        seen = self.times_shown()
        rank = {n: i for i, n in enumerate(self.ranking(self.calibration))}
        added = []
        while len(screen) < min(self.show, len(self.candidates)):
            n = min((c for c in self.by_number if c not in screen), key=lambda c: (seen[c], rank[c]))
            self._add(n)
            screen.add(n)
            seen[n] += 1
            added.append(n)
        return added

    def _add(self, number: int) -> None:
        from optuna.artifacts import upload_artifact

        with self.store.open_reader(self.by_number[number].grid) as f:
            png = untitled_grid(f.read())
        trial = self.pref.ask()
        with tempfile.TemporaryDirectory(prefix="astolfo-review-") as tmp:
            path = Path(tmp) / f"candidate-{len(self.pref.trials):04d}.png"  # the name says nothing about the trial
            path.write_bytes(png)
            aid = upload_artifact(artifact_store=self.store, file_path=str(path), study_or_trial=trial, mimetype="image/png")
        trial.set_user_attr("grid", aid)
        trial.set_user_attr("source_trial", number)

    # -------------------------------------------------------------------------------------------- answers and fit
    def answers(self) -> list[tuple[int, int]]:
        """(better, worse) pairs of searched trials, from the preferences the page recorded (undone ones removed)."""
        src = {t.number: t.user_attrs.get("source_trial") for t in self.pref.get_trials(deepcopy=False)}
        return [(src[b], src[w]) for b, w in self._pairs() if src.get(b) is not None and src.get(w) is not None]

    def _pairs(self) -> list[tuple[int, int]]:
        from optuna_dashboard.preferential._system_attrs import get_preferences

        return [tuple(p) for p in get_preferences(self.storage.get_study_system_attrs(self.study_id))]

    def rounds(self) -> dict[str, int]:
        from optuna_dashboard.preferential._system_attrs import get_skipped_trial_ids

        hist = self.history()
        return {"answers": sum(not h["is_removed"] for h in hist), "undone": sum(h["is_removed"] for h in hist),
                "skipped": len(get_skipped_trial_ids(self.storage.get_study_system_attrs(self.study_id)))}

    def calibrate(self) -> Calibration:
        r = self.rounds()
        self.calibration = fit(self.form, {c.number: c.features for c in self.candidates}, self.answers(), prior=self.prior,
                               base=self.prior_cal,
                               source={"study": self.src.study_name, "storage": self.storage_url, **r})
        return self.calibration

    def ranking(self, cal: Calibration | None = None) -> list[int]:
        """Candidates best first under ``cal`` (default: the current calibration)."""
        cal = cal or self.calibration
        return sorted(self.by_number, key=lambda n: (-self.value(n, cal), n))

    def value(self, number: int, cal: Calibration | None = None) -> float:
        return (cal or self.calibration).features_value(self.by_number[number].features)

    def report(self) -> list[str]:
        """The re-ranked top and the calibrated weights, as printed by ``astolfo-opt review``."""
        cal = self.calibration
        auto = [c.number for c in self.candidates]
        r = self.rounds()
        lines = [f"{r['answers']} answers ({r['undone']} undone, {r['skipped']} skipped) over {len(auto)} candidates; "
                 f"calibration {cal.hash[:8]}"]
        lines.append("rank  trial  automatic (rank)  calibrated")
        for i, n in enumerate(self.ranking(cal)):
            c = self.by_number[n]
            lines.append(f"{i + 1:>4}  #{n:<5} {c.value:9.4f} ({auto.index(n) + 1:>2})  {self.value(n, cal):10.4f}"
                         + (f"  (+{len(c.folded)} alike)" if c.folded else ""))
        lines.append("weights per scorer: " + ", ".join(f"{k} {self.form.weights[k]:.3g} -> {w:.3g}" for k, w in cal.weights.items()))
        moved = sorted(cal.prompt_weights.items(), key=lambda kv: -sum(abs(v) for v in kv[1].values()))[:3]
        if r["answers"]:
            lines.append("heaviest prompts: " + "; ".join(f"{p!r} " + ", ".join(f"{k} {v:.3g}" for k, v in w.items()) for p, w in moved))
        return lines
