"""Fine ranker: CTR and CVR models over regular + interacted features, exported to ONNX.

The service orders candidates by pCTR x pCVR x price, so both outputs are calibrated
probabilities; `train` reports calibration next to AUC.
"""
