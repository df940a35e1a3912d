"""VLMEvalKit's POINTS-1.5 wrapper as data: per benchmark, the question asked and the image's pixel bounds, so
that `points eval` asks what OpenCompass's runs of POINTS-1.5 asked.

    setting = BENCHMARKS["MMStar"]                      # kind "MCQ", min_pixels 840 * 840
    text, images = ask(row, "MMStar")                   # the prompt and the one image the wrapper sends

The source, read at open-compass/VLMEvalKit e8e78f05 (2026): `vlmeval/vlm/points.py`, class `POINTSV15`
("the wrapper"), `vlmeval/vlm/base.py` (`message_to_promptimg`), `vlmeval/dataset/image_base.py` and the
dataset classes (`build_prompt`, `TYPE`), `vlmeval/smp/misc.py` (`cn_string`).

- A multiple-choice benchmark (its dataset class's TYPE "MCQ") gets the wrapper's own prompt
  (`POINTSV15.use_custom_prompt` / `build_prompt`): the hint, a newline and the question when there is a hint;
  then "\\n{letter}. {option}" for each option that is present; then "\\n请直接回答选项字母。" when the prompt
  holds a CJK character (`cn_string`: U+4E00-U+9FFF), else "\\nAnswer with the option's letter from the given
  choices directly."; with no option, "\\n请直接回答问题。" or "\\nAnswer the question directly.".
- Any other benchmark gets its dataset's prompt (`ImageBaseDataset.build_prompt`: the question; the
  ImageVQADataset family appends "\\nAnswer the question using a single word or phrase.").
- The image as the wrapper reads it: written by VLMEvalKit to "{index}.png", or to the row's `image_path`
  name when the file has that column, "{index}_{i}.png" for a list (`ImageBaseDataset.dump_image`,
  `decode_base64_to_image_file`: RGBA / P / LA converted to RGB, saved by pillow in the name's format);
  `as_dumped` does the same, so a JPEG in the TSV reaches the model as its decoded pixels.
- A benchmark the table lacks is what VLMEvalKit makes of an unknown name (`DATASET_TYPE`'s default): MCQ,
  so the wrapper's multiple-choice prompt ("Answer the question directly." without options), unless the
  name holds "openended" (VQA); `--kind` overrides that (then the prompt is no longer VLMEvalKit's).
- Then the wrapper's `generate_inner`: the message's texts joined with "\\n" and only its FIRST image
  (`BaseModel.message_to_promptimg`, called without the dataset's name: a sample's other images are
  dropped); HallusionBench appends " Please answer yes or no. Answer the question using a single word or
  phrase.", MMVet " Answer this question in detail."; every "<image N>" becomes "\\n"; one user turn: the
  image, then the text; greedy, 2,048 new tokens (`generation_config`).
- The image processor's bounds (`POINTSV15.set_image_processor`): OCRBench min_pixels 280 x 280; MMMU_DEV_VAL
  min 1280 x 28 x 28 and max 16384 x 28 x 28; MathVista_MINI min 56 x 56; MMVet, HallusionBench,
  MMBench_TEST_EN_V11 and MMBench_TEST_CN_V11 min 1280 x 28 x 28; every other benchmark min 840 x 840. The max
  is the checkpoint's own (its preprocessor_config.json) except for MMMU_DEV_VAL. (The wrapper also loads the
  decoder in Quanto int8: `points eval --quantize int8` is this project's int8, not Quanto's.)
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

from points.io.benchmark_tsv import Row

MCQ_SUFFIX = "\nAnswer with the option's letter from the given choices directly."  # points.py build_prompt
MCQ_SUFFIX_CN = "\n请直接回答选项字母。"  # points.py build_prompt (cn_string)
OPEN_SUFFIX = "\nAnswer the question directly."  # points.py build_prompt, no options
OPEN_SUFFIX_CN = "\n请直接回答问题。"
VQA_SUFFIX = "\nAnswer the question using a single word or phrase."  # image_vqa.py ImageVQADataset.build_prompt
HALLUSION_SUFFIX = " Please answer yes or no. Answer the question using a single word or phrase."  # generate_inner
MMVET_SUFFIX = " Answer this question in detail."  # points.py generate_inner
MAX_NEW_TOKENS = 2048  # points.py generate_inner: generation_config (greedy: temperature 0, num_beams 1)
DEFAULT_MIN_PIXELS = 840 * 840  # points.py set_image_processor: "every other" benchmark


@dataclass(frozen=True)
class Benchmark:
    name: str
    kind: str  # "MCQ", "Y/N" or "VQA": its dataset class's TYPE, which decides the prompt and the scorer
    min_pixels: int = DEFAULT_MIN_PIXELS
    max_pixels: int | None = None  # None: the checkpoint's
    suffix: str = ""  # the wrapper's own addition after the prompt
    vqa_suffix: bool = False  # the dataset's prompt ends with VQA_SUFFIX (ImageVQADataset)
    dataset_suffix: str = ""  # another dataset's own addition to the question (AMBER's)


def _table(*entries: Benchmark) -> dict[str, Benchmark]:
    return {b.name: b for b in entries}


BENCHMARKS = _table(
    # the model card's eight (and their VLMEvalKit names), min/max from set_image_processor
    Benchmark("MMBench_TEST_EN_V11", "MCQ", min_pixels=1280 * 28 * 28),  # set_image_processor
    Benchmark("MMBench_TEST_CN_V11", "MCQ", min_pixels=1280 * 28 * 28),  # set_image_processor
    Benchmark("MMBench_DEV_EN_V11", "MCQ"),  # (not named there: 840 x 840)
    Benchmark("MMBench_DEV_CN_V11", "MCQ"),
    Benchmark("MMBench_TEST_EN", "MCQ"),
    Benchmark("MMBench_DEV_EN", "MCQ"),
    Benchmark("MMStar", "MCQ"),  # image_mcq.py ImageMCQDataset
    Benchmark("MMMU_DEV_VAL", "MCQ", min_pixels=1280 * 28 * 28, max_pixels=16384 * 28 * 28),  # MMMUDataset
    Benchmark("MathVista_MINI", "VQA", min_pixels=56 * 56),  # image_vqa.py MathVista (no prompt of its own)
    Benchmark("HallusionBench", "Y/N", min_pixels=1280 * 28 * 28, suffix=HALLUSION_SUFFIX),  # image_yorn.py
    Benchmark("AI2D_TEST", "MCQ"),  # image_mcq.py ImageMCQDataset
    Benchmark("OCRBench", "VQA", min_pixels=280 * 280),  # image_vqa.py OCRBench (no prompt of its own)
    Benchmark("MMVet", "VQA", min_pixels=1280 * 28 * 28, suffix=MMVET_SUFFIX),  # image_vqa.py MMVet
    # scored without a judge as well (840 x 840 as "every other")
    Benchmark("SEEDBench_IMG", "MCQ"),
    Benchmark("ScienceQA_TEST", "MCQ"),
    Benchmark("RealWorldQA", "MCQ"),
    Benchmark("MME", "Y/N"),  # image_yorn.py ImageYORNDataset
    Benchmark("POPE", "Y/N"),
    Benchmark("TextVQA_VAL", "VQA", vqa_suffix=True),  # image_vqa.py ImageVQADataset
    Benchmark("DocVQA_VAL", "VQA", vqa_suffix=True),
    Benchmark("ChartQA_TEST", "VQA", vqa_suffix=True),
    Benchmark("InfoVQA_VAL", "VQA", vqa_suffix=True),
    Benchmark("InfoVQA_TEST", "VQA", vqa_suffix=True),
    Benchmark("DocVQA_TEST", "VQA", vqa_suffix=True),
    Benchmark("OCRVQA_TEST", "VQA", vqa_suffix=True),
    Benchmark("OCRVQA_TESTCORE", "VQA", vqa_suffix=True),
    Benchmark("GQA_TestDev_Balanced", "VQA", vqa_suffix=True),
    Benchmark("OCRBench_MINI", "VQA"),  # image_vqa.py OCRBench (set_image_processor names "OCRBench" only)
    Benchmark("AMBER", "Y/N", dataset_suffix="\nPlease answer yes or no."),  # image_yorn.py build_prompt
)
KINDS = ("MCQ", "Y/N", "VQA")


def benchmark(name: str, kind: str | None = None) -> Benchmark:
    """The table's entry for `name`; a name it lacks is MCQ (VQA with "openended" in it) as VLMEvalKit makes it,
    or `kind`, with 840 x 840 and no suffix as the wrapper treats any other benchmark."""
    if not name or "/" in name or name != name.strip():
        raise ValueError(f"--benchmark {name!r}: expected a benchmark's name (VLMEvalKit's, e.g. MMStar)")
    if name in BENCHMARKS:
        found = BENCHMARKS[name]
        if kind is not None and kind != found.kind:
            raise ValueError(f"--kind {kind}: {name} is {found.kind} in VLMEvalKit")
        return found
    if kind is not None and kind not in KINDS:
        raise ValueError(f"--kind {kind}: expected one of {', '.join(KINDS)}")
    return Benchmark(name, kind or ("VQA" if "openended" in name.lower() else "MCQ"))


def cn_string(text: str) -> bool:
    """VLMEvalKit's test for Chinese text: a character in U+4E00-U+9FFF."""
    return re.search("[\u4e00-\u9fff]", text) is not None


