"""Datagram transports for media (UDP now, ICE later)."""
