"""The `.near` asset: one LH-SLAT (a sparse voxel latent) in one safetensors file.

File layout (safetensors, never pickle):

* tensors
    - ``coords``: int32 [N, 3], voxel indices on a ``resolution``^3 grid, each in [0, resolution), unique rows;
    - ``feats``: float32 [N, C], the de-normalized latent the decoder consumes, finite;
    - any other tensor is an *extra* latent (e.g. ``color_feats``): float32 [N, Ck], finite, same N.
* metadata (strings): ``format=near-asset``, ``format_version`` (``"1"``), ``resolution``, ``latent`` (what the feats
  mean, e.g. ``lh-slat``), ``model`` (the weights id it was made with), ``source`` (e.g. ``sha256:<hex>`` of the image).

Decisions:

* ``feats`` and extras may be stored as float16 in a file; they are widened to float32 on reading (lossless).
  :func:`write_asset` always writes float32. Other float types (bf16, f64, f8...) are refused with a clear message.
* ``coords`` must be int32 in the file (the format says so; no silent narrowing of other integer types).
* :func:`read_asset` never lets anything but :class:`~near_engine.errors.AssetError` escape, whatever the bytes: the
  safetensors header is parsed and checked here first (length, JSON, dtypes, shapes, offsets), then the tensors are
  loaded with ``safetensors.numpy.load`` from the very bytes that were checked.
* An :class:`Asset` owns read-only copies of its arrays, so a frozen asset really does not change and its
  :meth:`Asset.fingerprint` stays valid for caches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import stat
import struct
import unicodedata
from collections.abc import Mapping
from typing import Any

import numpy as np

from near_engine.errors import AssetError
from near_engine.files import write_bytes_atomically

__all__ = [
    "Asset",
    "FORMAT",
    "FORMAT_VERSION",
    "MAX_FILE_BYTES",
    "MAX_HEADER_BYTES",
    "MAX_RESOLUTION",
    "describe_asset",
    "read_asset",
    "write_asset",
]

FORMAT = "near-asset"
FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = frozenset({1})
DEFAULT_RESOLUTION = 64
DEFAULT_LATENT = "lh-slat"
MAX_RESOLUTION = 1024
MAX_FILE_BYTES = 2 * 1024**3  # refuse bigger files before reading a byte
MAX_HEADER_BYTES = 100 * 1024**2  # safetensors' JSON header
MAX_EXTRAS = 256
MAX_TEXT_CHARS = 4096  # latent / model / source metadata strings

_RESERVED = frozenset({"coords", "feats"})
_EXTRA_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]{0,63}")
_FLOAT_DTYPES = {"F32": 4, "F16": 2}  # accepted dtypes for feats and extras (F16 is widened to float32)
_DTYPE_WORDS = {
    "F64": "64-bit floats",
    "F32": "32-bit floats",
    "F16": "16-bit floats",
    "BF16": "bfloat16 numbers",
    "I64": "64-bit integers",
    "I32": "32-bit integers",
    "I16": "16-bit integers",
    "I8": "8-bit integers",
    "U64": "unsigned 64-bit integers",
    "U32": "unsigned 32-bit integers",
    "U16": "unsigned 16-bit integers",
    "U8": "bytes",
    "BOOL": "booleans",
}


class _Invalid(AssetError):
    """A field check that failed. ``phrase`` is a predicate ("has 3 duplicate voxels") so the caller picks the subject
    (the asset in memory, or the file it came from)."""

    def __init__(self, phrase: str) -> None:
        super().__init__(f"The NeAR asset {phrase}")
        self.phrase = phrase


# ----------------------------------------------------------------------------------------------------------- Asset


@dataclasses.dataclass(frozen=True, eq=False)
class Asset:
    """An LH-SLAT: ``coords`` int32 [N,3] on a ``resolution``^3 grid, ``feats`` float32 [N,C], optional ``extras``.

    Inputs are validated and copied into read-only, C-contiguous arrays: coords may be given with any integer dtype
    (values are range-checked before conversion to int32), feats/extras with any float dtype (converted to float32,
    then checked finite). Every problem raises :class:`AssetError`.
    """

    coords: np.ndarray
    feats: np.ndarray
    extras: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    resolution: int = DEFAULT_RESOLUTION
    latent: str = DEFAULT_LATENT
    model: str = ""
    source: str = ""
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        resolution = _check_resolution(self.resolution)
        format_version = self.format_version
        if isinstance(format_version, bool) or not isinstance(format_version, (int, np.integer)):
            raise _Invalid(f"has a format version that is not a whole number ({format_version!r})")
        if int(format_version) not in SUPPORTED_FORMAT_VERSIONS:
            raise _Invalid(f"has format version {int(format_version)}, which this version of NeAR does not know")
        latent = _check_text("latent", self.latent, allow_empty=False)
        model = _check_text("model", self.model)
        source = _check_text("source", self.source)
        coords = _check_coords(self.coords, resolution)
        n = coords.shape[0]
        feats = _check_float_table("feats", self.feats, n)
        if not isinstance(self.extras, Mapping):
            raise _Invalid(f"has extras that are not a name -> array mapping ({type(self.extras).__name__})")
        if len(self.extras) > MAX_EXTRAS:
            raise _Invalid(f"has {len(self.extras)} extra latents (at most {MAX_EXTRAS} are allowed)")
        extras: dict[str, np.ndarray] = {}
        for name in sorted(self.extras, key=lambda k: str(k)):
            if not isinstance(name, str) or not _EXTRA_NAME.fullmatch(name) or name in _RESERVED:
                raise _Invalid(
                    f"has an extra latent with an unusable name {name!r} (use letters, digits, '_', '.', '-', "
                    "at most 64 characters, not 'coords' or 'feats')"
                )
            extras[name] = _check_float_table(name, self.extras[name], n)
        set_ = object.__setattr__
        set_(self, "coords", coords)
        set_(self, "feats", feats)
        set_(self, "extras", extras)
        set_(self, "resolution", resolution)
        set_(self, "latent", latent)
        set_(self, "model", model)
        set_(self, "source", source)
        set_(self, "format_version", int(format_version))

    @property
    def num_voxels(self) -> int:
        return int(self.coords.shape[0])

    @property
    def channels(self) -> int:
        return int(self.feats.shape[1])

    def voxel_centers(self) -> np.ndarray:
        """Voxel centres in asset space (the unit cube [-0.5, 0.5]^3): ``(i + 0.5) / R - 0.5``, float32 [N, 3]."""
        return ((self.coords.astype(np.float64) + 0.5) / self.resolution - 0.5).astype(np.float32)

    def fingerprint(self) -> str:
        """A stable sha256 (hex) of what the decoder sees: coords, feats, extras, resolution and latent.

        ``model``, ``source`` and ``format_version`` are not part of it (they do not change the decoder's output).
        Row order matters (rows are paired with the decoder's outputs); so does the sign of zero (bytes are hashed).
        """
        h = hashlib.sha256()

        def put(tag: bytes, payload: bytes) -> None:
            h.update(tag)
            h.update(struct.pack("<Q", len(payload)))
            h.update(payload)

        def put_array(tag: bytes, arr: np.ndarray, dtype: str) -> None:
            put(tag + b".shape", struct.pack(f"<{arr.ndim}Q", *arr.shape))
            put(tag + b".data", np.ascontiguousarray(arr, dtype=np.dtype(dtype)).tobytes())

        put(b"near-asset-fingerprint", b"1")
        put(b"resolution", str(self.resolution).encode())
        put(b"latent", self.latent.encode("utf-8"))
        put_array(b"coords", self.coords, "<i4")
        put_array(b"feats", self.feats, "<f4")
        for name in sorted(self.extras):
            put(b"extra", name.encode("utf-8"))
            put_array(b"extra", self.extras[name], "<f4")
        return h.hexdigest()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Asset):
            return NotImplemented
        return (
            self.resolution == other.resolution
            and self.latent == other.latent
            and self.model == other.model
            and self.source == other.source
            and self.format_version == other.format_version
            and np.array_equal(self.coords, other.coords)
            and np.array_equal(self.feats, other.feats)
            and self.extras.keys() == other.extras.keys()
            and all(np.array_equal(v, other.extras[k]) for k, v in self.extras.items())
        )

    def __hash__(self) -> int:
        return hash((self.fingerprint(), self.model, self.source, self.format_version))

    def __repr__(self) -> str:
        extras = ", ".join(f"{k}[{v.shape[1]}]" for k, v in self.extras.items()) or "none"
        return (
            f"Asset(voxels={self.num_voxels}, channels={self.channels}, resolution={self.resolution}, "
            f"latent={self.latent!r}, model={self.model!r}, source={self.source!r}, extras={extras})"
        )


def _check_resolution(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise _Invalid(f"has a grid resolution that is not a whole number ({value!r})")
    if not 1 <= int(value) <= MAX_RESOLUTION:
        raise _Invalid(f"has a grid resolution of {int(value)}; it must be between 1 and {MAX_RESOLUTION}")
    return int(value)


def _check_text(field: str, value: Any, allow_empty: bool = True) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"has a '{field}' that is not text ({type(value).__name__})")
    if not allow_empty and not value.strip():
        raise _Invalid(f"has an empty '{field}' (it must say what the latent is, e.g. '{DEFAULT_LATENT}')")
    if len(value) > MAX_TEXT_CHARS:
        raise _Invalid(f"has a '{field}' text of {len(value)} characters (at most {MAX_TEXT_CHARS})")
    bad = next((i for i, c in enumerate(value) if unicodedata.category(c) == "Cc"), None)
    if bad is not None:  # Blender cuts strings at a NUL (the fingerprint would stop matching); escapes reach terminals
        raise _Invalid(f"has a control character ({value[bad]!r}, position {bad}) in its '{field}' text; metadata "
                       "texts are one line of printable characters")
    return value


def _frozen_copy(arr: np.ndarray, dtype: Any) -> np.ndarray:
    out = np.array(arr, dtype=dtype, order="C", copy=True)
    out.setflags(write=False)
    return out


def _as_array(name: str, value: Any) -> np.ndarray:
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError) as exc:
        raise _Invalid(f"has a '{name}' that is not an array ({exc})") from None
    return arr


def _check_coords(value: Any, resolution: int) -> np.ndarray:
    arr = _as_array("coords", value)
    if arr.dtype.kind not in "iu":
        raise _Invalid(f"has voxel coordinates ('coords') of type {arr.dtype}, but they must be whole numbers")
    if arr.ndim != 2 or arr.shape[1] != 3:
        raise _Invalid(f"has voxel coordinates ('coords') of shape {list(arr.shape)}, but they must be [N, 3]")
    n = arr.shape[0]
    if n == 0:
        raise _Invalid("has no voxels (it is empty)")
    outside = np.any((arr < 0) | (arr >= resolution), axis=1)
    bad = int(np.count_nonzero(outside))
    if bad:
        raise _Invalid(
            f"has {bad} voxel{'s' if bad != 1 else ''} outside the {resolution}^3 grid "
            f"(coordinates must be in 0..{resolution - 1})"
        )
    coords = _frozen_copy(arr, np.int32)
    # Unique rows: pack (x, y, z) into one int64 key (all < 1024 < 2^21).
    keys = (coords[:, 0].astype(np.int64) << 42) | (coords[:, 1].astype(np.int64) << 21) | coords[:, 2].astype(np.int64)
    dup = n - int(np.unique(keys).size)
    if dup:
        raise _Invalid(f"has {dup} duplicate voxel{'s' if dup != 1 else ''} (the same coordinates more than once)")
    return coords


def _check_float_table(name: str, value: Any, n: int) -> np.ndarray:
    arr = _as_array(name, value)
    if arr.dtype.kind != "f":
        raise _Invalid(f"has a latent '{name}' of type {arr.dtype}, but it must be floating-point numbers")
    if arr.ndim != 2:
        raise _Invalid(f"has a latent '{name}' of shape {list(arr.shape)}, but it must be [voxels, channels]")
    if arr.shape[0] != n:
        raise _Invalid(f"has a latent '{name}' with {arr.shape[0]} rows for {n} voxels (they must match)")
    if arr.shape[1] < 1:
        raise _Invalid(f"has a latent '{name}' with no channels")
    with np.errstate(over="ignore", invalid="ignore"):
        out = _frozen_copy(arr, np.float32)
    bad = int(arr.size - np.count_nonzero(np.isfinite(out)))
    if bad:
        raise _Invalid(
            f"has {bad} NaN or infinite value{'s' if bad != 1 else ''} in its latent '{name}' "
            "(the values must be finite numbers)"
        )
    return out


# ----------------------------------------------------------------------------------------------------------- write


def write_asset(path: str | os.PathLike, asset: Asset) -> None:
    """Write ``asset`` to ``path`` as a ``.near`` safetensors file, atomically.

    The bytes go to a temporary file in the same folder that then replaces ``path`` (``os.replace``), so a crash
    leaves either the old file or the new one, never half a file. feats/extras are written as float32, coords as
    int32. An OS failure (missing folder, no permission, disk full) raises :class:`AssetError`.
    """
    if not isinstance(asset, Asset):
        raise TypeError(f"write_asset needs an Asset, got {type(asset).__name__}")
    from safetensors import SafetensorError
    from safetensors.numpy import save

    path = os.fspath(path)
    label = _label(path)
    tensors = {"coords": asset.coords, "feats": asset.feats, **asset.extras}
    metadata = {
        "format": FORMAT,
        "format_version": str(asset.format_version),
        "resolution": str(asset.resolution),
        "latent": asset.latent,
        "model": asset.model,
        "source": asset.source,
    }
    try:
        data = save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata=metadata)
    except (SafetensorError, ValueError, TypeError) as exc:  # pragma: no cover - the Asset was validated
        raise AssetError(f"Could not encode {label}: {exc}") from exc

    write_bytes_atomically(path, data, AssetError)


# ------------------------------------------------------------------------------------------------------------ read


def _label(path: str | bytes) -> str:
    name = os.path.basename(path) or path
    if isinstance(name, bytes):
        name = os.fsdecode(name)
    return repr(str(name)) if "'" in str(name) else f"'{name}'"


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{int(size)} bytes" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} bytes"  # pragma: no cover


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON number {name}")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _read_bytes(path: str, label: str) -> bytes:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise AssetError(f"{label} does not exist (no such file: {path})") from None
    except NotADirectoryError:
        raise AssetError(f"{label} does not exist (a part of the path {path} is not a folder)") from None
    except PermissionError:
        raise AssetError(f"{label} cannot be read: permission denied") from None
    except (OSError, ValueError) as exc:
        raise AssetError(f"{label} cannot be opened: {getattr(exc, 'strerror', None) or exc}") from None
    if stat.S_ISDIR(st.st_mode):
        raise AssetError(f"{label} is a folder, not a NeAR asset file")
    if not stat.S_ISREG(st.st_mode):
        raise AssetError(f"{label} is not a regular file (a device, pipe or socket), so it is not a NeAR asset")
    _check_size(st.st_size, label)
    try:
        with open(path, "rb") as f:
            st2 = os.fstat(f.fileno())
            if not stat.S_ISREG(st2.st_mode):
                raise AssetError(f"{label} is not a regular file, so it is not a NeAR asset")
            _check_size(st2.st_size, label)
            data = f.read(st2.st_size + 1)
    except PermissionError:
        raise AssetError(f"{label} cannot be read: permission denied") from None
    except IsADirectoryError:
        raise AssetError(f"{label} is a folder, not a NeAR asset file") from None
    except (OSError, ValueError) as exc:
        raise AssetError(f"{label} cannot be read: {getattr(exc, 'strerror', None) or exc}") from None
    except MemoryError:
        raise AssetError(f"{label} is too large to load into memory ({_human_bytes(st.st_size)})") from None
    if len(data) != st2.st_size:
        raise AssetError(f"{label} changed while it was being read; try again")
    _check_size(len(data), label)
    return data


def _check_size(size: int, label: str) -> None:
    if size == 0:
        raise AssetError(f"{label} is empty (0 bytes); it is not a NeAR asset, or it was not saved completely")
    if size > MAX_FILE_BYTES:
        raise AssetError(
            f"{label} is too large ({_human_bytes(size)}); a NeAR asset is at most {_human_bytes(MAX_FILE_BYTES)}, "
            "so this is not a NeAR asset or it is damaged"
        )
    if size < 8:
        raise AssetError(f"{label} is truncated or not a NeAR asset: it has only {size} bytes")


def _parse_header(data: bytes, label: str) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    """Check the safetensors framing; return (metadata, {tensor name: {dtype, shape, begin, end}})."""
    damaged = f"{label} is damaged or not a NeAR asset"
    (header_len,) = struct.unpack("<Q", data[:8])
    available = len(data) - 8
    if header_len == 0:
        raise AssetError(f"{damaged}: its header is empty")
    if header_len > available:
        raise AssetError(
            f"{label} is truncated or not a NeAR asset: its header claims {header_len} bytes "
            f"but only {available} follow"
        )
    if header_len > MAX_HEADER_BYTES:
        raise AssetError(
            f"{damaged}: its header is {_human_bytes(header_len)}, more than the {_human_bytes(MAX_HEADER_BYTES)} "
            "a NeAR asset can have"
        )
    raw = data[8 : 8 + header_len]
    if raw[:1] != b"{":
        raise AssetError(f"{damaged}: it does not start with a safetensors header")
    try:
        text = raw.decode("utf-8")
        header = json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise AssetError(f"{damaged}: its header is not readable ({type(exc).__name__})") from None
    if not isinstance(header, dict):
        raise AssetError(f"{damaged}: its header is not a table of tensors")

    metadata = header.pop("__metadata__", None)
    if metadata is None:
        raise AssetError(f"{label} is not a NeAR asset (no 'format={FORMAT}' metadata)")
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise AssetError(f"{damaged}: its metadata is not a table of texts")

    data_len = len(data) - 8 - header_len
    entries: dict[str, dict[str, Any]] = {}
    for name, info in header.items():
        if not isinstance(info, dict):
            raise AssetError(f"{damaged}: the entry for tensor {name!r} is not a description")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if (
            not isinstance(dtype, str)
            or not isinstance(shape, list)
            or not all(_is_count(d) for d in shape)
            or not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_count(o) for o in offsets)
            or set(info) - {"dtype", "shape", "data_offsets"}
        ):
            raise AssetError(f"{damaged}: the description of tensor {name!r} is malformed")
        begin, end = offsets
        if not begin <= end <= data_len:
            raise AssetError(
                f"{label} is truncated or damaged: tensor {name!r} lies outside the file "
                f"(bytes {begin}..{end} of {data_len})"
            )
        entries[name] = {"dtype": dtype, "shape": tuple(shape), "begin": begin, "end": end}

    # The tensors' bytes must tile the data area exactly (safetensors' own rule): no gaps, no overlaps, no tail.
    pos = 0
    for name, e in sorted(entries.items(), key=lambda kv: (kv[1]["begin"], kv[1]["end"])):
        if e["begin"] != pos:
            raise AssetError(f"{damaged}: tensor {name!r} does not start where the previous one ends")
        pos = e["end"]
    if pos != data_len:
        raise AssetError(f"{damaged}: {data_len - pos} bytes after the last tensor do not belong to any tensor")
    return metadata, entries


def _dtype_words(dtype: str) -> str:
    return _DTYPE_WORDS.get(dtype, f"type {dtype!r}")


def _check_entries(entries: dict[str, dict[str, Any]], label: str) -> tuple[int, int]:
    """Dtype and shape checks from the header alone, before any tensor is loaded. Returns (N, C)."""
    for required in ("coords", "feats"):
        if required not in entries:
            what = "voxel coordinates" if required == "coords" else "latent features"
            raise AssetError(f"{label} is not a complete NeAR asset: it has no '{required}' tensor ({what})")
    damaged = f"{label} is damaged or not a NeAR asset"
    c = entries["coords"]
    if c["dtype"] != "I32":
        raise AssetError(
            f"{damaged}: its voxel coordinates ('coords') are {_dtype_words(c['dtype'])}, "
            "but they must be 32-bit integers"
        )
    if len(c["shape"]) != 2 or c["shape"][1] != 3:
        raise AssetError(f"{damaged}: its voxel coordinates ('coords') have shape {list(c['shape'])}, not [N, 3]")
    n = c["shape"][0]
    if n == 0:
        raise AssetError(f"{label} has no voxels (it is empty)")
    extras = [k for k in entries if k not in _RESERVED]
    if len(extras) > MAX_EXTRAS:
        raise AssetError(f"{damaged}: it has {len(extras)} extra latents (at most {MAX_EXTRAS})")
    for name in ["feats", *sorted(extras)]:
        e = entries[name]
        if name != "feats" and not _EXTRA_NAME.fullmatch(name):
            raise AssetError(f"{damaged}: it has an extra latent with an unusable name {name!r}")
        if e["dtype"] not in _FLOAT_DTYPES:
            raise AssetError(
                f"{label} cannot be used: its latent {name!r} is stored as {_dtype_words(e['dtype'])}, "
                "but NeAR reads only 32-bit or 16-bit floats"
            )
        if len(e["shape"]) != 2:
            raise AssetError(f"{damaged}: its latent {name!r} has shape {list(e['shape'])}, not [voxels, channels]")
        if e["shape"][0] != n:
            raise AssetError(
                f"{damaged}: its latent {name!r} has {e['shape'][0]} rows for {n} voxels (they must match)"
            )
        if e["shape"][1] < 1:
            raise AssetError(f"{damaged}: its latent {name!r} has no channels")
    for name, e in entries.items():
        itemsize = 4 if e["dtype"] == "I32" else _FLOAT_DTYPES[e["dtype"]]
        if e["end"] - e["begin"] != math.prod(e["shape"]) * itemsize:
            raise AssetError(f"{damaged}: the size of tensor {name!r} does not match its shape")
    return n, entries["feats"]["shape"][1]


def _check_metadata(metadata: dict[str, str], label: str) -> tuple[int, int]:
    """Returns (format_version, resolution)."""
    fmt = metadata.get("format")
    if fmt != FORMAT:
        if fmt is None:
            raise AssetError(f"{label} is not a NeAR asset (no 'format={FORMAT}' metadata)")
        shown = fmt if len(fmt) <= 40 else fmt[:40] + "..."
        raise AssetError(f"{label} is not a NeAR asset (its format is {shown!r}, not '{FORMAT}')")
    version_text = metadata.get("format_version")
    if version_text is None:
        raise AssetError(f"{label} is damaged: it has no 'format_version' metadata")
    if not re.fullmatch(r"[0-9]{1,9}", version_text.strip()):
        raise AssetError(f"{label} is damaged: its format version {version_text[:20]!r} is not a whole number")
    version = int(version_text)
    if version not in SUPPORTED_FORMAT_VERSIONS:
        newest = max(SUPPORTED_FORMAT_VERSIONS)
        if version > newest:
            raise AssetError(
                f"{label} was made by a newer NeAR (asset format version {version}; this add-on reads up to "
                f"version {newest}). Please update the NeAR add-on to open it"
            )
        raise AssetError(f"{label} has an unknown asset format version {version}")
    res_text = metadata.get("resolution")
    if res_text is None:
        raise AssetError(f"{label} is damaged: it has no 'resolution' metadata (the voxel grid size)")
    if not re.fullmatch(r"[0-9]{1,9}", res_text.strip()):
        raise AssetError(f"{label} is damaged: its grid resolution {res_text[:20]!r} is not a whole number")
    resolution = int(res_text)
    if not 1 <= resolution <= MAX_RESOLUTION:
        raise AssetError(
            f"{label} is damaged: its grid resolution is {resolution}, but it must be between 1 and {MAX_RESOLUTION}"
        )
    for key in ("latent", "model", "source"):
        if key not in metadata:
            raise AssetError(f"{label} is damaged: it has no '{key}' metadata")
    return version, resolution


def read_asset(path: str | os.PathLike) -> Asset:
    """Read and fully check a ``.near`` file. Any problem raises :class:`AssetError` naming the file and the problem.

    float16 feats/extras are widened to float32. Nothing but ``AssetError`` escapes, whatever the file holds.
    """
    path = os.fspath(path)
    label = _label(path)
    data = _read_bytes(path, label)
    metadata, entries = _parse_header(data, label)
    version, resolution = _check_metadata(metadata, label)
    _check_entries(entries, label)

    from safetensors import SafetensorError
    from safetensors.numpy import load

    try:
        tensors = load(data)
    except (SafetensorError, ValueError, TypeError, KeyError, OverflowError) as exc:
        raise AssetError(f"{label} is damaged or not a NeAR asset: {exc}") from None
    except MemoryError:
        raise AssetError(f"{label} is too large to load into memory") from None
    if set(tensors) != set(entries):  # pragma: no cover - both parsers read the same header
        raise AssetError(f"{label} is damaged: its tensors could not be read consistently")
    for name, e in entries.items():
        arr = tensors[name]
        if tuple(arr.shape) != e["shape"]:  # pragma: no cover - same header
            raise AssetError(f"{label} is damaged: tensor {name!r} could not be read consistently")
    del data
    try:
        return Asset(
            coords=tensors["coords"],
            feats=tensors["feats"],
            extras={k: v for k, v in tensors.items() if k not in _RESERVED},
            resolution=resolution,
            latent=metadata["latent"],
            model=metadata["model"],
            source=metadata["source"],
            format_version=version,
        )
    except _Invalid as exc:
        raise AssetError(f"{label} {exc.phrase}") from None


# -------------------------------------------------------------------------------------------------------- describe


def _stats(arr: np.ndarray) -> str:
    a = arr.astype(np.float64)
    return f"min {a.min():.4g}  max {a.max():.4g}  mean {a.mean():.4g}  std {a.std():.4g}"


def _short(text: str, limit: int = 80) -> str:
    text = text.replace("\n", " ").replace("\r", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe_asset(path: str | os.PathLike) -> str:
    """A human-readable summary of a ``.near`` file (for ``near info FILE``). Raises :class:`AssetError`."""
    path = os.fspath(path)
    asset = read_asset(path)
    try:
        size = os.path.getsize(path)
    except OSError:
        size = None
    r = asset.resolution
    lo, hi = asset.coords.min(axis=0), asset.coords.max(axis=0)
    occupancy = 100.0 * asset.num_voxels / float(r) ** 3
    lines = [
        f"{os.fsdecode(os.path.basename(path)) or path}",
        f"  format       {FORMAT} v{asset.format_version}" + (f", {_human_bytes(size)}" if size is not None else ""),
        f"  latent       {_short(asset.latent) or '-'}",
        f"  model        {_short(asset.model) or '(unknown)'}",
        f"  source       {_short(asset.source) or '(unknown)'}",
        f"  resolution   {r}^3",
        f"  voxels       {asset.num_voxels:,} ({occupancy:.2f}% of the grid)",
        f"  channels     {asset.channels}",
        f"  bounding box x {lo[0]}..{hi[0]}, y {lo[1]}..{hi[1]}, z {lo[2]}..{hi[2]} (voxels)",
        f"  feats        {_stats(asset.feats)}",
    ]
    if asset.extras:
        for i, (name, arr) in enumerate(asset.extras.items()):
            head = "  extras       " if i == 0 else "               "
            lines.append(f"{head}{name} [{arr.shape[1]} channels]  {_stats(arr)}")
    else:
        lines.append("  extras       none")
    lines.append(f"  fingerprint  {asset.fingerprint()}")
    return "\n".join(lines)
