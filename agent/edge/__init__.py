"""Edge audio analysis: detectors that run on the capture stream and report alerts, never audio."""
