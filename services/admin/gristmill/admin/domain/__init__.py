"""The admin service's rules; imports no grpc, kafka, minio or SQLAlchemy."""
