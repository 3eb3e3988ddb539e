"""Evaluation texts: WikiText-2 ships inside the package (any4ao/data/wikitext-2, CC BY-SA 3.0,
see the README there), so `any4ao eval` works on a fresh install with no dataset download."""

import gzip
from importlib import resources
from pathlib import Path

BUILTIN = {
    "wikitext-2-test": "wikitext-2/test.txt.gz",
    "wikitext-2-valid": "wikitext-2/valid.txt.gz",
}


def load_text(name_or_path: str) -> str:
    """A built-in text by name (see BUILTIN), or the contents of a UTF-8 text file (.gz allowed)."""
    if name_or_path in BUILTIN:
        data = resources.files("any4ao.data").joinpath(BUILTIN[name_or_path]).read_bytes()
        return gzip.decompress(data).decode("utf-8")
    path = Path(name_or_path)
    if not path.is_file():
        raise FileNotFoundError(f"{name_or_path!r} is neither a built-in text ({', '.join(BUILTIN)}) nor a file")
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text: {e}") from None
    if not text.strip():
        raise ValueError(f"{path} is empty")
    return text
