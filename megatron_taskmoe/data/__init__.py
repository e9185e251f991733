"""Everything between raw bitext and the batches the trainer consumes.

bitext.py      finding/reading fairseq-style, TSV and JSONL parallel text (DataError for bad input)
tokenizer.py   the joint sentencepiece model (pad=0 unk=1 bos=2 eos=3, <2xx> tags), temperature probabilities
preprocess.py  bitext -> megatron-core indexed datasets + manifest.json (tools/preprocess_data.py)
indexed.py     megatron-core's .bin/.idx format written and checked without importing megatron-core
manifest.py    manifest I/O and checks, direction -> task id maps
dataset.py     MultilingualDataset: memory-mapped sentence pairs of one split, samples with tag/bos/eos
sampler.py     TemperatureSampler: deterministic, resumable, rank-sharded global stream
batching.py    token-budget bucketing, collation to the batch dict, BatchIterator, eval_batches

Names are imported lazily so that the command-line tools start without torch or megatron.core.
"""

import importlib

_EXPORTS = {
    "BatchingConfig": "batching", "BatchIterator": "batching", "TokenBatchSampler": "batching",
    "collate": "batching", "eval_batches": "batching", "DataError": "bitext", "MultilingualDataset": "dataset",
    "build_task_map": "manifest", "check_task_map_compatible": "manifest", "load_manifest": "manifest",
    "TemperatureSampler": "sampler", "Tokenizer": "tokenizer", "temperature_probabilities": "tokenizer",
    "PAD_ID": "tokenizer", "UNK_ID": "tokenizer", "BOS_ID": "tokenizer", "EOS_ID": "tokenizer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"megatron_taskmoe.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
