"""Model-backed scorers, loaded once per actor (open_clip, fasttext language id)."""
