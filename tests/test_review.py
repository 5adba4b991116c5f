"""Review and calibration: Bradley-Terry fits, the preference study the dashboard serves (answers, undo, skip),
re-scoring a study with a calibration, and the CLI. The simulated reviewer on the real world and the browser test
are at the end (slow)."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest

from astolfo_opt.cli import main
from astolfo_opt.errors import ConfigError
from astolfo_opt.search.calibration import Calibration, ObjectiveForm, copy_rescored, fit, prompt_features
from astolfo_opt.search.review import Review, untitled_grid

FORM = ObjectiveForm(("clip", "aesthetic"), {"clip": 1.0, "aesthetic": 1.0}, {"clip": 1.0, "aesthetic": 1.0},
                     {"clip": {"kind": "minmax", "low": 0.0, "high": 1.0}, "aesthetic": {"kind": "minmax", "low": 2.5, "high": 7.5}})
PROMPTS = [f"a {c} square on black" for c in ("red", "green", "blue", "yellow")]


# ------------------------------------------------------------------------------------------------ the fit alone
def _features(rng: random.Random, n: int) -> dict[int, dict[str, dict[str, float]]]:
    return {i: {p: {"clip": rng.uniform(0.2, 0.9), "aesthetic": rng.uniform(0.2, 0.9)} for p in PROMPTS} for i in range(n)}


def test_no_answers_keeps_the_automatic_weights_and_ranking():
    feats = _features(random.Random(0), 6)
    cal = fit(FORM, feats, [])
    assert all(w == FORM.weights for w in cal.prompt_weights.values())
    auto = sorted(feats, key=lambda n: -sum(sum(v.values()) for v in feats[n].values()))
    assert sorted(feats, key=lambda n: -cal.features_value(feats[n])) == auto


def test_answers_from_a_hidden_weighting_rank_the_candidates_closer_to_it_over_seeds():
    """A hidden taste that weighs one prompt's CLIP score 6x answers 20 rounds (worst of 3, as on the page). Over 12
    seeds, the calibrated ranking agrees with the taste better than the automatic one (Spearman) in >= 10, with a
    median gain >= 0.1; the weight the taste cares about moves up and no weight goes negative."""
    from scipy.stats import spearmanr

    gains = []
    for seed in range(12):
        rng = random.Random(seed)
        feats = _features(rng, 8)
        hidden = {p: {"clip": 6.0 if p == PROMPTS[2] else 1.0, "aesthetic": 1.0} for p in PROMPTS}
        taste = {n: sum(hidden[p][k] * v for p, fk in f.items() for k, v in fk.items()) for n, f in feats.items()}
        pairs = []
        for _ in range(20):
            shown = rng.sample(sorted(feats), 3)
            worst = min(shown, key=taste.get)
            pairs += [(b, worst) for b in shown if b != worst]
        cal = fit(FORM, feats, pairs)
        ns = sorted(feats)
        auto = spearmanr([taste[n] for n in ns], [sum(sum(v.values()) for v in feats[n].values()) for n in ns])[0]
        calibrated = spearmanr([taste[n] for n in ns], [cal.features_value(feats[n]) for n in ns])[0]
        gains.append(calibrated - auto)
        assert all(w >= 0 for pw in cal.prompt_weights.values() for w in pw.values())
        assert cal.prompt_weights[PROMPTS[2]]["clip"] > 1.0
    assert sum(g > 0 for g in gains) >= 10 and statistics.median(gains) >= 0.1, gains


def test_calibration_file_round_trip_and_bad_files(tmp_path):
    cal = fit(FORM, _features(random.Random(1), 4), [(0, 1), (0, 2), (3, 1)], source={"study": "s"})
    path = cal.save(tmp_path / "cal.json")
    back = Calibration.load(path)
    assert back.hash == cal.hash and back.prompt_weights == cal.prompt_weights
    row = {"prompt": PROMPTS[0], "seed": 1, "scores": {"clip": 0.5, "aesthetic": 5.0}}
    assert back.row_value(row) == pytest.approx(cal.row_value(row))
    with pytest.raises(ConfigError, match="not found.*objective.calibration"):
        Calibration.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"format": "something-else"}')
    with pytest.raises(ConfigError, match="not an astolfo-opt calibration"):
        Calibration.load(tmp_path / "bad.json")


# ------------------------------------------------------------------------------------------------ a recorded study
def make_study(tmp_path: Path, n: int = 6, seed: int = 0) -> tuple[str, optuna.Study]:
    """A finished study as `search` records it: per-prompt rows, objective attrs and a grid artifact per trial."""
    from PIL import Image

    from astolfo_opt.search.artifacts import ArtifactWriter

    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="s", storage=url, direction="maximize")
    study.set_user_attr("objective", {"names": ["objective"], "directions": ["maximize"], "scorers": list(FORM.scorers),
                                      **FORM.as_attr()})
    writer = ArtifactWriter(tmp_path / "artifacts")
    rng = random.Random(seed)
    cal0 = fit(FORM, {0: {p: dict.fromkeys(FORM.scorers, 0.0) for p in PROMPTS}}, [])
    for i in range(n):
        t = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
        rows = [{"prompt": p, "seed": s, "scores": {"clip": rng.uniform(0.2, 0.9), "aesthetic": rng.uniform(3, 7)}}
                for p in PROMPTS for s in (1, 2)]
        for r in rows:
            r["values"] = [cal0.row_value(r)]
        t.set_user_attr("per_prompt", rows)
        t.set_user_attr("recipe", json.dumps({"trial": i}))
        colour = tuple(rng.randrange(256) for _ in range(3))
        writer.upload(t, {"trial": i}, [Image.new("RGB", (64, 64), colour)] * 4, [f"{p} | s1" for p in PROMPTS],
                      title=f"s trial {i} objective=0.1234")
        for step in (4, 8):
            t.report(cal0.value(rows[:step]), step)
        study.tell(t, cal0.value(rows))
    return url, study


def test_grid_copies_are_blind(tmp_path):
    """The page shows the trial's grid without its title bar (which prints the objective value)."""
    import io

    from PIL import Image

    from astolfo_opt.render.grid import make_grid

    ims = [Image.new("RGB", (64, 64), (200, 10, 10))] * 2
    plain = make_grid(ims, ["a", "b"])
    buf = io.BytesIO()
    make_grid(ims, ["a", "b"], title="trial 3 objective=1.2345").save(buf, format="PNG")
    blind = Image.open(io.BytesIO(untitled_grid(buf.getvalue())))
    plain = plain.crop((0, 1, plain.width, plain.height))  # the title bar's rectangle covers one row of top padding
    assert blind.size == plain.size and blind.tobytes() == plain.tobytes()


