"""``astolfo-opt export``: write a study's best (or any) trial as a .safetensors checkpoint with provenance."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--storage", required=True, help="sqlite:///runs/<study>/study.db, any RDB URL, or journal:PATH")
    parser.add_argument("--study", required=True, help="study name")
    parser.add_argument("--trial", default="best", help="best (default) or a trial number")
    parser.add_argument("--out", required=True, help="output .safetensors file (written atomically)")
    parser.add_argument("--device", default="auto", help="merge device: auto | cpu | cuda")
    parser.add_argument("--no-verify", action="store_true", help="skip the check that the tensors equal the trial's merge")


def run(args: argparse.Namespace) -> int:
    from astolfo_opt.search.export import export_trial
    from astolfo_opt.search.study import open_storage_url

    res = export_trial(open_storage_url(args.storage), args.study, args.out, trial=args.trial, device=args.device,
                       verify=not args.no_verify)
    check = f"tensors {res.verified} to the trial's merge" if res.verified == "identical" else (res.verified or "not verified")
    print(f"exported trial {res.trial} of {res.study} (values {res.values}) -> {res.path} ({check})")
    return 0
