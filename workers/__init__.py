"""Kafka sources, Ray Train workers, models and dataset readers: everything with I/O around cicw/."""
