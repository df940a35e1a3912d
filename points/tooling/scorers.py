"""VLMEvalKit's scores for the benchmarks it scores without a judge model, written from its rules (read at
open-compass/VLMEvalKit e8e78f05) so that `points eval` reports what `run.py --mode eval` would.

    result = score("MMStar", "MCQ", rows, predictions)    # {"Overall": 61.1, "split": {...}, "category": {...}, "n": 1500}

- Multiple choice (`vlmeval/utils/matching_util.py` `can_infer`, `dataset/utils/multiple_choice.py`, judge
  "exact_matching"): the option letter read from the reply (`can_infer_option`: the reply with `.()[],:;!*#{}`
  as spaces, split into words; exactly one option letter among them, in the last five words; else "The
  answer is X"; else `can_infer_text`: exactly one option's text inside a reply at most twice the options'
  length), else "Z"; a hit when it equals the answer. MMBench (any name with mmbench, ccbench, circular or
  mmcr) is circular: rows whose index is the same modulo 1,000,000 are one question with its options rotated,
  scored once (on the row whose index is that number) and hit only when every rotation is. MMMU: an open
  question (no option A) becomes A = its answer, B = "Other Answers", and an answer that is not a letter
  counts as A (`MMMU_preproc`). Accuracy per split overall, then per l2-category and category (`report_acc`).
- Yes / no (`dataset/utils/yorn.py`): "Yes" when the reply's words (lower case, punctuation handled as
  `process_punctuation` does) hold "yes" and not "no", "No" the other way round, else "Unknown" (a miss); a
  hit when it equals the answer. HallusionBench: aAcc (rows), fAcc (every question of one figure right:
  l2-category, set and figure from the index), qAcc (one question right on every figure of its set), overall
  and per category and l2-category. POPE: F1 of "Yes" (the headline), accuracy, precision, recall, per
  category (a row of several categories counts in each). MME: per category accuracy + accuracy+ (both
  questions of an image right), x 100; perception and reasoning the sums of their categories.
  Any other: accuracy, per category and l2-category.
- OCRBench: a hit when one of the row's answers (a Python list) is inside the reply, both lower-cased with
  newlines as spaces and stripped (handwritten mathematical expressions: spaces removed, case kept); points
  per category group, the final score out of 1,000 and normalised to 100.
Benchmarks that need a judge model (MMVet, MathVista's answer extraction, MMMU's open questions beyond the rule
above, anything free-form) are not scored here: their predictions file goes to VLMEvalKit (README).

Every score is a percentage like VLMEvalKit's tables (OCRBench's final score normalised to 100 as well); a row
without an answer (a test split) is a miss, as in VLMEvalKit's local evaluation, and counted (`unanswered`); the
headline of a table of splits is VLMEvalKit's primary metric (test, else validation, val, dev). Replies are
scored as VLMEvalKit reads them back from the prediction file.
"""

from __future__ import annotations

import ast
import re
import string
from collections import defaultdict

PUNCTUATION = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
               "!"]
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_PERIOD_STRIP = re.compile(r"(?<!\d)\.(?!\d)")
_VERBOSE_ANSWER = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**")
REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
            "I'm sorry, but without the image provided", "Cannot determine the answer")
OCRBENCH_GROUPS = {
    "Text Recognition": ("Regular Text Recognition", "Irregular Text Recognition", "Artistic Text Recognition",
                         "Handwriting Recognition", "Digit String Recognition", "Non-Semantic Text Recognition"),
    "Scene Text-centric VQA": ("Scene Text-centric VQA",),
    "Doc-oriented VQA": ("Doc-oriented VQA",),
    "Key Information Extraction": ("Key Information Extraction",),
    "Handwritten Mathematical Expression Recognition": ("Handwritten Mathematical Expression Recognition",),
}
MME_GROUPS = {"perception": ("OCR", "artwork", "celebrity", "color", "count", "existence", "landmark", "position",
                             "posters", "scene"),
              "reasoning": ("code_reasoning", "commonsense_reasoning", "numerical_calculation", "text_translation")}


# ------------------------------------------------------------------------------------------- multiple choice

