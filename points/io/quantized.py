"""Weight-only quantization as it is stored: the schemes, which projections a scheme quantizes, the tensors a
quantized projection keeps, and the quantization of one weight. The one list of each, read by the checkpoint
mapping and the converter (points.io.checkpoint, points.io.names), the config reader (points.io.config) and the
layers that compute with them (points.runtime.quantize).

A quantization is described by a dict, as config.json stores it (`describe` builds and checks one):
{"scheme": "int8", "lm_head": bool} or {"scheme": "int4", "lm_head": bool, "group_size": 32 | 64 | 128,
"symmetric": bool}.

Scheme "int8": symmetric, one scale per output channel: scale[o] = max_i |W[o, i]| / 127 (kept in the model
dtype), W8 = round(W / scale) in [-127, 127]; the layer computes x @ (W8 * scale)^T + bias. Stored:
`weight` int8 [out, in], `scale` [out].

Scheme "int4": groups of `group_size` inputs (32, 64 or 128; default 128) along each row, each with its
scale and, asymmetric (the default), its offset (both kept in the model dtype): asymmetric, s = (max - min) / 15
and m = min, q = round((w - m) / s) in 0..15, w ~ q * s + m; symmetric, s = max |w| / 7, q = round(w / s) in
-8..7 stored as q + 8, w ~ (q - 8) * s. Two values a byte: the even input in the low nibble, the odd one in
the high nibble. A row whose length is no multiple of the group is padded with its last value (which leaves
the last group's range as it is) and the padding dropped again on the way back. Stored: `weight` uint8
[out, groups * group_size / 2], `scale` [out, groups], and `offset` [out, groups] when asymmetric.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # (torch is imported by the functions that compute: the command line reads SCHEMES alone)
    import torch

SCHEMES = ("int8", "int4")
INT4_GROUPS = (32, 64, 128)
INT4_GROUP = 128  # the default group size
BLOCK_ELEMENTS = 1 << 18  # quantize_int8's block: 1 MiB of float32 (measured 4x faster than the whole matrix)
PROJECTIONS = ("attn.qkv", "attn.out", "mlp.up_gate", "mlp.down")  # of every decoder layer


def check_scheme(scheme: str) -> str:
    if scheme not in SCHEMES:
        raise ValueError(f"quantize = {scheme!r}: unknown scheme; expected one of {SCHEMES}")
    return scheme


def describe(scheme: str, lm_head: bool = False, group_size: int | None = None,
             symmetric: bool | None = None) -> dict:
    """The description of a quantization (see the module), checked, int4's defaults filled in. ValueError
    naming the argument that is wrong."""
    check_scheme(scheme)
    if scheme == "int8":
        if group_size is not None or symmetric is not None:
            raise ValueError("quantize = 'int8': one scale per output channel; group_size and symmetric are int4's")
        return {"scheme": scheme, "lm_head": bool(lm_head)}
    group_size = INT4_GROUP if group_size is None else group_size
    if group_size not in INT4_GROUPS or isinstance(group_size, bool):
        raise ValueError(f"group_size = {group_size!r}: expected one of {INT4_GROUPS}")
    return {"scheme": scheme, "lm_head": bool(lm_head), "group_size": group_size, "symmetric": bool(symmetric)}


def describe_asked(quantize: str | None, lm_head: bool | None = None, group_size: int | None = None,
                   symmetric: bool | None = None) -> dict | None:
    """The quantization a caller's arguments ask for (`points.load`, `points.convert`: quantize and its
    quantize_* options), or None for none; a quantize_* option without `quantize` is a ValueError."""
    if quantize is None:
        given = [n for n, v in (("quantize_lm_head", lm_head), ("quantize_group_size", group_size),
                                ("quantize_symmetric", symmetric)) if v]
        if given:
            raise ValueError(f"{given[0]} needs quantize (e.g. quantize='int8' or 'int4')")
        return None
    return describe(quantize, bool(lm_head), group_size, symmetric)


def stored_tensors(quantization: dict, out_features: int, in_features: int):
    """What one quantized projection stores, in order: {suffix: (shape, dtype)}, dtype None for the model's
    (scales and offsets); the `weight` first."""
    import torch

    if quantization["scheme"] == "int8":
        return {"weight": ((out_features, in_features), torch.int8), "scale": ((out_features,), None)}
    g = quantization["group_size"]
    groups = -(-in_features // g)
    out = {"weight": ((out_features, groups * g // 2), torch.uint8), "scale": ((out_features, groups), None)}
    if not quantization["symmetric"]:
        out["offset"] = ((out_features, groups), None)
    return out


def quantize_weight(weight: torch.Tensor, quantization: dict) -> dict[str, torch.Tensor]:
    """One projection's weight [out, in] quantized as `quantization` says: {suffix: tensor} as
    `stored_tensors` lists them (scales and offsets in the weight's dtype)."""
    if quantization["scheme"] == "int8":
        return dict(zip(("weight", "scale"), quantize_int8(weight)))
    packed, scale, offset = quantize_int4(weight, quantization["group_size"], symmetric=quantization["symmetric"])
    return {"weight": packed, "scale": scale} | ({} if offset is None else {"offset": offset})


def quantized_modules(n_layers: int, lm_head: bool) -> list[str]:
    """The decoder's modules (names inside `Decoder`) a scheme quantizes, in module order."""
    return [f"layers.{i}.{m}" for i in range(n_layers) for m in PROJECTIONS] + (["lm_head"] if lm_head else [])


def quantize_int8(weight: torch.Tensor, scale_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] (any float dtype) -> (int8 [out, in], scale [out] in `scale_dtype`, default the
    weight's). The scale is rounded to its dtype first and the weight divided by the rounded scale, so that
    W8 * scale is the dequantized weight exactly as the layer uses it. A zero row gets scale 1.
    Computed a block of rows at a time in float32 (one block's copy stays in cache; the weight is read once
    and never written), the same numbers as the whole matrix at once."""
    import torch

    scale_dtype = scale_dtype or weight.dtype
    w = weight.detach()
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scale = torch.empty(w.shape[0], dtype=scale_dtype, device=w.device)
    rows = max(1, BLOCK_ELEMENTS // max(1, w.shape[1]))
    for start in range(0, w.shape[0], rows):
        block = w[start:start + rows].to(torch.float32, copy=True)
        amax = block.abs().amax(dim=1)
        s = torch.where(amax > 0, amax / 127, torch.ones_like(amax)).to(scale_dtype)
        scale[start:start + rows] = s
        q[start:start + rows] = block.div_(s.float()[:, None]).round_().clamp_(-127, 127)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """int8 [out, in] and scale [out] -> the weight in `dtype` (default float32)."""
    w = q.float() * scale.float()[:, None]
    return w if dtype is None else w.to(dtype)



def quantize_int4(weight: torch.Tensor, group_size: int = INT4_GROUP, *, symmetric: bool = False,
                  scale_dtype: torch.dtype | None = None):
    """weight [out, in] -> (packed uint8 [out, groups * group_size / 2], scale [out, groups], offset [out, groups]
    or None when symmetric), scale and offset in `scale_dtype` (default the weight's). Both are rounded to their
    dtype before the weight is divided, so that the dequantized weight is exactly what a layer computes with. A
    group of one value throughout gets scale 1 (asymmetric: its offset holds the value). Computed a block of
    rows at a time in float32, as quantize_int8."""
    import torch

    if group_size not in INT4_GROUPS:
        raise ValueError(f"group_size = {group_size!r}: expected one of {INT4_GROUPS}")
    scale_dtype = scale_dtype or weight.dtype
    out, n = weight.shape
    groups = -(-n // group_size)
    packed = torch.empty(out, groups * group_size // 2, dtype=torch.uint8, device=weight.device)
    scale = torch.empty(out, groups, dtype=scale_dtype, device=weight.device)
    offset = None if symmetric else torch.empty_like(scale)
    rows = max(1, BLOCK_ELEMENTS // max(1, groups * group_size))
    for start in range(0, out, rows):
        w = weight.detach()[start:start + rows].to(torch.float32, copy=True)
        if groups * group_size != n:  # (the last value repeated: the last group's range unchanged)
            w = torch.cat([w, w[:, -1:].expand(w.shape[0], groups * group_size - n)], dim=1)
        g = w.reshape(w.shape[0], groups, group_size)
        if symmetric:
            amax = g.abs().amax(dim=2)
            s = torch.where(amax > 0, amax / 7, torch.ones_like(amax)).to(scale_dtype)
            q = g.div_(s.float()[..., None]).round_().clamp_(-8, 7).add_(8)
        else:
            lo, hi = g.amin(dim=2), g.amax(dim=2)
            s = torch.where(hi > lo, (hi - lo) / 15, torch.ones_like(hi)).to(scale_dtype)
            m = lo.to(scale_dtype)
            q = g.sub_(m.float()[..., None]).div_(s.float()[..., None]).round_().clamp_(0, 15)
            offset[start:start + rows] = m
        scale[start:start + rows] = s
        q = q.to(torch.uint8).reshape(w.shape[0], -1)
        packed[start:start + rows] = q[:, 0::2] | (q[:, 1::2] << 4)
    return packed, scale, offset


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, in_features: int,
                    dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight [out, in_features] back from `quantize_int4`'s three (float32 unless `dtype`; float64 gives
    the exact value of q * s + m in the stored scale and offset)."""
    import torch

    work = dtype if dtype in (torch.float64,) else torch.float32
    out = packed.shape[0]
    q = torch.stack([packed & 0x0F, packed >> 4], dim=2).reshape(out, -1).to(work)
    groups = scale.shape[1]
    q = q.reshape(out, groups, -1)
    if offset is None:
        w = (q - 8) * scale.to(work)[..., None]
    else:
        w = q * scale.to(work)[..., None] + offset.to(work)[..., None]
    w = w.reshape(out, -1)[:, :in_features]
    return w if dtype is None or dtype == work else w.to(dtype)
