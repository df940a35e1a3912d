"""The chat template: messages -> the reference's prompt text and the images, in order.

    <|im_start|>user\n  [<|vision_start|> <|image_pad|> x N <|vision_end|> \n per image] text <|im_end|>\n
    ... one block per message (texts and images concatenated in item order, no separator) ...
    <|im_start|>assistant\n                                  (after a final user message)

N = h * w / 4 for an image resized to a grid of h x w patches (an image item may carry its own
"min_pixels" / "max_pixels": the processor's bounds for it, or for POINTS-Reader its chat's shrink first; see
ImageProcessor.__call__). No system prompt unless the conversation
brings one (an extension: rendered as a ChatML system block); without one the prompt is exactly the
reference's.

The prompt is kept as parts: the template's markers (special tokens) apart from plain text (the roles, the
messages' text, the newlines), so that a message's text is tokenized as text whatever it contains
(`<|im_end|>` typed by a user is characters, not the end of a turn). Neighbouring plain pieces are joined
before tokenizing, so a conversation without special-token strings gets exactly the ids of the whole
rendered text, as the reference tokenizes it.

A member's preset (points.model.family.Preset, `Pipeline.chat(..., preset=)`) is applied to the messages before
they are rendered (`with_preset`); a grounding reply `(x, y)` is read back into a point of the image
(`read_point`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from points.io.processor import ImageProcessor
from points.io.tokenizer import IM_END, IM_START, IMAGE_PAD, VISION_END, VISION_START
from points.model.family import MEMBERS, Member, Preset

ROLES = ("system", "user", "assistant")


@dataclass
class Prompt:
    parts: list[tuple[str, bool]]  # (text, is_marker): markers are special tokens, the rest plain text
    pixel_values: torch.Tensor | None  # [N, 1176] float32, all images in prompt order
    grid_thw: torch.Tensor | None  # [n_images, 3] int64

    @property
    def text(self) -> str:
        """The rendered prompt (markers and text alike as characters)."""
        return "".join(t for t, _ in self.parts)

    def token_ids(self, tokenizer) -> list[int]:
        """Markers as their special tokens, everything else as plain text."""
        return [i for t, marker in self.parts for i in tokenizer.encode(t, special=marker)]


class ImageError(ValueError):
    """An image of the conversation cannot be used: `where` (messages[i].content[j]) and `reason` (the
    processor's message, which names the file)."""

    def __init__(self, where: str, reason: str):
        self.where, self.reason = where, reason
        super().__init__(f"{where}: {reason}")


class _Parts(list):
    """(text, is_marker, is_target) pieces; neighbouring plain text of the same kind is joined."""

    def text(self, s: str, target: bool = False) -> None:
        if self and not self[-1][1] and self[-1][2] == target:
            self[-1] = (self[-1][0] + s, False, target)
        elif s:
            self.append((s, False, target))

    def marker(self, s: str, target: bool = False) -> None:
        self.append((s, True, target))


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
        if item["type"] == "image":
            check_item_pixels(item, where)
    return content


ITEM_PIXELS_MIN = 28 * 28  # an image's own bounds: at least one merge window


def check_item_pixels(item: dict, where: str) -> None:
    """An image item's own `min_pixels` / `max_pixels` (ImageProcessor.__call__): integers >= 784 (one merge
    window), the first not over the second; a ValueError naming `where`.<key> otherwise."""
    given = {}
    for key in ("min_pixels", "max_pixels"):
        value = item.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < ITEM_PIXELS_MIN):
            raise ValueError(f"{where}.{key} = {value!r:.40}: expected an integer >= {ITEM_PIXELS_MIN} (28 x 28, "
                             "one merge window: the image's own pixel bound)")
        given[key] = value
    if None not in given.values() and given["min_pixels"] > given["max_pixels"]:
        raise ValueError(f"{where}.min_pixels = {given['min_pixels']}: expected at most max_pixels "
                         f"({given['max_pixels']})")


