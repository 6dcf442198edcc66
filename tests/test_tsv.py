"""TSV + .lineidx (VINVL.md 6.1): round trips, byte offsets, and one clear error per kind of damage."""
from __future__ import annotations

import pickle

import pytest

from aladin.io import PipelineError
from aladin.tsv import TSVFile, lineidx_path, write_tsv

ROWS = [["1", "café", "x"], ["22", "日本語 text", "y y"], ["333", "plain", ""], ["4", "ü" * 5, "z"]]


def naive_offsets(data: bytes) -> list[int]:
    """Row starts found by scanning the bytes for newlines, independent of the writer's bookkeeping."""
    starts, pos = [], 0
    for line in data.split(b"\n")[:-1]:
        starts.append(pos)
        pos += len(line) + 1
    return starts


def test_round_trip_non_ascii_offsets_are_bytes(tmp_path):
    path = tmp_path / "a.tsv"
    assert write_tsv(path, ROWS) == 4
    data = path.read_bytes()
    assert data == "".join("\t".join(r) + "\n" for r in ROWS).encode("utf-8")
    offsets = [int(x) for x in lineidx_path(path).read_text().split()]
    assert offsets == naive_offsets(data)
    assert offsets[1] == len("1\tcafé\tx\n".encode()) == 10  # 9 characters, 10 bytes
    tsv = TSVFile(path, expected_columns=3)
    assert len(tsv) == 4
    assert list(tsv) == ROWS
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.lineidx", "a.tsv"]  # no temp files left


def test_random_access_and_strip(tmp_path):
    path = tmp_path / "b.tsv"
    write_tsv(path, [[str(i), f" v{i} "] for i in range(50)])
    tsv = TSVFile(path)
    assert tsv[37] == ["37", "v37"]  # columns are stripped, as Oscar's reader does
    assert tsv[0] == ["0", "v0"]
    assert tsv[-1] == ["49", "v49"]
    assert tsv[3] == ["3", "v3"]
    with pytest.raises(IndexError):
        tsv[50]
    clone = pickle.loads(pickle.dumps(tsv))  # spawned DataLoader workers reopen the file
    assert clone[12] == ["12", "v12"]


def test_empty_file(tmp_path):
    path = tmp_path / "e.tsv"
    assert write_tsv(path, []) == 0
    assert len(TSVFile(path)) == 0


@pytest.mark.parametrize("bad", ["a\tb", "a\nb", "a\rb"])
def test_writer_rejects_separators_and_leaves_nothing(tmp_path, bad):
    path = tmp_path / "c.tsv"
    with pytest.raises(ValueError, match="row 2 column 2"):
        write_tsv(path, [["1", "ok"], ["2", bad]])
    assert list(tmp_path.iterdir()) == []


def test_failed_rewrite_keeps_previous_files(tmp_path):
    path = tmp_path / "d.tsv"
    write_tsv(path, [["old"]])

    def rows():
        yield ["new"]
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        write_tsv(path, rows())
    assert TSVFile(path)[0] == ["old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.lineidx", "d.tsv"]


def test_missing_lineidx(tmp_path):
    path = tmp_path / "f.tsv"
    write_tsv(path, [["1"]])
    lineidx_path(path).unlink()
    with pytest.raises(PipelineError, match=r"f\.lineidx: file not found"):
        TSVFile(path)


def test_offset_past_end_of_file(tmp_path):
    path = tmp_path / "g.tsv"
    write_tsv(path, [["1", "a"], ["2", "b"]])
    lineidx_path(path).write_text("0\n4\n999\n")
    with pytest.raises(PipelineError, match=r"g\.lineidx:3: offset 999 is past the end of g\.tsv \(8 bytes\)"):
        TSVFile(path)


def test_offset_not_at_line_start(tmp_path):
    path = tmp_path / "h.tsv"
    write_tsv(path, [["1", "a"], ["2", "b"], ["3", "c"]])
    lineidx_path(path).write_text("0\n4\n9\n")  # row 3 really starts at 8
    tsv = TSVFile(path)
    assert tsv[0] == ["1", "a"]
    with pytest.raises(PipelineError, match=r"h\.tsv:3: h\.lineidx offset 9 is not at a line start"):
        tsv[2]
    with pytest.raises(PipelineError, match=r"h\.tsv:2: row at offset 4 does not end at the next"):
        tsv[1]


def test_stale_index_after_truncation(tmp_path):
    path = tmp_path / "i.tsv"
    write_tsv(path, [["1", "aaaa"], ["2", "bbbb"]])
    path.write_bytes(path.read_bytes()[:-3])  # last row cut short, index unchanged
    with pytest.raises(PipelineError, match=r"i\.tsv:2: .*truncated"):
        TSVFile(path)[1]


def test_wrong_column_count(tmp_path):
    path = tmp_path / "j.tsv"
    write_tsv(path, [["1", "a", "b"], ["2", "a"]])
    tsv = TSVFile(path, expected_columns=3)
    assert tsv[0] == ["1", "a", "b"]
    with pytest.raises(PipelineError, match=r"j\.tsv:2: expected 3 tab-separated columns, found 2"):
        tsv[1]


def test_garbage_and_decreasing_lineidx(tmp_path):
    path = tmp_path / "k.tsv"
    write_tsv(path, [["1"], ["2"]])
    lineidx_path(path).write_text("0\nabc\n")
    with pytest.raises(PipelineError, match=r"k\.lineidx:2: not a byte offset"):
        TSVFile(path)
    lineidx_path(path).write_text("2\n0\n")
    with pytest.raises(PipelineError, match=r"k\.lineidx:2: offset 0 does not increase"):
        TSVFile(path)


def test_missing_tsv(tmp_path):
    with pytest.raises(PipelineError, match=r"nope\.tsv: file not found"):
        TSVFile(tmp_path / "nope.tsv")
