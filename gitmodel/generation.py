"""Batched caption generation for GIT: encode each image once, prefill once, then one query per step.

Phases, as gpt-fast names them: `prefill` (image tokens, then the text prompt, into a preallocated
KV cache), `decode_one_token`, and the search loops (`greedy_or_sample`, `beam_search`). Greedy and
beam search follow transformers' algorithms step for step, so they choose the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch

from gitmodel.kv_cache import DecodeShape, KVCache
from gitmodel.modeling import text_attention_mask, text_positions

if TYPE_CHECKING:
    from gitmodel.cuda_graphs import ShapeGraphs
    from gitmodel.modeling import GitForCausalLM

# transformers' "minus infinity" for beam bookkeeping; the same constant keeps ties identical.
_NEG = -1.0e9
# With no length set anywhere, transformers generates 20 new tokens.
_DEFAULT_NEW_TOKENS = 20


@dataclass
class GenerateOutput:
    """Token ids laid out as transformers returns them (prompt first), and each sequence's mean token log-prob."""

    sequences: torch.Tensor
    scores: torch.Tensor


@dataclass
class _Prompt:
    """The text prompt, one row per generated sequence, and the cache it was prefilled into."""

    ids: torch.Tensor
    cache: KVCache
    key_mask: torch.Tensor | None  # (rows, 1, 1, cache positions): False at left padding; None if unpadded
    num_image_tokens: int
    next_position: torch.Tensor  # text position of the next token, per row
    text_start: torch.Tensor  # column of each row's first prompt token, after its left padding
    first_logits: torch.Tensor | None = None  # next-token logits at the end of the prompt

    @property
    def length(self) -> int:
        return self.ids.shape[1]

    def cache_position(self, step: int) -> int:
        return self.num_image_tokens + self.length + step

    def keep_rows(self, keep: torch.Tensor) -> None:
        self.cache.select_rows(keep)
        if self.key_mask is not None:
            self.key_mask = self.key_mask[keep]


