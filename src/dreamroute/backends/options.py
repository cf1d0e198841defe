"""What every backend shares to honour :class:`~dreamroute.backends.base.GenOptions`: checking the
options, stop strings, token details, JSON checks and the cancel check.

* :func:`check_options` validates and normalises a ``generate()`` call's options (OptionError
  naming the parameter otherwise).
* :func:`earliest_stop` finds where the text ends under stop strings (the earliest occurrence of
  any, as OpenAI and llama-cpp-python cut).
* :func:`trim_details` keeps the token details of the returned text.
* :func:`log_softmax_top` gives a token's log-probability and the top alternatives from one row
  of logits (llama.cpp).
* :func:`json_problem` says why a text is not what a JSON ``response_format`` asks for (a backend
  that cannot constrain its decoding checks its answer with it; tests check any backend's).
* :func:`llama_grammar` builds the llama.cpp grammar of a JSON ``response_format``.
* :class:`TextEmitter` feeds a ``generate(on_text=...)`` callback the text as it is generated,
  holding back what a stop string may still remove.
"""

from __future__ import annotations

import codecs
import json
import math
from typing import Callable, Sequence

import numpy as np

from ..errors import GenerationCancelled, OptionError
from .base import MAX_STOP, MAX_TOP_LOGPROBS, CancelCheck, GenOptions, TokenLogprob

_JSON_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def check_options(*, stop: Sequence[str] | str | None = None, logprobs: bool = False, top_logprobs: int = 0,
                  response_format: dict | None = None) -> GenOptions:
    """The options of one ``generate()`` call, checked.

    ``stop`` may be one string or up to :data:`MAX_STOP` non-empty strings; ``top_logprobs`` an
    int in 0..:data:`MAX_TOP_LOGPROBS` (> 0 implies ``logprobs``); ``response_format`` None or
    ``{"type": "text" | "json_object" | "json_schema"}``, a ``json_schema`` one with
    ``json_schema.schema`` a JSON object when given.

    Raises:
        OptionError: an option outside those, ``param`` naming it.
    """
    if stop is None:
        stops: tuple[str, ...] = ()
    else:
        stops = (stop,) if isinstance(stop, str) else tuple(stop)
    if len(stops) > MAX_STOP:
        raise OptionError(f"stop takes at most {MAX_STOP} strings, got {len(stops)}", "stop")
    if any(not isinstance(s, str) or not s for s in stops):
        raise OptionError("stop strings must be non-empty strings", "stop")
    if isinstance(top_logprobs, bool) or not isinstance(top_logprobs, int) \
            or not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
        raise OptionError(f"top_logprobs must be an integer from 0 to {MAX_TOP_LOGPROBS}, got {top_logprobs!r}",
                          "top_logprobs")
    if response_format is not None:
        kind = response_format.get("type") if isinstance(response_format, dict) else None
        if kind not in ("text", "json_object", "json_schema"):
            raise OptionError(f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}",
                              "response_format")
        if kind == "json_schema":
            spec = response_format.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
                raise OptionError("response_format.json_schema must be an object whose 'schema' is a JSON Schema "
                                  "object", "response_format")
        if kind == "text":
            response_format = None
    return GenOptions(stops, bool(logprobs or top_logprobs), top_logprobs, response_format)


def cancel_now(cancel: CancelCheck | None, **done) -> None:
    """Raise :class:`GenerationCancelled` (with ``done``: ``prompt_tokens``, ``completion_tokens``,
    ``cached_tokens``, ``seconds``) when ``cancel`` is set and returns True."""
    if cancel is not None and cancel():
        raise GenerationCancelled(**done)


