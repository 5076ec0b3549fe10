"""mm1data: pre-training data for MM1-style multimodal LLMs."""

__version__ = "0.1.0"
