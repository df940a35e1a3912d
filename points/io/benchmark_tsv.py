"""VLMEvalKit's benchmark files: one TSV per benchmark in, its prediction file out (what `points eval` reads
and writes).

    rows = read_tsv(Path("MMStar.tsv"))          # every line checked; images decoded from base64 lazily
    rows[0].index, rows[0].question, rows[0].options, rows[0].images()   # "0", "...", {"A": "...", ...}, [bytes]
    write_predictions(Path("POINTSV15-Qwen-2.5-7B-Chat_MMStar.tsv"), rows, ["A", ...])

The format, as VLMEvalKit writes and reads it (vlmeval/dataset/image_base.py, vlmeval/smp/file.py): a header
line, then a row per sample, tab-separated, fields quoted as pandas' `to_csv` quotes them. `index` names the
sample; `image` holds the base64 of its image, a list of them written as a Python list ("['iVBOR...', ...]"),
or, when it is 64 characters or fewer, the `index` of another row whose image it shares; `question`, `hint`,
the options in columns `A`, `B`, ... (a missing one is empty), `answer` (absent in test splits), `category`,
`split` and any other column, kept as they are.

VLMEvalKit reads the file with pandas, and what the model is asked is built from what pandas gives back: a
field pandas reads as missing ("", "NA", "N/A", "None", "null", "nan", ... its default na_values) is no option
and no hint, and a column whose values are all numbers is read as numbers (as floats where one is missing:
"1" is then asked as "1.0"). `Row.text` follows the same rules, so a prompt built here is the one VLMEvalKit
builds.
"""

from __future__ import annotations

import ast
import base64
import binascii
import csv
import io
import re
import string
import sys
from dataclasses import dataclass, field
from pathlib import Path

# pandas' default na_values (pandas.io.parsers: STR_NA_VALUES)
NA_VALUES = frozenset({"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
                       "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"})
REFERENCE_CHARS = 64  # an image field this short names another row's index (VLMEvalKit's rule)


class BenchmarkFileError(ValueError):
    """A benchmark file that cannot be used; the message names the file, line and column."""


@dataclass
class Row:
    index: str  # the sample's index, as VLMEvalKit names it in its prediction file
    line: int  # its line in the file
    fields: dict  # every column but `image`, as VLMEvalKit's pandas would hold it (None: missing)
    image_data: list = field(default_factory=list)  # the base64 strings of its images, in order

    def text(self, column: str) -> str | None:
        """The column as VLMEvalKit's prompt uses it: str() of pandas' value, None where pandas reads nothing."""
        value = self.fields.get(column)
        return None if value is None else str(value)

    @property
    def question(self) -> str:
        return self.text("question") or ""

    @property
    def hint(self) -> str | None:
        return self.text("hint")

    @property
    def answer(self) -> str | None:
        return self.text("answer")

    @property
    def options(self) -> dict[str, str]:
        """{"A": ..., "B": ...}: the option columns that hold something, in letter order."""
        return {c: self.text(c) for c in string.ascii_uppercase if self.text(c) is not None}

    def images(self) -> list[bytes]:
        """The images' bytes (decoded now: a file of thousands of rows keeps only base64 in memory)."""
        out = []
        for k, data in enumerate(self.image_data):
            try:
                out.append(base64.b64decode(data, validate=False))
            except (binascii.Error, ValueError) as e:
                raise BenchmarkFileError(f"line {self.line}, column image: image {k + 1} of index {self.index!r} is "
                                         f"not base64 ({e})") from None
        return out


_INT = re.compile(r"[+-]?[0-9]+")
_FLOAT = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[+-]?(?:inf|Inf|INF|infinity|Infinity)")
TRUE_VALUES, FALSE_VALUES = ("True", "TRUE", "true"), ("False", "FALSE", "false")  # pandas' C parser's
INT64 = (-2**63, 2**63 - 1)


def _column(values: list[str]) -> list:
    """One column as pandas' read_csv types it: missing values None; all booleans (True / TRUE / true, False /
    ...) bool, gaps or not; all integers within int64 int (float when one is missing, as pandas needs NaN); all numbers
    (ASCII digits, a point, an exponent) float; anything else, an integer out of int64 among them, text."""
    present = [v for v in values if v not in NA_VALUES]
    kind = "text"
    if present and all(v in TRUE_VALUES + FALSE_VALUES for v in present):
        kind = "bool"  # (with a gap pandas holds objects, the same True / False beside NaN)
    elif present and all(_INT.fullmatch(v) for v in present):
        if all(INT64[0] <= int(v) <= INT64[1] for v in present):
            kind = "int" if len(present) == len(values) else "float"
    elif present and all(_INT.fullmatch(v) or _FLOAT.fullmatch(v) for v in present):
        if all(not _INT.fullmatch(v) or INT64[0] <= int(v) <= INT64[1] for v in present):
            kind = "float"
    out = []
    for v in values:
        if v in NA_VALUES:
            out.append(None)
        elif kind == "bool":
            out.append(v in TRUE_VALUES)
        elif kind == "int":
            out.append(int(v))
        elif kind == "float":
            out.append(float(v))
        else:
            out.append(v)
    return out


