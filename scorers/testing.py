"""Tiny random CLIP models and heads for tests and the weight-free demo.

Real scorer weights are gigabytes and never downloaded, so tests and the demo run the *real* loading and scoring code
on tiny random models instead:

* :func:`make_tiny_clip` writes the random weights of the shipped open_clip architecture ``astolfo-tiny-clip``
  (``scorers/model_configs/astolfo-tiny-clip.json``: ViT width 32, 2 layers, patch 16, 64 px; text width 32,
  2 layers, vocab 49408, context 77; ``embed_dim`` 768 so the LAION head sits on it) to a local file that a config's
  ``pretrained`` can point at.
* :func:`make_random_head` writes a random head with the LAION predictor's exact keys.
* :func:`make_tiny_hf_clip` writes a tiny transformers ``CLIPModel`` folder with processor and tokenizer files (the
  tokenizer is built from open_clip's bundled BPE file), for the transformers backend and PickScore.
* :func:`demo_objective_config` assembles a ready objective config: tiny tower + the real LAION head when
  ``../shared/data`` has it, else a random head.

Scores from random models are deterministic but meaningless: use them to test plumbing and math, never quality.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from astolfo_opt.checkpoint.writer import atomic_write_bytes, atomic_write_text
from scorers.tower import MODEL_CONFIG_DIR, register_model_config

TINY_CLIP_NAME = "astolfo-tiny-clip"
LAION_HEAD_RELATIVE = Path("shared/data/laion-aesthetic/sac+logos+ava1-l14-linearMSE.pth")


def register_tiny_clip() -> str:
    """Register the shipped tiny architecture with open_clip and return its name."""
    register_model_config(MODEL_CONFIG_DIR)
    return TINY_CLIP_NAME


def tiny_clip_config() -> dict[str, Any]:
    """The tiny architecture as a dict (the JSON file is the source of truth)."""
    return json.loads((MODEL_CONFIG_DIR / f"{TINY_CLIP_NAME}.json").read_text())


def _save_torch(obj: Any, path: Path) -> Path:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())
    return path


def make_tiny_clip(out_dir: str | Path, *, seed: int = 0, overwrite: bool = False) -> Path:
    """Create (once) ``out_dir/astolfo-tiny-clip-seed{seed}.pt``: random weights for ``model: astolfo-tiny-clip``.

    Same seed -> same weights, so scores in tests are reproducible across runs."""
    import open_clip

    register_tiny_clip()
    path = Path(out_dir) / f"{TINY_CLIP_NAME}-seed{seed}.pt"
    if path.is_file() and not overwrite:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        net = open_clip.create_model(TINY_CLIP_NAME, pretrained=None, pretrained_text=False, pretrained_image=False)
    finally:
        torch.random.set_rng_state(gen_state)
    return _save_torch(net.state_dict(), path)


def random_head_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict with the LAION head's exact keys and shapes, random values."""
    from scorers.laion_aesthetic import AestheticHead

    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in AestheticHead().state_dict().items()}


def make_random_head(path: str | Path, *, seed: int = 0) -> Path:
    """Write a random aesthetic head (``.pth`` state dict) for when the real one is absent."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    return _save_torch(random_head_state(seed), p)


def find_laion_head() -> Path | None:
    """The real LAION head under the project's ``../shared/data`` (beside the repo, or beside the cwd), if present."""
    candidates = [Path(__file__).resolve().parents[2] / LAION_HEAD_RELATIVE, Path.cwd().parent / LAION_HEAD_RELATIVE]
    env = os.environ.get("ASTOLFO_SHARED")
    if env:
        candidates.insert(0, Path(env).expanduser() / LAION_HEAD_RELATIVE.relative_to("shared"))
    return next((c for c in candidates if c.is_file()), None)


def demo_objective_config(out_dir: str | Path, *, seed: int = 0, head: str | Path | None = None,
                          device: str = "auto") -> dict[str, Any]:
    """Objective config (shape of ``conf/scorer/tiny_clip.yaml``) over a tiny random tower: CLIP similarity plus the
    aesthetic head (``head``, else the real LAION file when present, else a random head written to ``out_dir``)."""
    out = Path(out_dir)
    weights = make_tiny_clip(out, seed=seed)
    head_path = Path(head) if head is not None else (find_laion_head() or out / f"random-aesthetic-head-seed{seed}.pth")
    if not head_path.is_file():
        make_random_head(head_path, seed=seed)
    tower = {"model": TINY_CLIP_NAME, "pretrained": str(weights), "device": device}
    return {
        "scorers": {
            "clip": {"_target_": "scorers.clip_similarity.ClipSimilarity", "convention": "cosine", **tower},
            "aesthetic": {"_target_": "scorers.laion_aesthetic.LaionAesthetic", "head": str(head_path), **tower},
        },
        "weights": {"clip": 1.0, "aesthetic": 1.0},
        "normalisation": {"clip": "none", "aesthetic": "none"},
        "multi": False,
    }


# --------------------------------------------------------------------------------------- transformers tiny CLIP
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable character table (the standard reversible mapping both tokenizers use)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def write_clip_tokenizer(out_dir: str | Path) -> Path:
    """Write HF CLIP ``vocab.json`` + ``merges.txt`` + ``tokenizer_config.json`` from open_clip's bundled BPE file
    (49,408 tokens: 256 bytes, 256 ``</w>`` forms, 48,894 merges, start/end of text), so no hub access is needed."""
    from open_clip.tokenizer import default_bpe

    with gzip.open(default_bpe()) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]
    chars = list(_bytes_to_unicode().values())
    vocab_list = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "vocab.json", json.dumps({t: i for i, t in enumerate(vocab_list)}, ensure_ascii=False))
    atomic_write_text(out / "merges.txt", "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    atomic_write_text(out / "tokenizer_config.json", json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}))
    return out


def make_tiny_hf_clip(out_dir: str | Path, *, seed: int = 0, projection_dim: int = 768) -> Path:
    """Create (once) a tiny random transformers CLIP folder (model + processor + tokenizer files) at ``out_dir``.

    Written to a sibling ``.partial`` folder and renamed, so an interrupted run never leaves a half folder."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    out = Path(out_dir)
    if (out / "config.json").is_file():
        return out
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    cfg = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "vocab_size": 49408, "max_position_embeddings": 77, "bos_token_id": 49406, "eos_token_id": 49407,
                     "pad_token_id": 49407},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 64, "patch_size": 16},
        projection_dim=projection_dim)
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = CLIPModel(cfg).eval()
    finally:
        torch.random.set_rng_state(gen_state)
    model.save_pretrained(tmp)
    CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}).save_pretrained(tmp)
    write_clip_tokenizer(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m scorers.testing OUT_DIR``: write the tiny tower (and a random head if the real one is absent) and
    print the Hydra overrides that point ``conf/scorer/tiny_clip.yaml`` at them."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m scorers.testing", description=main.__doc__)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    cfg = demo_objective_config(args.out_dir, seed=args.seed)
    print(f"scorer=tiny_clip scorer.scorers.clip.pretrained={cfg['scorers']['clip']['pretrained']} "
          f"scorer.scorers.aesthetic.head={cfg['scorers']['aesthetic']['head']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
