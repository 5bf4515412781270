"""Mutation testing driver: runs mutmut on each module of the scope against its fast tests only.

The scope is ``[tool.fcn-deploy.mutation.modules]`` in pyproject.toml: module file -> pytest
arguments selecting the fast tests that exercise it (test files, ``--deselect`` of a slow test;
never the slow end-to-end tests). For each module this script builds
a work folder ``mutants/<module>/`` holding a copy of ``fcn_deploy/`` and ``tests/`` and a
pyproject.toml whose ``[tool.mutmut]`` mutates that one module and selects those test files,
runs ``mutmut run`` there (one worker by default: CI-sized 2-core machines), and prints the
score. Survivors listed in ``mutation/equivalent.toml`` (with the reason they cannot change
behaviour) count as equivalent, not as survivors.

Usage: ``python mutation/run.py [MODULE ...] [--jobs N] [--survivors]`` (module as ``tiling``,
``parity.metrics`` or ``fcn_deploy/tiling.py``; default: the whole scope). See docs/testing.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "mutants"
#: pytest options for every mutant run: quiet, stop at the first failure, no cache in the repo,
#: a fixed hypothesis seed so that a property test kills the same mutants on every run, the
#: "mutation" hypothesis profile of tests/conftest.py (25 examples, no shrinking; CI runs 200),
#: and without pytest's unraisable-exception and thread-exception plugins: at the end of every
#: session they run gc.collect() several times, which in a process holding torch (~200k objects,
#: copied on write after the fork) took 0.2 of the 0.3 s that each mutant's pytest run costs.
PYTEST_ARGS = ["-x", "-q", "-p", "no:cacheprovider", "--hypothesis-seed=0", "--hypothesis-profile=mutation",
               "-p", "no:unraisableexception", "-p", "no:threadexception"]


def load_scope() -> dict[str, list[str]]:
    """The module -> test files mapping from pyproject.toml."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return dict(data["tool"]["fcn-deploy"]["mutation"]["modules"])


def load_equivalent() -> dict[str, str]:
    """Mutant name -> why it cannot change behaviour (``mutation/equivalent.toml``)."""
    path = ROOT / "mutation" / "equivalent.toml"
    if not path.exists():
        return {}
    return {k: v for k, v in tomllib.loads(path.read_text()).get("equivalent", {}).items()}


def short_name(module: str) -> str:
    """``fcn_deploy/parity/metrics.py`` -> ``parity.metrics``: the work folder and CLI name."""
    return Path(module).with_suffix("").as_posix().removeprefix("fcn_deploy/").replace("/", ".")


def _toml_list(items: list[str]) -> str:
    return "[" + ", ".join(json.dumps(i) for i in items) + "]"


def prepare(module: str, tests: list[str]) -> Path:
    """A fresh work folder for ``module``: copies of the package and tests plus a mutmut config."""
    work = WORK / short_name(module)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "fcn_deploy", work / "fcn_deploy", ignore=ignore)
    shutil.copytree(ROOT / "tests", work / "tests", ignore=ignore)
    pytest_cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    (work / "pyproject.toml").write_text(
        "[tool.mutmut]\n"
        f'source_paths = ["fcn_deploy"]\n'
        f"only_mutate = {_toml_list([module])}\n"
        f"pytest_add_cli_args = {_toml_list(PYTEST_ARGS)}\n"
        f"pytest_add_cli_args_test_selection = {_toml_list(tests)}\n"
        'process_isolation = "forkserver"\n'  # the tests import torch, which is not fork-safe
        "timeout_multiplier = 2.0\n"  # CPU-time limit (est + 1 s) * 4: an endless loop costs seconds, not minutes
        "use_git_change_detection = false\n"
        "\n[tool.pytest.ini_options]\n"
        f"addopts = {json.dumps(pytest_cfg.get('addopts', ''))}\n"
        f"markers = {_toml_list(pytest_cfg.get('markers', []))}\n"
        f"filterwarnings = {_toml_list(pytest_cfg.get('filterwarnings', []))}\n"
    )
    return work


def mutant_results(work: Path) -> dict[str, str]:
    """Mutant name -> status (killed, survived, no tests, timeout, ...) of the last run."""
    out = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=work,
                         capture_output=True, text=True, check=True).stdout
    results = {}
    for line in out.splitlines():
        name, sep, status = line.strip().rpartition(": ")
        if sep and "__mutmut_" in name:
            results[name] = status
    return results


