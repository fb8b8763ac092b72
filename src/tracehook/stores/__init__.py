"""Everything that reads or writes outside the process: the Nix store and its database, trace
stores, binary caches, the HTTP client, the spool, event logs, subprocesses.
"""
