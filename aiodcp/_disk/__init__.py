"""Contract 3: a root's layout on disk (commit, manifest, retention, safe reading)."""
