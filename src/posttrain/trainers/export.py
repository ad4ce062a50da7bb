"""Merging LoRA adapters into standalone models and 4-bit export (seed 003's end; pushing: ``hub``)."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

from posttrain.errors import PosttrainError
from posttrain.rundir import atomic_folder, check_new_folder
from posttrain.utils import read_json_object


def adapter_base(adapter: Path) -> str:
    """The base model an adapter was trained on: as the user named it to posttrain (a model name or a
    .gguf file stays one), else as PEFT recorded it."""
    cfg = adapter / "adapter_config.json"
    if not cfg.is_file():
        raise PosttrainError(f"{adapter} is not a PEFT adapter folder (no adapter_config.json)")
    ours = (read_json_object(adapter / "posttrain.json") or {})
    if ours.get("base_model"):
        return ours["base_model"]
    base = (read_json_object(cfg) or {}).get("base_model_name_or_path")
    if not base:
        raise PosttrainError(f"{cfg} does not name its base model; pass --base")
    return base


def merge_adapter(adapter: str, output: str, base: str | None = None, dtype: str = "auto",
                  quantize_4bit: bool = False, replace: bool = False) -> Path:
    """Load base + adapter, merge the LoRA weights in, save a plain HF folder (safetensors + tokenizer).

    The merge runs in full precision of the base (never on a 4-bit base, whose rounding would make the
    merge inexact); ``quantize_4bit`` re-quantises the merged weights as a separate export. Outputs are
    new folders; ``replace``: or earlier merges' own folders (see ``rundir.check_new_folder``).
    """
    from peft import PeftModel
    from safetensors import SafetensorError

    from posttrain.engine.models import load_model, load_tokenizer

    adapter_dir = Path(adapter)
    out = Path(output)
    targets = [out] + ([out.with_name(out.name + "-4bit")] if quantize_4bit else [])
    for target in targets:  # every output checked before any work: nothing of the user's is replaced
        where = target.resolve()
        if where == adapter_dir.resolve() or where in adapter_dir.resolve().parents:
            raise PosttrainError(f"--output {target} is the adapter folder or one that holds it; choose a new folder")
        check_new_folder(target, "merge", replace=replace)
    base = base or adapter_base(adapter_dir)
    model = load_model(base, dtype, "cpu" if not quantize_4bit else "auto")
    try:
        merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    except (OSError, ValueError, RuntimeError, KeyError, EOFError, pickle.UnpicklingError, SafetensorError) as e:  # damaged adapter files too
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        if isinstance(e, pickle.UnpicklingError) or "Weights only load failed" in why:  # torch's advice would be to unpickle it anyway
            why = "a weights file there is not a readable checkpoint (a damaged or foreign pickle)"
        raise PosttrainError(f"could not apply adapter {adapter_dir} to {base}: {why}; check the adapter's files") from None
    tok_source = str(adapter_dir) if (adapter_dir / "tokenizer_config.json").exists() else base
    tokenizer = load_tokenizer(tok_source)
    with atomic_folder(out, "merge", replace=replace) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for extra in ("chat_template.jinja", "posttrain.json"):
            if (adapter_dir / extra).exists() and not (tmp / extra).exists():
                shutil.copy(adapter_dir / extra, tmp / extra)
    if quantize_4bit:
        export_4bit(out, out.with_name(out.name + "-4bit"), replace=replace)
    return out


def export_4bit(model_dir: Path, output: Path, replace: bool = False) -> Path:
    """Save a 4-bit NF4 (double-quantised) copy of a model folder, as seed 003 does."""
    from posttrain.engine.models import load_model, load_tokenizer
    from posttrain.trainers.setup import bnb_4bit_config

    quant = load_model(str(model_dir), "bf16", "auto", quantization_config=bnb_4bit_config())
    with atomic_folder(output, "merge", replace=replace) as tmp:
        quant.save_pretrained(tmp)
        load_tokenizer(str(model_dir)).save_pretrained(tmp)
    return output
