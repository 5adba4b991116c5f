"""Where does a real-size trial's time go? (issue 6: the share outside render + score, target <= 10%)

The demo runs on tiny models whose renders take a fraction of a second, so its merge / bookkeeping share says little
about a real study. This runs the real search code (``run_search``: pipeline evaluator, incremental merger, in-place
swap, renderer, scorers, SQLite storage, artifacts) on full-size SD1-layout checkpoints (the random fp16 pool
``bench_merge.py`` generates, reused from ``--workdir``) with a full-size **random** CLIP ViT-L/14 tower (open_clip
architecture ``ViT-L-14-quickgelu`` with random weights written once to ``--workdir``; no download) and the LAION
aesthetic head when ``../shared/data`` has it, a random head otherwise. Rendering is reduced to what a CPU can do in
minutes (``--size``, ``--steps``, ``--prompts``); on a GPU at 512 px / 20 steps renders are larger still, so the
share printed here is an upper bound for the same merge cost.

Prints, per trial, merge / render / score / other seconds and the share outside render + score, and the totals.

  python experiments/bench_trial.py --trials 5 --size 256 --steps 8 --prompts 2 --json experiments/results/bench_trial.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "experiments"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))


def random_vit_l(workdir: Path) -> Path:
    """Random ViT-L/14 (quickgelu) weights in open_clip's state-dict form, written once (~1.7 GB fp32)."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    path = workdir / "random-ViT-L-14-quickgelu.safetensors"
    if not path.is_file():
        torch.manual_seed(0)
        model = open_clip.create_model("ViT-L-14-quickgelu", pretrained=None)
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
        tmp.rename(path)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "astolfo-bench-merge"))
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--arch", choices=["sd1", "sdxl"], default="sd1", help="layout of the full-size pool (bench_merge.ensure_pool)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    from bench_merge import ensure_pool

    from astolfo_opt.search.app import run_search
    from scorers.testing import find_laion_head, make_random_head

    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    paths = ensure_pool(work, 4, a.arch)
    tower = random_vit_l(work)
    head = find_laion_head() or make_random_head(work / "random_head.pth")
    run = work / "bench_trial_run"
    for name in ("study.db", "study.db-wal", "study.db-shm"):
        (run / name).unlink(missing_ok=True)
    tower_cfg = {"model": "ViT-L-14-quickgelu", "pretrained": str(tower), "device": a.device}
    cfg = {
        "study_name": "bench_trial", "run_dir": str(run), "n_trials": a.trials, "seed": 0, "progress": False, "artifacts": True,
        "device": a.device, "warm_start": True, "reuse_duplicates": True, "time_embed_block": "IN00",
        "pool": {"folder": str(paths[0].parent), "base": "base"},
        "space": {"kind": "inclusion_mbw", "components": ["unet", "te0", "te1"] if a.arch == "sdxl" else ["unet", "te0"],
                  "min_models": 1, "include_base": True,
                  "mbw": {"components": ["unet"], "range": [0.0, 1.0]}},
        "sampler": {"name": "random"}, "pruner": {"name": "none"}, "storage": {"kind": "rdb"}, "strategy": {"name": "optuna"},
        "evaluator": {"kind": "pipeline", "out_dtype": "fp16", "hash_tensors": True},
        "render": {"prompt_set": "default", "n_prompts": a.prompts, "width": a.size, "height": a.size, "steps": a.steps,
                   "guidance_scale": 7.0, "scheduler": "euler", "batch_size": 1},
        "scorer": {"scorers": {"clip": {"_target_": "scorers.clip_similarity.ClipSimilarity", **tower_cfg},
                               "aesthetic": {"_target_": "scorers.laion_aesthetic.LaionAesthetic", "head": str(head), **tower_cfg}},
                   "weights": {"clip": 1.0, "aesthetic": 1.0}, "normalisation": {"clip": "none", "aesthetic": "none"},
                   "multi": False, "holdout": {}},
    }
    t0 = time.perf_counter()
    res = run_search(cfg)
    wall = time.perf_counter() - t0

    import optuna

    study = optuna.load_study(study_name="bench_trial", storage=f"sqlite:///{run / 'study.db'}")
    rows = []
    for t in study.trials:
        tm = t.user_attrs.get("time") or {}
        tot = float(tm.get("total", 0.0))
        outside = (tot - tm.get("render", 0.0) - tm.get("score", 0.0)) / tot if tot else float("nan")
        rows.append({"trial": t.number, "changed": (t.user_attrs.get("merge") or {}).get("changed"), **tm, "outside_share": outside})
        print(f"trial {t.number}: merge {tm.get('merge', 0):6.2f}s render {tm.get('render', 0):6.2f}s score {tm.get('score', 0):5.2f}s "
              f"other {tm.get('other', 0):5.2f}s  outside render+score {100 * outside:5.1f}%  changed {rows[-1]['changed']}", flush=True)
    split = res.time_split
    tot = split.get("total") or 1.0
    later = [r for r in rows[1:]]  # the first trial fills the incremental caches (a full merge)
    later_tot = sum(r.get("total", 0.0) for r in later) or 1.0
    later_out = sum(r.get("total", 0.0) - r.get("render", 0.0) - r.get("score", 0.0) for r in later) / later_tot
    summary = {"arch": a.arch, "device": a.device, "trials": a.trials, "size": a.size, "steps": a.steps, "prompts": a.prompts,
               "wall_s": wall,
               "build_pipeline_and_scorers_s": wall - tot, "split": split,
               "outside_share_all": (tot - split.get("render", 0.0) - split.get("score", 0.0)) / tot,
               "outside_share_after_first": later_out, "rows": rows}
    print(f"all {len(rows)} trials: outside render+score {100 * summary['outside_share_all']:.1f}%; "
          f"after the first (cache-filling) trial: {100 * later_out:.1f}%; build + load {summary['build_pipeline_and_scorers_s']:.1f}s")
    if a.json:
        from astolfo_opt.checkpoint.writer import atomic_write_text

        atomic_write_text(Path(a.json), json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
