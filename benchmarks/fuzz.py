"""Fuzzing the engine's file readers: seeded mutations of real files, each case read in a worker process.

    .venv/bin/python benchmarks/fuzz.py --cases 10000          # counts per reader and outcome, failures listed
    .venv/bin/python benchmarks/fuzz.py --cases 300 --seed 1 --keep out/fuzz   # keep the failing cases' files

Seed files come from the project's own writers: `.near` assets (`asset.write_asset`), EXR maps
(`images.write_exr`), Radiance HDR maps (a small encoder here: the engine reads HDR but writes none) and a weights
folder (`configs.save_networks` of a small configuration with seeded random tensors: test input, not a model).
Mutations: truncation, bit flips, interesting integers written over header fields, edits of the safetensors JSON
header (shapes, offsets, dtypes, metadata), of the HDR resolution and format lines, and JSON value swaps in the
weights folder's files (text, null, true/false, huge numbers, deep nesting, NUL characters, deleted keys).

Each case ends as one of: `ok` (read fine), `error` (a `NearError`: the project's own message), `traceback` (any
other exception: a defect), `hang` (no answer within the per-case time limit) or `crash` (the worker died: a signal,
an abort in a C library, the memory limit). Workers read many cases each; a worker that hangs or dies is replaced
and the case it was reading is the one blamed, so one bad case never hides the others. `tests/test_fuzz.py` runs a
few hundred cases of the same generator in the suite.
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import os
import queue
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

ROOT = Path(__file__).resolve().parents[1]  # the repository: workers import this checkout's near_engine
READERS = ("near", "exr", "hdr", "weights")
OUTCOMES = ("ok", "error", "traceback", "hang", "crash")
#: The worker's address-space limit: an unbounded allocation fails there instead of taking the machine down.
MEMORY_LIMIT = 6 * 2**30
INTERESTING_INTS = (0, 1, 2, 3, 7, 8, 255, 256, 4096, 16383, 16384, 65535, 2**31 - 1, 2**31, 2**32 - 1, 2**63 - 1,
                    -1, -2**31, -2**63)


def _nested(depth: int) -> list:
    """[[...[0]...]], `depth` lists deep."""
    value: list = [0]
    for _ in range(depth - 1):
        value = [value]
    return value


JSON_VALUES: tuple[Callable[[random.Random], Any], ...] = (
    lambda r: "bogus", lambda r: "", lambda r: None, lambda r: True, lambda r: False, lambda r: 0, lambda r: -1,
    lambda r: 3, lambda r: 0.5, lambda r: 1e9, lambda r: 1e308, lambda r: 10**12, lambda r: 2**64, lambda r: 4096,
    lambda r: [], lambda r: {}, lambda r: [1, 2, 3], lambda r: "a\0b", lambda r: "\x1b[2J", lambda r: "../" * 11,
    lambda r: r.choice(INTERESTING_INTS), lambda r: _nested(36),
)


@dataclass(frozen=True)
class Case:
    """One mutated file (or weights folder) and how it was made."""

    index: int
    reader: str
    path: str
    mutation: str


@dataclass(frozen=True)
class Outcome:
    case: Case
    result: str  # one of OUTCOMES
    detail: str = ""
    seconds: float = 0.0


# ---------------------------------------------------------------------------------------------------------------------
# seed files, written with the project's own writers


def rgbe_rle(line: "Any") -> bytes:
    """One scanline of RGBE bytes [W, 4] in the per-channel run-length scheme (runs of 3+ equal values, literals
    otherwise). Also the test suite's encoder of such files (tests/test_envmap.py)."""
    width = len(line)
    out = bytearray([2, 2, width >> 8, width & 255])
    for channel in range(4):
        values = line[:, channel].tobytes()
        i = 0
        while i < width:
            run = 1
            while i + run < width and run < 127 and values[i + run] == values[i]:
                run += 1
            if run >= 3:
                out += bytes([128 + run, values[i]])
                i += run
                continue
            j = i
            while j < width and j - i < 128 and not (j + 2 < width and values[j] == values[j + 1] == values[j + 2]):
                j += 1
            out += bytes([j - i]) + values[i:j]
            i = j
    return bytes(out)


def write_hdr(path: Path, rgbe: "Any", rle: bool = True) -> None:
    """A Radiance HDR file of RGBE bytes [H, W, 4] (top row first), run-length encoded or flat."""
    h, w = rgbe.shape[:2]
    body = b"".join(rgbe_rle(row) if rle else row.tobytes() for row in rgbe)
    path.write_bytes(f"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\nSOFTWARE=fuzz\n\n-Y {h} +X {w}\n".encode() + body)


