"""The mutation check: the suite must notice a broken kernel.

Runs the kernel and end-to-end tests against each mutant library given (built by
`make test-mutation` with ICE_ONNX_MUTANT, loaded through ICE_ONNX_KERNEL_LIBRARY) and
requires at least --min-failures failed tests per mutant. pytest stops at that many
(--maxfail), so a mutant the suite catches costs a minute, not a full run. Errors (a
fixture or collection that breaks) do not count as caught: only failed assertions.

    python tests/mutation/check.py --min-failures 25 exact_everywhere=build/mutant-exact_everywhere/.../libice_onnx_ops.so

Exit status: 0 when every mutant was caught, 1 when one was not, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Fast kernel tests first, then whole converted models against the original in ORT.
TESTS = [
    "tests/test_kernel_knn.py",
    "tests/test_kernel_properties.py",
    "tests/test_rewriter_fixtures.py::test_knn_mode_matches_the_original",
    "tests/test_trained_models.py",
    "tests/test_eval_causal_lm.py::test_forced_knn_runs_the_knn_path_and_changes_the_numbers",
]


def failed_tests(library: Path, stop_after: int, log: Path) -> tuple[int, int]:
    """(failed, errors) of the subset run against `library`; pytest's output goes to `log`."""
    report = log.with_suffix(".xml")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--maxfail={stop_after}",
               f"--junitxml={report}", *TESTS]
    env = dict(os.environ, ICE_ONNX_KERNEL_LIBRARY=str(library))
    with log.open("w") as out:
        subprocess.run(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, check=False)
    if not report.is_file():
        return 0, 1
    root = ElementTree.parse(report).getroot()
    cases = list(root.iter("testcase"))
    failed = sum(1 for case in cases if case.find("failure") is not None)
    errors = sum(1 for case in cases if case.find("error") is not None)
    return failed, errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--min-failures", type=int, default=25)
    parser.add_argument("mutants", nargs="+", metavar="NAME=LIBRARY")
    args = parser.parse_args(argv)
    caught = True
    for spec in args.mutants:
        name, _, library = spec.partition("=")
        library = Path(library).resolve()
        if not name or not library.is_file():
            print(f"mutation check: {spec!r} is not NAME=LIBRARY with an existing library", file=sys.stderr)
            return 2
        log = library.parent / f"mutation-{name}.log"
        failed, errors = failed_tests(library, args.min_failures, log)
        verdict = "caught" if failed >= args.min_failures else "NOT CAUGHT"
        print(f"mutant {name}: {failed} tests failed, {errors} errors (at least {args.min_failures} failures "
              f"needed): {verdict} (log: {log.relative_to(REPO) if log.is_relative_to(REPO) else log})")
        caught &= failed >= args.min_failures
    return 0 if caught else 1


if __name__ == "__main__":
    sys.exit(main())
