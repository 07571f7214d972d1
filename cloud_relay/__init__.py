"""edge-intercom cloud relay."""
