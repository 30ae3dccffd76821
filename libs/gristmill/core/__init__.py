"""Gristmill core runtime shared by every service.

Modules (import the one you need; nothing here imports a service):

- ``settings``   pydantic-settings base classes, read once in ``__main__``
- ``errors``     the exception family; each class knows its gRPC status
- ``ids``        validated identifiers (the only strings allowed into object keys and topics)
- ``sql``        SQLAlchemy engine/session helpers (SQLite default, PostgreSQL by URL)
- ``grpcserver`` aio gRPC server bootstrap: health, reflection, interceptors, graceful shutdown
- ``telemetry``  OpenTelemetry tracer setup and context propagation helpers
- ``metrics``    Prometheus metrics per service, exposed on a metrics port
- ``events``     event bus interface, in-process and Kafka implementations, outbox, dead letters
- ``storage``    object store interface, local-disk and S3 implementations, checksums
"""
