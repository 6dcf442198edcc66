"""VinVL/Oscar TSV files with a `.lineidx` byte-offset index (VINVL.md section 6.1).

`X.tsv` holds one UTF-8 record per line, columns separated by tabs; `X.lineidx` beside it holds the byte
offset of every row start, one ASCII integer per line. Offsets are computed from the encoded bytes (SGB's
writer used `len(str)`, which is only right for ASCII rows).

Rows are read with `os.pread`, which does not move a shared file position, so one `TSVFile` stays correct
in DataLoader workers forked after it was opened.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from aladin.io import PipelineError, atomic_path

FORBIDDEN = ("\t", "\n", "\r")  # would split a column or a row when read back


def lineidx_path(tsv_path: str | Path) -> Path:
    """`X.tsv` -> `X.lineidx` (Oscar `tsv_file.py`: same stem, same folder)."""
    return Path(tsv_path).with_suffix(".lineidx")


# ---------------------------------------------------------------------------------------------------
# Writing


class TSVWriter:
    """Write `X.tsv` and `X.lineidx` row by row; both appear (tsv first, lineidx last) only on success.

    with TSVWriter("out/features.tsv") as w:
        w.write(["42", "3", "AAAA"])
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.rows = 0
        self._offset = 0
        self._stack: contextlib.ExitStack | None = None

    def __enter__(self) -> "TSVWriter":
        stack = contextlib.ExitStack()
        # Entered first, so renamed last: a reader never sees a .lineidx without its finished .tsv.
        tmp_idx = stack.enter_context(atomic_path(lineidx_path(self.path)))
        tmp_tsv = stack.enter_context(atomic_path(self.path))
        self._idx = stack.enter_context(open(tmp_idx, "wb"))
        self._tsv = stack.enter_context(open(tmp_tsv, "wb"))
        self._stack = stack
        return self

    def write(self, columns: Sequence[str]) -> None:
        for j, col in enumerate(columns):
            if not isinstance(col, str):
                raise TypeError(f"{self.path}: row {self.rows + 1} column {j + 1} is {type(col).__name__}, not str")
            bad = [c for c in FORBIDDEN if c in col]
            if bad:
                raise ValueError(f"{self.path}: row {self.rows + 1} column {j + 1} contains {bad[0]!r}")
        line = ("\t".join(columns) + "\n").encode("utf-8")
        self._idx.write(f"{self._offset}\n".encode("ascii"))
        self._tsv.write(line)
        self._offset += len(line)
        self.rows += 1

    def __exit__(self, *exc_info):
        stack, self._stack = self._stack, None
        return stack.__exit__(*exc_info)


def write_tsv(path: str | Path, rows: Iterable[Sequence[str]]) -> int:
    """Write `rows` (lists of str columns) to `path` and its `.lineidx`; returns the row count.

    A column containing a tab or newline raises ValueError and leaves no file behind.
    """
    with TSVWriter(path) as writer:
        for row in rows:
            writer.write(row)
    return writer.rows


# ---------------------------------------------------------------------------------------------------
# Reading


class TSVFile:
    """Random access to the rows of a TSV file through its `.lineidx`.

    `tsv[i]` -> list of str columns (split on tab, each stripped). Errors are `PipelineError`s naming the
    file and the 1-based line.
    """

    def __init__(self, path: str | Path, expected_columns: int | None = None):
        self.path = Path(path)
        self.idx_path = lineidx_path(self.path)
        self.expected_columns = expected_columns
        if not self.path.is_file():
            raise PipelineError(f"{self.path}: file not found")
        if not self.idx_path.is_file():
            raise PipelineError(f"{self.idx_path}: file not found (the index of {self.path.name})")
        self.size = self.path.stat().st_size
        self.offsets = self._read_offsets()
        self._fd: int | None = None
        self._pid: int | None = None

    def _read_offsets(self) -> list[int]:
        offsets = []
        with open(self.idx_path, "rb") as f:
            for n, raw in enumerate(f, start=1):
                text = raw.strip()
                if not text.isdigit():  # isdigit on bytes: ASCII digits only
                    raise PipelineError(f"{self.idx_path}:{n}: not a byte offset: {raw[:40]!r}")
                offset = int(text)
                if offsets and offset <= offsets[-1]:
                    raise PipelineError(f"{self.idx_path}:{n}: offset {offset} does not increase "
                                        f"(previous {offsets[-1]}); the index does not match {self.path.name}")
                offsets.append(offset)
        if offsets and offsets[-1] >= self.size:
            raise PipelineError(f"{self.idx_path}:{len(offsets)}: offset {offsets[-1]} is past the end of "
                                f"{self.path.name} ({self.size} bytes); the index does not match the file")
        if not offsets and self.size:
            raise PipelineError(f"{self.idx_path}: empty index for non-empty {self.path.name}")
        return offsets

    def __len__(self) -> int:
        return len(self.offsets)

    def _pread(self, n: int, offset: int) -> bytes:
        if self._fd is None or self._pid != os.getpid():
            self._fd = os.open(self.path, os.O_RDONLY)
            self._pid = os.getpid()
        return os.pread(self._fd, n, offset)

    def __getitem__(self, i: int) -> list[str]:
        if not isinstance(i, int):
            raise TypeError(f"row index must be int, got {type(i).__name__}")
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"{self.path}: row {i} out of range ({len(self)} rows)")
        line_no = i + 1
        start = self.offsets[i]
        end = self.offsets[i + 1] if i + 1 < len(self) else self.size
        # Cheap consistency check: a row starts the file or follows a newline, and ends with one.
        if start > 0 and self._pread(1, start - 1) != b"\n":
            raise PipelineError(f"{self.path}:{line_no}: {self.idx_path.name} offset {start} is not at a line "
                                f"start; the index does not match the file")
        raw = self._pread(end - start, start)
        if not raw.endswith(b"\n") or b"\n" in raw[:-1]:
            raise PipelineError(f"{self.path}:{line_no}: row at offset {start} does not end at the next "
                                f"{self.idx_path.name} offset {end}; the file is truncated or the index stale")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise PipelineError(f"{self.path}:{line_no}: not UTF-8 ({e.reason} at byte {e.start})") from None
        columns = [c.strip() for c in text.split("\t")]
        if self.expected_columns is not None and len(columns) != self.expected_columns:
            raise PipelineError(f"{self.path}:{line_no}: expected {self.expected_columns} tab-separated columns, "
                                f"found {len(columns)}")
        return columns

    def __iter__(self) -> Iterator[list[str]]:
        for i in range(len(self)):
            yield self[i]

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "TSVFile":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()

    def __getstate__(self):  # picklable for spawned DataLoader workers: the descriptor is reopened there
        state = self.__dict__.copy()
        state["_fd"] = None
        state["_pid"] = None
        return state
