"""Fill every generated block of ``experiments/README_bench_search.md`` from the committed JSON (issue 15).

A block is ``<!-- generated:NAME -->`` ... ``<!-- /generated:NAME -->``; its content is ``BLOCKS[NAME]()``, a table
built only from files under ``experiments/results/``. No figure in those blocks is typed by hand, and the prose
around them quotes none. ``--check`` exits 1 when the README differs from what the JSON gives (a test runs it).

  python experiments/search_report.py            # rewrite the blocks
  python experiments/search_report.py --check    # is the README in sync with the JSON?
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
README = ROOT / "experiments" / "README_bench_search.md"
BLOCK = re.compile(r"(<!-- generated:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /generated:(?P=name) -->)", re.S)
#: strategy order of every table
ORDER = ("surrogate", "staged", "tpe", "cmaes", "gp", "random", "greedy", "qmc")


def _load(name: str) -> dict[str, Any] | None:
    p = RESULTS / name
    return json.loads(p.read_text()) if p.is_file() else None


def _missing(name: str, how: str) -> str:
    return f"*Not measured yet: `experiments/results/{name}` is not committed. Run:* `{how}`"


def _f(x: float | None, nd: int = 3) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def _t(x: int | float | None) -> str:
    return "-" if x is None else f"{x:g}"


def _names(strategies: dict[str, Any]) -> list[str]:
    return sorted(strategies, key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER))


# ------------------------------------------------------------------------------------------------ tables
def strategy_table(res: dict[str, Any]) -> str:
    """One oracle run (bench_search.py): trials to thresholds, best true s, the incumbent's true s, spread, runs."""
    seeds = res["seeds"]
    head = (f"N = {res['models']}, T = {res['trials']}, σ = {res['noise']}, seeds {', '.join(map(str, seeds))}"
            f"{' (' + res['seed_set'] + ' set)' if res.get('seed_set') else ''}, {res['repeats']} run(s) per seed"
            f"{', oracle ' + res['mismatch'] if res.get('mismatch', 'original') != 'original' else ''}.")
    lines = [head, "", "| strategy | trials to 0.95 | to 0.90 | to 0.85 | to 0.80 | best at T (median) | incumbent at T (median) "
             "| best min - max | runs |", "|---|---|---|---|---|---|---|---|---|"]
    for n in _names(res["strategies"]):
        s = res["strategies"][n]
        t = s["trials_to"]
        name = f"**{n}** (default)" if n == res.get("default") else n
        lines.append(f"| {name} | {_t(t['0.95'])} | {_t(t['0.9'])} | {_t(t['0.85'])} | {_t(t['0.8'])} | {_f(s['best_at_budget'])} | "
                     f"{_f(s['incumbent_true_at_budget'])} | {_f(s['best_at_budget_min'])} - {_f(s['best_at_budget_max'])} | {s['runs']} |")
    return "\n".join(lines)


def pruner_table(res: dict[str, Any], render: bool = False) -> str:
    p = res["pruners"]
    head = (f"`{res['strategy']}`, {res['prompts']} prompt steps per trial, N = {res['models']}, T = {res['trials']} "
            f"(pruned runs up to 2T), seeds {', '.join(map(str, res['seeds']))} x {res['repeats']}; {res['render']}.")
    if render:
        lines = [head, "", "| pruner | trials | images rendered | render seconds | best at T | best at the end |",
                 "|---|---|---|---|---|---|"]
        for n, s in p.items():
            lines.append(f"| {n} | {s['trials']} | {s['render_steps']:.0f} | {s['render_seconds']:.1f} | {_f(s['best_at_T'])} | "
                         f"{_f(s['best_at_budget'])} |")
        return "\n".join(lines)
    lines = [head, "", "| pruner | render steps in T trials | best at T | best at 2T | steps saved at equal final best (median) | "
             "reached unpruned best |", "|---|---|---|---|---|---|"]
    for n, s in p.items():
        at2t = "-" if n == "none" else _f(s["best_at_budget"])
        saving = "-" if s["saving_at_equal_best"] is None else f"{100 * s['saving_at_equal_best']:.0f}%"
        lines.append(f"| {n} | {s.get('render_steps_at_T', s['render_steps']):.0f} | {_f(s['best_at_T'])} | {at2t} | {saving} | "
                     f"{s['reached_unpruned_best']} |")
    return "\n".join(lines)


