"""Generated V2 gRPC messages and service stubs (see README.md here; `make protos`)."""
