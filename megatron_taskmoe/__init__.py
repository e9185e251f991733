"""megatron-taskmoe: task-based Mixture-of-Experts for multitask multilingual machine translation.

A Megatron-core trainer for one model over many language pairs, with task information in the MoE routing
(Pham et al. 2023, Kudugunta et al. 2021). See README.md.
"""

__version__ = "0.1.0"
