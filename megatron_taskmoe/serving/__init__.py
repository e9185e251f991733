"""Serving trained models outside the trainer: dense (sub-)networks exported to CTranslate2.

    from megatron_taskmoe.serving import Ct2Translator, export_ctranslate2
    export_ctranslate2("RUN/checkpoints", "ct2_de", target_langs=["de"], quantization="int8", verify=True)
    Ct2Translator("ct2_de", beam_size=4).translate(["In the beginning ..."], "en", "de")

`dense.py` turns a task-routed MoE model into the dense Transformer that serves fixed directions (pure maths,
torch only); `ctranslate2_export.py` fills CTranslate2's TransformerSpec from it; `ctranslate2_translator.py`
translates with the result and checks it against the reference model; `export.py` orchestrates. The CTranslate2
modules need the optional `ctranslate2` package (`pip install -e '.[serve]'`), imported only when they are.
"""

from megatron_taskmoe.serving.dense import NotDenseError, densify, refusals

__all__ = ["NotDenseError", "densify", "refusals", "Ct2Translator", "export_ctranslate2", "ExportVerificationError"]


def __getattr__(name):
    if name == "Ct2Translator":
        from megatron_taskmoe.serving.ctranslate2_translator import Ct2Translator  # optional dependency: ctranslate2

        return Ct2Translator
    if name in ("export_ctranslate2", "ExportVerificationError"):
        from megatron_taskmoe.serving import export  # optional dependency: ctranslate2

        return getattr(export, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
