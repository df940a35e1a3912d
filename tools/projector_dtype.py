"""How far POINTS-Reader's official bfloat16 projector moves float32 logits (the README's "projector's dtype").

    python tools/projector_dtype.py [--size reader-tiny]

Reader's official code builds its PatchMerger in bfloat16 whatever the load dtype and splices its output into
float32 embeddings; points runs the projector in the load dtype. This loads a random checkpoint of the size in
float32, runs one prompt with an image both ways and prints the largest logit difference against the largest
logit.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import tempfile
from pathlib import Path

import torch
from PIL import Image

import points
from points.tooling import synthetic


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="reader-tiny", choices=sorted(synthetic.SHAPES))
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="points-projector-"))
    try:
        pipe = points.load(synthetic.write_checkpoint(tmp / "model", args.size, dtype=torch.float32))
        Image.linear_gradient("L").convert("RGB").resize((224, 168)).save(tmp / "page.png")
        enc = pipe.encode([{"role": "user", "content": [{"type": "image", "image": str(tmp / "page.png")},
                                                        {"type": "text", "text": "Read it."}]}])
        model = pipe.model
        with torch.no_grad():
            ours = model(enc.input_ids, enc.pixel_values, enc.grid_thw)
            official = copy.deepcopy(model.projector).to(torch.bfloat16)  # (as Reader's code builds it)
            features = official(model.vision(enc.pixel_values, enc.grid_thw).to(torch.bfloat16)).float()
            theirs = model.decoder(embeds=model.embed(enc.input_ids, features))
        gap, top = (theirs - ours).abs().max().item(), ours.abs().max().item()
        print(f"{args.size}: {enc.input_ids.shape[1]} tokens, max |logit| {top:.4g}, max |difference| {gap:.4g} "
              f"= {gap / top:.2%} of it")
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
