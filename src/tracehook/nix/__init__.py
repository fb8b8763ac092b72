"""The Nix data model, as Nix writes it: ATerm, store paths, hashes, resolution, NAR, narinfo,
realisations. Pure: no I/O.
"""
