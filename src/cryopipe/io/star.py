"""STAR files as written and read by RELION 3.0, 3.1, 4.x and 5.x.

A STAR file is a sequence of data blocks ``data_<name>``; each block is either a *loop* (a table: ``loop_``,
one ``_label #i`` line per column, then one whitespace-separated row per line) or a *key-value list*
(``_label value`` lines). RELION 3.1+ precedes each block with a ``# version 30001`` (5.x: ``50001``) comment;
RELION 3.0 writes no version line and uses one unnamed ``data_`` block for particles.

* Loops become :class:`pandas.DataFrame` (one column per label without the leading ``_``, in file order).
  Column types: int64 when every value is an integer without leading zeros, float64 when every value is a
  number (``nan``/``inf`` allowed), otherwise strings. Numeric-looking strings stay strings when they have
  leading zeros (``"0001"``) or when the label is a file/name label (``rln...Name``, ``...File``,
  ``...Image``, ...). Empty quoted values ``""`` are empty strings.
* Key-value blocks become ``dict[label, value]`` with the same typing per value.
* A loop body is parsed by :func:`pandas.read_csv` (C parser): 10^5 rows x 20 columns in about a second.

Floats are written with ``%.12g`` (float64 columns: every value RELION writes, <= 12 significant digits,
reads back identical; anything else to <= 5e-12 relative) or ``%.9g`` (float32 columns: exact float32 round
trip), unless an explicit ``float_format`` such as ``"%.8g"`` is given; ints are written as ints; strings
containing whitespace, ``"`` or ``#`` (and empty strings) are double-quoted.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from cryopipe.errors import InputFileError
from cryopipe.io.atomic import atomic_path

__all__ = ["read_star", "read_star_with_version", "write_star", "star_version", "is_string_label", "numeric_column"]

Block = pd.DataFrame | dict[str, object]

_VERSION_RE = re.compile(r"^\s*#\s*version\s+(\d+)")
# A line that ends a loop body: blank, or the start of a new block / loop / label.
# (Starts with a literal newline so that the regex engine scans fast; the match begins at the newline
# that ends the last body line.)
_LOOP_END_RE = re.compile(rb"\n[ \t]*(?:\r?\n|\r?\Z|data_|loop_|_)")
# An all-digit token with a leading zero ("0001"): such a column is kept as strings.
_LEADING_ZERO_TOKEN_RE = re.compile(rb"[ \t\n][+-]?0\d+(?=[ \t\r\n]|\Z)")
_LEADING_ZERO_FIRST_RE = re.compile(rb"[ \t]*[+-]?0\d+(?=[ \t\r\n]|\Z)")
_NON_SPACE_RE = re.compile(rb"\S")
_COMMENT_BYTES_RE = re.compile(rb"(?:^|(?<=[ \t]))#[^\n]*", re.M)
# Tokens of one line: "quoted", 'quoted' or bare.
_TOKEN_RE = re.compile(r'"([^"]*)"|\'([^\']*)\'|(\S+)')
_LEADING_ZERO_RE = re.compile(r"[+-]?0\d+\Z")
_INT_RE = re.compile(r"[+-]?(?:0|[1-9]\d*)\Z")
_NA_VALUES = ["nan", "NaN", "NAN", "-nan", "-NaN", "+nan"]
# Suffixes of labels whose values are file names / names in RELION (kept as strings even if numeric-looking).
_STRING_LABEL_SUFFIXES = (
    "Name", "Names", "File", "FileName", "Filename", "Image", "Coordinates", "Metadata", "Label",
    "Comment", "RootName",
)
_STRING_LABELS = frozenset({
    "rlnImageName", "rlnMicrographName", "rlnMicrographMovieName", "rlnOpticsGroupName", "rlnGroupName",
    "rlnTomoName", "rlnTomoTiltSeriesName", "rlnCtfImage", "rlnReferenceImage", "rlnMtfFileName",
    "rlnMicrographGainName", "rlnMicrographDefectFile", "rlnMicrographMetadata", "rlnMicrographCoordinates",
    "rlnSymmetryGroup", "rlnUnfilteredMapHalf1", "rlnUnfilteredMapHalf2", "rlnPostprocessedMap",
    "rlnPostprocessedMapMasked", "rlnMaskName", "rlnPipeLineProcessName", "rlnPipeLineProcessAlias",
    "rlnPipeLineNodeName", "rlnPipeLineEdgeFromNode", "rlnPipeLineEdgeToNode", "rlnPipeLineEdgeProcess",
    "rlnJobOptionVariable", "rlnJobOptionValue", "rlnJobTypeLabel", "rlnTomoImportImodDir",
})


# Common RELION integer labels: their values are numbers, so no check for zero-padded strings is needed.
_INT_LABELS = frozenset({
    "rlnClassNumber", "rlnRandomSubset", "rlnOpticsGroup", "rlnGroupNumber", "rlnNrOfSignificantSamples",
    "rlnImageSize", "rlnImageDimensionality", "rlnSpectralIndex", "rlnHelicalTubeID", "rlnGroupNrParticles",
    "rlnCtfDataAreCtfPremultiplied", "rlnMicrographFrameNumber", "rlnParticleNumber", "rlnImageId",
    "rlnMicrographId", "rlnNrOfFrames", "rlnIsFlip",
})


def is_string_label(label: str) -> bool:
    """True for labels RELION stores as strings (file names, names): their values are never converted to numbers."""
    return label in _STRING_LABELS or (label.startswith("rln") and label.endswith(_STRING_LABEL_SUFFIXES))


# ------------------------------------------------------------------------------------------------ reading


def numeric_column(table: pd.DataFrame, label: str, where, *, finite: bool = True,
                   remedy: str = "fix that row or remove it") -> np.ndarray:
    """Column ``label`` of a STAR table as float64 ``[rows]``, or a one-line :class:`InputFileError` naming the file
    ``where``, the column and the first bad row and value: a missing column, a value that is not a number and
    (with ``finite``) NaN or inf."""
    if label not in table.columns:
        raise InputFileError(where, f"no {label} column",
                             f"the table's columns: {', '.join(map(str, table.columns[:8]))}"
                             f"{'...' if len(table.columns) > 8 else ''}")
    raw = table[label]
    vals = pd.to_numeric(raw, errors="coerce").to_numpy(np.float64)
    text = np.isnan(vals) & ~raw.isna().to_numpy()
    if text.any():
        i = int(np.argmax(text))
        raise InputFileError(where, f"column {label} is not numeric (row {i + 1}: {raw.iloc[i]!r})", remedy)
    if finite:
        bad = ~np.isfinite(vals)
        if bad.any():
            i = int(np.argmax(bad))
            raise InputFileError(where, f"{label} in row {i + 1} is {raw.iloc[i]!r}, not a finite number "
                                        f"({int(bad.sum())} such row(s))", remedy)
    return vals


def _convert_value(label: str, token: str) -> object:
    """Type one key-value token: int (no leading zeros), float, else the string itself."""
    if is_string_label(label) or _LEADING_ZERO_RE.match(token):
        return token
    if _INT_RE.match(token):
        return int(token)
    try:
        return float(token)
    except ValueError:
        return token


def _tokenize(line: str) -> list[str]:
    return [m.group(1) if m.group(1) is not None else m.group(2) if m.group(2) is not None else m.group(3)
            for m in _TOKEN_RE.finditer(line)]


def _strip_comments(body: str) -> str:
    """Remove ``# ...`` comments that start a token (whole-line or trailing row comments)."""
    return re.sub(r"(?:^|(?<=[ \t]))#[^\n]*", "", body, flags=re.M)


