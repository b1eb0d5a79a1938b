"""Download here the wheels that bench/gpu/gpu_check.sh installs on this workplace's GPU machine, which has no
network, Python 3.12 and its own torch (2.11, CUDA 13), transformers, peft, accelerate and safetensors
(/work/.library/device/KINDS.md lists what it holds): the packages it lacks, at the versions installed here
(those this project is tested with), into .whl/ (git-ignored). Then checks that they and the working tree
fit the device tool's 64 MiB carry limit, leaving out what does not fit, last in PACKAGES first.

    python bench/gpu/gpu_wheels.py    # again before each run: it fetches only what is missing and re-checks

Not carried: flash-attn (PyPI has only its source, a CUDA build of about an hour), so its test skips there.
"""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WHEELS = REPO / ".whl"
LIMIT = 64 * 2**20  # the device tool's carry limit: the working tree and the carried paths together
# In order of need: DeepSpeed and what it needs, datasets and what it needs, gguf, then bitsandbytes (43 MB,
# only for the nf4 test, which skips without it).
PACKAGES = ("deepspeed", "hjson", "pydantic", "pydantic-core", "annotated-types", "typing-inspection",
            "typing-extensions", "datasets", "dill", "multiprocess", "gguf", "bitsandbytes")
OPTIONAL = {"bitsandbytes"}
TARGET = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
          *(arg for tag in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
                            "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")
            for arg in ("--platform", tag))]


def wheel_prefix(name: str, version: str) -> str:
    """A wheel file name's start, as pip writes it (name normalised to underscores)."""
    return f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}-"


def tree_bytes() -> int:
    """The bytes of what the device tool copies besides carried paths: tracked and untracked, not ignored."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           check=True, capture_output=True, text=True).stdout.split("\0")
    return sum(path.stat().st_size for path in (REPO / name for name in names if name) if path.is_file())


def fetch(name: str, version: str) -> Path:
    existing = [p for p in WHEELS.glob("*.whl") if p.name.lower().startswith(wheel_prefix(name, version))]
    if not existing:
        if name == "deepspeed":
            # PyPI has DeepSpeed's source only: built here into a pure-Python wheel (its ops compile on first
            # use; none is needed here). Building imports torch, so no build isolation.
            command = ["wheel", "--no-deps", "--no-build-isolation", "-w", str(WHEELS)]
        else:
            command = ["download", "--no-deps", *TARGET, "-d", str(WHEELS)]
        subprocess.run([sys.executable, "-m", "pip", *command, "-q", f"{name}=={version}"], check=True)
        existing = [p for p in WHEELS.glob("*.whl") if p.name.lower().startswith(wheel_prefix(name, version))]
    return existing[0]


def main() -> int:
    WHEELS.mkdir(exist_ok=True)
    wanted = {name: importlib.metadata.version(name) for name in PACKAGES}
    for stale in WHEELS.glob("*.whl"):  # other versions: two of one package stop the install there
        if not any(stale.name.lower().startswith(wheel_prefix(n, v)) for n, v in wanted.items()):
            stale.unlink()
    budget = LIMIT - tree_bytes()
    print(f"working tree {(LIMIT - budget) / 2**20:.1f} MiB of the {LIMIT // 2**20} MiB carry limit")
    left_out = []
    for name, version in wanted.items():
        wheel = fetch(name, version)
        size = wheel.stat().st_size
        if size > budget:
            wheel.unlink()
            left_out.append(name)
            print(f"  left out {wheel.name} ({size / 2**20:.1f} MiB): it does not fit")
            continue
        budget -= size
        print(f"  {wheel.name} {size / 2**20:.2f} MiB")
    carried = sum(p.stat().st_size for p in WHEELS.glob("*.whl"))
    print(f".whl {carried / 2**20:.1f} MiB; with the working tree {(LIMIT - budget) / 2**20:.1f} MiB, "
          f"{budget / 2**20:.1f} MiB to spare")
    if left_out:
        print(f"left out: {', '.join(left_out)} (bitsandbytes: the nf4 test skips; anything else: the GPU check "
              "cannot run; make the working tree smaller)")
    return 1 if set(left_out) - OPTIONAL else 0


if __name__ == "__main__":
    sys.exit(main())
