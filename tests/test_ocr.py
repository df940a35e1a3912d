"""`points ocr`: PDFs (written here by pillow, and by hand for the encrypted and the empty one), images and a
multi-frame TIFF into one Markdown file per document and a line per page, each page's text the one the
pipeline gives that rendered page alone; --pages; a document that cannot be read is its own error; outputs
that would replace an input refused before work; resume after kill -9; two processes under torchrun equal to
one; the repetition guard stopping a model made to loop (its blocks zeroed: each token repeats itself) while it
decodes, then the page retried at twice the pixels, both attempts recorded.

The model is a random tiny POINTS-Reader in its released layout with the real Qwen2.5 vocabulary."""

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file

import points
from points.io import documents
from points.io.documents import Document, DocumentError, Pages, Resolution, pages_of, select_pages
from points.io.progress import Progress
from points.model.family import READER, READER_PROMPT
from points.runtime.generation import GenerationConfig, GenerationError
from points.runtime.loops import LoopGuard
from points.tooling import ocr, synthetic

NEW = 6
MAX_PIXELS = 40_000  # (a page of about 50 image tokens)


@pytest.fixture(scope="module")
def reader_dir(tmp_path_factory, tokenizer_json):
    d = synthetic.write_checkpoint(tmp_path_factory.mktemp("reader") / "reader", "reader-tiny", dtype=torch.float32,
                                   tokenizer="bytes")
    shutil.copy(tokenizer_json, d / "tokenizer.json")
    return d


@pytest.fixture(scope="module")
def reader(reader_dir):
    return points.load(reader_dir)


@pytest.fixture(scope="module")
def looper_dir(reader_dir, tmp_path_factory):
    """The same checkpoint with every block's output projections zeroed: the hidden state is the token's own
    embedding, and the tied head then scores that very token highest, so greedy decoding repeats it."""
    d = tmp_path_factory.mktemp("looper") / "looper"
    shutil.copytree(reader_dir, d)
    for f in d.glob("*.safetensors"):
        t = load_file(f)
        save_file({k: torch.zeros_like(v) if k.endswith(("o_proj.weight", "down_proj.weight")) else v
                   for k, v in t.items()}, f, metadata={"format": "pt"})
    return d


def _page(i: int, size=(200, 260)) -> Image.Image:
    im = Image.new("RGB", size, (255, 255 - 40 * i, 200))
    ImageDraw.Draw(im).text((20, 20 + 10 * i), f"Page {i + 1}: text", fill="black")
    return im


def _pdf(objects: list[bytes], trailer: bytes = b"") -> bytes:
    """A PDF written out by hand: the objects, an exact cross-reference table, the trailer."""
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for i, o in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + o + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R " % (len(objects) + 1) + trailer + b">>\nstartxref\n%d\n%%%%EOF\n" % xref
    return bytes(out)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """doc.pdf (3 pages, 200 x 260 points), scans/ (a.png, b.tif of two frames, sub/c.jpg, a hidden file and a
    note that folders skip), and five documents that cannot be read: bad.pdf (not a PDF), enc.pdf (encrypted),
    empty.pdf (no pages), broken.png (not an image), notes.txt (neither by its name)."""
    d = tmp_path_factory.mktemp("docs")
    _page(0).save(d / "doc.pdf", save_all=True, append_images=[_page(1), _page(2, (260, 200))], resolution=72)
    (d / "scans" / "sub").mkdir(parents=True)
    _page(3, (150, 120)).save(d / "scans" / "a.png")
    _page(4, (90, 140)).save(d / "scans" / "b.tif", save_all=True, append_images=[_page(5, (140, 90))])
    _page(6, (120, 120)).save(d / "scans" / "sub" / "c.jpg")
    (d / "scans" / "README.txt").write_text("not a document")
    (d / "scans" / ".hidden.png").write_bytes(b"skipped")
    (d / "bad.pdf").write_bytes(b"%PDF-1.4 not really")
    catalog = [b"<< /Type /Catalog /Pages 2 0 R >>"]
    (d / "enc.pdf").write_bytes(_pdf(catalog + [
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>", b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 200] >>",
        b"<< /Filter /Standard /V 1 /R 2 /O <" + b"11" * 32 + b"> /U <" + b"22" * 32 + b"> /P -4 >>"],
        b"/Encrypt 4 0 R /ID [<0123456789abcdef0123456789abcdef> <0123456789abcdef0123456789abcdef>] "))
    (d / "empty.pdf").write_bytes(_pdf(catalog + [b"<< /Type /Pages /Kids [] /Count 0 >>"]))
    (d / "broken.png").write_bytes(b"\x89PNG not really")
    (d / "notes.txt").write_text("hello")
    return d