def ask(row: Row, bench: Benchmark) -> tuple[str, list[bytes]]:
    """(the text, the images) the wrapper sends for this row: see the module docstring."""
    if bench.kind == "MCQ":
        question = row.question
        if row.hint is not None:
            question = row.hint + "\n" + question
        for letter, option in row.options.items():
            question += f"\n{letter}. {option}"
        prompt = question
        if row.options:
            prompt += MCQ_SUFFIX_CN if cn_string(prompt) else MCQ_SUFFIX
        else:
            prompt += OPEN_SUFFIX_CN if cn_string(prompt) else OPEN_SUFFIX
    else:
        prompt = row.question + (VQA_SUFFIX if bench.vqa_suffix else "") + bench.dataset_suffix
    prompt += bench.suffix
    prompt = re.sub(r"<image \d+>", "\n", prompt)
    images = [as_dumped(image, _dump_suffix(row)) for image in row.images()[:1]]
    return prompt, images


def _dump_suffix(row: Row) -> str:
    """The suffix of the file VLMEvalKit writes the (first) image to (`dump_image`): the row's `image_path`
    name's when the file has that column, else ".png"."""
    names = row.text("image_path")
    if names:
        first = names.strip("[]").split(",")[0].strip().strip("'\"") if names.startswith("[") else names
        if "." in first:
            return "." + first.rsplit(".", 1)[-1].lower()
    return ".png"


def as_dumped(data: bytes, suffix: str = ".png") -> bytes:
    """The image as the wrapper reads it back: VLMEvalKit decodes the base64, converts RGBA / P / LA to RGB, and
    saves it under a name ending in `suffix` with pillow's defaults for that format (`decode_base64_to_image_file`;
    a PNG keeps the decoded pixels, a name ending in .jpg would re-encode them)."""
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data))
        if image.mode in ("RGBA", "P", "LA"):
            image = image.convert("RGB")
        out = io.BytesIO()
        image.save(out, format=Image.registered_extensions().get(suffix, "PNG"))
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"image: not a readable image ({e})") from None
    return out.getvalue()


def messages(row: Row, bench: Benchmark) -> list[dict]:
    """One user turn for Pipeline.submit: the image (with the benchmark's pixel bounds), then the text."""
    text, images = ask(row, bench)
    bounds = {"min_pixels": bench.min_pixels} | ({"max_pixels": bench.max_pixels} if bench.max_pixels else {})
    content = [{"type": "image", "image": image} | bounds for image in images]
    return [{"role": "user", "content": content + [{"type": "text", "text": text}]}]