def world_pruner_table(res: dict[str, Any]) -> str:
    """``bench_search.py --world DIR --mode pruning``: per pruner, renders (prompts rendered) and what they bought."""
    head = (f"`{res['strategy']}` on world `{res['world']}` (build seed {res['world_seed']}), N = {res['models']}, "
            f"{res['prompts']} prompts per trial, T = {res['trials']} (pruned runs up to {res['pruned_budget']:g}T), "
            f"search seeds {', '.join(map(str, res['seeds']))}. Rule: {res['rule']}.")
    lines = [head, "", "| pruner | prompts per report | trials | renders (median) | pruned trials | best at T trials | "
             "best at equal renders | best at the end | renders saved at equal final best (median) | reached unpruned best | "
             "judge accuracy of the incumbent | wall s (mean) |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for n, s in res["pruners"].items():
        saving = "-" if n == "none" else f"{100 * s['saving_at_equal_best']:.0f}%"
        lines.append(f"| {n} | {s['batch']} | {s['trials']} | {s['renders']:.0f} | {s['pruned_trials']:.0f} | "
                     f"{_f(s['best_at_T'], 4)} | {_f(s['best_at_equal_renders'], 4)} | {_f(s['best_at_budget'], 4)} | {saving} | "
                     f"{s['reached_unpruned_best']} | {_f(s['judge_accuracy'])} | {s['mean_wall_seconds']:.0f} |")
    base = {r["seed"]: r for r in res["pruners"]["none"]["per_run"]}
    for n, s in res["pruners"].items():
        if n != "none":
            lines += ["", f"Per seed, `{n}` (final best against none's; renders saved at none's final best): " + "; ".join(
                f"{r['seed']}: {r['best_at_budget']:.4f} vs {base[r['seed']]['best_at_budget']:.4f}, saved "
                f"{100 * r['saving_at_equal_best']:.0f}%{'' if r['reached_unpruned_best'] else ' (never reached it)'}"
                for r in s["per_run"]) + "."]
    return "\n".join(lines)


def bound_table(res: dict[str, Any]) -> str:
    lines = [f"N = {res['models']}, T = {res['trials']}, σ = {res['noise']}, seeds {', '.join(map(str, res['seeds']))} x "
             f"{res['repeats']} learner runs.", "",
             "| seed | exact bits + best shared α | + exact α in the 3 / 8 most costly blocks | learner after 20 / 40 / 60 trials "
             "| learner runs reaching 0.95 | learner trials to 0.95 (median) |", "|---|---|---|---|---|---|"]
    for r in res["per_seed"]:
        b = r["learner_best_at"]
        lines.append(f"| {r['seed']} | {_f(r['shared'])} | {_f(r['top3'])} / {_f(r['top8'])} | {_f(b['20'])} / {_f(b['40'])} / "
                     f"{_f(b['60'])} | {r['learner_runs_reaching_95']}/{res['repeats']} | {_t(r['learner_trials_to_95'])} |")
    lines += ["", f"Median over seeds: exact bits + best shared α {_f(res['shared_median_over_seeds'])}; the learner after "
              f"{res['trials']} trials {_f(res['learner_best_at_budget_median_over_seeds'])}."]
    return "\n".join(lines)


def suite_tables() -> str:
    s = _load("search_suite.json")
    if s is None:
        return _missing("search_suite.json", "python experiments/search_suite.py --jobs 2")
    cells = s["cells"]
    names = _names({n: None for n in cells[0]["strategies"]})
    seeds = sorted({tuple(c["seeds"]) for c in cells})
    trials = sorted({c["trials"] for c in cells})
    lines = [f"Reporting seeds {'; '.join(', '.join(map(str, x)) for x in seeds)}; tuning seeds "
             f"{', '.join(map(str, s['seed_sets']['tuning']))}. T = {', '.join(map(str, trials))} trials, one run per seed. "
             "Each cell: **best** (median over seeds of the best true s any trial reached) / incumbent (median true s of the "
             "trial with the best *observed* value, the one a user would export); bold: the best incumbent of the row.", "",
             "| oracle | N | " + " | ".join(f"{n}{' (default)' if n == s['default'] else ''}" for n in names) + " |",
             "|---|---|" + "---|" * len(names)]
    for c in cells:
        st = c["strategies"]
        top = max(st[n]["incumbent_true_at_budget"] for n in names)
        row = []
        for n in names:
            inc = _f(st[n]["incumbent_true_at_budget"])
            row.append(f"{_f(st[n]['best_at_budget'])} / {'**' + inc + '**' if st[n]['incumbent_true_at_budget'] == top else inc}")
        lines.append(f"| {c['mismatch']} | {c['models']} | " + " | ".join(row) + " |")
    world = s.get("world_cells") or []
    if world:
        lines += ["", "World cells (`bench_world_search_n*.json`): the median share of the gap from the uniform average to the "
                  "best-known objective that the incumbent closed (1: the best any strategy reached on that search seed); "
                  "bold: the best of the row.", "",
                  "| world | N | seeds | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
        for c in world:
            st = c["strategies"]
            top = max(st[n]["incumbent_true_at_budget"] for n in names if n in st)
            row = [("**" + _f(st[n]["incumbent_true_at_budget"]) + "**" if st[n]["incumbent_true_at_budget"] == top
                    else _f(st[n]["incumbent_true_at_budget"])) if n in st else "-" for n in names]
            lines.append(f"| build seed {c['world_seed']} | {c['models']} | {', '.join(map(str, c['seeds']))} | " + " | ".join(row) + " |")
    d = s["decision"]
    lines += ["", "| strategy | worst regret | in cell |", "|---|---|---|"]
    for n, w in sorted(d["worst_regret"].items(), key=lambda kv: kv[1]["regret"]):
        lines.append(f"| {n} | {w['regret']:.3f} | {w['cell']} |")
    lines += ["", f"Rule: {d['rule']}. Over these {d['cells']} cells it picks **{d['winner']}** (default when measured: "
              f"{d['current_default']}).", "", "| target | measured | met |", "|---|---|---|"]
    for k, v in s["targets"].items():
        lines.append(f"| {k} | " + ", ".join(f"{a} {b}" for a, b in v.items() if a != "met") + f" | {'yes' if v['met'] else '**no**'} |")
    return "\n".join(lines)


def world_table(models: int) -> str:
    name = f"bench_world_search_n{models}.json"
    res = _load(name)
    if res is None:
        return _missing(name, f"python experiments/bench_search.py --world runs/world-bench --models {models} --seed reporting "
                              f"--strategies surrogate,staged,tpe,cmaes,gp,random,greedy --json experiments/results/{name}")
    lines = [f"World `{res['world']}` (build seed {res['world_seed']}), pool {', '.join(res['pool'])}; T = {res['trials']} trials, "
             f"search seeds {', '.join(map(str, res['seeds']))}. Budget: {res['budget']}. Best-known objective: "
             f"{res['best_known_rule']}.", "",
             "| strategy | best objective at T (median) | judge accuracy of the incumbent | held-out judge | renders to 95% | "
             "trials to 95% | renders | merge / render / score / other s (median run) |", "|---|---|---|---|---|---|---|---|"]
    for n in _names(res["strategies"]):
        s = res["strategies"][n]
        ts = s["time_split"]
        split = " / ".join(f"{ts.get(k, 0.0):.0f}" for k in ("merge", "render", "score", "other"))
        label = f"**{n}** (default)" if n == res["default"] else n
        lines.append(f"| {label} | {_f(s['best_at_budget'], 4)} | {_f(s['judge_accuracy'])} | {_f(s['judge_heldout'])} | "
                     f"{_t(s['renders_to_95'])} | {_t(s['trials_to_95'])} | {s['renders']:.0f} | {split} |")
    return "\n".join(lines)


def tuning_table() -> str:
    """Setting scans on the tuning seeds (``experiments/results/tuning/*.json``, runs with ``--sampler-set``)."""
    runs = [json.loads(p.read_text()) for p in sorted((RESULTS / "tuning").glob("*.json"))]
    if not runs:
        return _missing("tuning/*.json", "python experiments/bench_search.py --seed tuning --sampler-set ... --json "
                                         "experiments/results/tuning/NAME.json")
    lines = ["| strategy | setting | objective | N | seeds | best at T (median) | incumbent at T (median) | per seed | "
             "handed over (runs) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(runs, key=lambda r: (r.get("mode") == "world", r.get("mismatch", "original"), r["models"])):
        for n, st in r["strategies"].items():
            changed = ", ".join(f"{k}={v}" for k, v in r.get("sampler_set", {}).get(n, {}).items()) or "shipped"
            if r.get("mode") == "world":  # objective values (not s): 4 decimals, the incumbent's observed objective
                what, nd = f"world (build seed {r['world_seed']})", 4
                per = " / ".join(_f(x["best_at_budget"], nd) for x in st["per_run"])
                inc, handed = st["incumbent_objective"], sum(x.get("handed_over") is not None for x in st["per_run"])
            else:
                what, nd = f"oracle {r.get('mismatch', 'original')}", 3
                per = " / ".join(_f(x["strategies"][n][0]["best_at_budget"]) for x in r["per_seed"])
                inc, handed = st["incumbent_true_at_budget"], st.get("handed_over_runs", 0)
            lines.append(f"| {n} | {changed} | {what} | {r['models']} | {', '.join(map(str, r['seeds']))} | "
                         f"{_f(st['best_at_budget'], nd)} | {_f(inc, nd)} | {per} | {handed} |")
    return "\n".join(lines)


def _strategies(name: str, how: str) -> Callable[[], str]:
    return lambda: strategy_table(r) if (r := _load(name)) else _missing(name, how)


def _pruners(name: str, how: str, render: bool = False) -> Callable[[], str]:
    return lambda: pruner_table(r, render) if (r := _load(name)) else _missing(name, how)


BLOCKS: dict[str, Callable[[], str]] = {
    "suite": suite_tables,
    "world-n12": lambda: world_table(12),
    "world-n32": lambda: world_table(32),
    "scans": tuning_table,
    "tuning": _strategies("bench_search.json", "python experiments/bench_search.py --seed tuning --repeats 3 --repeats-of gp=1 "
                                               "--json experiments/results/bench_search.json"),
    "noise0": _strategies("bench_search_noise0.json", "python experiments/bench_search.py --seed tuning --noise 0 "
                                                      "--json experiments/results/bench_search_noise0.json"),
    "t120": _strategies("bench_search_T120.json", "python experiments/bench_search.py --seed tuning --trials 120 "
                                                  "--json experiments/results/bench_search_T120.json"),
    "bound": lambda: bound_table(r) if (r := _load("bench_search_bound.json")) else _missing(
        "bench_search_bound.json", "python experiments/bench_search_bound.py"),
    "pruning-staged-p16": _pruners("bench_pruning_p16.json", "python experiments/bench_search.py --mode pruning ..."),
    "pruning-staged-p8": _pruners("bench_pruning_p8.json", "python experiments/bench_search.py --mode pruning --prompts 8 ..."),
    "pruning-surrogate-p16": _pruners("bench_search_pruning_surrogate_p16.json", "python experiments/bench_search.py --mode pruning "
                                                                                 "--pruning-strategy surrogate ..."),
    "pruning-variants-p16": _pruners("bench_search_pruning_variants_p16.json", "python experiments/bench_search.py --mode pruning ..."),
    "pruning-world-n12": lambda: world_pruner_table(r) if (r := _load("bench_world_pruning_n12.json")) else _missing(
        "bench_world_pruning_n12.json", "python experiments/bench_search.py --world runs/world-bench --mode pruning --pruners "
                                        "none,incumbent --seed reporting --json experiments/results/bench_world_pruning_n12.json"),
    "pruning-render-p16": _pruners("bench_pruning_render_p16.json", "python experiments/bench_search.py --mode pruning --render ...",
                                   render=True),
}


def render_readme(text: str) -> str:
    """``text`` with every generated block refilled; an unknown block name is an error (a typo would go stale)."""
    def fill(m: re.Match) -> str:
        name = m.group("name")
        if name not in BLOCKS:
            raise SystemExit(f"README block {name!r} has no generator; known: {', '.join(BLOCKS)}")
        return f"{m.group(1)}{BLOCKS[name]()}\n{m.group(4)}"

    return BLOCK.sub(fill, text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if the README is not what the JSON gives")
    ap.add_argument("--readme", type=Path, default=README)
    a = ap.parse_args(argv)
    text = a.readme.read_text()
    new = render_readme(text)
    if a.check:
        if new != text:
            print(f"{a.readme}: generated blocks are stale; run python experiments/search_report.py", file=sys.stderr)
            return 1
        return 0
    if new != text:
        from astolfo_opt.checkpoint.writer import atomic_write_text

        atomic_write_text(a.readme, new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
