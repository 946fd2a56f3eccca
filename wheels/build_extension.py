"""Build the NeAR extension zips: one per Blender platform, each bundling its wheels, through Blender's own builder.

For each platform this builds the near_engine wheel, fetches the wheels near_engine needs for that platform and for
every requested Python (Blender 4.2 to 5.0 run 3.11, 5.1 and later 3.13), stages a copy of the add-on with a manifest
that lists those wheels, then runs `blender_ext.py build` and `blender_ext.py validate` (shipped inside the bpy wheel).

Dependencies are followed from each wheel's own metadata, evaluated for the *target* platform and Python (pip's
resolver evaluates markers for the machine it runs on, which is wrong for other platforms), and fetched one by one with
`pip download --no-deps`. Packages Blender already ships (numpy above all) are left out: every extension shares one
site-packages, and a second numpy there would clash with Blender's own.

Usage: .venv/bin/python wheels/build_extension.py --platform linux-x64 windows-x64 [--torch-index URL] [--offline]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

ROOT = Path(__file__).resolve().parent.parent

#: Blender platform -> pip platform tags (Blender 4.2+ needs glibc 2.28 on Linux and macOS 11.2 on Apple silicon).
PLATFORM_TAGS: dict[str, list[str]] = {
    "linux-x64": ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "linux_x86_64"],
    "linux-arm64": ["manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64", "linux_aarch64"],
    "windows-x64": ["win_amd64"],
    "macos-arm64": ["macosx_11_0_arm64"],
}

#: Blender platform -> PEP 508 marker values, so dependency markers are evaluated for the target, not this machine.
PLATFORM_MARKERS: dict[str, dict[str, str]] = {
    "linux-x64": {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
                  "os_name": "posix"},
    "linux-arm64": {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "aarch64",
                    "os_name": "posix"},
    "windows-x64": {"sys_platform": "win32", "platform_system": "Windows", "platform_machine": "AMD64",
                    "os_name": "nt"},
    "macos-arm64": {"sys_platform": "darwin", "platform_system": "Darwin", "platform_machine": "arm64",
                    "os_name": "posix"},
}

#: Packages Blender's own Python ships (4.2 to 5.1); bundling a second copy would shadow Blender's for every add-on.
BLENDER_BUNDLED = frozenset({"numpy", "requests", "certifi", "charset-normalizer", "idna", "urllib3", "zstandard",
                             "cython"})

#: Packaging tools some wheels list (torch: setuptools, for compiling C++ extensions); `import torch` needs none.
BUILD_TOOLS = frozenset({"setuptools", "pip", "wheel"})

#: Prefixes of CUDA runtime packages that PyPI's Linux torch wheel requires: gigabytes, so never bundled.
GPU_RUNTIME_PREFIXES = ("nvidia-", "cuda-", "triton")

DEFAULT_PYTHONS = ["3.11", "3.13"]


class BuildError(Exception):
    """A step failed; the message says which and why (printed without a traceback)."""


@dataclass
class Target:
    """One Blender platform and one Python version: what a set of wheels must match."""

    platform: str
    python: str

    @property
    def marker_env(self) -> dict[str, str]:
        return {**PLATFORM_MARKERS[self.platform], "python_version": self.python,
                "python_full_version": f"{self.python}.0", "implementation_name": "cpython",
                "platform_python_implementation": "CPython", "extra": ""}

    def __str__(self) -> str:
        return f"{self.platform} / Python {self.python}"


@dataclass
class Fetched:
    """The wheels chosen for one target, by canonical name, and the failures met on the way."""

    wheels: dict[str, Path] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def log(message: str) -> None:
    print(f"build_extension: {message}", flush=True)


def run(command: list[str], what: str) -> subprocess.CompletedProcess[str]:
    """Run a command, raising BuildError with its last output lines when it fails."""
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        output = (result.stderr.strip() or result.stdout.strip()).splitlines()
        errors = [line for line in output if "ERROR" in line or "Error" in line] or output[-8:]
        raise BuildError(f"{what} failed (exit {result.returncode}):\n  " + "\n  ".join(errors))
    return result


def find_blender_ext() -> Path:
    """blender_ext.py from the installed bpy module (it builds and validates extensions without a Blender binary)."""
    spec = importlib.util.find_spec("bpy")
    if spec is None or not spec.submodule_search_locations:
        raise BuildError("bpy is not installed in this Python: install it (pip install bpy) or pass --blender-ext")
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).glob("*/scripts/addons_core/bl_pkg/cli/blender_ext.py"))
        if found:
            return found[-1]
    raise BuildError("blender_ext.py not found inside the bpy module: pass --blender-ext PATH")


def build_engine_wheel(cache: Path) -> Path:
    """`pip wheel --no-deps` into the cache, from a clean copy of the sources so no stale build/ leaks into it.

    No build isolation, so it works offline; setuptools must be installed in this Python.
    """
    out = cache / "engine"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    log("building the near_engine wheel")
    with tempfile.TemporaryDirectory(prefix="near-engine-src-") as tmp:
        source = Path(tmp)
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(ROOT / name, source / name)
        shutil.copytree(ROOT / "near_engine", source / "near_engine",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(out),
             str(source)], "pip wheel near_engine")
    wheels = list(out.glob("*.whl"))
    if len(wheels) != 1:
        raise BuildError(f"pip wheel produced {len(wheels)} wheels in {out}, expected one")
    return wheels[0]


def wheel_requirements(wheel: Path) -> list[Requirement]:
    """The Requires-Dist lines of a wheel's METADATA."""
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
        metadata = archive.read(name).decode("utf-8")
    return [Requirement(line.partition(":")[2].strip()) for line in metadata.splitlines()
            if line.startswith("Requires-Dist:")]


