"""Tests for near_engine.asset: the `.near` file (an LH-SLAT in one safetensors file)."""

from __future__ import annotations

import json
import os
import random
import struct

import numpy as np
import pytest

import near_engine.asset as asset_mod
from near_engine.asset import Asset, describe_asset, read_asset, write_asset
from near_engine.errors import AssetError

# --------------------------------------------------------------------------------------------------------- helpers


def make_asset(n: int = 5, c: int = 8, resolution: int = 64, seed: int = 0, extras: bool = True, **kw) -> Asset:
    rng = np.random.default_rng(seed)
    flat = rng.choice(resolution**3, size=n, replace=False)
    coords = np.stack(np.unravel_index(flat, (resolution,) * 3), axis=1).astype(np.int32)
    feats = rng.normal(size=(n, c)).astype(np.float32)
    ex = {"color_feats": rng.normal(size=(n, 4)).astype(np.float32)} if extras else {}
    fields = dict(coords=coords, feats=feats, extras=ex, resolution=resolution, latent="lh-slat",
                  model="near-tiny", source="sha256:" + "ab" * 32)
    fields.update(kw)
    return Asset(**fields)


def raw_file(tensors: dict, metadata: dict | None, header_extra: dict | None = None) -> bytes:
    """A safetensors file built by hand: tensors = {name: (dtype, shape, raw bytes)}, laid out in order."""
    header: dict = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    body = b""
    for name, (dtype, shape, buf) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [len(body), len(body) + len(buf)]}
        body += buf
    if header_extra:
        header.update(header_extra)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + body


def good_metadata(**over) -> dict:
    md = {"format": "near-asset", "format_version": "1", "resolution": "64", "latent": "lh-slat",
          "model": "near-tiny", "source": "sha256:00"}
    md.update(over)
    return {k: v for k, v in md.items() if v is not None}


def good_tensors(n: int = 3, c: int = 8) -> dict:
    coords = np.array([[0, 0, 0], [1, 2, 3], [63, 63, 63]][:n], dtype=np.int32)
    feats = np.arange(n * c, dtype=np.float32).reshape(n, c) / 10
    return {"coords": ("I32", coords.shape, coords.tobytes()), "feats": ("F32", feats.shape, feats.tobytes())}


def f32(arr) -> tuple:
    a = np.asarray(arr, dtype=np.float32)
    return ("F32", a.shape, a.tobytes())


def i32(arr) -> tuple:
    a = np.asarray(arr, dtype=np.int32)
    return ("I32", a.shape, a.tobytes())


# ------------------------------------------------------------------------------------------------- round trip etc.


def test_round_trip_keeps_everything(tmp_path):
    a = make_asset(n=40, c=8, extras=True)
    a = Asset(coords=a.coords, feats=a.feats, extras={**a.extras, "albedo.v2": np.ones((40, 3))},
              resolution=64, latent="lh-slat", model="near-tiny@3", source="sha256:" + "cd" * 32)
    p = tmp_path / "chair.near"
    write_asset(p, a)
    b = read_asset(p)
    assert b == a
    np.testing.assert_array_equal(b.coords, a.coords)
    np.testing.assert_array_equal(b.feats, a.feats)
    assert set(b.extras) == {"color_feats", "albedo.v2"}
    for k in a.extras:
        np.testing.assert_array_equal(b.extras[k], a.extras[k])
        assert b.extras[k].dtype == np.float32
    assert b.coords.dtype == np.int32 and b.feats.dtype == np.float32
    assert (b.resolution, b.latent, b.model, b.source, b.format_version) == (
        64, "lh-slat", "near-tiny@3", "sha256:" + "cd" * 32, 1)
    assert b.num_voxels == 40 and b.channels == 8
    assert b.fingerprint() == a.fingerprint()


def test_written_metadata_is_as_documented(tmp_path):
    from safetensors import safe_open

    p = tmp_path / "a.near"
    write_asset(p, make_asset(resolution=32, model="m", source="s", latent="lh-slat"))
    with safe_open(str(p), framework="numpy") as f:
        md = f.metadata()
        keys = set(f.keys())
    assert md == {"format": "near-asset", "format_version": "1", "resolution": "32", "latent": "lh-slat",
                  "model": "m", "source": "s"}
    assert keys == {"coords", "feats", "color_feats"}
    assert b"pickle" not in p.read_bytes()[:64] and p.read_bytes()[8:9] == b"{"