@torch.inference_mode()
def generate(
    model: GitForCausalLM,
    pixel_values: torch.Tensor,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int | None = None,
    max_length: int | None = None,
    num_beams: int | None = None,
    length_penalty: float | None = None,
    early_stopping: bool | str | None = None,
    do_sample: bool | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    num_return_sequences: int | None = None,
    repetition_penalty: float | None = None,
    no_repeat_ngram_size: int | None = None,
    min_length: int | None = None,
    min_new_tokens: int | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    seed: int | Sequence[int] | torch.Tensor | None = None,
    return_dict: bool = False,
) -> torch.Tensor | GenerateOutput:
    """Generate captions for `pixel_values` (B, 3, S, S) or videos (B, frames, 3, S, S).

    `input_ids` is an optional prompt ([CLS] + question tokens, no [SEP], left-padded); without it each
    row starts from [CLS]. Unset arguments come from `model.generation_config`, as in transformers.
    Sampling draws from a counter-based generator keyed by `seed` (one int, or one per image), so a
    row's sample depends on its own seed only — not on the batch it happens to share.
    `repetition_penalty`, `no_repeat_ngram_size`, `min_length` and `min_new_tokens` act as transformers'
    logits processors of the same names; other settings of a generation_config.json that would change
    transformers' tokens are refused, naming them.
    Returns token ids (B * num_return_sequences, prompt + generated), finished rows padded; with
    `return_dict=True`, a `GenerateOutput` that also holds each sequence's mean token log-probability
    (under the distribution the search chose from: after those processors, before temperature,
    top-k and top-p, as transformers' beam scores are).
    """
    defaults = model.generation_config
    num_beams = num_beams or defaults.num_beams
    do_sample = defaults.do_sample if do_sample is None else do_sample
    num_return_sequences = num_return_sequences or defaults.num_return_sequences
    eos_ids = _as_list(defaults.eos_token_id if eos_token_id is None else eos_token_id)
    pad = defaults.pad_token_id if pad_token_id is None else pad_token_id
    defaults.check_supported(do_sample)
    rules = _LogitsRules(
        defaults.repetition_penalty if repetition_penalty is None else repetition_penalty,
        defaults.no_repeat_ngram_size if no_repeat_ngram_size is None else no_repeat_ngram_size,
        defaults.min_length if min_length is None else min_length,
        (defaults.min_new_tokens if min_new_tokens is None else min_new_tokens) or 0,
        tuple(eos_ids),
    )

    batch = pixel_values.shape[0]
    device = model.device
    if input_ids is None:
        input_ids = torch.full((batch, 1), defaults.bos_token_id, dtype=torch.long, device=device)
    input_ids = input_ids.to(device)
    if attention_mask is None:
        attention_mask = (input_ids != pad).long() if (input_ids == pad).any() else torch.ones_like(input_ids)
    attention_mask = attention_mask.to(device)
    if input_ids.shape[0] != batch:
        raise ValueError(f"{input_ids.shape[0]} prompts for {batch} images")
    max_new_tokens = max_new_tokens or defaults.max_new_tokens
    if max_new_tokens is None:
        max_length = max_length or defaults.max_length
        max_new_tokens = max_length - input_ids.shape[1] if max_length else _DEFAULT_NEW_TOKENS
        if max_new_tokens < 1:
            raise ValueError(f"the prompt is already max_length ({max_length}) long; pass max_new_tokens")
    # Every token but the last generated one is fed back at the next text position.
    positions = input_ids.shape[1] + max_new_tokens - 1
    if positions > model.config.max_position_embeddings:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} after a {input_ids.shape[1]}-token prompt needs {positions} text "
            f"positions, but this model has {model.config.max_position_embeddings} (max_position_embeddings)"
        )
    if num_beams > 1 and do_sample:
        raise ValueError("beam sampling (num_beams > 1 with do_sample=True) is not supported; choose one")
    if num_beams > 1 and num_return_sequences > num_beams:
        raise ValueError(f"num_return_sequences ({num_return_sequences}) cannot exceed num_beams ({num_beams})")
    if num_beams == 1 and not do_sample and num_return_sequences > 1:
        raise ValueError("greedy search returns one sequence per image: use sampling or beam search for more")

    rows_per_image = num_beams if num_beams > 1 else num_return_sequences
    prompt = prefill(model, pixel_values.to(device), input_ids, attention_mask, rows_per_image, max_new_tokens)

    if num_beams > 1:
        sequences, scores = beam_search(
            model, prompt, batch, num_beams, max_new_tokens, eos_ids, pad, rules,
            length_penalty=defaults.length_penalty if length_penalty is None else length_penalty,
            early_stopping=defaults.early_stopping if early_stopping is None else early_stopping,
            num_return_sequences=num_return_sequences,
        )
    else:
        sampler = None
        if do_sample:
            sampler = _Sampler(
                _row_seeds(seed, batch, rows_per_image, device),
                defaults.temperature if temperature is None else temperature,
                defaults.top_k if top_k is None else top_k,
                defaults.top_p if top_p is None else top_p,
            )
        sequences, scores = greedy_or_sample(model, prompt, max_new_tokens, pad, sampler, rules)
    return GenerateOutput(sequences, scores) if return_dict else sequences


