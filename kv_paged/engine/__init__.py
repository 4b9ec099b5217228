"""kv_paged.Engine and what it serves with: continuous batching over one paged KV pool.

engine.py (the public Engine), scheduler.py (queues, admission, preemption, the BlockManager's
only caller), step.py (forward + sampling of one batch), request.py (requests, sequences,
batches), inputs.py, sampling.py, outputs.py, metrics.py, model_runner.py.
"""

from kv_paged.beam_search import BeamSearchParams
from kv_paged.engine.engine import Engine
from kv_paged.engine.outputs import CompletionOutput, RequestOutput
from kv_paged.engine.sampling import SamplingParams

__all__ = ["BeamSearchParams", "CompletionOutput", "Engine", "RequestOutput", "SamplingParams"]
