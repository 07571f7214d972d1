"""Call signaling: the messages two agents exchange to set up a call, and their carriers."""