def _greedy(*extra):
    return ["--max-new-tokens", str(NEW), "--temperature", "0", "--max-pixels", str(MAX_PIXELS), *extra]


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _alone(reader, path, kind, page, resolution=None, **gen):
    """Page `page` of the file rendered as points ocr renders it, asked alone through the pipeline."""
    resolution = resolution or Resolution(documents.DPI, MAX_PIXELS, reader.processor.min_pixels,
                                          reader.processor.max_pixels)
    with Pages(Document(path, "x", kind)) as pages:
        image = pages.image(page, resolution)
    settings = ocr.reader_defaults()[1] | {"max_new_tokens": NEW, "temperature": 0.0} | gen
    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": READER_PROMPT}]}]
    return reader.chat(messages, **settings), image.size


def test_documents_become_markdown_each_page_as_the_pipeline_reads_it_alone(reader_dir, reader, files, tmp_path,
                                                                            capsys):
    out = tmp_path / "out"
    inputs = [files / n for n in ("doc.pdf", "scans", "bad.pdf", "enc.pdf", "empty.pdf", "broken.png", "notes.txt")]
    assert ocr.main(["--model", str(reader_dir), *map(str, inputs), "--output", str(out), "--batch-size", "3",
                     *_greedy()]) == 0
    err = capsys.readouterr().err
    records = _read(out / "pages.jsonl")
    assert [r["id"] for r in records] == ["doc#page1", "doc#page2", "doc#page3", "a#page1", "b#page1", "b#page2",
                                          "sub/c#page1", "bad#document", "enc#document", "empty#document",
                                          "broken#document", "notes#document"]
    pages = [(files / "doc.pdf", "pdf", 1), (files / "doc.pdf", "pdf", 2), (files / "doc.pdf", "pdf", 3),
             (files / "scans" / "a.png", "image", 1), (files / "scans" / "b.tif", "image", 1),
             (files / "scans" / "b.tif", "image", 2), (files / "scans" / "sub" / "c.jpg", "image", 1)]
    for r, (path, kind, n) in zip(records, pages):
        text, size = _alone(reader, path, kind, n)
        assert (r["document"], r["page"], r["text"], (r["width"], r["height"])) == (str(path), n, text, size), r["id"]
        assert r["status"] in ("ok", "length") and 1 <= r["tokens"] <= NEW and len(r["attempts"]) == 1
    assert records[0]["width"] * records[0]["height"] <= MAX_PIXELS < 2 * records[0]["width"] * records[0]["height"]
    assert records[2]["width"] > records[2]["height"]  # (the landscape page)
    assert (records[3]["width"], records[3]["height"]) == (150, 120)  # (an image under the bound: as it is)
    reasons = {r["id"]: r["error"] for r in records[7:]}
    assert all(r["status"] == "error" and r["page"] is None and "text" not in r for r in records[7:])
    assert reasons["bad#document"].startswith(f"{files / 'bad.pdf'}: not a readable PDF (damaged; pdfium: ")
    assert reasons["enc#document"] == f"{files / 'enc.pdf'}: encrypted (it needs a password; decrypt it first, " \
                                      "e.g. qpdf --decrypt)"
    assert reasons["empty#document"].startswith(f"{files / 'empty.pdf'}: a PDF with no pages")
    assert reasons["broken#document"].startswith(f"{files / 'broken.png'}: not a readable image")
    assert reasons["notes#document"].startswith(f"{files / 'notes.txt'}: not a PDF or an image by its name")
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == ["a.md", "b.md", "doc.md", "pages.jsonl", "sub",
                                                                       "sub/c.md"]
    marker = {"ok": "", "length": ": stopped at max_new_tokens: the text may be cut"}
    assert (out / "doc.md").read_text() == "".join(
        ("\n" if i else "") + f"<!-- page {i + 1}{marker[r['status']]} -->\n\n{r['text'].strip()}\n"
        for i, r in enumerate(records[:3]))
    assert (out / "b.md").read_text().count("<!-- page ") == 2
    assert "points ocr: 4 of 9 documents" in err and "(5 could not be read)" in err


