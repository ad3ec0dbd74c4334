"""First-run setup of the backend's own Python environment, outside QGIS's Python (no Qt here).

The backend needs torch, which must never be installed into QGIS's interpreter. The plan:

1. find a real ``python3`` (QGIS's ``sys.executable`` is often QGIS itself): :func:`find_python`;
2. create a virtualenv in the QGIS profile's folder, ``<profile>/mapquery_rs/venv`` (:func:`venv_dir`);
3. install ``torch``/``torchvision`` for the GPU found (``nvidia-smi`` present: the CUDA wheel index that the
   driver supports; else the CPU index) and the rest of ``pyproject.toml``'s dependencies; or, with another
   package source, from a folder of wheels (``pip --no-index --find-links DIR``) or from an existing Python
   environment that already has them (its ``site-packages`` is linked into the new virtualenv by a ``.pth``
   file, then ``pip --no-index`` checks that every requirement is met);
4. check that the environment imports torch and the backend, and mark it ready.

Each step is a plain command line (:class:`Step`), run by :mod:`setup_dialog` with ``QProcess``; a failed
step's message names the step, the log file and the exact command to run by hand.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

MIN_PYTHON = (3, 10)
READY_MARKER = ".mapquery-ready"  # written into the venv by the last step: the setup completed
PYPI, WHEELS, REUSE = "pypi", "wheels", "reuse"
SOURCES = {PYPI: "PyPI (download; default)", WHEELS: "A folder of wheels (offline)",
           REUSE: "An existing Python environment that has torch"}
TORCH_INDEX = "https://download.pytorch.org/whl/{tag}"
# (minimum CUDA version the driver must support, wheel tag), newest first
CUDA_WHEELS: Sequence[Tuple[Tuple[int, int], str]] = (((12, 8), "cu128"), ((12, 6), "cu126"), ((12, 4), "cu124"),
                                                       ((12, 1), "cu121"), ((11, 8), "cu118"))
TORCH_PACKAGES = ("torch", "torchvision")
Runner = Callable[..., subprocess.CompletedProcess]


class SetupError(Exception):
    """A setup that cannot begin (no Python, a bad package source); the message says what to do."""


# -- where ---------------------------------------------------------------------------------------------
def venv_dir(profile_dir: str) -> Path:
    """The backend's virtualenv inside a QGIS profile folder (``QgsApplication.qgisSettingsDirPath()``)."""
    return Path(profile_dir) / "mapquery_rs" / "venv"


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def is_ready(venv: Path) -> bool:
    """True when a setup completed there (and its Python is still there)."""
    return (venv / READY_MARKER).is_file() and venv_python(venv).is_file()


def log_path(profile_dir: str) -> Path:
    return Path(profile_dir) / "mapquery_rs" / "setup.log"