def build_prompt(messages: list[dict], processor: ImageProcessor) -> Prompt:
    """The prompt that asks for the reply to `messages` (whose last message is the user's)."""
    parts, pixels, grids = _render(messages, processor, training=False)
    last = messages[-1]["role"]
    if last != "user":
        raise ValueError(f"messages: the last message must come from the user (to be answered), not {last!r}")
    parts.marker(IM_START)
    parts.text("assistant\n")
    return Prompt([(t, m) for t, m, _ in parts], torch.cat(pixels) if pixels else None,
                  torch.tensor(grids, dtype=torch.long) if grids else None)


@dataclass
class Conversation:
    """A whole conversation rendered for training: the pieces of `Prompt` with, for each, whether its tokens
    are targets (an assistant turn's text and its closing <|im_end|>; never the role header, the newline
    after <|im_end|>, a system or user turn, or an image)."""
    parts: list[tuple[str, bool, bool]]  # (text, is_marker, is_target)
    pixel_values: torch.Tensor | None
    grid_thw: torch.Tensor | None

    def token_ids(self, tokenizer) -> tuple[list[int], list[bool]]:
        """The ids and, for each, whether it is a target. An assistant turn's text is tokenized apart from the
        header before it, so that its first token is its own."""
        ids, target = [], []
        for t, marker, is_target in self.parts:
            piece = tokenizer.encode(t, special=marker)
            ids += piece
            target += [is_target] * len(piece)
        return ids, target


def build_conversation(messages: list[dict], processor: ImageProcessor) -> Conversation:
    """`messages` as the model reads them in training: every turn closed, nothing asked for after the last;
    at least one assistant turn (the targets)."""
    parts, pixels, grids = _render(messages, processor, training=True)
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("messages: no assistant turn (training needs at least one reply to learn)")
    return Conversation(list(parts), torch.cat(pixels) if pixels else None,
                        torch.tensor(grids, dtype=torch.long) if grids else None)


def _render(messages: list[dict], processor: ImageProcessor, training: bool):
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages: expected a non-empty list of {'role': ..., 'content': ...} dicts")
    parts, pixels, grids = _Parts(), [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"messages[{i}]: expected a dict with 'role' and 'content', got {m!r:.80}")
        if m["role"] not in ROLES:
            raise ValueError(f"messages[{i}].role = {m['role']!r}; expected one of {ROLES}")
        if m["role"] == "system" and i != 0:
            raise ValueError(f"messages[{i}]: a system message may only come first")
        target = training and m["role"] == "assistant"
        parts.marker(IM_START)
        parts.text(f"{m['role']}\n")
        for j, item in enumerate(_items(m, i)):
            if item["type"] == "text":
                parts.text(item["text"], target)
                continue
            if m["role"] == "system":
                raise ValueError(f"messages[{i}].content[{j}]: a system message cannot hold images")
            try:
                pv, grid = processor(item["image"], item.get("max_pixels"), item.get("min_pixels"))
            except ValueError as e:
                raise ImageError(f"messages[{i}].content[{j}]", str(e)) from None
            pixels.append(pv)
            grids.append(grid)
            parts.marker(f"{VISION_START}{IMAGE_PAD * processor.tokens(grid)}{VISION_END}")
            parts.text("\n")
        parts.marker(IM_END, target)
        parts.text("\n")
    return parts, pixels, grids


# --------------------------------------------------------------------------- presets

class PresetError(ValueError):
    """A preset the model does not have: its `name` and the `reason` (which names the presets it has)."""

    def __init__(self, name, reason: str):
        self.name, self.reason = name, reason
        super().__init__(f"preset {name!r:.60}: {reason}")


def preset_of(member: Member, name: str) -> Preset:
    """`member`'s preset `name`; a PresetError naming the presets it has when it has no such one (another
    member's preset is named as that member's)."""
    if not isinstance(name, str):
        raise PresetError(name, f"expected a preset's name (a string), got {type(name).__name__}")
    if name in member.presets:
        return member.presets[name]
    have = f"its presets: {', '.join(sorted(member.presets))}" if member.presets else "it has none"
    owners = [m.name for m in MEMBERS if name in m.presets]
    whose = f"a preset of {', '.join(owners)}, not of" if owners else "no preset of"
    raise PresetError(name, f"{whose} this model ({member.name}; {have})")


