"""Emotion concepts, the story corpus, vector extraction, storage and validation."""
