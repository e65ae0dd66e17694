#!/usr/bin/env python3
"""Install llama-cpp-python with a build that is safe on this machine, compiling at most once.

Why: llama-cpp-python ships no binary wheel on PyPI, so pip compiles it (6-12 minutes on 2 cores),
and the default native build enables AMX tensor repacking, which segfaults in `decode` on every
quantized GGUF on some CPUs (llama.cpp issue #20824). We build with GGML_NATIVE=OFF and turn on
only the SIMD extensions this CPU reports, and keep the built wheel in a cache directory whose
name records the version and the flags: the same machine never compiles the same build twice.

Usage: python scripts/install_llama_cpp.py [--python PATH] [--version X.Y.Z] [--print-flags]
Environment: FINETUNE_LLAMA_CMAKE_ARGS overrides the chosen flags (e.g. "-DGGML_CUDA=on" on a GPU box);
FINETUNE_CACHE (default ~/.cache/finetune) chooses where wheels are kept.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

DEFAULT_VERSION = "0.3.36"

# (cpuinfo flag, cmake option). AVX512 is deliberately not enabled: the AMX/AVX512 repack paths are
# where the crash lives, and AVX2 decode is within a few percent for the model sizes we target on CPU.
X86_FEATURES = [
    ("avx", "-DGGML_AVX=ON"),
    ("avx2", "-DGGML_AVX2=ON"),
    ("fma", "-DGGML_FMA=ON"),
    ("f16c", "-DGGML_F16C=ON"),
    ("bmi2", "-DGGML_BMI2=ON"),
]


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def choose_cmake_args() -> str:
    override = os.environ.get("FINETUNE_LLAMA_CMAKE_ARGS")
    if override is not None:
        return override
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        flags = cpu_flags()
        args = ["-DGGML_NATIVE=OFF"] + [opt for flag, opt in X86_FEATURES if flag in flags]
        return " ".join(args)
    # ARM and others: the native build has no AMX repack path; keep llama.cpp's own choice.
    return ""


def cache_dir() -> Path:
    root = os.environ.get("FINETUNE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "finetune")
    return Path(root) / "wheels"


def ensure_sdist(python: str, version: str) -> Path:
    """The source archive, kept beside the wheels: the build uses it, and export reads llama.cpp's own
    converter and test vocabularies from it (finetune/gguf/sdist.py looks in the same place)."""
    folder = cache_dir().parent / "sdists"
    archive = folder / f"llama_cpp_python-{version}.tar.gz"
    if archive.exists():
        return archive
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".download-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.check_call([python, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                           "-d", str(tmp), f"llama-cpp-python=={version}"])
    got = sorted(tmp.glob("llama_cpp_python-*.tar.gz"))
    os.replace(got[0], archive)
    shutil.rmtree(tmp, ignore_errors=True)
    return archive


def installed_version(python: str) -> str | None:
    out = subprocess.run(
        [python, "-c", "import importlib.metadata as m; print(m.version('llama-cpp-python'))"],
        capture_output=True, text=True,
    )
    return out.stdout.strip() if out.returncode == 0 else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--python", default=sys.executable, help="interpreter of the venv to install into")
    ap.add_argument("--version", default=DEFAULT_VERSION, help="llama-cpp-python version")
    ap.add_argument("--print-flags", action="store_true", help="print the chosen CMAKE_ARGS and exit")
    ap.add_argument("--extras", default="server", help="extras to install with it (default: server)")
    opts = ap.parse_args()

    cmake_args = choose_cmake_args()
    if opts.print_flags:
        print(cmake_args)
        return 0
    sdist = ensure_sdist(opts.python, opts.version)
    py_tag = subprocess.run([opts.python, "-c", "import sys;print(f'cp{sys.version_info[0]}{sys.version_info[1]}')"],
                            capture_output=True, text=True, check=True).stdout.strip()
    key = hashlib.sha256(f"{opts.version}|{platform.machine()}|{py_tag}|{cmake_args}".encode()).hexdigest()[:12]
    wheel_dir = cache_dir() / f"llama-cpp-python-{opts.version}-{py_tag}-{key}"
    marker = wheel_dir / "BUILD_FLAGS"
    wheels = sorted(wheel_dir.glob("llama_cpp_python-*.whl")) if wheel_dir.exists() else []

    # Already installed from this exact cached build?  Nothing to do.
    stamp = Path(os.path.abspath(opts.python)).parent.parent / ".llama_cpp_build"  # the venv, not the base interpreter
    if wheels and installed_version(opts.python) == opts.version and stamp.exists() and stamp.read_text() == key:
        print(f"llama-cpp-python {opts.version} already installed (build {key}: {cmake_args or 'default'})")
        return 0

    if not wheels:
        print(f"Building llama-cpp-python {opts.version} once (several minutes) with CMAKE_ARGS='{cmake_args}'",
              flush=True)
        tmp = wheel_dir.with_name(wheel_dir.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        env = dict(os.environ, CMAKE_ARGS=cmake_args, FORCE_CMAKE="1")
        env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
        cmd = [opts.python, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir",
               "-w", str(tmp), str(sdist)]
        rc = subprocess.call(cmd, env=env)
        if rc != 0:
            print("error: building llama-cpp-python failed (see the compiler output above). It needs a C/C++ "
                  "compiler and cmake: on Debian/Ubuntu `apt-get install build-essential cmake`.", file=sys.stderr)
            return rc
        (tmp / "BUILD_FLAGS").write_text(cmake_args + "\n")
        os.replace(tmp, wheel_dir)  # atomic: a half-built cache is never mistaken for a finished one
        wheels = sorted(wheel_dir.glob("llama_cpp_python-*.whl"))
    else:
        print(f"Using cached llama-cpp-python build {wheel_dir.name} ({marker.read_text().strip() or 'default'})")

    extras = f"[{opts.extras}]" if opts.extras else ""
    rc = subprocess.call([opts.python, "-m", "pip", "install", "-q", "--force-reinstall", "--no-deps", str(wheels[-1])])
    if rc == 0 and extras:
        # the extras' own dependencies (fastapi, uvicorn, ...) come from the index as usual
        rc = subprocess.call([opts.python, "-m", "pip", "install", "-q", f"{wheels[-1]}{extras}"])
    if rc == 0:
        stamp.write_text(key)
    return rc


if __name__ == "__main__":
    sys.exit(main())