def test_pages_are_chosen_per_document(reader_dir, files, tmp_path, capsys):
    out = tmp_path / "out"
    assert ocr.main(["--model", str(reader_dir), str(files / "doc.pdf"), str(files / "scans" / "a.png"),
                     "--output", str(out), "--pages", "2-3,9", *_greedy()]) == 0
    assert [(r["id"], r["page"]) for r in _read(out / "pages.jsonl")] == [("doc#page2", 2), ("doc#page3", 3),
                                                                         ("a#document", None)]
    assert (out / "doc.md").read_text().startswith("<!-- page 2")
    err = capsys.readouterr().err
    assert f"{files / 'doc.pdf'}: 3 page(s); --pages 2-3,9 beyond them skipped" in err
    assert f"{files / 'scans' / 'a.png'}: --pages 2-3,9: the document has 1 page(s), none of those" in err


def test_what_folders_hold_links_odd_names_animations_and_bombs(reader_dir, tmp_path, capsys):
    """A link to a sibling is read once, a link to nowhere and a loop of links are their documents' errors, a
    file name that is not UTF-8 is written escaped, an animated GIF is one page (a TIFF's frames are pages), an
    image declaring more pixels than the processor's limit is refused before decoding, and two folders'
    files of one name are named by their folders."""
    d1, d2 = tmp_path / "in" / "d1", tmp_path / "in" / "d2"
    d1.mkdir(parents=True)
    d2.mkdir()
    _page(0).save(d1 / "a.png")
    _page(1).save(d2 / "a.png")
    (d1 / "latest.png").symlink_to(d1 / "a.png")
    (d1 / "gone.pdf").symlink_to(d1 / "missing.pdf")
    (d1 / "loop.pdf").symlink_to(d1 / "loop.pdf")
    frames = [_page(i, (80, 60)) for i in range(3)]
    frames[0].save(d2 / "anim.gif", save_all=True, append_images=frames[1:])
    Image.new("1", (10_000, 9_000)).save(d2 / "huge.png")  # (90 million pixels, 1 bit each: small to write)
    odd = os.fsencode(d2) + b"/caf\xe9.png"
    _page(2).save(odd)
    out = tmp_path / "out"
    assert ocr.main(["--model", str(reader_dir), str(d1), str(d2), "--output", str(out), *_greedy()]) == 0
    records = {r["id"]: r for r in _read(out / "pages.jsonl")}
    assert sorted(records) == sorted(["d1/a#page1", "d2/a#page1", "gone#document", "loop#document", "anim#page1",
                                      "huge#page1", os.fsdecode(b"caf\xe9") + "#page1"])
    assert records["gone#document"]["error"].startswith(f"{d1 / 'gone.pdf'}: cannot be read")
    assert records["loop#document"]["error"].startswith(f"{d1 / 'loop.pdf'}: cannot be read")
    assert records["huge#page1"]["error"] == (f"{d2 / 'huge.png'}: page 1 declares 10000x9000 = 90,000,000 pixels, "
                                             "over the limit of 89,478,485 pixels (a decompression bomb?); refused "
                                             "before decoding")
    assert records["anim#page1"]["status"] != "error" and (out / "d1" / "a.md").exists() and (out / "d2" / "a.md").exists()
    assert os.path.exists(os.fsencode(out) + b"/caf\xe9.md")