def test_round_trip_without_extras_and_other_resolution(tmp_path):
    a = make_asset(n=1, c=3, resolution=1, extras=False, model="", source="")
    p = tmp_path / "one.near"
    write_asset(p, a)
    b = read_asset(str(p))
    assert b == a and b.extras == {} and b.resolution == 1
    np.testing.assert_array_equal(b.coords, [[0, 0, 0]])


def test_float16_latents_are_read_as_float32(tmp_path):
    feats16 = (np.arange(24).reshape(3, 8) / 7).astype(np.float16)
    extra16 = np.full((3, 2), 0.1, np.float16)
    t = good_tensors()
    t["feats"] = ("F16", feats16.shape, feats16.tobytes())
    t["color_feats"] = ("F16", extra16.shape, extra16.tobytes())
    p = tmp_path / "half.near"
    p.write_bytes(raw_file(t, good_metadata()))
    b = read_asset(p)
    assert b.feats.dtype == np.float32 and b.extras["color_feats"].dtype == np.float32
    np.testing.assert_array_equal(b.feats, feats16.astype(np.float32))
    np.testing.assert_array_equal(b.extras["color_feats"], extra16.astype(np.float32))


def test_hand_built_reference_file_reads():
    """Guards the hand-built files the failure tests start from: unmodified, they are valid."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "ok.near")
        with open(p, "wb") as f:
            f.write(raw_file({**good_tensors(), "color_feats": f32(np.zeros((3, 2)))}, good_metadata()))
        a = read_asset(p)
    assert a.num_voxels == 3 and a.channels == 8 and list(a.extras) == ["color_feats"]
    np.testing.assert_array_equal(a.coords[2], [63, 63, 63])


def test_asset_arrays_are_read_only_copies():
    coords = np.array([[1, 2, 3]], dtype=np.int64)
    feats = np.array([[1.0, 2.0]], dtype=np.float64)
    a = Asset(coords=coords, feats=feats, resolution=8)
    coords[0, 0] = 7
    feats[0, 0] = 99
    assert a.coords[0, 0] == 1 and a.feats[0, 0] == 1.0
    assert a.coords.dtype == np.int32 and a.feats.dtype == np.float32
    with pytest.raises(ValueError):
        a.feats[0, 0] = 5
    with pytest.raises(ValueError):
        a.coords[0, 0] = 5
    with pytest.raises(AttributeError):
        a.resolution = 32  # frozen


def test_voxel_centers_closed_form():
    a = Asset(coords=[[0, 0, 0], [1, 1, 0]], feats=np.zeros((2, 1)), resolution=2)
    np.testing.assert_array_equal(a.voxel_centers(), [[-0.25, -0.25, -0.25], [0.25, 0.25, -0.25]])
    assert a.voxel_centers().dtype == np.float32 and a.voxel_centers().shape == (2, 3)
    one = Asset(coords=[[0, 0, 0]], feats=np.zeros((1, 1)), resolution=1)
    np.testing.assert_array_equal(one.voxel_centers(), [[0.0, 0.0, 0.0]])
    g = Asset(coords=[[0, 63, 32]], feats=np.zeros((1, 1)), resolution=64)
    np.testing.assert_allclose(g.voxel_centers(), [[-0.5 + 1 / 128, 0.5 - 1 / 128, 1 / 128]], rtol=0, atol=1e-7)
    # every centre lies strictly inside the unit cube [-0.5, 0.5]^3
    big = make_asset(n=500, resolution=64)
    c = big.voxel_centers()
    assert np.all(c > -0.5) and np.all(c < 0.5)


# ------------------------------------------------------------------------------------------------------ fingerprint


def test_fingerprint_is_stable_and_content_only():
    a = make_asset(n=6, seed=3)
    same = Asset(coords=a.coords.copy(), feats=a.feats.copy(), extras={k: v.copy() for k, v in a.extras.items()},
                 resolution=a.resolution, latent=a.latent, model="other-weights", source="sha256:ff")
    assert a.fingerprint() == same.fingerprint()  # model/source do not change what the decoder sees
    assert a != same  # ...but they are different assets
    assert a == Asset(coords=same.coords, feats=same.feats, extras=same.extras, model=a.model, source=a.source)
    assert len(a.fingerprint()) == 64 and int(a.fingerprint(), 16) >= 0
    # a fixed asset has a fixed fingerprint: caches on disk stay valid across versions of this code
    pinned = Asset(coords=[[0, 1, 2]], feats=[[0.5, -1.0]], extras={"color_feats": [[2.0]]}, resolution=4,
                   latent="lh-slat")
    assert pinned.fingerprint() == PINNED_FINGERPRINT


PINNED_FINGERPRINT = "b6935402a7d4a604e3ad75b0c9edbf107a1ff3daf054b149b537e3971bbec447"


def _variants(a: Asset) -> dict[str, Asset]:
    def rep(**kw):
        fields = dict(coords=a.coords, feats=a.feats, extras=a.extras, resolution=a.resolution, latent=a.latent,
                      model=a.model, source=a.source)
        fields.update(kw)
        return Asset(**fields)

    coords = a.coords.copy()
    free = next(c for c in range(a.resolution) if not any((row == [coords[0, 0], coords[0, 1], c]).all()
                                                            for row in coords))
    coords[0, 2] = free  # moved to a free voxel, so the coords stay unique
    feats = a.feats.copy()
    feats[2, 5] = np.nextafter(feats[2, 5], np.float32(np.inf))
    extra = a.extras["color_feats"].copy()
    extra[-1, -1] += 1.0
    return {
        "coords": rep(coords=coords),
        "row order": rep(coords=a.coords[::-1], feats=a.feats[::-1],
                         extras={k: v[::-1] for k, v in a.extras.items()}),
        "feats one ulp": rep(feats=feats),
        "feats extra channel": rep(feats=np.concatenate([a.feats, np.zeros((a.num_voxels, 1))], axis=1)),
        "extras value": rep(extras={"color_feats": extra}),
        "extras renamed": rep(extras={"base_feats": a.extras["color_feats"]}),
        "extras added": rep(extras={**a.extras, "more": np.zeros((a.num_voxels, 1))}),
        "extras removed": rep(extras={}),
        "resolution": rep(resolution=a.resolution * 2),
        "latent": rep(latent="slat"),
    }


def test_fingerprint_changes_with_every_content_field():
    a = make_asset(n=6, seed=1, resolution=16)
    base = a.fingerprint()
    prints = {name: v.fingerprint() for name, v in _variants(a).items()}
    for name, fp in prints.items():
        assert fp != base, f"fingerprint did not change with {name}"
    assert len(set(prints.values())) == len(prints)  # and the variants differ from each other


def test_fingerprint_survives_file_round_trip(tmp_path):
    a = make_asset(n=30, seed=5)
    write_asset(tmp_path / "x.near", a)
    assert read_asset(tmp_path / "x.near").fingerprint() == a.fingerprint()


# ------------------------------------------------------------------------------------------- in-memory validation

_C = np.array([[0, 0, 0], [1, 1, 1]])
_F = np.zeros((2, 4), np.float32)


@pytest.mark.parametrize(
    "kwargs, phrase",
    [
        (dict(coords=np.zeros((0, 3), int), feats=np.zeros((0, 4))), "no voxels"),
        (dict(coords=[[0, 0, 64], [1, 1, 1]], feats=_F), "outside the 64^3 grid"),
        (dict(coords=[[0, -1, 0], [1, 1, 1]], feats=_F), "1 voxel outside"),
        (dict(coords=[[1, 1, 1], [1, 1, 1]], feats=_F), "1 duplicate voxel"),
        (dict(coords=[[0.0, 0, 0], [1, 1, 1]], feats=_F), "whole numbers"),
        (dict(coords=[[0, 0], [1, 1]], feats=_F), "[N, 3]"),
        (dict(coords=_C, feats=np.zeros((3, 4))), "3 rows for 2 voxels"),
        (dict(coords=_C, feats=np.zeros((2, 0))), "no channels"),
        (dict(coords=_C, feats=np.zeros(2)), "[voxels, channels]"),
        (dict(coords=_C, feats=np.zeros((2, 4), np.int32)), "floating-point"),
        (dict(coords=_C, feats=np.array([[np.nan, 0], [np.inf, -np.inf]])), "3 NaN or infinite values"),
        (dict(coords=_C, feats=np.full((2, 1), 1e300)), "2 NaN or infinite values"),  # float64 overflows float32
        (dict(coords=_C, feats=_F, extras={"color_feats": np.zeros((1, 4))}), "1 rows for 2 voxels"),
        (dict(coords=_C, feats=_F, extras={"feats": np.zeros((2, 4))}), "unusable name"),
        (dict(coords=_C, feats=_F, extras={"bad name!": np.zeros((2, 4))}), "unusable name"),
        (dict(coords=_C, feats=_F, extras={"e": np.full((2, 1), np.nan)}), "in its latent 'e'"),
        (dict(coords=_C, feats=_F, resolution=0), "between 1 and 1024"),
        (dict(coords=_C, feats=_F, resolution=2048), "between 1 and 1024"),
        (dict(coords=_C, feats=_F, resolution=64.0), "not a whole number"),
        (dict(coords=_C, feats=_F, resolution=True), "not a whole number"),
        (dict(coords=_C, feats=_F, latent=""), "empty 'latent'"),
        (dict(coords=_C, feats=_F, model=3), "'model' that is not text"),
        (dict(coords=_C, feats=_F, format_version=2), "format version 2"),
        (dict(coords=_C, feats=_F, model="near\0tiny"), "control character ('\\x00', position 4) in its 'model'"),
        (dict(coords=_C, feats=_F, source="\x1b[2Jphoto.png"), "control character ('\\x1b', position 0)"),
        (dict(coords=_C, feats=_F, latent="lh\nslat"), "in its 'latent' text"),
    ],
)
def test_asset_rejects_bad_fields(kwargs, phrase):
    with pytest.raises(AssetError) as info:
        Asset(**kwargs)
    assert phrase in str(info.value)


# ---------------------------------------------------------------------------------------------------------- writing


def test_write_replaces_atomically_and_leaves_no_temp_files(tmp_path):
    p = tmp_path / "obj.near"
    write_asset(p, make_asset(n=4, seed=1))
    write_asset(p, make_asset(n=9, seed=2))
    assert read_asset(p).num_voxels == 9
    assert sorted(os.listdir(tmp_path)) == ["obj.near"]


def test_failed_write_keeps_old_file_and_cleans_up(tmp_path, monkeypatch):
    p = tmp_path / "obj.near"
    write_asset(p, make_asset(n=4, seed=1))
    before = p.read_bytes()

    def crash(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(asset_mod.os, "replace", crash)
    with pytest.raises(AssetError, match="No space left on device") as info:
        write_asset(p, make_asset(n=9, seed=2))
    assert "'obj.near'" in str(info.value)
    assert p.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["obj.near"]


def test_write_into_missing_folder_or_onto_folder_is_asset_error(tmp_path):
    with pytest.raises(AssetError, match="Could not write"):
        write_asset(tmp_path / "nope" / "a.near", make_asset())
    (tmp_path / "dir.near").mkdir()
    with pytest.raises(AssetError, match="folder"):
        write_asset(tmp_path / "dir.near", make_asset())
    with pytest.raises(TypeError):
        write_asset(tmp_path / "a.near", {"coords": 1})


# ----------------------------------------------------------------------------------------------------- bad files


def _bytes_case(data: bytes):
    def build(tmp_path):
        p = tmp_path / "chair.near"
        p.write_bytes(data)
        return p

    return build


def _missing(tmp_path):
    return tmp_path / "chair.near"


def _folder(tmp_path):
    p = tmp_path / "chair.near"
    p.mkdir()
    return p


def _fifo(tmp_path):
    p = tmp_path / "chair.near"
    os.mkfifo(p)  # reading it would block forever: must be refused from stat alone
    return p


def _valid_bytes() -> bytes:
    return raw_file(good_tensors(), good_metadata())


def _with(**tensors) -> bytes:
    t = good_tensors()
    for k, v in tensors.items():
        if v is None:
            t.pop(k)
        else:
            t[k] = v
    return raw_file(t, good_metadata())


def _header_len_set(value: int) -> bytes:
    d = _valid_bytes()
    return struct.pack("<Q", value) + d[8:]


def _shifted_offsets() -> bytes:
    d = _valid_bytes()
    n = struct.unpack("<Q", d[:8])[0]
    h = json.loads(d[8:8 + n])
    h["feats"]["data_offsets"] = [h["feats"]["data_offsets"][0] + 4, h["feats"]["data_offsets"][1] + 4]
    hb = json.dumps(h).encode()
    return struct.pack("<Q", len(hb)) + hb + d[8 + n:] + b"\0" * 4


def _offsets_beyond() -> bytes:
    d = _valid_bytes()
    n = struct.unpack("<Q", d[:8])[0]
    h = json.loads(d[8:8 + n])
    h["feats"]["data_offsets"][1] += 10**6
    hb = json.dumps(h).encode()
    return struct.pack("<Q", len(hb)) + hb + d[8 + n:]


def _raw_header(text: bytes) -> bytes:
    return struct.pack("<Q", len(text)) + text


BAD_FILES = [
    ("missing", _missing, "does not exist"),
    ("folder", _folder, "is a folder"),
    ("fifo", _fifo, "not a regular file"),
    ("empty", _bytes_case(b""), "is empty"),
    ("5 bytes", _bytes_case(b"\x10\0\0\0\0"), "only 5 bytes"),
    ("header longer than file", _bytes_case(_header_len_set(10**6)), "truncated"),
    ("header length 2^64-1", _bytes_case(_header_len_set(2**64 - 1)), "truncated"),
    ("zero header length", _bytes_case(_header_len_set(0)), "header is empty"),
    ("data cut", _bytes_case(_valid_bytes()[:-5]), "truncated"),
    ("trailing bytes", _bytes_case(_valid_bytes() + b"\0" * 8), "do not belong to any tensor"),
    ("gap between tensors", _bytes_case(_shifted_offsets()), "does not start where"),
    ("offsets beyond file", _bytes_case(_offsets_beyond()), "outside the file"),
    ("not json", _bytes_case(_raw_header(b"{not json at all}")), "not readable"),
    ("not utf8", _bytes_case(_raw_header(b'{"\xff\xfe": 1}')), "not readable"),
    ("json list", _bytes_case(_raw_header(b"[1, 2, 3]")), "does not start with a safetensors header"),
    ("json NaN", _bytes_case(_raw_header(b'{"__metadata__": {}, "x": NaN}')), "not readable"),
    ("deep json", _bytes_case(_raw_header(b"{" + b'"a":{' * 100000 + b"}" * 100001)), "not readable"),
    ("duplicate keys", _bytes_case(_raw_header(b'{"__metadata__": {}, "__metadata__": {}}')), "not readable"),
    ("png", _bytes_case(b"\x89PNG\r\n\x1a\n" + b"\0" * 100), "truncated"),
    ("pickle", _bytes_case(b"\x80\x04\x95\x10\0\0\0\0\0\0\0}\x94\x8c\x01a\x94K\x01s." + b"\0" * 8), "truncated"),
    ("plain safetensors", _bytes_case(raw_file(good_tensors(), None)), "no 'format=near-asset' metadata"),
    ("other format", _bytes_case(raw_file(good_tensors(), good_metadata(format="pt"))), "its format is 'pt'"),
    ("metadata not strings", _bytes_case(raw_file(good_tensors(), {"format": 1})), "metadata is not a table"),
    ("newer version", _bytes_case(raw_file(good_tensors(), good_metadata(format_version="2"))),
     "update the NeAR add-on"),
    ("version junk", _bytes_case(raw_file(good_tensors(), good_metadata(format_version="one"))),
     "format version 'one' is not a whole number"),
    ("version zero", _bytes_case(raw_file(good_tensors(), good_metadata(format_version="0"))),
     "unknown asset format version 0"),
    ("no version", _bytes_case(raw_file(good_tensors(), good_metadata(format_version=None))), "'format_version'"),
    ("no resolution", _bytes_case(raw_file(good_tensors(), good_metadata(resolution=None))), "no 'resolution'"),
    ("resolution text", _bytes_case(raw_file(good_tensors(), good_metadata(resolution="big"))),
     "resolution 'big' is not a whole number"),
    ("NUL in model", _bytes_case(raw_file(good_tensors(), good_metadata(model="near\0tiny"))),
     "control character ('\\x00', position 4) in its 'model' text"),
    ("escape in source", _bytes_case(raw_file(good_tensors(), good_metadata(source="\x1b]0;owned\x07"))),
     "control character ('\\x1b', position 0) in its 'source' text"),
    ("resolution 0", _bytes_case(raw_file(good_tensors(), good_metadata(resolution="0"))), "between 1 and 1024"),
    ("resolution 4096", _bytes_case(raw_file(good_tensors(), good_metadata(resolution="4096"))),
     "between 1 and 1024"),
    ("resolution negative", _bytes_case(raw_file(good_tensors(), good_metadata(resolution="-64"))),
     "not a whole number"),
    ("no latent", _bytes_case(raw_file(good_tensors(), good_metadata(latent=None))), "no 'latent'"),
    ("empty latent", _bytes_case(raw_file(good_tensors(), good_metadata(latent=""))), "empty 'latent'"),
    ("no coords", _bytes_case(_with(coords=None)), "no 'coords' tensor"),
    ("no feats", _bytes_case(_with(feats=None)), "no 'feats' tensor"),
    ("coords float", _bytes_case(_with(coords=f32(np.zeros((3, 3))))), "must be 32-bit integers"),
    ("coords int64", _bytes_case(_with(coords=("I64", (3, 3), np.zeros((3, 3), np.int64).tobytes()))),
     "are 64-bit integers"),
    ("coords [N,2]", _bytes_case(_with(coords=i32([[0, 0], [1, 1], [2, 2]]))), "not [N, 3]"),
    ("coords [N]", _bytes_case(_with(coords=i32([0, 1, 2]))), "not [N, 3]"),
    ("no voxels", _bytes_case(_with(coords=i32(np.zeros((0, 3))), feats=f32(np.zeros((0, 8))))), "no voxels"),
    ("feats int", _bytes_case(_with(feats=i32(np.zeros((3, 8))))), "only 32-bit or 16-bit floats"),
    ("feats bf16", _bytes_case(_with(feats=("BF16", (3, 8), b"\0" * 48))), "bfloat16"),
    ("feats float64", _bytes_case(_with(feats=("F64", (3, 8), b"\0" * 192))), "64-bit floats"),
    ("feats unknown dtype", _bytes_case(_with(feats=("Q7", (3, 8), b"\0" * 96))), "type 'Q7'"),
    ("feats 3-d", _bytes_case(_with(feats=f32(np.zeros((3, 2, 4))))), "not [voxels, channels]"),
    ("feats rows", _bytes_case(_with(feats=f32(np.zeros((4, 8))))), "4 rows for 3 voxels"),
    ("feats no channels", _bytes_case(_with(feats=f32(np.zeros((3, 0))))), "no channels"),
    ("size/shape mismatch", _bytes_case(_with(feats=("F32", (3, 7), b"\0" * 96))), "does not match its shape"),
    ("extras rows", _bytes_case(_with(color_feats=f32(np.zeros((2, 4))))), "'color_feats' has 2 rows for 3 voxels"),
    ("extras int", _bytes_case(_with(color_feats=i32(np.zeros((3, 4))))), "'color_feats' is stored as 32-bit int"),
    ("extras bad name", _bytes_case(_with(**{"bad name": f32(np.zeros((3, 1)))})), "unusable name"),
    ("extras Inf", _bytes_case(_with(color_feats=f32([[np.inf], [0], [-np.inf]]))),
     "2 NaN or infinite values in its latent 'color_feats'"),
    ("feats NaN", _bytes_case(_with(feats=f32(np.where(np.eye(3, 8) > 0, np.nan, 0.0)))),
     "3 NaN or infinite values in its latent 'feats'"),
    ("coords outside grid", _bytes_case(_with(coords=i32([[0, 0, 0], [64, 0, 0], [0, 0, -1]]))),
     "2 voxels outside the 64^3 grid"),
    ("coords duplicate", _bytes_case(_with(coords=i32([[5, 5, 5], [5, 5, 5], [5, 5, 5]]))), "2 duplicate voxels"),
    ("extra metadata junk in entry", _bytes_case(raw_file(good_tensors(), good_metadata(),
                                                          {"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}})),
     "malformed"),
    ("entry not object", _bytes_case(raw_file(good_tensors(), good_metadata(), {"x": 5})), "not a description"),
]


@pytest.mark.timeout(20)
@pytest.mark.parametrize("build, phrase", [pytest.param(b, p, id=i) for i, b, p in BAD_FILES])
def test_bad_files_give_clear_asset_errors(tmp_path, build, phrase):
    p = build(tmp_path)
    with pytest.raises(AssetError) as info:
        read_asset(p)
    msg = str(info.value)
    assert "'chair.near'" in msg, msg  # the file is named
    assert phrase in msg, msg
    assert "Traceback" not in msg


def test_errors_from_the_safetensors_layer_become_asset_errors(tmp_path, monkeypatch):
    import safetensors.numpy
    from safetensors import SafetensorError

    p = tmp_path / "chair.near"
    write_asset(p, make_asset())

    def broken(data):
        raise SafetensorError("InvalidHeaderDeserialization")

    monkeypatch.setattr(safetensors.numpy, "load", broken)
    with pytest.raises(AssetError, match="'chair.near' is damaged or not a NeAR asset: InvalidHeaderDeserialization"):
        read_asset(p)


def test_unreadable_file_is_asset_error(tmp_path, monkeypatch):
    p = tmp_path / "chair.near"
    write_asset(p, make_asset())

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(asset_mod, "open", denied, raising=False)  # chmod 0 is no test when running as root
    with pytest.raises(AssetError, match="'chair.near' cannot be read: permission denied"):
        read_asset(p)


def test_huge_file_refused_before_reading(tmp_path, monkeypatch):
    p = tmp_path / "chair.near"
    write_asset(p, make_asset())
    monkeypatch.setattr(asset_mod, "MAX_FILE_BYTES", 100)

    def no_open(*a, **k):
        raise AssertionError("the file was opened")

    monkeypatch.setattr(asset_mod, "open", no_open, raising=False)
    with pytest.raises(AssetError, match=r"'chair.near' is too large .* at most 100 bytes"):
        read_asset(p)


def test_default_size_limit_is_2_gib_and_a_sparse_3_gib_file_is_refused(tmp_path):
    assert asset_mod.MAX_FILE_BYTES == 2 * 1024**3
    p = tmp_path / "chair.near"
    with open(p, "wb") as f:
        f.truncate(3 * 1024**3)  # sparse: no data is written, and read_asset must not read it either
    with pytest.raises(AssetError, match=r"too large \(3.0 GiB\)"):
        read_asset(p)


def test_header_size_limit(tmp_path, monkeypatch):
    p = tmp_path / "chair.near"
    write_asset(p, make_asset())
    monkeypatch.setattr(asset_mod, "MAX_HEADER_BYTES", 64)
    with pytest.raises(AssetError, match="header is .* more than"):
        read_asset(p)


def test_describe_asset(tmp_path):
    coords = np.array([[2, 3, 4], [10, 5, 6], [7, 30, 1]])
    feats = np.array([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]])
    a = Asset(coords=coords, feats=feats, extras={"color_feats": np.ones((3, 4))}, resolution=32,
              model="near-tiny", source="sha256:1234")
    p = tmp_path / "mug.near"
    write_asset(p, a)
    text = describe_asset(p)
    assert text.splitlines()[0] == "mug.near"
    for piece in ["voxels       3 ", "channels     2", "resolution   32^3", "latent       lh-slat",
                  "model        near-tiny", "source       sha256:1234", "x 2..10, y 3..30, z 1..6",
                  "min 0  max 5  mean 2.5", "color_feats [4 channels]", a.fingerprint(), "near-asset v1"]:
        assert piece in text, (piece, text)
    std = np.arange(6.0).std()
    assert f"std {std:.4g}" in text
    with pytest.raises(AssetError, match="does not exist"):
        describe_asset(tmp_path / "none.near")


# ------------------------------------------------------------------------------------------------------------- fuzz


def _fuzz_bases() -> list[bytes]:
    import tempfile

    out = []
    with tempfile.TemporaryDirectory() as d:
        for a in (make_asset(n=3, c=8, extras=False, seed=11),
                  make_asset(n=25, c=8, extras=True, seed=12, resolution=16)):
            p = os.path.join(d, "base.near")
            write_asset(p, a)
            with open(p, "rb") as f:
                out.append(f.read())
    # one with a float16 extra as well
    t = good_tensors()
    t["color_feats"] = ("F16", (3, 4), np.linspace(-2, 2, 12).astype(np.float16).tobytes())
    out.append(raw_file(t, good_metadata()))
    return out


FUZZ_BASES = _fuzz_bases()
FUZZ_CASES = 480
FUZZ_SEED = 20240607


def _fuzz_case(i: int) -> tuple[str, bytes]:
    rng = random.Random(FUZZ_SEED * 1000 + i)
    base = FUZZ_BASES[i % len(FUZZ_BASES)]
    hend = 8 + struct.unpack("<Q", base[:8])[0]
    kind = ["trunc0", "trunc<8", "trunc-header", "trunc-data", "flip-header", "flip-data", "flip-any",
            "garbage", "garbage-with-length", "header-digits"][(i // len(FUZZ_BASES)) % 10]
    if kind == "trunc0":
        return "truncated", b""
    if kind == "trunc<8":
        return "truncated", base[: rng.randrange(1, 8)]
    if kind == "trunc-header":
        return "truncated", base[: rng.randrange(8, hend)]
    if kind == "trunc-data":
        return "truncated", base[: rng.randrange(hend, len(base))]
    if kind.startswith("flip"):
        lo, hi = {"flip-header": (0, hend), "flip-data": (hend, len(base)), "flip-any": (0, len(base))}[kind]
        data = bytearray(base)
        for _ in range(rng.randint(1, 16)):
            data[rng.randrange(lo, hi)] ^= rng.randrange(1, 256)
        return kind, bytes(data)
    if kind == "garbage":
        return kind, rng.randbytes(rng.randrange(0, 3000))
    if kind == "garbage-with-length":
        body = rng.randbytes(rng.randrange(0, 2000))
        return kind, struct.pack("<Q", rng.randrange(0, len(body) + 16)) + body
    # header-digits: change a number inside the JSON header (shapes, offsets, resolution, version)
    data = bytearray(base)
    digits = [j for j in range(8, hend) if 48 <= data[j] <= 57]
    for _ in range(rng.randint(1, 3)):
        data[rng.choice(digits)] = rng.choice(b"0123456789")
    return kind, bytes(data)


def _check_valid(a: Asset) -> None:
    assert isinstance(a, Asset)
    assert a.coords.dtype == np.int32 and a.coords.ndim == 2 and a.coords.shape[1] == 3 and a.num_voxels >= 1
    assert a.coords.min() >= 0 and a.coords.max() < a.resolution
    assert len(np.unique(a.coords, axis=0)) == a.num_voxels
    assert a.feats.dtype == np.float32 and a.feats.shape[0] == a.num_voxels and np.isfinite(a.feats).all()
    for v in a.extras.values():
        assert v.dtype == np.float32 and v.shape[0] == a.num_voxels and np.isfinite(v).all()


@pytest.mark.timeout(10)
@pytest.mark.parametrize("i", range(FUZZ_CASES))
def test_fuzz_read_asset_only_raises_asset_error(tmp_path, i):
    kind, data = _fuzz_case(i)
    p = tmp_path / "fuzz.near"
    p.write_bytes(data)
    try:
        a = read_asset(p)
    except AssetError as exc:
        assert "'fuzz.near'" in str(exc)
        return
    assert kind != "truncated", "a truncated file was accepted"
    assert kind.startswith("flip") or kind == "header-digits", kind  # random garbage is never a valid asset
    _check_valid(a)


def test_fuzz_cases_cover_every_class_and_both_outcomes(tmp_path):
    """The fuzz set is not vacuous: it has every length class, and some flipped files stay readable."""
    kinds, readable = {}, 0
    for i in range(FUZZ_CASES):
        kind, data = _fuzz_case(i)
        kinds[kind] = kinds.get(kind, 0) + 1
        if kind == "flip-data":
            p = tmp_path / "f.near"
            p.write_bytes(data)
            try:
                read_asset(p)
                readable += 1
            except AssetError:
                pass
    assert set(kinds) >= {"truncated", "flip-header", "flip-data", "flip-any", "garbage", "header-digits"}
    lengths = {len(_fuzz_case(i)[1]) for i in range(FUZZ_CASES) if _fuzz_case(i)[0] == "truncated"}
    assert 0 in lengths and any(0 < n < 8 for n in lengths)
    assert readable > 0