# -- which Python -------------------------------------------------------------------------------------
def python_version(python: str, run: Runner = subprocess.run) -> Optional[Tuple[int, int]]:
    """(major, minor) of an interpreter that can create virtualenvs, or None."""
    try:
        out = run([python, "-c", "import sys, venv; print(sys.version_info[0], sys.version_info[1])"],
                  capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    parts = out.stdout.split() if out.returncode == 0 else []
    return (int(parts[0]), int(parts[1])) if len(parts) == 2 and all(p.isdigit() for p in parts) else None


def python_candidates(executable: str = sys.executable, prefix: str = sys.prefix, windows: bool = os.name == "nt",
                      which: Callable[[str], Optional[str]] = shutil.which) -> List[str]:
    """Interpreters to try, best first. On Windows the Python that ships beside QGIS (QGIS's own
    ``sys.executable`` is ``qgis-bin.exe``); elsewhere ``python3`` on PATH, then QGIS's interpreter when it
    is a Python (Linux packages) rather than QGIS itself (macOS app bundle)."""
    found: List[str] = []
    if windows:
        here = Path(executable).parent
        found += [str(Path(prefix) / "python.exe"), str(here / "python3.exe"), str(here / "python.exe")]
        found += [p for p in (which("python3"), which("python")) if p]
    else:
        found += [p for p in (which("python3"),) if p]
        if re.fullmatch(r"python3(\.\d+)?", Path(executable).name):
            found.append(executable)
    unique: List[str] = []
    for p in found:
        if p not in unique:
            unique.append(p)
    return unique


def find_python(candidates: Optional[Sequence[str]] = None, run: Runner = subprocess.run) -> Optional[str]:
    """The first interpreter >= 3.10 with ``venv`` among :func:`python_candidates`, or None."""
    for python in (python_candidates() if candidates is None else candidates):
        if Path(python).is_file():
            version = python_version(python, run)
            if version is not None and version >= MIN_PYTHON:
                return python
    return None


def no_python_message() -> str:
    where = ("the python.exe beside QGIS (in its apps\\Python3* folder)" if os.name == "nt"
             else "python3 on PATH (3.10 or newer, with the venv module: on Debian/Ubuntu 'apt install python3-venv')")
    return (f"No Python {MIN_PYTHON[0]}.{MIN_PYTHON[1]}+ to create the backend's environment with was found; looked "
            f"for {where}. Install one, or choose its interpreter here.")


# -- which torch ----------------------------------------------------------------------------------------
@dataclass
class Gpu:
    """What the machine offers the backend: ``cuda`` (an NVIDIA driver answers) or ``cpu``, and why."""

    kind: str
    name: str = ""
    cuda: Optional[Tuple[int, int]] = None  # the highest CUDA version the driver supports
    reason: str = ""

    def describe(self) -> str:
        if self.kind == "cuda":
            cuda = f", driver supports CUDA {self.cuda[0]}.{self.cuda[1]}" if self.cuda else ""
            return f"NVIDIA GPU: {self.name}{cuda}"
        return f"no GPU used: {self.reason}"


def detect_gpu(run: Runner = subprocess.run, which: Callable[[str], Optional[str]] = shutil.which) -> Gpu:
    """An NVIDIA GPU when ``nvidia-smi`` lists one (its header says which CUDA the driver supports)."""
    smi = which("nvidia-smi")
    if smi is None:
        return Gpu("cpu", reason="no NVIDIA driver (nvidia-smi not found)")
    try:
        names = run([smi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        header = run([smi], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as exc:
        return Gpu("cpu", reason=f"nvidia-smi failed: {exc}")
    gpus = [n.strip() for n in names.stdout.splitlines() if n.strip()] if names.returncode == 0 else []
    if not gpus:
        return Gpu("cpu", reason="nvidia-smi lists no GPU")
    match = re.search(r"CUDA Version:\s*(\d+)\.(\d+)", header.stdout or "")
    return Gpu("cuda", name=gpus[0], cuda=(int(match.group(1)), int(match.group(2))) if match else None)


def torch_index(gpu: Gpu, platform: str = sys.platform) -> Optional[str]:
    """The pip index for torch: a CUDA build the driver can run, the CPU build, or None (PyPI's, on macOS)."""
    if platform == "darwin":
        return None
    if gpu.kind == "cuda":
        for minimum, tag in CUDA_WHEELS:
            if gpu.cuda is None or gpu.cuda >= minimum:
                return TORCH_INDEX.format(tag=tag)
    return TORCH_INDEX.format(tag="cpu")


# -- what -----------------------------------------------------------------------------------------------
def project_dependencies(pyproject: Path) -> List[str]:
    """``[project] dependencies`` of a ``pyproject.toml``."""
    text = pyproject.read_text(encoding="utf-8")
    try:
        import tomllib
        return list(tomllib.loads(text)["project"]["dependencies"])
    except ImportError:  # Python < 3.11: the list is a plain array of strings
        match = re.search(r"^dependencies\s*=\s*\[(.*?)\]", text, re.S | re.M)
        return re.findall(r"[\"']([^\"']+)[\"']", re.sub(r"#[^\n]*", "", match.group(1))) if match else []


def requirement_name(spec: str) -> str:
    return re.split(r"[\s<>=!~;\[]", spec.strip(), maxsplit=1)[0].lower().replace("_", "-")


@dataclass
class PackageSource:
    """Where the packages come from: PyPI, a folder of wheels, or an existing environment (its Python)."""

    kind: str = PYPI
    path: str = ""  # the wheel folder, or the Python of the environment to reuse

    def check(self) -> None:
        if self.kind not in SOURCES:
            raise SetupError(f"unknown package source {self.kind!r}; choose one of {', '.join(SOURCES)}")
        if self.kind == WHEELS and not (self.path and Path(self.path).is_dir()):
            raise SetupError(f"the wheel folder {self.path!r} does not exist: choose a folder of .whl files")
        if self.kind == REUSE and not (self.path and Path(self.path).is_file()):
            raise SetupError(f"{self.path!r} is not a Python interpreter: choose the python (bin/python, "
                             "Scripts\\python.exe) of the environment that has torch")


@dataclass
class Step:
    """One command of the setup."""

    title: str
    argv: List[str]
    env: Dict[str, str] = field(default_factory=dict)  # added to the environment

    def shell(self) -> str:
        """The command as one would type it."""
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        cmd = subprocess.list2cmdline(self.argv) if os.name == "nt" else shlex.join(self.argv)
        return f"{env} {cmd}" if env else cmd


# Run in the new environment: link another environment's site-packages (plain path lines in a .pth file:
# that environment's own .pth hooks, e.g. editable installs, are not run).
_LINK = ("import json, subprocess, sys, sysconfig, pathlib; other = sys.argv[1]; "
         "dirs = json.loads(subprocess.check_output([other, '-c', 'import json, site, sys; print(json.dumps("
         "[p for p in sys.path if p.endswith((\"site-packages\", \"dist-packages\"))] or site.getsitepackages()))'"
         "], text=True)); pth = pathlib.Path(sysconfig.get_paths()['purelib']) / 'mapquery_reuse.pth'; "
         "pth.write_text(''.join(d + chr(10) for d in dirs)); print('linked', *dirs)")
_CHECK = ("import sys, pathlib; import torch, open_clip, zmq, numpy; import backend.cli; "
          "print('torch', torch.__version__, 'cuda build', torch.version.cuda, 'cuda available', "
          "torch.cuda.is_available()); pathlib.Path(sys.argv[1]).write_text(torch.__version__)")


def plan(python: str, venv: Path, source_dir: str, source: PackageSource, gpu: Gpu,
         platform: str = sys.platform) -> List[Step]:
    """The commands that set up the backend's environment in ``venv``; ``source_dir`` holds ``backend/``,
    ``shared_protocol/`` and ``pyproject.toml``."""
    source.check()
    deps = project_dependencies(Path(source_dir) / "pyproject.toml")
    torch_deps = [d for d in deps if requirement_name(d) in TORCH_PACKAGES]
    rest = [d for d in deps if requirement_name(d) not in TORCH_PACKAGES]
    vpy = str(venv_python(venv))
    pip = [vpy, "-m", "pip", "install", "--disable-pip-version-check"]
    base = source.path if source.kind == REUSE else python
    # reusing: no pip of its own (its bundled setuptools would shadow the other environment's); the other's
    # pip, reached through the link, checks the requirements
    steps = [Step("Create the virtualenv", [base, "-m", "venv", "--clear", *(["--without-pip"] if source.kind == REUSE
                                                                              else []), str(venv)])]
    if source.kind == REUSE:
        steps.append(Step("Link the existing environment's packages", [vpy, "-c", _LINK, source.path]))
        steps.append(Step("Check that it has every dependency", pip + ["--no-index", *deps]))
    elif source.kind == WHEELS:
        steps.append(Step("Install the packages from the wheel folder",
                          pip + ["--no-index", "--find-links", source.path, *deps]))
    else:
        index = torch_index(gpu, platform)
        what = "CUDA" if gpu.kind == "cuda" and index and "/cu" in index else "CPU"
        steps.append(Step(f"Install torch ({what} build)",
                          pip + torch_deps + (["--index-url", index] if index else [])))
        steps.append(Step("Install the other dependencies", pip + rest))
    steps.append(Step("Check that the backend imports", [vpy, "-c", _CHECK, str(venv / READY_MARKER)],
                      env={"PYTHONPATH": source_dir}))
    return steps


def failure_message(step: Step, code: int, log: Path, tail: Sequence[str] = ()) -> str:
    """What failed, where the log is and the exact command to run by hand."""
    last = next((line.strip() for line in reversed(tail) if line.strip()), "")
    said = f" It said: {last}" if last else ""
    return (f"Setting up the backend failed at '{step.title}' (exit code {code}).{said}\n"
            f"Log: {log}\nTo run that step by hand: {step.shell()}")
