"""Summarises pip-audit's JSON report of the pinned set: what is vulnerable, and what could not be audited.

    python -m fracture.audit_report audit/pip-audit.json

pip-audit reports "No known vulnerabilities found" even when it could look up none of the
packages (no access to PyPI's advisory data); this summary counts those apart, so a report
that audited nothing is never read as a clean one.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def summarise(report: dict) -> list[str]:
    """One line per vulnerable package, then the counts of audited and not audited packages."""
    deps = report.get("dependencies", [])
    lines = []
    for dep in deps:
        for vuln in dep.get("vulns", []):
            fixes = ", ".join(vuln.get("fix_versions") or []) or "no fixed version yet"
            lines.append(f"VULNERABLE {dep['name']}=={dep['version']}: {vuln['id']} (fixed in {fixes})")
    skipped = [d for d in deps if d.get("skip_reason")]
    audited = len(deps) - len(skipped)
    lines.append(f"{audited} of {len(deps)} pinned packages audited; "
                 f"{sum(bool(d.get('vulns')) for d in deps)} with known vulnerabilities")
    if skipped:
        lines.append(f"NOT AUDITED: {len(skipped)} packages, e.g. {skipped[0]['name']}: {skipped[0]['skip_reason']}")
    return lines


def main(argv: list[str] | None = None) -> None:
    path = Path((argv or sys.argv[1:])[0])
    if not path.is_file():
        # pip-audit stops without a report when it cannot reach PyPI at all (a proxy, no network).
        sys.exit(f"NOT AUDITED: pip-audit wrote no report to {path} (its error is above); no package was audited")
    print("\n".join(summarise(json.loads(path.read_text()))))


if __name__ == "__main__":
    main()
