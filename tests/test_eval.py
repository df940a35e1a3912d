"""`points eval`: VLMEvalKit's benchmark TSVs read as its pandas reads them (held to pandas itself), the POINTS
wrapper's prompts and pixel bounds, the scorers on hand-built predictions whose scores were worked out by hand
(in each test's comments), and the command end to end on the tiny model: each prediction the pipeline's reply
to the wrapper's question, the prediction file as pandas reads it, the report and --compare. The TSVs are
built here in VLMEvalKit's format; nothing is downloaded."""

import base64
import csv
import io
import json

import pandas as pd
import pytest
from PIL import Image

from points.io.benchmark_tsv import BenchmarkFileError, Row, read_tsv
from points.tooling import evaluate, scorers, vlmeval

HEADER = ["index", "image", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "split"]


def _b64(color, size=(60, 40), fmt="PNG", mode="RGB") -> str:
    b = io.BytesIO()
    Image.new(mode, size, color).save(b, format=fmt)
    return base64.b64encode(b.getvalue()).decode()


def _write(path, rows, header=HEADER):
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f, delimiter="\t", lineterminator="\n").writerows([header, *rows])
    return path


def _row(index, answer=None, category=None, split="dev", **fields) -> Row:
    return Row(str(index), 2, {"index": index, "answer": answer, "category": category, "split": split} | fields)


def test_rows_read_as_vlmevalkit_s_pandas_reads_them(tmp_path):
    """Every field against pandas.read_csv(sep="\\t") itself: missing values ("", NA, None, null, nan), a column
    of numbers with a gap (floats: "1" is "1.0"), a column of whole numbers (ints), text with tabs and line
    breaks (quoted), an image shared by reference and a list of images."""
    red, blue = _b64("red"), _b64("blue")
    rows = [["0", red, "Line one\nline two\twith a tab", "None", "1", "x", "NA", "0.5", "A", "c1", "l1", "dev"],
            ["1", "0", "Quote \"inside\"", "", "2", "null", "z", "1.5", "B", "c1", "l1", "dev"],
            ["2", str([red, blue]), "nan", "A hint", "", "y", "w", "2", "C", "c2", "l1", "test"]]
    path = _write(tmp_path / "t.tsv", rows)
    ours = read_tsv(path)
    theirs = pd.read_csv(path, sep="\t")
    for r, (_, line) in zip(ours, theirs.iterrows()):
        for column in HEADER:
            if column == "image":
                continue
            value = line[column]
            assert r.text(column) == (None if pd.isna(value) else str(value)), (r.index, column)
    assert [r.text("A") for r in ours] == ["1.0", "2.0", None]  # (pandas: floats, where one is missing)
    assert ours[0].options == {"A": "1.0", "B": "x", "D": "0.5"} and ours[0].hint is None
    assert ours[1].images() == ours[0].images() == [base64.b64decode(red)]
    assert ours[2].images() == [base64.b64decode(red), base64.b64decode(blue)] and ours[2].question == ""


@pytest.mark.parametrize("rows, header, message", [
    ([["0", "x"]], ["idx", "question"], "a header line with an \"index\" column"),
    ([["0", "q"], ["0", "r"]], ["index", "question"], "line 3, column index: '0' already used on line 2"),
    ([["0", "7", "q"]], ["index", "image", "question"], "line 2, column image: '7' names no row that holds an image"),
    ([["0", "q", "extra"]], ["index", "question"], "line 2: 3 fields, the header has 2"),
])
def test_bad_files_are_named_with_line_and_column(tmp_path, rows, header, message):
    path = _write(tmp_path / "bad.tsv", rows, header)
    with pytest.raises(BenchmarkFileError, match="^--data " + str(path).replace("/", "/") + ".*"):
        read_tsv(path)
    with pytest.raises(BenchmarkFileError) as e:
        read_tsv(path)
    assert message in str(e.value)


