"""What several tests share: fixtures' building blocks, float64 references, run and rank helpers.

Importable as `helpers.<module>` (pyproject's pytest `pythonpath` puts tests/ on sys.path, and spawned rank
processes inherit it). Tests import from here, never from each other.
"""
