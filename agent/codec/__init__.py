"""Opus encoder and decoder."""
