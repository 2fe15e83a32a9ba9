"""mt: sequence models (neural machine translation first), small, fast and complete.

    import mt
    t = mt.load("runs/multi30k-en-de")
    t.translate(["A dog runs."], beam_size=5)
    t.translate_batch(["A dog runs."], beam_size=5, num_hypotheses=3)   # texts, log-probs, scores
"""
from mt.config import Config
from mt.errors import MTError

__version__ = "0.1.0"


def load(run, *, device: str | None = None, weights: str = "model", quantize: str | None = None,
         aot: bool = False, fast: bool = True):
    """Load a trained run directory (or a list: an ensemble) as a Translator, with the CPU speed paths
    of mt.fast on unless fast=False (see mt.translate.Translator.load)."""
    from mt.translate import Translator

    return Translator.load(run, device=device, weights=weights, quantize=quantize, aot=aot, fast=fast)


__all__ = ["Config", "MTError", "load", "__version__"]
