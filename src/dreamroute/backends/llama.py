"""llama.cpp in process (llama-cpp-python), the default backend.

How the numbers are obtained (``logits_all=False`` throughout, so no
``n_ctx × n_vocab`` logits array is ever allocated):

* generate(): the prompt is the model's own chat template, rendered by the very
  formatter ``Llama.create_chat_completion`` uses (the GGUF's
  ``tokenizer.chat_template`` or the chat format llama-cpp-python guessed from
  it), tokenized the same way. Tokens come from ``Llama.generate`` with the
  sampler ``create_chat_completion`` would build; stop handling (EOG tokens, the
  template's stop strings, incomplete UTF-8, ``max_tokens``) mirrors
  ``Llama._create_completion``, so the text equals what
  ``create_chat_completion(messages, temperature=0, max_tokens=...)`` returns.
  Each sampled token's log-probability is the log-softmax (temperature 1, i.e.
  the model's own distribution) of the last-position logits,
  ``llama_get_logits_ith(ctx, -1)``, read while the generator is paused on the
  token. ``Llama.generate`` reuses the longest KV prefix; the tokens it did not
  have to evaluate are ``cached_tokens``. Request options: ``stop`` strings join
  the template's; ``top_logprobs`` come from the same logits row; a JSON
  ``response_format`` is a llama.cpp grammar in the sampler chain (as
  ``create_chat_completion`` builds it); ``cancel`` is polled after each token.
* score() (:mod:`.llama_logprobs`, as is generate()'s logits readout): the
  prompt is decoded in chunks of at most 64 tokens with logits requested for
  every position of the chunk (llama.cpp batch API), so the logits buffer holds
  at most 64 × n_vocab floats. Log-probabilities already
  computed by an earlier score() of a prompt sharing the prefix are reused.
  Generated tokens' log-probabilities are not reused for scoring: llama.cpp's
  one-token decode and its batched decode differ numerically (up to ~0.2 nats
  on the quantized sensory model), and score() should not depend on history.
  The KV cache is left holding the prompt, so a generate() of the same
  messages evaluates nothing but samples at once.
* save_state()/load_state() (:mod:`.llama_state`): the KV cells of sequence 0
  (``llama_state_seq_get_data``; no logits buffer), the token ids and the known
  token log-probabilities, behind a header naming the model identity and a
  sha256 checksum.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Sequence

from ..config import TierConfig
from ..errors import BackendError, GenerationCancelled
from .registry import sha256_file
from .base import CancelCheck, Generation, Message, TokenLogprob
from .llama_logprobs import LlamaLogprobs
from .llama_state import LlamaKVState
from .options import TextEmitter, check_options, earliest_stop, llama_grammar, trim_details
from .threads import CoreShare


class LlamaBackend(LlamaLogprobs, LlamaKVState):
    """A GGUF model run in this process by llama-cpp-python.

    Args:
        tier: the tier's config (``n_ctx``, ``n_batch``, ``n_threads``; without
            ``n_threads`` each call uses one thread per core that other processes
            leave free, see :mod:`dreamroute.backends.threads`).
        model_path: the resolved GGUF (see :func:`dreamroute.backends.registry.resolve_model`).
        seed: default sampling seed.

    Attributes:
        identity: sha256 of the GGUF (``tier.source.sha256`` when configured).
        load_s: seconds the last :meth:`load` took (``None`` before loading).

    The model is loaded lazily on the first call; :meth:`close` frees it. All
    llama.cpp failures are raised as :class:`BackendError` naming the tier.
    """

    def __init__(self, tier: TierConfig, model_path: Path, *, seed: int = 0):
        self.tier = tier
        self.model_path = Path(model_path)
        self.seed = seed
        if not self.model_path.is_file():
            raise BackendError(f"tier {tier.name!r}: model file {self.model_path} does not exist; "
                               "run `dreamroute models fetch`")
        sha = tier.source.sha256 if tier.source is not None else None
        self.base_identity: str = sha or sha256_file(self.model_path)
        self.identity: str = self.base_identity
        self.lora_path: Path | None = None
        # fixed when configured; else one thread per core other processes leave free (threads.py)
        self.share = None if tier.n_threads else CoreShare()
        self.n_threads = tier.n_threads or self.share.threads()
        self.load_s: float | None = None
        self._llm = None
        self._formatter = None
        self._evaluated = 0
        # score() log-probabilities known for _lp_tokens[1:]; they depend on the
        # tokens only, not on what the KV cache holds now
        self._lp_tokens: list[int] = []
        self._lp: list[float] = []
        # leading KV cells computed by batched decodes (a prefill); cells after them were decoded
        # one token at a time while generating, which llama.cpp computes with other rounding
        self._batched = 0

    # ------------------------------------------------------------------ lifecycle

    def _err(self, what: str, e: BaseException) -> BackendError:
        return BackendError(f"tier {self.tier.name!r}: {what}: {e}")

    @property
    def loaded(self) -> bool:
        """Whether the model is in memory now."""
        return self._llm is not None

    def load(self) -> None:
        """Load the model (no-op when loaded); sets :attr:`load_s` (seconds).

        Raises:
            BackendError: llama-cpp-python is missing, or the GGUF does not load.
        """
        if self._llm is not None:
            return
        try:
            from llama_cpp import Llama, llama_chat_format
        except ImportError as e:
            raise BackendError(f"tier {self.tier.name!r} needs llama-cpp-python: "
                               "`.venv/bin/pip install -e '.[llama]'` (or bash scripts/setup.sh)") from e
        t0 = time.perf_counter()
        try:
            llm = Llama(model_path=str(self.model_path), n_ctx=self.tier.n_ctx,
                        n_batch=self.tier.n_batch, n_threads=self.n_threads,
                        n_threads_batch=self.n_threads, seed=self.seed,
                        lora_path=str(self.lora_path) if self.lora_path else None,
                        logits_all=False, verbose=False)
        except Exception as e:
            raise self._err(f"cannot load {self.model_path}", e) from e
        handler = (llm.chat_handler or llm._chat_handlers.get(llm.chat_format)
                   or llama_chat_format.get_chat_completion_handler(llm.chat_format))
        code = getattr(handler, "__code__", None)
        if code is None or code.co_freevars != ("chat_formatter",):
            llm.close()
            raise BackendError(f"tier {self.tier.name!r}: chat format {llm.chat_format!r} is not "
                               "template based; dreamroute needs a plain chat template")
        self._formatter = handler.__closure__[0].cell_contents
        orig_eval = llm.eval

        def counting_eval(tokens):  # counts prompt tokens llama.cpp really evaluates
            self._evaluated += len(tokens)
            return orig_eval(tokens)

        llm.eval = counting_eval
        self._llm = llm
        self.load_s = time.perf_counter() - t0

    def use_adapter(self, lora_path: str | Path | None) -> None:
        """Serve the base model with a GGUF LoRA adapter (a DREAM version), or without (None).

        The identity becomes ``<base sha256>+lora:<adapter sha256[:16]>``, so KV states and
        calibration made with one adapter are never used with another. The model reloads
        on the next call.

        Raises:
            BackendError: the adapter file does not exist.
        """
        if lora_path is not None and not Path(lora_path).is_file():
            raise BackendError(f"tier {self.tier.name!r}: LoRA adapter {lora_path} does not exist; "
                               "roll back with `dreamroute dream rollback` or restore the file")
        self.close()
        self.lora_path = Path(lora_path) if lora_path is not None else None
        self.identity = (self.base_identity if self.lora_path is None
                         else f"{self.base_identity}+lora:{sha256_file(self.lora_path)[:16]}")

    def close(self) -> None:
        """Free the model and its KV cache; the next call loads it again."""
        if self._llm is not None:
            self._llm.close()
            self._llm = None

    def reset(self) -> None:
        """Empty the KV cache (the next call evaluates its whole prompt); keeps the model loaded."""
        if self._llm is not None:
            self._llm._ctx.kv_cache_seq_rm(-1, 0, -1)
            self._llm.reset()
        self._batched = 0

    def settle(self) -> int:
        """Re-evaluate, as one batch, the KV cells that generation decoded one token at a time.

        llama.cpp's one-token decode and its batched decode round differently (measured on
        the sensory model: a conversation restored with the generated answer's cells as
        decoded gave a different greedy continuation than a cold prefill; re-evaluated as a
        batch, the same one). After this the held state equals what a cold prefill of the
        same tokens computes, so a saved and restored state answers exactly as no cache.

        Returns the number of tokens re-evaluated (a prefill of that many tokens).
        Raises BackendError when llama.cpp fails (the cache is then emptied).
        """
        llm = self._llm
        if llm is None or self._batched >= llm.n_tokens:
            return 0
        n, b = llm.n_tokens, self._batched
        if n - b == 1 and b > 0:
            b -= 1  # a batch of one token would take the one-token path again
        toks = llm._input_ids[:n].tolist()
        try:
            llm._ctx.kv_cache_seq_rm(-1, b, -1)
            llm.n_tokens = b
            llm.eval(toks[b:])
        except Exception as e:
            self.reset()
            raise self._err("re-evaluating the generated tokens failed", e) from e
        self._batched = n
        return n - b

    def _model(self):
        self.load()
        self._fit_threads()
        return self._llm

    def _fit_threads(self) -> None:
        """Follow the free cores (:class:`~.threads.CoreShare`) unless ``n_threads`` is configured."""
        if self.share is None:
            return
        n = self.share.threads()
        if n != self.n_threads:
            import llama_cpp
            llama_cpp.llama_set_n_threads(self._llm._ctx.ctx, n, n)
            self.n_threads = n

    # ------------------------------------------------------------------ prompt

    def prompt_and_stops(self, messages: list[Message]) -> tuple[list[int], list[str]]:
        """Token ids of the chat-templated prompt and the template's stop strings.

        Raises:
            BackendError: the template rejects the messages, or the prompt does not
                fit the tier's ``n_ctx``.
        """
        llm = self._model()
        try:
            res = self._formatter(messages=messages)
            tokens = llm.tokenize(res.prompt.encode("utf-8"), add_bos=not res.added_special,
                                  special=True)
        except Exception as e:
            raise self._err("cannot apply the chat template", e) from e
        if len(tokens) >= llm.n_ctx():
            raise BackendError(
                f"tier {self.tier.name!r}: the prompt has {len(tokens)} tokens but n_ctx is "
                f"{llm.n_ctx()}; raise n_ctx in the tier config (tiers: - name: "
                f"{self.tier.name} ... n_ctx: {2 * llm.n_ctx()}) or shorten the prompt")
        stop = res.stop if isinstance(res.stop, list) else [res.stop] if res.stop else []
        return tokens, [s for s in stop if s]

    def prompt_tokens(self, messages: list[Message]) -> list[int]:
        """Token ids of the chat-templated prompt (see :meth:`prompt_and_stops`)."""
        return self.prompt_and_stops(messages)[0]

    # ------------------------------------------------------------------ generate

    def generate(self, messages: list[Message], *, max_tokens: int = 320,
                 temperature: float = 0.0, seed: int = 0, stop: Sequence[str] | None = None,
                 logprobs: bool = False, top_logprobs: int = 0, response_format: dict | None = None,
                 cancel: CancelCheck | None = None, on_text: Callable[[str], None] | None = None) -> Generation:
        """Answer a chat as ``create_chat_completion`` would (greedy at temperature 0).

        ``stop`` strings join the template's (the text ends before the earliest one);
        ``logprobs`` gives each token's piece and log-probability, ``top_logprobs`` the most
        likely tokens from the same logits row; a JSON ``response_format`` constrains sampling
        with a llama.cpp grammar (llama-cpp-python's JSON grammar, or its grammar of the JSON
        Schema), as ``create_chat_completion(response_format=...)`` does. ``cancel`` is polled
        before the prompt is evaluated and after each sampled token. ``on_text`` gets the text as
        it is decoded (:class:`~.options.TextEmitter` over the UTF-8 bytes: a tail as long as the
        longest stop string, the template's included, is held back until it cannot be one).

        Returns:
            :class:`Generation`; ``token_logprobs`` has one natural-log probability
            per completion token (under the model's untempered distribution, before any
            grammar); ``prefill_s`` is the time to the first token (template, tokenizing and
            prompt evaluation), ``decode_s`` the rest, in seconds.

        Raises:
            BackendError: prompt too long for ``n_ctx``, or llama.cpp failed.
            OptionError: an option out of range, or a schema with no grammar.
            GenerationCancelled: ``cancel`` returned True; the KV cache keeps what was
                evaluated (a later call reuses its prefix).
        """
        import llama_cpp
        opts = check_options(stop=stop, logprobs=logprobs, top_logprobs=top_logprobs,
                             response_format=response_format)
        t0 = time.perf_counter()
        tokens, stops = self.prompt_and_stops(messages)
        llm = self._llm
        grammar = llama_grammar(opts.response_format, llm._model.vocab)
        n_ctx = llm.n_ctx()
        if max_tokens is None or max_tokens <= 0 or max_tokens + len(tokens) >= n_ctx:
            max_tokens = n_ctx - len(tokens)
        stop_bytes = [s.encode("utf-8") for s in (*stops, *opts.stop)]
        emit = TextEmitter(on_text, stop_bytes, raw=True)
        completion: list[int] = []
        lps: list[float] = []
        details: list[TokenLogprob] = []
        text, finish, eog, cached, t_first, cancelled = None, "length", None, 0, None, False
        multibyte_fix = 0
        self._evaluated = 0
        if cancel is not None and cancel():
            raise GenerationCancelled(prompt_tokens=len(tokens))
        try:
            llm.set_seed(seed if seed is not None else self.seed)
            gen = llm.generate(tokens, top_k=40, top_p=0.95, min_p=0.05, typical_p=1.0,
                               temp=temperature, repeat_penalty=1.0, grammar=grammar)
            for tok in gen:
                if t_first is None:
                    t_first = time.perf_counter()
                    cached = len(tokens) - self._evaluated
                if cancel is not None and cancel():
                    cancelled = True
                    break
                lp, alts = self._logprob_last(tok, opts.top_logprobs)
                if llama_cpp.llama_vocab_is_eog(llm._model.vocab, tok):
                    eog, finish = (tok, lp), "stop"
                    text = llm.detokenize(completion, prev_tokens=tokens)
                    break
                completion.append(tok)
                lps.append(lp)
                if opts.logprobs:
                    details.append(self._detail(tok, lp, alts))
                all_text = llm.detokenize(completion, prev_tokens=tokens)
                for k, char in enumerate(all_text[-3:]):  # as Llama._create_completion
                    k = 3 - k
                    for num, pattern in [(2, 192), (3, 224), (4, 240)]:
                        if num > k and pattern & char == pattern:
                            multibyte_fix = num - k
                if multibyte_fix > 0:
                    multibyte_fix -= 1
                    continue
                if (cut := earliest_stop(all_text, stop_bytes)) is not None:
                    text, finish = all_text[:cut], "stop"
                    break
                emit.update(all_text)
                if len(completion) >= max_tokens:
                    text = all_text
                    break
            gen.close()
        except BackendError:
            raise
        except Exception as e:
            self.reset()  # llama.cpp's token bookkeeping may be half updated
            raise self._err("generation failed", e) from e
        t_end = time.perf_counter()
        if text is None:
            text = llm.detokenize(completion, prev_tokens=tokens)
        t_first = t_first or t_end
        # the prompt's new cells came from one batched decode unless it was a single token
        # (llama.cpp re-evaluates the last prompt token alone when the rest was held)
        evaluated = len(tokens) - max(cached, 0)
        if self._batched >= cached:
            self._batched = len(tokens) if evaluated >= 2 else min(self._batched, cached)
        self._batched = min(self._batched, llm.n_tokens)
        if cancelled:
            raise GenerationCancelled(prompt_tokens=len(tokens), completion_tokens=len(completion),
                                      cached_tokens=max(cached, 0), seconds=t_end - t0)
        emit.finish(text)
        return Generation(
            text=text.decode("utf-8", errors="ignore"), prompt_tokens=len(tokens),
            completion_tokens=len(completion), token_logprobs=lps,
            prefill_s=t_first - t0, decode_s=t_end - t_first, finish_reason=finish,
            cached_tokens=max(cached, 0), model=self.identity,
            extra={"tier": self.tier.name, "eog_logprob": eog[1] if eog else None},
            token_details=trim_details(details, len(text)) if opts.logprobs else None)