def can_infer_option(answer: str, choices: dict) -> str | bool:
    if "Failed to obtain answer via API" in answer:
        return False
    if any(refusal in answer for refusal in REFUSALS):
        return "Z"
    mod = answer
    for c in ".()[],:;!*#{}":
        mod = mod.replace(c, " ")
    words = [w.strip() for w in mod.split()]
    count = sum(c in words for c in choices)
    if count == 1:
        for ch in choices:
            if ch in words and words.index(ch) > len(words) - 5:
                return ch
    elif count == 0 and sum(c in words for c in ("Z", "")) == 1:
        return "Z"
    found = _VERBOSE_ANSWER.search(answer or "")
    if found and found.group(1).upper() in choices:
        return found.group(1).upper()
    return False


def can_infer_text(answer: str, choices: dict) -> str | bool:
    answer = answer.lower()
    if len(answer) > 2 * sum(len(str(v)) for v in choices.values()):
        return False
    found = [k for k, v in choices.items() if str(v).lower() in answer]
    return found[0] if len(found) == 1 else False


def can_infer(answer, choices: dict) -> str | bool:
    answer = str(answer)
    return can_infer_option(answer, choices) or can_infer_text(answer, choices)


def is_circular(name: str) -> bool:
    return any(k in name.lower() for k in ("mmbench", "ccbench", "circular", "mmcr"))


def _lowered(fields: dict) -> dict:
    """VLMEvalKit's evaluator lower-cases every column name but the option letters."""
    return {k if k in string.ascii_uppercase else k.lower(): v for k, v in fields.items()}


def _split(r: dict) -> str:
    return "none" if r.get("split") is None else str(r["split"])


def _accuracy(hits: list[tuple[dict, float]]) -> dict:
    """`report_acc`: the mean hit per split, then per l2-category and category within each split (x 100)."""
    hits = [(_lowered(r), h) for r, h in hits]
    splits = sorted({_split(r) for r, _ in hits})
    out = {"Overall": {}, "l2-category": defaultdict(dict), "category": defaultdict(dict)}
    for sp in splits:
        in_split = [(r, h) for r, h in hits if _split(r) == sp]
        out["Overall"][sp] = 100 * sum(h for _, h in in_split) / len(in_split)
        for group in ("l2-category", "category"):
            values = sorted({str(r[group]) for r, _ in in_split if r.get(group) is not None})
            for v in values:
                sub = [h for r, h in in_split if str(r.get(group)) == v]
                out[group][v][sp] = 100 * sum(sub) / len(sub)
    return {k: dict(v) for k, v in out.items() if v}


def score_mcq(name: str, rows, predictions: dict) -> dict:
    """Multiple-choice accuracy (see the module docstring); `rows`: points.io.benchmark_tsv.Row. A row without
    an answer (a test split) is a miss, as in VLMEvalKit's local evaluation (`unanswered` counts them)."""
    mmmu = "MMMU" in name
    items = []
    for r in rows:
        choices, gt = r.options, r.answer
        if mmmu:
            if "A" not in choices:
                choices = {"A": r.answer, "B": "Other Answers"} | {k: v for k, v in choices.items() if k not in "AB"}
            gt = gt if gt is not None and len(gt) == 1 and gt in string.ascii_uppercase else "A"
        pred = can_infer(predictions[r.index], {k: v for k, v in choices.items() if v is not None})
        items.append((r, pred or "Z", gt))
    if not is_circular(name):
        hits = [(r.fields, float(gt is not None and p == gt)) for r, p, gt in items]
    else:
        group = lambda r: int(r.fields["g_index"]) if r.fields.get("g_index") is not None \
            else int(r.index) % 1_000_000  # noqa: E731
        groups = defaultdict(list)
        for r, p, g in items:
            groups[group(r)].append((p, g))
        hits = [(r.fields, float(all(g is not None and p == g for p, g in groups[int(r.index)])))
                for r, _, _ in items if int(r.index) == group(r)]
    result = _accuracy(hits) if hits else {}
    result["n"] = len(hits)
    result["unanswered"] = sum(r.answer is None for r in rows)
    if hits:
        result["score"] = _headline(result["Overall"])
    return result


def _headline(overall: dict) -> float:
    """VLMEvalKit's primary metric of a split table (`_choose_primary_metric_key`): the overall accuracy of the
    test split, else validation, val, dev, else the first split by name."""
    for split in ("test", "validation", "val", "dev"):
        if split in overall:
            return overall[split]
    return overall[sorted(overall)[0]]


# ------------------------------------------------------------------------------------------- yes / no

