"""Online serving: the cascade (onnxruntime + faiss), request validation, the gRPC server and client.

Never imports torch or training code; it reads a verified bundle (recstack.bundle).
"""
