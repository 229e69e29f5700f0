"""Metrics and checks of a trained model (DESIGN §6)."""
