"""``synrep audit``: judge a generated shard folder (agreement, balance, memorization, diversity) before training on it."""

from .stage import AuditConfig, AuditError, run_audit

__all__ = ["AuditConfig", "AuditError", "run_audit"]