def test_markdown_files_that_cannot_be_written_are_refused_before_work(reader_dir, tmp_path, capsys):
    folder = tmp_path / "in"
    (folder / "a.md").mkdir(parents=True)
    _page(0).save(folder / "a.png")
    _page(1).save(folder / "a.md" / "x.png")
    (folder / "pages.jsonl").mkdir()
    _page(2).save(folder / "pages.jsonl" / "y.png")
    out = tmp_path / "out"
    assert ocr.main(["--model", str(reader_dir), str(folder / "a.png"), str(folder / "a.md"), "--output", str(out),
                     *_greedy()]) == 0  # (given apart: a.md and x.md, no clash)
    capsys.readouterr()
    for inputs, reason in [([folder], f"{out / 'a.md'} is {folder / 'a.png'}'s Markdown file"),
                           ([folder / "pages.jsonl"], None)]:
        shutil.rmtree(out, ignore_errors=True)
        code = ocr.main(["--model", str(reader_dir), *map(str, inputs), "--output", str(out), *_greedy()])
        err = capsys.readouterr().err
        if reason is None:
            assert code == 0  # (a folder given by itself: its files are named under it)
            continue
        assert code == 2 and reason in err and err.count("\n") == 1, err
        assert not out.exists() or not any(out.iterdir())


def test_page_selections_and_resolutions():
    assert select_pages("1-3,7") == [1, 2, 3, 7] and select_pages("7, 2") == [2, 7] and select_pages(None) is None
    assert pages_of(select_pages("2,5-"), 7) == [2, 5, 6, 7] and pages_of(select_pages("4-"), 2) == []
    assert pages_of(None, 3) == [1, 2, 3] and pages_of([1, 9], 3) == [1]
    for bad in ("0", "3-1", "a", "", "1,,2", "-2", "2-x", "1_0", "+1", "1-10000000000"):
        with pytest.raises(ValueError, match=r"^--pages "):
            select_pages(bad)
    assert ocr.READER_DECODING == dict(READER.presets["reader"].generation)  # (--help's copy)
    r = Resolution(200, 1000, 100, 3000)
    assert r.higher(1000) == Resolution(200 * 2 ** 0.5, 2000, 100, 3000, 2 ** 0.5)
    assert r.higher(2000).max_pixels == 3000 and r.higher(2500) is None  # (less than 1.25x left: none)
    # a Letter page at 200 dpi, within a bound, and raised to a minimum
    assert documents.fit_dpi(612, 792, Resolution(200, 10 ** 8, 1, 10 ** 8)) == 200
    dpi = documents.fit_dpi(612, 792, Resolution(200, 1_000_000, 1, 10 ** 8))
    assert 612 * 792 * (dpi / 72) ** 2 <= 1_000_000 and dpi > 0.99 * 72 * (1_000_000 / (612 * 792)) ** 0.5
    assert 612 * 792 * (documents.fit_dpi(612, 792, Resolution(10, 10 ** 8, 500_000, 10 ** 8)) / 72) ** 2 >= 500_000


