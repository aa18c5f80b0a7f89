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
* A loop body is parsed by :func:`pandas.read_csv` (C parser): 10^5 rows x 20 columns in well under a second.

Floats are written with the shortest representation that reads back to the identical number (Python
``repr`` for float64 columns, the shortest float32 representation for float32 columns), unless an explicit
``float_format`` such as ``"%.8g"`` is given; ints are written as ints; strings containing whitespace, ``"``
or ``#`` (and empty strings) are double-quoted.
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

__all__ = ["read_star", "read_star_with_version", "write_star", "star_version", "is_string_label"]

Block = pd.DataFrame | dict[str, object]

_VERSION_RE = re.compile(r"^\s*#\s*version\s+(\d+)")
# A line that ends a loop body: blank, or the start of a new block / loop / label.
_LOOP_END_RE = re.compile(r"^[ \t]*(?:\r?$|data_|loop_|_)", re.M)
# An all-digit token with a leading zero ("0001"): such a column is kept as strings.
_LEADING_ZERO_TOKEN_RE = re.compile(r"(?:^|[ \t])[+-]?0\d+(?=[ \t\r]|$)", re.M)
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


def is_string_label(label: str) -> bool:
    """True for labels RELION stores as strings (file names, names): their values are never converted to numbers."""
    return label in _STRING_LABELS or (label.startswith("rln") and label.endswith(_STRING_LABEL_SUFFIXES))


# ------------------------------------------------------------------------------------------------ reading


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


def _find_bad_row(path: Path, body: str, first_line: int, ncols: int) -> None:
    """Slow path: raise an InputFileError for the first row whose field count differs from ``ncols``."""
    for i, line in enumerate(body.split("\n")):
        content = _strip_comments(line).strip()
        if not content:
            continue
        n = len(_tokenize(content))
        if n != ncols:
            raise InputFileError(
                path, f"line {first_line + i}: loop row has {n} fields but the loop declares {ncols} labels",
                "fix or remove that row; every row needs one value per _rln label")


def _parse_loop_body(path: Path, labels: list[str], body: str, first_line: int) -> pd.DataFrame:
    ncols = len(labels)
    if not body.strip():
        return pd.DataFrame({lab: pd.Series([], dtype=object) for lab in labels})
    if "#" in body:
        body = _strip_comments(body)
    forced_str = {lab: str for lab in labels if is_string_label(lab)}
    read_kw = dict(sep=r"\s+", header=None, names=labels, quotechar='"', keep_default_na=False,
                   na_values=_NA_VALUES, skip_blank_lines=True, engine="c", index_col=False)
    try:
        df = pd.read_csv(io.StringIO(body), dtype=forced_str or None, **read_kw)
    except (pd.errors.ParserError, ValueError) as exc:
        _find_bad_row(path, body, first_line, ncols)
        raise InputFileError(path, f"cannot parse the loop starting at line {first_line}: "
                                   f"{str(exc).strip().splitlines()[-1]}", "check the file is a valid STAR file") from exc
    # Rows with too few fields are padded by pandas with "" (or NaN): check the file when the last column has any.
    last = df[labels[-1]]
    if last.isna().any() or (not pd.api.types.is_numeric_dtype(last.dtype) and (last == "").any()):
        _find_bad_row(path, body, first_line, ncols)
    # Columns pandas typed as bool ("True"/"False") or as int with leading zeros ("0001") are strings for us.
    reread = [lab for lab in labels if lab not in forced_str and df[lab].dtype == bool]
    int_cols = [lab for lab in labels if lab not in forced_str and pd.api.types.is_integer_dtype(df[lab].dtype)]
    if int_cols and _LEADING_ZERO_TOKEN_RE.search(body):
        reread += int_cols
    if reread:
        raw = pd.read_csv(io.StringIO(body), dtype=str, usecols=reread, **read_kw)
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
        text = path.read_text()
    except FileNotFoundError:
        raise InputFileError(path, "file not found", "check the path") from None
    except IsADirectoryError:
        raise InputFileError(path, "is a directory, not a STAR file", "give the path of a .star file") from None
    except UnicodeDecodeError:
        raise InputFileError(path, "is not a text file", "give a STAR file (text), not a binary file") from None
    except OSError as exc:
        raise InputFileError(path, f"cannot be read ({exc.strerror})", "check permissions") from None

    blocks: dict[str, Block] = {}
    version: int | None = None
    pos, lineno, n = 0, 1, len(text)
    current: str | None = None  # name of the block being filled
    kind: str | None = None  # None (empty so far), "kv" or "loop"

    def next_line() -> tuple[str, int]:
        nonlocal pos, lineno
        end = text.find("\n", pos)
        if end < 0:
            end = n
        line, this = text[pos:end], lineno
        pos, lineno = end + 1, lineno + 1
        return line, this

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
            first = text[pos:text.find("\n", pos) if text.find("\n", pos) >= 0 else n].strip()
            if first.startswith(("data_", "loop_")):
                body_end = pos  # empty loop followed directly by another block
            else:
                m = _LOOP_END_RE.search(text, pos)
                body_end = m.start() if m else n
            body = text[body_start:body_end]
            lineno += body.count("\n")
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


def _needs_quote(value: str) -> bool:
    return value == "" or any(c.isspace() for c in value) or '"' in value or value.startswith(("#", "_", "'"))


def _quote(value: str) -> str:
    if '"' in value:
        raise ValueError(f"cannot write a STAR value containing a double quote: {value!r}")
    return f'"{value}"'


def _format_float_array(values: np.ndarray, float_format: str | None) -> list[str]:
    if float_format is not None:
        return [float_format % v for v in values.tolist()]
    if values.dtype == np.float32 or values.dtype == np.float16:
        # Shortest representation that reads back to the same float32 (numpy Dragon4).
        return values.astype(np.float32).astype(str).tolist()
    return list(map(repr, values.astype(np.float64).tolist()))


def _format_column(col: pd.Series, float_format: str | None) -> list[str]:
    dtype = col.dtype
    if pd.api.types.is_bool_dtype(dtype):
        return col.astype(np.int64).astype(str).tolist()
    if pd.api.types.is_integer_dtype(dtype):
        if col.isna().any():  # nullable ints with missing values
            raise ValueError(f"column {col.name} has missing values")
        return list(map(str, col.to_numpy(dtype=np.int64).tolist()))
    if pd.api.types.is_float_dtype(dtype):
        return _format_float_array(col.to_numpy(), float_format)
    # strings / objects: format element-wise by Python type
    return [_format_value(v, float_format) for v in col.tolist()]


def _format_value(value: object, float_format: str | None = None) -> str:
    if isinstance(value, (bool, np.bool_)):
        return str(int(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        if float_format is not None:
            return float_format % float(value)
        if isinstance(value, (np.float32, np.float16)):
            return str(np.float32(value))
        return repr(float(value))
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
        cols = [_format_column(df.iloc[:, j], float_format) for j in range(df.shape[1])]
        out.append("\n".join(map(" ".join, zip(*cols))))
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
        float_format: printf format for floats (e.g. ``"%.8g"``); default: shortest exact representation.
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