def test_review_rounds_answers_undo_and_skip_through_the_dashboard_api(tmp_path):
    url, study = make_study(tmp_path, n=6)
    review = Review(url, "s", top=5, show=3)
    assert [c.number for c in review.candidates] == sorted(range(6), key=lambda n: -study.trials[n].value)[:5]
    assert review.refill() == [c.number for c in review.candidates[:3]]  # first round: the automatic top 3
    shown = review.on_screen()
    assert len(shown) == 3 and all(s["source_trial"] in review.by_number for s in shown)
    pref = optuna.load_study(study_name="s+review", storage=url)
    assert all(pref.trials[s["number"]].user_attrs["grid"] for s in shown)

    # an answer: the clicked grid leaves and two pairs are recorded; the two survivors never met, so they meet head
    # to head before any challenger comes in
    worst = shown[0]
    review.api.choose_worst(review.study_id, [s["number"] for s in shown], worst["number"])
    assert worst["number"] not in [s["number"] for s in review.on_screen()]
    assert sorted(review.answers()) == sorted((s["source_trial"], worst["source_trial"]) for s in shown[1:])
    assert review.refill() == [] and len(review.on_screen()) == 2
    a, b = review.on_screen()
    review.api.choose_worst(review.study_id, [a["number"], b["number"]], b["number"])
    assert (a["source_trial"], b["source_trial"]) in review.answers()
    added = review.refill()  # the winner stays; two challengers never shown yet come in
    assert len(added) == 2 and not set(added) & {s["source_trial"] for s in shown}
    assert len(review.on_screen()) == 3

    # undo the head-to-head answer: its pair is gone and its grid is back on screen
    hist = review.history()
    last = next(h for h in hist if h["clicked"] == b["number"])
    review.api.undo(review.study_id, last["id"])
    assert (a["source_trial"], b["source_trial"]) not in review.answers() and review.rounds()["undone"] == 1
    assert b["number"] in [s["number"] for s in review.on_screen()]

    # skip: leaves the screen, records no preference
    screen = review.on_screen()
    review.api.skip(review.study_id, screen[-1]["trial_id"])
    assert screen[-1]["number"] not in [s["number"] for s in review.on_screen()] and len(review.answers()) == 2
    assert review.rounds() == {"answers": 1, "undone": 1, "skipped": 1}


