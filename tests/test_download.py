"""aladin.download against a loopback HTTP server started here (127.0.0.1 only, never the catalogue URLs)."""
from __future__ import annotations

import hashlib
import io
import socket
import stat
import tarfile
import threading
import zipfile
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from aladin.download import PAPER_FILES, RemoteFile, download, extract, fetch
from aladin.io import PipelineError

PAYLOAD = bytes((i * 7 + i // 251) % 256 for i in range(50_000))
SHA = hashlib.sha256(PAYLOAD).hexdigest()
FAST = dict(retries=3, timeout=5, chunk_size=4096, progress=False, backoff=0)


# ---------------------------------------------------------------------------------------------------
# Loopback server with switchable faults


@dataclass
class Route:
    data: bytes = PAYLOAD
    drop_after: int | None = None  # first request only: send this many bytes, then close the connection
    ignore_range: bool = False  # answer 200 with the whole body even to a Range request
    status: int = 200  # e.g. 404


@dataclass
class Log:
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range header)


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        routes, log = self.server.routes, self.server.log
        rng = self.headers.get("Range")
        with self.server.lock:
            first = not any(p == self.path for p, _ in log.requests)
            log.requests.append((self.path, rng))
        route = routes.get(self.path)
        if route is None or route.status != 200:
            self.send_error(route.status if route else 404)
            return
        data, start = route.data, 0
        if rng and not route.ignore_range:
            start = int(rng.removeprefix("bytes=").rstrip("-"))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if first and route.drop_after is not None:
            self.wfile.write(body[: route.drop_after])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)

    def log_message(self, *args):  # keep pytest output clean
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.routes, httpd.log, httpd.lock = {}, Log(), threading.Lock()
    httpd.timeout = 5
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    httpd.url = lambda path: f"http://127.0.0.1:{httpd.server_address[1]}{path}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


def remote(*urls, sha=SHA, size=len(PAYLOAD)):
    return RemoteFile("file.bin", tuple(urls), sha, size)


def leftovers(dest: Path):
    return sorted(p.name for p in dest.iterdir()) if dest.exists() else []


# ---------------------------------------------------------------------------------------------------
# download()


def test_resumes_with_range_after_dropped_connection(server, tmp_path):
    server.routes["/a"] = Route(drop_after=12_345)
    path = download(remote(server.url("/a")), tmp_path, **FAST)
    assert path == tmp_path / "file.bin" and path.read_bytes() == PAYLOAD
    assert server.log.requests == [("/a", None), ("/a", "bytes=12345-")]
    assert leftovers(tmp_path) == ["file.bin"]


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    server.routes["/a"] = Route(drop_after=10_000, ignore_range=True)
    path = download(remote(server.url("/a")), tmp_path, **FAST)
    assert path.read_bytes() == PAYLOAD  # not 10_000 bytes + the whole body appended
    assert server.log.requests == [("/a", None), ("/a", "bytes=10000-")]


def test_size_unknown_resume_uses_content_length(server, tmp_path):
    server.routes["/a"] = Route(drop_after=777)
    path = download(remote(server.url("/a"), size=None), tmp_path, **FAST)
    assert path.read_bytes() == PAYLOAD


def test_complete_part_answered_416_is_verified_not_refetched(server, tmp_path):
    server.routes["/a"] = Route()
    (tmp_path / ".file.bin.part").write_bytes(PAYLOAD)  # an earlier run died right before the rename
    path = download(remote(server.url("/a"), size=None), tmp_path, **FAST)
    assert path.read_bytes() == PAYLOAD
    assert server.log.requests == [("/a", f"bytes={len(PAYLOAD)}-")]


def test_corrupt_leftover_part_is_refetched_from_zero_on_same_mirror(server, tmp_path):
    server.routes["/a"] = Route()
    (tmp_path / ".file.bin.part").write_bytes(b"\xff" * 100)  # garbage from some older run
    path = download(remote(server.url("/a")), tmp_path, **FAST)
    assert path.read_bytes() == PAYLOAD
    assert server.log.requests == [("/a", "bytes=100-"), ("/a", None)]


