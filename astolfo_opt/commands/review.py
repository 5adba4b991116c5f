"""``astolfo-opt review``: mark the worst of a few grids in optuna-dashboard's preference page; the answers calibrate
the objective (see :mod:`astolfo_opt.search.review`).

While it serves, a background loop keeps ``--show`` grids on the page and, after every answer, refits the
calibration, prints the re-ranked top and writes the calibration file (atomically: stopping at any moment leaves the
last complete one). Continue the search with it: ``astolfo-opt search ... objective.calibration=FILE``.
"""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path

from astolfo_opt.search.calibration import DEFAULT_PRIOR


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage", required=True, help="the study's storage: sqlite:///runs/<study>/study.db, an RDB URL or journal:PATH")
    p.add_argument("--study", required=True, help="study name (finished or still running)")
    p.add_argument("--top", type=int, default=8, help="candidates: the best K distinct trials (default 8)")
    p.add_argument("--show", type=int, default=3, help="grids per round, 2-4 (default 3)")
    p.add_argument("--artifacts", default=None, help="artifact folder (default: artifacts/ beside a sqlite/journal file)")
    p.add_argument("--out", default=None, help="calibration file (default: calibration.json beside the artifacts)")
    p.add_argument("--prior", type=float, default=DEFAULT_PRIOR,
                   help=f"how strongly the calibration stays at the automatic weights (default {DEFAULT_PRIOR})")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--no-serve", action="store_true", help="fit from the answers already given, print, write and exit")


def refresh(review, out: Path, last: list[int], lock: threading.Lock) -> None:
    """One step of the background loop: keep the page full; on a new answer, refit, print and write."""
    with lock:
        review.refill()
        n = len(review.answers())
        if n != last[0]:
            last[0] = n
            review.calibrate()
            review.calibration.save(out)
            print("\n".join(review.report()) + f"\nwrote {out}", flush=True)


def run(args: argparse.Namespace) -> int:
    from astolfo_opt.search.review import Review

    review = Review(args.storage, args.study, top=args.top, show=args.show, artifacts=args.artifacts, prior=args.prior)
    out = Path(args.out) if args.out else review.artifacts_dir.parent / "calibration.json"
    if args.no_serve:
        review.calibration.save(out)
        print("\n".join(review.report()) + f"\nwrote {out}")
        return 0
    import optuna_dashboard

    lock = threading.Lock()
    last = [-1]
    refresh(review, out, last, lock)
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(0.5):
            try:
                refresh(review, out, last, lock)
            except Exception as e:  # noqa: BLE001 - a transient storage error must not kill the page; say it and retry
                print(f"review: {type(e).__name__}: {e}", file=sys.stderr, flush=True)

    threading.Thread(target=loop, daemon=True, name="review-refill").start()
    url = f"http://{args.host}:{args.port}/dashboard/studies/{review.study_id}"
    print(f"review of {args.study}: {len(review.candidates)} candidates, {args.show} per round. Open {url} and mark the "
          f"worst grid each round (Ctrl-C stops; {out} holds the latest calibration)", flush=True)
    try:
        optuna_dashboard.run_server(review.storage, host=args.host, port=args.port, artifact_store=review.store)
    finally:
        stop.set()
    return 0
