"""Datasets on disk and a producer that writes them to Kafka (development and benchmarks)."""