def skip_reason(name: str) -> str | None:
    """Why a dependency is not bundled, or None when it is."""
    if name in BLENDER_BUNDLED:
        return "Blender ships it"
    if name in BUILD_TOOLS:
        return "a build tool, not needed at run time"
    if name.startswith(GPU_RUNTIME_PREFIXES):
        return "CUDA runtime, gigabytes (see --torch-index)"
    return None


def pip_download(requirement: Requirement, target: Target, cache: Path, offline: bool,
                 torch_index: str | None) -> Path:
    """Fetch one wheel for the target with `pip download --no-deps` and return its path in the cache.

    A matching wheel already in the cache is reused without asking an index (delete the cache to pick up new
    releases); otherwise, unless offline, it is downloaded.
    """
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
               "--implementation", "cp", "--python-version", target.python]
    for tag in PLATFORM_TAGS[target.platform]:
        command += ["--platform", tag]
    # --isolated: ignore pip config and PIP_* variables, so nothing but the cache is looked at.
    from_cache = [*command, "--isolated", "--no-index", "--find-links", str(cache)]
    from_index = [*command, "--index-url", torch_index] if torch_index and requirement.name == "torch" else command
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        try:
            run([*from_cache, "--dest", tmp, str(requirement)], f"{requirement} from the cache")
        except BuildError:
            if offline:
                raise
            run([*from_index, "--dest", tmp, str(requirement)], f"pip download {requirement}")
        (downloaded,) = Path(tmp).glob("*.whl")
        cached = cache / downloaded.name
        if not cached.exists():
            downloaded.rename(cached)
    return cached


