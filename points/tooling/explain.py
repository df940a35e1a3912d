"""`points explain`: where the model looked in the image while it answered, drawn over the image.

    points explain --model DIR --image photo.jpg --prompt "What is in the picture?" --output heat.png
                   [--layers 20 27 | all] [--heads 0 5] [--token 3] [--max-new-tokens 64]

The reply is generated greedily, then one recorded forward over the prompt and the reply's own token ids
(`Pipeline.look`) gives the decoder's attention probabilities of the chosen layers (default: all) and heads
(default: all). For each reply token, the query that chose it (the position before it) is read; its
attention to the image's tokens is averaged over layers, heads and reply tokens (or taken for one token,
--token N, the N-th of the reply, from 0; negative from the end). The image's tokens are its 2x2-merged
patch windows, in the order the projector merges them, so the map is one cell per 28 x 28 pixels of the
image as the model saw it (resized by the processor). Drawn with pillow only: the cells scaled up without
smoothing, coloured from dark (the least attended cell) to bright (the most), over the image; under it the
prompt, the reply (the chosen token in [brackets]), the layers and heads used and how much of that
attention went to the image at all. The PNG is written atomically.

Cost: the reply's generation, then one forward with the chosen layers on the eager path, their
probabilities kept in float32: heads x L x L x 4 bytes a layer (28 heads at L = 400 tokens: 18 MB a layer,
0.5 GB for all 28; at L = 1,300, a large image, 190 MB a layer: choose a few --layers there).
"""

from __future__ import annotations

import argparse
import io
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

from points.io.atomic import write_bytes_atomically
from points.io.outputs import check_output
from points.tooling.options import add_weight_options, check_image, check_weight_options, exit_code, quantize_options

if TYPE_CHECKING:  # (imported where they run: `points explain --help` and a bad flag answer without them)
    import numpy as np
    import torch
    from PIL import Image

# dark to bright: the anchors of the colour map (near black, violet, red, orange, pale yellow)
ANCHORS = ((0, 0, 4), (87, 16, 110), (188, 55, 84), (249, 142, 9), (252, 255, 164))


