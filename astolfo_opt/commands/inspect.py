"""``astolfo-opt inspect PATH...``: what is in a pool before anything is merged.

Prints a table (architecture, size, dtype, file size, A1111 short hash, component hashes, health) and one line per
finding with the repair the merge applies, then the pool-level facts (identical components, mixed architectures).
``--json FILE`` writes the same data (atomically). ``--map FILE.png`` / ``--base FILE`` add the weight-space analysis
(``astolfo_opt.analysis``). Exit 0 when every file could be used, 2 (with one ``error:`` line per file) otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from astolfo_opt.checkpoint.inspect import ModelReport, PoolReport, inspect_pool


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="PATH", help="model files (.safetensors / .ckpt) or folders of them")
    parser.add_argument("--json", metavar="FILE", help="also write the report as JSON to FILE")
    parser.add_argument("--no-scan", action="store_true",
                        help="read headers only: no hashes, no NaN/Inf scan (fast on a cold disk)")
    parser.add_argument("--no-cache", action="store_true", help="ignore and do not update the inspect cache")
    parser.add_argument("--base", metavar="FILE", help="base model for the weight-space analysis (distances of deltas)")
    parser.add_argument("--map", metavar="FILE.png", help="run the weight-space analysis and draw its 2-D map to FILE.png")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


def _safe(s: object) -> str:
    """File and key names come from untrusted files: no control characters, no rich markup."""
    from rich.markup import escape

    return escape("".join(c if c.isprintable() else ascii(c)[1:-1] for c in str(s)))


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return str(n)  # pragma: no cover


def _health(m: ModelReport) -> str:
    if m.errors:
        return "[red]unusable[/red]"
    warn = [f for f in m.findings if f.severity == "warning"]
    if not warn:
        return "[green]ok[/green]"
    kinds = sorted({f.kind for f in warn})
    return "[yellow]" + ", ".join(kinds) + "[/yellow]"


def print_report(report: PoolReport, console: Any) -> None:
    from rich.table import Table

    comps = [c for c in ("unet", "te0", "te1", "vae") if any(c in m.component_keys or c in m.missing for m in report.models)]
    table = Table(title="pool" + (f" ({report.arch}, {report.size})" if report.arch else ""), show_lines=False)
    for col in ("model", "arch", "size", "dtype", "pred", "file", "hash"):
        table.add_column(col, no_wrap=True)
    for c in comps:
        table.add_column(c, no_wrap=True)
    table.add_column("health")
    for m in report.models:
        cells = []
        for c in comps:
            if c in m.missing and not m.component_keys.get(c):
                cells.append("[red]missing[/red]")
            else:
                h = m.component_hashes.get(c)
                cells.append((h[:8] if h else "-") + ("*" if c in m.missing else ""))
        table.add_row(_safe(m.name), m.arch, m.size, m.dtype, _prediction_cell(m), _human(m.file_size), m.short_hash or "-", *cells,
                      _health(m))
    if report.models:
        console.print(table)
        console.print("[dim]pred = prediction type (eps / v; +ztsnr; ? = the file does not say, default in brackets); "
                      "hash = A1111 short hash (sha256[:10]); component columns = content hash, * = partial[/dim]")
    for m in report.models:
        shown = [f for f in m.findings if f.severity != "info" or f.kind in ("ema", "reshape", "unknown", "optional_missing")]
        for f in shown[:20]:
            colour = {"error": "red", "warning": "yellow"}.get(f.severity, "dim")
            console.print(f"[{colour}]{_safe(m.name)}: {_safe(f.message)} -> {_safe(f.repair)}[/{colour}]")
        if len(shown) > 20:
            console.print(f"{_safe(m.name)}: ... {len(shown) - 20} more findings (see --json)")
    for line in report.identical_lines():
        console.print(f"[cyan]{_safe(line)}[/cyan] (averaging copies over-weights them)")
    if report.prediction_mix:
        console.print(f"[red]{_safe(report.prediction_mix)}[/red]")


def _prediction_cell(m: Any) -> str:
    """``v+ztsnr``, ``eps``, or ``?(eps)`` when the file states nothing and the architecture's default applies."""
    short = {"epsilon": "eps", "v_prediction": "v"}
    if m.prediction_type is None:
        eff = m.effective_prediction
        return f"?({short[eff]})" if eff else "?"
    return short[m.prediction_type] + ("+ztsnr" if (m.prediction or {}).get("ztsnr") else "")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from astolfo_opt.checkpoint.writer import atomic_write_text

    console = Console(file=sys.stdout, highlight=False, width=None if sys.stdout.isatty() else 160)
    report = inspect_pool(args.paths, scan=not args.no_scan, cache=not args.no_cache, progress=not args.quiet)
    print_report(report, console)
    data: dict[str, Any] = report.to_json()
    if (args.map or args.base) and report.models and report.arch is not None and not report.error_lines():
        from astolfo_opt.analysis import analyse_pool, render_maps

        paths = [Path(m.path) for m in report.models]
        analysis = analyse_pool(paths, base=args.base, progress=not args.quiet and sys.stderr.isatty())
        for line in analysis.summary_lines():
            console.print(_safe(line))
        data["analysis"] = analysis.to_json()
        if args.map:
            for p in render_maps(analysis, args.map):
                console.print(f"map written: {_safe(p)}")
    elif args.map or args.base:
        console.print("[yellow]weight-space analysis skipped: fix the errors below first[/yellow]")
    if args.json:
        atomic_write_text(args.json, json.dumps(data, indent=1, default=str) + "\n")
    lines = report.error_lines()
    for line in lines:
        print("error: " + "".join(c if c.isprintable() else ascii(c)[1:-1] for c in line), file=sys.stderr)
    return 2 if lines else 0
