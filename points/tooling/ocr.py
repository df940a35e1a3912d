"""`points ocr`: PDFs and scans into Markdown with POINTS-Reader; every page of every document on one batch,
resumable, across processes with torchrun.

    points ocr --model POINTS-Reader report.pdf scans/ --output out/ [--pages 1-3,7] [--max-pixels 2000000]
    torchrun --nproc-per-node 2 -m points ocr --model POINTS-Reader archive/ --output out/

Inputs: PDF files, images (PNG, JPEG, TIFF (each frame a page; other formats' later frames are ignored), BMP,
WebP, GIF, JPEG 2000, PNM), and folders of them (walked recursively, in sorted order; hidden files skipped).
PDFs are rendered through pdfium (the `pypdfium2` package: `pip install "points[ocr]"`).

Output, in the --output folder (made if missing; an input folder is refused): one `NAME.md` per document, its
pages in order, each after a marker line `<!-- page N -->` (N counts from 1 in the document; a page that
failed gets `<!-- page N: error: ... -->` and no text, one stopped as a loop `<!-- page N: stopped: the reply
repeated itself -->` and the text up to the loop's first repeat, one that reached --max-new-tokens `<!-- page N:
stopped at max_new_tokens: the text may be cut -->`). NAME is a file's stem, or for a folder's file
its path under that folder without the suffix (`scans/2024/a.pdf` -> `out/2024/a.md`); documents that would
share a name are named by their paths under the folder they share (`2023/report.pdf` and `2024/report.pdf` ->
`out/2023/report.md`, `out/2024/report.md`), one folder's `a.pdf` and `a.png` keep their suffixes (`a.pdf.md`,
`a.png.md`); a file reached twice (a link beside it, two arguments) is read once, links to folders are not
followed, and a Markdown file that could not be written where its name puts it is refused before any work. And `pages.jsonl`, one line per page in
order: {"id", "document" (its path), "page", "status" ("ok": the reply ended; "length": it reached
--max-new-tokens, the text may be cut; "repetition": stopped as a loop; "error"), "tokens", "seconds" (from
its render to its last token, waiting in the batch included), "width", "height" (the image the model saw),
"attempts" (each try: dpi (PDFs), width, height, status, tokens, seconds), "text"}; a document that cannot be
read (not found, not a PDF or an image, corrupt, encrypted, no pages) is one line {"id", "document", "page":
null, "status": "error", "error"} and no .md: that document's error, never the run's (exit 0).

Resolution: a PDF page is rendered at --dpi (default 200), then brought within the pixel bounds: at most
--max-pixels (default: the model's max_pixels, from its preprocessor_config.json) and at least the model's
min_pixels. An image page is taken as it is and shrunk to --max-pixels when larger (POINTS-Reader's rule for
an image's max_pixels). The model's processor then makes the sides multiples of 28 as for any image.

Prompt and decoding: POINTS-Reader's prompt (tables as HTML, the rest as Markdown; --prompt replaces it)
after the page image, as its README asks, and its README's decoding (2,048 new tokens, temperature 0.7,
top-p 0.8, top-k 20, repetition penalty 1.05); each option given wins (--temperature 0 for greedy).

Repetition guard: a reply whose last --repetition-guard tokens (default 512; 0: off) are one block repeated (at
least three copies, no token differing: points.runtime.loops) is stopped there, while decoding, and the page
runs once more at twice the pixels (the README's advice for loops; at most the model's max_pixels: at that
bound it is not retried); its line records both attempts, and its text is the second's.

Progress: pages and pages/min on a terminal; without one, a line every --progress-every pages (default 10).

The rest is `points run`'s (its --help): exit codes (2 for bad arguments or input, named before any work; 1
for a file that cannot be written; 130 / 143 for Ctrl-C / SIGTERM), one run per --output at a time (a lock),
each finished page journaled (`pages.jsonl.journal.<rank>`, fsynced) so that the same command after kill -9
or Ctrl-C goes on without redoing a page (other settings, or input files changed since, are refused rather
than mixed in), torchrun's processes each taking every N-th remaining page, rank 0 writing the outputs at the
end (each file whole, under a temporary name, then renamed). --batch-size pages decode at once; pages are
rendered as rows come free.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import sys
import time
from pathlib import Path

from points.io.documents import (DPI, DocumentError, Pages, Resolution, find_documents, pages_of, select_pages)
from points.io.progress import Progress
from points.tooling.jobs import Item, Job, Journal, RunError, drive, generating_pipeline, on_scheduler
from points.tooling.jobs import read_records as _read_records
from points.tooling.options import (GENERATION_OPTIONS, add_generation_options, add_job_options,
                                    add_prefill_option, check_weight_options, exit_code, generation_kwargs,
                                    quantize_record)

RESULTS = ("document", "page", "status", "tokens", "seconds", "width", "height", "attempts", "text")
OUT_NAME = "pages.jsonl"
REPETITION_GUARD = 512
# POINTS-Reader's README's decoding (points.model.family's "reader" preset), written out: --help imports no torch
READER_DECODING = {"max_new_tokens": 2048, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}
STATUS = {"stop": "ok", "length": "length", "repetition": "repetition"}  # a request's finish_reason -> a page's


def read_records(path: Path) -> list[dict]:
    """The whole page records of a journal (or of pages.jsonl)."""
    return _read_records(path, RESULTS)


def reader_defaults() -> tuple[str, dict]:
    """POINTS-Reader's prompt and decoding settings (its preset, points.model.family)."""
    from points.model.family import READER

    preset = READER.presets["reader"]
    return preset.prompt, dict(preset.generation)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="points ocr", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint directory (POINTS-Reader, released layout or ours)")
    p.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="PDFs, images, or folders of them")
    p.add_argument("--output", required=True, type=Path, help=f"a folder: one NAME.md per document and {OUT_NAME}")
    p.add_argument("--pages", default=None, metavar="1-3,7",
                   help="these pages of each document (from 1; 5- is 5 to the end; default: all)")
    p.add_argument("--dpi", type=float, default=None, help=f"a PDF page's render (default: {DPI})")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="a page's largest area in pixels (default: the model's max_pixels)")
    p.add_argument("--prompt", default=None, help="the text after each page (default: POINTS-Reader's prompt)")
    p.add_argument("--repetition-guard", type=int, default=REPETITION_GUARD, metavar="TOKENS",
                   help="stop a reply whose last TOKENS tokens repeat one block, then retry the page at twice the "
                        "pixels (0: off; a reply shorter than TOKENS is never stopped; default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="pages decoded at once (default: %(default)s)")
    add_prefill_option(p)
    add_generation_options(p)
    for action in p._actions:  # (the defaults are Reader's, not GenerationConfig's)
        if action.dest in READER_DECODING:
            action.help = f"default: {READER_DECODING[action.dest]} (POINTS-Reader's README)"
    add_job_options(p)
    p.add_argument("--progress-every", type=int, default=10, metavar="N",
                   help="without a terminal, a progress line every N pages (default: %(default)s)")
    return p


def settings(args) -> dict:
    """The generation keywords every page runs with: Reader's README's, under the options given."""
    _, gen = reader_defaults()
    return gen | generation_kwargs(args) | {"repetition_guard": args.repetition_guard}


class _Open:
    """The documents this rank is reading, the last few kept open (a document's pages come one after another)."""

    def __init__(self, documents, keep: int = 4):
        self.documents, self.keep, self.open = documents, keep, {}

    def image(self, index: int, page: int, resolution: Resolution):
        """(page `page` of document `index` as an image, the dpi it was rendered at: None for an image file)."""
        pages = self.open.pop(index, None) or Pages(self.documents[index])
        self.open[index] = pages  # (the most recent last)
        while len(self.open) > self.keep:
            self.open.pop(next(iter(self.open))).close()
        image = pages.image(page, resolution)
        return image, pages.dpi

    def close(self) -> None:
        for pages in self.open.values():
            pages.close()
        self.open.clear()


class _Page:
    """One page in flight: its item, the resolution of this attempt and the attempts before it."""

    def __init__(self, item: Item, resolution: Resolution, earlier: list | None = None):
        self.item, self.resolution, self.earlier = item, resolution, earlier or []
        self.size, self.start, self.dpi = (0, 0), 0.0, None


def page_items(documents, selection: list[int] | None, resolution: Resolution, spec: str | None = None):
    """(one Item per page of each document that `selection` (select_pages) names, or one per document that
    cannot be read, holding its error; the lines telling of pages a document lacks). `spec`: --pages as given."""
    items, skipped = [], []
    for d, doc in enumerate(documents):
        try:
            with Pages(doc) as pages:
                count = pages.count
            chosen = pages_of(selection, count)
            if not chosen:
                raise DocumentError(f"{doc.path}: --pages {spec}: the document has {count} page(s), none of those")
            if selection is not None and len(chosen) < len([s for s in selection if s > 0]):
                skipped.append(f"{doc.path}: {count} page(s); --pages {spec} beyond them skipped")
            for n in chosen:
                items.append(Item(len(items), f"{doc.name}#page{n}", [], 0,
                                  {"document": d, "page": n, "path": str(doc.path), "resolution": resolution}))
        except DocumentError as e:
            items.append(Item(len(items), f"{doc.name}#document", [], 0, {"document": d, "error": str(e)}))
    ids = [it.id for it in items]
    if len(set(ids)) != len(ids):
        twice = sorted(i for i in ids if ids.count(i) > 1)[0]
        raise RunError(f"INPUT: two documents give the same page name ({twice}); rename one or run them apart")
    return items, skipped


def check_targets(out_dir: Path, documents) -> None:
    """Every document's Markdown file can be written where its name puts it: not onto a folder, not under a file
    (another document's Markdown, the run's own pages.jsonl and its journals, or a file already there);
    otherwise a RunError naming the document, before any work."""
    targets = {out_dir / f"{d.name}.md": d for d in documents}
    for target, doc in targets.items():
        rel = target.relative_to(out_dir)
        problem = None
        if rel.parts[0].startswith(OUT_NAME):
            problem = f"its folder {rel.parts[0]} is this run's own file's name"
        elif target.is_dir():
            problem = "a folder of that name is there"
        for parent in list(rel.parents)[:-1]:
            if out_dir / parent in targets:
                problem = f"{out_dir / parent} is {targets[out_dir / parent].path}'s Markdown file"
            elif (out_dir / parent).exists() and not (out_dir / parent).is_dir():
                problem = f"{out_dir / parent} is a file"
        if problem:
            raise RunError(f"INPUT {doc.path}: its Markdown would be {target}, but {problem}; rename it or choose "
                           "another --output")


def document_error(item: Item, documents) -> dict:
    return {"id": item.id, "document": str(documents[item.fields["document"]].path), "page": None,
            "status": "error", "error": item.fields["error"]}


def page_text(pipe, request) -> str:
    """The reply; for a loop, its tokens up to the end of the repeated block's first copy."""
    if request.finish_reason == "repetition" and request.repetition is not None:
        start, period = request.repetition  # (a cut inside a character's bytes leaves a replacement character)
        return pipe.tokenizer.decode(request.token_ids[:start + period]).rstrip("\ufffd")
    return request.reply


def process(pipe, documents, items: list[Item], gen: dict, prompt: str, journal: Journal,
            progress: Progress | None) -> int:
    """This rank's pages on the pipeline's scheduler (`jobs.on_scheduler`), each journaled as it finishes; the
    tokens generated. Pages are rendered as rows come free; a page that loops runs once more at twice the pixels."""
    opened = _Open(documents)

    def submit(page: _Page):
        it = page.item
        if "error" in it.fields:
            return document_error(it, documents)
        n = it.fields["page"]
        page.start = time.perf_counter()
        image, page.dpi = opened.image(it.fields["document"], n, page.resolution)
        page.size = image.size
        messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": prompt}]}]
        return pipe.submit(messages, f"{documents[it.fields['document']].path} page {n}", **gen)

    def finish(page: _Page, request):
        attempt = _attempt(page, request)
        if request.finish_reason == "repetition" and not page.earlier:
            higher = page.resolution.higher(page.size[0] * page.size[1])
            if higher is not None:  # once more at twice the pixels, next in line
                return _Page(page.item, higher, [attempt])
            attempt["retry"] = "none: the page is at the model's max_pixels already"
        return _record(page, attempt, page_text(pipe, request))

    def fail(page: _Page, e: BaseException) -> dict:
        return _record(page, _failed(page, documents[page.item.fields["document"]], page.item.fields["page"], e))

    try:
        return on_scheduler(pipe, [_Page(it, it.fields.get("resolution")) for it in items], journal, progress,
                            submit, finish, fail)
    finally:
        opened.close()


def _failed(page: _Page, doc, n: int, e: BaseException) -> dict:
    """The attempt of a page that failed: its error named by the document and page (an image the processor
    refused: its reason, not the place in the conversation it had), its size when it was read."""
    from points.io.chat import ImageError

    reason = e.reason if isinstance(e, ImageError) else str(e)
    name = f"{doc.path}: "
    reason = reason if reason.startswith(name) else f"{name}page {n}: {reason.removeprefix(f'{doc.path} page {n}: ')}"
    sized = {"width": page.size[0], "height": page.size[1]} if page.size != (0, 0) else {}
    return sized | {"status": "error", "error": reason}


def _attempt(page: _Page, request) -> dict:
    a = {"width": page.size[0], "height": page.size[1], "status": STATUS.get(request.finish_reason, "error"),
         "tokens": request.completion_tokens, "seconds": round(time.perf_counter() - page.start, 3)}
    return ({"dpi": round(page.dpi, 1)} if page.dpi is not None else {}) | a


def _record(page: _Page, attempt: dict, text: str | None = None) -> dict:
    it, attempts = page.item, page.earlier + [attempt]
    r = {"id": it.id, "document": it.fields["path"], "page": it.fields["page"], "status": attempt["status"],
         "tokens": attempt.get("tokens", 0), "seconds": round(sum(a.get("seconds", 0) for a in attempts), 3),
         "width": attempt.get("width"), "height": attempt.get("height"), "attempts": attempts}
    if attempt["status"] == "error":
        r["error"] = attempt["error"]
    else:
        r["text"] = text
    return r


def markdown(records: list[dict]) -> str:
    """One document's Markdown from its pages' records (in page order)."""
    parts = []
    for r in records:
        if r["status"] == "error":
            parts.append(f"<!-- page {r['page']}: error: {_comment(r['error'])} -->\n")
        elif r["status"] == "repetition":
            parts.append(f"<!-- page {r['page']}: stopped: the reply repeated itself -->\n\n{_body(r['text'])}\n")
        elif r["status"] == "length":
            parts.append(f"<!-- page {r['page']}: stopped at max_new_tokens: the text may be cut -->\n\n"
                         f"{_body(r['text'])}\n")
        else:
            parts.append(f"<!-- page {r['page']} -->\n\n{_body(r['text'])}\n")
    return "\n".join(parts)


def _body(text: str) -> str:
    """A page's text between the markers: blank lines around it dropped, the first line's indentation kept."""
    return text.strip("\n").rstrip()


def _comment(text: str) -> str:
    return " ".join(text.replace("--", "- -").split())  # (no "--" inside an HTML comment)


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    for flag, value in (("--batch-size", args.batch_size), ("--max-prefill-tokens", args.max_prefill_tokens),
                        ("--progress-every", args.progress_every)):
        if value < 1:
            p.error(f"{flag} {value}: expected an integer >= 1")
    if args.dpi is not None and not (1 <= args.dpi <= 2400):
        p.error(f"--dpi {args.dpi}: expected a number from 1 to 2400")
    if args.max_pixels is not None and args.max_pixels < 1:
        p.error(f"--max-pixels {args.max_pixels}: expected an integer >= 1")
    if args.prompt is not None and not args.prompt.strip():
        p.error("--prompt: expected some text")
    check_weight_options(p, args)
    from points.runtime.generation import GenerationConfig, GenerationError

    try:
        GenerationConfig.from_kwargs(**settings(args))
        selection = select_pages(args.pages)
    except GenerationError as e:
        p.error(e.flag())
    except ValueError as e:
        p.error(str(e))
    prompt = args.prompt if args.prompt is not None else reader_defaults()[0]
    out_dir = args.output
    job_args = copy.copy(args)
    job_args.output = out_dir / OUT_NAME
    job_args.input = None
    state: dict = {}

    def read() -> list[Item]:
        from points.io.config import read_config
        from points.io.outputs import check_output_dir
        from points.io.processor import ImageProcessor
        from points.pipeline import resolve_device

        documents = find_documents(args.inputs)
        for given in args.inputs:
            check_output_dir(out_dir, sources={"INPUT": given})
        read_config(args.model)
        resolve_device(args.device)
        processor = ImageProcessor.from_dir(args.model)
        if args.max_pixels is not None and not processor.min_pixels <= args.max_pixels <= processor.max_pixels:
            raise RunError(f"--max-pixels {args.max_pixels}: expected a value from the model's min_pixels "
                           f"{processor.min_pixels} to its max_pixels {processor.max_pixels}")
        resolution = Resolution(dpi=args.dpi or DPI, max_pixels=args.max_pixels or processor.max_pixels,
                                min_pixels=processor.min_pixels, model_max_pixels=processor.max_pixels)
        check_targets(out_dir, documents)
        items, skipped = page_items(documents, selection, resolution, args.pages)
        for line in skipped:
            print(f"points ocr: {line}", file=sys.stderr)
        out_dir.mkdir(parents=True, exist_ok=True)
        state["documents"] = documents
        return items

    def key(items: list[Item]) -> dict:
        files = [[os.path.abspath(d.path), *_stamp(d.path)] for d in state["documents"]]
        digest = hashlib.sha256(json.dumps(files).encode()).hexdigest()
        defaults = {name: getattr(GenerationConfig, name) for name in GENERATION_OPTIONS}
        return {"model": str(Path(args.model).resolve()), "documents_sha256": digest, "pages": args.pages,
                "dpi": args.dpi or DPI, "max_pixels": args.max_pixels, "prompt": prompt, "dtype": args.dtype,
                **quantize_record(args),
                "gen": defaults | settings(args)}

    load = generating_pipeline(args)

    def work(pipe, share, journal, progress):
        process(pipe, state["documents"], share, settings(args), prompt, journal, progress)

    def before(items: list[Item], records: list[dict]) -> None:
        from points.errors import WriteError
        from points.io.atomic import write_text_atomically

        by_doc: dict[int, list[dict]] = {}
        for it, r in zip(items, records):
            by_doc.setdefault(it.fields["document"], []).append(r)
        failed = []
        for d, doc in enumerate(state["documents"]):
            pages = by_doc.get(d, [])
            if any(r.get("page") is None for r in pages):
                failed.append(f"{pages[0]['error']}")
                continue
            target = out_dir / f"{doc.name}.md"
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise WriteError(target.parent, e) from None
            write_text_atomically(target, markdown(pages))
        for line in failed:
            print(f"points ocr: {line}", file=sys.stderr)
        print(f"points ocr: {len(state['documents']) - len(failed)} of {len(state['documents'])} documents -> "
              f"{out_dir} ({len(failed)} could not be read)", file=sys.stderr)

    return exit_code(lambda: drive(Job("points ocr", job_args, read, key, load, work, RESULTS, before=before,
                                       sources={f"INPUT {i + 1}": path for i, path in enumerate(args.inputs)},
                                       unit="pages", every=args.progress_every, per_minute=True)))


def _stamp(path: Path) -> list[int]:
    """What says a file changed since the journal was written: its size and modification time."""
    try:
        st = path.stat()
        return [st.st_size, st.st_mtime_ns]
    except OSError:
        return [-1, -1]
