"""The ``gristmill`` command line (talks to the services only over gRPC, through ``gristmill.client``)."""
