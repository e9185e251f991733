"""A pure-PyTorch reference implementation of the trained encoder-decoder, for exported checkpoints.

    from megatron_taskmoe.reference import load, ReferenceTranslator
    exported = load("export_dir")                      # config.json + model.safetensors + tokenizer.model
    ReferenceTranslator(exported, beam_size=4).translate(["In the beginning ..."], "en", "de")

Nothing here imports megatron-core or the trainer (`tools/checkpoint/export.py` writes the directory).
"""

from megatron_taskmoe.reference.config import (FORMAT, FORMAT_VERSION, ExportConfig, ExportFormatError,
                                               parse_config, read_config)
from megatron_taskmoe.reference.model import EncoderOutput, ReferenceDecoder, ReferenceModel
from megatron_taskmoe.reference.translator import Exported, ReferenceTranslator, load, translate

__all__ = ["FORMAT", "FORMAT_VERSION", "ExportConfig", "ExportFormatError", "parse_config", "read_config",
           "EncoderOutput", "ReferenceDecoder", "ReferenceModel", "Exported", "ReferenceTranslator", "load", "translate"]
