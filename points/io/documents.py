"""Documents as pages: PDFs rendered through pdfium (the `pypdfium2` package, `pip install "points[ocr]"`),
images and multi-page TIFF scans read through pillow; what `points ocr` reads.

    docs = find_documents([Path("scans"), Path("report.pdf")])   # files, and folders walked (sorted)
    pages = select_pages("1-3,7")                                 # [1, 2, 3, 7] (1-based; "5-": from 5 on)
    with Pages(docs[0]) as pages:                                 # opened once, its pages rendered on demand
        pages.count                                               # or a DocumentError naming the file
        image = pages.image(1, Resolution(dpi=200, max_pixels=4_000_000, min_pixels=3136))

A page's size: a PDF page is rendered at `dpi` (its size in points x dpi / 72), then at the lower dpi that
fits `max_pixels` when it is larger, or the higher one that reaches `min_pixels` when it is smaller; an image
page is taken as it is, shrunk to `max_pixels` when larger (POINTS-Reader's own rule for an image's
max_pixels: both sides divided by sqrt(area / max_pixels), floored, bicubic). `Resolution.higher()` is the
retry's: twice the pixels the page came out at, up to the model's bound (for an image that was not shrunk, an
enlargement).

Everything a user's file can do wrong (not found, not a PDF or an image, corrupt, encrypted, no pages) is a
`DocumentError` whose message starts with the file's path; nothing else is raised for a bad file.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image

PDF_SUFFIXES = (".pdf",)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".gif", ".jp2", ".ppm", ".pgm", ".pbm")
DPI = 200  # a PDF page's default render (MinerU's; a Letter page is then 1700 x 2200 = 3.7 million pixels)
MAX_SELECTED = 100_000  # pages --pages may name one by one (an open range "5-" has no limit)
MAX_RENDER_PIXELS = 200_000_000  # a page asked to render larger than this is an error (a bogus page size)


class DocumentError(ValueError):
    """A document that cannot be read (its path first in the message): that document's error, not the run's."""


def _pdfium():
    try:
        import pypdfium2
    except ImportError:
        raise DocumentError("reading PDFs needs pypdfium2: pip install \"points[ocr]\" (or pip install pypdfium2)") \
            from None
    return pypdfium2


@dataclass(frozen=True)
class Document:
    path: Path  # the file
    name: str  # its output name under --output, without ".md" (a folder's files keep their relative folders)
    kind: str | None  # "pdf", "image", or None: neither by its suffix


def kind_of(path: Path) -> str | None:
    suffix = path.suffix.lower()
    return "pdf" if suffix in PDF_SUFFIXES else "image" if suffix in IMAGE_SUFFIXES else None


def find_documents(inputs: list[Path], flag: str = "INPUT") -> list[Document]:
    """The documents of the command's inputs, in the order given (a folder's: its PDFs and images, walked
    recursively, sorted by path; hidden files and folders skipped, links to folders not followed; a file reached
    twice, through a link or a second argument, is read once). A missing input or a folder with no document is
    a ValueError naming it; a file given by name that is neither a PDF nor an image by its suffix is a Document
    of kind None (`Pages` refuses it: that document's error). Output names: a file's stem, a folder's file's
    path under the folder without its suffix; where two documents would share a name, each is named by its path
    under the folder they share (`2023/report.pdf`, `2024/report.pdf`: "2023/report", "2024/report"), and where
    they still would (one folder's a.pdf and a.png), each keeps its suffix ("a.pdf", "a.png")."""
    found: list[tuple[Path, Path]] = []  # (file, its name's path)
    for given in inputs:
        if given.is_dir():
            files = sorted(p for p in _walk(given) if kind_of(p) is not None)
            if not files:
                raise ValueError(f"{flag} {given}: a folder with no PDF or image in it (suffixes "
                                 f"{', '.join(PDF_SUFFIXES + IMAGE_SUFFIXES)})")
            found += [(p, p.relative_to(given)) for p in files]
        elif given.is_file() or given.is_symlink():  # (unreadable or no document by its name: its own error)
            found.append((given, Path(given.name)))
        else:
            raise ValueError(f"{flag} {given}: no such file or folder")
    seen, unique = set(), []
    for path, rel in found:
        key = os.path.realpath(path)
        if key not in seen:
            seen.add(key)
            unique.append((path, rel))
    names = [str(rel.with_suffix("")) for _, rel in unique]
    for n in {n for n in names if names.count(n) > 1}:  # named by their folders under the one they share
        twins = [i for i, m in enumerate(names) if m == n]
        base = os.path.commonpath([os.path.dirname(os.path.abspath(unique[i][0])) for i in twins])
        for i in twins:
            names[i] = os.path.splitext(os.path.relpath(os.path.abspath(unique[i][0]), base))[0]
    for n in {n for n in names if names.count(n) > 1}:  # (one folder's a.pdf and a.png: their suffixes)
        for i in [i for i, m in enumerate(names) if m == n]:
            names[i] += unique[i][0].suffix
    for n in names:
        if names.count(n) > 1:
            same = [str(p) for (p, _), m in zip(unique, names) if m == n]
            raise ValueError(f"{flag}: {' and '.join(same)} would both be written as {n}.md; rename one or give them "
                             "to separate runs")
    return [Document(path, name, kind_of(path)) for (path, _), name in zip(unique, names)]


def _walk(folder: Path):
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        yield from (Path(root) / f for f in files if not f.startswith("."))


def select_pages(spec: str | None, flag: str = "--pages") -> list[int] | None:
    """"1-3,7" -> [1, 2, 3, 7]; "5-" -> [5, ...] as [-5] (from 5 on: `pages_of` reads it); None -> None (every
    page). Pages count from 1 (digits only); a bad piece, or more than MAX_SELECTED pages named one by one, is
    a ValueError naming the flag."""
    if spec is None:
        return None
    chosen: set[int] = set()
    open_from = None
    for piece in spec.split(","):
        piece = piece.strip()
        bad = ValueError(f"{flag} {spec}: {piece!r} is not a page (1, 2, ...), a range (1-3) or an open range (5-); "
                         "pages count from 1")
        found = re.fullmatch(r"(\d+)(?:\s*(-)\s*(\d*))?", piece)
        if found is None or int(found[1]) < 1 or (found[3] and int(found[3]) < int(found[1])):
            raise bad
        first = int(found[1])
        if found[2] and not found[3]:
            open_from = first if open_from is None else min(open_from, first)
            continue
        last = int(found[3]) if found[3] else first
        if last - first + 1 + len(chosen) > MAX_SELECTED:
            raise ValueError(f"{flag} {spec}: more than {MAX_SELECTED:,} pages; name an open range (5-) for "
                             "\"to the end\"")
        chosen.update(range(first, last + 1))
    return sorted(chosen) + ([-open_from] if open_from is not None else [])


def pages_of(selection: list[int] | None, count: int) -> list[int]:
    """The pages (1-based) of a document of `count` pages that `select_pages`'s selection names and it has."""
    if selection is None:
        return list(range(1, count + 1))
    open_from = -selection[-1] if selection and selection[-1] < 0 else None
    pages = {p for p in selection if 0 < p <= count}
    if open_from is not None:
        pages.update(range(open_from, count + 1))
    return sorted(pages)


@dataclass(frozen=True)
class Resolution:
    """How large a page is made: PDFs rendered at `dpi`, every page kept within [min_pixels, max_pixels]."""

    dpi: float
    max_pixels: int
    min_pixels: int
    model_max_pixels: int  # the model's own bound: no retry goes over it
    enlarge: float = 1.0  # an image page's sides times this (a retry's), within max_pixels

    def higher(self, pixels: int) -> "Resolution | None":
        """The retry's, for a page that came out at `pixels`: twice that (dpi and an image's sides x sqrt 2;
        over a --max-pixels, which bounds first attempts), within the model's max_pixels; None when that leaves
        less than 1.25x (the page is at the model's bound already)."""
        most = min(2 * pixels, self.model_max_pixels)
        if most < 1.25 * pixels:
            return None
        return replace(self, dpi=self.dpi * math.sqrt(2), max_pixels=most, enlarge=self.enlarge * math.sqrt(2))


class Pages:
    """One document, opened for its pages: `count`, `image(n, resolution)` (n from 1). A context manager."""

    def __init__(self, document: Document):
        self.document, self._pdf, self._image = document, None, None
        self.dpi: float | None = None  # the dpi the last PDF page was rendered at
        path = document.path
        try:
            if document.kind is None:
                raise DocumentError(f"{path}: not a PDF or an image by its name (expected one of "
                                    f"{', '.join(PDF_SUFFIXES + IMAGE_SUFFIXES)})")
            if document.kind == "pdf":
                pdfium = _pdfium()
                try:
                    self._pdf = pdfium.PdfDocument(str(path))
                except pdfium.PdfiumError as e:
                    raise DocumentError(f"{path}: {_pdf_reason(path, e)}") from None
                except (OSError, RuntimeError) as e:  # (a link to nowhere, a loop of links, a file gone meanwhile)
                    raise DocumentError(f"{path}: cannot be read ({getattr(e, 'strerror', None) or e})") from None
                self.count = len(self._pdf)
            else:
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                        self._image = Image.open(path)
                except FileNotFoundError:
                    raise DocumentError(f"{path}: file not found") from None
                except (OSError, SyntaxError, ValueError, RuntimeError, Image.DecompressionBombError) as e:
                    raise DocumentError(f"{path}: not a readable image ({e})") from None
                # a TIFF's frames are a scan's pages; any other format's later frames (an animation, the second
                # picture of a camera's MPO JPEG) are not
                self.count = getattr(self._image, "n_frames", 1) if self._image.format == "TIFF" else 1
            if self.count < 1:
                raise DocumentError(f"{path}: the document has no pages")
        except BaseException:
            self.close()
            raise

    def image(self, n: int, resolution: Resolution) -> Image.Image:
        """Page n (1-based) as an RGB image within the resolution's bounds."""
        path = self.document.path
        if not 1 <= n <= self.count:
            raise DocumentError(f"{path}: no page {n} (it has {self.count})")
        if self._pdf is not None:
            return self._render(n, resolution)
        from points.io.processor import MAX_IMAGE_PIXELS, open_image

        try:
            self._image.seek(n - 1)
            w, h = self._image.size
            if w * h > MAX_IMAGE_PIXELS:  # (checked before decoding, as the processor checks a file)
                raise DocumentError(f"{path}: page {n} declares {w}x{h} = {w * h:,} pixels, over the limit of "
                                    f"{MAX_IMAGE_PIXELS:,} pixels (a decompression bomb?); refused before decoding")
            frame = self._image.copy()
            picture = open_image(frame)  # (the processor's own checks: size limit, modes)
        except DocumentError:
            raise
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise DocumentError(f"{path}: page {n} is not a readable image ({str(e).removeprefix('image: ')})") \
                from None
        w, h = picture.size
        return _within(picture, min(w * h * resolution.enlarge ** 2, resolution.max_pixels))

    def _render(self, n: int, resolution: Resolution) -> Image.Image:
        pdfium, path = _pdfium(), self.document.path
        try:
            page = self._pdf[n - 1]
            try:
                w_pt, h_pt = page.get_size()
                if not (w_pt > 0 and h_pt > 0):
                    raise DocumentError(f"{path}: page {n} has no area ({w_pt} x {h_pt} points)")
                dpi = self.dpi = fit_dpi(w_pt, h_pt, resolution)
                if (w_pt * dpi / 72) * (h_pt * dpi / 72) > MAX_RENDER_PIXELS:
                    raise DocumentError(f"{path}: page {n} is {w_pt:.0f} x {h_pt:.0f} points, too large to render")
                bitmap = page.render(scale=dpi / 72)
                try:
                    image = bitmap.to_pil().convert("RGB")
                finally:
                    bitmap.close()
                w, h = image.size  # (pdfium rounds the sides up: a page over the bound by a row is brought in)
                return _within(image, resolution.max_pixels) if w * h > resolution.max_pixels else image
            finally:
                page.close()
        except pdfium.PdfiumError as e:
            raise DocumentError(f"{path}: page {n} cannot be rendered ({e})") from None

    def close(self) -> None:
        if self._pdf is not None:
            self._pdf.close()
            self._pdf = None
        if self._image is not None:
            self._image.close()
            self._image = None

    def __enter__(self) -> "Pages":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _within(image: Image.Image, pixels: float) -> Image.Image:
    """`image` brought to `pixels` when it has another number of them (more: a bound; fewer: a retry's
    enlargement) by POINTS-Reader's rule for an image's max_pixels: both sides divided by sqrt(area / pixels),
    floored, bicubic."""
    w, h = image.size
    if w * h == pixels:
        return image
    b = math.sqrt(w * h / pixels)
    return image.resize((max(1, int(w / b)), max(1, int(h / b))), Image.BICUBIC)


def fit_dpi(w_pt: float, h_pt: float, resolution: Resolution) -> float:
    """The dpi a page of w_pt x h_pt points renders at: `resolution.dpi`, lowered to fit max_pixels or raised
    to reach min_pixels."""
    area = w_pt * h_pt / (72 * 72)  # square inches
    dpi = resolution.dpi
    if area * dpi * dpi > resolution.max_pixels:
        dpi = math.sqrt(resolution.max_pixels / area) * 0.999  # (the rounding of the bitmap's sides stays under)
    elif area * dpi * dpi < resolution.min_pixels:
        dpi = math.sqrt(resolution.min_pixels / area) * 1.001
    return dpi


def _pdf_reason(path: Path, e: Exception) -> str:
    """Why pdfium loaded no document from `path`, read from the file itself: pdfium's own error code is the last
    one it set on this thread, and a file it refuses without setting one (a PDF with no pages) shows the code
    of an earlier failure."""
    try:
        data = path.read_bytes()
    except OSError as err:
        return f"cannot be read ({err.strerror})"
    if b"%PDF-" not in data[:1024]:
        return "not a PDF (no %PDF- header)"
    if re.search(rb"/Encrypt\s", data):
        return "encrypted (it needs a password; decrypt it first, e.g. qpdf --decrypt)"
    counts = re.findall(rb"/Type\s*/Pages\b[^>]*?/Count\s+(\d+)|/Count\s+(\d+)[^>]*?/Type\s*/Pages\b", data)
    if counts and all(int(a or b) == 0 for a, b in counts):
        return "a PDF with no pages"
    return f"not a readable PDF (damaged; pdfium: {e})"
