"""Batched generation and scoring: the engine every CAI stage samples and scores with.

`generate` left-pads prompts into bucketed shapes, runs one jitted prefill and a jitted
`lax.while_loop` decode (state donated, params passed as arguments), and stops each row on its
own at a stop token, a stop string or `max_new_tokens`. `score` gives log-probs of given
continuations. `generate_batched` feeds long prompt lists through in batches with a progress
bar; `generate_responses` takes conversations or rendered prompts and returns stripped replies,
so stages never see padding or buckets. `Engine` (with `config.sampling.engine`) samples the
same requests by continuous batching over a paged KV cache instead.
"""

from cai_jax.sampling.common import batch_bucket, compile_counts, length_bucket
from cai_jax.sampling.decoding import (
    STOP_CHUNK,
    DecodeState,
    GenerateOutput,
    Response,
    choose_tokens,
    generate,
    generate_batched,
    generate_responses,
)
from cai_jax.sampling.engine import Engine, EngineConfig, Request, engine_summary
from cai_jax.sampling.prefix import PrefixCache
from cai_jax.sampling.scoring import ScoreOutput, score, score_options

__all__ = [
    'STOP_CHUNK',
    'DecodeState',
    'Engine',
    'EngineConfig',
    'GenerateOutput',
    'PrefixCache',
    'Request',
    'Response',
    'ScoreOutput',
    'batch_bucket',
    'choose_tokens',
    'compile_counts',
    'engine_summary',
    'generate',
    'generate_batched',
    'generate_responses',
    'length_bucket',
    'score',
    'score_options',
]
