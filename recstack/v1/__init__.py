"""Generated protobuf / gRPC code for recstack.v1 (see protos/; regenerate with tools/gen_protos.py)."""
