"""``HTTPGenerator``: an OpenAI-compatible ``/v1/completions`` server (``vllm serve``, SGLang,
TGI...), since many users already serve their policy that way.

vLLM's extra request fields are sent (``include_stop_str_in_output``, ``skip_special_tokens``,
``return_token_ids``). A server that ignores them still works when it reports which stop
matched (vLLM ``stop_reason``, SGLang ``matched_stop``): the stop string is re-appended and token
ids are recomputed with the local tokenizer. A plain OpenAI server does not say whether a stop
string or EOS ended a choice; those completions get ``finish_reason="stop", stop=None``.

Each worker thread keeps one HTTP/1.1 keep-alive connection to the server, so a search that
sends hundreds of thousands of requests does not pay a TCP (and TLS) handshake per request. A
kept connection that the server has closed in the meantime is reopened once without using up
a retry."""

from __future__ import annotations

import asyncio
import dataclasses
import http.client
import json
import logging
import threading
import urllib.parse
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from rstar.backends.base import Completion, GenerationRequest, dedup_completions, strip_eos_text

logger = logging.getLogger(__name__)
_MISSING = object()


@dataclass
class HTTPConfig:
    base_url: str = "http://127.0.0.1:8000"
    model: str = ""  # the served model name ("model" field of the request)
    api_key: str | None = None
    timeout_s: float = 600.0
    max_concurrency: int = 64  # requests in flight from ``generate``
    retries: int = 2


class HTTPGenerator:
    """``Generator`` over HTTP. ``tokenizer`` (path or object) is needed to send text prompts
    as ids and to recover token ids from servers that do not return them."""

    def __init__(self, config: HTTPConfig | None = None, tokenizer: str | Any | None = None, **overrides: Any) -> None:
        self.config = dataclasses.replace(config or HTTPConfig(), **overrides)
        if isinstance(tokenizer, str):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        self.tokenizer = tokenizer
        self._warned_plain = False
        url = urllib.parse.urlsplit(self.config.base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"base_url must be http(s)://host[:port][/path], got {self.config.base_url!r}")
        self._url = url
        self._path = url.path.rstrip("/") + "/v1/completions"
        self._endpoint = f"{url.scheme}://{url.netloc}{self._path}"  # for messages
        self._local = threading.local()  # each worker thread's kept connection
        self._conns: list[http.client.HTTPConnection] = []  # all of them, for close()
        self._conns_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=max(1, self.config.max_concurrency), thread_name_prefix="rstar-http")

    def _payload(self, r: GenerationRequest) -> dict[str, Any]:
        prompt: Any = r.prompt_ids if r.prompt_ids is not None else r.prompt
        body: dict[str, Any] = {
            "model": self.config.model,
            "prompt": prompt,
            "n": r.n,
            "temperature": r.temperature,
            "top_p": r.top_p,
            "max_tokens": r.max_new_tokens,
            "include_stop_str_in_output": True,
            "skip_special_tokens": False,
            "spaces_between_special_tokens": False,
            "return_token_ids": True,
        }
        if r.stop:
            body["stop"] = list(r.stop)
        if r.seed is not None:
            body["seed"] = r.seed
        return body

    def _connection(self) -> tuple[http.client.HTTPConnection, bool]:
        """This thread's kept connection, and whether it has served a request before."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            return conn, True
        cls = http.client.HTTPSConnection if self._url.scheme == "https" else http.client.HTTPConnection
        port = self._url.port or (443 if self._url.scheme == "https" else 80)  # explicit: IPv6 hosts
        conn = cls(self._url.hostname, port, timeout=self.config.timeout_s)
        self._local.conn = conn
        with self._conns_lock:
            self._conns.append(conn)
        return conn, False

    def _drop_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
            with self._conns_lock:
                if conn in self._conns:
                    self._conns.remove(conn)

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        url = self._endpoint
        headers = {"Content-Type": "application/json"}
        if self.config.api_key:
            headers["Authorization"] = f"Bearer {self.config.api_key}"
        data = json.dumps(body).encode()
        last: Exception | None = None
        attempt = 0
        while attempt <= self.config.retries:
            conn, reused = self._connection()
            try:
                conn.request("POST", self._path, body=data, headers=headers)
                resp = conn.getresponse()
                payload = resp.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as exc:
                self._drop_connection()
                if reused:  # the server closed an idle kept connection: reopen, not a failure
                    continue
                last = exc
            except (http.client.HTTPException, OSError) as exc:  # refused, timed out, garbled
                self._drop_connection()
                last = exc
            else:
                if resp.will_close:
                    self._drop_connection()
                if resp.status < 300:
                    return json.loads(payload)
                if resp.status < 500:  # a bad request does not get better by retrying
                    raise RuntimeError(f"{url}: HTTP {resp.status}: {payload[:500]!r}")
                last = RuntimeError(f"HTTP {resp.status}: {payload[:200]!r}")
            logger.warning("POST %s failed (attempt %d): %s", url, attempt + 1, last)
            attempt += 1
        raise RuntimeError(f"{url}: giving up after {self.config.retries + 1} attempts") from last

    def _completion(self, choice: dict[str, Any], r: GenerationRequest) -> Completion:
        text = choice.get("text", "")
        reason = choice.get("finish_reason")
        # vLLM says which stop matched in "stop_reason", SGLang in "matched_stop"
        matched = choice.get("stop_reason", choice.get("matched_stop", _MISSING))
        ids = choice.get("token_ids")
        eos_id = getattr(self.tokenizer, "eos_token_id", None)
        if reason == "length":
            stop, finish = None, "length"
        elif reason != "stop":
            raise RuntimeError(f"unexpected finish_reason {reason!r}")
        elif matched is _MISSING:
            # a plain OpenAI server: stop string or EOS, it does not say which; guessing would
            # put wrong text into the tree, so say "unknown" (stop=None) and warn once
            if not self._warned_plain:
                logger.warning("server does not report which stop string matched; completions get stop=None")
                self._warned_plain = True
            stop, finish = None, "stop"
        elif isinstance(matched, str):
            stop, finish = matched, "stop"
            if not text.endswith(matched):
                text += matched  # the server dropped the stop string from the text
        elif isinstance(matched, int) and matched != eos_id and self.tokenizer is not None:
            stop, finish = self.tokenizer.convert_ids_to_tokens(matched), "stop"
        else:  # None, or the EOS id
            stop, finish = None, "eos"
        if finish == "eos" and ids:
            text = strip_eos_text(text, list(ids), self.tokenizer)
        if ids is None:
            if self.tokenizer is None:
                raise RuntimeError("server returned no token_ids and HTTPGenerator has no tokenizer")
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            if finish == "eos" and eos_id is not None:
                ids.append(eos_id)
        return Completion(text=text, token_ids=list(ids), stop=stop, finish_reason=finish)

    def _one(self, r: GenerationRequest) -> list[Completion]:
        resp = self._post(self._payload(r))
        choices = sorted(resp["choices"], key=lambda c: c.get("index", 0))
        return [self._completion(c, r) for c in choices]

    def generate(self, requests: Sequence[GenerationRequest], *, dedup: bool = False) -> list[list[Completion]]:
        """Requests go out concurrently (the server batches them)."""
        out = list(self._pool.map(self._one, requests))
        return [dedup_completions(c) if dedup else c for c in out]

    async def agenerate(self, request: GenerationRequest, *, dedup: bool = False) -> list[Completion]:
        loop = asyncio.get_running_loop()
        comps = await loop.run_in_executor(self._pool, self._one, request)
        return dedup_completions(comps) if dedup else comps

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        with self._conns_lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            conn.close()
