"""Verification: the trust policy, the verified set (the one place that mints trust), the
decisions, the resolver that walks and fetches, reports.
"""
