"""The scoring half of :class:`~dreamroute.backends.openai_http.OpenAIBackend`: prompt
log-probabilities echoed by ``/completions`` (``echo: true, logprobs: 1``), with the check that
they are in place (split from ``openai_http.py`` by responsibility).

* :class:`OpenAIScoring` (mixin): ``score()``, the prompt it scores (vLLM's ``/tokenize`` or
  the plain text), the echo request, and the remembered reason a server cannot score.
* ``_echo_shift``: whether echoed logprobs are one position early (llama-cpp-python's server
  for a model that adds no BOS token); ``_ECHO_PROBE`` the text scored when a prompt does not say.
"""

from __future__ import annotations

import math

import httpx

from ..errors import BackendError
from .base import Message
from .openai_upstream import REJECTED_STATUS, context_exceeded, upstream_message


def _echo_shift(tokens, tops) -> bool | None:
    """Whether echoed prompt logprobs (the legacy ``logprobs.tokens`` / ``top_logprobs`` layout) are
    one position early: entry i holding the distribution that predicts token i + 1, as
    llama-cpp-python's server sends for a model that adds no BOS token (its ``echo`` reads logits
    row i for token i). Counts the entries whose most likely token is the token there (a) and
    the one after it (b): a model predicts the token it sees far more often than a repeat of the
    previous one. None when too few entries say either way."""
    if not isinstance(tokens, list) or not isinstance(tops, list) or len(tokens) != len(tops):
        return None
    a = b = 0
    for i, top in enumerate(tops):
        if not isinstance(top, dict) or not top:
            continue
        best = max(top, key=lambda t: top[t] if isinstance(top[t], (int, float)) else -math.inf)
        a += best == tokens[i]
        b += i + 1 < len(tokens) and best == tokens[i + 1]
    if max(a, b) < 3 or max(a, b) < 2 * min(a, b):
        return None
    return b > a


# Scored once when a real prompt does not show whether a server's echoed logprobs are in place: a
# repeated sequence, which any language model predicts in its second half.
_ECHO_PROBE = "one two three four five six seven eight nine ten, one two three four five six seven eight nine ten"


class OpenAIScoring:
    """Mixin of :class:`~dreamroute.backends.openai_http.OpenAIBackend` (uses its ``tier``,
    ``model``, ``base_url``, ``client``, ``_tokenize_ok``, ``_echo_shifted``, ``_score_problem``,
    ``_headers()``, ``_post()`` and ``_http_error()``)."""

    def _server_root(self) -> str:
        return self.base_url[:-3] if self.base_url.endswith("/v1") else self.base_url

    def _prompt_for_scoring(self, messages: list[Message]) -> str | list[int]:
        """Chat-templated token ids from vLLM's ``/tokenize``, else the plain text (a server
        without ``/tokenize`` is not asked again)."""
        if self._tokenize_ok:
            url = f"{self._server_root()}/tokenize"
            try:
                r = self.client.post(url, json={"model": self.model, "messages": messages,
                                                "add_generation_prompt": True},
                                     headers=self._headers(), timeout=self.tier.timeout_s)
                if r.status_code == 200:
                    tokens = r.json().get("tokens")
                    if isinstance(tokens, list) and tokens and all(isinstance(t, int) for t in tokens):
                        return tokens
                if r.status_code in REJECTED_STATUS:
                    self._tokenize_ok = False
            except (httpx.HTTPError, ValueError):
                pass
        return "\n\n".join(m.get("content") or "" for m in messages)

    def _unsupported(self, why: str) -> BackendError:
        """The BackendError of a server that cannot score prompts, remembered: score() raises it
        again without asking the server."""
        self._score_problem = (f"tier {self.tier.name!r}: server does not return prompt logprobs ({why}); "
                               "score() needs echo+logprobs on /completions (vLLM has it; llama-server and "
                               "Ollama do not), so this tier gives no surprise (missing, not zero)")
        return BackendError(self._score_problem)

    def _echo(self, url: str, prompt: str | list[int]) -> tuple[dict, dict]:
        """The ``logprobs`` and ``usage`` of ``prompt`` echoed with one generated token
        (``max_tokens: 1``: llama-cpp-python's server reads 0 as no limit and generates to the
        end of its context)."""
        body = {"model": self.model, "prompt": prompt, "echo": True, "logprobs": 1,
                "max_tokens": 1, "temperature": 0.0}
        r = self._post(url, body)
        if r.status_code in (429, 503):  # overloaded, not incapable: the engine cools the tier
            raise self._http_error(url, r)
        if r.status_code >= 400 and context_exceeded(r):  # this prompt is too long; others score
            raise self._http_error(url, r)
        if r.status_code >= 400:
            why = f"{url} answered HTTP {r.status_code}: {upstream_message(r)}"
            if r.status_code in REJECTED_STATUS:
                raise self._unsupported(why)
            raise BackendError(f"tier {self.tier.name!r}: server does not return prompt logprobs ({why})")
        try:
            resp = r.json()
            lp = resp["choices"][0]["logprobs"]
            values = lp["token_logprobs"]
            usage = resp.get("usage") or {}
        except (ValueError, KeyError, IndexError, TypeError):
            values = None
        if not values or not isinstance(values, list):
            raise self._unsupported(f"{url} sent no echoed token_logprobs")
        return lp, usage

    def score(self, messages: list[Message], *, new_only: bool = False) -> list[float]:
        """Natural-log probability of each prompt token after the first (see the class docstring).

        ``new_only`` is accepted for the protocol and ignored: what a remote server's cache
        holds is not visible here, so every prompt token is scored.

        Raises:
            BackendError: the server does not return prompt logprobs (remembered: it is not asked
                again), returns them out of place, cannot be reached, the prompt exceeds its
                context (``status`` 400), or it is overloaded (HTTP 429/503: ``status`` and
                ``retry_after_s`` set).
        """
        if self._score_problem is not None:
            raise BackendError(self._score_problem)
        url = f"{self.base_url}/completions"
        lp, usage = self._echo(url, self._prompt_for_scoring(messages))
        if self._echo_shifted is None:  # once per server: are the echoed logprobs where they belong?
            shifted = _echo_shift(lp.get("tokens"), lp.get("top_logprobs"))
            if shifted is None and isinstance(lp.get("top_logprobs"), list):  # this prompt does not say
                probe, _ = self._echo(url, _ECHO_PROBE)
                shifted = _echo_shift(probe.get("tokens"), probe.get("top_logprobs"))
            self._echo_shifted = bool(shifted)
        if self._echo_shifted:
            raise self._unsupported(f"{url} echoes each prompt token's logprob from the logits that predict "
                                    "the next token, as llama-cpp-python's server does for a model whose GGUF "
                                    "adds no BOS token (tokenizer.ggml.add_bos_token false)")
        values = list(lp["token_logprobs"])
        n_gen = usage.get("completion_tokens")
        n_gen = 1 if n_gen is None else int(n_gen)
        if 0 < n_gen < len(values):  # the generated token is not the prompt's
            values = values[:-n_gen]
        while values and values[0] is None:  # the first token (and a BOS) have none
            values.pop(0)
        if not values or any(v is None for v in values):
            raise BackendError(f"tier {self.tier.name!r}: server does not return prompt logprobs "
                               "(echoed token_logprobs hold nulls)")
        return [min(0.0, float(v)) for v in values]