def refresh_tests(module: str) -> tuple[Path, list[str]]:
    """For ``--survivors``: the existing work folder of ``module`` with today's tests copied in, and
    the names of its mutants that were not killed in the last run (the mutated package is kept:
    valid only when the module itself did not change since)."""
    work = WORK / short_name(module)
    if not (work / "mutants").is_dir():
        sys.exit(f"error: no earlier run in {work}; run without --survivors first")
    if (work / "fcn_deploy" / Path(module).relative_to("fcn_deploy")).read_bytes() != (ROOT / module).read_bytes():
        sys.exit(f"error: {module} changed since the run in {work}; run it afresh (without --survivors)")
    shutil.rmtree(work / "tests")
    shutil.copytree(ROOT / "tests", work / "tests", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    names = [n for n, s in mutant_results(work).items() if s not in ("killed", "timeout", "segfault", "not checked")]
    return work, names


def run_module(module: str, tests: list[str], jobs: int, equivalent: dict[str, str],
               only: list[str], survivors: bool = False) -> dict:
    files = [module] + [t.split("::")[0] for t in tests if not t.startswith("-")]
    missing = [p for p in files if not (ROOT / p).is_file()]
    if missing:
        sys.exit(f"error: {', '.join(missing)} named in [tool.fcn-deploy.mutation.modules] not found")
    if survivors:
        work, only = refresh_tests(module)
        if not only:
            print(f"{module}: no survivors to re-run")
    else:
        work = prepare(module, tests)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children", str(jobs), *only], cwd=work) \
        if not survivors or only else subprocess.CompletedProcess([], 0)
    seconds = time.monotonic() - start
    if proc.returncode:
        sys.exit(f"error: mutmut failed on {module} (exit {proc.returncode}); see the output above")
    results = mutant_results(work)
    unchecked = sorted(n for n, s in results.items() if s == "not checked")  # outside --only
    results = {n: s for n, s in results.items() if s != "not checked"}
    survivors = sorted(n for n, s in results.items() if s not in ("killed", "timeout", "segfault"))
    equiv = [n for n in survivors if n in equivalent]
    live = [n for n in survivors if n not in equivalent]
    killed = len(results) - len(survivors)
    scored = len(results) - len(equiv)
    return {
        "module": module, "tests": tests, "mutants": len(results), "killed": killed,
        "equivalent": len(equiv), "survived": live, "not_checked": len(unchecked),
        "score": round(100 * killed / scored, 1) if scored else 100.0, "seconds": round(seconds),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", help="modules to mutate (default: the whole scope)")
    parser.add_argument("--jobs", type=int, default=1, help="parallel mutant workers (default 1)")
    parser.add_argument("--only", action="append", default=[], metavar="GLOB",
                        help="mutmut mutant-name glob, e.g. 'fcn_deploy.voc.x_read_label*' (repeatable)")
    parser.add_argument("--survivors", action="store_true",
                        help="re-run only the last run's surviving mutants against today's tests "
                             "(after adding tests; the module itself must be unchanged)")
    args = parser.parse_args()
    scope, equivalent = load_scope(), load_equivalent()
    chosen = args.modules or list(scope)
    summary = []
    for name in chosen:
        module = next((m for m in scope if name in (m, short_name(m))), None)
        if module is None:
            sys.exit(f"error: {name} is not in [tool.fcn-deploy.mutation.modules] ({', '.join(scope)})")
        summary.append(run_module(module, scope[module], args.jobs, equivalent, args.only, args.survivors))
    print("\nmodule                         mutants  killed  equivalent  survived  score   time")
    for s in summary:
        print(f"{s['module']:30} {s['mutants']:7} {s['killed']:7} {s['equivalent']:11} "
              f"{len(s['survived']):9} {s['score']:5}%  {s['seconds']:4}s")
        if s["not_checked"]:
            print(f"    {s['not_checked']} mutants not checked (outside --only)")
        for name in s["survived"]:
            print(f"    survived: {name}   (mutmut show {name}, in mutants/{short_name(s['module'])})")
    path = WORK / "summary.json"  # one entry per module, the latest run of each
    previous = json.loads(path.read_text()) if path.exists() else {}
    previous = previous if isinstance(previous, dict) else {}
    previous.update({s["module"]: s for s in summary})
    path.write_text(json.dumps(previous, indent=2) + "\n")


if __name__ == "__main__":
    main()
