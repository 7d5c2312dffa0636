"""The V2 gRPC transport: Triton's ``inference.GRPCInferenceService``, same service beneath."""