def test_bad_arguments_and_outputs_that_would_replace_an_input_are_refused_before_work(reader_dir, files, tmp_path,
                                                                                     capsys):
    model = ["--model", str(reader_dir)]
    (tmp_path / "taken").write_text("a file")
    (tmp_path / "bare").mkdir()
    cases = [([str(files / "scans"), "--output", str(files / "scans")], "is the input directory"),
             ([str(files / "doc.pdf"), "--output", str(tmp_path / "taken")], "is a file"),
             ([str(files / "nowhere.pdf"), "--output", str(tmp_path / "o")], "no such file or folder"),
             ([str(files / "scans" / "sub" / "c.jpg"), str(tmp_path / "bare"), "--output", str(tmp_path / "o")],
              "a folder with no PDF or image in it"),
             ([str(files / "doc.pdf"), "--output", str(tmp_path / "o"), "--max-pixels", "10"],
              "--max-pixels 10: expected a value from the model's min_pixels")]
    for args, reason in cases:
        assert ocr.main(model + args) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and reason in err and err.count("\n") == 1, err
    for args, reason in [(["--pages", "3-1"], "--pages 3-1: '3-1' is not a page"), (["--dpi", "0"], "--dpi 0.0"),
                         (["--repetition-guard", "3"], "--repetition-guard 3: expected 0 (off) or an integer >= 6"),
                         (["--prompt", " "], "--prompt: expected some text")]:
        with pytest.raises(SystemExit) as e:
            ocr.main(model + [str(files / "doc.pdf"), "--output", str(tmp_path / "o"), *args])
        assert e.value.code == 2 and reason in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare", "taken"]
    assert sorted(p.name for p in (files / "scans").iterdir()) == [".hidden.png", "README.txt", "a.png", "b.tif", "sub"]


