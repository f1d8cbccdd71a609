"""Getting the raw inputs: pinned package-index files, safe extraction, hub and local sources, the fetch stage."""