def test_the_wrapper_s_prompts_and_pixel_bounds():
    png = base64.b64encode(base64.b64decode(_b64((10, 20, 30), mode="RGBA"))).decode()
    mcq = Row("5", 2, {"question": "What is shown?<image 1>", "hint": "Look.", "A": "a cat", "B": "a dog", "C": None,
                       "D": "a fish"}, [png, _b64("blue")])
    text, images = vlmeval.ask(mcq, vlmeval.BENCHMARKS["MMStar"])
    assert text == ("Look.\nWhat is shown?\n\nA. a cat\nB. a dog\nD. a fish\n"
                    "Answer with the option's letter from the given choices directly.")
    # only the first image, as VLMEvalKit writes it to "5.png": RGBA converted to RGB, saved as PNG (the same
    # pixels); a file with an image_path column names the file, and its suffix the format
    expected = io.BytesIO()
    Image.open(io.BytesIO(base64.b64decode(png))).convert("RGB").save(expected, format="PNG")
    assert images == [expected.getvalue()] and images[0][:4] == b"\x89PNG"
    named = Row("5", 2, dict(mcq.fields, image_path="5.jpg"), mcq.image_data)
    assert vlmeval.ask(named, vlmeval.BENCHMARKS["MMStar"])[1][0][:2] == b"\xff\xd8"
    cn = Row("6", 2, {"question": "这是什么？", "A": "猫", "B": "狗"})
    assert vlmeval.ask(cn, vlmeval.BENCHMARKS["MMBench_TEST_CN_V11"])[0] == "这是什么？\nA. 猫\nB. 狗\n请直接回答选项字母。"
    open_q = Row("7", 2, {"question": "How many?"})
    assert vlmeval.ask(open_q, vlmeval.BENCHMARKS["MMMU_DEV_VAL"])[0] == "How many?\nAnswer the question directly."
    yn = Row("8", 2, {"question": "Is it red?"})
    assert vlmeval.ask(yn, vlmeval.BENCHMARKS["HallusionBench"])[0] == (
        "Is it red? Please answer yes or no. Answer the question using a single word or phrase.")
    assert vlmeval.ask(yn, vlmeval.BENCHMARKS["MMVet"])[0] == "Is it red? Answer this question in detail."
    assert vlmeval.ask(yn, vlmeval.BENCHMARKS["TextVQA_VAL"])[0] == (
        "Is it red?\nAnswer the question using a single word or phrase.")
    assert vlmeval.ask(yn, vlmeval.BENCHMARKS["OCRBench"])[0] == "Is it red?"
    bounds = lambda name: {k: v for k, v in vlmeval.messages(mcq, vlmeval.BENCHMARKS[name])[0]["content"][0].items()
                           if k.endswith("pixels")}  # noqa: E731
    assert bounds("MMMU_DEV_VAL") == {"min_pixels": 1280 * 28 * 28, "max_pixels": 16384 * 28 * 28}
    assert bounds("OCRBench") == {"min_pixels": 280 * 280} and bounds("MathVista_MINI") == {"min_pixels": 56 * 56}
    assert bounds("HallusionBench") == bounds("MMBench_TEST_EN_V11") == {"min_pixels": 1280 * 28 * 28}
    assert bounds("AI2D_TEST") == bounds("MMStar") == {"min_pixels": 840 * 840}
    # a name the table lacks: VLMEvalKit's default, MCQ (VQA with "openended" in it); --kind overrides
    assert vlmeval.benchmark("MyBench") == vlmeval.Benchmark("MyBench", "MCQ")
    assert vlmeval.benchmark("My_OpenEnded") == vlmeval.Benchmark("My_OpenEnded", "VQA")
    assert vlmeval.benchmark("MyBench", "Y/N") == vlmeval.Benchmark("MyBench", "Y/N")
    assert vlmeval.ask(yn, vlmeval.benchmark("MyBench"))[0] == "Is it red?\nAnswer the question directly."
    assert vlmeval.ask(yn, vlmeval.BENCHMARKS["AMBER"])[0] == "Is it red?\nPlease answer yes or no."
    for bad in ("", "a/b", " x"):
        with pytest.raises(ValueError, match="^--benchmark "):
            vlmeval.benchmark(bad)


