"""CLIP tokenizer files built offline from the BPE vocabulary that the installed ``open_clip`` package ships.

Why: diffusers / transformers need ``vocab.json`` + ``merges.txt`` for ``CLIPTokenizer``, and the only way to get
them without a download is to rebuild them from ``bpe_simple_vocab_16e6.txt.gz``. The 1.5 MB vocabulary is never
shipped in this repository; it is generated once into the cache folder (``$ASTOLFO_OPT_CACHE``, default
``~/.cache/astolfo-opt``) and reused. The vocabulary order is the one CLIP was trained with: 256 byte symbols, their
256 end-of-word forms, the 48,894 merges, then ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407).
"""

from __future__ import annotations

import gzip
import json
import os
from functools import cache
from pathlib import Path

from astolfo_opt.checkpoint.writer import atomic_write_text
from astolfo_opt.errors import AstolfoError

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
BOS_ID, EOS_ID = 49406, 49407
VOCAB_SIZE = 49408
N_MERGES = VOCAB_SIZE - 512 - 2  # 48,894
#: SD1 (CLIP-L) pads with end-of-text; SD2 and SDXL's second tokenizer (OpenCLIP) pad with "!" (id 0)
PAD_TOKENS = {"eos": EOS, "bang": "!"}


def cache_root() -> Path:
    """Where generated files live: ``$ASTOLFO_OPT_CACHE`` or ``~/.cache/astolfo-opt``."""
    return Path(os.environ.get("ASTOLFO_OPT_CACHE") or Path.home() / ".cache" / "astolfo-opt").expanduser()


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table (printable bytes map to themselves)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = list(keep)
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(keep, chars, strict=True)}


def _bpe_source() -> Path:
    from open_clip import tokenizer as oc_tok  # a main dependency: it ships the CLIP BPE vocabulary
    path = Path(oc_tok.default_bpe())
    if not path.is_file():  # pragma: no cover
        raise AstolfoError(f"open_clip's BPE vocabulary is missing: {path} (reinstall open_clip_torch)")
    return path


def build_vocab_files(bpe_gz: str | Path) -> tuple[str, str]:
    """``(vocab.json, merges.txt)`` text in Hugging Face's CLIP format from open_clip's gzip BPE file."""
    with gzip.open(bpe_gz) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1: 1 + N_MERGES]]
    byte_chars = list(bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges] + [BOS, EOS]
    if len(vocab) != VOCAB_SIZE:  # pragma: no cover - a different open_clip vocabulary
        raise AstolfoError(f"{bpe_gz}: expected {VOCAB_SIZE} tokens, built {len(vocab)} (unsupported open_clip BPE file)")
    vocab_json = json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False)
    merges_txt = "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n"
    return vocab_json, merges_txt


@cache
def vocab_dir() -> Path:
    """Folder holding the generated ``vocab.json`` + ``merges.txt`` (built on first use, atomically)."""
    folder = cache_root() / "clip-bpe"
    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    if not (vocab.is_file() and merges.is_file()):
        folder.mkdir(parents=True, exist_ok=True)
        vocab_json, merges_txt = build_vocab_files(_bpe_source())
        atomic_write_text(merges, merges_txt)
        atomic_write_text(vocab, vocab_json)
    return folder


def tokenizer_json(pad: str) -> dict[str, str]:
    """The two small tokenizer files (shipped in the config folders): ``special_tokens_map.json``, ``tokenizer_config.json``."""
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": PAD_TOKENS[pad]}
    cfg = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
           "clean_up_tokenization_spaces": True, **special}
    return {"special_tokens_map.json": json.dumps(special, indent=2) + "\n", "tokenizer_config.json": json.dumps(cfg, indent=2) + "\n"}


def write_tokenizer_files(folder: str | Path, pad: str) -> Path:
    """Write a complete HF CLIP tokenizer folder (vocab, merges, tokenizer_config, special_tokens_map) to ``folder``.

    ``pad`` is ``"eos"`` (SD1 / SDXL tokenizer) or ``"bang"`` (SD2 / SDXL tokenizer_2)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    src = vocab_dir()
    for name in ("vocab.json", "merges.txt"):
        target = folder / name
        if not target.is_file() or target.stat().st_size != (src / name).stat().st_size:
            atomic_write_text(target, (src / name).read_text(encoding="utf-8"))
    for name, text in tokenizer_json(pad).items():
        atomic_write_text(folder / name, text)
    return folder


@cache
def tokenizer_dir(pad: str = "eos") -> Path:
    """A cached, complete tokenizer folder for ``pad`` (what ``CLIPTokenizer.from_pretrained`` reads)."""
    return write_tokenizer_files(cache_root() / f"clip-tokenizer-{pad}", pad)


def load_tokenizer(pad: str = "eos"):
    """A ``CLIPTokenizer`` read from the generated folder with ``local_files_only``: no network."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(tokenizer_dir(pad)), local_files_only=True)
