"""The one-command prunability audit: run the whole attack on a model and report how cheap it is.

:func:`run_audit` takes an :class:`AuditConfig` and returns an :class:`AuditReport`
(also written as ``report.json`` + ``report.html`` + ``figures/``). Stage results are
cached under ``<out>/.cache`` so an interrupted or repeated audit resumes.
"""

from moeguard.audit.config import AuditConfig
from moeguard.audit.report import AuditReport, load_report
from moeguard.audit.results import DefenseComparison, ModelAudit, RealignRun, TaskAudit
from moeguard.audit.run import run_audit

__all__ = ["AuditConfig", "AuditReport", "DefenseComparison", "ModelAudit", "RealignRun", "TaskAudit", "load_report", "run_audit"]
