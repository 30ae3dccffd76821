"""The Gristmill Python SDK: typed clients for every service, usable from scripts and notebooks.

    from gristmill.api.labeling.v1 import labeling_pb2
    from gristmill.api.registry.v1 import registry_pb2
    from gristmill.client import ClientOptions, Endpoints, Gristmill, NotFoundError

    options = ClientOptions(api_key="gmk_...")  # a key's secret, as `gristmill keys create` prints it
    with Gristmill(Endpoints(), options) as gm:  # Endpoints(): each service's default port on 127.0.0.1
        project = gm.labeling.CreateProject(labeling_pb2.CreateProjectRequest(display_name="Reviews", ...))
        try:
            gm.registry.GetModelVersion(registry_pb2.GetModelVersionRequest(registered_model_name="sentiment"))
        except NotFoundError as err:
            print(err)

Each attribute (``labeling``, ``training``, ``registry``, ``serving``, ``inference``, ``admin``,
``metering``) is the generated, fully typed stub of that API on a channel that adds, to every call: the API
key (``authorization: Bearer``), a default deadline, retries with exponential backoff on UNAVAILABLE, the
caller's trace context, and errors re-raised as ``gristmill.core.errors`` classes by status code
(``NotFoundError``, ``InvalidArgumentError``, ...), all of which are ``GristmillError``.
"""

from gristmill.client.channel import ClientOptions, open_channel
from gristmill.client.sdk import Endpoints, Gristmill
from gristmill.core.errors import (
    AbortedError,
    AlreadyExistsError,
    DeadlineExceededError,
    FailedPreconditionError,
    GristmillError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)

__all__ = [
    "AbortedError",
    "AlreadyExistsError",
    "ClientOptions",
    "DeadlineExceededError",
    "Endpoints",
    "FailedPreconditionError",
    "Gristmill",
    "GristmillError",
    "InvalidArgumentError",
    "NotFoundError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "UnauthenticatedError",
    "UnavailableError",
    "open_channel",
]
