"""From reports to issues: fingerprints, fingerprint rules, releases and retry detection.

Everything here is pure (no storage, no I/O but reading a rules file at startup) so that it can
run on the ingest hot path and be tested alone.
"""
