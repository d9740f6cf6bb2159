"""Prometheus exposition: the collector over the pipeline state and the per-rank text writer."""
