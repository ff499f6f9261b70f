"""Security review report: policy, checks, report.json/html/junit, the CI gate, full audit."""

from hardening.report.checks import Check, evaluate_policy
from hardening.report.gate import Change, GateResult, compare_reports
from hardening.report.orchestrate import AuditOutputs, rejudge, report_digest, run_full_audit, write_outputs
from hardening.report.policy import Policy, PolicyError, load_policy
from hardening.report.schema import SCHEMA_VERSION, ReportError, load_report, validate_report

__all__ = [
    "AuditOutputs", "Change", "Check", "GateResult", "Policy", "PolicyError", "ReportError", "SCHEMA_VERSION",
    "compare_reports", "evaluate_policy", "load_policy", "load_report", "rejudge", "report_digest", "run_full_audit",
    "validate_report", "write_outputs",
]
