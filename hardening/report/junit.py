"""``junit.xml``: one test case per policy check, so any CI shows which threshold failed."""

from __future__ import annotations

from xml.etree import ElementTree as ET


def render_junit(report: dict) -> str:
    checks = report["checks"]
    suites = ET.Element("testsuites", name="edgeward security review")
    by_area: dict[str, list[dict]] = {}
    for c in checks:
        by_area.setdefault(c["area"], []).append(c)
    total_t = float(report.get("timings", {}).get("total_s", 0.0))
    for area, cs in by_area.items():
        suite = ET.SubElement(
            suites, "testsuite", name=f"edgeward.{area}", tests=str(len(cs)),
            failures=str(sum(c["status"] == "fail" for c in cs)), errors="0",
            skipped=str(sum(c["status"] == "skip" for c in cs)),
            time=f"{float(report['timings'].get(area + '_s', 0.0)):.3f}",
        )
        for c in cs:
            case = ET.SubElement(suite, "testcase", classname=f"edgeward.{area}.{c['variant'] or 'all'}", name=c["id"], time="0")
            if c["status"] == "fail":
                f = ET.SubElement(case, "failure", message=c["message"], type="PolicyCheckFailed")
                f.text = f"value {c['value']} {c['op']} threshold {c['threshold']} does not hold"
            elif c["status"] == "skip":
                ET.SubElement(case, "skipped", message=c["message"])
    suites.set("tests", str(len(checks)))
    suites.set("failures", str(sum(c["status"] == "fail" for c in checks)))
    suites.set("time", f"{total_t:.3f}")
    ET.indent(suites)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"
