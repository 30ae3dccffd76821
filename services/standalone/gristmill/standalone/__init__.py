"""Embedded mode: the one place that imports all four services, to host them together in one process.

Each service keeps its own gRPC port, its own SQLite file and its own consumers; they share one data
directory (so one local object store) and one in-process event bus. Nothing to install but Python
packages: no Kafka, no S3 server (training still runs its jobs on a local Ray, whose workers are processes).
"""
