"""The faults a cluster user meets, and what each cost: a table from the fault tests' own measurements.

Each fault test (tests/test_tracking_outage.py, test_s3_stall.py, test_disk_full.py, test_sweep_faults.py and the
lost-node test of test_fault_tolerance.py) records the fault, what happened, steps and rows lost and the time to
recover as JUnit properties. This script runs them (or reads the JUnit report of a suite run) and prints the
table; --out writes it as Markdown too.

    MUJOCO_GL=egl .venv/bin/python bench/faults.py                     # runs the fault tests (~18 min, 2 cores)
    MUJOCO_GL=egl .venv/bin/python bench/faults.py --junit report.xml  # from `pytest --junitxml=report.xml`
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FAULT_TESTS = ["tests/test_tracking_outage.py", "tests/test_s3_stall.py", "tests/test_disk_full.py",
               "tests/test_sweep_faults.py",
               "tests/test_fault_tolerance.py::test_a_lost_node_resumes_on_a_new_one_with_no_step_lost_or_repeated"]
COLUMNS = ("fault", "outcome", "steps_lost", "rows_lost", "recover_s")


def rows(junit: Path) -> list[dict[str, str]]:
    """One row per test case that recorded a fault, with its result (passed/failed/skipped) and wall time."""
    out = []
    for case in ET.parse(junit).iter("testcase"):
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        if "fault" not in props:
            continue
        result = next((tag for tag in ("failure", "error", "skipped") if case.find(tag) is not None), "passed")
        out.append({**props, "test": f"{case.get('classname')}::{case.get('name')}", "result": result,
                    "test_s": f"{float(case.get('time', 0)):.0f}"})
    return out


def table(found: list[dict[str, str]]) -> str:
    lines = ["| fault | what happened | steps lost | rows lost | time to recover (s) | test (s) |",
             "|---|---|---|---|---|---|"]
    for r in found:
        outcome = r.get("outcome", "") if r["result"] == "passed" else f"TEST {r['result'].upper()}"
        lines.append(f"| {r['fault']} | {outcome} | {r.get('steps_lost', '')} | {r.get('rows_lost', '')} | "
                     f"{r.get('recover_s', '')} | {r['test_s']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--junit", type=Path, help="a JUnit XML report of a pytest run that included the fault tests")
    parser.add_argument("--out", type=Path, help="also write the table here (Markdown)")
    args = parser.parse_args(argv)
    junit = args.junit
    if junit is None:
        junit = Path(tempfile.mkdtemp()) / "faults.xml"
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
                        *FAULT_TESTS], cwd=REPO, check=False)
    found = rows(junit)
    if not found:
        print(f"{junit} holds no fault test results", file=sys.stderr)
        return 1
    text = table(found)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0 if all(r["result"] == "passed" for r in found) else 1


if __name__ == "__main__":
    sys.exit(main())
