"""The V2 gRPC transport: Triton's ``inference.GRPCInferenceService`` over the same inference service."""
