"""Trainer checkpoints -> a single-process model, and batched translation of raw sentences with it.

`load_checkpoint(path)` takes a checkpoint directory (`RUN/checkpoints/step_XXXXXXXX`), a checkpoint root
(`RUN/checkpoints`, its latest complete checkpoint is taken) or a run directory (`RUN`), rebuilds the model from
the `model_config` recorded in `checkpoint.json` with TP = PP = EP = 1, and reads the model part of the megatron-core
distributed checkpoint into it. Sharded tensors carry their global offsets, so `dist_checkpointing.load` reshards
from whatever layout the run was saved with (expert-parallel ranks' local experts, tensor-parallel slices); the
optimizer part is never read. The tokenizer copied beside the checkpoint must hash to the recorded sha256: the
model's embedding rows mean nothing with another sentencepiece model. It also takes a single `.safetensors` file
(`load_single_file`: `tools/checkpoint/convert.py --single-file`, `extract_task.py` outputs), which carries the
whole model, its record and its tokenizer. A model decodes in the precision it was trained in (`model.params_dtype`,
fp32 by default); `dtype="bf16"` (or `"fp16"`, `"fp32"`) casts the loaded weights for decoding in that precision
(attention caches and activations follow; the beam search scores in fp32). Weights and activations keep 8
significant bits in bf16, so a translation can differ from fp32 decoding wherever two hypotheses score close.

`Translator` turns raw sentences into exactly the source the trainer saw (`data/dataset.py`: `<2tgt>` + pieces +
eos, truncated to the model's positions) with the direction's task id and language ids, decodes incrementally with
`generation.beam_search` (`model/decoding.py`; pad, bos, unk and the `<2xx>` tags are never produced) and
detokenizes with sentencepiece. Sentences are batched in length order and returned in input order.

Loading needs megatron's process groups; outside a distributed job a one-process group is created (gloo on CPU,
NCCL on GPU). Inside a multi-process job, loading is refused: this is the single-process path.

Legend: B batch (sentences), S source length, T target length, V vocabulary.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from megatron_taskmoe.checkpoint.format import CHECKPOINTS_DIR, MARKER, TOKENIZER_FILE
from megatron_taskmoe.checkpoint.manager import CheckpointInfo, resolve_checkpoint
from megatron_taskmoe.checkpoint_tools.full import CheckpointToolError
from megatron_taskmoe.checkpoint_tools.single_file import is_single_file, read_meta, read_tokenizer
from megatron_taskmoe.config_io import ConfigError
from megatron_taskmoe.data.bitext import DataError
from megatron_taskmoe.data.batching import collate
from megatron_taskmoe.data.tokenizer import BOS_ID, EOS_ID, Tokenizer
from megatron_taskmoe.generation import SearchConfig
from megatron_taskmoe.model.config import TORCH_DTYPES, ModelConfig, ParallelConfig, to_transformer_config

log = logging.getLogger(__name__)


class InferenceError(ValueError):
    """Inference cannot run as asked; the message names the path, direction or option at fault."""


def inference_dtype(name: str) -> torch.dtype:
    """The torch dtype of a precision name (`model.config.TORCH_DTYPES`); InferenceError naming the choices for any
    other."""
    if name not in TORCH_DTYPES:
        raise InferenceError(f"dtype {name!r} is not one of {', '.join(TORCH_DTYPES)}")
    return TORCH_DTYPES[name]


class CheckpointError(InferenceError):
    """A checkpoint that cannot be used as asked (missing, wrong tokenizer, unknown direction); names the path."""


# ------------------------------------------------------------------------------------------------ loading
@dataclass(kw_only=True)
class LoadedModel:
    """A model ready for inference and what it needs to read and write text."""

    model: torch.nn.Module
    """`EncoderDecoderModel` in eval mode on `device`."""
    tokenizer: Tokenizer
    """The sentencepiece tokenizer the model was trained with."""
    model_config: object
    """The `ModelConfig` the run trained."""
    task_map: dict
    """{"mode", "tasks": [names in id order], "direction_to_task": {"de-en": id, ...}} from the checkpoint."""
    languages: list[str]
    """Sorted language codes; a language's id is its index."""
    checkpoint: Path
    """The checkpoint directory the model was read from."""
    step: int
    """The training step of the checkpoint."""
    device: torch.device
    """Where the model's parameters are."""
    dtype: str = "fp32"
    """The precision the model decodes in (a `model.config.TORCH_DTYPES` name): the run's `model.params_dtype` unless
    `load_checkpoint(dtype=...)` cast it."""
    meta: dict = field(default_factory=dict)
    """The whole `checkpoint.json`."""

    @property
    def directions(self) -> list[str]:
        return sorted(self.task_map["direction_to_task"])

    def direction_info(self, src_lang: str, tgt_lang: str) -> dict[str, int]:
        """Ids the model needs for a direction: task id, language ids and the `<2tgt>` tag's piece id."""
        task = check_direction(self.meta or {"task_map": self.task_map}, src_lang, tgt_lang, where=self.checkpoint)
        return {
            "task_id": task,
            "src_lang_id": self.languages.index(src_lang),
            "tgt_lang_id": self.languages.index(tgt_lang),
            "tag_id": self.tokenizer.lang_tag_id(tgt_lang),
        }


