"""The labeling rules. Imports no gRPC, Kafka, MinIO or SQLAlchemy."""
