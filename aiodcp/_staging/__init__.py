"""Contract 2: staging memory (layouts, skeletons, shared-memory arenas)."""