def test_multiple_choice_scores_worked_by_hand():
    options = {"A": "a cat", "B": "a dog", "C": "a bird", "D": "a fish"}
    rows = [_row(0, "A", "x", **options), _row(1, "B", "x", **options), _row(2, "C", "y", **options),
            _row(3, "D", "y", **options), _row(4, "A", "y", **options), _row(5, None, "y", split="test", **options)]
    replies = {"0": "A", "1": "The answer is B.", "2": "(C) a bird", "3": "a cat", "4": "I think A or B", "5": "A"}
    # 0: the letter; 1: one letter among the words; 2: "C" among the words; 3: no letter, the text of option A (a
    # miss: the answer is D); 4: two letters, no option's text: Z; 5 (split test): no answer, a miss -> dev 3 of 5
    result = scorers.score("MMStar", "MCQ", rows, replies)
    assert result["Overall"] == {"dev": 60.0, "test": 0.0} and result["score"] == 0.0  # (test first, as VLMEvalKit)
    assert result["category"] == {"x": {"dev": 100.0}, "y": {"dev": pytest.approx(100 / 3), "test": 0.0}}
    assert (result["n"], result["unanswered"]) == (6, 1)
    # an empty reply is read back from the prediction file as "nan", a numeric column typed ("007" -> "7")
    assert scorers.score("MMStar", "MCQ", [_row(0, "A", A="nan", B="x")], {"0": ""})["score"] == 100.0
    # MMBench: circular; question 0 in three rotations (the third wrong), question 1 in two (both right) -> 50
    rows = [_row(i, a, "x", **options) for i, a in ((0, "A"), (1_000_000, "B"), (2_000_000, "C"), (1, "D"),
                                                   (1_000_001, "A"))]
    replies = {"0": "A", "1000000": "B", "2000000": "A", "1": "D", "1000001": "A"}
    result = scorers.score("MMBench_DEV_EN_V11", "MCQ", rows, replies)
    assert (result["score"], result["n"]) == (50.0, 2)
    # MMMU: an open question becomes A = its answer, B = "Other Answers"
    # (an answer that is not one letter, "AB" too, counts as A)
    rows = [_row(0, "42"), _row(1, "42"), _row(2, "B", A="3", B="4"), _row(3, "AB", A="x", B="y")]
    result = scorers.score("MMMU_DEV_VAL", "MCQ", rows, {"0": "42", "1": "43", "2": "B", "3": "A"})
    assert result["score"] == 75.0
    # the headline of dev and validation: validation's (VLMEvalKit's primary metric), not their mean
    rows = [_row(0, "A", split="dev", A="x", B="y"), _row(1, "A", split="validation", A="x", B="y")]
    assert scorers.score("MMMU_DEV_VAL", "MCQ", rows, {"0": "A", "1": "B"})["score"] == 0.0


def test_yes_no_scores_worked_by_hand():
    rows = [_row(0, "Yes"), _row(1, "No"), _row(2, "No"), _row(3, "Yes")]
    replies = {"0": "Yes.", "1": "no, it is not", "2": "Yes and no", "3": "The answer is yes"}
    assert [scorers.yes_or_no(r) for r in replies.values()] == ["Yes", "No", "Unknown", "Yes"]
    assert scorers.score("AMBER_like", "Y/N", rows, replies)["score"] == 75.0
    # HallusionBench: set 0, (figure, question) = (0, 0) right, (1, 0) wrong, (0, 1) right: aAcc 2/3; figure 0's
    # two questions right, figure 1's one wrong: fAcc 1/2; question 0 wrong on figure 1, question 1 right: qAcc 1/2
    rows = [_row(f"a_b_c_0_{f}_{q}", "Yes", "chart", **{"l2-category": "VD"}) for f, q in ((0, 0), (1, 0), (0, 1))]
    result = scorers.score("HallusionBench", "Y/N", rows, {rows[0].index: "Yes", rows[1].index: "No",
                                                           rows[2].index: "yes"})
    assert result["Overall"] == {"aAcc": pytest.approx(200 / 3), "fAcc": 50.0, "qAcc": 50.0}
    assert result["chart"] == result["VD"] == result["Overall"]
    # POPE: (answer, reply) = (Yes, Yes) x2, (Yes, No), (No, Yes), (No, No), the first row in two categories: it
    # counts twice, overall too (VLMEvalKit explodes the categories first): tp 3, fp 1, fn 1 -> F1 3/4, acc 4/6
    pairs = [("Yes", "Yes"), ("Yes", "No"), ("No", "Yes"), ("No", "No"), ("Yes", "Yes")]
    rows = [_row(i, a, "adversarial,popular" if i == 0 else "adversarial") for i, (a, _) in enumerate(pairs)]
    result = scorers.score("POPE", "Y/N", rows, {str(i): p for i, (_, p) in enumerate(pairs)})
    assert result["Overall"]["F1"] == 75.0 and result["Overall"]["acc"] == pytest.approx(400 / 6)
    assert result["popular"]["acc"] == 100.0 and result["adversarial"]["F1"] == pytest.approx(200 / 3)
    # MME: OCR, image a, both right: 100 + 100; code_reasoning, image b, one of two: 50 + 0
    rows = [_row(0, "Yes", "OCR", image_path="a"), _row(1, "No", "OCR", image_path="a"),
            _row(2, "Yes", "code_reasoning", image_path="b"), _row(3, "No", "code_reasoning", image_path="b")]
    result = scorers.score("MME", "Y/N", rows, {"0": "Yes", "1": "No", "2": "Yes", "3": "Yes"})
    assert (result["perception"], result["reasoning"], result["score"]) == (200.0, 50.0, 250.0)


