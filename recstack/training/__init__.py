"""Training support shared by the stages: the one resumable loop (`loop`)."""
