"""Optional adapters to other training libraries (each imports its library lazily)."""
