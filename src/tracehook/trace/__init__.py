"""Signed claims: keys and signatures (the one crypto module), JWS, the trace format, step
keys; hardware evidence (AMD SEV-SNP reports, their certificates and the claim binding).
Pure, but for reading AMD's pinned roots from the package's own files.
"""
