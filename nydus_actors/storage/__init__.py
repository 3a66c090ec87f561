"""Where blob data lives: storage backends and the local blob cache (no actors, no FUSE)."""
