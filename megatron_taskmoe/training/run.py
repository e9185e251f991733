"""Entry point behind `pretrain_mt.py`: config -> checks -> process groups -> Trainer -> clean shutdown.

Exit codes: 0 done (or stopped early / by SIGTERM after a checkpoint), 2 a configuration or data error found
before training (message names the option or file), 3 a non-finite loss with `train.nan_policy=stop`.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

from megatron_taskmoe.config_io import ConfigError, load_config
from megatron_taskmoe.training.config import RunConfig
from megatron_taskmoe.training.setup import load_corpus, resolve_model_config, world_size_from_env

log = logging.getLogger("pretrain_mt")


def _say(message: str) -> None:
    if os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr, flush=True)


def run(config_path: str, overrides: list[str]) -> int:
    try:
        cfg = load_config(RunConfig, config_path, overrides)
        corpus = load_corpus(cfg)
        model_cfg = resolve_model_config(cfg, corpus, world_size_from_env())
    except ConfigError as e:
        _say(f"pretrain_mt.py: configuration error: {e}")
        return 2

    warnings.filterwarnings("ignore", module="megatron")
    logging.getLogger("megatron").setLevel(logging.WARNING)  # its INFO lines list every parameter
    # imported once megatron's warnings are silenced (above): the trainer's imports warn about missing Apex/TE
    from megatron_taskmoe import compat
    from megatron_taskmoe.parallel import groups
    from megatron_taskmoe.training.loop import NonFiniteLossError, Trainer

    compat.apply()
    groups.init_distributed()
    try:
        try:
            trainer = Trainer(cfg, corpus, model_cfg)
        except ConfigError as e:
            _say(f"pretrain_mt.py: configuration error: {e}")
            return 2
        try:
            state = trainer.train()
        except NonFiniteLossError as e:
            _say(f"pretrain_mt.py: {e}")
            return 3
        if os.environ.get("RANK", "0") == "0":
            log.info("finished at step %d (consumed samples %d, best BLEU %s)", state.step,
                     state.consumed_samples, state.best_bleu)
        return 0
    finally:
        groups.destroy()
