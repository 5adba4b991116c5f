"""sd-mecha 1.1.8 as the oracle: ``n_average``, ``weighted_sum`` and ``add_difference`` agree within fp16 rounding."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch

from astolfo_opt.checkpoint.io import open_checkpoint
from astolfo_opt.merge.kernel import merge
from astolfo_opt.merge.recipe import ComponentRecipe, Member, Recipe
from astolfo_opt.merge.sinks import CollectSink

sd_mecha = pytest.importorskip("sd_mecha", reason="sd-mecha is the dev/test oracle (pip install sd-mecha==1.1.8)")

COMPS = ("unet", "te0", "vae")


def _pairwise(models, method, names, alpha):
    return Recipe(models=models, components={c: ComponentRecipe(method, [Member(n) for n in names], alpha_default=alpha) for c in COMPS})


@pytest.mark.parametrize("case", ["n_average", "weighted_sum", "add_difference"])
def test_agrees_with_sd_mecha(tiny_pools, tmp_path, case):
    pool = tiny_pools["sd1"]
    paths = pool.models
    models = {p.stem: str(p) for p in paths}
    ms = [sd_mecha.model(str(p), config="sd1-ldm") for p in paths]
    if case == "n_average":
        theirs_recipe, ours = sd_mecha.n_average(*ms), Recipe.average(paths)
    elif case == "weighted_sum":
        theirs_recipe, ours = sd_mecha.weighted_sum(ms[0], ms[1], alpha=0.3), _pairwise(models, "weighted_sum", ["m00", "m01"], 0.3)
    else:
        theirs_recipe = sd_mecha.add_difference(ms[0], ms[1], ms[2], alpha=0.5)
        ours = _pairwise(models, "add_difference", ["m00", "m01", "m02"], 0.5)
    out = tmp_path / f"mecha_{case}.safetensors"
    with contextlib.redirect_stderr(io.StringIO()):  # its progress bar
        # our tiny files have the real key names but not the full-size shapes: skip its key-set checks
        sd_mecha.merge(theirs_recipe, merge_dtype=torch.float32, output_dtype=torch.float16, output=str(out),
                       strict_mandatory_keys=False, check_extra_keys=False, threads=1)
    mine = CollectSink()
    merge(ours, mine, out_dtype=torch.float16)
    ref = open_checkpoint(out)
    ref_keys = ref.keys()
    shared = [k for k in ref_keys if k in mine.tensors and not k.endswith("position_ids")]
    assert len(shared) > 1000 and len(shared) >= len(mine.tensors) - 1
    worst = 0.0
    for k in shared:
        a, b = mine.tensors[k].float(), ref.get(k).float()
        assert a.shape == b.shape, k
        ulp = 2.0 ** (torch.floor(torch.log2(b.abs().clamp_min(2**-14))) - 10)  # one fp16 step at each value
        err = float(((a - b).abs() / ulp).max())
        assert err <= 1.0, (k, err)
        worst = max(worst, err)
    assert worst <= 1.0
