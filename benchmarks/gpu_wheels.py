"""Wheels for the GPU machine, whose image has no network: fetched here, installed there offline.

    python benchmarks/gpu_wheels.py fetch                               # here (`make gpu-wheels`): benchmarks/wheels/
    python benchmarks/gpu_wheels.py install --wheels DIR --site DIR     # there (gpu_session.sh, stage `wheels`)

requirements/gpu-wheels.txt names each wheel with the module it provides, the stage that imports it and whether
that stage needs it. `install` installs a wheel only where the image cannot import its module, with
`pip install --no-index --find-links DIR --no-deps --target SITE` (unpacking the wheel itself where the image's
Python has no pip: all of them are py3-none-any), so the image's own packages are never replaced;
gpu_session.sh puts SITE first on PYTHONPATH for every stage. Its exit status is 1 when a needed module stays
missing (the last lines name it and what to do), else 0. Standard library only: it runs before anything is
installed.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIST = os.path.join(ROOT, "requirements", "gpu-wheels.txt")
WHEELS = os.path.join(ROOT, "benchmarks", "wheels")
CARRY_LIMIT_MIB = 64  # what one device call may carry (ignored paths), all of it together
FETCH_LIMIT_MIB = 16  # this folder's share of it; the set is 3.2 MiB
HOWTO = "here, before the device call: `make gpu-wheels`, then run with carry [\"benchmarks/wheels\"]"


@dataclass(frozen=True)
class Wheel:
    module: str       # what `import` must find
    requirement: str  # NAME==VERSION
    stage: str        # the gpu_session.sh stage that imports it
    need: bool        # False: best effort

    @property
    def dist(self) -> str:
        return self.requirement.split("==")[0]

    @property
    def version(self) -> str:
        return self.requirement.split("==")[1]


def norm(name: str) -> str:
    """A distribution name as wheel file names spell it (PEP 427/503: runs of -_. become _, lower case)."""
    return re.sub(r"[-_.]+", "_", name).lower()


def read_list(path: str = LIST) -> list[Wheel]:
    wheels = []
    with open(path) as f:
        lines = f.read().splitlines()
    for n, line in enumerate(lines, 1):
        fields = line.split("#")[0].split()
        if not fields:
            continue
        if len(fields) != 4 or fields[3] not in ("need", "optional") or fields[1].count("==") != 1:
            raise SystemExit(f"{path}:{n}: expected 'module name==version stage need|optional', got {line.strip()!r}")
        wheels.append(Wheel(fields[0], fields[1], fields[2], fields[3] == "need"))
    return wheels


def is_pure(filename: str) -> bool:
    """py3-none-any (or py2.py3-none-any): installs on any CPython 3 of any platform."""
    tags = filename[:-len(".whl")].split("-")[-3:]
    return filename.endswith(".whl") and "py3" in tags[0].split(".") and tags[1:] == ["none", "any"]


def wheel_file(wheels_dir: str, w: Wheel) -> str | None:
    """The wheel of w in wheels_dir: its pinned version, else the newest other version there, else None."""
    try:
        names = sorted(os.listdir(wheels_dir))
    except OSError:
        return None
    mine = [f for f in names if f.endswith(".whl") and norm(f.split("-")[0]) == norm(w.dist)]
    pinned = [f for f in mine if f.split("-")[1] == w.version]
    pick = (pinned or mine[-1:] or [None])[0]
    return os.path.join(wheels_dir, pick) if pick else None


# ----------------------------------------------------------------------------- fetch (here)
def fetch(dest: str = WHEELS, list_path: str = LIST, limit_mib: float = FETCH_LIMIT_MIB,
          python_version: str = "3.12") -> int:
    wheels = read_list(list_path)
    part = dest.rstrip("/") + ".part"
    shutil.rmtree(part, ignore_errors=True)
    os.makedirs(part)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
           python_version, "--disable-pip-version-check", "-q", "-d", part, *(w.requirement for w in wheels)]
    print(" ".join(cmd), flush=True)
    rc = subprocess.call(cmd)
    if rc != 0:
        print(f"gpu-wheels: pip download failed (exit {rc}); {dest} left as it was", file=sys.stderr)
        return rc
    problems = check_dir(part, wheels, limit_mib)
    if problems:
        print("\n".join(f"gpu-wheels: {p}" for p in problems), file=sys.stderr)
        return 1
    shutil.rmtree(dest, ignore_errors=True)
    os.rename(part, dest)
    total = 0
    for f in sorted(os.listdir(dest)):
        size = os.path.getsize(os.path.join(dest, f))
        total += size
        print(f"  {size / 1e6:7.3f} MB  {f}")
    print(f"gpu-wheels: {len(wheels)} wheels, {total / 2**20:.2f} MiB in {os.path.relpath(dest, ROOT)} "
          f"(a device call carries at most {CARRY_LIMIT_MIB} MiB); carry [\"benchmarks/wheels\"]")
    return 0


def check_dir(wheels_dir: str, wheels: list[Wheel], limit_mib: float = FETCH_LIMIT_MIB) -> list[str]:
    """What is wrong with a fetched folder: a listed wheel missing, one that is not py3-none-any, a file not in
    the list, the size over limit_mib."""
    problems, expected = [], set()
    for w in wheels:
        path = wheel_file(wheels_dir, w)
        if path is None or os.path.basename(path).split("-")[1] != w.version:
            problems.append(f"no {w.requirement} wheel in {wheels_dir}")
            continue
        expected.add(os.path.basename(path))
        if not is_pure(os.path.basename(path)):
            problems.append(f"{os.path.basename(path)} is not py3-none-any: pin a version that has a pure wheel")
    extra = sorted(set(os.listdir(wheels_dir)) - expected)
    if extra:
        problems.append(f"files not in {os.path.relpath(LIST, ROOT)}: {', '.join(extra)}")
    total = sum(os.path.getsize(os.path.join(wheels_dir, f)) for f in os.listdir(wheels_dir))
    if total > limit_mib * 2**20:
        problems.append(f"{total / 2**20:.1f} MiB is over the {limit_mib} MiB kept for the wheels")
    return problems


# ----------------------------------------------------------------------------- install (on the GPU machine)
def import_errors(modules: list[str], site: str) -> dict[str, str | None]:
    """{module: None if a fresh interpreter with site first on its path imports it, else the error}."""
    probe = ("import importlib, json, sys\nout = {}\nfor m in sys.argv[1:]:\n    try:\n"
             "        importlib.import_module(m)\n        out[m] = None\n    except Exception as e:\n"
             "        out[m] = f'{type(e).__name__}: {e}'\nprint(json.dumps(out))\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [site, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", probe, *modules], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {m: f"the import probe failed: {proc.stderr.strip()[-300:]}" for m in modules}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def has_pip() -> bool:
    return subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode == 0


def pip_install(files: list[str], wheels_dir: str, site: str) -> bool:
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", wheels_dir, "--no-deps",
           "--no-compile", "--upgrade", "--disable-pip-version-check", "--no-warn-script-location", "-q",
           "--target", site, *files]
    print("wheels: " + " ".join(cmd), flush=True)
    return subprocess.call(cmd) == 0


def unpack(files: list[str], site: str) -> None:
    """Install pure wheels by unpacking them (what pip does for py3-none-any, less scripts and headers):
    the archive root goes to site, NAME.data/purelib and NAME.data/platlib too, the rest of NAME.data is left."""
    root = os.path.realpath(site)
    for path in files:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                parts = info.filename.split("/")
                if parts[0].endswith(".data"):
                    if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                        continue
                    parts = parts[2:]
                target = os.path.realpath(os.path.join(root, *parts))
                if not target.startswith(root + os.sep):
                    raise SystemExit(f"{path}: {info.filename} would land outside {site}")
                if info.is_dir():
                    os.makedirs(target, exist_ok=True)
                    continue
                os.makedirs(os.path.dirname(target), exist_ok=True)
                with z.open(info) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)


def install(wheels_dir: str, site: str, list_path: str = LIST) -> int:
    wheels = read_list(list_path)
    site = os.path.abspath(site)
    print(f"wheels: python {sys.version.split()[0]} ({sys.executable}); site {site}; wheels {wheels_dir}", flush=True)
    before = import_errors([w.module for w in wheels], site)
    absent = [w for w in wheels if before[w.module] is not None]
    for w in wheels:
        if w not in absent:
            print(f"  {w.module:16s} present")
    files, no_wheel = [], []
    for w in absent:
        path = wheel_file(wheels_dir, w)
        if path is None:
            no_wheel.append(w)
        else:
            files.append(path)
            print(f"  {w.module:16s} not importable ({before[w.module]}): installing {os.path.basename(path)}")
    if files:
        os.makedirs(site, exist_ok=True)
        if not (has_pip() and pip_install(files, wheels_dir, site)):
            print("wheels: no working pip for this Python; unpacking the wheels into the site folder instead",
                  flush=True)
            unpack(files, site)
    after = import_errors([w.module for w in absent], site) if absent else {}
    installed = [w.module for w in absent if after[w.module] is None]
    failed = [w for w in absent if after[w.module] is not None]
    for w in failed:
        why = (f"{wheels_dir} has no {w.dist} wheel" if w in no_wheel
               else f"its wheel did not make it importable ({after[w.module]})")
        if w.need:
            print(f"wheels: MISSING {w.module} (the {w.stage} stage needs it): not importable, and {why}; {HOWTO}")
        else:
            print(f"  {w.module:16s} left out (optional, for {w.stage}): {why}")
    print(f"wheels: installed {', '.join(installed) or 'nothing'}; "
          f"{len(wheels) - len(absent)} of {len(wheels)} were already importable", flush=True)
    missing = [w.module for w in failed if w.need]
    if missing:
        print(f"wheels: FAILED: {', '.join(missing)} missing; {HOWTO}")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python benchmarks/gpu_wheels.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="download the listed wheels (here, with network)")
    f.add_argument("--dest", default=WHEELS)
    f.add_argument("--limit-mib", type=float, default=FETCH_LIMIT_MIB)
    i = sub.add_parser("install", help="install the wheels whose modules the running Python cannot import")
    i.add_argument("--wheels", default=WHEELS)
    i.add_argument("--site", required=True, help="--target folder; later stages need it on PYTHONPATH")
    for p in (f, i):
        p.add_argument("--list", default=LIST, help="requirements/gpu-wheels.txt")
    args = ap.parse_args(argv)
    if args.cmd == "fetch":
        return fetch(args.dest, args.list, args.limit_mib)
    return install(args.wheels, args.site, args.list)


if __name__ == "__main__":
    sys.exit(main())