def fuzz_network_config() -> dict:
    """near-tiny's six networks at their smallest (so a weights case reads in a fraction of a second)."""
    from near_engine.configs import tiny_config, tiny_encoder_config

    return {**tiny_config(width=16, heads=2, iad_blocks=1, lad_blocks=1, num_gaussians=2, num_tokens=16),
            **tiny_encoder_config(width=16, heads=2, blocks=1, feature_channels=8)}


def build_seeds(folder: Path) -> dict[str, list[Path]]:
    """The unmutated inputs of every reader, written into `folder`."""
    import numpy as np

    from near_engine.asset import Asset, write_asset
    from near_engine.configs import random_weights, save_networks
    from near_engine.images import write_exr

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    cells = rng.choice(16**3, size=40, replace=False)
    coords = np.stack([cells // 256, (cells // 16) % 16, cells % 16], 1).astype(np.int32)
    seeds: dict[str, list[Path]] = {r: [] for r in READERS}
    for name, extras in (("plain", {}), ("materials", {"base_color_feats": rng.random((40, 3), np.float32),
                                                        "roughness_metallic_feats": rng.random((40, 2), np.float32)})):
        path = folder / f"{name}.near"
        write_asset(path, Asset(coords, rng.standard_normal((40, 8)).astype(np.float32), extras, resolution=16,
                                model="fuzz-seed", source="sha256:0123"))
        seeds["near"].append(path)
    pixels = (rng.random((8, 16, 4)) * 4).astype(np.float32)
    for name, compression, layers in (("rgba_zip", "ZIP", "RGBA"), ("rgb_piz", "PIZ", "RGB"),
                                      ("y_none", "NONE", "Y")):
        path = folder / f"{name}.exr"
        write_exr(path, {c: pixels[..., i] for i, c in enumerate(layers)}, compression=compression)
        seeds["exr"].append(path)
    rgbe = rng.integers(0, 256, (8, 16, 4), dtype=np.uint8)
    rgbe[:, 4:12] = rgbe[:, 4:5]  # runs, so the run-length scheme has something to do
    rgbe[..., 3] = rng.integers(120, 140, (8, 16))
    for name, rle in (("rle", True), ("flat", False)):
        path = folder / f"{name}.hdr"
        write_hdr(path, rgbe, rle)
        seeds["hdr"].append(path)
    weights = folder / "weights"
    config = fuzz_network_config()
    save_networks(weights, random_weights(config, seed=0), config, settings={"light_size": 32,
                                                                              "inputs": "lh+material"})
    seeds["weights"].append(weights)
    return seeds


# ---------------------------------------------------------------------------------------------------------------------
# mutations


def _truncate(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    cut = rng.randrange(len(data)) if data else 0
    return data[:cut], f"truncated to {cut} of {len(data)} bytes"


def _flip(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    out = bytearray(data)
    head = rng.random() < 0.6  # mostly in the first 512 bytes, where the headers are
    spots = [rng.randrange(min(len(out), 512) if head else len(out)) for _ in range(rng.randint(1, 8))]
    for pos in spots:
        out[pos] ^= 1 << rng.randrange(8)
    return bytes(out), f"bits flipped at {sorted(spots)}"


def _overwrite_int(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    value = rng.choice(INTERESTING_INTS)
    size = rng.choice((4, 8))
    pos = rng.randrange(max(1, min(len(data), 512) - size))
    fmt = {4: "<i" if value < 0 else "<I", 8: "<q" if value < 0 else "<Q"}[size]
    try:
        packed = struct.pack(fmt, value)
    except struct.error:
        packed = struct.pack("<Q", value & (2**64 - 1))[:size]
    return data[:pos] + packed + data[pos + size:], f"{size}-byte integer {value} written at byte {pos}"


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path (tuple of keys/indices) into a parsed JSON value."""
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, prefix + (i,))
    return out


def _json_swap(value: Any, rng: random.Random, prefer: Callable[[tuple], bool] = lambda p: True) -> tuple[Any, str]:
    """A copy of `value` with one node replaced (or a key deleted)."""
    value = copy.deepcopy(value)
    paths = [p for p in _paths(value) if p and prefer(p)] or [p for p in _paths(value) if p]
    if not paths:
        return rng.choice(JSON_VALUES)(rng), "document replaced"
    path = rng.choice(paths)
    parent = value
    for key in path[:-1]:
        parent = parent[key]
    if isinstance(parent, dict) and rng.random() < 0.15:
        del parent[path[-1]]
        return value, f"{'.'.join(map(str, path))} deleted"
    new = rng.choice(JSON_VALUES)(rng)
    parent[path[-1]] = new
    return value, f"{'.'.join(map(str, path))} := {json.dumps(new)[:40]}"


def _safetensors_header(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """Edit the JSON header of a safetensors file (shapes, offsets, dtypes, metadata) and re-frame it."""
    try:
        (length,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + length])
    except (struct.error, ValueError, UnicodeDecodeError):
        return _flip(data, rng)
    roll = rng.random()
    if roll < 0.15:
        text, what = b"[" * 100_000 + b"]" * 100_000, "header nested 100,000 levels"
    else:
        edited, what = _json_swap(header, rng, lambda p: roll < 0.6 and p[-1] in ("shape", "data_offsets", "dtype")
                                  or isinstance(p[-1], int))
        text = json.dumps(edited).encode()
    frame = struct.pack("<Q", len(text) if rng.random() < 0.9 else rng.choice((0, 7, 2**40, 2**64 - 1)))
    return frame + text + data[8 + length:], f"safetensors header: {what}"


def _hdr_header(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    end = data.find(b"\n\n")
    line_end = data.find(b"\n", end + 2)
    if end < 0 or line_end < 0:
        return _flip(data, rng)
    sizes = [rng.choice((0, 1, 7, 8, 16, 8192, 16384, 16385, 32768, 99_999_999_999, -4)) for _ in range(2)]
    choices = [
        (f"-Y {sizes[0]} +X {sizes[1]}".encode(), "resolution"),
        (f"+X {sizes[0]} -Y {sizes[1]}".encode(), "transposed resolution"),
        (b"-Y 8 -Y 16", "axis twice"),
        (b"-Y 8", "half a resolution line"),
    ]
    line, what = rng.choice(choices)
    if rng.random() < 0.2:
        return data[:end].replace(b"32-bit_rle_rgbe", b"32-bit_rle_xyze") + data[end:], "FORMAT=32-bit_rle_xyze"
    return data[:end + 2] + line + data[line_end:], f"{what} line {line.decode()!r}"


def _exr_header(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """An interesting integer written into one EXR header attribute's value (data window, compression, channel
    list, attribute size...)."""
    found = [(name, data.find(name)) for name in (b"dataWindow\0", b"displayWindow\0", b"compression\0",
                                                   b"channels\0", b"lineOrder\0")]
    found = [(name, at) for name, at in found if at >= 0]
    if not found:
        return _overwrite_int(data, rng)
    name, at = rng.choice(found)
    value_at = data.index(b"\0", at + len(name)) + 1  # after the type name: 4-byte size, then the value
    offset = value_at + rng.choice((0, 4, 8, 12, 16))
    value = rng.choice(INTERESTING_INTS)
    packed = struct.pack("<i" if value < 0 else "<I", value) if -2**31 <= value < 2**32 else b"\xff" * 4
    return data[:offset] + packed + data[offset + 4:], f"{name[:-1].decode()}: {value} at byte {offset}"


BINARY_MUTATIONS = (_truncate, _flip, _overwrite_int)


def mutate_file(reader: str, data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """One mutation of a file's bytes, chosen for its format."""
    special = {"near": [_safetensors_header], "hdr": [_hdr_header], "exr": [_exr_header],
               "safetensors": [_safetensors_header]}.get(reader, [])
    mutation = rng.choice(list(BINARY_MUTATIONS) + special * 2)
    return mutation(data, rng)


def mutate_json_text(text: str, rng: random.Random) -> tuple[str, str]:
    """A weights-folder JSON file with one value swapped (mostly), or its text broken."""
    roll = rng.random()
    if roll < 0.05:
        return text[:rng.randrange(len(text))], "JSON truncated"
    if roll < 0.1:
        return text[:-1] + ', "deep": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested 100,000 levels"
    document = json.loads(text)
    edited, what = _json_swap(document, rng, lambda p: p[0] in ("args", "models", "light_size", "inputs", "name"))
    return json.dumps(edited), what


def make_case(index: int, seed: int, seeds: dict[str, list[Path]], work: Path) -> Case:
    """Case `index` of run `seed`: deterministic, independent of every other case."""
    rng = random.Random(f"{seed}:{index}")
    reader = READERS[index % len(READERS)]
    source = rng.choice(seeds[reader])
    if reader != "weights":
        data, what = mutate_file(reader, source.read_bytes(), rng)
        path = work / f"case{index:05d}{source.suffix}"
        path.write_bytes(data)
        return Case(index, reader, str(path), f"{source.name}: {what}")
    folder = work / f"case{index:05d}"
    folder.mkdir()
    files = sorted(p.name for p in source.iterdir())
    jsons = [f for f in files if f.endswith(".json")]
    target = rng.choice(jsons if rng.random() < 0.75 else [f for f in files if f.endswith(".safetensors")])
    for name in files:
        if name != target:
            os.link(source / name, folder / name)
    if target.endswith(".json"):
        text, what = mutate_json_text((source / target).read_text(), rng)
        (folder / target).write_text(text)
    else:
        data, what = mutate_file("safetensors", (source / target).read_bytes(), rng)
        (folder / target).write_bytes(data)
    return Case(index, reader, str(folder), f"{target}: {what}")


# ---------------------------------------------------------------------------------------------------------------------
# the worker: reads cases, reports each one's start and result on its own channel


def read_case(reader: str, path: str) -> None:
    """What a user's command does with such a file: read it fully and describe it."""
    if reader == "near":
        from near_engine.asset import describe_asset

        describe_asset(path)
    elif reader in ("exr", "hdr"):
        from near_engine.envmap import EnvMap, describe_image_file

        EnvMap.read(path)
        describe_image_file(path)
    elif reader == "weights":
        from near_engine.configs import ENCODER_KEYS, load_networks
        from near_engine.pipeline import NearPipeline

        NearPipeline.from_pretrained(path, device="cpu")
        load_networks(path, "cpu", keys=ENCODER_KEYS)
    elif reader == "selftest-crash":  # for the runner's own test: a C library aborting
        os.abort()
    elif reader == "selftest-hang":
        time.sleep(3600)
    elif reader == "selftest-bug":
        raise KeyError("a defect")
    else:
        raise ValueError(f"unknown reader {reader!r}")


def worker(memory_limit: int) -> None:
    """Read case lines (JSON) from stdin; write `start` and result lines to the original stdout. Anything the
    libraries print goes to stderr, so it cannot garble the protocol."""
    import resource
    import warnings

    resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    warnings.simplefilter("ignore")
    import near_engine.configs  # noqa: F401  (imported once, before the first case's clock starts)
    from near_engine.errors import NearError

    protocol.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        case = json.loads(line)
        protocol.write(json.dumps({"start": case["index"]}) + "\n")
        start = time.perf_counter()
        try:
            read_case(case["reader"], case["path"])
            result, detail = "ok", ""
        except NearError as exc:
            result, detail = "error", f"{type(exc).__name__}: {exc}"[:300]
        except BaseException as exc:  # noqa: BLE001 - every other exception is the defect being looked for
            frame = traceback.extract_tb(exc.__traceback__)[-1]
            result = "traceback"
            detail = f"{type(exc).__name__}: {str(exc)[:200]} (at {Path(frame.filename).name}:{frame.lineno})"
        protocol.write(json.dumps({"index": case["index"], "result": result, "detail": detail,
                                   "seconds": time.perf_counter() - start}) + "\n")


# ---------------------------------------------------------------------------------------------------------------------
# the runner


def _run_share(cases: list[Case], case_timeout: float, startup_timeout: float, memory_limit: int,
               record: Callable[[Outcome], None]) -> None:
    """Run `cases` through workers, replacing a worker that hangs or dies and blaming the case it was reading."""
    pending = collections.deque(cases)
    while pending:
        by_index = {c.index: c for c in pending}
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker",
                                 "--memory-limit", str(memory_limit)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                text=True, start_new_session=True, cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                    filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))})
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout] + [lines.put(None)], daemon=True).start()

        def feed(batch: list[Case]) -> None:
            try:
                for c in batch:
                    proc.stdin.write(json.dumps({"index": c.index, "reader": c.reader, "path": c.path}) + "\n")
                proc.stdin.close()
            except (BrokenPipeError, OSError):
                pass

        threading.Thread(target=feed, args=(list(pending),), daemon=True).start()
        current, started, deadline = None, 0.0, time.monotonic() + startup_timeout
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:  # the case (or the start-up) took too long
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                if current is None:
                    raise RuntimeError("a fuzz worker did not start in time") from None
                record(Outcome(by_index[current], "hang", f"no answer in {case_timeout:g} s",
                               time.monotonic() - started))
                pending.popleft()
                break
            if line is None:  # the worker is gone
                rc = proc.wait()
                if current is not None:
                    how = f"signal {signal.Signals(-rc).name}" if rc < 0 else f"exit status {rc}"
                    record(Outcome(by_index[current], "crash", f"the worker died ({how})",
                                   time.monotonic() - started))
                    pending.popleft()
                elif pending:
                    raise RuntimeError(f"a fuzz worker exited before reading any case (status {rc})")
                break
            message = json.loads(line)
            if "start" in message:
                current, started = message["start"], time.monotonic()
                deadline = started + case_timeout
            elif "index" in message:
                record(Outcome(by_index[message["index"]], message["result"], message["detail"],
                               message["seconds"]))
                pending.popleft()
                current = None
                deadline = time.monotonic() + case_timeout
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run_cases(cases: list[Case], *, workers: int = 2, case_timeout: float = 30.0, startup_timeout: float = 180.0,
              memory_limit: int = MEMORY_LIMIT) -> list[Outcome]:
    """Every case's outcome, in case order; `workers` worker processes read shares of the cases in parallel."""
    outcomes: list[Outcome] = []
    lock = threading.Lock()

    def record(outcome: Outcome) -> None:
        with lock:
            outcomes.append(outcome)

    errors: list[BaseException] = []

    def share(part: list[Case]) -> None:
        try:
            _run_share(part, case_timeout, startup_timeout, memory_limit, record)
        except BaseException as exc:  # noqa: BLE001 - re-raised below, in the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=share, args=(cases[i::workers],)) for i in range(workers) if cases[i::workers]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return sorted(outcomes, key=lambda o: o.case.index)


