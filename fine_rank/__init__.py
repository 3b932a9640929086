"""Fine ranker: CTR and CVR models over regular + interacted features, exported to ONNX.

The service orders candidates by pCTR x pCVR x price, so both outputs are calibrated
probabilities; `train` reports calibration next to AUC. Training methods (PFD teachers for
CVR, the MTL baseline, SEAD's auxiliary head, SEAD's signal-loss variant) are `train.Config`
fields; `experiments.run` produces the reports of PFD Table 4/6 and SEAD Tables 1/2. Only the
plain student `model.Ranker` is ever exported.
"""