def check_direction(meta: dict, src_lang: str, tgt_lang: str, *, where) -> int:
    """The task id of direction src-tgt in a checkpoint's `checkpoint.json` contents; CheckpointError if untrained."""
    direction = f"{src_lang}-{tgt_lang}"
    known = (meta.get("task_map") or {}).get("direction_to_task", {})
    if direction not in known:
        raise CheckpointError(f"{where}: direction {direction} was not trained (the checkpoint's task map has "
                              f"{', '.join(sorted(known)) or 'no directions'})")
    return int(known[direction])


def find_checkpoint(path: str | Path) -> CheckpointInfo:
    """The `CheckpointInfo` of a checkpoint directory, a checkpoint root or a run directory; CheckpointError else."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    errors = []
    for candidate in (path, path / CHECKPOINTS_DIR):
        try:
            return resolve_checkpoint(candidate)
        except FileNotFoundError as e:
            errors.append(str(e))
    raise CheckpointError(errors[0] + " (nor under checkpoints/)")


def checkpoint_record(path: str | Path) -> tuple[Path, dict]:
    """(what `load_checkpoint(path)` reads: a checkpoint directory or a single file, its record), without reading
    the model, so that a wrong path or direction fails before the slow load; CheckpointError else."""
    if is_single_file(path):
        try:
            return Path(path), read_meta(path)
        except CheckpointToolError as e:
            raise CheckpointError(str(e)) from None
    info = find_checkpoint(path)
    return info.path, info.meta


def _check_tokenizer(path: Path, want: Optional[str], record: str, proto: Optional[bytes] = None) -> Tokenizer:
    """The tokenizer at `path` (or of bytes `proto`, read from `path`) if it hashes to `want` (recorded in
    `record`); CheckpointError otherwise."""
    if proto is None and not path.is_file():
        raise CheckpointError(f"{path}: tokenizer not found (the trainer copies {TOKENIZER_FILE} beside "
                              f"{record}; pass tokenizer= to use another copy)")
    try:
        tokenizer = Tokenizer(path, model_proto=proto)
    except DataError as e:
        raise CheckpointError(str(e)) from None
    got = tokenizer.sha256()
    if want is not None and got != want:
        raise CheckpointError(f"{path}: sha256 {got[:12]}... differs from the tokenizer the model was trained with "
                              f"({want[:12]}..., recorded in {record})")
    return tokenizer


def _model_config(meta: dict, record: str) -> ModelConfig:
    """The model config of a checkpoint record that has what inference needs; CheckpointError naming `record`."""
    for key in ("model_config", "task_map", "languages"):
        if key not in meta:
            raise CheckpointError(f"{record} has no {key!r}: not written by pretrain_mt.py")
    try:
        return ModelConfig.from_record(meta["model_config"])
    except ConfigError as e:
        raise CheckpointError(f"{record}: {e}") from None


def _device(device: str | torch.device | None) -> torch.device:
    if device is None:
        # parallel.groups imports megatron-core: only when a model is loaded (see load_checkpoint)
        from megatron_taskmoe.parallel import groups

        return groups.device()
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InferenceError(f"device {device} requested but CUDA is not available here (use cpu)")
    return device


def load_checkpoint(path: str | Path, *, device: str | torch.device | None = None,
                    tokenizer: str | Path | None = None, dtype: Optional[str] = None) -> LoadedModel:
    """Load a trainer checkpoint or a single `.safetensors` file (`load_single_file`) into one process; see the
    module docstring for what `path` may be. `tokenizer` replaces the checkpoint's copy (its sha256 is checked);
    `dtype` is the precision to decode in (`inference_dtype`; default: the run's `model.params_dtype`)."""
    torch_dtype = None if dtype is None else inference_dtype(dtype)
    if is_single_file(path):
        return load_single_file(path, device=device, tokenizer=tokenizer, dtype=dtype)
    info = find_checkpoint(path)
    meta = info.meta
    record = f"{info.path}/{MARKER}"
    model_cfg = _model_config(meta, record)
    tok = _check_tokenizer(Path(tokenizer) if tokenizer else info.path / TOKENIZER_FILE,
                           meta.get("tokenizer_sha256"), record)
    if tok.vocab_size != model_cfg.vocab_size:
        raise CheckpointError(f"{tok.path}: {tok.vocab_size} pieces but the model has {model_cfg.vocab_size}")

    device = _device(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # megatron warns about missing Apex/TE on import
        # megatron-core is imported on the first load, so that `find_checkpoint` and the tools' argument checks
        # answer before its (slow) import.
        from megatron_taskmoe.checkpoint import state as ckpt_state
        from megatron_taskmoe.checkpoint.process_groups import MultiProcessError, one_process_groups
        from megatron_taskmoe.model.encdec import EncoderDecoderModel

        try:
            pg = one_process_groups(device)
        except MultiProcessError as e:
            raise CheckpointError(f"load_checkpoint: {e}") from None
        tconfig = to_transformer_config(model_cfg, ParallelConfig(), perform_initialization=False)
        model = EncoderDecoderModel(model_cfg, ParallelConfig(), pg_collection=pg, transformer_config=tconfig)
        try:
            loaded = ckpt_state.load_state({"model": ckpt_state.model_sharded_state_dict(model)}, info.path)
        except Exception as e:  # megatron raises several types for a layout it cannot map
            raise CheckpointError(f"{info.path}: cannot load the model from this checkpoint "
                                  f"({type(e).__name__}: {e})") from e
    model.load_state_dict(loaded["model"], strict=True)
    model.to(device=device, dtype=torch_dtype).eval()
    dtype = dtype or model_cfg.params_dtype
    log.info("loaded %s (step %d, saved with %s) on %s in %s", info.path, info.step, meta.get("parallel"), device,
             dtype)
    return LoadedModel(model=model, tokenizer=tok, model_config=model_cfg, task_map=meta["task_map"],
                       languages=list(meta["languages"]), checkpoint=info.path, step=info.step, device=device,
                       dtype=dtype, meta=meta)


def load_single_file(path: str | Path, *, device: str | torch.device | None = None,
                     tokenizer: str | Path | None = None, dtype: Optional[str] = None) -> LoadedModel:
    """Load a single-file checkpoint (`checkpoint_tools/single_file.py`: the whole model, its record and its
    tokenizer in one safetensors file, as `tools/checkpoint/convert.py --single-file` writes) into one process.
    `tokenizer` replaces the copy the file carries (its sha256 is checked alike); `dtype` as `load_checkpoint`."""
    torch_dtype = None if dtype is None else inference_dtype(dtype)
    path = Path(path)
    try:
        meta = read_meta(path)
    except CheckpointToolError as e:
        raise CheckpointError(str(e)) from None
    model_cfg = _model_config(meta, str(path))
    device = _device(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # megatron warns about missing Apex/TE on import
        from megatron_taskmoe.checkpoint.process_groups import MultiProcessError, one_process_groups
        from megatron_taskmoe.checkpoint_tools.models import model_from_single_file

        try:
            one_process_groups(device)  # the groups `model_from_single_file` then uses (NCCL on a CUDA device)
        except MultiProcessError as e:
            raise CheckpointError(f"load_single_file: {e}") from None
        try:
            carried = None if tokenizer else read_tokenizer(path)
            if tokenizer is None and carried is None:
                raise CheckpointError(f"{path}: the file carries no tokenizer; pass tokenizer= (the sentencepiece "
                                      "model the run trained with)")
            tok = _check_tokenizer(Path(tokenizer) if tokenizer else path, meta.get("tokenizer_sha256"), str(path),
                                   proto=carried)
            if tok.vocab_size != model_cfg.vocab_size:
                raise CheckpointError(f"{tok.path}: {tok.vocab_size} pieces but the model has "
                                      f"{model_cfg.vocab_size}")
            model = model_from_single_file(path)  # one copy of the weights in memory
        except CheckpointToolError as e:
            raise CheckpointError(str(e)) from None
    model.to(device=device, dtype=torch_dtype).eval()
    dtype = dtype or model_cfg.params_dtype
    step = int(meta.get("step") or 0)
    log.info("loaded %s (step %d) on %s in %s", path, step, device, dtype)
    return LoadedModel(model=model, tokenizer=tok, model_config=model_cfg, task_map=meta["task_map"],
                       languages=list(meta["languages"]), checkpoint=path, step=step, device=device, dtype=dtype,
                       meta=meta)


# ------------------------------------------------------------------------------------------------ translating
@dataclass(kw_only=True)
class TranslatorConfig:
    """Decoding and batching options of `Translator`."""

    beam_size: int = 4
    """1 is greedy search."""
    length_penalty: float = 1.0
    """Finished hypotheses are ranked by score / length ** length_penalty (length counts the eos)."""
    max_len_a: float = 1.2
    """Maximum output length is max_len_a * source length + max_len_b (capped by the model's positions)."""
    max_len_b: int = 10
    """Constant term of the maximum output length (see max_len_a), in tokens."""
    min_len: int = 0
    """Minimum output length (tokens before eos)."""
    batch_size: int = 32
    """Sentences per decoding batch (sentences are batched in length order)."""

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        _ = self.search  # SearchConfig validates the beam and length options now, not at the first batch

    @property
    def search(self) -> SearchConfig:
        return SearchConfig(beam_size=self.beam_size, length_penalty=self.length_penalty, max_len_a=self.max_len_a,
                            max_len_b=self.max_len_b, min_len=self.min_len)


class Translator:
    """Batched translation of raw sentences with a loaded model (see the module docstring)."""

    def __init__(self, loaded: LoadedModel, config: Optional[TranslatorConfig] = None):
        self.loaded = loaded
        self.config = config or TranslatorConfig()
        cfg = loaded.model_config
        self.max_src_pieces = cfg.max_source_positions - 2  # room for <2tgt> and eos, as the trainer truncates
        self.max_tgt_pieces = cfg.max_target_positions - 1  # room for bos / eos
        self.banned = loaded.tokenizer.banned_ids()

    def samples(self, sources: Sequence[str], src_lang: str, tgt_lang: str,
                targets: Optional[Sequence[str]] = None) -> list[dict]:
        """Dataset samples (`MultilingualDataset.__getitem__`'s format) of raw sentences; targets optional."""
        ids = self.loaded.direction_info(src_lang, tgt_lang)
        if targets is not None and len(targets) != len(sources):
            raise ValueError(f"{len(sources)} sources but {len(targets)} targets")
        src_pieces = self.loaded.tokenizer.encode(list(sources))
        tgt_pieces = self.loaded.tokenizer.encode(list(targets)) if targets is not None else [[]] * len(sources)
        truncated = sum(len(p) > self.max_src_pieces for p in src_pieces)
        if truncated:
            log.warning("%d source sentence(s) longer than %d pieces truncated (the model's positions)", truncated,
                        self.max_src_pieces)
        out = []
        for i, (src, tgt) in enumerate(zip(src_pieces, tgt_pieces)):
            tgt = tgt[: self.max_tgt_pieces]
            out.append({
                "src": [ids["tag_id"], *src[: self.max_src_pieces], EOS_ID],
                "tgt_in": [BOS_ID, *tgt],
                "labels": [*tgt, EOS_ID],
                "task_id": ids["task_id"],
                "src_lang_id": ids["src_lang_id"],
                "tgt_lang_id": ids["tgt_lang_id"],
                "index": i,
            })
        return out

    def batches(self, samples: list[dict]):
        """(positions in `samples`, batch dict) in length order, `config.batch_size` sentences each."""
        order = sorted(range(len(samples)), key=lambda i: (len(samples[i]["src"]), i))
        for start in range(0, len(order), self.config.batch_size):
            chunk = order[start : start + self.config.batch_size]
            yield chunk, collate([samples[i] for i in chunk])

    def max_lengths(self, src_lengths: Sequence[int]) -> list[int]:
        """Output length limits: the search's, capped so that bos + output + eos fits the learned positions."""
        return self.config.search.max_lengths(src_lengths, self.max_tgt_pieces)

    @torch.no_grad()
    def translate_batch(self, batch: dict) -> list[list[int]]:
        """Best output ids (no bos/eos) for each row of a batch dict."""
        from megatron_taskmoe.model.decoding import translate_batch  # the model's modules: see load_checkpoint

        return translate_batch(self.loaded.model, batch, self.config.search, bos=BOS_ID, eos=EOS_ID,
                               banned=self.banned, device=self.loaded.device, max_target_len=self.max_tgt_pieces)

    def translate_ids(self, sentences: Sequence[str], src_lang: str, tgt_lang: str) -> list[list[int]]:
        samples = self.samples(sentences, src_lang, tgt_lang)
        out: list[Optional[list[int]]] = [None] * len(samples)
        for positions, batch in self.batches(samples):
            for pos, ids in zip(positions, self.translate_batch(batch)):
                out[pos] = ids
        return out

    def translate(self, sentences: Sequence[str], src_lang: str, tgt_lang: str) -> list[str]:
        """Detokenized translations of `sentences`, in their order."""
        sp = self.loaded.tokenizer
        return [sp.decode(ids) for ids in self.translate_ids(sentences, src_lang, tgt_lang)]
