"""mt: autoregressive sequence models (neural machine translation first), small, fast and complete.

    import mt
    t = mt.load("runs/multi30k-en-de")
    t.translate(["A dog runs."], beam_size=5)
"""
from mt.config import Config
from mt.errors import MTError

__version__ = "0.1.0"


def load(run: str, *, device: str | None = None, weights: str = "model", quantize: str | None = None,
         compile: bool = False):
    """Load a trained run directory as a Translator (see mt.translate.Translator.load)."""
    from mt.translate import Translator

    return Translator.load(run, device=device, weights=weights, quantize=quantize, compile=compile)


__all__ = ["Config", "MTError", "load", "__version__"]