def test_ocrbench_score_worked_by_hand():
    rows = [_row(0, "['Hello']", "Regular Text Recognition"),
            _row(1, "['x ^ 2']", "Handwritten Mathematical Expression Recognition"),
            _row(2, "['42', 'forty two']", "Doc-oriented VQA"), _row(3, "['ABC']", "Key Information Extraction")]
    result = scorers.score("OCRBench", "VQA", rows, {"0": "hello world", "1": "x^2", "2": "Forty Two!", "3": "abd"})
    assert (result["Text Recognition"], result["Handwritten Mathematical Expression Recognition"],
            result["Doc-oriented VQA"], result["Key Information Extraction"]) == (1, 1, 1, 0)
    assert (result["Final Score"], result["score"]) == (3, 0.3)
    assert scorers.score("MMVet", "VQA", rows, {}) is None  # (a judge model's)


def test_points_eval_asks_each_row_as_the_wrapper_and_writes_vlmevalkit_s_files(e2e_dir, pipe, tmp_path, capsys):
    red, green = _b64("red", (50, 70)), _b64("green", (64, 48), fmt="JPEG")
    rows = [["0", red, "What colour?", "", "red", "blue", "", "", "A", "color", "perception", "dev"],
            ["1", "0", "And now?<image 1>", "Same picture.", "1", "2", "3", "", "B", "count", "perception", "dev"],
            ["2", str([green, red]), "Which one?", "", "left", "right", "", "", "", "spatial", "perception", "test"]]
    data = _write(tmp_path / "MMStar.tsv", rows)
    out = tmp_path / "out"
    args = ["--model", str(e2e_dir), "--data", str(data), "--output", str(out), "--max-new-tokens", "5",
            "--batch-size", "2"]
    assert evaluate.main(args) == 0
    capsys.readouterr()
    stem = out / "POINTSV15-Qwen-2.5-7B-Chat_MMStar"
    expected = {r.index: pipe.chat(vlmeval.messages(r, vlmeval.BENCHMARKS["MMStar"]), max_new_tokens=5)
                for r in read_tsv(data)}
    table = pd.read_csv(f"{stem}.tsv", sep="\t")  # (as VLMEvalKit loads a prediction file)
    assert list(table.columns) == [c for c in HEADER if c != "image"] + ["prediction"]
    assert {str(i): ("" if pd.isna(p) else p) for i, p in zip(table["index"], table["prediction"])} == expected
    report = json.loads((out / "POINTSV15-Qwen-2.5-7B-Chat_MMStar_score.json").read_text())
    hand = scorers.score("MMStar", "MCQ", read_tsv(data), expected)
    assert (report["score"], report["scores"], report["rows"], report["failed"]) == (hand["score"], hand, 3, 0)
    assert report["scores"]["n"] == 3 and report["scores"]["unanswered"] == 1
    assert report["command"] == "points eval " + " ".join(args)
    assert "| MMStar (MCQ) | dev, test |" in (out / "POINTSV15-Qwen-2.5-7B-Chat_MMStar_score.md").read_text()
    b = tmp_path / "b.json"
    b.write_text(json.dumps(report | {"score": report["score"] + 10, "quantize": "int8"}))
    assert evaluate.main(["--compare", str(out / "POINTSV15-Qwen-2.5-7B-Chat_MMStar_score.json"), str(b)]) == 0
    shown = capsys.readouterr().out
    assert "| score |" in shown and "+10.00 |" in shown and "int8" in shown
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"POINTSV15-Qwen-2.5-7B-Chat_MMStar{s}" for s in (".tsv", ".jsonl", "_score.json", "_score.md"))