def test_corrupt_mirror_falls_over_to_next(server, tmp_path):
    bad = bytearray(PAYLOAD)
    bad[4242] ^= 0xFF
    server.routes["/bad"], server.routes["/good"] = Route(data=bytes(bad)), Route()
    path = download(remote(server.url("/bad"), server.url("/good")), tmp_path, **FAST)
    assert path.read_bytes() == PAYLOAD
    assert [p for p, _ in server.log.requests] == ["/bad", "/good"]


def test_only_corrupt_mirror_raises_and_leaves_nothing(server, tmp_path):
    server.routes["/bad"] = Route(data=PAYLOAD[:-1] + b"x")
    with pytest.raises(PipelineError) as e:
        download(remote(server.url("/bad")), tmp_path, **FAST)
    msg = str(e.value)
    assert "file.bin" in msg and server.url("/bad") in msg and "sha256 mismatch" in msg
    assert str((tmp_path / "file.bin").resolve()) in msg and SHA in msg  # how to place it by hand
    assert leftovers(tmp_path) == []
    assert len(server.log.requests) == 1  # a whole wrong file is not retried on the same mirror


def test_wrong_size_is_refused(server, tmp_path):
    server.routes["/long"] = Route(data=PAYLOAD + b"extra")
    with pytest.raises(PipelineError, match="expected 50000 bytes"):
        download(remote(server.url("/long")), tmp_path, **FAST)
    assert leftovers(tmp_path) == []


def test_404_moves_to_next_mirror(server, tmp_path):
    server.routes["/gone"], server.routes["/good"] = Route(status=404), Route()
    path = download(remote(server.url("/gone"), server.url("/good")), tmp_path, **FAST)
    assert path.read_bytes() == PAYLOAD
    assert [p for p, _ in server.log.requests] == ["/gone", "/good"]  # 404 is not retried


def test_every_mirror_failing_lists_each_url_and_failure(server, tmp_path):
    with socket.socket() as s:  # a loopback port with nobody listening
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/x"
    server.routes["/gone"] = Route(status=404)
    with pytest.raises(PipelineError) as e:
        download(remote(dead, server.url("/gone")), tmp_path, **FAST)
    lines = str(e.value).splitlines()
    assert lines[0] == "could not download file.bin; tried:"
    assert lines[1].startswith(f"  {dead}: ") and "HTTP 404" in lines[2] and server.url("/gone") in lines[2]
    assert "Place the file by hand" in lines[3]


def test_present_correct_file_makes_no_request(server, tmp_path):
    (tmp_path / "file.bin").write_bytes(PAYLOAD)
    path = download(remote(server.url("/a")), tmp_path, **FAST)
    assert path.read_bytes() == PAYLOAD and server.log.requests == []


def test_present_wrong_file_is_replaced(server, tmp_path):
    server.routes["/a"] = Route()
    (tmp_path / "file.bin").write_bytes(b"stale")
    assert download(remote(server.url("/a")), tmp_path, **FAST).read_bytes() == PAYLOAD


def test_empty_sha256_refused_unless_allowed(server, tmp_path):
    server.routes["/a"] = Route()
    with pytest.raises(PipelineError, match="no sha256 is known.*allow_unverified=True"):
        download(remote(server.url("/a"), sha=""), tmp_path, **FAST)
    assert server.log.requests == [] and leftovers(tmp_path) == []
    path = download(remote(server.url("/a"), sha=""), tmp_path, allow_unverified=True, **FAST)
    assert path.read_bytes() == PAYLOAD


def test_bad_remote_descriptions_refused(tmp_path):
    with pytest.raises(PipelineError, match="not 64 lower-case hex"):
        download(RemoteFile("f", ("http://127.0.0.1:1/f",), "abc", None), tmp_path, **FAST)
    with pytest.raises(PipelineError, match="not an http"):
        download(RemoteFile("f", ("file:///etc/passwd",), SHA, None), tmp_path, **FAST)
    with pytest.raises(PipelineError, match="not a plain file name"):
        download(RemoteFile("../f", ("http://127.0.0.1:1/f",), SHA, None), tmp_path, **FAST)


def test_paper_catalogue_is_well_formed():
    for key, f in PAPER_FILES.items():
        assert f.urls and all(u.startswith(("http://", "https://")) for u in f.urls), key
        assert f.sha256 == ""  # no checksum is known from the specs; none is invented
    assert PAPER_FILES["coco_train2014"].urls == ("http://images.cocodataset.org/zips/train2014.zip",)
    assert PAPER_FILES["vinvl_detector"].name == "vinvl_vg_x152c4.pth"


