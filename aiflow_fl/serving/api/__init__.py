"""``aiflow serve``: an OpenAI-compatible server for a family, with hierarchical speculative decoding.

Modules: :mod:`schemas` (request bodies), :mod:`limits` (context and cap checks), :mod:`sampling`,
:mod:`text` (streamed text and stop strings), :mod:`scheduler` (iteration-level batching, pure),
:mod:`batch` (the padded batch KV cache of one member), :mod:`chains` (chain models),
:mod:`state` (what a process serves), :mod:`app` (FastAPI handlers), :mod:`metrics`, :mod:`main`
(:func:`serve`, :func:`launch`). The tier protocol lives in :mod:`aiflow_fl.serving.server`.
"""

from aiflow_fl.serving.api.main import Launched, launch

__all__ = ["Launched", "launch"]
