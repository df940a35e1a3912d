"""The chat template: messages -> the reference's prompt text and the images, in order.

    <|im_start|>user\n  [<|vision_start|> <|image_pad|> x N <|vision_end|> \n per image] text <|im_end|>\n
    ... one block per message (texts and images concatenated in item order, no separator) ...
    <|im_start|>assistant\n                                  (after a final user message)

N = h * w / 4 for an image resized to a grid of h x w patches. No system prompt unless the conversation
brings one (an extension: rendered as a ChatML system block); without one the prompt is exactly the
reference's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from points.io.processor import ImageProcessor
from points.io.tokenizer import IM_END, IM_START, IMAGE_PAD, VISION_END, VISION_START

ROLES = ("system", "user", "assistant")


@dataclass
class Prompt:
    text: str
    pixel_values: torch.Tensor | None  # [N, 1176] float32, all images in prompt order
    grid_thw: torch.Tensor | None  # [n_images, 3] int64


def _items(message: dict, i: int) -> list[dict]:
    content = message["content"]
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise ValueError(f"messages[{i}].content: expected a string or a list of items, got {type(content).__name__}")
    for j, item in enumerate(content):
        where = f"messages[{i}].content[{j}]"
        if not isinstance(item, dict) or item.get("type") not in ("text", "image"):
            raise ValueError(f"{where}: expected {{'type': 'text', 'text': ...}} or {{'type': 'image', 'image': ...}}, "
                             f"got {item!r:.80}")
        if item["type"] == "text" and not isinstance(item.get("text"), str):
            raise ValueError(f"{where}: a text item needs a string under 'text'")
        if item["type"] == "image" and item.get("image") is None:
            raise ValueError(f"{where}: an image item needs an image (path, pathlib.Path, PIL image or bytes) "
                             "under 'image'")
    return content


def build_prompt(messages: list[dict], processor: ImageProcessor) -> Prompt:
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages: expected a non-empty list of {'role': ..., 'content': ...} dicts")
    parts, pixels, grids = [], [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"messages[{i}]: expected a dict with 'role' and 'content', got {m!r:.80}")
        if m["role"] not in ROLES:
            raise ValueError(f"messages[{i}].role = {m['role']!r}; expected one of {ROLES}")
        if m["role"] == "system" and i != 0:
            raise ValueError(f"messages[{i}]: a system message may only come first")
        parts.append(f"{IM_START}{m['role']}\n")
        for j, item in enumerate(_items(m, i)):
            if item["type"] == "text":
                parts.append(item["text"])
                continue
            if m["role"] == "system":
                raise ValueError(f"messages[{i}].content[{j}]: a system message cannot hold images")
            try:
                pv, grid = processor(item["image"])
            except ValueError as e:
                raise ValueError(f"messages[{i}].content[{j}]: {e}") from None
            pixels.append(pv)
            grids.append(grid)
            parts.append(f"{VISION_START}{IMAGE_PAD * processor.tokens(grid)}{VISION_END}\n")
        parts.append(f"{IM_END}\n")
    last = messages[-1]["role"]
    if last != "user":
        raise ValueError(f"messages: the last message must come from the user (to be answered), not {last!r}")
    parts.append(f"{IM_START}assistant\n")
    return Prompt("".join(parts), torch.cat(pixels) if pixels else None,
                  torch.tensor(grids, dtype=torch.long) if grids else None)
