"""The frozen model's last hidden states of every training example, computed once and memory-mapped.

The large model never changes during training, so its hidden states for an example are the same in every epoch.
`build_feature_cache` runs it once over a tokenized dataset and writes the states in half precision to one flat
file (`features.bin`, `[total tokens, D_L]`) with per-example offsets; `FeatureCacheDataset` serves them as the
model's `large_hidden_states` input, so training skips the large model. With several sources, a row holds their
states side by side (`[total tokens, D_1 + ... + D_N]`, in source order), which the model splits back per source.
Depth connections read inner layers, which the cache does not hold: it refuses those models.

float16 holds values up to 65,504 only. Writing checks every example's largest value against the storage dtype; a
source whose states go beyond it (e.g. ~8.8e4) would store inf and train on NaN, so that cache is written again in
bfloat16 instead, with one warning line, and its manifest says so (`dtype` as stored, `requested_dtype` as asked).

A manifest records what the states depend on: the large model (id or path, revision, a fingerprint of its weights,
dtype), the tokenizer, the max length and a fingerprint of the token ids. Opening a cache checks it; a mismatch
rebuilds it (or, with `on_mismatch="error"`, refuses) and never silently reuses stale states. The manifest is written
last, so a directory without one is an interrupted build and is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .modeling import LLMModulesForCausalLM

MANIFEST_NAME = "manifest.json"
FEATURES_NAME = "features.bin"
OFFSETS_NAME = "offsets.npy"
FORMAT_VERSION = 1
# numpy has no bfloat16: those are stored as their raw 16 bits and viewed back as bfloat16 on reading.
STORAGE = {"float16": (np.float16, torch.float16), "bfloat16": (np.uint16, torch.bfloat16), "float32": (np.float32, torch.float32)}
# Where states beyond float16's range go: bfloat16 has float32's range at float16's size, and is what transformers
# and accelerate point to for models whose activations overflow float16 (their bf16 mixed precision).
OUT_OF_RANGE_FALLBACK = "bfloat16"

logger = logging.getLogger(__name__)


class FeatureCacheMismatch(ValueError):
    """A cache directory holds states computed for another model, tokenizer or dataset."""


class FeatureRangeError(ValueError):
    """An example's hidden states go beyond what any storage dtype of the cache holds (inf, or beyond float32)."""


class StatesOutOfRange(Exception):
    """While writing: example `index`'s states reach `peak`, beyond what the storage dtype holds."""

    def __init__(self, index: int, peak: float):
        super().__init__(index, peak)
        self.index, self.peak = index, peak


def _sha256(chunks) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def dataset_fingerprint(dataset) -> str:
    """Hash of every example's token ids, in order: the states depend on nothing else of the data."""
    return _sha256(np.asarray(ids, dtype=np.int64).tobytes() + b"|" for ids in dataset["input_ids"])


def weights_fingerprint(module: torch.nn.Module) -> str:
    """Hash of the names, shapes and first 1024 values of every tensor: cheap, and changes when the weights do."""
    return _sha256(
        f"{name}{tuple(t.shape)}".encode() + t.detach().flatten()[:1024].float().cpu().numpy().tobytes()
        for name, t in module.state_dict().items()
    )


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return _sha256([text.encode()])


def expected_manifest(model: LLMModulesForCausalLM, dataset, *, max_length: int | None, dtype: str) -> dict[str, Any]:
    """What a cache of `dataset` through `model`'s frozen model must record to be reused."""
    if model.config.depth_connection_list:
        raise ValueError("the feature cache holds the sources' last hidden states only; this model has "
                         f"{len(model.config.depth_connection_list)} depth connections, which read inner layers")
    if dtype not in STORAGE:
        raise ValueError(f"feature cache dtype must be one of {sorted(STORAGE)}, got {dtype!r}")
    sources = list(model.sources)
    tokenizer = model.tokenizer
    one = len(sources) == 1  # one source keeps the manifest of caches written before there could be several
    revisions = [getattr(source.config, "_commit_hash", None) for source in sources]
    dtypes = [str(next(source.parameters()).dtype).removeprefix("torch.") for source in sources]
    return {
        "format": FORMAT_VERSION,
        "large_model": model.config.large_model_name_or_path,
        "large_revision": revisions[0] if one else revisions,
        "large_weights": weights_fingerprint(sources[0]) if one else [weights_fingerprint(s) for s in sources],
        "large_dtype": dtypes[0] if one else dtypes,
        "hidden_size": sum(source.config.hidden_size for source in sources),
        "dtype": dtype,
        "max_length": max_length,
        "tokenizer": getattr(tokenizer, "name_or_path", None) if tokenizer is not None else None,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer) if tokenizer is not None else None,
        "dataset_fingerprint": dataset_fingerprint(dataset),
        "num_examples": len(dataset),
        "num_tokens": int(sum(len(ids) for ids in dataset["input_ids"])),
    }


