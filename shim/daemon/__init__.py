"""The shim daemon (``serve``) and its edge: the task and sandbox API services, their ttrpc and
gRPC transports, the event forwarder; its resources on one AsyncExitStack."""
