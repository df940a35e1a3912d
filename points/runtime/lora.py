"""LoRA adapters as a transform (as the int8 swap is): chosen projections get low-rank updates, the model's math
and its base weights stay as they are.

    cfg = LoraConfig(rank=8, alpha=16)                 # q, k, v, out, up, gate, down of every decoder layer
    add_lora(pipe.model, cfg)                          # those nn.Linear become LoraLinear; only lora_* train
    save_adapter(pipe.model, OUT, base=identity)       # OUT/adapter.safetensors + OUT/adapter.json
    load_adapter(pipe.model, OUT)                      # onto a freshly loaded base (points.load(adapter=OUT))
    merge_lora(pipe.model)                             # W += (alpha / r) B A, back to plain nn.Linear

A `LoraLinear` holds the base layer (frozen, its Parameters untouched: a memory-mapped checkpoint stays mapped)
and, per adapted part of its output rows, A_p [r, in] and B_p [rows_p, r]:

    y = base(x) + (alpha / r) * [ B_p (A_p dropout(x)) for each part p ]      (rows without a part: + 0)

The decoder's fused projections carry their parts: `attn.qkv` rows [q; k; v] and `mlp.up_gate` rows [up; gate],
so that targets "q", "k", "v", "up", "gate" are separate adapters each (A_p of its own), exactly as a
LoRA on transformers' separate q_proj / k_proj / v_proj / up_proj / gate_proj is; one dropout mask serves all
parts of a fused layer (where separate modules draw one each). "vision" adapts every projection of the vision
encoder's blocks (its fused qkv as one part, as transformers' Qwen2-VL module is one Linear), "projector" the
merger's two. A is drawn as peft draws it (Kaiming-uniform, a = sqrt(5)), B starts at zero: a fresh adapter
changes nothing. The adapters are float32 (the master weights of bf16 training; under autocast the product
runs in its dtype).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from points.errors import CheckpointError

DECODER_TARGETS = ("q", "k", "v", "out", "up", "gate", "down")
OTHER_TARGETS = ("vision", "projector")
TARGETS = DECODER_TARGETS + OTHER_TARGETS
ADAPTER_FILE, CONFIG_FILE, FORMAT = "adapter.safetensors", "adapter.json", "points-lora"


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DECODER_TARGETS

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ValueError(f"lora rank = {self.rank!r}: expected an integer >= 1")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"lora alpha = {self.alpha!r}: expected a finite number > 0")
        if not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):
            raise ValueError(f"lora dropout = {self.dropout!r}: expected a number in [0, 1)")
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets or len(set(self.targets)) != len(self.targets):
            raise ValueError(f"lora targets {list(self.targets)}: expected distinct names among {list(TARGETS)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoraLinear(nn.Module):
    """A frozen base Linear plus one rank-r update per part of its output rows (see the module's docstring)."""

    def __init__(self, base: nn.Linear, parts: list[tuple[int, int]], rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.parts = [tuple(p) for p in parts]  # (first row, end row) of each adapted part, in row order
        self.rank, self.scale = rank, alpha / rank
        rows = sum(b - a for a, b in self.parts)
        device = base.weight.device
        self.lora_a = nn.Parameter(torch.empty(len(self.parts) * rank, base.in_features, device=device))
        self.lora_b = nn.Parameter(torch.zeros(rows, rank, device=device))
        for p in range(len(self.parts)):  # peft's init, part by part (each A_p alone, as its own Linear)
            nn.init.kaiming_uniform_(self.lora_a.data[p * rank:(p + 1) * rank], a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The update [..., out] (zero on rows without a part), in the adapters' dtype (or autocast's)."""
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.lora_a.dtype)
        h = F.linear(self.dropout(x), self.lora_a)  # [..., parts * r]
        r, pieces, row, end = self.rank, [], 0, 0
        for p, (a, b) in enumerate(self.parts):
            if a > end:
                pieces.append(h.new_zeros(*h.shape[:-1], a - end))
            pieces.append(F.linear(h[..., p * r:(p + 1) * r], self.lora_b[row:row + b - a]))
            row, end = row + b - a, b
        if end < self.out_features:
            pieces.append(h.new_zeros(*h.shape[:-1], self.out_features - end))
        return (pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        return y + self.delta(x).to(y.dtype)

    def merged_weight(self) -> torch.Tensor:
        """The base weight with the update folded in: W[part] + scale * B_p A_p, computed in float32 and
        rounded once to the weight's dtype (a new tensor; the base's is not written). A quantized base (QLoRA):
        its dequantized weight, the result in float32."""
        if _quantized(self.base):
            w = self.base.dequantized(torch.float32)
        else:
            w = self.base.weight.detach().float().clone()
        r, row = self.rank, 0
        for p, (a, b) in enumerate(self.parts):
            w[a:b] += self.scale * (self.lora_b.detach()[row:row + b - a].float() @ self.lora_a.detach()[p * r:(p + 1) * r].float())
            row += b - a
        return w if _quantized(self.base) else w.to(self.base.weight.dtype)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale:g}, parts={self.parts}"


def _quantized(layer: nn.Module) -> bool:
    """An Int8Linear / Int4Linear (points.runtime.quantize): integer codes and a `dequantized()` weight."""
    return hasattr(layer, "dequantized") and not layer.weight.is_floating_point()


def _sites(model: nn.Module, targets: tuple[str, ...]) -> list[tuple[str, list[tuple[int, int]]]]:
    """(module name inside `model`, adapted parts) of every Linear the targets name, in module order. `model`
    is a POINTSModel (decoder, vision, projector) or a Decoder alone (decoder targets only)."""
    decoder = getattr(model, "decoder", model)
    prefix = "decoder." if decoder is not model else ""
    cfg = decoder.cfg
    q, kv, ffn = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.ffn_size
    qkv = {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv)}
    up_gate = {"up": (0, ffn), "gate": (ffn, 2 * ffn)}
    sites = []
    for i in range(len(decoder.layers)):
        base = f"{prefix}layers.{i}"
        for name, part_rows in ((f"{base}.attn.qkv", qkv), (f"{base}.mlp.up_gate", up_gate)):
            parts = [rows for t, rows in part_rows.items() if t in targets]
            if parts:
                sites.append((name, parts))
        if "out" in targets:
            sites.append((f"{base}.attn.out", None))
        if "down" in targets:
            sites.append((f"{base}.mlp.down", None))
    for part in ("vision", "projector"):
        if part in targets:
            if not hasattr(model, part):
                raise ValueError(f"lora target {part!r}: this model has no {part} (a decoder alone)")
            sites += [(f"{part}.{n}", None) for n, m in getattr(model, part).named_modules()
                      if isinstance(m, nn.Linear) and n != "patch_embed"]
    return sites


def add_lora(model: nn.Module, cfg: LoraConfig, *, seed: int | None = None) -> list[str]:
    """Swap the projections `cfg.targets` name for LoraLinear layers (in place); every other parameter of
    `model` is frozen. Returns the adapted modules' names. seed: draws A from its own generator (else from
    torch's global one)."""
    if any(isinstance(m, LoraLinear) for m in model.modules()):
        raise ValueError("add_lora: this model has LoRA adapters already (merge_lora or load a fresh one)")
    model.requires_grad_(False)
    names = []
    with torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext():
        if seed is not None:
            torch.manual_seed(seed)
        for name, parts in _sites(model, cfg.targets):
            base = model.get_submodule(name)  # (a quantized one too: QLoRA, the base frozen in its codes)
            model.set_submodule(name, LoraLinear(base, parts or [(0, base.out_features)], cfg.rank, cfg.alpha,
                                                 cfg.dropout))
            names.append(name)
    model.lora = cfg
    return names


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors by name (`<module>.lora_a`, `<module>.lora_b`), detached, contiguous."""
    return {f"{n}.{k}": getattr(m, k).detach().contiguous() for n, m in lora_layers(model).items()
            for k in ("lora_a", "lora_b")}


def remove_lora(model: nn.Module) -> int:
    """Put every base layer back unchanged, dropping the adapters (in place); returns how many."""
    layers = lora_layers(model)
    for name, layer in layers.items():
        model.set_submodule(name, layer.base)
    if hasattr(model, "lora"):
        del model.lora
    return len(layers)


def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its base weight and put the plain layer back (in place); returns how many.
    The folded weight is a new tensor (a memory-mapped base file is never written)."""
    layers = lora_layers(model)
    quantized = [name for name, layer in layers.items() if _quantized(layer.base)]
    if quantized:
        raise ValueError(f"merge_lora: {quantized[0]} is quantized ({getattr(model, 'decoder', model).quantization['scheme']}); "
                         "folding an update into its codes would round it away: merge into the float model")
    for name, layer in layers.items():
        base = layer.base
        base.weight = nn.Parameter(layer.merged_weight(), requires_grad=False)
        model.set_submodule(name, base)
    if hasattr(model, "lora"):
        del model.lora
    return len(layers)


# ----------------------------------------------------------------------------------------------- files

def base_identity(model: nn.Module, config_json: bytes | None = None) -> dict:
    """What an adapter records of the model it was trained on: config.json's sha256 (when given), the base's
    weight-only quantization (`quantization`: points.io.quantized.describe's dict, None for float weights) and
    two fingerprints of the base tensors (names, shapes and each one's first 64 values rounded to bfloat16, so
    that the same checkpoint loaded in float32 or bfloat16 has one fingerprint): `tensors_sha256` of every
    tensor as the model holds it, `untouched_sha256` of every tensor a quantization leaves as it was (the
    decoder's projections by name and [out, in] only). `load_adapter` compares the first between bases of one
    kind and the second between a float base and a quantized one (QLoRA's adapter onto the float model)."""
    tensors = _base_tensors(model)
    projections = _projection_shapes(model)
    every, untouched = hashlib.sha256(), hashlib.sha256()
    for name, t in sorted(tensors.items()):
        every.update(f"{name}:{tuple(t.shape)};".encode())
        every.update(_head(t))
        module, _, leaf = name.rpartition(".")
        if module in projections and leaf != "bias":
            if leaf == "weight":  # (a quantized layer's scale and offset: the float layer has none)
                untouched.update(f"{name}:{projections[module]};".encode())
            continue
        untouched.update(f"{name}:{tuple(t.shape)};".encode())
        untouched.update(_head(t))
    ident = {"tensors_sha256": every.hexdigest(), "untouched_sha256": untouched.hexdigest(),
             "quantization": getattr(getattr(model, "decoder", model), "quantization", None)}
    if config_json is not None:
        ident["config_sha256"] = hashlib.sha256(config_json).hexdigest()
    return ident


def _head(t: torch.Tensor) -> bytes:
    return t.detach().reshape(-1)[:64].to(torch.bfloat16).float().cpu().numpy().tobytes()


def _base_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in model.state_dict().items():
        if ".lora_" in name:
            continue
        out[name.replace(".base.", ".")] = t
    return out


def _projection_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """The decoder's projections that a quantization may turn into codes (lm_head included) by their state
    names, each with its [out, in]."""
    from points.runtime.quantize import projection_names

    names = set(projection_names(model, lm_head=True))
    out = {}
    for name, module in model.named_modules():
        name = name.removesuffix(".base")
        if name in names and hasattr(module, "out_features"):
            out[name] = (module.out_features, module.in_features)
    return out


@dataclass
class AdapterFile:
    config: LoraConfig
    base: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        c = asdict(self.config)
        c["targets"] = list(self.config.targets)
        return {"format": FORMAT, "version": 1, "lora": c, "base": self.base}


def save_adapter(model: nn.Module, directory: str | Path, base: dict | None = None) -> Path:
    """OUT/adapter.safetensors (the adapters' tensors, float32) and OUT/adapter.json (the LoraConfig and the
    base's identity), each written atomically, the tensors first."""
    from safetensors.torch import save

    from points.io.atomic import write_bytes_atomically, write_text_atomically

    cfg = getattr(model, "lora", None)
    if cfg is None:
        raise ValueError("save_adapter: this model has no LoRA adapters (add_lora first)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_bytes_atomically(directory / ADAPTER_FILE, save(adapter_state(model)))
    write_text_atomically(directory / CONFIG_FILE, json.dumps(AdapterFile(cfg, base or {}).to_json(), indent=1) + "\n")
    return directory


def read_adapter_config(directory: str | Path) -> AdapterFile:
    path = Path(directory) / CONFIG_FILE
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no adapter config here (a directory `points finetune` wrote holds "
                              f"{CONFIG_FILE} and {ADAPTER_FILE})") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT or not isinstance(raw.get("lora"), dict):
        raise CheckpointError(f"{path}: not a points LoRA adapter config (expected format {FORMAT!r} and a "
                              "'lora' object)")
    lora = raw["lora"]
    try:
        cfg = LoraConfig(rank=lora.get("rank"), alpha=lora.get("alpha"), dropout=lora.get("dropout", 0.0),
                         targets=tuple(lora.get("targets") or ()))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: field 'lora': {e}") from None
    return AdapterFile(cfg, raw.get("base") or {})


def load_adapter(model: nn.Module, directory: str | Path, config_json: bytes | None = None) -> list[str]:
    """Add the adapters of `directory` to `model` (a fresh base) with their saved values. Checked: the base's
    identity where the adapter recorded it (config.json, the tensors' fingerprint: every tensor's between a
    float base and a float one or between bases quantized alike, those a quantization leaves untouched between a
    float base and a quantized one, `base_identity`), then every tensor's
    name and shape, none missing, none left over. Raises CheckpointError naming the file and what differs."""
    from safetensors.torch import load_file

    directory = Path(directory)
    meta = read_adapter_config(directory)
    want, here = meta.base, base_identity(model, config_json)
    across = "untouched_sha256" in want and want.get("quantization") != here["quantization"]
    for key in ("config_sha256", "untouched_sha256" if across else "tensors_sha256"):
        if key in want and key in here and want[key] != here[key]:
            what = "config.json" if key == "config_sha256" else "weights"
            raise CheckpointError(f"{directory / CONFIG_FILE}: the adapter was trained on another base model (its "
                                  f"{what} differ: {key} {want[key][:12]}... here {here[key][:12]}...)")
    path = directory / ADAPTER_FILE
    try:
        tensors = load_file(str(path))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (the adapter's tensors)") from None
    except Exception as e:  # safetensors' own errors
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    names = add_lora(model, meta.config)
    ours = adapter_state(model)
    missing, extra = sorted(set(ours) - set(tensors)), sorted(set(tensors) - set(ours))
    if missing or extra:
        remove_lora(model)  # (the model is as it was)
        raise CheckpointError(f"{path}: tensors do not match the adapter config: missing {missing[:3]}, "
                              f"unexpected {extra[:3]}")
    layers = lora_layers(model)
    for key, t in tensors.items():
        module, _, attr = key.rpartition(".")
        p = getattr(layers[module], attr)
        if tuple(t.shape) != tuple(p.shape):
            remove_lora(model)
            raise CheckpointError(f"{path}: tensor {key} has shape {list(t.shape)}, expected {list(p.shape)}")
        with torch.no_grad():
            p.copy_(t)
    return names