def _images_only(message) -> bool:
    content = message.get("content") if isinstance(message, dict) else None
    return (isinstance(content, list) and bool(content)
            and all(isinstance(item, dict) and item.get("type") == "image" for item in content))


def with_preset(messages: list[dict], preset: Preset) -> list[dict]:
    """`messages` as `preset` asks (a new list; the caller's messages are not changed):

    - its `system` text becomes a first system turn, unless the conversation starts with its own;
    - its `prompt` becomes the text of every user turn that carries only images (no text item), put after
      them: [image] -> [image, {"type": "text", "text": prompt}] (every such turn, so that a continued
      conversation renders its earlier turns as before and the prefix cache finds them).

    A turn with any text of its own is left as it is. Malformed messages are left for build_prompt to name."""
    if not isinstance(messages, list):
        return messages
    out = list(messages)
    if preset.prompt is not None:
        out = [dict(m, content=[*m["content"], {"type": "text", "text": preset.prompt}])
               if _images_only(m) and m.get("role") == "user" else m for m in out]
    if preset.system is not None and not (out and isinstance(out[0], dict) and out[0].get("role") == "system"):
        out.insert(0, {"role": "system", "content": preset.system})
    return out


# --------------------------------------------------------------------------- a grounding reply

# "(x, y)" or "[x, y]", spaces anywhere, numbers as 0.123, .5, 12 or 431.5 (a sign read to be refused)
_NUMBER = r"([-+]?(?:\d+(?:\.\d*)?|\.\d+))"
_PAIR = re.compile(rf"[(\[]\s*{_NUMBER}\s*,\s*{_NUMBER}\s*[)\]]")


class PointError(ValueError):
    """A reply that is not a point of the image: the `reply` text, and why."""

    def __init__(self, reply: str, why: str):
        self.reply = reply
        super().__init__(f"{why}: the reply was {reply!r:.200}")


@dataclass(frozen=True)
class Point:
    """Where in an image: `x`, `y` in pixels of the original image (before any resize; 0 at the left and top
    edges, the width and height at the right and bottom ones), `nx`, `ny` the same as fractions of its width
    and height, and the model's `reply` it was read from."""

    x: float
    y: float
    nx: float
    ny: float
    reply: str


def parse_point(reply: str) -> tuple[float, float]:
    """The first "(x, y)" (or "[x, y]") of a grounding reply -> (nx, ny), fractions of the image's width and
    height. POINTS-GUI-G replies in [0, 1] (three decimals, as its system prompt asks): a pair whose values are
    both at most 1 is read so. A pair with a value above 1 cannot be in that convention; it is read in the other
    one grounding models and datasets use, thousandths (0-1000, Qwen2-VL's), both values divided by 1000 (a
    pixel reading would need the resized size the model saw, which no member was trained to reply in). A
    negative value or one above 1000 is no point of the image: PointError, as is a reply with no pair."""
    found = _PAIR.search(reply) if isinstance(reply, str) else None
    if found is None:
        raise PointError(reply, "no point (x, y) in the reply")
    x, y = float(found[1]), float(found[2])
    if min(x, y) < 0 or max(x, y) > 1000:
        raise PointError(reply, f"the point ({found[1]}, {found[2]}) is outside the image (expected values in "
                                "[0, 1], or thousandths in [0, 1000])")
    scale = 1.0 if max(x, y) <= 1 else 1000.0
    return x / scale, y / scale


def read_point(reply: str, size: tuple[int, int]) -> Point:
    """A grounding reply (parse_point) as a Point of an image of `size` = (width, height) pixels."""
    nx, ny = parse_point(reply)
    width, height = size
    return Point(nx * width, ny * height, nx, ny, reply)
