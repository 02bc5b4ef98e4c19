"""A generation engine that keeps every slot busy: continuous batching over a paged KV cache.

`generate` (decoding.py) decodes a static batch: every row holds its slot, and its cache of
P + N slots, until the *last* row stops. Here a fixed number of slots decode together, and a
slot whose request stops is refilled from the queue at the next host check, so a short answer
never waits for a long one. Keys and values live in a pool of pages: a request holds the pages
its prompt and answer need (a page table per slot), not a slot of the longest prompt plus the
longest answer.

- **Prefill** runs in chunks of `prefill_chunk` tokens, `prefill_rows` chunks per call, in calls
  of their own between decode chunks.
- **Shared prefixes are shared pages.** Every full prompt chunk is published under a hash of the
  tokens up to its end; a later request whose prompt starts with the same chunks points its page
  table at those pages and prefills only the rest (a few-shot preamble is computed once per
  stage, not once per batch). Unreferenced chunks stay cached until their pages are needed.
- **Deterministic per request.** Every call has fixed shapes (slots, prefill rows, chunk), the
  attention over pages is blockwise (an all-masked block adds an exact zero), and a request
  samples from `fold_in(fold_in(key(seed), key_id), token index)`: its tokens are the same
  alone, beside any other requests, and with its prefix chunks taken from the cache.

The host loop (`Engine.run`) admits requests first come, first served while a slot and their
pages are free, runs their prefill chunks, decodes `decode_chunk` steps, and yields each
request's `Completion` as it finishes (stop token, stop string or `max_new_tokens`).

Why one module of ~690 lines: the device programs (`_prefill`, `_decode`), the slot state they
carry, the page bookkeeping (`_Pages`) and the host loop share one layout of slots, pages and
chunks; split, each piece would be read only beside the others.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cai_jax.models import decoder as model_lib
from cai_jax.sampling import decoding
from cai_jax.sampling.common import compile_counts, jitted, prepare_prompts, progress_bar

_STOP_SLOTS = 8  # stop-token ids per request, -1 padded


# ---- requests and settings ------------------------------------------------------------------


@dataclasses.dataclass
class Request:
  """One prompt to continue. Its sample is drawn from fold_in(key(seed), key_id), one draw per
  token index, so `key_id=i` with `seed=s` matches row i of `generate(..., seed=s)`'s keys."""

  tokens: Sequence[int]
  max_new_tokens: int
  stop_tokens: Sequence[int] = ()
  stop_strings: Sequence[str] = ()
  seed: int = 0
  key_id: int = 0


@dataclasses.dataclass
class Completion:
  index: int  # the request's position in the list given to `run`
  tokens: list[int]  # new tokens, cut after the stop token / stop string
  logprobs: np.ndarray  # log p(token) under the raw logits
  finish_reason: str  # 'stop' or 'length'
  text: str | None = None  # decoded, stop string / stop token removed (with a tokenizer)


@dataclasses.dataclass(frozen=True)
class EngineConfig:
  """The engine's sizes (see the module docstring). `kv_budget_mib` sizes the page pool; a
  request needs ceil((prompt + max_new_tokens) / page_size) pages, less its shared chunks."""

  max_slots: int = 16  # requests decoding at once
  page_size: int = 16  # KV slots per page
  kv_budget_mib: float = 256.0  # page pool, all layers, keys and values
  prefill_chunk: int = 128  # prompt tokens per prefill row per call (a multiple of page_size)
  prefill_rows: int = 4  # prompt chunks per prefill call
  decode_chunk: int = 16  # decode steps between host checks
  block: int = 128  # attention block over pages (a multiple of page_size)
  max_len: int | None = None  # longest prompt + answer; None: the model's context
  kv_dtype: str | None = None  # page dtype: None = the model's compute dtype, or 'bfloat16',
  # 'float32', 'int8' (a float32 scale per token and head beside it)

  def __post_init__(self):
    for name in ('max_slots', 'page_size', 'prefill_chunk', 'prefill_rows', 'decode_chunk'):
      if int(getattr(self, name)) <= 0:
        raise ValueError(f'engine {name} must be a positive integer, got {getattr(self, name)}')
    for name in ('prefill_chunk', 'block'):
      if getattr(self, name) % self.page_size:
        raise ValueError(
            f'engine {name}={getattr(self, name)} is not a multiple of page_size={self.page_size}'
        )
    if self.kv_dtype not in (None, 'float32', 'bfloat16', 'int8'):
      raise ValueError(
          f"engine kv_dtype={self.kv_dtype!r}; valid: None, 'float32', 'bfloat16', 'int8'"
      )
    if not self.kv_budget_mib > 0:
      raise ValueError(f'engine kv_budget_mib must be positive, got {self.kv_budget_mib}')