def test_review_refuses_what_it_cannot_review_in_one_line(tmp_path, capsys):
    url, _ = make_study(tmp_path, n=1)
    assert main(["review", "--storage", url, "--study", "nope", "--no-serve"]) == 2
    assert "no study 'nope'" in capsys.readouterr().err
    assert main(["review", "--storage", url, "--study", "s", "--no-serve"]) == 2
    assert "review needs 2 or more" in capsys.readouterr().err
    assert main(["review", "--storage", url, "--study", "s", "--show", "5", "--no-serve"]) == 2
    assert "2 to 4 grids" in capsys.readouterr().err


def test_review_cli_prints_the_ranking_and_writes_the_calibration(tmp_path, capsys):
    url, study = make_study(tmp_path, n=5)
    review = Review(url, "s", top=5, show=2)
    review.refill()
    a, b = review.on_screen()
    review.api.choose_worst(review.study_id, [a["number"], b["number"]], a["number"])  # prefer b
    out = tmp_path / "cal.json"
    assert main(["review", "--storage", url, "--study", "s", "--top", "5", "--show", "2", "--no-serve", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "1 answers" in text and "weights per scorer: clip 1 ->" in text
    cal = Calibration.load(out)
    assert cal.source["answers"] == 1 and cal.source["pairs"] == 1
    ca, cb = review.by_number[a["source_trial"]], review.by_number[b["source_trial"]]
    assert cal.features_value(cb.features) - cal.features_value(ca.features) > cb.value - ca.value  # b gained on a


def test_rescoring_with_a_calibration_reproduces_or_changes_values_without_rendering(tmp_path):
    url, study = make_study(tmp_path, n=5)
    form = ObjectiveForm.of_study(study.user_attrs, "s")
    feats = {t.number: prompt_features(t.user_attrs["per_prompt"], form) for t in study.trials}
    same = fit(form, feats, [])  # no answers: the automatic objective, so the same values
    dst = optuna.create_study(study_name="same", storage=url, direction="maximize")
    assert copy_rescored(study, dst, same) == 5
    for a, b in zip(study.trials, dst.trials, strict=True):
        assert b.value == pytest.approx(a.value, rel=1e-12) and b.params == a.params
        assert b.intermediate_values == pytest.approx(a.intermediate_values)
        assert b.user_attrs["rescored_from"] == {"study": "s", "number": a.number, "value": a.value}
        assert b.user_attrs["scored_with"] == same.label
        assert any(k.startswith("artifacts:") for k in b.system_attrs)  # the grids stay linked
    moved = fit(form, feats, [(4, 0), (4, 1), (4, 2), (4, 3)] * 3)
    dst2 = optuna.create_study(study_name="moved", storage=url, direction="maximize")
    copy_rescored(study, dst2, moved)
    assert np.argmax([t.value for t in dst2.trials]) == 4
    for t in dst2.trials:
        assert t.value == pytest.approx(moved.value(t.user_attrs["per_prompt"]))


def test_search_with_a_calibration_it_cannot_continue_is_one_line(tiny_pools, tmp_path, capsys):
    pool = tiny_pools["sd1"]

    def search(cal: Calibration) -> tuple[int, str]:
        path = cal.save(tmp_path / "cal.json")
        rc = main(["search", "evaluator.kind=benchkit.evaluators.synthetic", f"pool.folder={pool.folder}", f"pool.base={pool.base}",
                   "space=inclusion",
                   f"run_dir={tmp_path / 'run'}", "study_name=other", "progress=false", f"objective.calibration={path}"])
        return rc, capsys.readouterr().err

    rc, err = search(fit(FORM, _features(random.Random(2), 3), [], source={"study": "mix1"}))
    assert rc == 2 and "fitted on scorers ['clip', 'aesthetic'], the objective has ['synthetic']" in err, err
    synthetic = ObjectiveForm(("synthetic",), {"synthetic": 1.0}, {"synthetic": 1.0}, {"synthetic": {"kind": "none"}})
    rc, err = search(fit(synthetic, {0: {"p": {"synthetic": 0.5}}}, [], source={"study": "mix1"}))
    assert rc == 2 and "no study 'other'" in err and "fitted on study 'mix1'" in err, err
    assert optuna.get_all_study_names(f"sqlite:///{tmp_path / 'run' / 'study.db'}") == []  # nothing was created


# ------------------------------------------------------------------------------------------------ on the world (slow)
@pytest.fixture(scope="module")
def world_study(demo_world, tmp_path_factory):
    from astolfo_opt.search.app import run_search
    from astolfo_opt.search.demo import world_search_config

    out = tmp_path_factory.mktemp("review-study")
    # as bench_review.py's reporting seed 0 (TPE: its studies differ per seed; the default surrogate's share many trials)
    run_search(world_search_config(demo_world, out, 30, study_name="w", extra_overrides=["progress=false", "sampler=tpe", "seed=0"]))
    return out


@pytest.mark.slow
def test_search_continues_with_a_calibration_rescoring_earlier_trials(demo_world, world_study, tmp_path):
    from astolfo_opt.search.app import run_search
    from astolfo_opt.search.demo import world_search_config

    url = f"sqlite:///{world_study / 'study.db'}"
    review = Review(url, "w", top=6, show=3)
    review.refill()
    shown = review.on_screen()
    review.api.choose_worst(review.study_id, [s["number"] for s in shown], shown[0]["number"])
    cal = review.calibrate()
    path = cal.save(tmp_path / "cal.json")
    src = optuna.load_study(study_name="w", storage=url)
    n_src = len([t for t in src.trials if t.state.is_finished() and t.state.name != "FAIL"])
    res = run_search(world_search_config(demo_world, world_study, n_src + 3, study_name="w",
                                         extra_overrides=["progress=false", f"objective.calibration={path}"]))
    assert res.study_name == f"w+cal-{cal.hash[:8]}"
    dst = optuna.load_study(study_name=res.study_name, storage=url)
    copied = [t for t in dst.trials if "rescored_from" in t.user_attrs]
    new = [t for t in dst.trials if "rescored_from" not in t.user_attrs]
    assert len(copied) == n_src and len(new) == 3
    for t in copied:
        if t.value is not None:
            assert t.value == pytest.approx(cal.value(t.user_attrs["per_prompt"]))
    # the trials it rendered are scored with the calibration too, and say so (the dashboard shows user attrs)
    for t in new:
        assert t.user_attrs["scored_with"] == cal.label
        if t.state.name == "COMPLETE" and "cached_from" not in t.user_attrs:
            assert t.value == pytest.approx(cal.value(t.user_attrs["per_prompt"]))
    assert dst.metric_names == [f"objective[{cal.hash[:8]}]"]
    # reviewing the calibrated study starts from its calibration: no new answers, the same weights
    again = Review(url, res.study_name, top=6, show=3)
    assert again.calibration.prompt_weights == cal.prompt_weights
    assert dst.user_attrs["calibration"]["continues"] == "w"
    assert src.trials[0].user_attrs["scored_with"] == "automatic"


@pytest.mark.slow
def test_simulated_reviewer_beats_the_automatic_top1_within_30_answers(demo_world, world_study, experiment):
    """Hidden tastes the objective does not know (the judge through attribute weights or a colour / background focus):
    the median number of rounds until the calibrated top-1 is better on the taste is <= 30 (cap 40), over the tastes
    where the automatic top-1 is not already the best candidate (at least 3 must be such)."""
    sim = experiment("review_sim")
    url = f"sqlite:///{world_study / 'study.db'}"
    study = optuna.load_study(study_name="w", storage=url)
    results = []
    judged = sim.JudgedTrials(demo_world, study)
    for name, h in sim.tastes().items():
        with contextlib.suppress(KeyError):
            optuna.delete_study(study_name="w+review", storage=url)
        res = sim.rounds_to_beat(Review(url, "w", top=8, show=3), sim.WorldTaste(judged, h["weights"], h.get("focus")), 40)
        results.append((name, res))
    beatable = [r for _, r in results if "already" not in r.get("reason", "")]
    assert len(beatable) >= 3, results
    rounds = [r["rounds"] if r["rounds"] is not None else 41 for r in beatable]
    assert statistics.median(rounds) <= 30, results


# ------------------------------------------------------------------------------------------------ a real browser
CHROMIUM, CHROMEDRIVER = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="no system Chromium + chromium-driver "
                    "(Debian: apt-get install chromium chromium-driver; .ci/run installs them where it can)")
def test_browser_sees_the_grids_clicks_worst_and_the_answer_is_stored(world_study, tmp_path):
    """Headless Chromium on `astolfo-opt review`'s page: the grid images load (not broken), a click on "Worst" is
    recorded in the storage, and the page shows a new challenger. ASTOLFO_REVIEW_SCREENSHOT=PATH keeps the
    screenshot (the README's is taken this way)."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url = f"sqlite:///{world_study / 'study.db'}"
    with contextlib.suppress(KeyError):
        optuna.delete_study(study_name="w+review", storage=url)
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "astolfo_opt.cli", "review", "--storage", url, "--study", "w",
                               "--top", "6", "--show", "3", "--port", str(port), "--out", str(tmp_path / "cal.json")],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        opts.add_argument(arg)
    driver = None
    try:
        line = ""
        deadline = time.time() + 120
        while "Open http" not in line and time.time() < deadline:
            line = server.stdout.readline()
            assert line or server.poll() is None, "review exited before serving"
        page = line.split("Open ", 1)[1].split(" ", 1)[0]
        for _ in range(100):  # the server starts listening just after the line
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
        driver.get(page)
        loaded = "return Array.from(document.images).filter(i => i.src.includes('/artifacts/') && i.complete && i.naturalWidth > 0).length"
        WebDriverWait(driver, 60).until(lambda d: d.execute_script(loaded) >= 3)
        broken = driver.execute_script("return Array.from(document.images).filter(i => i.complete && i.naturalWidth === 0).length")
        assert broken == 0
        shot = Path(os.environ.get("ASTOLFO_REVIEW_SCREENSHOT") or tmp_path / "review.png")
        shot.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        review = Review(url, "w", top=6, show=3)
        before = {s["number"] for s in review.on_screen()}
        worst = [b for b in driver.find_elements(By.TAG_NAME, "button") if b.text.strip().lower() == "worst"]
        assert len(worst) == 3, [b.text for b in driver.find_elements(By.TAG_NAME, "button")]
        worst[0].click()
        for _ in range(100):  # the page's POST writes the pairs, then the history entry
            if review.answers() and review.history():
                break
            time.sleep(0.1)
        assert len(review.answers()) == 2  # worst of 3: two (better, worse) pairs
        clicked = review.history()[0]["clicked"]
        assert clicked in before
        driver.refresh()  # the two survivors, head to head (they never met): exactly two grids, both loaded
        WebDriverWait(driver, 60).until(lambda d: d.execute_script(loaded) == 2)
        assert {s["number"] for s in review.on_screen()} == before - {clicked}
    finally:
        if driver is not None:
            driver.quit()
        server.terminate()
        server.wait(timeout=30)
