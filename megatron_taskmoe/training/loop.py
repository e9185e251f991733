"""The training loop of `pretrain_mt.py`: megatron-core schedules, logging, validation, checkpoints, resume.

Loss normalisation is per token (`calculate_per_token_loss=True`, set in setup.py): the step's loss is the sum of the
label-smoothed token losses of all its micro-batches on all data-parallel ranks divided by their target-token count,
and the MoE auxiliary losses are weighted by their side's token count the same way (router.py).

Exact resume: a checkpoint holds the model, the optimizer, the scheduler, the step, the data stream position
(`consumed_samples`, the global counter of data/batching.py) and every RNG state; a resumed run therefore sees
the same batches, dropout masks and learning rates as the uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from megatron.core.pipeline_parallel import get_forward_backward_func
from tqdm import tqdm

from megatron_taskmoe.checkpoint import state as ckpt_state
from megatron_taskmoe.checkpoint.format import CHECKPOINTS_DIR
from megatron_taskmoe.checkpoint.manager import (CheckpointManager, latest_checkpoint, load_rank_state,
                                                 resolve_checkpoint)
from megatron_taskmoe.checkpoint.record import CheckpointRecord
from megatron_taskmoe.checkpoint.rng import capture_rng_state, restore_rng_state
from megatron_taskmoe.compat import aux_losses
from megatron_taskmoe.config_io import ConfigError, dump_yaml, to_dict
from megatron_taskmoe.data.batching import BatchingConfig, BatchIterator, to_device
from megatron_taskmoe.data.dataset import MultilingualDataset
from megatron_taskmoe.model.config import RECORD_DEFAULTS, ModelConfig
from megatron_taskmoe.parallel import groups, pipeline
from megatron_taskmoe.training.config import RunConfig
from megatron_taskmoe.training.forward import make_forward_step
from megatron_taskmoe.training.metrics import MetricsWriter
from megatron_taskmoe.training.routing_telemetry import RoutingTelemetry, has_routing
from megatron_taskmoe.training.setup import Built, Corpus, build, check_task_map
from megatron_taskmoe.training.validation import ValidationSet, Validator

log = logging.getLogger(__name__)



class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf and the config says to stop."""


@dataclass(kw_only=True)
class TrainState:
    """Counters saved in every checkpoint."""

    step: int = 0
    """Optimizer steps taken."""
    consumed_samples: int = 0
    """Training samples consumed over all data-parallel ranks (the global counter of data/batching.py); resuming
    continues the data order from here.
    """
    best_bleu: Optional[float] = None
    """Best average validation BLEU so far; None before the first evaluation."""
    evals_without_improvement: int = 0
    """Evaluations since best_bleu last improved (early stopping counts them)."""
    skipped_steps: int = 0
    """Steps skipped because the loss was not finite (train.nan_policy="skip")."""
    history: list = field(default_factory=list)
    """One {"step", "bleu_avg"} entry per validation."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0




def _dict_diff(a: dict, b: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, a's value, b's value) for every leaf where two nested dicts differ."""
    out = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            out.extend(_dict_diff(x, y, f"{prefix}{key}."))
        elif x != y:
            out.append((f"{prefix}{key}", x, y))
    return out


class _DeviceBatches:
    """Wraps the rank's batch iterator: moves each batch to the device and records the consumed-samples counter."""

    def __init__(self, batches: BatchIterator):
        self.batches = batches
        self.tokens = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self.batches)
        self.tokens += int(batch["loss_mask"].sum()) + int((~batch["src_padding_mask"]).sum())
        return to_device(batch, groups.device(), non_blocking=True)


