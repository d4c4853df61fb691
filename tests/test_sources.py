"""Model sources: one rule for local paths vs hub ids, absolute paths recorded, GGUF files checked before loading."""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import pytest
import torch

from llm_modules import LLMModulesForCausalLM
from llm_modules.sources import ModelSourceError, check_gguf_file, resolve_model_source


def write_gguf(path, architecture: str = "llama") -> None:
    """A small well-formed GGUF file (one tensor), written with the gguf package."""
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.ones((64, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_hub_ids_pass_and_local_paths_become_absolute(tiny_pair, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert resolve_model_source("Qwen/Qwen2-1.5B") == "Qwen/Qwen2-1.5B"
    monkeypatch.chdir(tiny_pair[0].parent)
    assert resolve_model_source(tiny_pair[0].name) == str(tiny_pair[0].resolve())


def test_a_mistyped_folder_name_is_named_before_any_hub_call(tmp_path, monkeypatch):
    """A name without `/` that is no folder here: the closest folders, not five retries against the hub."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny-run").mkdir()
    with pytest.raises(ModelSourceError, match=r"--model tiny-rnu: no such folder here \(did you mean tiny-run\?\)"):
        resolve_model_source("tiny-rnu", "--model")
    with pytest.raises(ModelSourceError, match="no such folder here; a hub model is named owner/name"):
        resolve_model_source("gpt2", "--small")


def test_with_the_hub_offline_an_uncached_hub_id_fails_at_once(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelSourceError, match="not in the local Hugging Face cache, and the hub is offline"):
        resolve_model_source("nobody/no-such-model", "--large")


def test_a_catalogue_name_is_its_fetched_dir(tmp_path, monkeypatch):
    from llm_modules import fetch

    monkeypatch.setenv(fetch.HOME_VARIABLE, str(tmp_path))
    with pytest.raises(ModelSourceError, match="not fetched yet: run `llm-modules fetch smollm2-135m-instruct`"):
        resolve_model_source("smollm2-135m-instruct", "--small")
    model_dir = tmp_path / "models" / "smollm2-135m-instruct"
    monkeypatch.setattr(fetch, "fetched_model", lambda name: fetch.FetchedModel(
        name, model_dir, model_dir / "x.gguf", model_dir / "hf", fetched=False))
    assert resolve_model_source("smollm2-135m-instruct", "--small") == str(model_dir / "hf")


@pytest.mark.parametrize("name", ["./missing", "models/missing/dir", "/abs/missing", "weights.gguf", "~/nope"])
def test_a_missing_path_fails_at_once(name):
    with pytest.raises(ModelSourceError, match="no such file or directory"):
        resolve_model_source(name, "--large")


def test_a_dir_without_config_or_a_plain_file_is_not_a_model(tmp_path):
    with pytest.raises(ModelSourceError, match="not a model directory"):
        resolve_model_source(tmp_path, "--large")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelSourceError, match="not a model"):
        resolve_model_source(tmp_path / "notes.txt", "--large")


def test_gguf_files_are_checked_before_loading(tmp_path):
    good = tmp_path / "good.gguf"
    write_gguf(good)
    assert check_gguf_file(good) == "llama"
    (tmp_path / "text.gguf").write_text("not a gguf file at all")
    with pytest.raises(ModelSourceError, match="not a GGUF file"):
        check_gguf_file(tmp_path / "text.gguf")
    (tmp_path / "short.gguf").write_bytes(good.read_bytes()[: good.stat().st_size - 100])
    with pytest.raises(ModelSourceError, match=r"truncated GGUF file \([\d,]+ bytes; its tensor table needs [\d,]+\)"):
        check_gguf_file(tmp_path / "short.gguf")
    (tmp_path / "header.gguf").write_bytes(good.read_bytes()[:40])
    with pytest.raises(ModelSourceError, match="truncated or corrupt GGUF file"):
        check_gguf_file(tmp_path / "header.gguf")
    write_gguf(tmp_path / "odd.gguf", architecture="rwkv9")
    with pytest.raises(ModelSourceError, match="architecture 'rwkv9' cannot be read from GGUF"):
        check_gguf_file(tmp_path / "odd.gguf")


def test_gguf_comes_with_the_package(tmp_path, monkeypatch):
    """`pip install llm-modules && llm-modules fetch NAME` works: gguf is a dependency, not an extra; a broken
    install that lacks it is told which package to install."""
    from importlib.metadata import requires

    assert any(r.startswith("gguf") and "extra" not in r for r in requires("llm-modules"))
    write_gguf(tmp_path / "good.gguf")
    monkeypatch.setitem(sys.modules, "gguf", None)  # what `import gguf` sees when it is not installed
    with pytest.raises(ImportError, match=r"needs the gguf package: pip install 'gguf"):
        check_gguf_file(tmp_path / "good.gguf")


def test_relative_paths_are_recorded_absolute_and_reload_from_elsewhere(tiny_pair, tmp_path, monkeypatch):
    monkeypatch.chdir(tiny_pair[0].parent)
    torch.manual_seed(0)
    model = LLMModulesForCausalLM.from_large_and_small(
        tiny_pair[0].name, tiny_pair[1].name, cross_attention_heads=4
    ).eval()
    assert model.config.large_model_name_or_path == str(tiny_pair[0].resolve())
    assert model.config.small_model_name_or_path == str(tiny_pair[1].resolve())
    model.save_pretrained(tmp_path / "combined")
    monkeypatch.chdir(tmp_path)
    ids = torch.tensor([[5, 6, 7]])
    reloaded = LLMModulesForCausalLM.from_pretrained("combined")
    assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_a_recorded_path_that_is_gone_names_the_key_and_the_flag_without_the_hub(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "combined")
    config = json.loads((tmp_path / "combined" / "config.json").read_text())
    config["large_model_name_or_path"] = str(tmp_path / "moved" / "large")
    (tmp_path / "combined" / "config.json").write_text(json.dumps(config))
    start = time.perf_counter()
    with pytest.raises(ModelSourceError) as error:
        LLMModulesForCausalLM.from_pretrained(tmp_path / "combined")
    assert time.perf_counter() - start < 5  # no hub retries
    message = str(error.value)
    assert "large_model_name_or_path" in message and "--large-model" in message and "no such file" in message
