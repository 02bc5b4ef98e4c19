"""The full config tree: global fields here, one sub-config per stage from configs/stages/.

`variant` is 'tiny' (random model, seconds), 'demo' (SmolLM2 on CPU, minutes) or 'full'
(paper-scale settings for accelerators). Named configs override a few fields on top.
"""

import importlib

import ml_collections

from cai_jax.utils import sharding

STAGE_CONFIGS = (
    'data',
    'prompt_generation',
    'critique_revision',
    'sft',
    'feedback',
    'evaluate_feedback',
    'preference',
    'ppo',
    'dpo',
    'evaluation_pm',
    'harmfulness',
    'evaluate',
)


def get_config(variant: str = 'demo') -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.variant = variant  # which preset the stage defaults below come from: tiny | demo | full
  c.seed = 0  # global seed: model init (random models), data shuffles, sampling, principle draws
  # Stages to run, comma-separated, in pipeline order (the table: cai_jax/pipeline.py).
  # tiny and demo add dpo, so that evaluate compares four models.
  # full begins with prompt_generation (the paper trains on generated prompts as well).
  c.stages = (
      ('prompt_generation,' if variant == 'full' else '')
      + ('critique_revision,sft,feedback,preference,ppo,')
      + (
          'evaluation_pm,harmfulness,evaluate'
          if variant == 'full'
          else 'dpo,evaluation_pm,harmfulness,evaluate'
      )
  )
  c.force = ''  # comma-separated stages to redo (each redoes everything after it too)
  c.compilation_cache_dir = (
      '~/.cache/cai_jax/xla'  # persistent XLA compile cache ('' = off): reruns skip compiles
  )
  c.conversation_format = 'transcript'  # 'transcript' (paper: Human:/Assistant:) | 'chat_template'
  c.constitution = 'default'  # 'default' | 'tiny' | path to our JSON | dir of the paper's release

  c.model = ml_collections.ConfigDict()
  # The two given models (Bai et al. 2022): `pretrained_source` is fine-tuned by sft, is the
  # feedback model and the PM's initialization; `helpful_source` writes the initial responses,
  # critiques, revisions and helpful samples. `source` is the shorthand that fills both where ''.
  c.model.source = 'smollm2-135m'  # HF dir | .gguf | 'smollm2-135m' | 'random:<preset>'
  c.model.pretrained_source = ''  # the pretrained model (SFT init, feedback, PM init); '' = source
  c.model.helpful_source = ''  # the helpful model (responses, critiques, revisions); '' = source
  c.model.dtype = 'float32'  # compute dtype (activations, matmuls): float32 | bfloat16
  # Trained models' (SFT policy, PM, PPO policy and value) parameters and AdamW moments: keep
  # float32 master weights; bfloat16 drops most small updates (a warning says so).
  c.model.param_dtype = 'float32'
  # Frozen models' parameters (PPO's reference and PM, the feedback, sampling and judge models):
  # '' = model.param_dtype; 'bfloat16' halves their memory at no cost to training.
  c.model.frozen_param_dtype = ''
  # Frozen models' matrices (the feedback, sampling, judge and PPO's PM models, and a LoRA run's
  # base): '' = as frozen_param_dtype | 'int8' = weight-only int8, one float32 scale per output
  # channel (cai_jax/models/quantize.py): half of bfloat16's memory. PPO's and DPO's references
  # without LoRA stay in frozen_param_dtype (they are cast copies of the trained policy).
  c.model.frozen_quantization = ''
  # Rematerialization per decoder layer in differentiated passes: 'none' (keep all activations),
  # 'full' (keep each layer's input, recompute the rest: ~+33% FLOPs) or 'dots' (keep matmul outputs).
  c.model.remat = 'none'
  # Attention of every pass but decoding (cai_jax/models/attention.py): 'auto' = splash on TPU,
  # cuDNN on GPU (blockwise for soft-capped Gemma 2), blockwise on CPU | dense | blockwise | splash
  # | cudnn.
  c.model.attention = 'auto'
  # Longest token sequence any stage builds (prompt + response). `full`: 4096, so that the paper's
  # release few-shots (~2,000 tokens in a revision prompt, ~2,200 in a CoT feedback prompt with
  # SmolLM2's tokenizer) fit beside a conversation and 256 new tokens; a stage refuses a max_len
  # that cannot hold its few-shots. The TPU configs keep 2048 with our shorter default constitution.
  c.model.max_len = 4096 if variant == 'full' else 2048
  # LoRA (cai_jax/models/lora.py): every stage that trains (sft, preference, evaluation_pm, ppo's
  # policy and value, dpo, harmfulness) trains float32 adapters (and a PM's or value's scalar
  # head) on a base frozen in frozen_param_dtype; PPO's and DPO's references are the base itself.
  # Exports are merged HF weights plus the adapters alone in PEFT's layout (export/adapter/).
  c.model.lora = ml_collections.ConfigDict()
  c.model.lora.rank = 0  # 0 = off (full fine-tuning); > 0 = the adapters' rank
  c.model.lora.alpha = 16.0  # adapters are scaled by alpha / rank
  # Share of each adapter's inputs dropped in training steps (PEFT's lora_dropout; sampling,
  # scoring and PPO's/DPO's reference never drop). Masks follow (seed, step): a resume repeats them.
  c.model.lora.dropout = 0.0
  # Projections with adapters: any of q k v o (attention) and gate up down (MLP).
  c.model.lora.targets = ('q', 'k', 'v', 'o', 'gate', 'up', 'down')
  c.model.architecture = (
      ''  # ModelConfig preset matching source ('gemma2_2b', ...); only for memory checks
  )

  # Prefix reuse (cai_jax/sampling/prefix.py): prompts that open with the same text (few-shots)
  # prefill it once and read one copy of its keys/values; results are unchanged.
  c.sampling = ml_collections.ConfigDict()
  c.sampling.prefix_reuse = True  # False: every row prefills its whole prompt
  # Each stage's cache of prefix keys/values, in token slots (2 x layers x kv_heads x head_dim x
  # dtype bytes each: 46 KB for SmolLM2 in float32, 57 KB for Qwen2.5-7B in bfloat16).
  c.sampling.prefix_cache_tokens = 8192
  c.sampling.min_prefix_tokens = 64  # shorter shared prefixes take the plain path
  c.sampling.prefix_block = 64  # a shared prefix is cut to a multiple of this (batches agree on it)
  # Every stage that samples (critique_revision, feedback's pairs and chains of thought, PPO's
  # rollouts, evaluate) uses the continuous-batching engine (cai_jax/sampling/engine.py: a slot is
  # refilled as soon as its request ends; keys and values live in pages, shared prompt chunks are
  # shared pages) instead of static batches. Off by default: on CPU it is slower (measurements.md).
  c.sampling.engine = False
  c.sampling.engine_slots = 16  # requests decoding at once
  c.sampling.engine_page_size = 16  # KV slots per page
  c.sampling.engine_prefill_chunk = 128  # prompt tokens per prefill call and row; the sharing grain
  c.sampling.engine_kv_budget_mib = 1024.0  # the page pool, keys and values of all layers
  c.sampling.engine_kv_dtype = ''  # pages: '' = the model's dtype, 'bfloat16', 'float32', 'int8'

  c.tpu_topology = ''  # TPU slice for `python -m cai_jax.aot` (e.g. 'v5e:2x4'); '' = none
  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (1, -1, 1)  # sizes of mesh axes ('data', 'fsdp', 'tensor'); one -1 = the rest
  c.logical_axis_rules = sharding.DEFAULT_RULES  # logical axis name -> mesh axis (or axes / None)

  c.distributed = ml_collections.ConfigDict()
  c.distributed.enabled = False  # call jax.distributed.initialize (multi-host / multi-process)
  c.distributed.coordinator_address = ''  # host:port of process 0; '' = from the TPU environment
  c.distributed.num_processes = -1  # -1 = from the environment
  c.distributed.process_id = -1  # -1 = from the environment
  c.distributed.local_device_ids = ()  # restrict this process to these local devices; () = all

  for name in STAGE_CONFIGS:
    module = importlib.import_module(f'configs.stages.{name}')
    setattr(c, name, module.get_config(variant))
  return c