class FeatureCache:
    """A built cache, memory-mapped: `cache[i]` is example i's `[len_i, D_L]` tensor of hidden states."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.manifest = json.loads((self.directory / MANIFEST_NAME).read_text())
        storage, self.torch_dtype = STORAGE[self.manifest["dtype"]]
        self.offsets = np.load(self.directory / OFFSETS_NAME)
        shape = (int(self.offsets[-1]), self.manifest["hidden_size"])
        self.features = np.memmap(self.directory / FEATURES_NAME, dtype=storage, mode="r", shape=shape)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> torch.Tensor:
        rows = np.array(self.features[self.offsets[index]:self.offsets[index + 1]])  # a copy: tensors need writable memory
        return torch.from_numpy(rows).view(self.torch_dtype)


def _is_our_file(path: Path) -> bool:
    return path.name in (MANIFEST_NAME, FEATURES_NAME, OFFSETS_NAME) or path.name.endswith(".tmp")


def build_feature_cache(
    directory: str | os.PathLike,
    model: LLMModulesForCausalLM,
    dataset,
    *,
    max_length: int | None = None,
    dtype: str = "float16",
    device: torch.device | str | None = None,
    batch_tokens: int = 16384,
    on_mismatch: str = "rebuild",
) -> FeatureCache:
    """Open the cache of `dataset` in `directory`, building it first if it is missing, interrupted or stale.

    `dtype` is the storage of the states; when an example's states go beyond its range (float16: 65,504), the cache
    is written in bfloat16 instead, with one warning line naming the example (its index in `dataset`).
    `on_mismatch="error"` raises `FeatureCacheMismatch` instead of rebuilding a cache made for other inputs. A
    directory that holds files that are not ours is refused rather than cleared. Examples are run through the frozen
    model sorted by length, in batches of about `batch_tokens` tokens, on `device` (default: where the model is).
    """
    if on_mismatch not in ("rebuild", "error"):
        raise ValueError(f"on_mismatch must be 'rebuild' or 'error', got {on_mismatch!r}")
    directory = Path(directory)
    expected = expected_manifest(model, dataset, max_length=max_length, dtype=dtype)
    manifest_path = directory / MANIFEST_NAME
    if manifest_path.is_file():
        found = json.loads(manifest_path.read_text())
        # A cache that fell back to another dtype was built for the one asked (caches written before have no key).
        found = {**found, "dtype": found.get("requested_dtype", found.get("dtype"))}
        differences = [f"{key}: cache has {found.get(key)!r}, now {value!r}" for key, value in expected.items() if found.get(key) != value]
        if not differences:
            return FeatureCache(directory)
        if on_mismatch == "error":
            raise FeatureCacheMismatch(f"feature cache {directory} was built for other inputs: " + "; ".join(differences))
    if directory.is_dir():
        foreign = [p.name for p in directory.iterdir() if not _is_our_file(p)]
        if foreign:
            raise FeatureCacheMismatch(
                f"{directory} is not a feature cache (it holds {', '.join(sorted(foreign)[:5])}); give an empty or new directory"
            )
        for path in directory.iterdir():
            path.unlink() if path.is_file() else shutil.rmtree(path)
    directory.mkdir(parents=True, exist_ok=True)
    # Said once per build: under multi-process training the main process builds and every rank then opens it.
    logger.info(f"feature cache {directory}: running the frozen model once over {len(dataset)} examples")
    try:
        _write_features(directory, model, dataset, expected, device, batch_tokens)
    except StatesOutOfRange as beyond:
        beyond_what = f"beyond {dtype}'s largest value {torch.finfo(STORAGE[dtype][1]).max:.6g}"
        if dtype != "float16" or not math.isfinite(beyond.peak):  # nothing wider to fall back to at this size
            raise _range_error(directory, beyond, beyond_what) from None
        logger.warning(
            f"feature cache {directory}: example {beyond.index}'s hidden states reach {beyond.peak:.4g}, "
            f"{beyond_what}: this cache is stored in {OUT_OF_RANGE_FALLBACK} instead (float32's range at half the size)"
        )
        fallback = {**expected, "dtype": OUT_OF_RANGE_FALLBACK, "requested_dtype": dtype}
        try:
            _write_features(directory, model, dataset, fallback, device, batch_tokens)
        except StatesOutOfRange as still:
            raise _range_error(directory, still, f"beyond {OUT_OF_RANGE_FALLBACK}'s range too") from None
    return FeatureCache(directory)


def _range_error(directory: Path, beyond: StatesOutOfRange, what: str) -> FeatureRangeError:
    return FeatureRangeError(
        f"feature cache {directory}: example {beyond.index}'s hidden states reach {beyond.peak:.4g}, {what}: the "
        "frozen model overflows on it; train without --feature-cache, or check the frozen model's dtype"
    )


@torch.no_grad()
def _write_features(directory: Path, model, dataset, manifest: dict, device, batch_tokens: int) -> None:
    storage, _ = STORAGE[manifest["dtype"]]
    torch_dtype = STORAGE[manifest["dtype"]][1]
    lengths = np.array([len(ids) for ids in dataset["input_ids"]], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    tmp = directory / (FEATURES_NAME + ".tmp")
    features = np.memmap(tmp, dtype=storage, mode="w+", shape=(int(offsets[-1]), manifest["hidden_size"]))
    source_devices = [next(source.parameters()).device for source in model.sources]
    device = torch.device(device) if device is not None else source_devices[0]
    model.sources.to(device)
    try:
        order = np.argsort(lengths, kind="stable")
        batch: list[int] = []
        for position, index in enumerate(order):
            batch.append(int(index))
            last = position == len(order) - 1
            if last or (len(batch) + 1) * lengths[order[position + 1]] > batch_tokens:
                _run_batch(model, dataset, batch, lengths, offsets, features, device, torch_dtype)
                batch = []
    finally:
        for source, source_device in zip(model.sources, source_devices):
            source.to(source_device)
    features.flush()
    del features
    np.save(directory / (OFFSETS_NAME + ".tmp.npy"), offsets)
    os.replace(directory / (OFFSETS_NAME + ".tmp.npy"), directory / OFFSETS_NAME)
    os.replace(tmp, directory / FEATURES_NAME)
    (directory / (MANIFEST_NAME + ".tmp")).write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(directory / (MANIFEST_NAME + ".tmp"), directory / MANIFEST_NAME)  # last: the cache is now complete


def _run_batch(model, dataset, batch, lengths, offsets, features, device, torch_dtype) -> None:
    width = int(lengths[batch].max())
    input_ids = torch.zeros(len(batch), width, dtype=torch.long)
    attention_mask = torch.zeros(len(batch), width, dtype=torch.long)
    for row, index in enumerate(batch):
        ids = dataset[index]["input_ids"]
        input_ids[row, : len(ids)] = torch.as_tensor(ids)
        attention_mask[row, : len(ids)] = 1
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    # The same positions the model's forward derives from a right-padded mask.
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    states = torch.cat(model.source_hidden_states(input_ids, attention_mask, position_ids), dim=-1)
    # Largest |value| of each example, padding excluded: one past the storage dtype's range would be stored as inf.
    peaks = states.abs().float().masked_fill(attention_mask[..., None] == 0, 0).amax(dim=(1, 2)).cpu()
    beyond = (~(peaks <= torch.finfo(torch_dtype).max)).nonzero()  # NaN too: it is no value any dtype stores
    if len(beyond):
        row = int(beyond[0])
        raise StatesOutOfRange(batch[row], float(peaks[row]))
    states = states.to(torch_dtype).cpu()
    for row, index in enumerate(batch):
        rows = states[row, : lengths[index]]
        rows = rows.view(torch.uint16) if torch_dtype == torch.bfloat16 else rows
        features[offsets[index]:offsets[index + 1]] = rows.numpy()


class FeatureCacheDataset(Dataset):
    """A tokenized dataset whose examples also carry their cached `large_hidden_states`."""

    def __init__(self, dataset, cache: FeatureCache):
        if len(dataset) != len(cache):
            raise ValueError(f"dataset has {len(dataset)} examples but the feature cache {cache.directory} has {len(cache)}")
        self.dataset, self.cache = dataset, cache

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.dataset[index], "large_hidden_states": self.cache[index]}


def cached_datasets(
    directory: str | os.PathLike,
    model: LLMModulesForCausalLM,
    train_dataset,
    eval_dataset=None,
    *,
    max_length: int | None = None,
    dtype: str = "float16",
    device: torch.device | str | None = None,
    on_mismatch: str = "rebuild",
) -> tuple[FeatureCacheDataset, FeatureCacheDataset | None]:
    """Training and validation datasets served from caches in `directory/train` and `directory/validation`."""
    directory = Path(directory)
    options = dict(max_length=max_length, dtype=dtype, device=device, on_mismatch=on_mismatch)
    train = FeatureCacheDataset(train_dataset, build_feature_cache(directory / "train", model, train_dataset, **options))
    if eval_dataset is None:
        return train, None
    return train, FeatureCacheDataset(eval_dataset, build_feature_cache(directory / "validation", model, eval_dataset, **options))
