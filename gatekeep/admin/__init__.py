"""
The admin API: approvals for approvers, sessions and records for auditors,
health and Prometheus metrics, JSON over HTTP on its own endpoint
(``admin.listen``). See docs/approvals.md.
"""

from gatekeep.admin._api import AdminAPI, ApiError, StoreReader, make_site

__all__ = ["AdminAPI", "ApiError", "StoreReader", "make_site"]
