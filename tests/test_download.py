"""aladin.download against a loopback HTTP server started here (127.0.0.1 only, never the catalogue URLs)."""
from __future__ import annotations

import hashlib
import io
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest
import yaml
from loopback import Route as _Route, dead_url, server  # noqa: F401  (server is a fixture)

from aladin import download as dl
from aladin.config import DownloadsConfig, RemoteFileConfig, params_from_dict
from aladin.download import RemoteFile, download, extract, fetch, fetch_param, remote_from_config
from aladin.io import PipelineError

PAYLOAD = bytes((i * 7 + i // 251) % 256 for i in range(50_000))
SHA = hashlib.sha256(PAYLOAD).hexdigest()
FAST = dict(retries=3, timeout=5, chunk_size=4096, progress=False, backoff=0)


def Route(data: bytes = PAYLOAD, **kwargs) -> _Route:
    return _Route(data=data, **kwargs)


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
    dead = dead_url()  # a loopback port with nobody listening
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


def test_catalogue_in_params_is_well_formed():
    downloads = DownloadsConfig()
    keys = dl.catalogue_keys(downloads)
    assert {"karpathy_split", "coco_annotations", "coco_train2014", "coco_val2014", "vinvl_detector",
            "vinvl_labelmap", "vinvl_backbone_weights", "bert_weights"} <= set(keys)
    for key in keys:
        entry = getattr(downloads, key)
        assert entry.urls and all(u.startswith(("http://", "https://")) for u in entry.urls), key
        assert entry.sha256 == ""  # no checksum is known from the specs; none is invented
        remote = remote_from_config(entry, key)
        assert remote.size is None and remote.sha256 == "" and remote.urls == entry.urls
    assert remote_from_config(downloads.coco_train2014).name == "train2014.zip"
    assert remote_from_config(downloads.vinvl_detector).name == "vinvl_vg_x152c4.pth"
    assert dl.param_path(downloads, "bert_weights") == Path("downloads/bert-base-uncased/model.safetensors")
    assert dl.param_path(downloads, "vinvl_backbone_config") == Path("downloads/vinvl_backbone/config.json")
    assert dl.param_path(downloads, "karpathy_split") == Path("downloads/caption_datasets.zip")


def test_remote_from_config_names_and_sizes():
    entry = RemoteFileConfig(urls=("https://h/a/b%20c.zip?sig=1&se=2", "https://m/x.zip"), sha256=SHA, size=12)
    assert remote_from_config(entry, extract=True) == RemoteFile("b c.zip", entry.urls, SHA, 12, extract=True)
    with pytest.raises(PipelineError, match="downloads.k: the first URL 'https://h/' does not end in a file name"):
        remote_from_config(RemoteFileConfig(urls=("https://h/",)), "k")
    with pytest.raises(PipelineError, match="downloads.k: no URL given"):
        remote_from_config(RemoteFileConfig(), "k")


def _downloads(tmp_path, **entries) -> DownloadsConfig:
    raw = {"dir": str(tmp_path / "dl"), "retries": 2, "timeout": 5}
    raw.update(entries)
    return params_from_dict({"downloads": raw}).downloads


def test_fetch_param_pinned_fetches_into_dir_and_group_folder(server, tmp_path, capsys):
    server.routes["/k/caption_datasets.zip"] = Route()
    server.routes["/b/model.safetensors"] = Route(drop_after=1000)
    downloads = _downloads(
        tmp_path,
        karpathy_split={"urls": [server.url("/k/caption_datasets.zip")], "sha256": SHA, "size": len(PAYLOAD)},
        bert_weights={"urls": [server.url("/gone/model.safetensors"), server.url("/b/model.safetensors")], "sha256": SHA,
                      "size": 0})
    path = fetch_param(downloads, "karpathy_split", **FAST)
    assert path == tmp_path / "dl" / "caption_datasets.zip" and path.read_bytes() == PAYLOAD
    path = fetch_param(downloads, "bert_weights", **FAST)
    assert path == tmp_path / "dl" / "bert-base-uncased" / "model.safetensors" and path.read_bytes() == PAYLOAD
    assert capsys.readouterr().err == ""  # pinned: no warning
    n = len(server.log.requests)
    fetch_param(downloads, "karpathy_split", **FAST)  # present and verified: no request
    assert len(server.log.requests) == n
    with pytest.raises(PipelineError, match="downloads.nope: no such catalogue entry"):
        fetch_param(downloads, "nope")


def test_fetch_param_unpinned_refused_unless_allowed_then_warns(server, tmp_path, capsys):
    server.routes["/x/vinvl_vg_x152c4.pth"] = Route()
    entry = {"urls": [server.url("/x/vinvl_vg_x152c4.pth")]}
    with pytest.raises(PipelineError) as e:
        fetch_param(_downloads(tmp_path, vinvl_detector=entry), "vinvl_detector", **FAST)
    assert "downloads.vinvl_detector (vinvl_vg_x152c4.pth): no sha256 is pinned" in str(e.value)
    assert "downloads.allow_unverified: true" in str(e.value) and server.log.requests == []
    path = fetch_param(_downloads(tmp_path, vinvl_detector=entry, allow_unverified=True), "vinvl_detector", **FAST)
    assert path.read_bytes() == PAYLOAD
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("warning: downloads.vinvl_detector: ")
    assert str(path) in err[0] and SHA in err[0] and f"size {len(PAYLOAD)} bytes" in err[0]


def test_fetch_param_failure_names_key_file_urls_and_where_to_put_it(server, tmp_path):
    dead = dead_url("/vinvl_vg_x152c4.pth")
    downloads = _downloads(tmp_path, vinvl_detector={"urls": [dead, server.url("/gone/vinvl_vg_x152c4.pth")],
                                                     "sha256": SHA})
    with pytest.raises(PipelineError) as e:
        fetch_param(downloads, "vinvl_detector", **FAST)
    msg = str(e.value)
    assert msg.startswith("downloads.vinvl_detector: could not download vinvl_vg_x152c4.pth; tried:")
    assert dead in msg and server.url("/gone/vinvl_vg_x152c4.pth") in msg and "HTTP 404" in msg
    assert f"Place the file by hand at {(tmp_path / 'dl' / 'vinvl_vg_x152c4.pth').resolve()}" in msg


def test_pin_prints_yaml_for_the_files_present(server, tmp_path, capsys):
    other = b"another file"
    server.routes["/a/VG-SGG-dicts-vgoi6-clipped.json"] = Route()
    server.routes["/b/vocab.txt"] = Route(data=other)
    downloads = {"dir": str(tmp_path / "dl"), "allow_unverified": True,
                 "vinvl_labelmap": {"urls": [server.url("/a/VG-SGG-dicts-vgoi6-clipped.json")]},
                 "bert_vocab": {"urls": [server.url("/b/vocab.txt")], "sha256": "0" * 64},
                 "vinvl_test_img_keys_1k": {"urls": []}}  # switched off: skipped, not an error
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"downloads": downloads}))
    assert dl.main(["--pin", "--params", str(params)]) == 1  # nothing downloaded yet
    assert "no file of the downloads catalogue" in capsys.readouterr().err
    fetch_param(params_from_dict({"downloads": downloads}).downloads, "vinvl_labelmap", **FAST)
    (tmp_path / "dl" / "bert-base-uncased").mkdir()
    (tmp_path / "dl" / "bert-base-uncased" / "vocab.txt").write_bytes(other)  # placed by hand, pin is wrong
    capsys.readouterr()
    assert dl.main(["--pin", "--params", str(params)]) == 0
    out = capsys.readouterr().out
    assert "# bert_vocab:" in out and "differs from the pinned sha256 " + "0" * 64 in out
    pinned = yaml.safe_load(out)
    assert pinned == {
        "vinvl_labelmap": {"urls": [server.url("/a/VG-SGG-dicts-vgoi6-clipped.json")], "sha256": SHA,
                           "size": len(PAYLOAD)},
        "bert_vocab": {"urls": [server.url("/b/vocab.txt")], "sha256": hashlib.sha256(other).hexdigest(),
                       "size": len(other)}}
    # Pasted into the params, the entries verify: no warning, no request.
    downloads.update(pinned, allow_unverified=False)
    n = len(server.log.requests)
    fetch_param(params_from_dict({"downloads": downloads}).downloads, "vinvl_labelmap", **FAST)
    assert len(server.log.requests) == n


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


