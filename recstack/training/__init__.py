"""Training support shared by the stages: the one resumable loop (`loop`), checkpoints and the
training state behind `--resume` (`checkpoint`), DDP over torchrun (`distributed`), the
distillation losses of PFD (`distill`), SEAD's selectors (`sead`) and ONNX export with its
parity check (`onnx`)."""
