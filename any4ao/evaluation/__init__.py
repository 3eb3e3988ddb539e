"""Perplexity evaluation of quantized causal LMs (`any4ao eval`)."""

from any4ao.evaluation.perplexity import PerplexityResult, default_bos, perplexity, token_windows
from any4ao.evaluation.stats import PairedBootstrap
from any4ao.evaluation.texts import load_text

__all__ = ["PerplexityResult", "PairedBootstrap", "default_bos", "perplexity", "token_windows", "load_text"]