def _find_bad_row(path: Path, body: bytes, first_line: int, ncols: int) -> None:
    """Slow path: raise an InputFileError for the first row whose field count differs from ``ncols``."""
    for i, raw in enumerate(body.split(b"\n")):
        line = raw.decode("utf-8", errors="replace")
        content = _strip_comments(line).strip()
        if not content:
            continue
        n = len(_tokenize(content))
        if n != ncols:
            raise InputFileError(
                path, f"line {first_line + i}: loop row has {n} fields but the loop declares {ncols} labels",
                "fix or remove that row; every row needs one value per _rln label")


def _parse_loop_body(path: Path, labels: list[str], body: bytes, first_line: int) -> pd.DataFrame:
    ncols = len(labels)
    if _NON_SPACE_RE.search(body) is None:
        return pd.DataFrame({lab: pd.Series([], dtype=object) for lab in labels})
    if b"#" in body:
        body = _COMMENT_BYTES_RE.sub(b"", body)
    forced_str = {lab: str for lab in labels if is_string_label(lab)}
    read_kw = dict(sep=r"\s+", header=None, names=labels, quotechar='"', keep_default_na=False,
                   na_values=_NA_VALUES, skip_blank_lines=True, engine="c", index_col=False, low_memory=False,
                   encoding="utf-8")
    try:
        df = pd.read_csv(io.BytesIO(body), dtype=forced_str or None, **read_kw)
    except (pd.errors.ParserError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        _find_bad_row(path, body, first_line, ncols)
        detail = str(exc).strip().splitlines()[-1]
        raise InputFileError(path, f"cannot parse the loop starting at line {first_line}: {detail}",
                             "check the file is a valid STAR file") from exc
    # Rows with too few fields are padded by pandas with "" (or NaN): check the file when the last column has any.
    last = df[labels[-1]]
    if last.isna().any() or (not pd.api.types.is_numeric_dtype(last.dtype) and (last == "").any()):
        _find_bad_row(path, body, first_line, ncols)
    # Columns pandas typed as bool ("True"/"False") or as int with leading zeros ("0001") are strings for us.
    reread = [lab for lab in labels if lab not in forced_str and df[lab].dtype == bool]
    int_cols = [lab for lab in labels if lab not in forced_str and lab not in _INT_LABELS
                and pd.api.types.is_integer_dtype(df[lab].dtype)]
    if int_cols and (_LEADING_ZERO_FIRST_RE.match(body) or _LEADING_ZERO_TOKEN_RE.search(body)):
        reread += int_cols
    if reread:
        raw = pd.read_csv(io.BytesIO(body), dtype=str, usecols=reread, **read_kw)
        for lab in reread:
            col = raw[lab]
            if df[lab].dtype == bool or col.str.match(r"[+-]?0\d").any():
                df[lab] = col
    return df


def read_star_with_version(path: str | os.PathLike) -> tuple[dict[str, Block], int | None]:
    """Read a STAR file: (blocks by name without ``data_``, first ``# version`` number or None).

    See :func:`read_star` for the block types.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputFileError(path, "file not found", "check the path") from None
    except IsADirectoryError:
        raise InputFileError(path, "is a directory, not a STAR file", "give the path of a .star file") from None
    except OSError as exc:
        raise InputFileError(path, f"cannot be read ({exc.strerror})", "check permissions") from None
    if b"\0" in data[:65536]:
        raise InputFileError(path, "is not a text file", "give a STAR file (text), not a binary file")

    blocks: dict[str, Block] = {}
    version: int | None = None
    pos, lineno, n = 0, 1, len(data)
    current: str | None = None  # name of the block being filled
    kind: str | None = None  # None (empty so far), "kv" or "loop"

    def next_line() -> tuple[str, int]:
        nonlocal pos, lineno
        end = data.find(b"\n", pos)
        if end < 0:
            end = n
        raw, this = data[pos:end], lineno
        pos, lineno = end + 1, lineno + 1
        try:
            return raw.decode("utf-8"), this
        except UnicodeDecodeError:
            raise InputFileError(path, f"line {this}: not UTF-8 text", "give a STAR file (text)") from None

    def start_block(name: str, at: int) -> None:
        nonlocal current, kind
        if name in blocks:
            raise InputFileError(path, f"line {at}: data block 'data_{name}' appears twice",
                                 "rename or remove one of the duplicate blocks")
        current, kind = name, None
        blocks[name] = {}

    while pos < n:
        line, at = next_line()
        s = line.strip()
        if not s:
            continue
        if s.startswith("#"):
            m = _VERSION_RE.match(s)
            if m and version is None:
                version = int(m.group(1))
            continue
        if s.startswith("data_"):
            start_block(s[5:].split()[0] if len(s) > 5 and not s[5].isspace() else "", at)
            continue
        if current is None:
            raise InputFileError(path, f"line {at}: content before the first data_ block: {s[:40]!r}",
                                 "a STAR file must start with a data_ line (after comments)")
        if s.startswith("loop_"):
            if kind is not None:
                raise InputFileError(path, f"line {at}: block 'data_{current}' mixes key-value pairs and a loop "
                                           "or has two loops", "split it into separate data_ blocks")
            kind = "loop"
            labels: list[str] = []
            # Header: _labels (comments and blank lines allowed), then the body.
            while pos < n:
                save_pos, save_line = pos, lineno
                hline, hat = next_line()
                hs = hline.strip()
                if not hs or hs.startswith("#"):
                    m = _VERSION_RE.match(hs)
                    if m and version is None:
                        version = int(m.group(1))
                    continue
                if hs.startswith("_"):
                    labels.append(hs.split()[0][1:])
                    continue
                pos, lineno = save_pos, save_line  # first body line (or next block): re-read it below
                break
            if not labels:
                raise InputFileError(path, f"line {at}: loop_ without any _labels", "add the column labels")
            if len(set(labels)) != len(labels):
                dup = sorted({lab for lab in labels if labels.count(lab) > 1})
                raise InputFileError(path, f"loop at line {at}: label(s) {', '.join(dup)} appear twice",
                                     "remove the duplicate columns")
            body_start, body_line = pos, lineno
            eol = data.find(b"\n", pos)
            first = data[pos:eol if eol >= 0 else n].strip()
            if first.startswith((b"data_", b"loop_")):
                body_end = pos  # empty loop followed directly by another block
            else:
                m = _LOOP_END_RE.search(data, pos)
                body_end = m.start() + 1 if m else n
            body = data[body_start:body_end]
            lineno += body.count(b"\n")
            pos = body_end
            blocks[current] = _parse_loop_body(path, labels, body, body_line)
            continue
        if s.startswith("_"):
            if kind == "loop":
                raise InputFileError(path, f"line {at}: key-value pair {s.split()[0]} after a loop in block "
                                           f"'data_{current}'", "put it in its own data_ block")
            kind = "kv"
            content = _strip_comments(s).strip() if "#" in s else s
            tokens = _tokenize(content)
            if len(tokens) != 2:
                raise InputFileError(path, f"line {at}: expected '_label value', got {len(tokens)} fields",
                                     "quote values that contain spaces")
            label = tokens[0][1:]
            blocks[current][label] = _convert_value(label, tokens[1])  # type: ignore[index]
            continue
        raise InputFileError(path, f"line {at}: unexpected content {s[:40]!r} in block 'data_{current}'",
                             "this is not valid STAR syntax (a loop row without loop_ header?)")
    return blocks, version


def read_star(path: str | os.PathLike) -> dict[str, Block]:
    """Read every data block of a STAR file.

    Returns ``{name: block}`` with the name without ``data_`` (the unnamed RELION-3.0 block is ``""``), in file
    order. Loop blocks are DataFrames (int64 / float64 / string columns, see module doc), key-value blocks are
    dicts; a block with no content is an empty dict. Raises InputFileError (one line, with the line number)
    for a missing file or malformed content.
    """
    return read_star_with_version(path)[0]


def star_version(path: str | os.PathLike) -> int | None:
    """The number of the first ``# version NNNNN`` comment before the first data row (None: RELION 3.0 style)."""
    path = Path(path)
    try:
        with open(path) as fh:
            for line in fh:
                s = line.strip()
                if not s:
                    continue
                if s.startswith("#"):
                    m = _VERSION_RE.match(s)
                    if m:
                        return int(m.group(1))
                    continue
                if s.startswith(("data_", "loop_", "_")):
                    continue
                return None  # reached data rows without a version line
    except FileNotFoundError:
        raise InputFileError(path, "file not found", "check the path") from None
    except UnicodeDecodeError:
        raise InputFileError(path, "is not a text file", "give a STAR file (text)") from None
    return None


# ------------------------------------------------------------------------------------------------ writing


#: portable (Python re and pyarrow's RE2, which pandas uses for pyarrow-backed strings): no \A / \Z
_NEEDS_QUOTE_PATTERN = r"^$|\s|\"|^[#_']"
_NEEDS_QUOTE_RE = re.compile(_NEEDS_QUOTE_PATTERN)


def _needs_quote(value: str) -> bool:
    return _NEEDS_QUOTE_RE.search(value) is not None


def _quote(value: str) -> str:
    if '"' in value:
        raise ValueError(f"cannot write a STAR value containing a double quote: {value!r}")
    return f'"{value}"'


FLOAT64_FORMAT = "%.12g"  # exact for every value RELION writes (<= 12 significant digits); relative error <= 5e-12
FLOAT32_FORMAT = "%.9g"  # 9 significant digits: exact round trip of any float32


def _column_for_rows(col: pd.Series, float_format: str | None) -> tuple[str, list]:
    """(printf conversion, values) of one column for row-wise ``fmt % row`` formatting."""
    dtype = col.dtype
    if pd.api.types.is_bool_dtype(dtype):
        return "%d", col.astype(np.int64).tolist()
    if pd.api.types.is_integer_dtype(dtype):
        if col.isna().any():  # nullable ints with missing values
            raise ValueError(f"column {col.name} has missing values")
        return "%d", col.to_numpy(dtype=np.int64).tolist()
    if pd.api.types.is_float_dtype(dtype):
        arr = col.to_numpy()
        fmt = float_format or (FLOAT32_FORMAT if arr.dtype in (np.float32, np.float16) else FLOAT64_FORMAT)
        values = arr.astype(np.float64)
        if fmt.endswith(("g", "G")):
            # A column whose values all print without '.' or exponent ("300") would read back as ints:
            # write integral values as "300.0" (exact for |x| < 2^53).
            finite = values[np.isfinite(values)]
            if np.all(finite == np.round(finite)) and (finite.size == 0 or np.abs(finite).max() < 1e15):
                fmt = "%.1f"
        return fmt, values.tolist()
    values = col.tolist()
    if pd.api.types.is_string_dtype(dtype) and not col.isna().any():
        # all strings: quote only those that need it (vectorised test)
        flags = col.str.contains(_NEEDS_QUOTE_PATTERN, regex=True).to_numpy(dtype=bool)
        for i in np.flatnonzero(flags).tolist():
            values[i] = _quote(values[i])
        return "%s", values
    # objects of mixed types: format element-wise by Python type
    return "%s", [_format_value(v, float_format) for v in values]


def _format_value(value: object, float_format: str | None = None) -> str:
    if isinstance(value, (bool, np.bool_)):
        return str(int(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        if float_format is None:
            float_format = FLOAT32_FORMAT if isinstance(value, (np.float32, np.float16)) else FLOAT64_FORMAT
        text = float_format % float(value)
        # keep it a float when read back ("3" would be an int)
        return text if any(c in text for c in ".eEnN") else text + ".0"
    if value is None:
        return '""'
    s = str(value)
    return _quote(s) if _needs_quote(s) else s


def _label(name: object) -> str:
    s = str(name)
    return s[1:] if s.startswith("_") else s


def _loop_text(df: pd.DataFrame, float_format: str | None) -> str:
    out = ["loop_\n"]
    out += [f"_{_label(c)} #{i + 1}\n" for i, c in enumerate(df.columns)]
    if len(df):
        convs, cols = zip(*(_column_for_rows(df.iloc[:, j], float_format) for j in range(df.shape[1])))
        fmt = " ".join(convs)
        out.append("\n".join([fmt % row for row in zip(*cols)]))  # one C-level format call per row
        out.append("\n")
    return "".join(out)


def _kv_text(block: Mapping[str, object], float_format: str | None) -> str:
    if not block:
        return ""
    width = max(len(_label(k)) for k in block) + 4
    return "".join(f"_{_label(k):<{width}} {_format_value(v, float_format)}\n" for k, v in block.items())


def write_star(path: str | os.PathLike, blocks: Mapping[str, Block] | pd.DataFrame,
               version: int | None = 30001, float_format: str | None = None) -> None:
    """Write data blocks to a STAR file atomically.

    Args:
        path: output file.
        blocks: ``{name: DataFrame (loop) | dict (key-value list)}`` in the order to write; a name of ``""``
            writes the unnamed ``data_`` block (RELION 3.0). A bare DataFrame is written as the unnamed block.
        version: ``# version`` number written before each block (RELION 3.1/4: 30001, 5: 50001);
            None writes no version line (RELION 3.0 style).
        float_format: printf format for floats (e.g. ``"%.8g"``); default ``%.12g`` (float64 columns and
            values) / ``%.9g`` (float32), see module doc.
    """
    if isinstance(blocks, pd.DataFrame):
        blocks = {"": blocks}
    parts: list[str] = []
    for name, block in blocks.items():
        parts.append("\n")
        if version is not None:
            parts.append(f"# version {int(version)}\n\n")
        parts.append(f"data_{name}\n\n")
        if isinstance(block, pd.DataFrame):
            parts.append(_loop_text(block, float_format))
        elif isinstance(block, Mapping):
            parts.append(_kv_text(block, float_format))
        else:
            raise TypeError(f"block {name!r}: expected a DataFrame or a dict, got {type(block).__name__}")
        parts.append("\n")
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "w") as fh:
            fh.write("".join(parts))
