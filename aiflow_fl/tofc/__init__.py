"""Task-oriented feature compression (TOFC, paper §II-B1; arXiv 2503.12926) for device-edge VQA.

Device: EfficientNet-Lite0 tokens → DPC-KNN merge (:mod:`.merge`) → hyperprior entropy model with
routed experts (:mod:`.entropy`) → a range-coded bitstream (:mod:`.bitstream`). Edge: decode →
projector into a language member's embedding space → the answer.
"""