def generate_cases(count: int, seed: int, work: Path, seeds: dict[str, list[Path]] | None = None) -> list[Case]:
    """`count` mutated cases of run `seed` under `work` (seed files built there unless given)."""
    seeds = seeds or build_seeds(work / "seeds")
    cases_dir = work / "cases"
    cases_dir.mkdir(parents=True, exist_ok=True)
    return [make_case(i, seed, seeds, cases_dir) for i in range(count)]


def tally(outcomes: Iterable[Outcome]) -> dict[str, collections.Counter]:
    """{reader: Counter(outcome)} plus "all"."""
    table: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for o in outcomes:
        table[o.case.reader][o.result] += 1
        table["all"][o.result] += 1
    return table


def describe_failures(outcomes: Iterable[Outcome]) -> list[str]:
    return [f"case {o.case.index} ({o.case.reader}, {o.case.mutation}): {o.result}: {o.detail}"
            for o in outcomes if o.result in ("traceback", "hang", "crash")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10_000, help="number of cases (default 10000)")
    parser.add_argument("--seed", type=int, default=0, help="run seed: case i of a seed is always the same")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--case-timeout", type=float, default=30.0, help="seconds a case may take (default 30)")
    parser.add_argument("--keep", metavar="FOLDER", help="copy the failing cases' files here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--memory-limit", type=int, default=MEMORY_LIMIT, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.memory_limit)
        return 0
    with tempfile.TemporaryDirectory(prefix="near-fuzz-") as tmp:
        start = time.perf_counter()
        cases = generate_cases(args.cases, args.seed, Path(tmp))
        made = time.perf_counter() - start
        outcomes = run_cases(cases, workers=args.workers, case_timeout=args.case_timeout)
        wall = time.perf_counter() - start
        table = tally(outcomes)
        print(f"{len(outcomes)} cases (seed {args.seed}, {args.workers} workers): made in {made:.1f} s, read in "
              f"{wall - made:.1f} s; {1000 * (wall - made) / max(1, len(outcomes)):.0f} ms per case of wall time, "
              f"{1000 * sum(o.seconds for o in outcomes) / max(1, len(outcomes)):.0f} ms per case inside the reader")
        print(f"{'reader':>8} " + " ".join(f"{name:>9}" for name in OUTCOMES))
        for reader in (*READERS, "all"):
            print(f"{reader:>8} " + " ".join(f"{table[reader][name]:>9}" for name in OUTCOMES))
        failures = describe_failures(outcomes)
        for line in failures:
            print(line)
        if args.keep and failures:
            keep = Path(args.keep)
            keep.mkdir(parents=True, exist_ok=True)
            for o in outcomes:
                if o.result in ("traceback", "hang", "crash"):
                    src = Path(o.case.path)
                    (shutil.copytree if src.is_dir() else shutil.copy)(src, keep / src.name)
        return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
