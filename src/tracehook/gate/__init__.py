"""The pre-substitution gate: HTTP front, service orchestration, pure decisions, the derivation
index, verdicts.
"""