def attention_to_image(seen, image: int = 0, token: int | None = None) -> tuple[torch.Tensor, float]:
    """From a Look with a reply: the mean attention of the reply's choosing queries (or of one, `token`) to
    image `image`'s tokens, over every recorded layer and head, as its merged grid [h / 2, w / 2]; and the
    share of those queries' attention that the image got (0 to 1)."""
    import torch

    if not seen.attentions:
        raise ValueError("no attention was recorded (layers=None)")
    if not seen.images:
        raise ValueError("the prompt has no image")
    n_reply = len(seen.tokens) - seen.reply_start
    if n_reply < 1:
        raise ValueError("there is no reply to explain")
    if token is not None and not -n_reply <= token < n_reply:
        raise ValueError(f"--token {token}: the reply has {n_reply} tokens (0 to {n_reply - 1}, or negative from "
                         "the end)")
    chosen = range(n_reply) if token is None else [token % n_reply]
    queries = torch.tensor([seen.reply_start - 1 + i for i in chosen])  # the position that chose each token
    span = seen.images[image]
    probs = torch.stack([p[:, queries] for p in seen.attentions.values()])  # [layers, heads, q, L]
    to_image = probs[..., span["start"]:span["end"]]
    t, h, w = span["grid"]
    grid = to_image.mean(dim=(0, 1, 2)).reshape(t, h // 2, w // 2).mean(0)
    return grid, float(to_image.sum(-1).mean())


def colour(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> RGB uint8 along ANCHORS."""
    import numpy as np

    anchors = np.array(ANCHORS, dtype=np.float64)
    x = np.clip(values, 0, 1) * (len(anchors) - 1)
    i = np.minimum(x.astype(int), len(anchors) - 2)
    f = (x - i)[..., None]
    return ((1 - f) * anchors[i] + f * anchors[i + 1]).round().astype(np.uint8)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # (Pillow before 10.1: one bitmap size)
        return ImageFont.load_default()


def draw(picture: Image.Image, grid: torch.Tensor, lines: list[str], width: int = 640) -> Image.Image:
    """The map over the picture (scaled to `width`), a colour bar, and `lines` of text under them."""
    import numpy as np
    from PIL import Image, ImageDraw

    gh, gw = grid.shape
    w = width
    h = max(1, round(w * gh / gw))  # the processor keeps the cells square: the grid's aspect is the image's
    low, high = grid.min(), grid.max()
    relative = ((grid - low) / (high - low).clamp_min(1e-30)).numpy()  # the least attended cell dark, the most bright
    heat = Image.fromarray(colour(relative)).resize((w, h), Image.NEAREST)
    base = picture.convert("RGB").resize((w, h), Image.BICUBIC)
    blended = Image.blend(base, heat, 0.5)
    font = _font(15)
    wrapped = [piece for line in lines for piece in (textwrap.wrap(line, width=max(20, w // 8)) or [""])]
    line_h, pad, bar_h = 20, 10, 14
    out = Image.new("RGB", (w, h + bar_h + 2 * pad + line_h * len(wrapped) + pad), "white")
    out.paste(blended, (0, 0))
    ramp = Image.fromarray(colour(np.linspace(0, 1, w)[None].repeat(bar_h, 0)))
    out.paste(ramp, (0, h + pad // 2))
    ink = ImageDraw.Draw(out)
    ink.text((4, h + pad // 2), "less", fill="white", font=_font(11))
    ink.text((w - 40, h + pad // 2), "more", fill="black", font=_font(11))
    y = h + bar_h + pad
    for line in wrapped:
        ink.text((pad, y), line, fill="black", font=font)
        y += line_h
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="points explain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint directory (released layout or ours)")
    p.add_argument("--image", required=True, help="the image")
    p.add_argument("--prompt", required=True, help="the question about it")
    p.add_argument("--output", required=True, type=Path, help="the picture to write (.png)")
    p.add_argument("--layers", nargs="+", default=["all"], help="decoder layers to average (default: all)")
    p.add_argument("--heads", nargs="+", type=int, default=None, help="query heads to average (default: all)")
    p.add_argument("--token", type=int, default=None,
                   help="one reply token (0 = the first, -1 = the last) instead of the whole reply")
    p.add_argument("--max-new-tokens", type=int, default=64, help="the reply's length at most (default: %(default)s)")
    p.add_argument("--width", type=int, default=640, help="the picture's width in pixels (default: %(default)s)")
    add_weight_options(p)
    return p


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    check_weight_options(p, args)
    if args.layers == ["all"]:
        layers = "all"
    else:
        try:
            layers = [int(x) for x in args.layers]
        except ValueError:
            p.error(f"--layers {' '.join(args.layers)}: expected layer indices or \"all\"")
    if args.max_new_tokens < 1:
        p.error(f"--max-new-tokens {args.max_new_tokens}: expected an integer >= 1")
    if not 64 <= args.width <= 8192:
        p.error(f"--width {args.width}: expected 64 to 8192 pixels")
    if args.output.suffix.lower() != ".png":
        p.error(f"--output {args.output}: expected a .png path")
    return exit_code(lambda: explain(args, layers))


def explain(args, layers) -> int:
    """Everything checked before the model loads (the image, the output, the layers and heads against the
    checkpoint's config), then the reply, the recorded forward and the picture."""
    from points.io.config import read_config
    from points.runtime.look import indices

    check_image("--image", args.image)
    check_output(args.output, sources={"--image": args.image})
    cfg = read_config(args.model).model.decoder
    indices(layers, cfg.n_layers, "--layers")
    if args.heads is not None:
        indices(args.heads, cfg.n_heads, "--heads")

    import points
    from points.io.processor import open_image

    pipe = points.load(args.model, device=args.device, dtype=args.dtype,
                       **quantize_options(args))
    messages = [{"role": "user", "content": [{"type": "image", "image": args.image},
                                             {"type": "text", "text": args.prompt}]}]
    request = pipe.submit(messages, max_new_tokens=args.max_new_tokens)
    request.text()
    ids = request.token_ids
    if ids and ids[-1] in (pipe.tokenizer.im_end_id, pipe.tokenizer.eos_id):
        ids = ids[:-1]  # the closing token chose nothing more
    if not ids:
        raise ValueError("the model's reply is empty: there is nothing to explain")
    seen = pipe.look(messages, ids, layers=layers, heads=args.heads, hidden=False)
    grid, share = attention_to_image(seen, 0, args.token)
    ids = seen.tokens[seen.reply_start:]
    text = pipe.tokenizer.decode(ids)
    if args.token is not None:
        k = args.token % len(ids)
        text = (pipe.tokenizer.decode(ids[:k]) + "[" + pipe.tokenizer.decode(ids[k:k + 1]) + "]"
                + pipe.tokenizer.decode(ids[k + 1:]))
    used_layers = "all" if layers == "all" else " ".join(str(i % cfg.n_layers) for i in layers)
    used_heads = "all" if args.heads is None else " ".join(str(i % cfg.n_heads) for i in args.heads)
    what = "the whole reply" if args.token is None else f"reply token {args.token}"
    lines = [f"Q: {args.prompt}", f"A: {text}",
             f"attention of {what} to the image: layers {used_layers} of {cfg.n_layers}, heads {used_heads} of "
             f"{cfg.n_heads}; {share:.1%} of it on the image's {grid.numel()} cells"]
    picture = draw(open_image(args.image), grid, lines, args.width)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    write_bytes_atomically(args.output, buffer.getvalue())
    print(f"points explain: {args.output} ({share:.1%} of the attention on the image)", file=sys.stderr)
    return 0
