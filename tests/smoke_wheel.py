"""Smoke test of an installed wheel (``make wheel-check``; not collected by pytest).

Run by the Python of a fresh virtual environment into which the wheel was installed with
the ``capi`` extra, from a directory outside the checkout. It checks what a new user
meets first: ``import fastnorm`` imports neither torch nor the checkout, a norm compiles
and matches a float64 NumPy reference, and ``python -m fastnorm.capi build`` builds the C
library from the sources the wheel ships; a C program compiled against it with ``-Wall
-Werror`` runs (the descriptor helpers and the version, which do not start the runtime: a
kernel call would compile every cfunc, several minutes).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import numpy as np

import fastnorm

PROGRAM = r"""
#include <stdio.h>
#include <string.h>
#include "fastnorm.h"

int main(void)
{
    int64_t dims[4] = {2, 6, 5, 5}, nstats = 0, nparams = 0;
    fastnorm_desc desc;
    if (fastnorm_desc_init(&desc, sizeof desc, FASTNORM_GROUP_NORM, FASTNORM_FLOAT32, 4, dims) != FASTNORM_OK)
        return 1;
    desc.num_groups = 3;
    if (fastnorm_num_stats(&desc, &nstats) != FASTNORM_OK)
        return 2;
    if (fastnorm_num_params(&desc, &nparams) != FASTNORM_OK)
        return 2;
    if (strcmp(fastnorm_version_string(), FASTNORM_VERSION_STRING) != 0)
        return 3;
    printf("%s %lld %lld\n", fastnorm_version_string(), (long long)nstats, (long long)nparams);
    return 0;
}
"""


def main():
    site_packages = Path(sysconfig.get_paths()["purelib"]).resolve()
    package = Path(fastnorm.__file__).resolve().parent
    assert package.parent == site_packages, f"fastnorm imported from {package}, not from {site_packages}"
    assert "torch" not in sys.modules, "import fastnorm imported torch"
    fastnorm.show_config()

    x = np.random.default_rng(0).standard_normal((4, 3, 16)) * 3 + 1
    y = fastnorm.layer_norm(x, 16)
    mean = x.mean(axis=-1, keepdims=True)
    expected = (x - mean) / np.sqrt(((x - mean) ** 2).mean(axis=-1, keepdims=True) + 1e-5)
    error = np.abs(y - expected).max()
    assert error < 1e-12, f"layer_norm differs from the float64 reference by {error}"
    print(f"layer_norm (4, 3, 16) float64: max error {error:.1e}")

    capi = [sys.executable, "-m", "fastnorm.capi"]
    built = subprocess.run([*capi, "build", "--no-warm"], capture_output=True, text=True)
    assert built.returncode == 0, built.stdout + built.stderr
    library = package / "capi" / "build" / "libfastnorm.so"
    assert library.is_file(), f"no {library}: {built.stderr}"
    flags = subprocess.run([*capi, "--cflags", "--libs"], capture_output=True, text=True)
    assert flags.returncode == 0, flags.stderr
    with tempfile.TemporaryDirectory() as tmp:
        source, program = Path(tmp) / "prog.c", Path(tmp) / "prog"
        source.write_text(PROGRAM)
        compiler = [shutil.which("cc") or "gcc", "-std=c99", "-Wall", "-Wextra", "-Werror"]
        command = [*compiler, str(source), "-o", str(program), *flags.stdout.split()]
        compiled = subprocess.run(command, capture_output=True, text=True)
        assert compiled.returncode == 0, compiled.stderr
        ran = subprocess.run([str(program)], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    printed = ran.stdout.split()
    assert ran.returncode == 0 and printed[1:] == ["6", "6"], (ran.returncode, ran.stdout, ran.stderr)
    print(f"C: built {library}, a program linked to it printed {ran.stdout.strip()!r}")
    print("wheel smoke test passed")


if __name__ == "__main__":
    main()
