"""lfm2audio: LFM2-Audio inference and real-time serving."""
