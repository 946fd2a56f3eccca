"""Checks of a mesh file before any Blender importer sees it: the kind (by suffix, then by its first bytes), and for
PLY the element counts its header declares against what the file's size can hold.

Blender's PLY importer parses counts with a 32-bit `stoi` and allocates what the header says, so a header declaring
99,999,999,999 vertices aborts the whole process. A header that cannot be true is refused here, with a message;
whatever gets past still runs in a child process (`import_process`), where a crash becomes an error too.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import NearError

#: Suffix -> the importer that reads it.
IMPORTERS = {".obj": "obj", ".gltf": "gltf", ".glb": "gltf", ".ply": "ply", ".blend": "blend"}
#: First bytes of a .blend: uncompressed, gzip- or zstd-compressed.
BLEND_MAGICS = (b"BLENDER", b"\x1f\x8b", b"\x28\xb5\x2f\xfd")
#: Bytes of each PLY scalar type in a binary body.
PLY_TYPE_BYTES = {name: size for names, size in (
    (("char", "uchar", "int8", "uint8"), 1), (("short", "ushort", "int16", "uint16"), 2),
    (("int", "uint", "float", "int32", "uint32", "float32"), 4), (("double", "float64"), 8)) for name in names}
PLY_HEADER_LIMIT = 1 << 16  # a PLY header longer than this is not one
MAX_PLY_COUNT = 2**31 - 1  # the importer's counts are 32-bit ints


def importer_for(path: Path) -> str:
    """The importer of `path` ("obj", "gltf", "ply", "blend") after checking that the file is what it claims to be;
    a `NearError` naming the file otherwise."""
    if path.is_dir():
        raise NearError(f"{path}: is a folder, not a mesh file")
    kind = IMPORTERS.get(path.suffix.lower())
    if kind is None:
        raise NearError(f"{path.name}: cannot import '{path.suffix}' meshes; use one of {', '.join(IMPORTERS)}")
    if not path.is_file():
        raise NearError(f"{path}: no such file")
    size = path.stat().st_size
    if size == 0:
        raise NearError(f"{path.name}: the file is empty")
    with open(path, "rb") as f:
        head = f.read(PLY_HEADER_LIMIT)
    if kind == "blend" and not head.startswith(BLEND_MAGICS):
        raise NearError(f"{path.name}: not a Blender file (it does not start with 'BLENDER')")
    if path.suffix.lower() == ".glb" and not head.startswith(b"glTF"):
        raise NearError(f"{path.name}: not a binary glTF file (it does not start with 'glTF')")
    if kind == "obj" and b"\0" in head:
        raise NearError(f"{path.name}: not an OBJ file (OBJ is text; this file holds binary data)")
    if kind == "ply":
        check_ply_header(path.name, head, size)
    return kind


def check_ply_header(name: str, head: bytes, size: int) -> None:
    """Refuse a PLY whose header is malformed or declares more elements than `size` bytes can hold."""
    end = head.find(b"end_header")
    if not head.startswith(b"ply") or end < 0:
        raise NearError(f"{name}: not a PLY file (no 'ply' ... 'end_header' header in its first "
                        f"{PLY_HEADER_LIMIT // 1024} KiB)")
    body = size - (head.find(b"\n", end) + 1 if head.find(b"\n", end) >= 0 else len(head))
    lines = head[:end].decode("ascii", "replace").splitlines()
    binary = any(line.split()[:2] in (["format", "binary_little_endian"], ["format", "binary_big_endian"])
                 for line in lines if line.strip())
    elements: list[list] = []  # [name, count, minimum bytes per element]
    for number, line in enumerate(lines, 1):
        words = line.split()
        if not words:
            continue
        if words[0] == "element":
            if len(words) != 3 or not words[2].isdigit():
                raise NearError(f"{name}: header line {number} ('{line.strip()[:60]}') is not 'element NAME COUNT'")
            count = int(words[2])
            if count > MAX_PLY_COUNT:
                raise NearError(f"{name}: the header declares {count:,} {words[1]} elements, more than a PLY file "
                                f"can hold ({MAX_PLY_COUNT:,})")
            elements.append([words[1], count, 0])
        elif words[0] == "property" and elements:
            # A scalar takes its type's bytes (binary) or a digit and a separator (ASCII); a list at least its count.
            kind = words[2] if words[1:2] == ["list"] and len(words) > 2 else words[1] if len(words) > 1 else ""
            elements[-1][2] += PLY_TYPE_BYTES.get(kind, 1) if binary else 2
    needed = 0
    for element, count, each in elements:
        needed += count * max(each, 1)
        if needed > body:
            raise NearError(f"{name}: the header declares {count:,} {element} elements, but the {body:,} bytes "
                            f"after it cannot hold them (at least {max(each, 1)} bytes each): the file is damaged "
                            "or truncated")
