"""Signed claims: keys and signatures (the one crypto module), JWS, the trace format, step
keys. Pure.
"""