def test_kill_9_then_the_same_command_resumes_without_redoing_a_page(reader_dir, tmp_path, capsys):
    pdf = tmp_path / "long.pdf"
    _page(0).save(pdf, save_all=True, append_images=[_page(i % 7) for i in range(1, 12)], resolution=72)
    out = tmp_path / "out"
    args = ["--model", str(reader_dir), str(pdf), "--output", str(out), "--batch-size", "1", *_greedy()]
    journal = out / "pages.jsonl.journal.0"
    proc = subprocess.Popen([sys.executable, "-m", "points", "ocr", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and len(ocr.read_records(journal)) < 3:
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = {r["id"]: r for r in ocr.read_records(journal)}
    assert 3 <= len(kept) < 12 and not (out / "pages.jsonl").exists() and not (out / "long.md").exists()
    assert ocr.main(args) == 0
    assert f"({len(kept)} from an earlier run" in capsys.readouterr().err
    records = _read(out / "pages.jsonl")
    assert [r["page"] for r in records] == list(range(1, 13))
    assert all(records[r["page"] - 1] == r for r in kept.values())  # (journaled pages are not run again)
    fresh = tmp_path / "fresh"
    assert ocr.main([*args[:3], "--output", str(fresh), *args[5:]]) == 0
    assert [r["text"] for r in _read(fresh / "pages.jsonl")] == [r["text"] for r in records]
    assert (fresh / "long.md").read_text() == (out / "long.md").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["long.md", "pages.jsonl"]


def test_torchrun_two_processes_equal_one(reader_dir, files, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    args = ["--model", str(reader_dir), str(files / "doc.pdf"), str(files / "scans"), "--batch-size", "2", *_greedy()]
    assert ocr.main([*args, "--output", str(one)]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "points",
           "ocr", *args, "--output", str(two)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("seconds", "attempts")} for r in rs]  # noqa: E731
    assert strip(_read(two / "pages.jsonl")) == strip(_read(one / "pages.jsonl"))
    for md in ("doc.md", "a.md", "b.md", "sub/c.md"):
        assert (two / md).read_text() == (one / md).read_text()


def test_a_page_that_loops_is_stopped_while_decoding_and_retried_at_twice_the_pixels(looper_dir, files, tmp_path):
    out = tmp_path / "out"
    args = ["--model", str(looper_dir), str(files / "doc.pdf"), "--pages", "1", "--output", str(out),
            "--max-new-tokens", "200", "--temperature", "0", "--max-pixels", str(MAX_PIXELS)]
    assert ocr.main([*args, "--repetition-guard", "24"]) == 0
    [r] = _read(out / "pages.jsonl")
    first, second = r["attempts"]
    assert r["status"] == first["status"] == second["status"] == "repetition"
    assert first["tokens"] == second["tokens"] == r["tokens"] == 24  # stopped at the 24th token, not the 200th
    assert first["width"] * first["height"] <= MAX_PIXELS
    assert 1.9 < second["width"] * second["height"] / (first["width"] * first["height"]) <= 2.0
    assert abs(second["dpi"] / first["dpi"] - 2 ** 0.5) < 1e-2 and (r["width"], r["height"]) == (second["width"],
                                                                                                 second["height"])
    assert (out / "doc.md").read_text().startswith("<!-- page 1: stopped: the reply repeated itself -->")
    shutil.rmtree(out)
    assert ocr.main([*args, "--repetition-guard", "0"]) == 0  # off: to max_new_tokens, once
    [r] = _read(out / "pages.jsonl")
    assert (r["status"], r["tokens"], len(r["attempts"])) == ("length", 200, 1)


def test_the_guard_ends_a_loop_at_its_window_and_never_touches_a_reply_that_does_not_loop(looper_dir, reader):
    looper = points.load(looper_dir)
    page = [{"role": "user", "content": [{"type": "image", "image": _page(0)}, {"type": "text", "text": "Read."}]}]
    request = looper.submit(page, max_new_tokens=300, repetition_guard=40)
    request.text()
    assert (request.finish_reason, request.completion_tokens, request.repetition) == ("repetition", 40, (0, 1))
    assert len(set(request.token_ids)) == 1
    # (the random tiny Reader itself loops when greedy: sampled at temperature 1, with one seed on both sides)
    for conversation in (page, [{"role": "user", "content": "Tell me about rivers and mountains."}]):
        plain = reader.submit(conversation, max_new_tokens=64, temperature=1.0, seed=3)
        guarded = reader.submit(conversation, max_new_tokens=64, temperature=1.0, seed=3, repetition_guard=6)
        assert guarded.text() == plain.text() and guarded.finish_reason == plain.finish_reason != "repetition"
        assert guarded.completion_tokens > 6
    with pytest.raises(GenerationError, match=r"^repetition_guard = 5: expected 0 \(off\) or an integer >= 6$"):
        GenerationConfig(repetition_guard=5)


def test_loop_guard_periods():
    def first_trip(tokens, window):
        guard = LoopGuard(window)
        for i, t in enumerate(tokens):
            if guard.push(t):
                return i + 1, guard.found
        return None

    prose = list(range(100)) * 1  # no repeat at all
    assert first_trip(prose, 12) is None
    block = [7, 8, 9, 10, 11]
    # a period-5 loop after 20 tokens of prose: tripped once 30 tokens are periodic, at the smallest period
    assert first_trip(list(range(100, 120)) + block * 20, 30) == (50, (20, 5))
    assert first_trip([1] * 100, 12) == (12, (0, 1))
    # a block longer than window / 3 is not watched; rows that differ in one token never trip
    assert first_trip(list(range(11)) * 10, 30) is None
    rows = [t for i in range(40) for t in (5, 6, 7, 100 + i)]
    assert first_trip(rows, 16) is None
    assert first_trip([3, 4] * 7 + [5] + [3, 4] * 7, 16) is None  # 15 periodic tokens, a break, 14 more


def test_progress_lines_without_a_terminal():
    stream = io.StringIO()
    bar = Progress("points ocr", 5, unit="pages", stream=stream, every=2, per_minute=True)
    for _ in range(5):
        bar.update(1, tokens=3)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert [line.split("  ")[0] for line in lines] == [f"points ocr: {n}/5 pages" for n in (2, 4, 5)]
    assert all("pages/min" in line for line in lines)
    quiet = io.StringIO()
    bar = Progress("points ocr", 5, unit="pages", stream=quiet, every=2, enabled=False)  # --progress off
    bar.update(5)
    assert quiet.getvalue() == ""


def test_a_document_error_names_the_file(files):
    with pytest.raises(DocumentError, match=r"no page 4 \(it has 3\)$"):
        with Pages(Document(files / "doc.pdf", "doc", "pdf")) as pages:
            pages.image(4, Resolution(200, MAX_PIXELS, 1, 10 ** 7))