def fetch_dependencies(engine_wheel: Path, target: Target, cache: Path, offline: bool,
                       torch_index: str | None) -> Fetched:
    """Follow Requires-Dist from the engine wheel down, for this target, fetching each wheel once."""
    fetched = Fetched()
    followed: dict[str, set[str]] = {}  # name -> extras whose requirements are already queued
    pending = [(req, engine_wheel.name) for req in wheel_requirements(engine_wheel)]
    while pending:
        requirement, wanted_by = pending.pop(0)
        name = canonicalize_name(requirement.name)
        if requirement.marker is not None and not requirement.marker.evaluate(target.marker_env):
            continue
        if (reason := skip_reason(name)) is not None:
            log(f"  {target}: not bundling {requirement} (wanted by {wanted_by}): {reason}")
            continue
        if name in fetched.wheels:
            version = parse_wheel_filename(fetched.wheels[name].name)[1]
            if not requirement.specifier.contains(version, prereleases=True):
                fetched.errors.append(f"{target}: {wanted_by} needs {requirement}, but {name} {version} was chosen")
        else:
            try:
                wheel = pip_download(Requirement(f"{name}{requirement.specifier}"), target, cache, offline,
                                     torch_index)
            except BuildError as error:
                fetched.errors.append(f"{target}: {requirement} (wanted by {wanted_by}): {error}")
                continue
            log(f"  {target}: {wheel.name}")
            fetched.wheels[name] = wheel
        new_extras = ({""} | set(requirement.extras)) - followed.setdefault(name, set())
        if new_extras:
            followed[name] |= new_extras
            wheel = fetched.wheels[name]
            pending += [(req, wheel.name) for req in wheel_requirements(wheel)
                        if req.marker is None or any(req.marker.evaluate({**target.marker_env, "extra": extra})
                                                     for extra in new_extras)]
    return fetched


def toml_value(value: object) -> str:
    """A TOML literal for the manifest's value types (JSON strings with ASCII escapes are valid TOML strings)."""
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        if len(value) <= 1:
            return "[" + ", ".join(toml_value(v) for v in value) + "]"
        return "[\n" + "".join(f"  {toml_value(v)},\n" for v in value) + "]"
    raise BuildError(f"manifest value of unsupported type {type(value).__name__}: {value!r}")


