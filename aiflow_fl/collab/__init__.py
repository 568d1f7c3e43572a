"""Device-server collaboration for inference-time emergence (paper §IV-A; see ``protocol.py``).

``router`` (step 1, MiniLM embeddings of specialist descriptions), ``protocol`` (fan out, synthesize,
broadcast and revise), ``fusion`` (token-level fusion of members' next-token distributions),
``agents`` (the transport seam: in-process or one process per member), ``specialists`` (one per edge
of a hierarchical run, saved with it), ``session`` (assembling it all from a run folder).
"""