def process_punctuation(text: str) -> str:
    """VLMEvalKit's (vlmeval/smp/misc.py), with its quirk kept: the period rule replaces at most 32 periods
    (it passes re.UNICODE, 32, where `sub` takes the count)."""
    out = text
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, 32)


def yes_or_no(reply: str) -> str:
    words = process_punctuation(str(reply).lower()).split()
    if "yes" in words and "no" not in words:
        return "Yes"
    if "yes" not in words and "no" in words:
        return "No"
    return "Unknown"


def score_yes_no(name: str, rows, predictions: dict) -> dict:
    """Yes / no (see the module docstring); a row without an answer is a miss."""
    marked = [(r, yes_or_no(predictions[r.index])) for r in rows]
    if "AMBER" in name:
        marked = [(r, e, float(r.answer is not None and r.answer.lower() == e.lower())) for r, e in marked]
    else:
        marked = [(r, e, float(r.answer == e)) for r, e in marked]
    if not marked:
        result = {}
    elif "MME" in name:
        result = _mme(marked)
    elif "Hallusion" in name:
        result = _hallusion(marked)
    elif "POPE" in name:
        result = _pope(marked)
    else:
        result = {"Overall": 100 * sum(s for *_, s in marked) / len(marked)}
        for group in ("category", "l2-category"):
            for v in sorted({r.text(group) for r, *_ in marked if r.text(group) is not None}):
                sub = [s for r, _, s in marked if r.text(group) == v]
                result[v] = 100 * sum(sub) / len(sub)
        result["score"] = result["Overall"]
    result["n"] = len(marked)
    result["unanswered"] = sum(r.answer is None for r in rows)
    return result


def _hallusion(marked) -> dict:
    def part(index: str, k: int) -> str:
        return index.split("_")[k]

    def acc(sub, key=None):
        if key is None:
            return 100 * sum(s for *_, s in sub) / len(sub)
        groups = defaultdict(list)
        for r, _, s in sub:
            groups[key(r)].append(s)
        return 100 * sum(all(v) for v in groups.values()) / len(groups)

    figure = lambda r: f"{r.text('l2-category')}_{part(r.index, 3)}_{part(r.index, 4)}"  # noqa: E731
    question = lambda r: f"{r.text('l2-category')}_{part(r.index, 3)}_{part(r.index, 5)}"  # noqa: E731
    out = {"Overall": {"aAcc": acc(marked), "fAcc": acc(marked, figure), "qAcc": acc(marked, question)}}
    for group in ("category", "l2-category"):
        for v in sorted({r.text(group) for r, *_ in marked if r.text(group) is not None}):
            sub = [m for m in marked if m[0].text(group) == v]
            out[v] = {"aAcc": acc(sub), "fAcc": acc(sub, figure), "qAcc": acc(sub, question)}
    out["score"] = out["Overall"]["aAcc"]
    return out


def _pope(marked) -> dict:
    """`POPE_rating`: a row of several comma-separated categories counts once per category, overall too."""
    def f1(sub):
        tp = sum(r.answer == "Yes" and e == "Yes" for r, e, _ in sub)
        fp = sum(r.answer != "Yes" and e == "Yes" for r, e, _ in sub)
        fn = sum(r.answer == "Yes" and e != "Yes" for r, e, _ in sub)
        precision = tp / (tp + fp) if tp + fp else 0
        recall = tp / (tp + fn) if tp + fn else 0
        f = 2 * precision * recall / (precision + recall) if precision + recall else 0
        return {"F1": 100 * f, "acc": 100 * sum(s for *_, s in sub) / len(sub), "precision": 100 * precision,
                "recall": 100 * recall}

    exploded = [(c, m) for m in marked
                for c in (m[0].text("category").split(",") if m[0].text("category") is not None else [None])]
    out = {"Overall": f1([m for _, m in exploded])}
    for c in sorted({c for c, _ in exploded if c is not None}):
        out[c] = f1([m for k, m in exploded if k == c])
    out["score"] = out["Overall"]["F1"]
    return out


def _mme(marked) -> dict:
    stats = defaultdict(lambda: defaultdict(list))
    for r, _, s in marked:
        stats[r.text("category")][r.text("image_path")].append(s)

    def acc(cat, plus=False):
        values = [v[0] * v[1] for v in stats[cat].values()] if plus else [x for v in stats[cat].values() for x in v]
        return 100 * sum(values) / len(values)

    scores = {c: acc(c) + acc(c, plus=True) for c in stats}
    out = {g: sum(scores[c] for c in cats if c in scores) for g, cats in MME_GROUPS.items()}
    out.update(scores)
    out["score"] = out["perception"] + out["reasoning"]
    return out