def _columns_as_pandas(header: list[str], raw: list[list[str]]) -> list[dict]:
    """Each column typed as pandas' read_csv types it (`_column`)."""
    typed = [{} for _ in raw]
    for c, name in enumerate(header):
        for r, v in zip(typed, _column([row[c] for row in raw])):
            r[name] = v
    return typed


def read_back(values: list[str]) -> list[str]:
    """Replies as VLMEvalKit's evaluator sees them: written to the prediction TSV, read back by pandas, then
    `str()` (an empty reply, "NA" or "None" is "nan"; a column of numbers is typed: "007" is "7")."""
    return ["nan" if v is None else str(v) for v in _column(values)]


def read_tsv(path: Path, flag: str = "--data") -> list[Row]:
    """Every row of a VLMEvalKit TSV, checked before any work: a header with `index`; each line with as many
    fields as the header; indices used once; an image reference naming a row that holds an image."""
    csv.field_size_limit(sys.maxsize)  # (a base64 image is megabytes in one field)
    try:
        text = path.read_text(encoding="utf-8-sig")  # (a byte-order mark, as pandas takes it)
    except (OSError, UnicodeDecodeError) as e:
        raise BenchmarkFileError(f"{flag} {path}: cannot read ({e})") from None
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t")
    try:
        table = list(reader)
    except csv.Error as e:
        raise BenchmarkFileError(f"{flag} {path}, line {reader.line_num}: not a tab-separated table ({e})") from None
    if not table or "index" not in table[0]:
        raise BenchmarkFileError(f"{flag} {path}: expected VLMEvalKit's TSV: a header line with an \"index\" column "
                                 f"(got {table[0][:6] if table else 'an empty file'})")
    header, body = table[0], [r for r in table[1:] if r != []]
    lines = []  # (the file's line of each row: a quoted field may span lines)
    line = 1
    for r in table[1:]:
        line += 1
        if r != []:
            lines.append(line)
        line += sum(f.count("\n") for f in r)
    for n, r in zip(lines, body):
        if len(r) != len(header):
            raise BenchmarkFileError(f"{flag} {path}, line {n}: {len(r)} fields, the header has {len(header)}")
    if not body:
        raise BenchmarkFileError(f"{flag} {path}: no rows")
    i_image = header.index("image") if "image" in header else None
    kept = [c for c in range(len(header)) if c != i_image]
    typed = _columns_as_pandas([header[c] for c in kept], [[r[c] for c in kept] for r in body])
    rows, seen = [], {}
    for n, r, fields in zip(lines, body, typed):
        index = str(fields["index"]) if fields["index"] is not None else ""
        if not index:
            raise BenchmarkFileError(f"{flag} {path}, line {n}, column index: empty")
        if index in seen:
            raise BenchmarkFileError(f"{flag} {path}, line {n}, column index: {index!r} already used on line "
                                     f"{seen[index]}")
        seen[index] = n
        rows.append(Row(index, n, fields))
    if i_image is not None:
        images = {row.index: body[k][i_image] for k, row in enumerate(rows)}
        for k, row in enumerate(rows):
            value = images[row.index]
            if value in NA_VALUES:
                continue
            if len(value) <= REFERENCE_CHARS:
                target = images.get(value)
                if target is None or len(target) <= REFERENCE_CHARS:
                    raise BenchmarkFileError(f"{flag} {path}, line {row.line}, column image: {value!r} names no row "
                                             "that holds an image")
                value = target
            row.image_data = _image_list(value, path, row.line, flag)
    return rows


def _image_list(value: str, path: Path, line: int, flag: str) -> list[str]:
    """One base64 image, or a Python list of them (VLMEvalKit's `toliststr`)."""
    if len(value) > 1 and value[0] == "[" and value[-1] == "]":
        try:
            items = ast.literal_eval(value)
        except (ValueError, SyntaxError) as e:
            raise BenchmarkFileError(f"{flag} {path}, line {line}, column image: a list that does not parse "
                                     f"({e})") from None
        if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
            raise BenchmarkFileError(f"{flag} {path}, line {line}, column image: expected a list of base64 strings")
        return items
    return [value]


def write_predictions(path: Path, header: list[str], rows: list[Row], predictions: dict[str, str]) -> str:
    """The prediction file VLMEvalKit's evaluator reads (PRED_FORMAT=tsv): the benchmark's columns but `image`,
    in its order, then `prediction`; fields quoted as pandas quotes them. Returns the text (written by the
    caller, atomically)."""
    columns = [c for c in header if c != "image"] + ["prediction"]
    out = io.StringIO(newline="")
    w = csv.writer(out, delimiter="\t", lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
    w.writerow(columns)
    for row in rows:
        values = [_field(row.fields.get(c)) for c in columns[:-1]] + [predictions[row.index]]
        w.writerow(values)
    return out.getvalue()


def _field(value) -> str:
    if value is None:
        return ""
    return repr(value) if isinstance(value, float) else str(value)


def header_of(path: Path) -> list[str]:
    """The header line's columns."""
    with path.open(encoding="utf-8-sig", newline="") as f:
        return next(csv.reader(f, delimiter="\t"))