class Trainer:
    """One run: `Trainer(cfg, corpus, model_cfg).train()`; every rank constructs and runs it."""

    def __init__(self, cfg: RunConfig, corpus: Corpus, model_cfg: ModelConfig):
        self.cfg, self.corpus, self.model_cfg = cfg, corpus, model_cfg
        self.run_dir = Path(cfg.train.run_dir)
        self.rank = _rank()
        self.built: Built = build(cfg, model_cfg)
        pg = self.built.pg_collection
        self.dp_rank, self.dp_size = pg.dp.rank(), pg.dp.size()
        self.ckpt = CheckpointManager(self.run_dir / CHECKPOINTS_DIR, keep_last=cfg.checkpoint.keep_last,
                                           keep_best=cfg.checkpoint.keep_best)
        self.state = TrainState()
        self.metrics = MetricsWriter(self.run_dir, enabled=self.rank == 0)
        self._stop_signal: Optional[int] = None
        self.train_data = MultilingualDataset(corpus.data_dir, "train", corpus.directions,
                                              max_src_len=model_cfg.max_source_positions - 2,
                                              max_tgt_len=model_cfg.max_target_positions - 1)
        self._maybe_resume()
        self.routing = RoutingTelemetry(  # routing telemetry: counted on the device, reduced at each log step
            self.built.module, pg, task_names=corpus.manifest["task_map"]["tasks"],
            enabled=cfg.train.routing_stats and has_routing(model_cfg),
            collapse_share=cfg.train.routing_collapse_share, logging_rank=self.rank == 0, start_step=self.state.step)
        # Batching does not depend on the parallel layout (the model pads for sequence parallelism itself), so a
        # run resumed under other TP/PP/EP sizes sees the same batches.
        self.batches = _DeviceBatches(BatchIterator(
            self.train_data, temperature=cfg.data.temperature, batching=cfg.data.batching, seed=cfg.train.seed,
            dp_rank=self.dp_rank, dp_size=self.dp_size, consumed_samples=self.state.consumed_samples))
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            dump_yaml(cfg, self.run_dir / "config.yaml")
            dump_yaml(model_cfg, self.run_dir / "model.yaml")

    # ------------------------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, metric: Optional[float] = None) -> Path:
        sharded = ckpt_state.sharded_state_dict(self.built.module, self.built.optimizer)
        sharded["scheduler"] = self.built.scheduler.state_dict()
        sharded["train_state"] = to_dict(self.state)
        record = CheckpointRecord(
            step=self.state.step, metric=metric,
            task_map=self.corpus.manifest["task_map"],
            languages=self.corpus.manifest["languages"],
            tokenizer_sha256=self.corpus.tokenizer_sha256,
            model_config=to_dict(self.model_cfg),
            parallel=to_dict(self.cfg.parallel),
            consumed_samples=self.state.consumed_samples,
            optimizer_chains=len(ckpt_state.optimizers(self.built.optimizer)),
        )
        # The tokenizer travels with the checkpoint, so translate.py needs nothing else.
        return self.ckpt.save(record, lambda d: ckpt_state.save_state(sharded, d),
                              rank_state={"rng": capture_rng_state()}, tokenizer=self.corpus.tokenizer_path)

    def _maybe_resume(self) -> None:
        load = self.cfg.checkpoint.load
        if load is None:
            return
        if load == "auto":
            info = latest_checkpoint(self.run_dir / CHECKPOINTS_DIR)
            if info is None:
                return
        else:
            try:
                info = resolve_checkpoint(load)
            except FileNotFoundError as e:
                raise ConfigError(f"checkpoint.load: {e}") from e
        record = info.record
        check_task_map(record.task_map, self.corpus)
        saved_model = record.model_config
        if saved_model is not None:
            saved_model = {**RECORD_DEFAULTS, **saved_model}
        if saved_model is not None and saved_model != to_dict(self.model_cfg):
            diffs = _dict_diff(saved_model, to_dict(self.model_cfg))
            raise ConfigError(f"{info.path} holds a different model than the config builds: "
                              + "; ".join(f"model.overrides.{k}: checkpoint {a!r}, config {b!r}" for k, a, b in diffs))
        if record.tokenizer_sha256 not in (None, self.corpus.tokenizer_sha256):
            raise ConfigError(f"{info.path}: trained with another tokenizer (sha256 differs from "
                              f"{self.corpus.tokenizer_path})")
        # Expert parameters always have their own chained optimizer (setup.mark_expert_parameters), so the optimizer
        # state reshards across every layout change, EP=1 <-> EP>1 included. A checkpoint with another optimizer
        # structure (one optimizer for a MoE model, saved at EP=1) restores the weights, schedule and data
        # position, and the Adam moments start afresh (said in the log).
        chains = len(ckpt_state.optimizers(self.built.optimizer))
        saved_chains = record.optimizer_chains if record.optimizer_chains is not None else chains
        with_optimizer = saved_chains == chains
        if with_optimizer:
            # The loading template needs optimizer states to exist: materialise them (overwritten by the load).
            ckpt_state.materialize_optimizer_state(self.built.optimizer)
        elif self.rank == 0:
            log.warning("%s holds %s chained optimizer(s), this run has %d (a checkpoint from before expert "
                        "weights always had their own optimizer): the Adam moments restart",
                        info.path, record.optimizer_chains, chains)
        sharded = ckpt_state.sharded_state_dict(self.built.module, self.built.optimizer if with_optimizer else None,
                                                is_loading=True)
        sharded["scheduler"] = None
        sharded["train_state"] = None
        loaded = ckpt_state.load_state(sharded, info.path)
        self.built.module.load_state_dict(loaded["model"], strict=True)
        if with_optimizer:
            self.built.optimizer.load_state_dict(loaded["optimizer"])
        self.built.scheduler.load_state_dict(loaded["scheduler"])
        self.state = TrainState(**loaded["train_state"])
        rank_state = load_rank_state(info.path)
        same_layout = record.parallel == to_dict(self.cfg.parallel)
        if rank_state is not None and same_layout:
            restore_rng_state(rank_state["rng"])
        else:
            log.warning("resuming %s under another parallel layout: RNG streams restart from the seed", info.path)
            groups.model_parallel_manual_seed(self.cfg.train.seed + self.state.step)
        if self.rank == 0:
            log.info("resumed from %s at step %d (consumed samples %d)", info.path, self.state.step,
                     self.state.consumed_samples)

    # ------------------------------------------------------------------------------------------ training
    def _install_signal_handler(self) -> None:
        def handler(signum, frame):
            self._stop_signal = signum

        signal.signal(signal.SIGTERM, handler)

    def _stop_requested(self) -> bool:
        flag = torch.tensor([1 if self._stop_signal is not None else 0], dtype=torch.int32)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def train_step(self) -> dict[str, Any]:
        b = self.built
        b.model.zero_grad_buffer()
        b.optimizer.zero_grad()
        if self.cfg.parallel.pipeline > 1:
            # 1F1B over the stages; every stage reads the same micro-batches from its own iterator, with their own
            # lengths (variable_seq_lengths).
            losses = pipeline.forward_backward(
                forward_step_func=make_forward_step(), data_iterator=self.batches, model=b.model,
                num_microbatches=self.cfg.train.micro_batches, forward_only=False)
            # Each stage tracked only its own layers' MoE aux losses: same entries everywhere before logging.
            pipeline.align_aux_loss_tracker(b.pg_collection, b.transformer_config.num_layers)
        else:
            forward_backward = get_forward_backward_func()
            losses = forward_backward(
                forward_step_func=make_forward_step(), data_iterator=self.batches, model=[b.model],
                num_microbatches=self.cfg.train.micro_batches, seq_length=1, micro_batch_size=1,
                forward_only=False,
            )
        # Mean token loss of the step (sum over micro-batches and data-parallel ranks). Only the last pipeline
        # stage has losses: summed over the pipeline group, every rank knows (and logs) the same value.
        totals = torch.zeros(2, device=groups.device())
        for item in losses:
            totals += item["lm loss"].detach().float()
        pipeline.sum_over_pipeline(totals, b.pg_collection)
        if dist.is_initialized():
            dist.all_reduce(totals, group=b.pg_collection.dp)
        totals = totals.cpu()
        loss = (totals[0] / totals[1].clamp(min=1)).item()
        finite = torch.tensor([1.0 if math.isfinite(loss) else 0.0])
        if not math.isfinite(loss):
            if self.cfg.train.nan_policy == "stop":
                raise NonFiniteLossError(
                    f"loss is {loss} at step {self.state.step + 1}; stopping (set train.nan_policy=skip to "
                    "skip such steps instead)")
            self.state.skipped_steps += 1
            update_ok, grad_norm = False, float("nan")
        else:
            update_ok, grad_norm, _ = b.optimizer.step()
            grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        del finite
        if update_ok:
            b.scheduler.step(increment=1)
        self.state.step += 1
        self.state.consumed_samples = self.batches.batches.consumed_samples
        return {"loss": loss, "grad_norm": grad_norm, "update": bool(update_ok), "tokens": int(totals[1])}

    def _aux_losses(self) -> dict[str, float]:
        if not aux_losses.aux_loss_entries():
            return {}
        aux_losses.reduce_aux_losses(self.built.pg_collection)
        out = {name: float(entry.values.sum()) / self.cfg.train.micro_batches
               for name, entry in aux_losses.aux_loss_entries().items()}
        aux_losses.clear_aux_losses()
        return out

    def build_validator(self) -> Validator:
        """The validator of this run: its model, forward step, process groups, `eval.search`, the validation split
        (the first `eval.max_sentences` pairs of each direction, batched with `data.batching`'s budget and padding)
        and the metrics writer."""
        cfg = self.cfg
        b = cfg.data.batching
        data = ValidationSet.load(
            self.corpus, cfg.data.valid_split, max_src_len=self.model_cfg.max_source_positions - 2,
            max_tgt_len=self.model_cfg.max_target_positions - 1, max_sentences=cfg.eval.max_sentences,
            batching=BatchingConfig(max_tokens=b.max_tokens, batch_size=b.batch_size,
                                    pad_to_multiple=b.pad_to_multiple),
            warn=self.rank == 0)
        return Validator(model=self.built.model, module=self.built.module, make_forward_step=make_forward_step,
                         pg_collection=self.built.pg_collection, search=cfg.eval.search, data=data,
                         task_names=self.corpus.manifest["task_map"]["tasks"], bleu_tokenize=cfg.eval.bleu_tokenize,
                         metrics=self.metrics, logging_rank=self.rank == 0)

    def train(self) -> TrainState:
        cfg = self.cfg
        self._install_signal_handler()
        validator = self.build_validator() if cfg.eval.interval > 0 else None
        bar = tqdm(total=cfg.train.steps, initial=self.state.step, disable=self.rank != 0 or not cfg.train.progress_bar,
                   unit="step", dynamic_ncols=True)
        window_start = time.perf_counter()
        self.batches.tokens = 0
        while self.state.step < cfg.train.steps:
            out = self.train_step()
            aux = self._aux_losses()
            bar.update(1)
            step = self.state.step
            if step % cfg.train.log_interval == 0 or step == cfg.train.steps:
                elapsed = time.perf_counter() - window_start
                tokens = torch.tensor([self.batches.tokens], dtype=torch.float64)
                if dist.is_initialized():
                    dist.all_reduce(tokens, group=self.built.pg_collection.dp)
                tps = float(tokens) / max(elapsed, 1e-9)
                lr = self.built.optimizer.param_groups[0]["lr"]
                record = {"loss": out["loss"], "lr": lr, "grad_norm": out["grad_norm"], "tokens_per_s": tps,
                          "consumed_samples": self.state.consumed_samples, **{f"aux/{k}": v for k, v in aux.items()}}
                self.metrics.write("train", step, **record)
                self.routing.log(step, self.metrics)
                bar.set_postfix(loss=f"{out['loss']:.3f}", lr=f"{lr:.2e}", tok_s=f"{tps:.0f}")
                window_start, self.batches.tokens = time.perf_counter(), 0
            stop_early = False
            if validator is not None and (step % cfg.eval.interval == 0 or step == cfg.train.steps):
                stop_early = self._evaluate(validator, step)
            elif cfg.checkpoint.save and step % cfg.checkpoint.interval == 0:
                self.save_checkpoint()
            if stop_early:
                break
            if self._stop_requested():
                if self.rank == 0:
                    log.warning("SIGTERM received: saving a checkpoint at step %d and stopping", step)
                if cfg.checkpoint.save:
                    self.save_checkpoint()
                break
        else:
            if cfg.checkpoint.save and validator is None and self.state.step % cfg.checkpoint.interval:
                self.save_checkpoint()
        bar.close()
        self.metrics.close()
        return self.state

    def _evaluate(self, validator: Validator, step: int) -> bool:
        """Validate (loss, BLEU/chrF; through the stages under pipeline parallelism), checkpoint with BLEU as the
        metric, and decide on early stopping."""
        bleu = validator.validate(step)["bleu_avg"]
        improved = self.state.best_bleu is None or bleu > self.state.best_bleu
        if improved:
            self.state.best_bleu, self.state.evals_without_improvement = bleu, 0
        else:
            self.state.evals_without_improvement += 1
        self.state.history.append({"step": step, "bleu_avg": bleu})
        if self.cfg.checkpoint.save:
            self.save_checkpoint(metric=bleu)
        patience = self.cfg.eval.early_stopping_patience
        if patience and self.state.evals_without_improvement >= patience:
            if self.rank == 0:
                log.info("early stopping at step %d: no BLEU improvement in %d evaluations", step, patience)
            return True
        return False
