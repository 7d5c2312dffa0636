"""KServe's ``grpc_predict_v2.proto`` (Apache-2.0, kserve/kserve ``python/kserve/kserve/
protocol/grpc/``) and a client built from it, for the wire-compatibility test."""
