"""RTP/RTCP, RED, jitter buffer, SRTP and the media session."""
