#!/usr/bin/env python
"""Run the test suite and keep its artefacts in reports/tests/<timestamp>/:

    stdout.log    everything pytest printed
    junit.xml     per-test results (pytest's own --junitxml)
    pytest_report.json  the same as JSON (pytest-json-report, in the dev extra), when the plugin is installed
    summary.json  counts (passed, failed, errors, skipped), seconds, exit code, the command
    system.json   versions, device, CPU, git commit (as `psannlm bench suite` writes it)

    python scripts/run_tests.py                  # the default suite (make test)
    python scripts/run_tests.py --gpu            # only the tests marked gpu (on a CUDA machine)
    python scripts/run_tests.py -- -k chat -x    # anything after -- goes to pytest

The exit code is pytest's.
"""

import argparse
import json
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def junit_counts(path: Path) -> dict:
    """Totals over the <testsuite> elements of a JUnit file."""
    suites = ET.parse(path).getroot()
    suites = [suites] if suites.tag == "testsuite" else list(suites.iter("testsuite"))
    total = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    return {"tests": total["tests"], "passed": total["tests"] - total["failures"] - total["errors"] - total["skipped"],
            "failed": total["failures"], "errors": total["errors"], "skipped": total["skipped"]}


def _has_json_report() -> bool:
    import importlib.util

    return importlib.util.find_spec("pytest_jsonreport") is not None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="artefact directory (default reports/tests/<timestamp>)")
    parser.add_argument("--gpu", action="store_true", help="run the tests marked gpu instead of the default suite")
    args, pytest_args = parser.parse_known_args(argv)
    if pytest_args[:1] == ["--"]:
        pytest_args = pytest_args[1:]
    out = Path(args.out).resolve() if args.out else ROOT / "reports" / "tests" / datetime.now().strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    json_report = [f"--json-report-file={out / 'pytest_report.json'}", "--json-report"] if _has_json_report() else []
    command = [sys.executable, "-m", "pytest", f"--junitxml={out / 'junit.xml'}", *json_report,
               *(["-m", "gpu"] if args.gpu else []), *pytest_args]
    start = time.perf_counter()
    with open(out / "stdout.log", "w", encoding="utf-8") as log:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:  # shown as it runs and kept
            sys.stdout.write(line)
            log.write(line)
        code = proc.wait()
    seconds = time.perf_counter() - start
    import torch

    from psann.lm.files import write_atomic
    from psann.lm.report.system import system_info

    counts = junit_counts(out / "junit.xml") if (out / "junit.xml").exists() else None
    summary = {"exit_code": code, "seconds": round(seconds, 1), "command": command[1:], "counts": counts}
    write_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    write_atomic(out / "system.json", json.dumps(system_info(device), indent=2) + "\n")
    print(f"test artefacts: {out} (exit {code}, {counts})")
    return code


if __name__ == "__main__":
    sys.exit(main())