def write_manifest(manifest: dict, path: Path) -> None:
    """Write a manifest dict as TOML: top-level keys first, then one [table] per dict value."""
    lines = [f"{key} = {toml_value(value)}" for key, value in manifest.items() if not isinstance(value, dict)]
    for table, values in manifest.items():
        if isinstance(values, dict):
            lines += ["", f"[{table}]", *(f"{key} = {toml_value(value)}" for key, value in values.items())]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def stage(platform: str, wheels: list[Path], stage_dir: Path) -> None:
    """Copy what ships (entry module, add-on package, licence) and write a manifest listing this platform's wheels."""
    shutil.copy2(ROOT / "__init__.py", stage_dir / "__init__.py")
    shutil.copytree(ROOT / "near_blender", stage_dir / "near_blender",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for licence in ("LICENSE", "LICENSE.txt", "COPYING"):
        if (ROOT / licence).is_file():
            shutil.copy2(ROOT / licence, stage_dir / licence)
    (stage_dir / "wheels").mkdir()
    for wheel in wheels:
        shutil.copy2(wheel, stage_dir / "wheels" / wheel.name)
    manifest = tomllib.loads((ROOT / "blender_manifest.toml").read_text(encoding="utf-8"))
    manifest["wheels"] = [f"./wheels/{wheel.name}" for wheel in sorted(wheels, key=lambda w: w.name)]
    manifest["platforms"] = [platform]
    # The staged copy holds only what ships, so the source's exclusions (which drop the repo's wheels/) do not apply.
    manifest["build"] = {"paths_exclude_pattern": ["__pycache__/", "*.pyc"]}
    write_manifest(manifest, stage_dir / "blender_manifest.toml")


def build_zip(blender_ext: Path, stage_dir: Path, zip_path: Path) -> None:
    """`blender_ext.py build` on the staged copy, then `blender_ext.py validate` on the zip it made."""
    zip_path.unlink(missing_ok=True)
    run([sys.executable, str(blender_ext), "build", "--source-dir", str(stage_dir),
         "--output-filepath", str(zip_path)], f"blender_ext build {zip_path.name}")
    run([sys.executable, str(blender_ext), "validate", str(zip_path)], f"blender_ext validate {zip_path.name}")


def build_platform(platform: str, args: argparse.Namespace, engine_wheel: Path, blender_ext: Path) -> Path:
    """Fetch the wheels for one platform and every requested Python, then build and validate its zip."""
    wheels = {engine_wheel.name: engine_wheel}
    if not args.engine_only:
        errors: list[str] = []
        for python in args.python:
            fetched = fetch_dependencies(engine_wheel, Target(platform, python), args.cache / platform,
                                         args.offline, args.torch_index)
            errors += fetched.errors
            wheels.update({wheel.name: wheel for wheel in fetched.wheels.values()})
        if errors:
            hint = (" (offline: these wheels are missing from the cache; run once without --offline)"
                    if args.offline else "")
            raise BuildError(f"{platform}: {len(errors)} wheel(s) could not be fetched{hint}:\n" + "\n".join(errors))
    version = tomllib.loads((ROOT / "blender_manifest.toml").read_text(encoding="utf-8"))["version"]
    suffix = "-engine-only" if args.engine_only else ""
    zip_path = args.output / f"near-{version}-{platform.replace('-', '_')}{suffix}.zip"
    with tempfile.TemporaryDirectory(prefix="near-stage-") as tmp:
        stage(platform, list(wheels.values()), Path(tmp))
        build_zip(blender_ext, Path(tmp), zip_path)
    size = zip_path.stat().st_size / 2**20
    log(f"{platform}: {zip_path} ({size:.1f} MiB, {len(wheels)} wheels), validated")
    return zip_path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Build the NeAR Blender extension zip for each platform: the near_engine wheel plus its "
                    "dependency wheels for every Python version, built and validated with Blender's blender_ext.py.")
    parser.add_argument("--platform", nargs="+", required=True, choices=sorted(PLATFORM_TAGS),
                        help="Blender platforms to build a zip for (one zip each)")
    parser.add_argument("--python", nargs="+", default=DEFAULT_PYTHONS, metavar="X.Y",
                        help="Python versions to bundle wheels for (default: %(default)s; Blender 4.2-5.0 run "
                             "3.11, 5.1+ run 3.13)")
    parser.add_argument("--output", type=Path, default=ROOT / "dist", help="folder for the zips (default: dist/)")
    parser.add_argument("--cache", type=Path, default=ROOT / "wheels" / "cache",
                        help="wheel cache, one subfolder per platform (default: wheels/cache/)")
    parser.add_argument("--offline", action="store_true",
                        help="use only wheels already in the cache; fail listing any that are missing")
    parser.add_argument("--torch-index", metavar="URL",
                        help="index to take torch from, e.g. https://download.pytorch.org/whl/cpu. PyPI's Linux "
                             "torch wheel needs the CUDA runtime (nvidia-* wheels, gigabytes) that is never "
                             "bundled, so Linux zips should use the CPU index; Windows and macOS torch from PyPI "
                             "is already CPU/MPS only")
    parser.add_argument("--engine-only", action="store_true",
                        help="FOR DEVELOPERS AND TESTS, NOT A USER BUILD: bundle only the near_engine wheel, for a "
                             "Blender whose Python already has torch, numba, etc. (such as the bpy module in .venv)")
    parser.add_argument("--blender-ext", type=Path, help="path to blender_ext.py (default: found inside bpy)")
    args = parser.parse_args(argv)
    for python in args.python:
        if not re.fullmatch(r"3\.\d+", python):
            parser.error(f"--python expects versions like 3.11, got {python!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.output = args.output.resolve()
    args.cache = args.cache.resolve()
    failures: list[str] = []
    try:
        blender_ext = args.blender_ext or find_blender_ext()
        args.output.mkdir(parents=True, exist_ok=True)
        engine_wheel = build_engine_wheel(args.cache)
    except BuildError as error:
        print(f"build_extension: error: {error}", file=sys.stderr)
        return 1
    if any(p.startswith("linux") for p in args.platform) and not (args.torch_index or args.engine_only):
        log("warning: Linux zips take torch from PyPI, which needs CUDA wheels that are not bundled; "
            "pass --torch-index https://download.pytorch.org/whl/cpu for a zip that runs on any Linux machine")
    for platform in args.platform:
        try:
            build_platform(platform, args, engine_wheel, blender_ext)
        except BuildError as error:
            failures.append(str(error))
    for failure in failures:
        print(f"build_extension: error: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
