"""Command line of the C ABI: ``python -m fastnorm.capi {build,--warm,--cflags,--libs}``."""

from __future__ import annotations

import argparse
import sys

from . import build, cflags, default_build_dir, libs, warm


def main(argv=None):
    """Run the command line.

    Parameters
    ----------
    argv : list of str, optional
        Arguments (default ``sys.argv[1:]``).

    Returns
    -------
    int
        Exit status.
    """
    parser = argparse.ArgumentParser(
        prog="python -m fastnorm.capi",
        description="Build and use libfastnorm.so, the C ABI of fastnorm (see docs/c-api.md).",
    )
    parser.add_argument(
        "command", nargs="?", choices=["build"], help="build libfastnorm.so, include/fastnorm.h, fastnorm.pc"
    )
    parser.add_argument("--out", help=f"build directory (default {default_build_dir()})")
    parser.add_argument("--no-warm", action="store_true", help="build: do not warm Numba's cache")
    parser.add_argument("--verbose", action="store_true", help="build: show compiler commands")
    parser.add_argument("--warm", action="store_true", help="compile the kernels' cfuncs into Numba's cache")
    parser.add_argument(
        "--jobs", type=int, default=1, help="--warm: processes compiling at once (one core each; default 1)"
    )
    parser.add_argument(
        "--dtypes", help="--warm: only these data dtypes, comma-separated (float32,float64,float16,bfloat16)"
    )
    parser.add_argument("--cflags", action="store_true", help="print the compiler flags")
    parser.add_argument("--libs", action="store_true", help="print the linker flags")
    args = parser.parse_args(argv)
    if not (args.command or args.warm or args.cflags or args.libs):
        parser.print_help()
        return 2
    if args.command == "build":
        path = build(args.out, verbose=args.verbose)
        print(f"built {path}", file=sys.stderr)
        if not args.no_warm:
            args.warm = True
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    dtypes = None
    if args.dtypes is not None:
        dtypes = [name for name in args.dtypes.split(",") if name]
        unknown = sorted(set(dtypes) - {"float32", "float64", "float16", "bfloat16"})
        if unknown or not dtypes:
            parser.error(f"--dtypes: unknown dtype(s) {unknown or args.dtypes!r}")
    if args.warm:
        info = warm(args.jobs, dtypes)
        print(
            f"cfuncs ready in {info['seconds']:.2f} s ({info['cached']} from cache, {info['compiled']} "
            f"compiled); threading layer {info['layer']}, {info['max_threads']} threads",
            file=sys.stderr,
        )
    flags = []
    if args.cflags:
        flags.append(cflags(args.out))
    if args.libs:
        flags.append(libs(args.out))
    if flags:
        print(" ".join(flags))
    return 0


if __name__ == "__main__":
    sys.exit(main())
