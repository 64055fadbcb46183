"""gRPC services: translate protobuf to domain calls and domain errors to status codes."""
