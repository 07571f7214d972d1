"""Audio I/O: ALSA devices through PyAudio, file and tone sources, resampling."""