@torch.inference_mode()
def prefill(
    model: GitForCausalLM,
    pixel_values: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    rows_per_image: int,
    max_new_tokens: int,
) -> _Prompt:
    """Encode the images once, run the decoder over their tokens once, then over the prompt of every row."""
    git = model.git
    config = model.config
    ids = input_ids.repeat_interleave(rows_per_image, dim=0)
    mask = attention_mask.repeat_interleave(rows_per_image, dim=0)
    padded = bool((mask == 0).any())  # a host sync: done before the GPU has work queued
    image = git.encode_image(pixel_values.to(model.dtype))
    num_image_tokens = image.shape[1]
    shape = DecodeShape(
        config.num_hidden_layers, ids.shape[0], config.num_attention_heads,
        num_image_tokens + ids.shape[1] + max_new_tokens, config.hidden_size // config.num_attention_heads,
        num_image_tokens + ids.shape[1], padded, image.dtype, image.device,
    )
    cache, key_mask = model.decode_graphs.buffers(shape) if _graphs_active(model, image.device) else shape.allocate()
    if key_mask is not None:
        # Decode steps attend to every image token, the prompt's real tokens, and all generated tokens.
        key_mask.fill_(True)
        key_mask[:, 0, 0, num_image_tokens : num_image_tokens + ids.shape[1]] = mask.bool()

    # Image tokens never attend to text, so their keys and values do not depend on the prompt and
    # are computed without any mask, once per image rather than once per beam or sample.
    git.encoder.prefill_image(image, cache)
    prompt = _Prompt(ids, cache, key_mask, num_image_tokens, mask.sum(-1), (mask != 0).int().argmax(dim=-1))
    if ids.shape[1] == 1:
        # A one-token prompt ([CLS]) is a decode step at text position 0 (replayed from a CUDA graph too).
        prompt.first_logits = decode_one_token(model, prompt, ids[:, 0], torch.zeros_like(ids[:, 0]), step=-1)
    else:
        text = git.embeddings(ids, text_positions(mask))
        hidden = git.encoder(text, text_attention_mask(num_image_tokens, mask), cache, start=num_image_tokens)
        prompt.first_logits = model.output(hidden[:, -1])
    return prompt


def decode_one_token(
    model: GitForCausalLM, prompt: _Prompt, tokens: torch.Tensor, positions: torch.Tensor, step: int
) -> torch.Tensor:
    """Logits for the next token of every row, given this step's tokens (rows,)."""
    graphs = _step_graphs(model, prompt)
    if graphs is None:
        return decode_one_token_eager(model, prompt, tokens, positions, step)
    static = graphs.static("decode inputs", lambda: (torch.empty_like(tokens), torch.empty_like(positions)))
    static[0].copy_(tokens)
    static[1].copy_(positions)
    return graphs.run(("decode", step), lambda: decode_one_token_eager(model, prompt, *static, step))


def _step_graphs(model: GitForCausalLM, prompt: _Prompt) -> ShapeGraphs | None:
    """The CUDA graphs over this prompt's cache, when the model uses graphs and the cache is theirs."""
    if not _graphs_active(model, prompt.ids.device):
        return None
    return model.decode_graphs.owning(prompt.cache)


def _graphs_active(model: GitForCausalLM, device: torch.device) -> bool:
    return getattr(model, "decode_graphs", None) is not None and device.type == "cuda"


def decode_one_token_eager(
    model: GitForCausalLM, prompt: _Prompt, tokens: torch.Tensor, positions: torch.Tensor, step: int
) -> torch.Tensor:
    git = model.git
    start = prompt.cache_position(step)
    # Without left padding a single query may see every cached key: no mask, the fastest kernels.
    mask = prompt.key_mask[..., : start + 1] if prompt.key_mask is not None else None
    hidden = git.encoder(git.embeddings(tokens[:, None], positions[:, None]), mask, prompt.cache, start=start)
    return model.output(hidden[:, -1])


