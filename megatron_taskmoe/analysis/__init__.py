"""Analyses of trained models: per-task routing statistics and their picture (`routing.py`), task similarity from
routing, its clustering and the within/across language-family summary (`similarity.py`); and of training runs: the
statistics of the routing telemetry records (`telemetry.py`) and their pictures over training steps
(`telemetry_plots.py`)."""

from megatron_taskmoe.analysis.routing import (LayerRouting, RoutingStats, bitext_batches, collect_routing_stats,
                                               dataset_batches, plot_routing)
from megatron_taskmoe.analysis.similarity import (DEFAULT_FAMILIES, cluster_tasks, family_overlap, plot_similarity,
                                                  task_similarity)

__all__ = ["DEFAULT_FAMILIES", "LayerRouting", "RoutingStats", "bitext_batches", "cluster_tasks",
           "collect_routing_stats", "dataset_batches", "family_overlap", "plot_routing", "plot_similarity",
           "task_similarity"]
