"""The tables the published sets come in (CSV, Parquet, an Excel sheet, whitespace-separated
text), read into plain rows keyed by lower-case column name."""
from __future__ import annotations

import io
import zipfile

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from iqa_spider import storage


def _keyed(table: pa.Table) -> tuple[list[str], list[dict]]:
    names = [c.strip().lower() for c in table.column_names]
    columns = [table.column(i).to_pylist() for i in range(table.num_columns)]
    return names, [dict(zip(names, values)) for values in zip(*columns)]


def read_rows(uri: str, text_columns: tuple[str, ...] = ()) -> tuple[list[str], list[dict]]:
    """(lower-case column names, every row as {column: value}) of a .csv, .parquet or .xlsx
    table. `text_columns` (lower-case) stay strings: an image named 0001 must not become 1."""
    data = storage.read_bytes(uri)
    lower = uri.lower()
    if lower.endswith(".parquet"):
        return _keyed(pq.read_table(io.BytesIO(data)))
    if lower.endswith((".xlsx", ".xlsm")):
        return _xlsx_rows(uri, data, text_columns)
    table = pacsv.read_csv(io.BytesIO(data))
    types = {name: pa.string() for name in table.column_names
             if name.strip().lower() in text_columns and not pa.types.is_string(table.schema.field(name).type)}
    if types:  # read again, those columns as text
        table = pacsv.read_csv(io.BytesIO(data), convert_options=pacsv.ConvertOptions(column_types=types))
    return _keyed(table)


def _xlsx_rows(uri: str, data: bytes, text_columns: tuple[str, ...]) -> tuple[list[str], list[dict]]:
    from openpyxl import load_workbook  # only for .xlsx (SPAQ's sheet)

    try:
        sheet = load_workbook(io.BytesIO(data), read_only=True, data_only=True).worksheets[0]
    except (zipfile.BadZipFile, KeyError, EOFError, IndexError) as exc:  # a file that is no workbook
        raise ValueError(f"{uri}: not a readable .xlsx workbook ({type(exc).__name__}: {exc})") from None
    rows = sheet.iter_rows(values_only=True)
    header = [str(h).strip().lower() if h is not None else "" for h in next(rows, ())]
    if not any(header):
        raise ValueError(f"{uri}: the first sheet has no header row")
    out = []
    for values in rows:
        if values is None or all(v is None for v in values):
            continue
        row = dict(zip(header, values))
        for col in text_columns:
            if row.get(col) is not None:
                row[col] = str(row[col])
        out.append(row)
    return header, out


def cell_text(value) -> str:
    """A cell as stripped text; "" for an empty one (None from CSV, Parquet or a sheet)."""
    return "" if value is None else str(value).strip()


def pick_column(uri: str, columns: list[str], candidates: tuple[str, ...], what: str) -> str:
    """The first of `candidates` (lower-case) that the table has, or a ValueError naming them."""
    found = next((c for c in candidates if c in columns), None)
    if found is None:
        raise ValueError(f"{uri}: needs a {what} column ({' / '.join(candidates)}); has {columns}")
    return found
