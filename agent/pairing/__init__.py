"""Joining a fleet: the pairing token and the board's side of pairing."""
