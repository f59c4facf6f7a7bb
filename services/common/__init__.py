"""Shared by every pdserve service, one copy of each mechanism, and torch-free (the router imports
it): the gRPC server and its interceptor, ServiceError, request validation, flags, metrics."""