# ---------------------------------------------------------------------------------------------------
# extract()


def make_zip(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members:
            zf.writestr(name, data)
    return path


def make_tar(path: Path, members: list[tarfile.TarInfo | tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tf.addfile(m)
            else:
                info = tarfile.TarInfo(m[0])
                info.size = len(m[1])
                tf.addfile(info, io.BytesIO(m[1]))
    return path


def link(name: str, target: str, kind=tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def test_clean_zip_and_tar_extract(tmp_path):
    files = [("a.txt", b"alpha"), ("sub/b.txt", b"beta")]
    out = extract(make_zip(tmp_path / "x.zip", files), tmp_path / "zip_out")
    assert (out / "a.txt").read_bytes() == b"alpha" and (out / "sub/b.txt").read_bytes() == b"beta"
    tar = make_tar(tmp_path / "x.tar.gz", files + [link("sub/to_a", "../a.txt")])
    out = extract(tar, tmp_path / "tar_out")
    assert (out / "sub/b.txt").read_bytes() == b"beta" and (out / "sub/to_a").read_bytes() == b"alpha"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tar_out", "x.tar.gz", "x.zip", "zip_out"]


@pytest.mark.parametrize("bad,member", [
    ({"files": [("../evil", b"x")]}, "../evil"),
    ({"files": [("/abs/evil", b"x")]}, "/abs/evil"),
    ({"symlinks": {"out": "../../outside"}}, "out"),
    ({"symlinks": {"out": "/etc"}}, "out"),
])
def test_zip_escapes_refused(tmp_path, bad, member):
    archive = tmp_path / "bad.zip"
    with zipfile.ZipFile(archive, "w") as zf:  # ZipFile.writestr keeps names as given
        zf.writestr("ok.txt", b"fine")
        for name, data in bad.get("files", []):
            zf.writestr(zipfile.ZipInfo(name), data)
        for name, target in bad.get("symlinks", {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    with pytest.raises(PipelineError) as e:
        extract(archive, tmp_path / "out_dir")
    assert str(archive) in str(e.value) and repr(member) in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.zip"]  # nothing extracted, no temp folder


@pytest.mark.parametrize("bad,member", [
    (("../evil", b"x"), "../evil"),
    (("/abs/evil", b"x"), "/abs/evil"),
    (link("out", "../../outside"), "out"),
    (link("out", "/etc/passwd"), "out"),
    (link("hard", "../outside", tarfile.LNKTYPE), "hard"),
    (link("dev", "", tarfile.CHRTYPE), "dev"),
])
def test_tar_escapes_refused(tmp_path, bad, member):
    archive = make_tar(tmp_path / "bad.tar.gz", [("ok.txt", b"fine"), bad])
    with pytest.raises(PipelineError) as e:
        extract(archive, tmp_path / "out_dir")
    assert str(archive) in str(e.value) and repr(member) in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.tar.gz"]


def test_tar_symlink_chain_escape_refused(tmp_path):
    # Each link looks inside lexically; "up" resolves to the parent of the destination only on disk.
    archive = make_tar(tmp_path / "chain.tar", [link("here", "."), link("up", "here/.."), ("up/evil", b"x")])
    with pytest.raises(PipelineError, match="refusing member"):
        extract(archive, tmp_path / "out_dir")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chain.tar"]


def test_not_an_archive(tmp_path):
    (tmp_path / "x.zip").write_bytes(b"plain text")
    with pytest.raises(PipelineError, match="neither a zip nor a tar"):
        extract(tmp_path / "x.zip", tmp_path / "out")


def test_fetch_downloads_and_extracts_once(server, tmp_path):
    data = (make_zip(tmp_path / "src.zip", [("captions.json", b"{}")])).read_bytes()
    server.routes["/c.zip"] = Route(data=data)
    f = RemoteFile("c.zip", (server.url("/c.zip"),), hashlib.sha256(data).hexdigest(), len(data), extract=True)
    dest = tmp_path / "dl"
    out = fetch(f, dest, **FAST)
    assert out == dest / "c" and (out / "captions.json").read_bytes() == b"{}"
    assert fetch(f, dest, **FAST) == out and len(server.log.requests) == 1