class _GreedyState:
    """What greedy search and sampling keep per row, one column per generated token.

    A step reads the tokens before `step` and whether rows run at `step`, and writes token `step` and
    whether rows run at `step + 1` only, so running a step twice is the same as running it once, as a
    CUDA graph capture needs.
    `active` maps the rows still in the cache to rows here (all of them, unless finished rows
    were dropped from the cache).
    """

    def __init__(self, prompt: _Prompt, max_new_tokens: int):
        rows, device = prompt.ids.shape[0], prompt.ids.device
        self.first_logits = torch.empty_like(prompt.first_logits)
        self.prompt_ids = torch.empty_like(prompt.ids)
        self.text_start = torch.empty_like(prompt.text_start)
        self.start_positions = torch.empty(rows, dtype=torch.long, device=device)
        self.seeds = torch.zeros(rows, dtype=torch.long, device=device)
        self.active = torch.arange(rows, device=device)
        self.generated = torch.empty(rows, max_new_tokens, dtype=torch.long, device=device)
        self.token_logprobs = torch.empty(rows, max_new_tokens, device=device)
        # alive[row, s]: the row is still running when token s is chosen.
        self.alive = torch.empty(rows, max_new_tokens + 1, dtype=torch.bool, device=device)

    def begin(self, prompt: _Prompt, seeds: torch.Tensor | None) -> None:
        self.first_logits.copy_(prompt.first_logits)
        self.prompt_ids.copy_(prompt.ids)
        self.text_start.copy_(prompt.text_start)
        self.start_positions.copy_(prompt.next_position)
        if seeds is not None:
            self.seeds.copy_(seeds)
        self.alive.fill_(False)
        self.alive[:, 0] = True

    def keep_rows(self, keep: torch.Tensor, prompt: _Prompt) -> None:
        prompt.keep_rows(keep)
        self.active = self.active[keep]

    def finish(self, prompt_ids: torch.Tensor, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt + generated tokens (finished rows padded), and each row's mean token log-prob."""
        chose = self.alive[:, :-1]
        lengths = chose.sum(dim=-1)
        generated = torch.where(chose, self.generated, pad)
        logprob_sum = torch.where(chose, self.token_logprobs, 0.0).sum(dim=-1)
        # transformers stops when the last row finishes: its output is as long as the longest row.
        sequences = torch.cat([prompt_ids, generated[:, : int(lengths.max())]], dim=1)
        return sequences, logprob_sum / lengths.clamp(min=1)


def _greedy_step(
    model: GitForCausalLM,
    prompt: _Prompt,
    state: _GreedyState,
    step: int,
    sampler: _Sampler | None,
    rules: _LogitsRules,
) -> None:
    """Feed the previous token through the decoder (from step 1 on), then choose token `step` of every active row."""
    rows = state.active
    if step == 0:
        logits = state.first_logits
    else:
        previous = state.generated[rows, step - 1]
        logits = decode_one_token_eager(model, prompt, previous, state.start_positions[rows] + (step - 1), step - 1)
    logits = logits.float()
    if rules.active:
        history = torch.cat([state.prompt_ids[rows], state.generated[rows, :step]], dim=1)
        logits = rules.apply(logits, history, state.text_start[rows], step)
    tokens = sampler.choose(logits, state.seeds[rows], step) if sampler else logits.argmax(dim=-1)
    running = state.alive[rows, step]
    finished = torch.zeros_like(running)
    for eos in rules.eos_ids:  # Python constants: a capture cannot copy a list of ids to the GPU
        finished |= tokens == eos
    state.generated[rows, step] = tokens
    state.token_logprobs[rows, step] = logits.gather(1, tokens[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)
    state.alive[rows, step + 1] = running & ~finished


def greedy_or_sample(
    model: GitForCausalLM,
    prompt: _Prompt,
    max_new_tokens: int,
    pad: int,
    sampler: _Sampler | None,
    rules: _LogitsRules,
) -> tuple[torch.Tensor, torch.Tensor]:
    graphs = _step_graphs(model, prompt)
    if graphs is None:
        state = _GreedyState(prompt, max_new_tokens)
    else:
        state = graphs.static("greedy", lambda: _GreedyState(prompt, max_new_tokens))
    state.begin(prompt, sampler.seeds if sampler else None)
    # With CUDA graphs, look at the host only every few steps so the GPU never waits for it
    # (the steps after the last EOS only add padding, trimmed at the end).
    check_every = 1 if graphs is None else 4
    for step in range(max_new_tokens):
        if graphs is None:
            _greedy_step(model, prompt, state, step, sampler, rules)
        else:
            key = ("greedy", step, rules, sampler.settings if sampler else None)
            graphs.run(key, lambda: _greedy_step(model, prompt, state, step, sampler, rules))
        if (step + 1) % check_every or step + 1 == max_new_tokens:
            continue
        running = state.alive[state.active, step + 1]
        still_running = int(running.sum())
        if still_running == 0:
            break
        # Finished rows stop costing work: drop them from the batch and the cache
        # (not under CUDA graphs, which are captured for one batch shape).
        if graphs is None and still_running <= len(state.active) // 2:
            state.keep_rows(running.nonzero()[:, 0], prompt)
    return state.finish(prompt.ids, pad)


def beam_search(
    model: GitForCausalLM,
    prompt: _Prompt,
    batch: int,
    num_beams: int,
    max_new_tokens: int,
    eos_ids: list[int],
    pad: int,
    rules: _LogitsRules,
    *,
    length_penalty: float,
    early_stopping: bool | str,
    num_return_sequences: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' vectorised beam search (generation/utils.py `_beam_search`), step for step."""
    device = prompt.ids.device
    vocab = model.config.vocab_size
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
    keep_k = max(2, 1 + len(eos_ids)) * num_beams
    top_num_beams = torch.arange(keep_k, device=device) < num_beams
    # transformers fills unused positions with `pad or eos`: with pad id 0 that is eos.
    fill = pad or (eos_ids[0] if eos_ids else -1)

    running_seqs = torch.full((batch, num_beams, max_new_tokens), fill, dtype=torch.long, device=device)
    running_scores = torch.zeros(batch, num_beams, device=device)
    running_scores[:, 1:] = _NEG
    seqs = running_seqs.clone()
    seq_lengths = torch.zeros(batch, num_beams, dtype=torch.long, device=device)
    beam_scores = torch.full((batch, num_beams), _NEG, device=device)
    finished = torch.zeros(batch, num_beams, dtype=torch.bool, device=device)
    improvable = torch.ones(batch, 1, dtype=torch.bool, device=device)
    row_base = torch.arange(batch, device=device)[:, None] * num_beams

    positions = prompt.next_position
    logits = prompt.first_logits
    for step in range(max_new_tokens):
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        if rules.active:
            history = torch.cat([prompt.ids, running_seqs.view(batch * num_beams, -1)[:, :step]], dim=1)
            logprobs = rules.apply(logprobs, history, prompt.text_start, step)
        logprobs = logprobs.view(batch, num_beams, vocab)
        candidates = (logprobs + running_scores[:, :, None]).view(batch, -1)
        topk_scores, topk_index = torch.topk(candidates, k=keep_k)
        source_beam = topk_index // vocab
        topk_tokens = topk_index % vocab
        topk_seqs = running_seqs.gather(1, source_beam[:, :, None].expand(-1, -1, max_new_tokens)).clone()
        topk_seqs[:, :, step] = topk_tokens
        generated_len = step + 1
        hits = torch.isin(topk_tokens, eos) | (generated_len >= max_new_tokens)

        # Beams that go on: the best num_beams candidates that did not just stop.
        running_candidates = topk_scores + hits.float() * _NEG
        next_index = torch.topk(running_candidates, k=num_beams)[1]
        running_seqs = topk_seqs.gather(1, next_index[:, :, None].expand(-1, -1, max_new_tokens))
        running_scores = running_candidates.gather(1, next_index)
        running_source = source_beam.gather(1, next_index)

        # Beams that finished now compete with earlier finished ones, length-normalised.
        just_finished = hits & top_num_beams[None, :]
        finished_scores = topk_scores / (generated_len**length_penalty)
        batch_full = finished.all(dim=-1, keepdim=True) & (early_stopping is True)
        finished_scores = finished_scores + batch_full.float() * _NEG + (~improvable).float() * _NEG
        finished_scores = finished_scores + (~just_finished).float() * _NEG
        merged_scores = torch.cat([beam_scores, finished_scores], dim=1)
        best = torch.topk(merged_scores, k=num_beams)[1]
        seqs = torch.cat([seqs, topk_seqs], dim=1).gather(1, best[:, :, None].expand(-1, -1, max_new_tokens))
        beam_scores = merged_scores.gather(1, best)
        finished = torch.cat([finished, just_finished], dim=1).gather(1, best)
        seq_lengths = torch.cat([seq_lengths, torch.full_like(topk_tokens, generated_len)], dim=1).gather(1, best)

        best_length = max_new_tokens if (early_stopping == "never" and length_penalty > 0.0) else generated_len
        best_possible = running_scores[:, :1] / (best_length**length_penalty)
        worst_finished = torch.where(finished, beam_scores.min(dim=1, keepdim=True)[0], _NEG)
        improvable = improvable & (best_possible > worst_finished).any(dim=-1, keepdim=True)
        go_on = improvable.any() & ~(finished.all() & (early_stopping is True)) & ~hits.all()
        if not bool(go_on):
            break

        # Each running beam continues from its source beam's cached text (image keys are shared).
        rows = (row_base + running_source).view(-1)
        prompt.cache.select_rows(rows, start=prompt.num_image_tokens, end=prompt.cache_position(step))
        logits = decode_one_token(model, prompt, running_seqs[:, :, step].reshape(-1), positions, step)
        positions = positions + 1

    seqs = seqs[:, :num_return_sequences]
    lengths = seq_lengths[:, :num_return_sequences].reshape(-1)
    # Mean token log-prob: undo the length penalty on the summed log-probs.
    mean_logprob = beam_scores[:, :num_return_sequences].reshape(-1) * lengths.float() ** length_penalty / lengths.clamp(min=1)
    prompt_ids = prompt.ids.view(batch, num_beams, -1)[:, :num_return_sequences].reshape(batch * num_return_sequences, -1)
    generated = seqs.reshape(batch * num_return_sequences, -1)[:, : int(lengths.max())]
    return torch.cat([prompt_ids, generated], dim=1), mean_logprob


@dataclass(frozen=True)
class _LogitsRules:
    """transformers' repetition_penalty, no_repeat_ngram_size, min_length and min_new_tokens processors,
    in its order. Greedy search and sampling apply them to the logits (sampling before temperature,
    top-k and top-p), beam search to the log-softmax, as transformers does. Shapes are fixed for a step,
    nothing is read back to the host and no input is changed in place, so a CUDA graph of a whole
    step holds them and running a step twice is the same as once."""

    repetition_penalty: float
    no_repeat_ngram_size: int
    min_length: int
    min_new_tokens: int
    eos_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if min(self.no_repeat_ngram_size, self.min_length, self.min_new_tokens) < 0:
            raise ValueError("no_repeat_ngram_size, min_length and min_new_tokens must be >= 0")

    @property
    def active(self) -> bool:
        return self.repetition_penalty != 1.0 or max(self.no_repeat_ngram_size, self.min_length, self.min_new_tokens) > 0

    def apply(self, scores: torch.Tensor, history: torch.Tensor, text_start: torch.Tensor, step: int) -> torch.Tensor:
        """`scores` (rows, vocab) for generated token `step`, given each row's tokens so far, `history`
        (rows, prompt width + step), whose prompt starts at column `text_start` (after left padding)."""
        if self.repetition_penalty != 1.0:
            scores = _penalise_repeats(scores, history, text_start, self.repetition_penalty)
        if self.no_repeat_ngram_size > 0:
            scores = _ban_repeated_ngrams(scores, history, self.no_repeat_ngram_size)
        # transformers counts min_length over the whole text so far, left padding included.
        if history.shape[1] < self.min_length or step < self.min_new_tokens:
            scores = scores.clone()
            for eos in self.eos_ids:  # Python constants, as in _greedy_step
                scores[:, eos] = float("-inf")
        return scores


def _penalise_repeats(
    scores: torch.Tensor, history: torch.Tensor, text_start: torch.Tensor, penalty: float
) -> torch.Tensor:
    """Every token already in the text (not the left padding) is made less likely: a score divided by
    `penalty`, or multiplied when negative."""
    vocab = scores.shape[-1]
    columns = torch.arange(history.shape[1], device=history.device)
    # Padding points at a spare column past the vocabulary, dropped at the end.
    ids = history.masked_fill(columns[None, :] < text_start[:, None], vocab)
    padded = torch.nn.functional.pad(scores, (0, 1))
    seen = padded.gather(1, ids)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return padded.scatter(1, ids, seen)[:, :vocab]


def _ban_repeated_ngrams(scores: torch.Tensor, history: torch.Tensor, n: int) -> torch.Tensor:
    """No n-gram twice (the prompt's, padding included, count): a token that would complete an n-gram
    already in the text gets -inf."""
    length, vocab = history.shape[1], scores.shape[-1]
    if length < n:
        return scores
    prefix = history[:, length + 1 - n :]
    windows = history.unfold(1, n, 1)  # (rows, windows, n)
    matches = (windows[..., :-1] == prefix[:, None, :]).all(dim=-1)
    # Windows that do not match ban a spare column past the vocabulary, so they unban nothing.
    banned = torch.zeros(scores.shape[0], vocab + 1, dtype=torch.bool, device=scores.device)
    banned.scatter_(1, windows[..., -1].masked_fill(~matches, vocab), True)
    return scores.masked_fill(banned[:, :vocab], float("-inf"))


class _Sampler:
    """Temperature / top-k / top-p sampling with the Gumbel-max trick over counter-based noise.

    The noise for (row seed, step, token) comes from an integer hash, so a row's tokens depend on its
    own seed alone: a resumed job, or the same image in another batch, samples the same caption.
    """

    def __init__(self, seeds: torch.Tensor, temperature: float, top_k: int, top_p: float):
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        self.seeds = seeds
        self.temperature = temperature
        self.top_k = top_k
        self.top_p = top_p

    @property
    def settings(self) -> tuple[float, int, float]:
        return self.temperature, self.top_k, self.top_p

    def choose(self, logits: torch.Tensor, seeds: torch.Tensor, step: int) -> torch.Tensor:
        """One token per row of `logits`, drawn with the noise of that row's seed (`seeds`, one per row)."""
        scores = logits / self.temperature
        if 0 < self.top_k < scores.shape[-1]:
            kth = torch.topk(scores, self.top_k, dim=-1)[0][:, -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=False)
            cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
            drop_sorted = cumulative <= 1 - self.top_p
            drop_sorted[:, -1] = False  # always keep the most likely token
            scores = scores.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
        return (scores + _gumbel_noise(seeds, step, scores.shape[-1])).argmax(dim=-1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors (wrapping multiplication), a fast high-quality hash."""
    x = x ^ (x >> 30) & 0x3FFFFFFFF
    x = x * -4658895280553007687  # 0xBF58476D1CE4E5B9 as a signed int64
    x = x ^ (x >> 27) & 0x1FFFFFFFFF
    x = x * -7723592293110705685  # 0x94D049BB133111EB
    return x ^ (x >> 31) & 0x1FFFFFFFF


def _gumbel_noise(seeds: torch.Tensor, step: int, vocab: int) -> torch.Tensor:
    tokens = torch.arange(vocab, device=seeds.device)
    x = _mix(seeds[:, None] * 1_000_003 + step) * 0x9E3779B9 + tokens[None, :]
    u = ((_mix(x) >> 40) & 0xFFFFFF).float().add_(0.5).div_(1 << 24)  # uniform in (0, 1)
    return -torch.log(-torch.log(u))


def _row_seeds(seed, batch: int, rows_per_image: int, device) -> torch.Tensor:
    """One seed per generated row: per-image seeds (or one seed for the batch) mixed with the row's sample index."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)))
    image_seeds = torch.as_tensor(seed, dtype=torch.long, device=device)
    if image_seeds.ndim == 0:
        image_seeds = _mix(image_seeds + torch.arange(batch, device=device))
    if image_seeds.shape != (batch,):
        raise ValueError(f"seed must be one int or one per image ({batch}), got shape {tuple(image_seeds.shape)}")
    sample = torch.arange(rows_per_image, device=device)
    return _mix(image_seeds[:, None] * 31 + sample[None, :]).reshape(-1)


def _as_list(ids: int | Sequence[int]) -> list[int]:
    return [int(ids)] if isinstance(ids, int) else [int(i) for i in ids]