def test_bad_eval_input_is_named_before_any_work(e2e_dir, tmp_path, capsys):
    data = _write(tmp_path / "Odd.tsv", [["0", "q"], ["0", "r"]], ["index", "question"])
    assert evaluate.main(["--model", str(e2e_dir), "--data", str(data), "--output", str(tmp_path / "o"),
                          "--kind", "VQA"]) == 2
    assert "line 3, column index: '0' already used on line 2" in capsys.readouterr().err
    assert evaluate.main(["--model", str(e2e_dir), "--data", str(data), "--output", str(tmp_path / "o"),
                          "--benchmark", ""]) == 2
    assert capsys.readouterr().err == "error: --benchmark '': expected a benchmark's name (VLMEvalKit's, e.g. MMStar)\n"
    plain = _write(tmp_path / "Plain.tsv", [["0", "q"]], ["index", "question"])
    ocr = _write(tmp_path / "OCRBench.tsv", [["0", _b64("red"), "q", "['ok'", "Doc-oriented VQA"]],
                 ["index", "image", "question", "answer", "category"])
    for data, message in ((plain, "no \"image\" column"), (ocr, "line 2, column answer: expected a list of strings")):
        assert evaluate.main(["--model", str(e2e_dir), "--data", str(data), "--output", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert evaluate.main(["--model", str(tmp_path), "--data", str(ocr), "--output", str(tmp_path / "o")]) == 2
    capsys.readouterr()
    (tmp_path / "w.json").write_text(json.dumps({"benchmark": "x", "score": 1, "scores": [1, 2]}))
    assert evaluate.main(["--compare", str(tmp_path / "w.json"), str(tmp_path / "w.json")]) == 2
    assert "not a points eval report" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_points_eval_resumes_from_its_journal_and_splits_across_torchrun(e2e_dir, pipe, tmp_path, capsys,
                                                                        monkeypatch):
    """Ctrl-C after the first row keeps its journal; the same command then takes that row from it as it is (its
    record, edited meanwhile to "A", reaches the prediction file) and asks only the others; two processes under
    torchrun write what one process writes."""
    import os
    import subprocess
    import sys

    from points.tooling import run

    rows = [[str(i), _b64((40 * i, 90, 160)), f"Figure {i}?", "", "a chart", "a photo", "", "", "AB"[i % 2], "c", "l",
             "dev"] for i in range(4)]
    data = _write(tmp_path / "MMStar.tsv", rows)
    stem = "POINTSV15-Qwen-2.5-7B-Chat_MMStar"
    one, two, resumed = tmp_path / "one", tmp_path / "two", tmp_path / "resumed"
    args = ["--model", str(e2e_dir), "--data", str(data), "--max-new-tokens", "3", "--batch-size", "2"]
    assert evaluate.main([*args, "--output", str(one)]) == 0
    real = run.process

    def first_row_then_ctrl_c(pipe, items, gen, journal, progress, preset=None, build=None):
        real(pipe, items[:1], gen, journal, progress, preset, build)
        raise KeyboardInterrupt

    monkeypatch.setattr(run, "process", first_row_then_ctrl_c)
    assert evaluate.main([*args, "--output", str(resumed)]) == 130
    monkeypatch.setattr(run, "process", real)
    journal = resumed / f"{stem}.jsonl.journal.0"
    assert [json.loads(line)["id"] for line in journal.read_text().splitlines()] == ["0"]
    journal.write_text(json.dumps({"id": "0", "reply": "A"}) + "\n")
    capsys.readouterr()
    assert evaluate.main([*args, "--output", str(resumed)]) == 0
    assert "(1 from an earlier run" in capsys.readouterr().err
    mine, theirs = pd.read_csv(resumed / f"{stem}.tsv", sep="\t"), pd.read_csv(one / f"{stem}.tsv", sep="\t")
    assert str(mine["prediction"][0]) == "A" and list(mine["prediction"][1:]) == list(theirs["prediction"][1:])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "points",
           "eval", *args, "--output", str(two)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert (two / f"{stem}.tsv").read_text() == (one / f"{stem}.tsv").read_text()
    assert json.loads((two / f"{stem}_score.json").read_text())["scores"] == \
        json.loads((one / f"{stem}_score.json").read_text())["scores"]
