"""Analyses of trained models: per-task routing statistics and their picture (`routing.py`)."""

from megatron_taskmoe.analysis.routing import (LayerRouting, RoutingStats, bitext_batches, collect_routing_stats,
                                               dataset_batches, plot_routing)

__all__ = ["LayerRouting", "RoutingStats", "bitext_batches", "collect_routing_stats", "dataset_batches",
           "plot_routing"]