def earliest_stop(text, stops: Sequence) -> int | None:
    """Index in ``text`` (str, or bytes with bytes ``stops``) where the earliest stop string begins,
    or None when none occurs."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


class TextEmitter:
    """Streams a generation's text to ``on_text`` as it grows, never sending what a stop string
    may still cut off: the last ``len(longest stop) - 1`` characters (bytes) stay held back until
    more text shows they are not the start of one, and nothing from a stop string's start on is
    ever sent. Every piece sent is a prefix-extension of the ones before, so the pieces join to
    the final text (:meth:`finish` sends the rest).

    Args:
        on_text: called with each new piece (a non-empty str); None: a no-op emitter.
        stops: the stop strings in force (str, or bytes with ``raw``), the chat template's included.
        raw: the text is given as UTF-8 bytes (llama.cpp); pieces are decoded incrementally, a
            character split across tokens sent once whole (invalid bytes dropped, as
            ``bytes.decode(errors="ignore")`` drops them).
    """

    def __init__(self, on_text: Callable[[str], None] | None, stops: Sequence = (), *, raw: bool = False):
        self.on_text = on_text
        self.stops = list(stops)
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.raw = raw
        self.sent = 0   # characters (bytes with raw) of the text already sent
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="ignore") if raw else None

    def _send(self, chunk, final: bool = False) -> None:
        piece = self._decoder.decode(chunk, final) if self.raw else chunk
        if piece:
            self.on_text(piece)

    def update(self, text) -> None:
        """The whole text generated so far (str, or bytes with ``raw``): send what is safe now."""
        if self.on_text is None:
            return
        cut = earliest_stop(text, self.stops) if self.stops else None
        safe = cut if cut is not None else len(text) - self.hold
        if safe > self.sent:
            self._send(text[self.sent:safe])
            self.sent = safe

    def finish(self, text) -> None:
        """The final text (after any stop string cut it): send the rest of it."""
        if self.on_text is None:
            return
        rest = text[self.sent:] if len(text) > self.sent else text[:0]
        self.sent = max(self.sent, len(text))
        self._send(rest, final=True)


def trim_details(details: list[TokenLogprob], n_bytes: int) -> list[TokenLogprob]:
    """The leading tokens of ``details`` that begin within the first ``n_bytes`` bytes (the text
    kept after a stop string cut the rest); a token straddling the cut is kept."""
    out, off = [], 0
    for d in details:
        if off >= n_bytes:
            break
        out.append(d)
        off += len(d.bytes)
    return out


def log_softmax_top(row: np.ndarray, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """Natural-log probability of ``token`` under ``softmax(row)`` (``row``: one position's logits,
    shape ``(n_vocab,)``), and the ``k`` most likely tokens as ``(token id, logprob)``, most
    likely first (ties: lower id first)."""
    x = np.asarray(row, dtype=np.float64)
    m = x.max()
    lse = m + math.log(np.exp(x - m).sum())
    lp = float(x[token] - lse)
    if k <= 0:
        return lp, []
    k = min(k, x.shape[0])
    idx = np.argpartition(-x, k - 1)[:k]
    idx = idx[np.lexsort((idx, -x[idx]))]
    return lp, [(int(i), float(x[i] - lse)) for i in idx]


def json_schema_of(response_format: dict | None) -> dict | None:
    """The JSON Schema a ``json_schema`` response_format carries (None for any other, or none given)."""
    if response_format and response_format.get("type") == "json_schema":
        return (response_format.get("json_schema") or {}).get("schema")
    return None


def json_problem(text: str, response_format: dict | None) -> str | None:
    """Why ``text`` is not what ``response_format`` asks for, or None when it is.

    ``json_object``: the text must parse as a JSON object. ``json_schema``: it must parse and
    follow the schema's ``type``, ``enum``, ``const``, ``properties``, ``required``,
    ``additionalProperties: false``, ``items``, ``minItems`` / ``maxItems`` (recursively); other
    keywords are not checked here. Free text (None, ``text``) is always fine.
    """
    kind = (response_format or {}).get("type")
    if kind not in ("json_object", "json_schema"):
        return None
    try:
        value = json.loads(text)
    except ValueError as e:
        return f"not JSON ({e})"
    if kind == "json_object":
        return None if isinstance(value, dict) else f"a JSON {type(value).__name__}, not an object"
    schema = json_schema_of(response_format)
    return _schema_problem(value, schema, "$") if schema else None


def _type_ok(value, name: str) -> bool:
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool) or (isinstance(value, float)
                                                                          and value.is_integer())
    if name == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    want = _JSON_TYPES.get(name)
    return want is not None and isinstance(value, want) and not (want is not bool and isinstance(value, bool))


def _schema_problem(value, schema: dict, where: str) -> str | None:
    types = schema.get("type")
    if types is not None:
        names = [types] if isinstance(types, str) else list(types)
        if not any(_type_ok(value, t) for t in names):
            return f"{where} is not of type {' or '.join(names)}"
    if "enum" in schema and value not in schema["enum"]:
        return f"{where} is not one of {schema['enum']!r}"
    if "const" in schema and value != schema["const"]:
        return f"{where} is not {schema['const']!r}"
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        missing = [k for k in schema.get("required") or () if k not in value]
        if missing:
            return f"{where} lacks {', '.join(map(repr, missing))}"
        if schema.get("additionalProperties") is False and (extra := [k for k in value if k not in props]):
            return f"{where} has properties the schema does not allow: {', '.join(map(repr, extra))}"
        for k, sub in props.items():
            if k in value and isinstance(sub, dict) and (p := _schema_problem(value[k], sub, f"{where}.{k}")):
                return p
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0) or len(value) > schema.get("maxItems", math.inf):
            return f"{where} has {len(value)} items, outside the schema's minItems/maxItems"
        if isinstance(items := schema.get("items"), dict):
            for i, v in enumerate(value):
                if p := _schema_problem(v, items, f"{where}[{i}]"):
                    return p
    return None


def llama_grammar(response_format: dict | None, vocab=None):
    """The llama.cpp grammar (``llama_cpp.LlamaGrammar``) of a JSON ``response_format``, None for
    free text: llama-cpp-python's JSON grammar (a JSON object) for ``json_object`` and for a
    ``json_schema`` without a schema, else its grammar of the schema. With ``vocab`` (a loaded
    model's ``llama_vocab``) the grammar is also parsed by llama.cpp once, so a grammar it
    rejects is refused here rather than in the sampler.

    Raises:
        OptionError: the schema cannot be turned into a grammar, or llama.cpp rejects it
            (``param`` ``response_format``).
    """
    kind = (response_format or {}).get("type")
    if kind not in ("json_object", "json_schema"):
        return None
    import llama_cpp
    from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar, json_schema_to_gbnf

    schema = json_schema_of(response_format)
    try:
        gbnf = JSON_GBNF if schema is None else json_schema_to_gbnf(json.dumps(schema))
    except Exception as e:  # the converter raises plain exceptions for what it cannot express
        raise OptionError(f"response_format: this JSON Schema cannot be turned into a grammar ({e}); "
                          "simplify the schema or use {'type': 'json_object'}", "response_format") from e
    grammar = LlamaGrammar.from_string(gbnf, verbose=False)
    if vocab is not None and hasattr(llama_cpp, "llama_sampler_init_grammar"):
        sampler = llama_cpp.llama_sampler_init_grammar(vocab, grammar._grammar.encode("utf-8"),
                                                       grammar._root.encode("utf-8"))
        if not sampler:
            raise OptionError("response_format: llama.cpp rejected the grammar of this JSON Schema; "
                              "simplify the schema or use {'type': 'json_object'}", "response_format")
        llama_cpp.llama_sampler_free(sampler)
    return grammar