def test_damaged_zip_is_named_and_leaves_nothing(tmp_path):
    good = make_zip(tmp_path / "src.zip", [("a.txt", b"alpha" * 100), ("b.txt", b"beta" * 100)]).read_bytes()
    flipped = bytearray(good)
    flipped[good.index(b"alpha" * 100) + 7] ^= 0x01  # stored member: a CRC mismatch on read
    (tmp_path / "crc.zip").write_bytes(bytes(flipped))
    with pytest.raises(PipelineError, match=r"crc\.zip: cannot extract \(BadZipFile: Bad CRC-32"):
        extract(tmp_path / "crc.zip", tmp_path / "out")
    (tmp_path / "cut.zip").write_bytes(good[: len(good) // 2])  # no central directory
    with pytest.raises(PipelineError, match=r"cut\.zip: neither a zip nor a tar archive \(truncated or damaged\?\)"):
        extract(tmp_path / "cut.zip", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crc.zip", "cut.zip", "src.zip"]


def test_fetch_extracts_again_when_the_archive_changed(server, tmp_path):
    first = make_zip(tmp_path / "one.zip", [("x.txt", b"one")]).read_bytes()
    second = make_zip(tmp_path / "two.zip", [("x.txt", b"two")]).read_bytes()
    server.routes["/c.zip"] = Route(data=first)
    dest = tmp_path / "dl"
    out = fetch(RemoteFile("c.zip", (server.url("/c.zip"),), "", None, extract=True), dest,
                allow_unverified=True, **FAST)
    assert (out / "x.txt").read_bytes() == b"one"
    server.routes["/c.zip"] = Route(data=second)  # a new pin: the old archive no longer verifies
    f = RemoteFile("c.zip", (server.url("/c.zip"),), hashlib.sha256(second).hexdigest(), len(second), extract=True)
    assert fetch(f, dest, **FAST) == out and (out / "x.txt").read_bytes() == b"two"


def test_fetch_of_a_damaged_archive_says_to_delete_it(server, tmp_path):
    data = b"PK\x03\x04 not really a zip"
    server.routes["/c.zip"] = Route(data=data)
    f = RemoteFile("c.zip", (server.url("/c.zip"),), hashlib.sha256(data).hexdigest(), len(data), extract=True)
    with pytest.raises(PipelineError) as e:
        fetch(f, tmp_path, **FAST)
    assert str(tmp_path / "c.zip") in str(e.value) and "delete" in str(e.value)
    assert not (tmp_path / "c").exists()
