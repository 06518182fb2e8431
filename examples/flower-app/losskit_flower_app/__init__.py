"""losskit on Flower: the app components (see losskit.integrations.flower.apps)."""
