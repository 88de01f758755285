"""OpenAI-compatible chat-completions client for the R+Judge reward.

The judge is any server that answers ``POST {base_url}/chat/completions`` in the OpenAI format
(vLLM, SGLang, llama.cpp's server, a hosted API). Configuration, in order of precedence: the
arguments, then the environment variables

* ``LCKV_JUDGE_URL``   — base URL, e.g. ``http://127.0.0.1:8000/v1`` (required),
* ``LCKV_JUDGE_MODEL`` — model name sent in the request (default ``"judge"``),
* ``LCKV_JUDGE_API_KEY`` — sent as ``Authorization: Bearer ...`` when set.

Failure mode: :meth:`JudgeClient.grade` never raises for network or protocol problems. After
``retries`` further attempts (exponential backoff) it logs a warning on the ``training.judge``
logger and returns ``None``; the reward then counts the judge part as 0.
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

__all__ = ["JudgeClient", "parse_criteria", "N_CRITERIA"]

logger = logging.getLogger("training.judge")

N_CRITERIA = 3
_BOXED = re.compile(r"\\boxed\{\s*Criterion\s*(\d+)\s*:\s*([01])\s*\}", re.IGNORECASE)


def parse_criteria(text: str, n: int = N_CRITERIA) -> list[int] | None:
    """The ``n`` binary verdicts of a judge reply, or None if the reply is malformed.

    A reply is well formed when each criterion 1..n appears in a ``\\boxed{Criterion k: 0|1}``
    exactly once (other text around the boxes is ignored). Out-of-range criteria, duplicates and
    missing criteria make the reply malformed.
    """
    if not isinstance(text, str):
        return None
    found: dict[int, int] = {}
    for k, v in _BOXED.findall(text):
        k = int(k)
        if not 1 <= k <= n or k in found:
            return None
        found[k] = int(v)
    if len(found) != n:
        return None
    return [found[k] for k in range(1, n + 1)]


@dataclass
class JudgeClient:
    """Minimal OpenAI-compatible client: timeout per request, retries with backoff.

    >>> client = JudgeClient(base_url="http://127.0.0.1:8000/v1", model="judge")  # doctest: +SKIP
    >>> client.grade([{"role": "user", "content": "..."}])                         # doctest: +SKIP
    [1, 0, 1]
    """

    base_url: str | None = None
    model: str | None = None
    api_key: str | None = None
    timeout: float = 30.0
    retries: int = 2
    backoff: float = 0.5
    temperature: float = 0.0
    max_tokens: int = 64
    extra_body: dict = field(default_factory=dict)

    def __post_init__(self):
        self.base_url = self.base_url or os.environ.get("LCKV_JUDGE_URL")
        self.model = self.model or os.environ.get("LCKV_JUDGE_MODEL", "judge")
        self.api_key = self.api_key or os.environ.get("LCKV_JUDGE_API_KEY")
        if not isinstance(self.timeout, (int, float)) or self.timeout <= 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {self.timeout!r}")
        if not isinstance(self.retries, int) or self.retries < 0:
            raise ValueError(f"retries must be an int >= 0, got {self.retries!r}")

    def complete(self, messages: list[dict]) -> str | None:
        """The assistant text of one chat completion, or None after all attempts failed."""
        if not self.base_url:
            logger.warning("judge unreachable: no base_url given and LCKV_JUDGE_URL is not set; "
                           "judge part scored 0")
            return None
        url = self.base_url.rstrip("/") + "/chat/completions"
        body = json.dumps({"model": self.model, "messages": messages, "temperature": self.temperature,
                           "max_tokens": self.max_tokens, **self.extra_body}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last_error = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                request = urllib.request.Request(url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    payload = json.loads(response.read().decode("utf-8", errors="replace"))
                content = payload["choices"][0]["message"]["content"]
                if not isinstance(content, str):
                    raise TypeError(f"message content is {type(content).__name__}, not str")
                return content
            except (OSError, urllib.error.URLError, ValueError, KeyError, IndexError, TypeError) as exc:
                # OSError covers refused connections and socket timeouts; ValueError bad JSON.
                last_error = exc
        logger.warning("judge unreachable at %s after %d attempt(s): %r; judge part scored 0",
                       url, self.retries + 1, last_error)
        return None

    def grade(self, messages: list[dict], n: int = N_CRITERIA) -> list[int] | None:
        """Binary verdicts from the judge, or None (logged) if unreachable or always malformed.

        A malformed reply is retried like a network error, up to ``retries`` more times.
        """
        for _ in range(self.retries + 1):
            text = self.complete(messages)
            if text is None:
                return None
            verdicts = parse_criteria(text, n)
            if verdicts is not None:
                return verdicts
            logger.info("malformed judge reply: %.200r", text)
        logger.warning("judge replies malformed after %d attempt(s); judge part scored 0", self.retries + 1)
        return None