# ------------------------------------------------------------------------------------------- OCRBench

def score_ocrbench(rows, predictions: dict) -> dict:
    points = {c: 0 for cats in OCRBENCH_GROUPS.values() for c in cats}
    for r in rows:
        predict = str(predictions[r.index])
        answers = ocrbench_answers(r)
        category = r.text("category")
        for a in answers:
            a = str(a)
            if category == "Handwritten Mathematical Expression Recognition":
                hit = a.strip().replace("\n", " ").replace(" ", "") in predict.strip().replace("\n", " ").replace(" ", "")
            else:
                hit = a.lower().strip().replace("\n", " ") in predict.lower().strip().replace("\n", " ")
            if hit:
                points[category] = points.get(category, 0) + 1
                break
    out = {g: sum(points.get(c, 0) for c in cats) for g, cats in OCRBENCH_GROUPS.items()}
    out["Final Score"] = sum(out.values())
    out["Final Score Norm"] = out["Final Score"] / 10
    out["score"] = out["Final Score Norm"]
    out["n"] = len(rows)
    return out


def ocrbench_answers(row) -> list[str]:
    """A row's answers: its `answer` field, a Python list of strings (ValueError otherwise)."""
    try:
        answers = ast.literal_eval(row.answer or "")
    except (ValueError, SyntaxError):
        answers = None
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise ValueError(f"line {row.line}, column answer: expected a list of strings as OCRBench writes it "
                         f"(['...']), got {row.answer!r:.60}")
    return answers


# ------------------------------------------------------------------------------------------- dispatch

JUDGED = ("MMVet", "MathVista", "LLaVABench", "MathVision", "MathVerse")  # free-form: a judge model decides


def check_rows(name: str, kind: str, rows) -> None:
    """What the scorer of `name` needs of the rows, checked before any work (a ValueError naming the line):
    OCRBench's answers are lists; MME's images carry two questions each; HallusionBench's indices hold set,
    figure and question; a circular benchmark's indices are integers."""
    if name.startswith("OCRBench"):
        for r in rows:
            ocrbench_answers(r)
    elif kind == "Y/N" and "MME" in name:
        if any(r.text("image_path") is None for r in rows):
            raise ValueError("MME is scored per image: every row needs its \"image_path\"")
        count = defaultdict(list)
        for r in rows:
            count[(r.text("category"), r.text("image_path"))].append(r.line)
        for (category, image), lines in count.items():
            if len(lines) != 2:
                raise ValueError(f"line {lines[0]}: MME scores an image by its two questions; {image!r} "
                                 f"({category}) has {len(lines)}")
    elif kind == "Y/N" and "Hallusion" in name:
        for r in rows:
            if len(r.index.split("_")) < 6:
                raise ValueError(f"line {r.line}, column index: HallusionBench's indices hold category, set, figure "
                                 f"and question (a_b_c_set_figure_question), got {r.index!r}")
    if kind == "MCQ" and is_circular(name):
        for r in rows:
            for column in ("index", "g_index"):
                value = r.text(column)
                if value is not None and not re.fullmatch(r"-?[0-9]+", value):
                    raise ValueError(f"line {r.line}, column {column}: a circular benchmark's rows are grouped by "
                                     f"integer indices, got {value!r}")


def score(name: str, kind: str, rows, predictions: dict) -> dict | None:
    """The benchmark's scores, or None where VLMEvalKit needs a judge model for it. The replies are scored as
    VLMEvalKit reads them back from the prediction file (`benchmark_tsv.read_back`: "" and "None" are "nan")."""
    from points.io.benchmark_tsv import read_back

    if not name.startswith("OCRBench") and kind not in ("MCQ", "Y/N"):
        return None
    keys = [r.index for r in rows]
    predictions = dict(zip(keys, read_back([predictions[k] for k in keys])))
    if name.startswith("OCRBench"):
        return score_ocrbench(rows, predictions)
    if kind == "MCQ":
        return score_mcq(name, rows, predictions)
    if kind == "Y/N":
        return score_yes_no(name, rows, predictions)
    return None