def engine_config(config) -> EngineConfig | None:
  """The EngineConfig a run config asks for (`config.sampling.engine*`, prompts + answers of up
  to `config.model.max_len` tokens); None when `config.sampling.engine` is off."""
  cfg, max_len = config.sampling, config.model.max_len
  if not cfg.engine:
    return None
  chunk = cfg.engine_prefill_chunk
  if chunk % cfg.engine_page_size:
    raise ValueError(
        f'config.sampling.engine_prefill_chunk={chunk} is not a multiple of '
        f'engine_page_size={cfg.engine_page_size}'
    )
  return EngineConfig(
      max_slots=cfg.engine_slots, page_size=cfg.engine_page_size, prefill_chunk=chunk,
      kv_budget_mib=cfg.engine_kv_budget_mib, max_len=max_len, block=chunk,
      kv_dtype=cfg.get('engine_kv_dtype', '') or None,
  )  # fmt: skip


def pool_pages(cfg: model_lib.ModelConfig, config: EngineConfig) -> int:
  """Pages in the pool that `config.kv_budget_mib` buys (page 0 is scratch)."""
  return int(config.kv_budget_mib * 2**20 // page_bytes(cfg, config.page_size, config.kv_dtype))


def table_width(cfg: model_lib.ModelConfig, config: EngineConfig) -> int:
  """Logical slots of every page table: max_len (or the model's context) in whole attention
  blocks, so every call has the same shapes whatever the requests (a pass reads only the blocks
  its longest row holds)."""
  longest = config.max_len or cfg.max_positions
  return -(-longest // config.block) * config.block


def page_bytes(cfg: model_lib.ModelConfig, page_size: int, dtype=None) -> int:
  """Bytes of one page across layers, keys and values (and int8's scales)."""
  dtype = jnp.dtype(dtype or cfg.dtype)
  per_head = cfg.head_dim * dtype.itemsize + (4 if dtype == jnp.int8 else 0)
  return 2 * cfg.n_layers * page_size * cfg.n_kv_heads * per_head


# ---- device state and programs --------------------------------------------------------------


@flax.struct.dataclass
class SlotState:
  """Per slot: the newest token (fed at the next step) and its position, how many tokens it has
  generated, and whether it is running. The tokens themselves go to the host chunk by chunk."""

  last: jax.Array  # [S] int32
  position: jax.Array  # [S] int32: where `last` goes (= tokens in the cache)
  count: jax.Array  # [S] int32: tokens generated (a stop token counts)
  max_new: jax.Array  # [S] int32
  stop_ids: jax.Array  # [S, _STOP_SLOTS] int32, -1 padded
  keys: jax.Array  # [S] PRNG keys
  running: jax.Array  # [S] bool


def _reads(table, page_size: int):
  """Pool slots [S, M * page_size] of each row's logical slots, from its page table [S, M]."""
  offsets = jnp.arange(page_size, dtype=jnp.int32)
  return (table[:, :, None] * page_size + offsets).reshape(table.shape[0], -1)


def _slot_of(table, position, page_size: int):
  """Pool slot of logical slot `position` [B, T] in page tables [B, M]."""
  page = jnp.take_along_axis(table, position // page_size, axis=1)
  return page * page_size + position % page_size


def _n_blocks(ends, block: int):
  """Attention blocks the longest row needs (the rest are masked for every row)."""
  return (jnp.max(ends) + block - 1) // block


def _prefill(graphdef, strategy, page_size, block, params, pools, state: SlotState, lanes, knobs):
  """One chunk of up to R prompts: writes their keys and values; where a lane holds a prompt's
  last chunk, picks its first token and starts its slot. Returns (pools, state, first token and
  its log-prob per lane)."""
  compile_counts['engine_prefill'] += 1
  model = nnx.merge(graphdef, params)
  tokens, start, valid, table, slot, final, stop_ids, max_new, seed_keys = lanes
  c = tokens.shape[1]
  positions = start[:, None] + jnp.arange(c, dtype=jnp.int32)[None]
  ok = jnp.arange(c)[None] < valid[:, None]
  write = jnp.where(ok, _slot_of(table, jnp.where(ok, positions, 0), page_size), 0)
  read = _reads(table, page_size)
  ends = start + valid
  key_mask = jnp.arange(read.shape[1])[None] < ends[:, None]
  slots = model_lib.PagedSlots(write, read, block, _n_blocks(ends, block))
  hidden, pools = model.hidden(tokens, positions, key_mask, pools, slots)
  last = jnp.take_along_axis(hidden, jnp.maximum(valid - 1, 0)[:, None, None], axis=1)
  logits = model.logits_from_hidden(last)[:, 0]
  step_keys = jax.vmap(jax.random.fold_in, (0, None))(seed_keys, 0)
  first, first_lp = decoding.choose_tokens(
      logits, step_keys, knobs.temperature, knobs.top_p, strategy
  )
  target = jnp.where(final, slot, state.last.shape[0])  # out of range: dropped
  stop = jnp.any(first[:, None] == stop_ids, axis=-1) | (max_new <= 1)

  def put(x, value):
    return x.at[target].set(value, mode='drop')

  state = state.replace(
      last=put(state.last, first),
      position=put(state.position, ends),
      count=put(state.count, jnp.ones_like(first)),
      max_new=put(state.max_new, max_new),
      stop_ids=put(state.stop_ids, stop_ids),
      keys=put(state.keys, seed_keys),
      running=put(state.running, ~stop),
  )
  return pools, state, first, first_lp


def _decode(graphdef, strategy, page_size, block, chunk, params, pools, state: SlotState, table,
            knobs):  # fmt: skip
  """Up to `chunk` decode steps of every running slot (fewer when none runs). Returns (pools,
  state, tokens [S, chunk], log-probs [S, chunk], made [S, chunk]: which slot made a token at
  which step)."""
  compile_counts['engine_decode'] += 1
  model = nnx.merge(graphdef, params)
  read = _reads(table, page_size)
  slots = jnp.arange(read.shape[1], dtype=jnp.int32)[None]
  n = state.last.shape[0]
  out = (jnp.zeros((n, chunk), jnp.int32), jnp.zeros((n, chunk), jnp.float32),
         jnp.zeros((n, chunk), bool))  # fmt: skip

  def cond(carry):
    i, _, s, _ = carry
    return (i < chunk) & jnp.any(s.running)

  def body(carry):
    i, pools, s, (toks, lps, made) = carry
    pos = s.position[:, None]
    write = jnp.where(s.running[:, None], _slot_of(table, pos, page_size), 0)
    paged = model_lib.PagedSlots(
        write, read, block, _n_blocks(jnp.where(s.running, s.position + 1, 0), block)
    )
    logits, pools = model(s.last[:, None], pos, slots <= pos, pools, paged)
    keys = jax.vmap(jax.random.fold_in)(s.keys, s.count)
    tok, lp = decoding.choose_tokens(logits[:, 0], keys, knobs.temperature, knobs.top_p, strategy)
    toks, lps, made = (
        jax.lax.dynamic_update_slice_in_dim(x, y[:, None], i, 1)
        for x, y in ((toks, tok), (lps, lp), (made, s.running))
    )
    count = s.count + s.running
    stop = jnp.any(tok[:, None] == s.stop_ids, axis=-1) | (count >= s.max_new)
    s = s.replace(
        last=jnp.where(s.running, tok, s.last),
        position=s.position + s.running,
        count=count,
        running=s.running & ~stop,
    )
    return i + 1, pools, s, (toks, lps, made)

  steps, pools, state, out = jax.lax.while_loop(cond, body, (jnp.int32(0), pools, state, out))
  return (pools, state) + out + (steps,)


def _stop_running(state: SlotState, stopped):
  return state.replace(running=state.running & ~stopped)


# ---- pages ----------------------------------------------------------------------------------


def _sampling(temperature, top_k, top_p):
  """(static strategy, traced knobs) as `decoding.generate` makes them; stops are per slot."""
  strategy, temperature, top_p = decoding.sampling_settings(temperature, top_k, top_p)
  stop_ids = jnp.zeros((_STOP_SLOTS,), jnp.int32)
  return strategy, decoding.Knobs(temperature, top_p, jnp.int32(0), stop_ids)


class _Pages:
  """Free pages, and published prompt chunks (hash -> pages) with reference counts; chunks no
  request holds are kept, least recently used first out, until their pages are needed."""

  def __init__(self, n_pages: int):
    self.free = list(range(n_pages - 1, 0, -1))  # page 0 is scratch
    self.chunks: dict[bytes, tuple[list[int], int]] = {}
    self.idle: collections.OrderedDict[bytes, None] = collections.OrderedDict()

  def available(self, keep=()) -> int:
    """Pages `take` can hand out: free ones, and those of idle chunks not in `keep`."""
    return len(self.free) + sum(len(self.chunks[h][0]) for h in self.idle if h not in keep)

  def take(self, n: int) -> list[int]:
    while len(self.free) < n and self.idle:
      h, _ = self.idle.popitem(last=False)
      self.free.extend(self.chunks.pop(h)[0])
    if len(self.free) < n:
      raise RuntimeError(f'page pool exhausted: {n} pages wanted, {len(self.free)} free')
    return [self.free.pop() for _ in range(n)]

  def hold(self, h: bytes) -> list[int]:
    pages, refs = self.chunks[h]
    self.chunks[h] = (pages, refs + 1)
    self.idle.pop(h, None)
    return pages

  def publish(self, h: bytes, pages: list[int]) -> None:
    """Pages a request just filled with a full prompt chunk become shared (it holds them)."""
    self.chunks[h] = (pages, 1)

  def release(self, held: list[bytes], own: list[int]) -> None:
    self.free.extend(own)
    for h in held:
      pages, refs = self.chunks[h]
      self.chunks[h] = (pages, refs - 1)
      if refs == 1:
        self.idle[h] = None

  def clear(self) -> None:
    for h in list(self.chunks):
      pages, refs = self.chunks[h]
      if refs == 0:
        self.free.extend(pages)
        del self.chunks[h]
    self.idle.clear()


def _chunk_hashes(tokens: Sequence[int], chunk: int) -> list[bytes]:
  """Hash of tokens[: (j + 1) * chunk] for every full chunk j (a chain, so equal hashes mean
  equal text from the start)."""
  out, h = [], hashlib.sha256()
  for j in range(len(tokens) // chunk):
    h.update(np.asarray(tokens[j * chunk : (j + 1) * chunk], np.int32).tobytes())
    out.append(h.copy().digest())
  return out


@dataclasses.dataclass
class _Active:
  index: int
  request: Request
  slot: int
  table: list[int]  # pages, logical order
  held: list[bytes]  # shared chunks it reads (hashes)
  own: list[int]  # pages it owns (freed at the end); published ones move to `held`
  todo: list[int]  # prompt chunks still to prefill
  stop_ids: np.ndarray
  hashes: list[bytes]  # of its full prompt chunks (`_chunk_hashes`)
  tokens: list[int] = dataclasses.field(default_factory=list)
  logprobs: list[float] = dataclasses.field(default_factory=list)


# ---- the engine -----------------------------------------------------------------------------


class Engine:
  """Continuous batching for one model structure (module docstring).

  `run(requests, params=...)` decodes with the given parameters (PPO passes its current ones:
  no copy, and the prefix cache is emptied, as its keys were computed by other weights).
  """

  def __init__(self, model, config: EngineConfig = EngineConfig(), *, tokenizer=None):
    self.cfg = config
    self.model_cfg: model_lib.ModelConfig = model.cfg
    self.tokenizer = tokenizer
    self.graphdef, self.params = nnx.split(model)
    per_page = page_bytes(self.model_cfg, config.page_size, config.kv_dtype)
    n_pages = pool_pages(self.model_cfg, config)
    if n_pages < 2:
      raise ValueError(
          f'engine kv_budget_mib={config.kv_budget_mib} holds {n_pages} pages of '
          f'{per_page / 2**20:.2f} MiB; at least 2 are needed'
      )
    self.n_pages = n_pages
    self.width = table_width(self.model_cfg, config)
    self.pages = _Pages(n_pages)
    self.pools = model_lib.init_pages(self.model_cfg, n_pages, config.page_size, config.kv_dtype)
    self.stats = collections.Counter()

  @classmethod
  def from_config(cls, model, config, tokenizer) -> Engine | None:
    """The engine of `model` that the run config asks for (None when `sampling.engine` is off)."""
    engine = engine_config(config)
    return None if engine is None else cls(model, engine, tokenizer=tokenizer)

  def clear_prefix_cache(self) -> None:
    self.pages.clear()

  # -- host side --

  def _check(self, requests: Sequence[Request]) -> list[list[int]]:
    prompts, _ = prepare_prompts(
        [r.tokens for r in requests], self.model_cfg.vocab_size, self.model_cfg.max_positions,
        'error',
    )  # fmt: skip
    ps = self.cfg.page_size
    for i, (r, p) in enumerate(zip(requests, prompts)):
      if not isinstance(r.max_new_tokens, (int, np.integer)) or r.max_new_tokens <= 0:
        raise ValueError(f'request {i}: max_new_tokens must be a positive integer')
      limit = min(self.model_cfg.max_positions, self.width)
      if len(p) + r.max_new_tokens > limit:
        raise ValueError(
            f'request {i}: {len(p)} prompt + {r.max_new_tokens} new tokens exceed the limit of '
            f'{limit} (the model context, or the engine max_len)'
        )
      need = -(-(len(p) + r.max_new_tokens) // ps)
      if need > self.n_pages - 1:
        raise ValueError(
            f'request {i} needs {need} pages of {ps} slots; the pool holds {self.n_pages - 1} '
            '(raise kv_budget_mib)'
        )
      if len(r.stop_tokens) > _STOP_SLOTS:
        raise ValueError(f'request {i}: at most {_STOP_SLOTS} stop tokens')
      if any(not 0 <= int(t) < self.model_cfg.vocab_size for t in r.stop_tokens):
        raise ValueError(f'request {i}: stop_tokens must be ids in [0, vocab_size)')
      if r.stop_strings and self.tokenizer is None:
        raise ValueError(f'request {i}: stop_strings need the engine to have a tokenizer')
    return prompts

  def _admit(self, index, request, prompt, slot) -> _Active | None:
    """Pages for `request` (its cached prompt chunks shared), or None if the pool is short."""
    ps, c = self.cfg.page_size, self.cfg.prefill_chunk
    hashes = _chunk_hashes(prompt, c)
    shared = 0
    # A request prefills at least its last prompt token (for its first logits).
    while (
        shared < len(hashes)
        and (shared + 1) * c < len(prompt)
        and hashes[shared] in self.pages.chunks
    ):
      shared += 1
    need = -(-(len(prompt) + request.max_new_tokens) // ps) - shared * (c // ps)
    if need > self.pages.available(keep=hashes[:shared]):
      return None
    held = hashes[:shared]
    table = [p for h in held for p in self.pages.hold(h)]
    own = self.pages.take(need)
    stop_ids = np.full((_STOP_SLOTS,), -1, np.int32)
    stop_ids[: len(request.stop_tokens)] = list(request.stop_tokens)
    n_chunks = -(-len(prompt) // c)
    self.stats['prompt_tokens'] += len(prompt)
    self.stats['prompt_tokens_shared'] += shared * c
    return _Active(index, request, slot, table + own, held, own, list(range(shared, n_chunks)),
                   stop_ids, hashes)  # fmt: skip

  def run(
      self,
      requests: Sequence[Request],
      *,
      temperature: float = 0.0,
      top_k: int | None = None,
      top_p: float | None = None,
      params=None,
      progress=None,
  ) -> Iterator[Completion]:
    """Yields each request's Completion as it finishes (any order; `.index` says whose).

    Sampling as `generate`'s: temperature 0 is greedy; otherwise temperature, top-k, top-p.
    `params` (an nnx.State of the engine's model structure) replaces the weights from now on.
    `progress`: a tqdm-like object, updated once per finished request.
    """
    prompts = self._check(requests)
    strategy, knobs = _sampling(temperature, top_k, top_p)
    if params is not None:
      self.params = params
      self.clear_prefix_cache()
    if not requests:
      return
    cfg, ps = self.cfg, self.cfg.page_size
    s_slots = cfg.max_slots
    state = SlotState(
        last=jnp.zeros((s_slots,), jnp.int32),
        position=jnp.zeros((s_slots,), jnp.int32),
        count=jnp.zeros((s_slots,), jnp.int32),
        max_new=jnp.zeros((s_slots,), jnp.int32),
        stop_ids=jnp.full((s_slots, _STOP_SLOTS), -1, jnp.int32),
        keys=jax.vmap(jax.random.key)(jnp.zeros((s_slots,), jnp.uint32)),
        running=jnp.zeros((s_slots,), bool),
    )
    statics = (self.graphdef, strategy, ps, cfg.block)
    prefill = jitted(_prefill, *statics, donate_argnums=(1, 2))
    decode = jitted(_decode, *statics, cfg.decode_chunk, donate_argnums=(1, 2))
    stop_now = jax.jit(_stop_running, donate_argnums=(0,))

    queue = collections.deque(range(len(requests)))
    active: dict[int, _Active] = {}  # by slot
    table = np.zeros((s_slots, self.width // ps), np.int32)
    while queue or active:
      # Admit first come, first served while a slot and the pages are free.
      new = []
      while queue and len(active) < s_slots:
        slot = next(i for i in range(s_slots) if i not in active)
        a = self._admit(queue[0], requests[queue[0]], prompts[queue[0]], slot)
        if a is None:
          if not active:  # cannot happen: _check sized every request against the empty pool
            raise RuntimeError(f'request {queue[0]} does not fit the empty page pool')
          break  # pages are short: wait for a running request to end
        queue.popleft()
        active[slot] = a
        new.append(a)
      if new:
        self.pools, state = self._prefill_all(prefill, new, prompts, state, knobs)
        for a in new:
          table[a.slot] = 0
          table[a.slot, : len(a.table)] = a.table
      running = np.asarray(jax.device_get(state.running))
      if running.any():
        self.pools, state, toks, lps, made, steps = decode(
            self.params, self.pools, state, jnp.asarray(table), knobs
        )
        toks, lps, made, steps = jax.device_get((toks, lps, made, steps))
        self.stats['decode_calls'] += 1
        self.stats['decode_row_steps'] += int(steps) * s_slots
        for slot, a in active.items():
          a.tokens.extend(toks[slot][made[slot]].tolist())
          a.logprobs.extend(lps[slot][made[slot]].tolist())
        running = np.asarray(jax.device_get(state.running))
      finished, cut_now = [], np.zeros((s_slots,), bool)
      for slot, a in active.items():
        row, cut = a.tokens, None
        if a.request.stop_strings and row:
          text = self.tokenizer.decode(row)
          if decoding.find_stop(text, a.request.stop_strings) >= 0:
            n, text = decoding.cut_at_stop_string(row, self.tokenizer, a.request.stop_strings)
            cut = (n, 'stop', text)
            cut_now[slot] = running[slot]
        if cut is None and not running[slot]:
          stopped = bool(row) and row[-1] in a.stop_ids[a.stop_ids >= 0]
          cut = (len(row), 'stop' if stopped else 'length', None)
        if cut is not None:
          finished.append((slot, cut))
      if cut_now.any():
        state = stop_now(state, jnp.asarray(cut_now))
      for slot, (n, reason, text) in finished:
        a = active.pop(slot)
        self.pages.release(a.held, a.own)
        row = a.tokens[:n]
        self.stats['kept_tokens'] += len(row)
        self.stats['requests'] += 1
        if self.tokenizer is not None and text is None:
          text = self.tokenizer.decode(row[:-1] if reason == 'stop' else row)
        if progress is not None:
          progress.update(1)
        yield Completion(a.index, row, np.asarray(a.logprobs[:n], np.float32), reason, text)

  def _prefill_all(self, prefill, new: list[_Active], prompts, state, knobs):
    """Every new request's prompt chunks in order, up to `r_rows` chunks per call. A full chunk
    that is published by the time a request reaches it is read, not recomputed; one that another
    request is computing in this pass waits for it (the few-shot preamble of a batch of
    critique prompts is computed once)."""
    ps, c, r_rows = self.cfg.page_size, self.cfg.prefill_chunk, self.cfg.prefill_rows
    pools = self.pools
    while any(a.todo for a in new):
      work, claimed = [], set()
      for a in new:
        while a.todo:
          j, hs = a.todo[0], a.hashes
          h = hs[j] if j < len(hs) and len(a.todo) > 1 else None  # never its last chunk
          if h is not None and h in self.pages.chunks:
            a.todo.pop(0)
            self._share(a, j, h)
            continue
          if h is not None and h in claimed:
            break  # another request computes it in this call; read it next time
          if len(work) < r_rows:
            claimed.add(h)
            work.append((a, a.todo.pop(0), h))
          break
      pools, state, first, first_lp = prefill(
          self.params, pools, state, self._lanes(work, prompts), knobs
      )
      self.stats['prefill_calls'] += 1
      first, first_lp = jax.device_get((first, first_lp))
      for i, (a, j, h) in enumerate(work):
        if not a.todo:  # its last chunk: the first token
          a.tokens.append(int(first[i]))
          a.logprobs.append(float(first_lp[i]))
        if h is not None and h not in self.pages.chunks:
          pages = a.table[j * (c // ps) : (j + 1) * (c // ps)]
          for p in pages:
            a.own.remove(p)
          self.pages.publish(h, pages)
          a.held.append(h)
    return pools, state

  def _share(self, a: _Active, j: int, h: bytes) -> None:
    """Request `a` reads published chunk j instead of its own pages for it."""
    c = self.cfg.prefill_chunk // self.cfg.page_size
    mine = a.table[j * c : (j + 1) * c]
    for p in mine:
      a.own.remove(p)
    self.pages.free.extend(mine)
    a.table[j * c : (j + 1) * c] = self.pages.hold(h)
    a.held.append(h)
    self.stats['prompt_tokens_shared'] += self.cfg.prefill_chunk

  def _lanes(self, group, prompts):
    c, r_rows, m = self.cfg.prefill_chunk, self.cfg.prefill_rows, self.width // self.cfg.page_size
    tokens = np.zeros((r_rows, c), np.int32)
    start = np.zeros((r_rows,), np.int32)
    valid = np.zeros((r_rows,), np.int32)
    table = np.zeros((r_rows, m), np.int32)
    slot = np.zeros((r_rows,), np.int32)
    final = np.zeros((r_rows,), bool)
    stop_ids = np.full((r_rows, _STOP_SLOTS), -1, np.int32)
    max_new = np.zeros((r_rows,), np.int32)
    seeds = np.zeros((r_rows,), np.uint32)
    key_ids = np.zeros((r_rows,), np.int32)
    for i, (a, j, _) in enumerate(group):
      piece = prompts[a.index][j * c : (j + 1) * c]
      tokens[i, : len(piece)] = piece
      start[i], valid[i] = j * c, len(piece)
      table[i, : len(a.table)] = a.table
      slot[i], final[i] = a.slot, not a.todo
      stop_ids[i] = a.stop_ids
      max_new[i] = a.request.max_new_tokens
      seeds[i], key_ids[i] = a.request.seed % 2**32, a.request.key_id
    keys = jax.vmap(jax.random.fold_in)(jax.vmap(jax.random.key)(jnp.asarray(seeds)),
                                        jnp.asarray(key_ids))  # fmt: skip
    return tuple(jnp.asarray(x) for x in (tokens, start, valid, table, slot, final, stop_ids,
                                          max_new)) + (keys,)  # fmt: skip

  def utilization(self) -> float:
    """Share of decode row-steps (slots x steps) that produced a kept token, so far."""
    decoded = self.stats['kept_tokens'] - self.stats['requests']  # first tokens: prefill's
    return decoded / max(self.stats['decode_row_steps'], 1)

  def generate_output(
      self,
      prompts: Sequence[Sequence[int]],
      *,
      max_new_tokens: int,
      temperature: float = 0.0,
      top_k: int | None = None,
      top_p: float | None = None,
      stop_strings: Sequence[str] = (),
      seed: int = 0,
      progress: bool = False,
      params=None,
  ) -> decoding.GenerateOutput:
    """`decoding.generate_batched`'s output for the same arguments: the model's and tokenizer's
    end tokens and `stop_strings` stop a row, and row i samples from the same keys. `params`
    as `run`'s (PPO's current policy)."""
    stop_ids, stop_texts = decoding.stops(self.model_cfg, self.tokenizer, None, stop_strings)
    requests = [
        Request(p, max_new_tokens, stop_ids, stop_texts, seed=seed, key_id=i)
        for i, p in enumerate(prompts)
    ]
    bar = progress_bar(progress, len(requests))
    try:
      done = self.generate(
          requests,
          temperature=temperature,
          top_k=top_k,
          top_p=top_p,
          params=params,
          progress=bar,
      )
    finally:
      if bar is not None:
        bar.close()
    return decoding.GenerateOutput(
        [d.tokens for d in done],
        [d.logprobs for d in done],
        [d.finish_reason for d in done],
        None if self.tokenizer is None else [d.text for d in done],
        [0] * len(done),
    )

  def generate(self, requests: Sequence[Request], **kw) -> list[Completion]:
    """`run`'s completions in request order."""
    out: list[Any] = [None] * len(requests)
    for done in self.run(requests, **kw):
      out[done.index] = done
    return out


def engine_summary(engine: Engine | None) -> dict:
  """A stage summary's engine fields ({} for static batches): this run's slot utilization (the
  share of decode row-steps that produced a kept token) and the prompt tokens it read from shared
  pages instead of computing them."""
  if engine is None:
    return {}
  return dict(
      engine_utilization=round(engine.utilization(), 4),
      engine_prompt_tokens_shared=engine.stats['prompt_tokens_shared'],
  )
